%% Hostile input at the runner's teleport listener, from raw gen_tcp clients of this suite
%% (which speak the handshake of handshake.rs themselves: HELLO, CHALLENGE, RESPONSE, OK with
%% HMAC-SHA256 over both nonces and both names), while a real peer P streams sequenced
%% messages to the runner the whole time.
%%
%% Every case runs its hostile input once to warm up (event-name atoms, code loading), takes
%% a baseline, runs it again ROUNDS times, then checks: each input was refused or dropped as
%% documented; P's background messages all arrived, in order; the positive control (P's name,
%% the right cookie: OK, and a frame delivered) still works, and so does a teleport round
%% trip to P; the atom count did not move; erlang:memory(total) stayed within a tolerance;
%% and the teleport-domain log events counted by a logger handler of this suite stayed under
%% teleport_log's rate limit (20 per event name per window of 1 s, so at most 40 in any
%% sliding second).
%%
%% Groups: `hostile' (handshake_timeout 2 s, so deadlines are quick to observe), `replay'
%% (the runner's listener behind a recording proxy: a real dialer's bytes are replayed),
%% `small_frames' (max_frame_bytes 1 MB on the runner, a real peer sends 2 MB).
-module(hostile_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile([export_all, nowarn_export_all]).

-define(PEERS, hostile_SUITE_peers).
-define(LOGS, hostile_SUITE_logs).
-define(MB, (1024 * 1024)).
-define(HANDSHAKE_MS, 2000).
-define(ROUNDS, 3).
%% Per event name, in any sliding second: two rate-limit windows of 20.
-define(MAX_EVENTS_PER_SECOND, 40).
-define(MEMORY_TOLERANCE, (16 * ?MB)).

%%--------------------------------------------------------------------------------------------
%% CT callbacks

suite() ->
    [{timetrap, {seconds, 60}}].

all() ->
    [{group, hostile}, {group, replay}, {group, small_frames}].

groups() ->
    [{hostile, [],
      [positive_control, random_bytes, bad_handshakes, huge_length_after_handshake,
       malformed_frames_after_handshake, a_frame_sent_again_is_delivered_once,
       frame_for_dead_pid, frame_for_pid_of_another_node,
       half_open_connections, slow_loris, idle_connections_over_the_limit,
       garbage_connection_flood, announced_large_frame_then_stall]},
     {replay, [], [replayed_handshake]},
     {small_frames, [], [oversized_frame_from_real_peer]}].

init_per_suite(Config) ->
    Started = teleport_test_util:start_distribution("hostile_ct_"),
    Holder = teleport_test_util:start_tables([{?PEERS, [set]}, {?LOGS, [ordered_set]}]),
    ok = logger:add_handler(hostile_log_counter, ?MODULE, #{level => all}),
    [{started_dist, Started}, {table_holder, Holder} | Config].

end_per_suite(Config) ->
    _ = logger:remove_handler(hostile_log_counter),
    _ = teleport:stop(),
    ?config(table_holder, Config) ! stop,
    teleport_test_util:stop_distribution(?config(started_dist, Config)),
    ok.

init_per_group(Group, Config) ->
    Env = case Group of
              small_frames -> [{handshake_timeout, ?HANDSHAKE_MS}, {max_frame_bytes, ?MB}];
              _ -> [{handshake_timeout, ?HANDSHAKE_MS}]
          end,
    teleport_test_util:restart_teleport(Env),
    P = start_peer(peer:random_name(hostile_p)),
    %% P finds the runner's listener (which lets P in), and the runner finds P's.
    {PP, PNode, _} = P,
    start_rx(),
    ok = peer:call(PP, teleport, send, [{hostile_rx, node()}, hello]),
    {pong, PNode} = teleport_ping(PNode),
    [{p, P} | Config].

end_per_group(_Group, _Config) ->
    [teleport_test_util:stop_peer(S) || {_, S} <- ets:tab2list(?PEERS)],
    true = ets:delete_all_objects(?PEERS),
    teleport_test_util:reset_teleport().

init_per_testcase(_Case, Config) ->
    true = ets:delete_all_objects(?LOGS),
    start_rx(),
    catch unregister(hostile_sink),
    true = register(hostile_sink, self()),
    flush(),
    Config.

end_per_testcase(_Case, Config) ->
    {PP, _, _} = ?config(p, Config),
    catch peer:call(PP, ?MODULE, bg_stop, [], 10000),
    catch unregister(hostile_sink),
    flush(),
    ok.

start_peer(Name) ->
    Opts = #{setup => [{?MODULE, start_echo, [hostile_echo]}],
             on_start => fun({Peer, _, _} = S) -> true = ets:insert(?PEERS, {Peer, S}) end},
    case teleport_test_util:start_peer(Opts#{name => Name}) of
        {ok, Started} -> Started;
        {error, Reason} -> ct:fail({peer_start_failed, Name, Reason})
    end.

%% The runner's collector of P's background messages (a fresh one per test case).
start_rx() ->
    case whereis(hostile_rx) of
        undefined -> ok;
        Old -> unregister(hostile_rx), exit(Old, kill)
    end,
    Pid = teleport_soak:start_seq_rx(hostile_rx),
    %% Not linked to the test process; killed when replaced.
    Pid.

%%--------------------------------------------------------------------------------------------
%% The frame of every case

%% Runs Round once to warm up, then ?ROUNDS times measured, with P's background traffic
%% flowing throughout; then checks the node's health. Returns the measured rounds' results.
hostile(Config, What, Round) ->
    hostile(Config, What, Round, ?ROUNDS).

hostile(Config, What, Round, Rounds) ->
    {PP, PNode, _} = ?config(p, Config),
    ok = peer:call(PP, ?MODULE, bg_start, [{hostile_rx, node()}]),
    Warm = Round(),
    timer:sleep(100),
    Mem0 = memory_total(),
    Rss0 = teleport_soak:rss_kb(os:getpid()),
    Atoms0 = erlang:system_info(atom_count),
    T0 = erlang:monotonic_time(millisecond),
    Results = [Round() || _ <- lists:seq(1, Rounds)],
    T1 = erlang:monotonic_time(millisecond),
    Atoms1 = erlang:system_info(atom_count),
    Mem1 = memory_total(),
    Rss1 = teleport_soak:rss_kb(os:getpid()),
    Bg = bg_check(PP),
    Control = positive_control_round(PNode),
    {pong, PNode} = teleport_ping(PNode),
    Logs = log_rates(),
    ct:pal("~s~nwarm-up: ~p~nmeasured rounds (~b ms): ~p~n"
           "atom_count ~b -> ~b; erlang:memory(total) ~.1f -> ~.1f MB; VmRSS ~.1f -> ~.1f MB~n"
           "background from P: ~p~npositive control after: ~p~n"
           "teleport log events (name, total, max in a sliding second): ~p",
           [What, Warm, T1 - T0, Results, Atoms0, Atoms1, Mem0 / ?MB, Mem1 / ?MB,
            Rss0 / 1024, Rss1 / 1024, Bg, Control, Logs]),
    ?assertEqual(Atoms0, Atoms1),
    ?assert(Mem1 - Mem0 < ?MEMORY_TOLERANCE),
    ?assertMatch(#{lost := 0, in_order := true, marker := ok}, Bg),
    ?assert(maps:get(accepted, Bg) > 0),
    ?assertEqual(delivered, Control),
    [?assert(Max =< ?MAX_EVENTS_PER_SECOND) || {_, _, Max} <- Logs],
    {Warm, Results}.

memory_total() ->
    [garbage_collect(P) || P <- processes()],
    erlang:memory(total).

%%--------------------------------------------------------------------------------------------
%% hostile group

%% The right cookie and an allowed name (P's): OK, and frames are delivered, to a name and
%% to a pid. Without this the negatives below would prove nothing.
positive_control(Config) ->
    {_, PNode, _} = ?config(p, Config),
    {_, Results} = hostile(Config, "positive control", fun() -> positive_control_round(PNode) end),
    ?assertEqual(lists:duplicate(?ROUNDS, delivered), Results),
    ok.

positive_control_round(PNode) ->
    {ok, Port} = teleport_server:listen_port(),
    Ref = erlang:unique_integer(),
    case teleport_test_util:raw_dial(Port, atom_to_binary(PNode), cookie()) of
        {ok, S} ->
            ok = raw_send_frame(S, 1, hostile_sink, {raw_frame, Ref, by_name}),
            ok = raw_send_frame(S, 2, self(), {raw_frame, Ref, by_pid}),
            R = receive {raw_frame, Ref, by_name} ->
                        receive {raw_frame, Ref, by_pid} -> delivered
                        after 5000 -> {not_delivered, by_pid}
                        end
                after 5000 -> {not_delivered, by_name}
                end,
            gen_tcp:close(S),
            R;
        Other ->
            {handshake_failed, Other}
    end.

%% Random bytes (1..4096 of them), 20 connections a round: each is closed, at most after a
%% REJECT(3); nothing is delivered.
random_bytes(Config) ->
    {_, Results} = hostile(Config, "random bytes",
                           fun() ->
                                   {ok, Port} = teleport_server:listen_port(),
                                   Outcomes = pmap(fun(_) ->
                                                           Len = rand:uniform(4096),
                                                           raw_send_and_close(Port, crypto:strong_rand_bytes(Len), 5000)
                                                   end, lists:seq(1, 20)),
                                   summarize_closed(Outcomes)
                           end),
    [?assertMatch(#{still_open := 0}, R) || R <- Results],
    nothing_delivered(),
    ok.

%% A handshake with a wrong cookie, with a name the runner does not know, with another
%% version, with a malformed HELLO: REJECT(2) (wrong MAC and unknown name alike), REJECT(3),
%% and the connection closed; no atom made for the unknown name.
bad_handshakes(Config) ->
    {_, PNode, _} = ?config(p, Config),
    Name = atom_to_binary(PNode),
    {_, Results} =
        hostile(Config, "bad handshakes",
                fun() ->
                        {ok, Port} = teleport_server:listen_port(),
                        U = integer_to_binary(erlang:unique_integer([positive])),
                        #{wrong_cookie => teleport_test_util:raw_dial(Port, Name, <<"wrong-cookie-", U/binary>>),
                          unknown_node => teleport_test_util:raw_dial(Port, <<"stranger_", U/binary, "@nowhere">>, cookie()),
                          empty_cookie_mac => teleport_test_util:raw_dial(Port, Name, <<>>),
                          bad_version => raw_send_and_close(
                                           Port, handshake_frame(<<"HTLPT", 1, 3, "a@b", 0:256>>), 5000),
                          bad_magic => raw_send_and_close(
                                         Port, handshake_frame(<<"HXXXX", 3, 3, "a@b", 0:256>>), 5000),
                          old_version => raw_send_and_close(
                                           Port, handshake_frame(<<"HTLPT", 2, 3, "a@b", 0:256>>), 5000),
                          truncated_hello => raw_send_and_close(
                                               Port, handshake_frame(<<"HTLPT", 3, 200, "a@b">>), 5000),
                          response_before_hello => raw_send_and_close(
                                                     Port, handshake_frame(<<"A", 0:256>>), 5000),
                          hello_too_long => raw_send_and_close(Port, <<1025:16, 0:8200>>, 5000),
                          empty_message => raw_send_and_close(Port, <<0:16>>, 5000)}
                end),
    lists:foreach(
      fun(R) ->
              ?assertMatch({rejected, 2, closed}, maps:get(wrong_cookie, R)),
              ?assertMatch({rejected, 2, closed}, maps:get(unknown_node, R)),
              ?assertMatch({rejected, 2, closed}, maps:get(empty_cookie_mac, R)),
              ?assertEqual({closed, <<0, 2, "R", 3>>}, maps:get(bad_version, R)),
              ?assertEqual({closed, <<0, 2, "R", 3>>}, maps:get(old_version, R)),
              [?assertMatch({closed, _}, maps:get(K, R))
               || K <- [bad_magic, truncated_hello, response_before_hello, hello_too_long,
                        empty_message]]
      end, Results),
    nothing_delivered(),
    ok.

%% After a valid handshake, a length prefix of 4 GB - 1 (and, on other connections, lengths
%% 0 and 4, below a frame's fixed part): the connection is closed before anything is
%% allocated, and logged.
huge_length_after_handshake(Config) ->
    {_, PNode, _} = ?config(p, Config),
    {_, Results} =
        hostile(Config, "bad length prefixes after a valid handshake",
                fun() ->
                        maps:from_list(
                          [{Len, authenticated_then(PNode, <<Len:32, 0:800>>)}
                           || Len <- [16#FFFFFFFF, 16#80000000, 0, 4]])
                end),
    [[?assertMatch({closed, _}, V) || V <- maps:values(R)] || R <- Results],
    ?assert(logged(connection_closed) > 0),
    nothing_delivered(),
    ok.

%% After a valid handshake, frames that are not frames or whose term is not a term: each
%% closes its connection (logged). A valid frame sent just before on the same connection is
%% delivered; the one just after is not (the connection is gone). That includes a
%% destination that is not what the frame's kind says (a pid frame for an atom), such as a
%% forged fun, which OTP 25's own decoder accepts and the VM crashes on. (A forged fun in the
%% message itself is decoded as disterl would: the peer holds the cookie.) So does a frame
%% with a reserved flag set, and one whose sequence number skips some (frames were lost on
%% the way). A term followed by trailing bytes is delivered, as binary_to_term/1 accepts it.
malformed_frames_after_handshake(Config) ->
    {_, PNode, _} = ?config(p, Config),
    Sink = term_to_binary(hostile_sink),
    Bad = #{bad_etf => frame(2, Sink, <<131, 255, 1, 2, 3>>),
            no_version_byte => frame(2, Sink, <<97, 1>>),
            truncated_etf => frame(2, Sink, <<131, 104, 3, 97, 1>>),
            bad_kind => frame(9, Sink, term_to_binary(x)),
            dest_past_end => fun(Seq) -> <<20:32, 2, 0, 255, 255, Seq:64, 0:64>> end,
            flags_set => fun(Seq) ->
                                 <<L:32, K, 0, Rest/binary>> =
                                     (frame(2, Sink, term_to_binary(x)))(Seq),
                                 <<L:32, K, 1, Rest/binary>>
                         end,
            seq_gap => fun(Seq) -> (frame(2, Sink, term_to_binary(x)))(Seq + 5) end,
            no_term => frame(2, Sink, <<>>),
            dest_truncated_pid => frame(1, binary:part(term_to_binary(self()), 0, 10),
                                        term_to_binary(x)),
            pid_frame_for_an_atom => frame(1, term_to_binary(not_a_pid), term_to_binary(x)),
            forged_fun_as_destination => frame(1, teleport_test_util:forged_fun(),
                                               term_to_binary(x)),
            huge_list_header => frame(2, Sink, <<131, 108, 255, 255, 255, 255, 97, 1>>),
            huge_binary_header => frame(2, Sink, <<131, 109, 255, 255, 255, 255, 1, 2>>),
            huge_tuple_header => frame(2, Sink, <<131, 105, 255, 255, 255, 255, 97, 1>>),
            huge_map_header => frame(2, Sink, <<131, 116, 255, 255, 255, 255, 97, 1>>),
            deep_nesting => frame(2, Sink, <<131, (binary:copy(<<108, 0, 0, 0, 1>>, 100000))/binary,
                                              106>>)},
    Kept = #{trailing_bytes => frame(2, Sink, <<131, 100, 0, 5, "extra", 0, 0>>)},
    {_, Results} =
        hostile(Config, "malformed frames after a valid handshake",
                fun() ->
                        maps:from_list(
                          pmap(fun({K, Frame}) -> {K, malformed_frame_round(PNode, Frame)} end,
                               maps:to_list(Bad))
                          ++ pmap(fun({K, Frame}) -> {K, frame_then_probe(PNode, Frame)} end,
                                  maps:to_list(Kept)))
                end),
    lists:foreach(
      fun(R) ->
              [?assertMatch({K, {before_delivered, not_delivered, {closed, _}}},
                            {K, maps:get(K, R)}) || K <- maps:keys(Bad)],
              [?assertEqual({K, probe_delivered}, {K, maps:get(K, R)}) || K <- maps:keys(Kept)]
      end, Results),
    ?assert(logged(connection_closed) > 0),
    ok.

malformed_frame_round(PNode, Frame) ->
    {ok, Port} = teleport_server:listen_port(),
    Ref = erlang:unique_integer(),
    {ok, S} = teleport_test_util:raw_dial(Port, atom_to_binary(PNode), cookie()),
    ok = raw_send_frame(S, 1, self(), {before, Ref}),
    Before = receive {before, Ref} -> before_delivered after 5000 -> before_lost end,
    ok = inet:setopts(S, [{packet, raw}]),
    ok = gen_tcp:send(S, Frame(2)),
    ok = gen_tcp:send(S, raw_frame_bytes(3, self(), {'after', Ref})),
    Closed = raw_wait_closed(S, 5000),
    After = receive {'after', Ref} -> delivered after 300 -> not_delivered end,
    {Before, After, Closed}.

%% A frame for a pid that does not exist (dead, or never was): dropped silently, as `!'
%% drops it; the connection stays up and the next frame is delivered.
frame_for_dead_pid(Config) ->
    {_, PNode, _} = ?config(p, Config),
    {_, Results} =
        hostile(Config, "frames for pids that do not exist",
                fun() ->
                        Dead = spawn(fun() -> ok end),
                        Never = list_to_pid("<0.32767.8191>"),
                        false = is_process_alive(Never),
                        [{dead, frame_then_probe(PNode, frame(1, term_to_binary(Dead), term_to_binary(x)))},
                         {never_was, frame_then_probe(PNode, frame(1, term_to_binary(Never), term_to_binary(x)))},
                         {unregistered_name, frame_then_probe(PNode, frame(2, term_to_binary(hostile_nobody),
                                                                           term_to_binary(x)))},
                         {name_that_is_no_atom, frame_then_probe(PNode, frame(2, <<131, 119, 12, "hostile_zzzz">>,
                                                                              term_to_binary(x)))}]
                end),
    [[?assertEqual({K, probe_delivered}, {K, V}) || {K, V} <- R] || R <- Results],
    ?assertError(badarg, list_to_existing_atom("hostile_zzzz")),
    ok.

