%% Transport tests: teleport between real nodes started with OTP's `peer' on this machine.
%%
%% The node running the suite (the "runner") is itself distributed: if `rebar3 ct' started it
%% without a name, init_per_suite starts distribution (and stops it at the end). Every test
%% case starts its own fresh peers (so counters and pools start from nothing) and
%% end_per_testcase stops them, even after a failure. Peers are controlled over their
%% standard_io, not over disterl, so a peer that is stopped (SIGSTOP) or killed does not take
%% the control channel down with the test.
%%
%% Code that runs on the peers lives in this module too (peers get the runner's code path).
-module(transport_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile([export_all, nowarn_export_all]).

-define(PEERS, transport_SUITE_peers).
-define(MB, (1024 * 1024)).

%%--------------------------------------------------------------------------------------------
%% CT callbacks

suite() ->
    [{timetrap, {seconds, 120}}].

all() ->
    [{group, default_config}, {group, small_queue}, {group, short_handshake}].

groups() ->
    [{default_config, [],
      [delivery, first_send_race, ordering, big_binary, no_long_schedule_receiving, stats,
       wrong_cookie_rejected,
       peer_restart, idle_socket_flood_keeps_messages]},
     %% max_queue_bytes = 1 MB on the runner.
     {small_queue, [], [nosuspend_when_peer_stops_reading]},
     %% handshake_timeout = 1 s on the runner.
     {short_handshake, [], [peer_paused_while_connecting]}].

init_per_suite(Config) ->
    Started = teleport_test_util:start_distribution("teleport_ct_"),
    ct:pal("runner ~p, cookie set: ~p", [node(), erlang:get_cookie() =/= nocookie]),
    %% The peers started by the current test case.
    Holder = teleport_test_util:start_tables([{?PEERS, [set]}]),
    [{started_dist, Started}, {peer_table_holder, Holder} | Config].

end_per_suite(Config) ->
    _ = teleport:stop(),
    ?config(peer_table_holder, Config) ! stop,
    teleport_test_util:stop_distribution(?config(started_dist, Config)),
    ok.

init_per_group(small_queue, Config) ->
    teleport_test_util:restart_teleport([{max_queue_bytes, ?MB}]),
    Config;
init_per_group(short_handshake, Config) ->
    teleport_test_util:restart_teleport([{handshake_timeout, 1000}]),
    Config;
init_per_group(_, Config) ->
    teleport_test_util:restart_teleport([]),
    Config.

end_per_group(_, _Config) ->
    teleport_test_util:reset_teleport().

init_per_testcase(_, Config) ->
    true = ets:delete_all_objects(?PEERS),
    Config.

end_per_testcase(_, _Config) ->
    stop_all_peers(),
    ok.

%%--------------------------------------------------------------------------------------------
%% 1. delivery

delivery(_Config) ->
    [{PA, A, _}, {PB, B, _}] = start_peers(?FUNCTION_NAME, 2),
    %% To registered names and to pids on both peers; the echo replies with teleport:send.
    Echoes = [{Node, P, peer:call(P, ?MODULE, start_echo, [echo]),
               peer:call(P, ?MODULE, start_echo, [undefined])} || {P, Node} <- [{PA, A}, {PB, B}]],
    T0 = erlang:monotonic_time(microsecond),
    lists:foreach(
      fun({Node, _P, RegPid, Pid}) ->
              {pong, Node, RegPid} = ping({echo, Node}),
              {pong, Node, Pid} = ping(Pid)
      end, Echoes),
    ct:pal("4 round trips (name and pid on 2 peers) in ~b us",
           [erlang:monotonic_time(microsecond) - T0]),
    %% The replies came over teleport, not disterl (a counter may trail its message a bit).
    [wait_until(fun() -> maps:with([msgs_in, msgs_out], node_stats(N)) =:=
                             #{msgs_in => 2, msgs_out => 2} end, 2000) || N <- [A, B]],
    Stats = teleport:stats(),
    ct:pal("stats after the round trips: ~p", [maps:with([A, B], Stats)]),

    %% Local destinations are delivered without a socket.
    Ref = make_ref(),
    ok = teleport:send(self(), {local_pid, Ref}),
    true = register(transport_local, self()),
    ok = teleport:send({transport_local, node()}, {local_tuple, Ref}),
    ok = teleport:send(transport_local, {local_atom, Ref}),
    ok = teleport:send(transport_local, {local_atom_nosuspend, Ref}, [nosuspend]),
    true = unregister(transport_local),
    [receive {Tag, Ref} -> ok after 1000 -> ct:fail({not_delivered, Tag}) end
     || Tag <- [local_pid, local_tuple, local_atom, local_atom_nosuspend]],
    ?assertNot(maps:is_key(node(), teleport_server:pool_info())),
    ?assertNot(maps:is_key(node(), teleport:stats())),

    %% Malformed destinations (and options) raise exactly what `!' (erlang:send/3) raises;
    %% where `!' returns (an unregistered name on this node, given as {Name, node()}),
    %% teleport:send returns ok.
    Bad = [42, {a, 1}, {1, node()}, {a, b, c}, "name", <<"name">>, 1.5, [],
           transport_no_such_local_name],
    lists:foreach(
      fun(Dest) ->
              Expected = catch_error(fun() -> bang(Dest, x) end),
              ?assertEqual({error, badarg}, Expected),
              ?assertEqual(Expected, catch_error(fun() -> teleport:send(Dest, x) end)),
              ?assertEqual(Expected, catch_error(fun() -> teleport:send(Dest, x, []) end))
      end, Bad),
    ?assertEqual({returned, x}, catch_error(fun() -> bang({transport_no_such_local_name, node()}, x) end)),
    ?assertEqual({returned, ok},
                 catch_error(fun() -> teleport:send({transport_no_such_local_name, node()}, x) end)),
    ?assertEqual(catch_error(fun() -> erlang:send(self(), x, [bogus]) end),
                 catch_error(fun() -> teleport:send(self(), x, [bogus]) end)),
    ?assertEqual(catch_error(fun() -> erlang:send(self(), x, bogus) end),
                 catch_error(fun() -> teleport:send(self(), x, bogus) end)),
    flush(),

    %% An unregistered remote name drops silently: ok, nothing arrives, the connection
    %% stays up and later messages (even to the same name) still arrive.
    InBefore = peer_msgs_in(PA),
    ok = teleport:send({transport_ghost, A}, {ghost, 1}),
    %% A name that is no atom on the peer: decoded safely there, no atom made for it.
    NoAtom = "transport_no_atom_" ++ integer_to_list(erlang:unique_integer([positive])),
    ok = teleport:send({list_to_atom(NoAtom), A}, {ghost, 2}),
    wait_until(fun() -> peer_msgs_in(PA) >= InBefore + 2 end, 5000),
    ?assertEqual(false, peer:call(PA, ?MODULE, is_atom_text, [NoAtom])),
    timer:sleep(100),
    _ = peer:call(PA, ?MODULE, start_collector, [transport_ghost]),
    ok = teleport:send({transport_ghost, A}, {ghost, 3}),
    {pong, A, _} = ping({echo, A}),
    wait_until(fun() -> peer:call(PA, ?MODULE, collected, [transport_ghost]) =/= [] end, 5000),
    timer:sleep(200),
    ?assertEqual([{ghost, 3}], peer:call(PA, ?MODULE, collected, [transport_ghost])),
    %% A dead remote pid: dropped silently too.
    Dead = peer:call(PA, erlang, spawn, [erlang, is_atom, [x]]),
    timer:sleep(50),
    ok = teleport:send(Dead, {to_dead, 1}),
    {pong, A, _} = ping({echo, A}),
    StatsA = maps:get(A, teleport:stats()),
    ?assertEqual(0, maps:get(reconnects, StatsA)),
    ?assertEqual(0, maps:get(dropped, StatsA)),
    receive Unexpected -> ct:fail({unexpected, Unexpected}) after 0 -> ok end,

    %% A node that does not exist: {error, nodedown} within a few seconds, never a hang.
    {T, Result} = timed(fun() -> teleport:send({some_name, 'nonexistent@nohost'}, x) end,
                        10000),
    ct:pal("send to nonexistent@nohost: ~p in ~b ms", [Result, T]),
    ?assertEqual({error, nodedown}, Result),
    ?assert(T < 5000),
    {T2, Result2} = timed(fun() -> teleport:send({some_name, 'nonexistent@nohost'}, x) end,
                          10000),
    ct:pal("again: ~p in ~b ms", [Result2, T2]),
    ?assertEqual({error, nodedown}, Result2),
    ?assert(T2 < 5000),
    ?assertEqual(noconnect,
                 teleport:send({some_name, 'nonexistent@nohost'}, x, [noconnect])),
    ?assertNot(maps:is_key('nonexistent@nohost', teleport_server:pool_info())),
    ok.

%%--------------------------------------------------------------------------------------------
%% 2. first_send_race

first_send_race(_Config) ->
    N = 200,
    [{P, Node, _}] = start_peers(?FUNCTION_NAME, 1),
    _ = peer:call(P, ?MODULE, start_collector, [race]),
    ?assertNot(maps:is_key(Node, teleport_server:pool_info())),
    Self = self(),
    Pids = [spawn_link(fun() ->
                               receive go -> ok end,
                               Self ! {sent, I, teleport:send({race, Node}, {race, I})}
                       end) || I <- lists:seq(1, N)],
    T0 = erlang:monotonic_time(microsecond),
    [Pid ! go || Pid <- Pids],
    Results = [receive {sent, I, R} -> R after 10000 -> {timeout, I} end
               || I <- lists:seq(1, N)],
    T1 = erlang:monotonic_time(microsecond),
    ?assertEqual(lists:duplicate(N, ok), Results),
    wait_until(fun() -> peer:call(P, ?MODULE, count, [race]) >= N end, 10000),
    T2 = erlang:monotonic_time(microsecond),
    Got = peer:call(P, ?MODULE, collected, [race]),
    ?assertEqual([{race, I} || I <- lists:seq(1, N)], lists:sort(Got)),
    ct:pal("~b first sends returned in ~b us, all arrived after ~b us", [N, T1 - T0, T2 - T0]),
    %% One pool: the table has one entry, and the connections made (counted per node, so a
    %% second pool would show) are no more than one pool's size.
    Pools = teleport_server:pool_info(),
    ct:pal("pool_info: ~p", [Pools]),
    PoolSize = pool_size(),
    ?assertEqual(1, length([K || K <- maps:keys(Pools), K =:= Node])),
    ?assertMatch({ok, _}, teleport_pools:lookup(Node)),
    ?assertEqual(PoolSize, length(maps:get(Node, Pools))),
    wait_until(fun() -> maps:get(msgs_out, node_stats(Node)) >= N end, 5000),
    timer:sleep(100),
    S = node_stats(Node),
    ct:pal("runner stats for ~p: ~p", [Node, S]),
    ?assertEqual(N, maps:get(msgs_out, S)),
    ?assert(maps:get(connections, S) =< PoolSize),
    PeerS = maps:get(node(), peer:call(P, teleport, stats, [])),
    ct:pal("peer stats for the runner: ~p", [PeerS]),
    ?assertEqual(N, maps:get(msgs_in, PeerS)),
    ?assert(maps:get(connections_in, PeerS) =< PoolSize),
    ok.

%%--------------------------------------------------------------------------------------------
%% 3. ordering

%% 8 senders x ORDERING_MSGS messages (default 100000; set the environment variable to scale
%% it down on a slow machine). Senders 1-2 send to the receiver on peer A, 3-4 to the one on
%% B, 5-8 alternate between A and B (one sequence per destination).
ordering(_Config) ->
    N0 = case os:getenv("ORDERING_MSGS") of
             false -> 100000;
             Text -> list_to_integer(Text)
         end,
    N = N0 + (N0 rem 2),
    [{PA, A, _}, {PB, B, _}] = start_peers(?FUNCTION_NAME, 2),
    Plan = [{1, [A]}, {2, [A]}, {3, [B]}, {4, [B]},
            {5, [A, B]}, {6, [B, A]}, {7, [A, B]}, {8, [B, A]}],
    Expect = fun(Node) ->
                     maps:from_list([{Id, N div length(Ds)}
                                     || {Id, Ds} <- Plan, lists:member(Node, Ds)])
             end,
    Self = self(),
    [_ = peer:call(P, ?MODULE, start_order_receiver, [order_rx, maps:keys(Expect(Node)), Self])
     || {P, Node} <- [{PA, A}, {PB, B}]],
    %% Pools up first, so the timing is of the traffic.
    [ok = teleport:send({order_rx, Node}, warm_up) || Node <- [A, B]],
    Senders = [spawn_link(fun() -> order_sender(Id, [{order_rx, D} || D <- Ds], N, Self) end)
               || {Id, Ds} <- Plan],
    T0 = erlang:monotonic_time(microsecond),
    [S ! go || S <- Senders],
    [receive {sender_done, Id} -> ok after 60000 -> ct:fail({sender_stuck, Id}) end
     || {Id, _} <- Plan],
    T1 = erlang:monotonic_time(microsecond),
    Reports = maps:from_list(
                [receive {order_report, Node, Report} -> {Node, Report}
                 after 60000 -> ct:fail({no_report, Node})
                 end || Node <- [A, B]]),
    T2 = erlang:monotonic_time(microsecond),
    Total = 8 * N,
    ct:pal("~b messages: sent in ~.2f s, all received in ~.2f s: ~b msgs/s",
           [Total, (T1 - T0) / 1.0e6, (T2 - T0) / 1.0e6, Total * 1000000 div (T2 - T0)]),
    Lost = lists:sum([Want - Count || Node <- [A, B],
                                      {Id, Want} <- maps:to_list(Expect(Node)),
                                      {Count, _Last, _Bad} <- [maps:get(Id, maps:get(Node, Reports))]]),
    Reordered = lists:sum([Bad || Node <- [A, B],
                                  {_Id, {_Count, _Last, Bad}} <- maps:to_list(maps:get(Node, Reports))]),
    ct:pal("reports: ~p~nlost: ~b, out of sequence: ~b", [Reports, Lost, Reordered]),
    ?assertEqual(0, Lost),
    ?assertEqual(0, Reordered),
    [?assertEqual(Expect(Node),
                  maps:map(fun(_, {Count, _, _}) -> Count end, maps:get(Node, Reports)))
     || Node <- [A, B]],
    ok.

order_sender(Id, Dests, N, Parent) ->
    receive go -> ok end,
    D = list_to_tuple(Dests),
    Len = tuple_size(D),
    order_send(Id, D, Len, 0, N),
    [ok = teleport:send(Dest, {done, Id, N div Len}) || Dest <- Dests],
    Parent ! {sender_done, Id}.

order_send(_Id, _D, _Len, N, N) ->
    ok;
order_send(Id, D, Len, I, N) ->
    ok = teleport:send(element(I rem Len + 1, D), {Id, I div Len + 1}),
    order_send(Id, D, Len, I + 1, N).

%%--------------------------------------------------------------------------------------------
%% 4. big_binary

big_binary(_Config) ->
    [{P, Node, _}] = start_peers(?FUNCTION_NAME, 1),
    Echo = peer:call(P, ?MODULE, start_echo, [echo]),
    {pong, Node, Echo} = ping({echo, Node}),
    Size = 100 * ?MB,
    Bin = crypto:strong_rand_bytes(Size),
    Hash = crypto:hash(sha256, Bin),
    T0 = erlang:monotonic_time(microsecond),
    ok = teleport:send({echo, Node}, {big, self(), Bin}),
    T1 = erlang:monotonic_time(microsecond),
    {PeerHash, Back} = receive
                           {big_echo, Node, H, B} -> {H, B}
                       after 60000 -> ct:fail(no_echo)
                       end,
    T2 = erlang:monotonic_time(microsecond),
    ?assertEqual(Hash, PeerHash),
    ?assertEqual(Size, byte_size(Back)),
    ?assertEqual(Hash, crypto:hash(sha256, Back)),
    ct:pal("100 MB: send returned after ~.3f s; round trip (peer hashed and echoed it) in "
           "~.3f s: ~.1f MB/s each way",
           [(T1 - T0) / 1.0e6, (T2 - T0) / 1.0e6, 2 * 100 / ((T2 - T0) / 1.0e6)]),
    ok.

%%--------------------------------------------------------------------------------------------
%% 4b. no_long_schedule_receiving

%% A 200 MB message and a flood of small ones arrive whole and in order, and nothing that
%% teleport runs on the receiving node's schedulers holds one for more than 5 ms meanwhile
%% (a `long_schedule' report naming the receiver or a teleport process would say so): the
%% small frames are read in short turns charged to the reader, the large one on a dirty
%% scheduler, as a binary the receiver gets by reference.
%%
%% `long_schedule' times the wall clock, which the OS stretches too: on a 2-core machine
%% running both nodes it preempts a scheduler's thread for some milliseconds at times (seen
%% in CI, once in a few runs, as a 9 ms report of a reader). So the case checks what the
%% reader controls, its longest turn in CPU time, every time, and asks for a report-free run
%% in three (two in a row were stretched once in CI, 2026-12-04: 6 and 9 ms of wall time
%% for turns of under 0.9 ms of CPU): a reader that overstays, as one charged by its bytes did (six 1.5 ms turns in a
%% schedule), shows in every run.
no_long_schedule_receiving(_Config) ->
    [{P, Node, _}] = start_peers(?FUNCTION_NAME, 1),
    _ = peer:call(P, ?MODULE, start_echo, [echo]),
    {pong, Node, _} = ping({echo, Node}),
    Runs = long_schedule_runs(P, Node, 3),
    ct:pal("per run: long_schedule reports (all of the node's), the readers' longest turns "
           "{cpu_us, wall_us}: ~p", [Runs]),
    ?assert(lists:any(fun({Ours, _, _}) -> Ours =:= [] end, Runs)).

%% Up to N runs of the 200 MB + 50,000 messages, until one has no report naming ours:
%% [{OursReports, AllReports, LongestTurns}].
long_schedule_runs(_P, _Node, 0) ->
    [];
long_schedule_runs(P, Node, N) ->
    Small = 50000,
    Sink = peer:call(P, ?MODULE, start_counting_sink, [self(), Small + 1]),
    Monitor = peer:call(P, ?MODULE, start_long_schedule_monitor, [5]),
    Big = binary:copy(<<"teleport">>, 25 * ?MB),
    ok = teleport:send(Sink, {big, Big}),
    [ok = teleport:send(Sink, {small, N1}) || N1 <- lists:seq(1, Small)],
    receive
        {counted, Sink, Report} ->
            %% The big one by reference: a sub-binary of the frame it came in.
            ?assertMatch(#{big := {Size, Referenced}, small := Small}
                           when Size =:= 200 * ?MB andalso Referenced > Size, Report)
    after 60000 -> ct:fail(not_all_arrived)
    end,
    {Long, Ours} = peer:call(P, ?MODULE, long_schedules, [Monitor, Sink]),
    #{listener := #{incoming := In}} = peer:call(P, teleport, info, []),
    Turns = [{Cpu, Wall} || #{peer := Peer, longest_turn_cpu_us := Cpu,
                              longest_turn_wall_us := Wall} <- In,
                            Peer =:= node()],
    %% No turn on a normal scheduler took 5 ms of CPU (these connections carried the run).
    ?assertNotEqual([], Turns),
    ?assertEqual([], [T || {Cpu, _} = T <- Turns, Cpu >= 5000]),
    case Ours of
        [] -> [{Ours, Long, Turns}];
        _ -> [{Ours, Long, Turns} | long_schedule_runs(P, Node, N - 1)]
    end.

%%--------------------------------------------------------------------------------------------
%% 5. wrong_cookie_rejected

wrong_cookie_rejected(_Config) ->
    [{P, Node, _}] = start_peers(?FUNCTION_NAME, 1),
    _ = peer:call(P, ?MODULE, start_echo, [echo]),
    %% The peer discovers the runner (and the runner the peer): both are allowed in.
    {pong, Node, _} = ping({echo, Node}),
    true = register(transport_raw_sink, self()),
    {ok, Port} = teleport_server:listen_port(),
    PeerName = atom_to_binary(Node, utf8),
    Cookie = atom_to_binary(erlang:get_cookie(Node), utf8),
    %% An idle connection: closed by the handshake timeout (it runs meanwhile).
    {ok, Idle} = gen_tcp:connect({127, 0, 0, 1}, Port, [binary, {active, false}]),
    IdleT0 = erlang:monotonic_time(millisecond),
    %% The first round warms up whatever makes atoms once (log events, modules...).
    {WarmUs, _} = timer:tc(fun() -> hostile_round(Port, PeerName, Cookie) end),
    flush(),
    Atoms0 = erlang:system_info(atom_count),
    {Us, Rounds} = timer:tc(fun() -> [hostile_round(Port, PeerName, Cookie)
                                      || _ <- lists:seq(1, 3)] end),
    IdleResult = raw_wait_closed(Idle, 15000),
    IdleMs = erlang:monotonic_time(millisecond) - IdleT0,
    Atoms1 = erlang:system_info(atom_count),
    ct:pal("warm-up round ~b us, 3 more rounds ~b us; idle connection: ~p after ~b ms; "
           "atom_count ~b -> ~b; rounds: ~p",
           [WarmUs, Us, IdleResult, IdleMs, Atoms0, Atoms1, Rounds]),
    ?assertMatch({closed, <<>>}, IdleResult),
    ?assertEqual(Atoms0, Atoms1),
    %% The node still carries normal traffic, both ways.
    {pong, Node, _} = ping({echo, Node}),
    unregister(transport_raw_sink),
    ok.

%% One round of hostile connections, then the positive control; returns what happened.
hostile_round(Port, PeerName, Cookie) ->
    Unique = integer_to_binary(erlang:unique_integer([positive])),
    %% A connected peer's name with a wrong cookie: REJECT(2), then closed.
    Wrong = teleport_test_util:raw_dial(Port, PeerName, <<"wrong-cookie-", Unique/binary>>),
    ?assertMatch({rejected, 2, closed}, Wrong),
    %% A name the runner never heard of (no atom exists for it): REJECT(2), then closed.
    Unknown = teleport_test_util:raw_dial(Port, <<"stranger_", Unique/binary, "@nowhere">>, Cookie),
    ?assertMatch({rejected, 2, closed}, Unknown),
    %% Another handshake version (1, before lanes): REJECT(3).
    BadVersion = raw_send_and_close(Port, handshake_frame(<<"HTLPT", 1, 3, "a@b",
                                                            0:256>>)),
    ?assertMatch({closed, <<0, 2, "R", 3>>}, BadVersion),
    %% Garbage: random bytes, an HTTP request, a huge length prefix.
    Random = raw_send_and_close(Port, crypto:strong_rand_bytes(2000)),
    ?assertMatch({closed, _}, Random),
    Http = raw_send_and_close(Port, <<"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n">>),
    ?assertMatch({closed, _}, Http),
    Huge = raw_send_and_close(Port, <<16#FFFF:16, 0:8000>>),
    ?assertMatch({closed, _}, Huge),
    %% The positive control: the same client with the right cookie gets OK, and its frame
    %% (to a registered name on the runner) is delivered.
    Ref = erlang:unique_integer(),
    {ok, S} = teleport_test_util:raw_dial(Port, PeerName, Cookie),
    ok = raw_send_frame(S, transport_raw_sink, {raw_frame, Ref, <<"payload">>}),
    receive
        {raw_frame, Ref, <<"payload">>} -> ok
    after 5000 -> ct:fail(raw_frame_not_delivered)
    end,
    ok = gen_tcp:close(S),
    #{wrong_cookie => Wrong, unknown_node => Unknown, bad_version => BadVersion,
      random => Random, http => Http, huge_length => Huge, positive_control => delivered}.

%% The connection's first data frame: a term to a name registered on the acceptor.
raw_send_frame(S, Name, Msg) ->
    ok = inet:setopts(S, [{packet, raw}]),
    gen_tcp:send(S, teleport_test_util:raw_frame(1, Name, Msg)).

handshake_frame(Body) ->
    <<(byte_size(Body)):16, Body/binary>>.

%% Sends raw bytes, then reads until the listener closes: {closed, WhatItSent} or a failure.
raw_send_and_close(Port, Bytes) ->
    {ok, S} = gen_tcp:connect({127, 0, 0, 1}, Port, [binary, {active, false}]),
    ok = gen_tcp:send(S, Bytes),
    raw_wait_closed(S, 10000).

raw_wait_closed(S, Timeout) ->
    Deadline = erlang:monotonic_time(millisecond) + Timeout,
    raw_wait_closed(S, Deadline, <<>>).

raw_wait_closed(S, Deadline, Acc) ->
    Left = max(0, Deadline - erlang:monotonic_time(millisecond)),
    case gen_tcp:recv(S, 0, Left) of
        {ok, More} ->
            raw_wait_closed(S, Deadline, <<Acc/binary, More/binary>>);
        {error, Closed} when Closed =:= closed; Closed =:= econnreset ->
            gen_tcp:close(S),
            {closed, Acc};
        {error, timeout} ->
            gen_tcp:close(S),
            {still_open, Acc}
    end.

%%--------------------------------------------------------------------------------------------
%% 6. peer_restart

peer_restart(_Config) ->
    Name = peer:random_name(?FUNCTION_NAME),
    {P1, Node, OsPid1} = start_peer(Name),
    OldColl = peer:call(P1, ?MODULE, start_collector, [coll]),
    [ok = teleport:send({coll, Node}, {before, I}) || I <- lists:seq(1, 10)],
    wait_until(fun() -> peer:call(P1, ?MODULE, count, [coll]) =:= 10 end, 5000),
    wait_until(fun() -> maps:get(acked, node_stats(Node)) =:= 10 end, 5000),
    Before = node_stats(Node),
    %% The peer stops reading, messages pile up (in socket buffers, then in the queue), and
    %% the peer dies: what was still queued is dropped, and counted.
    true = monitor_node(Node, true),
    teleport_test_util:stop_os_process(OsPid1),
    Bin = crypto:strong_rand_bytes(?MB),
    Sent = 40,
    [ok = teleport:send({coll, Node}, {queued, I, Bin}) || I <- lists:seq(1, Sent)],
    timer:sleep(200),
    Queued = node_stats(Node),
    T0 = erlang:monotonic_time(millisecond),
    _ = os:cmd("kill -9 " ++ OsPid1),
    receive {nodedown, Node} -> ok after 15000 -> ct:fail(no_nodedown) end,
    T1 = erlang:monotonic_time(millisecond),
    wait_until(fun() -> maps:get(queued_bytes, node_stats(Node)) =:= 0 end, 10000),
    After = node_stats(Node),
    Delta = maps:map(fun(K, V) -> V - maps:get(K, Before) end, After),
    ct:pal("before stop ~p~nqueued while stopped ~p~nafter kill ~p~nnodedown after ~b ms",
           [Before, Queued, After, T1 - T0]),
    ?assert(maps:get(dropped, Delta) > 0),
    %% Every message that was accepted was either acknowledged by the peer or counted as
    %% dropped (here all of them: the peer read none of them before it died).
    ?assertEqual(Sent, maps:get(acked, Delta) + maps:get(dropped, Delta)),
    ?assertEqual(0, maps:get(connections, After)),
    %% While the node is down: {error, nodedown}, quickly.
    {TDown, Down} = timed(fun() -> teleport:send({coll, Node}, after_death) end, 10000),
    ct:pal("send while down: ~p in ~b ms", [Down, TDown]),
    ?assertEqual({error, nodedown}, Down),
    ?assert(TDown < 5000),
    %% A new node under the same name.
    T2 = erlang:monotonic_time(millisecond),
    {P2, Node, _} = start_peer_retrying(Name, 10000),
    NewColl = peer:call(P2, ?MODULE, start_collector, [coll]),
    _ = peer:call(P2, ?MODULE, start_echo, [echo]),
    T3 = erlang:monotonic_time(millisecond),
    %% The node is up: from here on no retries.
    ok = teleport:send({coll, Node}, {again, 1}),
    ok = teleport:send(NewColl, {again, 2}),
    %% A pid of the dead incarnation is no process of the new one, even where the new
    %% collector got the same process number: dropped, as disterl drops it.
    ok = teleport:send(OldColl, {stale, 3}),
    wait_until(fun() -> peer:call(P2, ?MODULE, count, [coll]) >= 2 end, 5000),
    T4 = erlang:monotonic_time(millisecond),
    timer:sleep(300),
    ct:pal("old collector ~p, new collector ~p (same text: ~p)",
           [OldColl, NewColl, pid_to_list(OldColl) =:= pid_to_list(NewColl)]),
    ?assertNotEqual(OldColl, NewColl),
    ?assertEqual([{again, 1}, {again, 2}], lists:sort(peer:call(P2, ?MODULE, collected, [coll]))),
    {pong, Node, _} = ping({echo, Node}),
    ct:pal("new node up in ~b ms; first messages arrived ~b ms later; stats now ~p",
           [T3 - T2, T4 - T3, node_stats(Node)]),
    ok.

%%--------------------------------------------------------------------------------------------
%% 7. nosuspend_when_peer_stops_reading (group small_queue: max_queue_bytes = 1 MB)

nosuspend_when_peer_stops_reading(_Config) ->
    ?assertEqual(?MB, maps:get(max_queue_bytes, teleport_config:load())),
    [{PA, A, OsPidA}, {PB, B, _}] = start_peers(?FUNCTION_NAME, 2),
    [_ = peer:call(P, ?MODULE, start_collector, [coll]) || P <- [PA, PB]],
    [ok = teleport:send({coll, Node}, warm_up) || Node <- [A, B]],
    [wait_until(fun() -> peer:call(P, ?MODULE, count, [coll]) =:= 1 end, 5000) || P <- [PA, PB]],
    Bin = crypto:strong_rand_bytes(?MB),
    Self = self(),
    %% One process fills its connection to A until nosuspend, and still gets nosuspend after
    %% a pause (A really stopped reading, it is not just a busy writer). It brings that
    %% connection up before A stops: the test is of a full connection, not a handshake.
    Filler = spawn_link(fun() ->
                                ok = teleport:send({coll, A}, {fill, 0, small}),
                                Self ! warmed_up,
                                receive go -> ok end,
                                Self ! {filled, fill(A, Bin, 1, 0, [])}
                        end),
    receive warmed_up -> ok end,
    wait_until(fun() -> peer:call(PA, ?MODULE, count, [coll]) =:= 2 end, 5000),
    teleport_test_util:stop_os_process(OsPidA),
    Filler ! go,
    {Oks, Attempts, Transient} = receive {filled, R} -> R after 60000 -> ct:fail(fill_stuck) end,
    unlink(Filler),
    ct:pal("A stopped: ~b sends of 1 MB returned ok, sustained nosuspend at attempt ~b "
           "(transient nosuspend at ~w); A stats ~p",
           [Oks, Attempts, Transient, node_stats(A)]),
    ?assert(Attempts < 200),
    %% Meanwhile another process sends to B: ok, and it arrives.
    NB = 20,
    T0 = erlang:monotonic_time(microsecond),
    Other = spawn_link(fun() ->
                               Rs = [teleport:send({coll, B}, {other, I, Bin})
                                     || I <- lists:seq(1, NB)],
                               Self ! {other_sent, Rs}
                       end),
    receive {other_sent, Rs} -> ?assertEqual(lists:duplicate(NB, ok), Rs)
    after 20000 -> ct:fail(other_pool_blocked)
    end,
    unlink(Other),
    wait_until(fun() -> peer:call(PB, ?MODULE, count, [coll]) =:= NB + 1 end, 20000),
    T1 = erlang:monotonic_time(microsecond),
    ?assertEqual([warm_up | [{other, I, {'$bin', ?MB}} || I <- lists:seq(1, NB)]],
                 peer:call(PB, ?MODULE, collected, [coll])),
    %% Disterl answers too.
    ?assertEqual(pong, net_adm:ping(B)),
    ?assertEqual(B, rpc:call(B, erlang, node, [], 5000)),
    ct:pal("while A was stopped: ~b MB to B in ~.3f s, ping and rpc to B answered",
           [NB, (T1 - T0) / 1.0e6]),
    %% A reads again: everything that returned ok arrives, in order, and nothing else.
    teleport_test_util:continue_os_process(OsPidA),
    T2 = erlang:monotonic_time(microsecond),
    wait_until(fun() -> peer:call(PA, ?MODULE, count, [coll]) >= Oks + 2 end, 30000),
    T3 = erlang:monotonic_time(microsecond),
    timer:sleep(300),
    GotA = peer:call(PA, ?MODULE, collected, [coll]),
    ?assertEqual([warm_up, {fill, 0, small} | [{fill, I, {'$bin', ?MB}} || I <- lists:seq(1, Oks)]],
                 GotA),
    SA = node_stats(A),
    ct:pal("A resumed: the ~b queued messages arrived in ~.3f s; A stats ~p",
           [Oks, (T3 - T2) / 1.0e6, SA]),
    ?assertEqual(0, maps:get(dropped, SA)),
    ?assertEqual(Oks + 2, maps:get(msgs_out, SA)),
    ok.

%%--------------------------------------------------------------------------------------------
%% 9. peer_paused_while_connecting (group short_handshake: handshake_timeout = 1 s)

%% The module doc promises: "while both nodes stay up and connected, nothing is lost", and
%% "frames still queued go out on the next connection". Here the peer stays up and
%% connected over disterl (it is paused for 2.5 s, far below net_ticktime), but it is paused
%% while the runner's connection to it is shaking hands: messages that send/2 accepted with
%% `ok' must still arrive once it runs again, in order, before the ones sent after.
peer_paused_while_connecting(_Config) ->
    ?assertEqual(1000, maps:get(handshake_timeout, teleport_config:load())),
    [{P, Node, OsPid}] = start_peers(?FUNCTION_NAME, 1),
    _ = peer:call(P, ?MODULE, start_collector, [coll]),
    %% The pool exists (the peer's listener is known); its connections come up on first use.
    {ok, _Pool} = teleport_server:connect(Node),
    teleport_test_util:stop_os_process(OsPid),
    ok = teleport:send({coll, Node}, {msg, 1}),
    timer:sleep(2500),
    Paused = node_stats(Node),
    Info = teleport_server:pool_info(),
    teleport_test_util:continue_os_process(OsPid),
    ok = teleport:send({coll, Node}, {msg, 2}),
    wait_until(fun() -> peer:call(P, ?MODULE, count, [coll]) >= 1 end, 5000),
    timer:sleep(500),
    Got = peer:call(P, ?MODULE, collected, [coll]),
    ct:pal("while paused: stats ~p~npool_info ~p~nafter: stats ~p~nreceived ~p",
           [Paused, Info, node_stats(Node), Got]),
    ?assertEqual([{msg, 1}, {msg, 2}], Got),
    ?assertEqual(0, maps:get(dropped, node_stats(Node))),
    ok.

%%--------------------------------------------------------------------------------------------
%% 10. idle_socket_flood_keeps_messages

%% Anyone who can reach a node's teleport port can hold its handshake slots (the listener
%% closes connections beyond 64 handshakes in progress, listener.rs MAX_HANDSHAKES) with idle
%% sockets. A real peer's new connection is then closed during its handshake: it should
%% connect again later, and the message that send/2 accepted with `ok' should arrive, not
%% be dropped while both nodes are up and connected.
idle_socket_flood_keeps_messages(_Config) ->
    [{P, Node, _}] = start_peers(?FUNCTION_NAME, 1),
    _ = peer:call(P, ?MODULE, start_collector, [coll]),
    {ok, Port} = peer:call(P, teleport_server, listen_port, []),
    Idle = [begin
                {ok, S} = gen_tcp:connect({127, 0, 0, 1}, Port, [binary, {active, false}]),
                S
            end || _ <- lists:seq(1, 64)],
    timer:sleep(200),
    ok = teleport:send({coll, Node}, {msg, 1}),
    timer:sleep(1000),
    During = node_stats(Node),
    [ok = gen_tcp:close(S) || S <- Idle],
    timer:sleep(200),
    ok = teleport:send({coll, Node}, {msg, 2}),
    wait_until(fun() -> peer:call(P, ?MODULE, count, [coll]) >= 1 end, 5000),
    timer:sleep(500),
    Got = peer:call(P, ?MODULE, collected, [coll]),
    ct:pal("stats during the flood ~p~nafter ~p~nreceived ~p", [During, node_stats(Node), Got]),
    ?assertEqual([{msg, 1}, {msg, 2}], Got),
    ?assertEqual(0, maps:get(dropped, node_stats(Node))),
    ok.

%% Sends 1 MB messages with nosuspend until one returns nosuspend twice, 300 ms apart.
%% Returns {Oks, Attempts, TransientNosuspendAttempts}.
fill(_Node, _Bin, Attempt, Oks, Transient) when Attempt >= 1000 ->
    {Oks, Attempt, lists:reverse(Transient)};
fill(Node, Bin, Attempt, Oks, Transient) ->
    Msg = {fill, Oks + 1, Bin},
    case teleport:send({coll, Node}, Msg, [nosuspend]) of
        ok ->
            fill(Node, Bin, Attempt + 1, Oks + 1, Transient);
        nosuspend ->
            timer:sleep(300),
            case teleport:send({coll, Node}, Msg, [nosuspend]) of
                nosuspend -> {Oks, Attempt, lists:reverse(Transient)};
                ok -> fill(Node, Bin, Attempt + 1, Oks + 1, [Attempt | Transient])
            end
    end.

%%--------------------------------------------------------------------------------------------
%% 8. stats

stats(_Config) ->
    [{P, Node, _}] = start_peers(?FUNCTION_NAME, 1),
    _ = peer:call(P, ?MODULE, start_collector, [coll]),
    Sizes = [0, 1, 10, 100, 1000, 10000, 65536, 100000, 1000000, 3000000],
    Msgs = [crypto:strong_rand_bytes(Size) || _ <- lists:seq(1, 5), Size <- Sizes],
    N = length(Msgs),
    Payload = lists:sum([byte_size(M) || M <- Msgs]),
    [ok = teleport:send({coll, Node}, M) || M <- Msgs],
    wait_until(fun() -> peer:call(P, ?MODULE, count, [coll]) =:= N end, 10000),
    wait_until(fun() -> maps:get(msgs_out, node_stats(Node)) >= N end, 5000),
    timer:sleep(100),
    Out = node_stats(Node),
    In = maps:get(node(), peer:call(P, teleport, stats, [])),
    %% What the frames should take: length, kind, flags, destination length, destination and
    %% term in the external format (encoders may pick a slightly different atom encoding).
    Framed = lists:sum([8 + byte_size(term_to_binary(coll)) + byte_size(term_to_binary(M))
                        || M <- Msgs]),
    ct:pal("~b messages, ~b payload bytes (~b framed by term_to_binary's count)~n"
           "runner -> ~p: ~p~n~p <- runner: ~p", [N, Payload, Framed, Node, Out, Node, In]),
    ?assertEqual(N, maps:get(msgs_out, Out)),
    ?assert(maps:get(bytes_out, Out) >= Payload),
    ?assert(maps:get(bytes_out, Out) =< Framed + 16 * N),
    ?assertEqual(0, maps:get(queued_bytes, Out)),
    ?assertEqual(0, maps:get(dropped, Out)),
    ?assertEqual(N, maps:get(msgs_in, In)),
    ?assertEqual(maps:get(bytes_out, Out), maps:get(bytes_in, In)),
    %% Nothing went the other way.
    ?assertEqual(0, maps:get(msgs_out, In)),
    ?assertEqual(0, maps:get(msgs_in, Out)),
    ok.

%%--------------------------------------------------------------------------------------------
%% Runner-side helpers

ping(Dest) ->
    Ref = make_ref(),
    ok = teleport:send(Dest, {ping, self(), Ref}),
    receive
        {pong, Ref, Node, Pid} -> {pong, Node, Pid}
    after 10000 -> ct:fail({no_pong, Dest})
    end.

bang(Dest, Msg) ->
    Dest ! Msg.

catch_error(Fun) ->
    try Fun() of
        Result -> {returned, Result}
    catch
        Class:Reason -> {Class, Reason}
    end.

flush() ->
    receive _ -> flush() after 0 -> ok end.

%% Runs Fun in another process; fails the test if it takes longer than Timeout ms.
timed(Fun, Timeout) ->
    Self = self(),
    Ref = make_ref(),
    T0 = erlang:monotonic_time(millisecond),
    Pid = spawn(fun() -> Self ! {Ref, Fun()} end),
    receive
        {Ref, Result} -> {erlang:monotonic_time(millisecond) - T0, Result}
    after Timeout ->
            exit(Pid, kill),
            ct:fail({hung, Timeout})
    end.

wait_until(Fun, Timeout) ->
    Deadline = erlang:monotonic_time(millisecond) + Timeout,
    wait_until_deadline(Fun, Deadline).

wait_until_deadline(Fun, Deadline) ->
    case Fun() of
        true ->
            ok;
        false ->
            case erlang:monotonic_time(millisecond) > Deadline of
                true -> ct:fail(wait_until_timed_out);
                false -> timer:sleep(20), wait_until_deadline(Fun, Deadline)
            end
    end.

node_stats(Node) ->
    maps:get(Node, teleport:stats(), #{}).

peer_msgs_in(P) ->
    maps:get(msgs_in, maps:get(node(), peer:call(P, teleport, stats, []), #{}), 0).

pool_size() ->
    maps:get(pool_size, teleport_config:load()).

%% Peers: started with teleport running, recorded for end_per_testcase.
start_peers(Prefix, Count) ->
    [start_peer(peer:random_name(Prefix)) || _ <- lists:seq(1, Count)].

%% The peers are recorded in ?PEERS as {Peer, Node, OsPid}, and teleport runs on them.
start_peer(Name) ->
    case teleport_test_util:start_peer(#{name => Name, on_start => fun record_peer/1}) of
        {ok, Started} -> Started;
        {error, Reason} -> ct:fail({peer_start_failed, Name, Reason})
    end.

start_peer_retrying(Name, Timeout) ->
    case teleport_test_util:start_peer_retrying(#{name => Name, on_start => fun record_peer/1},
                                                Timeout) of
        {ok, Started} -> Started;
        {error, Reason} -> ct:fail({peer_start_failed, Name, Reason})
    end.

record_peer(Started) ->
    true = ets:insert(?PEERS, Started).

stop_all_peers() ->
    [teleport_test_util:stop_peer(S) || S <- ets:tab2list(?PEERS)],
    true = ets:delete_all_objects(?PEERS),
    ok.


%%--------------------------------------------------------------------------------------------
%% Peer-side code (called with peer:call)

%% A registered process that keeps what it receives (large binaries as {'$bin', Size}).
start_collector(Name) ->
    Pid = spawn(fun() -> collector_loop([], 0) end),
    true = register(Name, Pid),
    Pid.

collector_loop(Acc, N) ->
    receive
        {'$collected', From, Ref} ->
            From ! {Ref, lists:reverse(Acc)},
            collector_loop(Acc, N);
        {'$count', From, Ref} ->
            From ! {Ref, N},
            collector_loop(Acc, N);
        Msg ->
            collector_loop([summarize(Msg) | Acc], N + 1)
    end.

summarize(Bin) when is_binary(Bin), byte_size(Bin) > 64 -> {'$bin', byte_size(Bin)};
summarize(T) when is_tuple(T) -> list_to_tuple([summarize(E) || E <- tuple_to_list(T)]);
summarize(T) -> T.

collected(Name) -> ask(Name, '$collected').

count(Name) -> ask(Name, '$count').

ask(Name, Tag) ->
    Ref = make_ref(),
    Name ! {Tag, self(), Ref},
    receive {Ref, Result} -> Result after 10000 -> error(timeout) end.

is_atom_text(Text) ->
    try list_to_existing_atom(Text) of
        _ -> true
    catch
        error:badarg -> false
    end.

%% Answers pings and echoes big binaries, over teleport. Registered unless Name is undefined.
start_echo(Name) ->
    Pid = spawn(fun echo_loop/0),
    Name =:= undefined orelse register(Name, Pid),
    Pid.

echo_loop() ->
    receive
        {ping, From, Ref} ->
            ok = teleport:send(From, {pong, Ref, node(), self()});
        {big, From, Bin} ->
            ok = teleport:send(From, {big_echo, node(), crypto:hash(sha256, Bin), Bin});
        _ ->
            ok
    end,
    echo_loop().

%% A process that takes `{big, Bin}' and `{small, N}' (N = 1, 2, 3... in order) until it has
%% Count of them, then reports to ReportTo over disterl.
start_counting_sink(ReportTo, Count) ->
    spawn(fun() -> counting_sink(ReportTo, Count, #{big => 0, small => 0}) end).

counting_sink(ReportTo, 0, Seen) ->
    ReportTo ! {counted, self(), Seen};
counting_sink(ReportTo, Left, #{small := S} = Seen) ->
    receive
        {big, Bin} ->
            Seen1 = Seen#{big := {byte_size(Bin), binary:referenced_byte_size(Bin)}},
            counting_sink(ReportTo, Left - 1, Seen1);
        {small, N} when N =:= S + 1 -> counting_sink(ReportTo, Left - 1, Seen#{small := N});
        Other -> ReportTo ! {counted, self(), {out_of_order, Other, Seen}}
    end.

%% A process that collects this node's long_schedule reports over Ms milliseconds.
start_long_schedule_monitor(Ms) ->
    Parent = self(),
    Pid = spawn(fun() ->
                        erlang:system_monitor(self(), [{long_schedule, Ms}]),
                        Parent ! {monitoring, self()},
                        long_schedule_loop([])
                end),
    receive {monitoring, Pid} -> Pid end.

long_schedule_loop(Acc) ->
    receive
        {monitor, Who, long_schedule, Info} ->
            %% Who it was, read now: by the end of the case it may be gone.
            What = identify(Who),
            long_schedule_loop([{Who, proplists:get_value(timeout, Info),
                                 {Info, What}} | Acc]);
        {report, From} ->
            From ! {long_schedules, lists:reverse(Acc)}
    end.

%% Every report, and those naming Sink or one of teleport's processes.
long_schedules(Monitor, Sink) ->
    Monitor ! {report, self()},
    Long = receive {long_schedules, L} -> L after 10000 -> [] end,
    {Long, [{Who, Ms} || {Who, Ms, {_, What}} <- Long,
                         Who =:= Sink orelse teleport_process(What)]}.

%% Who (a pid or a port) is: its registered name and the module it started in.
identify(Who) when is_pid(Who) ->
    case erlang:process_info(Who, [registered_name, dictionary]) of
        undefined -> gone;
        [{registered_name, Name}, {dictionary, Dict}] ->
            {case Name of [] -> ''; _ -> Name end, proplists:get_value('$initial_call', Dict, undefined)}
    end;
identify(Port) ->
    {port, erlang:port_info(Port, name)}.

%% Whether what identify/1 said is one of teleport's processes.
teleport_process({Name, Init}) when is_atom(Name) ->
    Mod = case Init of
              {M, _, _} -> M;
              _ -> ''
          end,
    lists:prefix("teleport", atom_to_list(Name)) orelse
        lists:prefix("teleport", atom_to_list(Mod));
teleport_process(_) ->
    false.

%% Checks that each sender's messages come with sequence numbers 1, 2, 3...; reports
%% #{Id => {Count, LastSeq, OutOfSequence}} over teleport once every sender said done.
start_order_receiver(Name, Ids, ReportTo) ->
    Pid = spawn(fun() -> order_loop(#{}, maps:from_list([{Id, true} || Id <- Ids]), ReportTo) end),
    true = register(Name, Pid),
    Pid.

order_loop(Seen, Waiting, ReportTo) when map_size(Waiting) =:= 0 ->
    ok = teleport:send(ReportTo, {order_report, node(), Seen});
order_loop(Seen, Waiting, ReportTo) ->
    receive
        {Id, Seq} when is_integer(Seq) ->
            {Count, Last, Bad} = maps:get(Id, Seen, {0, 0, 0}),
            Bad1 = case Seq =:= Last + 1 of
                       true -> Bad;
                       false -> Bad + 1
                   end,
            order_loop(Seen#{Id => {Count + 1, Seq, Bad1}}, Waiting, ReportTo);
        {done, Id, Last} ->
            Seen1 = case maps:get(Id, Seen, {0, 0, 0}) of
                        {Count, Last, Bad} -> Seen#{Id => {Count, Last, Bad}};
                        {Count, Other, Bad} -> Seen#{Id => {Count, Other, Bad + 1}}
                    end,
            order_loop(Seen1, maps:remove(Id, Waiting), ReportTo);
        _ ->
            order_loop(Seen, Waiting, ReportTo)
    end.
