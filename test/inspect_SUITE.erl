%% teleport:info/0 between real nodes, the socket options seen on real connections, and the
%% log events of a connection's life (up, accepted, lost, closed), each with the peer, the
%% connection's index or id, the address and the reason. Also the forms of the API that the
%% other suites leave out (all-node abcast and multi_call, terms big enough for a dirty
%% scheduler, eager_connect).
-module(inspect_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile([export_all, nowarn_export_all]).

-define(KB, 1024).

suite() ->
    [{timetrap, {seconds, 120}}].

all() ->
    [info_shape, state_changes_are_logged_once_each, eager_connect_opens_the_pool_at_nodeup,
     all_nodes_forms_and_big_terms, threads_run_below_the_schedulers,
     reset_is_logged_as_an_error].

init_per_suite(Config) ->
    Started = teleport_test_util:start_distribution("inspect_ct_"),
    [{started_dist, Started} | Config].

end_per_suite(Config) ->
    _ = teleport:stop(),
    teleport_test_util:stop_distribution(?config(started_dist, Config)),
    ok.

init_per_testcase(_Case, Config) ->
    reset_env(),
    #{level := Level} = logger:get_primary_config(),
    ok = logger:set_primary_config(level, info),
    [{primary_level, Level} | Config].

end_per_testcase(_Case, Config) ->
    _ = logger:remove_handler(?MODULE),
    ok = logger:set_primary_config(level, ?config(primary_level, Config)),
    reset_env(),
    teleport_test_util:stop_peers(peers()),
    erase(peers),
    ok.

reset_env() ->
    teleport_test_util:reset_teleport().

%%--------------------------------------------------------------------------------------------
%% Cases

info_shape(_Config) ->
    ok = application:set_env(teleport, pool_size, 2),
    ok = application:set_env(teleport, socket_opts, [{sndbuf, 256 * ?KB}, {recbuf, 256 * ?KB},
                                                     {bind_ip, "127.0.0.1"},
                                                     {keepalive_time, 60},
                                                     {keepalive_interval, 10},
                                                     {keepalive_retries, 5}]),
    ok = teleport:start(),
    capture_logs(),
    {ok, Port} = teleport_server:listen_port(),
    %% The peer listens on one address only: the pool goes there.
    {P, Node} = start_peer(#{socket_opts => #{recbuf => 128 * ?KB},
                             listen_ip => {127, 0, 0, 1}}),
    {ok, PeerPort} = peer:call(P, teleport_server, listen_port, []),
    T0 = erlang:system_time(millisecond),
    Coll = peer:call(P, teleport_test_util, start_collector, [coll]),
    [ok = teleport:send({coll, Node}, {msg, I}) || I <- lists:seq(1, 10)],
    ?assertEqual([{msg, I} || I <- lists:seq(1, 10)], teleport_test_util:collected(P, Coll, 10)),
    %% The peer sends back: its pool connects to this node's listener.
    true = register(inspect_rx, self()),
    ok = peer:call(P, ?MODULE, send_back, [{inspect_rx, node()}, 3]),
    [receive {back, I} -> ok after 5000 -> ct:fail({not_back, I}) end || I <- lists:seq(1, 3)],
    unregister(inspect_rx),
    %% Written, and acknowledged by the peer.
    wait_until(fun() -> maps:get(acked, maps:get(Node, teleport:stats())) =:= 10 end),
    %% The pool is there: asking for it again gives the same one.
    {ok, Pool} = teleport_server:connect(Node),
    ?assertEqual({ok, Pool}, teleport_server:connect(Node)),
    %% A connection still in its handshake (nothing sent on it).
    {ok, Raw} = gen_tcp:connect({127, 0, 0, 1}, Port, [binary, {active, false}]),
    %% Counted as handshaking a moment before it is listed (the acceptor counts it against
    %% the limit first): both are waited for.
    wait_until(fun() ->
                       #{handshaking := N, incoming := In} = maps:get(listener, teleport:info()),
                       N =:= 1 andalso lists:any(fun(#{state := S}) -> S =:= handshaking end, In)
               end),
    Info = teleport:info(),
    ok = gen_tcp:close(Raw),
    T1 = erlang:system_time(millisecond),
    ct:pal("teleport:info() on ~p:~n~p", [node(), Info]),
    ?assertEqual(lists:sort([listener, Node]), lists:sort(maps:keys(Info))),
    Stats = maps:get(Node, teleport:stats()),

    %% The pool: one slot was used (one sender, one destination), the other never connected.
    Conns = maps:get(Node, Info),
    ?assertEqual([0, 1], [I || #{index := I} <- Conns]),
    ConnKeys = [bytes_out, connected_since, frames_in_queue, index, last_acked, last_error,
                local_addr, msgs_out, peer_addr, queued_bytes, reconnects, recbuf, sndbuf,
                state, unacked_bytes, unacked_frames, writes],
    [?assertEqual(lists:sort(ConnKeys), lists:sort(maps:keys(C))) || C <- Conns],
    [Up] = [C || C = #{state := up} <- Conns],
    [Down] = [C || C = #{state := down} <- Conns],
    #{peer_addr := {PeerIp, PeerPort}, local_addr := {LocalIp, LocalPort},
      connected_since := Since} = Up,
    ?assertEqual({127, 0, 0, 1}, PeerIp),
    ?assertEqual({127, 0, 0, 1}, LocalIp),
    ?assert(is_integer(LocalPort)),
    ?assert(Since >= T0 - 5000 andalso Since =< T1),
    ?assertMatch(#{msgs_out := 10, queued_bytes := 0, frames_in_queue := 0,
                   unacked_frames := 0, unacked_bytes := 0, last_acked := 10,
                   reconnects := 0, last_error := undefined}, Up),
    ?assertEqual(maps:get(bytes_out, Stats), maps:get(bytes_out, Up)),
    %% At least one write, and no more than one per message.
    ?assert(maps:get(writes, Up) >= 1 andalso maps:get(writes, Up) =< 10),
    %% The buffer asked for, doubled by Linux and capped by net.core.wmem_max.
    ?assertEqual(2 * min(256 * ?KB, sysctl("net/core/wmem_max")), maps:get(sndbuf, Up)),
    ?assertEqual(2 * min(256 * ?KB, sysctl("net/core/rmem_max")), maps:get(recbuf, Up)),
    ?assertMatch(#{peer_addr := {PeerIp, PeerPort}, local_addr := undefined,
                   connected_since := undefined, sndbuf := undefined, recbuf := undefined,
                   msgs_out := 0, bytes_out := 0, writes := 0, last_error := undefined,
                   unacked_frames := 0, last_acked := 0}, Down),

    %% The listener: the peer's connection, with what it read.
    #{listener := Listener} = Info,
    ?assertEqual([handshaking, incoming, ip, port, socket_opts],
                 lists:sort(maps:keys(Listener))),
    ?assertMatch(#{ip := {0, 0, 0, 0}, port := Port, handshaking := 1,
                   socket_opts := #{sndbuf := 262144, recbuf := 262144, nodelay := true,
                                    keepalive := true, keepalive_time := 60,
                                    bind_ip := {127, 0, 0, 1}}}, Listener),
    [In] = [I || I = #{state := up} <- maps:get(incoming, Listener)],
    [Shaking] = [I || I = #{state := handshaking} <- maps:get(incoming, Listener)],
    ?assertMatch(#{peer := undefined, msgs_in := 0, local_addr := {_, Port}}, Shaking),
    ?assertEqual([bytes_in, connected_since, id, local_addr, longest_turn_cpu_us,
                  longest_turn_wall_us, msgs_in, peer, peer_addr, reader, recbuf, sndbuf, state],
                 lists:sort(maps:keys(In))),
    ?assertMatch(#{peer := Node, state := up, msgs_in := 3, local_addr := {_, Port},
                   peer_addr := {_, _}, reader := Reader} when is_pid(Reader), In),
    %% It read the 3 messages in turns of its own, of some CPU time, never more than their
    %% wall-clock time.
    #{longest_turn_cpu_us := TurnCpu, longest_turn_wall_us := TurnWall} = In,
    ?assert(TurnCpu > 0 andalso TurnCpu =< TurnWall + 50),
    ?assertMatch(#{reader := undefined, longest_turn_cpu_us := 0}, Shaking),
    %% The connection's reader, supervised; it reads through a port of its own on the
    %% connection's socket (the schedulers poll it), from the same peer address.
    ?assertEqual([maps:get(reader, In)], teleport_reader_sup:readers()),
    ?assertEqual(node(), node(maps:get(reader, In))),
    {links, Links} = erlang:process_info(maps:get(reader, In), links),
    [Sock] = [L || L <- Links, is_port(L)],
    ?assertEqual({name, "tcp_inet"}, erlang:port_info(Sock, name)),
    ?assertEqual({ok, maps:get(peer_addr, In)}, inet:peername(Sock)),
    ?assertEqual(maps:get(bytes_in, Stats), maps:get(bytes_in, In)),
    %% Incoming sockets get this node's options too.
    ?assertEqual(2 * min(256 * ?KB, sysctl("net/core/rmem_max")), maps:get(recbuf, In)),

    %% The peer's view of the same connection.
    PeerInfo = peer:call(P, teleport, info, []),
    [PeerIn] = [I || I = #{peer := N} <- maps:get(incoming, maps:get(listener, PeerInfo)),
                     N =:= node()],
    ?assertEqual({LocalIp, LocalPort}, maps:get(peer_addr, PeerIn)),
    ?assertEqual(10, maps:get(msgs_in, PeerIn)),
    ?assertEqual(maps:get(bytes_out, Up), maps:get(bytes_in, PeerIn)),
    ?assertEqual(2 * min(128 * ?KB, sysctl("net/core/rmem_max")), maps:get(recbuf, PeerIn)),

    %% Logged: this node's connection up, and its listener accepting the peer's.
    NodeBin = atom_to_binary(Node),
    UpEvent = wait_event(connection_up),
    ?assertMatch(#{peer := NodeBin, index := _, addr := _, local := _}, UpEvent),
    ?assert(lists:suffix(":" ++ integer_to_list(PeerPort), binary_to_list(maps:get(addr, UpEvent)))),
    Accepted = wait_event(connection_accepted),
    ?assertMatch(#{peer := NodeBin, addr := _, id := _}, Accepted),
    ok.

%% A connection's life as the log tells it: up, lost (the peer's teleport stopped), up
%% again once the peer is found where it listens now, closed when the pool is. Each once,
%% with the peer, the index, the address and the reason.
state_changes_are_logged_once_each(_Config) ->
    ok = application:set_env(teleport, pool_size, 1),
    ok = teleport:start(),
    capture_logs(),
    {P, Node} = start_peer(#{}),
    NodeBin = atom_to_binary(Node),
    Coll = peer:call(P, teleport_test_util, start_collector, [coll]),
    ok = teleport:send({coll, Node}, one),
    ?assertEqual([one], teleport_test_util:collected(P, Coll, 1)),
    {ok, Port1} = peer:call(P, teleport_server, listen_port, []),
    Up1 = wait_event(connection_up),
    ?assertMatch(#{peer := NodeBin, index := 0}, Up1),

    %% The peer's teleport stops: the idle connection is found lost within a second or so.
    ok = peer:call(P, teleport, stop, []),
    Lost = wait_event(connection_lost),
    ct:pal("connection_lost: ~p", [Lost]),
    ?assertMatch(#{peer := NodeBin, index := 0, addr := _, reason := _}, Lost),
    ?assert(lists:suffix(":" ++ integer_to_list(Port1), binary_to_list(maps:get(addr, Lost)))),
    wait_until(fun() -> [C] = maps:get(Node, teleport:info()), maps:get(state, C) =:= down end),
    [#{last_error := LastError}] = maps:get(Node, teleport:info()),
    ct:pal("last_error: ~ts", [LastError]),
    ?assertMatch({match, _}, re:run(LastError, "^connection to .*:" ++ integer_to_list(Port1)
                                        ++ " lost: ")),
    %% Lost once, not once per check.
    timer:sleep(1500),
    ?assertEqual([], other_events(connection_lost)),

    %% teleport again on the peer, on another port: the next connection is refused where
    %% the peer was; the send after that finds it where it is now, and both arrive.
    ok = peer:call(P, teleport, start, []),
    Coll2 = peer:call(P, teleport_test_util, start_collector, [coll2]),
    ok = teleport:send({coll2, Node}, two),
    Refused = wait_event(connect_failed),
    ct:pal("connect_failed: ~p", [Refused]),
    ?assertMatch(#{peer := NodeBin, index := 0, addr := _, reason := _, queued := 1}, Refused),
    wait_until(fun() -> [#{last_error := E}] = maps:get(Node, teleport:info()),
                        lists:prefix("connect to ", binary_to_list(E)) end),
    ok = teleport:send({coll2, Node}, three),
    ?assertEqual([two, three], teleport_test_util:collected(P, Coll2, 2)),
    {ok, Port2} = peer:call(P, teleport_server, listen_port, []),
    Up2 = wait_event(connection_up),
    ?assert(lists:suffix(":" ++ integer_to_list(Port2), binary_to_list(maps:get(addr, Up2)))),
    [Conn] = maps:get(Node, teleport:info()),
    ?assertMatch(#{state := up, reconnects := 1, peer_addr := {_, Port2}}, Conn),

    %% The pool is torn down (as at nodedown, or when teleport stops): its connection is
    %% closed, and says why.
    {ok, Pool} = teleport_server:connect(Node),
    ok = teleport_nif:pool_close(Pool),
    Closed = wait_event(connection_closed),
    ct:pal("connection_closed: ~p", [Closed]),
    ?assertMatch(#{peer := NodeBin, index := 0, addr := _, reason := <<"pool closed">>}, Closed),
    ok.

%% eager_connect: the pool to a node is made when it comes up over disterl, before any send.
eager_connect_opens_the_pool_at_nodeup(_Config) ->
    ok = application:set_env(teleport, eager_connect, true),
    ok = teleport:start(),
    %% Not under cover: that would connect it before teleport runs there. The ping connects.
    {_P, Node} = start_peer(#{}, false),
    ?assertNot(lists:member(Node, nodes())),
    pong = net_adm:ping(Node),
    wait_until(fun() -> maps:is_key(Node, teleport:info()) end),
    Conns = maps:get(Node, teleport:info()),
    ?assert(lists:all(fun(#{state := S}) -> S =:= down end, Conns)),
    ?assertEqual(0, lists:sum([M || #{msgs_out := M} <- Conns])),
    ok.

%% abcast/2 and multi_call/2 (every connected node), a call to a local server by pid, and
%% messages big enough to be encoded on a dirty scheduler, one to one and one to many.
all_nodes_forms_and_big_terms(_Config) ->
    ok = teleport:start(),
    {P, Node} = start_peer(#{}),
    pong = net_adm:ping(Node),
    {ok, _} = peer:call(P, calls_test_server, start, [inspect_srv]),
    ?assertEqual(abcast, teleport:abcast(inspect_srv, {hello, 1})),
    ?assertEqual([{hello, 1}], teleport:gs_call({inspect_srv, Node}, casts)),
    {Replies, Bad} = teleport:multi_call(inspect_srv, {echo, m}),
    ?assert(lists:member({Node, m}, Replies)),
    ?assert(lists:member(node(), Bad)),
    ?assertEqual({[], [Node]}, teleport:multi_call([Node], inspect_no_srv, req, 5000)),
    {ok, Local} = calls_test_server:start(inspect_local_srv),
    ?assertEqual(here, teleport:gs_call(Local, {echo, here})),
    gen_server:stop(Local),
    %% 300 000 integers: more than a normal scheduler's slice to encode.
    Big = lists:seq(1, 300000),
    Coll = peer:call(P, teleport_test_util, start_collector, [coll]),
    ok = teleport:send({coll, Node}, {big, Big}),
    ?assertEqual(abcast, teleport:abcast([Node], coll, {big_cast, Big})),
    [{big, Got}, {'$gen_cast', {big_cast, Got2}}] = teleport_test_util:collected(P, Coll, 2),
    ?assertEqual(Big, Got),
    ?assertEqual(Big, Got2),
    ok.

%%--------------------------------------------------------------------------------------------
%% Helpers

%% The peers this test case started (teleport_test_util:started()), for end_per_testcase
%% (CT runs init_per_testcase, the case and end_per_testcase in one process).
peers() ->
    case get(peers) of
        undefined -> [];
        Ps -> Ps
    end.

%% teleport's threads (writers, the acceptor, a connection's handshake) run
%% `thread_nice' below the VM's
%% schedulers: 7 as configured on one node, the default (10) on the other, after a call has
%% used both directions. (A reader, started by the acceptor, once ran at twice the value.)
threads_run_below_the_schedulers(_Config) ->
    {PeerA, _} = start_peer(#{thread_nice => 7}),
    {PeerB, NodeB} = start_peer(#{}),
    true = peer:call(PeerA, net_kernel, connect_node, [NodeB]),
    ?assertEqual(0, peer:call(PeerA, teleport, gs_call, [{teleport_calls, NodeB}, pending, 5000],
                              10000)),
    ?assertEqual(10, maps:get(thread_nice, teleport_config:defaults())),
    [begin
         Threads = os_threads(peer:call(Peer, os, getpid, [])),
         ct:pal("threads (name, nice) of a node with thread_nice ~b: ~p", [Nice, Threads]),
         Schedulers = lists:usort([N || {Name, N} <- Threads,
                                        lists:suffix("_scheduler", Name)]),
         %% teleport_log, the log bridge, starts with the NIF, before any configuration.
         %% (A handshake's or a connecting thread ends once its connection is handed to its
         %% reader or writer. No thread reads: the readers run on the schedulers.)
         Teleport = lists:usort([{lists:sublist(Name, 12), N}
                                 || {"teleport_" ++ _ = Name, N} <- Threads,
                                    Name =/= "teleport_log"]),
         ?assertEqual([0], Schedulers),
         ?assertEqual([{"teleport_acc", Nice}, {"teleport_wri", Nice}],
                      Teleport -- [{"teleport_han", Nice}, {"teleport_con", Nice}])
     end || {Peer, Nice} <- [{PeerA, 7}, {PeerB, 10}]].

%% The {Name, Nice} of every thread of OS process OsPid (Linux /proc).
os_threads(OsPid) ->
    Dir = "/proc/" ++ OsPid ++ "/task",
    {ok, Tids} = file:list_dir(Dir),
    [begin
         {ok, Stat} = file:read_file(filename:join([Dir, Tid, "stat"])),
         %% "tid (name) state ppid ...": the name may hold spaces, so split at the last ")";
         %% the nice value is field 19, the 17th after the name.
         [Before, After] = string:split(Stat, ")", trailing),
         [_, Name] = string:split(Before, "("),
         Fields = string:lexemes(After, " "),
         {binary_to_list(Name), binary_to_integer(lists:nth(17, Fields))}
     end || Tid <- Tids].

%% A peer running teleport with the application environment Env.
start_peer(Env) ->
    start_peer(Env, true).

%% The same, registered with cover if Cover.
start_peer(Env, Cover) ->
    {ok, {Peer, Node, _}} =
        teleport_test_util:start_peer(#{prefix => inspect, env => maps:to_list(Env),
                                        cover => Cover,
                                        on_start => fun(S) -> put(peers, [S | peers()]) end}),
    {Peer, Node}.

sysctl(Name) ->
    {ok, Text} = file:read_file("/proc/sys/" ++ Name),
    binary_to_integer(string:trim(Text)).

%% On the peer: N messages back over teleport.
send_back(Dest, N) ->
    [ok = teleport:send(Dest, {back, I}) || I <- lists:seq(1, N)],
    ok.

wait_until(Fun) ->
    Deadline = erlang:monotonic_time(millisecond) + 10000,
    wait_until(Fun, Deadline).

wait_until(Fun, Deadline) ->
    case Fun() of
        true -> ok;
        false ->
            case erlang:monotonic_time(millisecond) > Deadline of
                true -> ct:fail(wait_until_timed_out);
                false -> timer:sleep(20), wait_until(Fun, Deadline)
            end
    end.

%% An incoming connection reset by its peer (an RST, not a FIN) ends with that error in the
%% log, not as a clean close (its reader's port used to report resets as closes).
reset_is_logged_as_an_error(_Config) ->
    ok = teleport:start(),
    capture_logs(),
    {ok, Port} = teleport_server:listen_port(),
    %% A node the listener lets in (this node opened a pool to it), dialing by hand.
    {_P, Node} = start_peer(#{}),
    ok = teleport:send({nobody, Node}, opens_the_pool),
    Me = atom_to_binary(Node),
    {ok, S} = teleport_test_util:raw_dial(Port, Me, atom_to_binary(erlang:get_cookie())),
    ok = inet:setopts(S, [{packet, raw}]),
    ok = gen_tcp:send(S, teleport_test_util:raw_frame(1, self(), before_reset)),
    receive before_reset -> ok after 5000 -> ct:fail(frame_not_delivered) end,
    ok = inet:setopts(S, [{linger, {true, 0}}]),
    ok = gen_tcp:close(S),
    Closed = wait_closed_of(Me),
    ct:pal("connection_closed: ~p", [Closed]),
    ?assertMatch({match, _}, re:run(maps:get(reason, Closed), "econnreset")).

wait_closed_of(Peer) ->
    case wait_event(connection_closed) of
        #{peer := Peer} = Report -> Report;
        _ -> wait_closed_of(Peer)
    end.

%% teleport's Rust events (reports of teleport_log) come to the test process.
capture_logs() ->
    _ = logger:remove_handler(?MODULE),
    ok = logger:add_handler(?MODULE, ?MODULE, #{config => #{to => self()}}).

%% The logger handler callback.
log(#{msg := {report, #{event := _} = Report}, meta := #{domain := [teleport | _]}},
    #{config := #{to := Pid}}) ->
    Pid ! {teleport_event, Report},
    ok;
log(_Event, _Config) ->
    ok.

%% The fields of the next event named Name.
wait_event(Name) ->
    receive
        {teleport_event, #{event := Name} = Report} -> Report
    after 10000 ->
            ct:fail({event_not_logged, Name})
    end.

%% Events named Name that are already here.
other_events(Name) ->
    receive
        {teleport_event, #{event := Name} = Report} -> [Report | other_events(Name)]
    after 0 -> []
    end.