%% Frames sent again on the same lane (as a sender does after a reconnection, for those it
%% does not know arrived) are dropped: 1, 2, 1, 2, 3 delivers 1, 2 and 3, once each, in
%% order, and the connection stays up.
a_frame_sent_again_is_delivered_once(Config) ->
    {_, PNode, _} = ?config(p, Config),
    {_, Results} =
        hostile(Config, "frames sent again",
                fun() ->
                        {ok, Port} = teleport_server:listen_port(),
                        Ref = erlang:unique_integer(),
                        {ok, S} = teleport_test_util:raw_dial(Port, atom_to_binary(PNode),
                                                              cookie()),
                        ok = inet:setopts(S, [{packet, raw}]),
                        [ok = gen_tcp:send(S, raw_frame_bytes(N, self(), {again, Ref, N}))
                         || N <- [1, 2, 1, 2, 3]],
                        Got = collect_again(Ref, []),
                        gen_tcp:close(S),
                        Got
                end),
    [?assertEqual([1, 2, 3], R) || R <- Results],
    ok.

collect_again(Ref, Acc) ->
    receive {again, Ref, N} -> collect_again(Ref, [N | Acc])
    after 500 -> lists:reverse(Acc)
    end.

%% A frame naming a process on another node: P's own pid (it is not forwarded to P), and a
%% pid of a node that does not exist. Dropped; the connection stays up.
frame_for_pid_of_another_node(Config) ->
    {PP, PNode, _} = ?config(p, Config),
    {_, Results} =
        hostile(Config, "frames for pids of other nodes",
                fun() ->
                        PPid = peer:call(PP, ?MODULE, start_probe, [hostile_probe]),
                        R1 = frame_then_probe(PNode, frame(1, term_to_binary(PPid),
                                                           term_to_binary({probe, forwarded}))),
                        Ghost = <<131, 88, 119, 13, "ghost@nowhere", 1:32, 0:32, 1:32>>,
                        R2 = frame_then_probe(PNode, frame(1, Ghost, term_to_binary({probe, ghost}))),
                        timer:sleep(200),
                        Got = peer:call(PP, ?MODULE, probe_got, [hostile_probe]),
                        #{peer_pid => R1, ghost_pid => R2, forwarded_to_peer => Got}
                end),
    [?assertMatch(#{peer_pid := probe_delivered, ghost_pid := probe_delivered,
                    forwarded_to_peer := []}, R) || R <- Results],
    ok.

%% Half-open connections: (a) part of a HELLO, then silence: closed by the handshake
%% deadline; (b) part of a HELLO, then the write side shut: closed at once; (c) after a
%% valid handshake, half a frame, then silence: what happens is reported (there is no
%% deadline after authentication; the connection stays open until the peer closes it).
half_open_connections(Config) ->
    {_, PNode, _} = ?config(p, Config),
    {_, Results} =
        hostile(Config, "half-open connections",
                fun() ->
                        {ok, Port} = teleport_server:listen_port(),
                        Hello = hello_bytes(atom_to_binary(PNode)),
                        Silent = spawn_timed(fun() ->
                                                     {ok, S} = connect(Port),
                                                     ok = gen_tcp:send(S, binary:part(Hello, 0, 10)),
                                                     raw_wait_closed(S, ?HANDSHAKE_MS + 3000)
                                             end),
                        Shut = spawn_timed(fun() ->
                                                   {ok, S} = connect(Port),
                                                   ok = gen_tcp:send(S, binary:part(Hello, 0, 10)),
                                                   ok = gen_tcp:shutdown(S, write),
                                                   raw_wait_closed(S, 3000)
                                           end),
                        Authed = spawn_timed(fun() ->
                                                     {ok, S} = teleport_test_util:raw_dial(Port, atom_to_binary(PNode), cookie()),
                                                     ok = inet:setopts(S, [{packet, raw}]),
                                                     F = raw_frame_bytes(1, hostile_sink, {half, x}),
                                                     ok = gen_tcp:send(S, binary:part(F, 0, byte_size(F) div 2)),
                                                     R = raw_wait_closed(S, ?HANDSHAKE_MS + 1000),
                                                     gen_tcp:close(S),
                                                     R
                                             end),
                        #{silent_partial_hello => await_timed(Silent),
                          shut_after_partial_hello => await_timed(Shut),
                          authenticated_half_frame => await_timed(Authed)}
                end, 1),
    lists:foreach(
      fun(#{silent_partial_hello := {Ms1, R1}, shut_after_partial_hello := {Ms2, R2}}) ->
              ?assertMatch({closed, _}, R1),
              ?assert(Ms1 >= ?HANDSHAKE_MS - 100 andalso Ms1 < ?HANDSHAKE_MS + 1000),
              ?assertMatch({closed, _}, R2),
              ?assert(Ms2 < 1000)
      end, Results),
    nothing_delivered(),
    ok.

%% Slow-loris: a valid HELLO at one byte a second, 5 connections at once: the handshake
%% deadline (2 s here) closes each, after 2 or 3 bytes, not after the ~60 s the HELLO
%% would take.
slow_loris(Config) ->
    {_, PNode, _} = ?config(p, Config),
    {_, Results} =
        hostile(Config, "slow-loris HELLOs, 1 byte per second",
                fun() ->
                        {ok, Port} = teleport_server:listen_port(),
                        Hello = hello_bytes(atom_to_binary(PNode)),
                        pmap(fun(_) -> slow_loris_one(Port, Hello) end, lists:seq(1, 5))
                end, 1),
    [[begin
          ?assertMatch({closed, _, _}, R),
          {closed, Ms, _Sent} = R,
          ?assert(Ms >= ?HANDSHAKE_MS - 100 andalso Ms < ?HANDSHAKE_MS + 1500)
      end || R <- Rs] || Rs <- Results],
    ok.

slow_loris_one(Port, Hello) ->
    {ok, S} = connect(Port),
    T0 = erlang:monotonic_time(millisecond),
    slow_loris_loop(S, Hello, 0, T0).

slow_loris_loop(S, Hello, I, T0) when I >= byte_size(Hello) ->
    gen_tcp:close(S),
    {sent_whole_hello, erlang:monotonic_time(millisecond) - T0};
slow_loris_loop(S, Hello, I, T0) ->
    case gen_tcp:send(S, binary:part(Hello, I, 1)) of
        ok ->
            case gen_tcp:recv(S, 0, 1000) of
                {error, timeout} -> slow_loris_loop(S, Hello, I + 1, T0);
                {error, _} -> gen_tcp:close(S),
                              {closed, erlang:monotonic_time(millisecond) - T0, I + 1};
                {ok, Data} -> gen_tcp:close(S), {answered, Data}
            end;
        {error, _} ->
            gen_tcp:close(S),
            {closed, erlang:monotonic_time(millisecond) - T0, I}
    end.

%% 70 idle connections, more than the 64 handshakes allowed at once (listener.rs
%% MAX_HANDSHAKES): the 6 beyond are closed at once, the 64 by the handshake deadline. A
%% real client's handshake meanwhile is refused (closed), and succeeds once the deadline has
%% passed; P's established connections carry its traffic throughout.
idle_connections_over_the_limit(Config) ->
    {_, PNode, _} = ?config(p, Config),
    {_, Results} =
        hostile(Config, "70 idle connections",
                fun() ->
                        {ok, Port} = teleport_server:listen_port(),
                        T0 = erlang:monotonic_time(millisecond),
                        Socks = [begin {ok, S} = connect(Port), S end || _ <- lists:seq(1, 70)],
                        timer:sleep(300),
                        Early = [S || S <- Socks, is_closed(S, 0)],
                        During = teleport_test_util:raw_dial(Port, atom_to_binary(PNode), cookie()),
                        _ = case During of {ok, DS} -> gen_tcp:close(DS); _ -> ok end,
                        Late = [{raw_wait_closed(S, ?HANDSHAKE_MS + 2000),
                                 erlang:monotonic_time(millisecond) - T0} || S <- Socks -- Early],
                        [gen_tcp:close(S) || S <- Socks],
                        #{closed_at_once => length(Early),
                          closed_by_deadline => length([x || {{closed, _}, _} <- Late]),
                          still_open => length([x || {{still_open, _}, _} <- Late]),
                          last_closed_ms => lists:max([0 | [Ms || {_, Ms} <- Late]]),
                          handshake_during_flood => During,
                          handshake_after_flood => positive_control_round(PNode)}
                end, 1),
    lists:foreach(
      fun(R) ->
              ?assertMatch(#{closed_at_once := 6, closed_by_deadline := 64, still_open := 0,
                             handshake_after_flood := delivered}, R),
              ?assert(maps:get(last_closed_ms, R) < ?HANDSHAKE_MS + 1500)
      end, Results),
    ?assert(logged(too_many_handshakes) > 0),
    ok.

%% 10 bursts of 100 connections, 250 ms apart, whose first bytes announce a handshake message
%% over 1 KB: each is refused and logged as handshake_failed, and the log is rate-limited: at
%% most 20 per window of 1 s, the rest summed up as "N similar events suppressed".
garbage_connection_flood(Config) ->
    {_, Results} =
        hostile(Config, "a flood of 1000 garbage connections in 10 bursts",
                fun() ->
                        {ok, Port} = teleport_server:listen_port(),
                        T0 = erlang:monotonic_time(millisecond),
                        Outcomes = lists:append(
                                     [begin
                                          timer:sleep(250),
                                          pmap(fun(_) ->
                                                       Junk = crypto:strong_rand_bytes(62),
                                                       raw_send_and_close(Port, <<16#FFFF:16, Junk/binary>>, 5000)
                                               end, lists:seq(1, 100))
                                      end || _ <- lists:seq(1, 10)]),
                        (summarize_closed(Outcomes))#{ms => erlang:monotonic_time(millisecond) - T0}
                end, 1),
    [?assertMatch(#{still_open := 0, closed := 1000}, R) || R <- Results],
    timer:sleep(1100),
    Times = [T || {{T, _}, Name} <- ets:tab2list(?LOGS),
                  Name =:= handshake_failed orelse Name =:= {suppressed, handshake_failed}],
    Span = case Times of
               [] -> 0;
               _ -> (lists:max(Times) - lists:min(Times)) / 1000
           end,
    Logs = log_rates(),
    {handshake_failed, Logged, _} = lists:keyfind(handshake_failed, 1, Logs),
    {_, Summaries, _} = lists:keyfind({suppressed, handshake_failed}, 1, Logs),
    ct:pal("2000 connections refused in all; over ~.1f s, handshake_failed was logged ~b "
           "times, with ~b summaries of suppressed events", [Span, Logged, Summaries]),
    %% At most 20 per window, and a window starts at most once a second.
    ?assert(Logged =< 20 * (trunc(Span) + 2)),
    ?assert(Summaries >= 1),
    ok.

%% After a valid handshake, a length prefix just under max_frame_bytes (1 GiB by default,
%% here 512 MB), then nothing: reported: what the runner allocates for it while it waits,
%% and that it is freed when the connection closes.
announced_large_frame_then_stall(Config) ->
    {_, PNode, _} = ?config(p, Config),
    {_, Results} =
        hostile(Config, "an authenticated peer announces a 512 MB frame and stalls",
                fun() ->
                        {ok, Port} = teleport_server:listen_port(),
                        Bin0 = erlang:memory(binary),
                        Rss0 = teleport_soak:rss_kb(os:getpid()),
                        {ok, S} = teleport_test_util:raw_dial(Port, atom_to_binary(PNode), cookie()),
                        ok = inet:setopts(S, [{packet, raw}]),
                        ok = gen_tcp:send(S, <<(512 * ?MB):32, 2, 0, 0:16>>),
                        timer:sleep(500),
                        Bin1 = erlang:memory(binary),
                        Rss1 = teleport_soak:rss_kb(os:getpid()),
                        Open = not is_closed(S, 0),
                        gen_tcp:close(S),
                        timer:sleep(300),
                        Bin2 = erlang:memory(binary),
                        #{binary_mb_while_waiting => (Bin1 - Bin0) / ?MB,
                          rss_mb_while_waiting => (Rss1 - Rss0) / 1024,
                          binary_mb_after_close => (Bin2 - Bin0) / ?MB,
                          open_while_waiting => Open}
                end),
    [?assert(maps:get(binary_mb_after_close, R) < 16) || R <- Results],
    ok.

%%--------------------------------------------------------------------------------------------
%% replay group

%% A real session's dialer bytes, replayed. The runner's listener is put behind a recording
%% proxy: its teleport restarts (on a new port Y) and the proxy takes the old port, where P's
%% pool still points; P's next connection (its real Rust dialer) goes through the proxy,
%% which records what P sends: HELLO, RESPONSE, frames. Replayed to the listener, the HELLO
%% gets a CHALLENGE with a fresh nonce, the old RESPONSE does not verify: REJECT(2), closed,
%% and none of the recorded frames is delivered again.
replayed_handshake(Config) ->
    {PP, PNode, _} = ?config(p, Config),
    {ok, OldPort} = teleport_server:listen_port(),
    ok = teleport:stop(),
    ok = teleport:start(),
    {ok, NewPort} = teleport_server:listen_port(),
    Proxy = start_proxy(OldPort, NewPort, self()),
    %% Let P in again (the new runtime knows nobody): the runner finds P. P's first reply
    %% may be written on its old connection, which the runner closed: lost, so retry.
    ok = teleport_soak:wait_until(fun() -> teleport_ping(PNode, 500) =:= {pong, PNode} end,
                                  15000),
    %% P sends through its pool, which reconnects through the proxy.
    Ref = erlang:unique_integer([positive]),
    ok = teleport_soak:wait_until(
           fun() ->
                   ok = peer:call(PP, teleport, send, [{hostile_sink, node()}, {replay_probe, Ref}]),
                   receive {replay_probe, Ref} -> true after 200 -> false end
           end, 15000),
    %% Later attempts' probes may still be on their way.
    timer:sleep(500),
    flush_probes(),
    Recorded = proxy_recordings(),
    ct:pal("runner moved from port ~b to ~b; the proxy on ~b recorded ~b connection(s) from P: ~p",
           [OldPort, NewPort, OldPort, map_size(Recorded),
            maps:map(fun(_, B) -> byte_size(B) end, Recorded)]),
    %% The sessions that got past the handshake: a HELLO and a RESPONSE at least.
    HelloLen = 2 + 39 + byte_size(atom_to_binary(PNode)),
    Sessions = [B || B <- maps:values(Recorded), byte_size(B) >= HelloLen + 2 + 33],
    ?assert(Sessions =/= []),
    {_, Results} =
        hostile(Config, "replayed dialer bytes of a real session",
                fun() ->
                        [replay(NewPort, B) || B <- Sessions]
                end),
    lists:foreach(
      fun(#{answer := Answer, delivered_again := Again}) ->
              ?assertMatch([{challenge, _}, {reject, 2}], Answer),
              ?assertEqual([], Again)
      end, lists:append(Results)),
    Proxy ! stop,
    ok.

replay(Port, Bytes) ->
    {ok, S} = connect(Port),
    ok = gen_tcp:send(S, Bytes),
    {Closed, Back} = case raw_wait_closed(S, 5000) of
                         {closed, B} -> {closed, B};
                         {still_open, B} -> {still_open, B}
                     end,
    timer:sleep(300),
    Again = drain_probes([]),
    #{closed => Closed, answer => parse_handshake(Back), delivered_again => Again}.

flush_probes() ->
    receive {replay_probe, _} -> flush_probes() after 0 -> ok end.

drain_probes(Acc) ->
    receive {replay_probe, _} = M -> drain_probes([M | Acc]) after 0 -> lists:reverse(Acc) end.

parse_handshake(<<L:16, Body:L/binary, Rest/binary>>) ->
    Msg = case Body of
              <<"C", _/binary>> -> {challenge, byte_size(Body)};
              <<"R", Code>> -> {reject, Code};
              <<"K", _/binary>> -> ok;
              _ -> {other, Body}
          end,
    [Msg | parse_handshake(Rest)];
parse_handshake(<<>>) -> [];
parse_handshake(Rest) -> [{trailing, Rest}].

%% A TCP proxy on ListenPort to 127.0.0.1:TargetPort; what clients send is reported to
%% Recorder as {proxy_bytes, ConnId, Bytes}.
start_proxy(ListenPort, TargetPort, Recorder) ->
    Self = self(),
    Pid = spawn(fun() ->
                        {ok, L} = gen_tcp:listen(ListenPort, [binary, {active, false},
                                                              {reuseaddr, true}]),
                        Self ! {proxy_listening, self()},
                        Acceptor = spawn_link(fun() -> proxy_accept(L, TargetPort, Recorder, 1) end),
                        receive stop -> gen_tcp:close(L), exit(Acceptor, kill) end
                end),
    receive {proxy_listening, Pid} -> Pid after 5000 -> ct:fail(proxy_not_listening) end.

proxy_accept(L, TargetPort, Recorder, Id) ->
    case gen_tcp:accept(L) of
        {ok, C} ->
            {ok, U} = gen_tcp:connect({127, 0, 0, 1}, TargetPort, [binary, {active, false},
                                                                   {nodelay, true}]),
            spawn(fun() -> proxy_pump(C, U, Id, Recorder) end),
            spawn(fun() -> proxy_pump(U, C, none, none) end),
            proxy_accept(L, TargetPort, Recorder, Id + 1);
        {error, _} ->
            ok
    end.

proxy_pump(From, To, Id, Recorder) ->
    case gen_tcp:recv(From, 0) of
        {ok, B} ->
            Id =:= none orelse (Recorder ! {proxy_bytes, Id, B}),
            _ = gen_tcp:send(To, B),
            proxy_pump(From, To, Id, Recorder);
        {error, _} ->
            gen_tcp:close(To)
    end.

proxy_recordings() ->
    proxy_recordings(#{}).

proxy_recordings(Acc) ->
    receive {proxy_bytes, Id, B} ->
            proxy_recordings(Acc#{Id => <<(maps:get(Id, Acc, <<>>))/binary, B/binary>>})
    after 0 -> Acc
    end.

%%--------------------------------------------------------------------------------------------
%% small_frames group (max_frame_bytes = 1 MB on the runner)

%% A real peer Q sends a message just under the runner's max_frame_bytes (delivered), then
%% a 2 MB one: the runner's handshake told Q its limit, so Q's send/2 refuses it at once
%% with {error, too_large}; nothing is sent, the connection stays up (no reconnection, no
%% drop) and Q's next small message arrives. (Before the limit was in the handshake, send/2
%% returned ok and the runner closed the connection on reading the length: the message and
%% what Q had written behind it were lost. A peer that sends an oversized frame anyway is
%% huge_length_after_handshake.)
oversized_frame_from_real_peer(Config) ->
    ?assertEqual(?MB, maps:get(max_frame_bytes, teleport_config:load())),
    {QP, QNode, _} = start_peer(peer:random_name(hostile_q)),
    Me = node(),
    ok = peer:call(QP, teleport, send, [{hostile_sink, Me}, {q, warm}]),
    receive {q, warm} -> ok after 5000 -> ct:fail(q_not_connected) end,
    Under = ?MB - 1000,
    {_, Results} =
        hostile(Config, "a real peer sends a 2 MB message to a runner with max_frame_bytes 1 MB",
                fun() ->
                        Ref = erlang:unique_integer(),
                        Stats0 = peer:call(QP, ?MODULE, stats_for, [Me]),
                        R1 = peer:call(QP, ?MODULE, send_bytes, [{hostile_sink, Me}, {q, Ref, under}, Under]),
                        Got1 = receive {q, Ref, under, B1} -> byte_size(B1) after 5000 -> none end,
                        R2 = peer:call(QP, ?MODULE, send_bytes, [{hostile_sink, Me}, {q, Ref, over}, 2 * ?MB]),
                        Got2 = receive {q, Ref, over, B2} -> byte_size(B2) after 1500 -> none end,
                        Stats1 = peer:call(QP, ?MODULE, stats_for, [Me]),
                        R3 = peer:call(QP, teleport, send, [{hostile_sink, Me}, {q, Ref, small_after}]),
                        Got3 = receive {q, Ref, small_after} -> delivered after 10000 -> lost end,
                        Stats2 = peer:call(QP, ?MODULE, stats_for, [Me]),
                        #{under_limit => {R1, Got1}, over_limit => {R2, Got2},
                          small_after => {R3, Got3},
                          q_stats_delta_after_oversize => delta(Stats1, Stats0),
                          q_stats_delta_after_small => delta(Stats2, Stats1),
                          q_pool_info => peer:call(QP, teleport_server, pool_info, [])}
                end, 2),
    lists:foreach(
      fun(R) ->
              ?assertEqual({ok, Under}, maps:get(under_limit, R)),
              ?assertEqual({{error, too_large}, none}, maps:get(over_limit, R)),
              ?assertEqual({ok, delivered}, maps:get(small_after, R)),
              ?assertMatch(#{reconnects := 0, dropped := 0},
                           maps:get(q_stats_delta_after_oversize, R))
      end, Results),
    _ = QNode,
    ok.

send_bytes(Dest, Tag, Size) ->
    teleport:send(Dest, erlang:append_element(Tag, binary:copy(<<"q">>, Size))).

stats_for(Node) ->
    maps:get(Node, teleport:stats(), #{}).

delta(After, Before) ->
    maps:map(fun(K, V) -> V - maps:get(K, Before, 0) end, After).

%%--------------------------------------------------------------------------------------------
%% The raw client (handshake.rs, frame.rs)

cookie() ->
    atom_to_binary(erlang:get_cookie()).

connect(Port) ->
    gen_tcp:connect({127, 0, 0, 1}, Port, [binary, {active, false}, {nodelay, true}]).

hello_bytes(Me) ->
    handshake_frame(<<"HTLPT", 3, (byte_size(Me)):8, Me/binary, (crypto:strong_rand_bytes(32))/binary>>).

%% A valid handshake as P, then Bytes: {closed, WhatCameBack} | {still_open, _}.
authenticated_then(PNode, Bytes) ->
    {ok, Port} = teleport_server:listen_port(),
    {ok, S} = teleport_test_util:raw_dial(Port, atom_to_binary(PNode), cookie()),
    ok = inet:setopts(S, [{packet, raw}]),
    ok = gen_tcp:send(S, Bytes),
    raw_wait_closed(S, 5000).

%% A frame (after a valid handshake as P), then a probe frame to the calling process on the
%% same connection: probe_delivered if the connection survived the first.
frame_then_probe(PNode, Frame) ->
    {ok, Port} = teleport_server:listen_port(),
    {ok, S} = teleport_test_util:raw_dial(Port, atom_to_binary(PNode), cookie()),
    ok = inet:setopts(S, [{packet, raw}]),
    Ref = erlang:unique_integer(),
    ok = gen_tcp:send(S, Frame(1)),
    ok = gen_tcp:send(S, raw_frame_bytes(2, self(), {probe, Ref})),
    R = receive {probe, Ref} -> probe_delivered after 5000 -> probe_lost end,
    gen_tcp:close(S),
    R.

%% A data frame still to be numbered: fun(Seq) -> bytes.
frame(Kind, Dest, Term) ->
    fun(Seq) -> teleport_test_util:raw_frame(Seq, Kind, Dest, Term) end.

raw_frame_bytes(Seq, Dest, Msg) ->
    teleport_test_util:raw_frame(Seq, Dest, Msg).

%% Data frame number `Seq' on a socket in {packet, 2} right after raw_dial.
raw_send_frame(S, Seq, Dest, Msg) ->
    ok = inet:setopts(S, [{packet, raw}]),
    gen_tcp:send(S, raw_frame_bytes(Seq, Dest, Msg)).

handshake_frame(Body) ->
    <<(byte_size(Body)):16, Body/binary>>.

raw_send_and_close(Port, Bytes, Timeout) ->
    {ok, S} = connect(Port),
    _ = gen_tcp:send(S, Bytes),
    raw_wait_closed(S, Timeout).

raw_wait_closed(S, Timeout) ->
    Deadline = erlang:monotonic_time(millisecond) + Timeout,
    raw_wait_closed(S, Deadline, <<>>).

raw_wait_closed(S, Deadline, Acc) ->
    Left = max(0, Deadline - erlang:monotonic_time(millisecond)),
    case gen_tcp:recv(S, 0, Left) of
        {ok, More} ->
            raw_wait_closed(S, Deadline, <<Acc/binary, More/binary>>);
        {error, timeout} ->
            gen_tcp:close(S),
            {still_open, Acc};
        {error, _} ->
            gen_tcp:close(S),
            {closed, Acc}
    end.

is_closed(S, Timeout) ->
    case gen_tcp:recv(S, 0, Timeout) of
        {error, timeout} -> false;
        {error, _} -> true;
        {ok, _} -> is_closed(S, Timeout)
    end.

summarize_closed(Outcomes) ->
    #{closed => length([x || {closed, _} <- Outcomes]),
      closed_after_reject => length([x || {closed, <<0, 2, "R", _>>} <- Outcomes]),
      still_open => length([x || {still_open, _} <- Outcomes])}.

%% Nothing reached hostile_sink (the test process).
nothing_delivered() ->
    receive M -> ct:fail({delivered, M}) after 200 -> ok end.

pmap(Fun, List) ->
    Self = self(),
    Refs = [begin
                Ref = make_ref(),
                spawn(fun() -> Self ! {Ref, Fun(X)} end),
                Ref
            end || X <- List],
    [receive {Ref, R} -> R after 60000 -> ct:fail(pmap_timeout) end || Ref <- Refs].

spawn_timed(Fun) ->
    Self = self(),
    Ref = make_ref(),
    spawn(fun() ->
                  T0 = erlang:monotonic_time(millisecond),
                  R = Fun(),
                  Self ! {Ref, erlang:monotonic_time(millisecond) - T0, R}
          end),
    Ref.

await_timed(Ref) ->
    receive {Ref, Ms, R} -> {Ms, R} after 30000 -> ct:fail(timed_out) end.

flush() ->
    receive _ -> flush() after 0 -> ok end.

%% A round trip over teleport: the runner to P's echo, the echo back to the runner.
teleport_ping(PNode) ->
    case teleport_ping(PNode, 10000) of
        {pong, _} = Pong -> Pong;
        no_pong -> ct:fail({no_pong, PNode})
    end.

teleport_ping(PNode, Timeout) ->
    Ref = make_ref(),
    ok = teleport:send({hostile_echo, PNode}, {ping, self(), Ref}),
    receive {pong, Ref, Node} -> {pong, Node} after Timeout -> no_pong end.

%%--------------------------------------------------------------------------------------------
%% The log counter: a logger handler that records every event of domain [teleport]

log(#{meta := Meta, msg := Msg}, _Config) ->
    case maps:get(domain, Meta, []) of
        [teleport | _] ->
            Name = case {Msg, Meta} of
                       {{report, #{event := E}}, _} -> E;
                       {_, #{suppressed := _, event := E}} -> {suppressed, E};
                       _ -> other
                   end,
            catch ets:insert(?LOGS, {{erlang:monotonic_time(millisecond),
                                      erlang:unique_integer([monotonic])}, Name});
        _ ->
            ok
    end,
    ok;
log(_, _) ->
    ok.

%% [{Name, Total, MaxInAnySlidingSecond}].
log_rates() ->
    ByName = lists:foldl(fun({{T, _}, Name}, Acc) ->
                                 maps:update_with(Name, fun(L) -> [T | L] end, [T], Acc)
                         end, #{}, ets:tab2list(?LOGS)),
    lists:sort([{Name, length(Ts), max_in_window(lists:sort(Ts), 1000)}
                || {Name, Ts} <- maps:to_list(ByName)]).

max_in_window(Ts, W) ->
    max_in_window(Ts, Ts, W, 0).

max_in_window([], _, _, Max) -> Max;
max_in_window([T | Rest], Window, W, Max) ->
    N = length(lists:takewhile(fun(X) -> X < T + W end, Window)),
    max_in_window(Rest, tl(Window), W, max(Max, N)).

logged(Name) ->
    length([x || {_, N} <- ets:tab2list(?LOGS), N =:= Name]).

%%--------------------------------------------------------------------------------------------
%% Peer side (run on P with peer:call)

start_echo(Name) ->
    Pid = spawn(fun echo_loop/0),
    true = register(Name, Pid),
    Pid.

echo_loop() ->
    receive
        {ping, From, Ref} -> _ = teleport:send(From, {pong, Ref, node()});
        _ -> ok
    end,
    echo_loop().

%% A registered process that keeps what it receives.
start_probe(Name) ->
    catch unregister(Name),
    Pid = spawn(fun() -> probe_loop([]) end),
    true = register(Name, Pid),
    Pid.

probe_loop(Acc) ->
    receive
        {probe_got, From, Ref} -> From ! {Ref, lists:reverse(Acc)}, probe_loop(Acc);
        M -> probe_loop([M | Acc])
    end.

probe_got(Name) ->
    teleport_soak:ask(Name, probe_got).

%% The background stream from P: small sequenced messages, ~200 a second.
bg_start(Dest) ->
    catch bg_stop(),
    Pid = spawn(fun() ->
                        S = teleport_soak:start_streamer(1, Dest, #{sizes => small, pause_every => 1,
                                                                    pause_ms => 5, key => {node(), bg}}),
                        receive
                            {stop, From, Ref} ->
                                Rs = teleport_soak:stop_streamers([{1, S}], 10000),
                                From ! {Ref, maps:get(1, Rs)}
                        end
                end),
    true = register(hostile_bg, Pid),
    ok.

bg_stop() ->
    case whereis(hostile_bg) of
        undefined -> undefined;
        _ -> teleport_soak:ask(hostile_bg, stop)
    end.

%% Stops P's background stream and checks what reached the runner: all, in order.
bg_check(PP) ->
    Report = peer:call(PP, ?MODULE, bg_stop, [], 15000),
    #{seq := Last, marker := Marker, key := K} = Report,
    ok = teleport_soak:wait_until(
           fun() -> maps:is_key(K, maps:get(done, teleport_soak:seq_rx_report(hostile_rx))) end,
           10000),
    Rx = teleport_soak:seq_rx_report(hostile_rx),
    A = teleport_soak:analyze(Last, maps:get(K, maps:get(seqs, Rx), [])),
    #{accepted => Last, lost => maps:get(lost, A), in_order => maps:get(in_order, A),
      marker => Marker, corrupt => maps:get(corrupt, Rx), results => maps:get(results, Report)}.
