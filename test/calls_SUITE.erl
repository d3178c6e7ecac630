%% gs_call, gs_cast, abcast and multi_call against an unmodified gen_server on peer nodes.
-module(calls_SUITE).
-compile([export_all, nowarn_export_all]).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

all() ->
    [reply_value, reply_from_another_process, noreply_then_reply_later, timeout_shape,
     late_reply_never_lands, noproc_shape, callee_crash_mid_call, local_destination,
     big_reply_not_over_disterl, gs_cast, casts_then_call_in_order, abcast_with_a_bad_node,
     multi_call_with_a_node_down,
     node_killed_mid_call, abandoned_calls_leave_nothing_behind, no_process_per_call,
     calls_cross_no_disterl, teleport_calls_down_mid_call, killed_callers_leave_no_note,
     early_cancel_drops_its_call, caller_node_down_ends_infinite_calls,
     replies_restart_keeps_the_watches, failed_infinite_calls_leave_no_monitor,
     call_from_an_undistributed_node].

init_per_suite(Config) ->
    Started = teleport_test_util:start_distribution("calls_ct_"),
    ok = teleport:start(),
    [{dist_started, Started} | Config].

end_per_suite(Config) ->
    _ = teleport:stop(),
    teleport_test_util:stop_distribution(?config(dist_started, Config)),
    ok.

init_per_testcase(_Case, Config) ->
    {Peer, Node, _} = Started = start_peer(),
    [{started, Started}, {peer, Peer}, {node, Node} | Config].

end_per_testcase(_Case, Config) ->
    teleport_test_util:stop_peer(?config(started, Config)).

%% A peer running teleport and the gen_server `srv' (started after teleport: nothing sends
%% to it before the case does). Linked to the test case's process, so a case that crashes
%% takes its peers with it. connect_all stays true, the default these peers always had.
start_peer() ->
    {ok, Started} = teleport_test_util:start_peer(
                      #{prefix => calls, link => true, connect_all => true}),
    {Peer, _, _} = Started,
    {ok, _} = peer:call(Peer, calls_test_server, start, [srv]),
    Started.

reply_value(Config) ->
    Node = ?config(node, Config),
    ?assertEqual(hello, teleport:gs_call({srv, Node}, {echo, hello})),
    ?assertEqual(#{a => [1, 2]}, teleport:gs_call({srv, Node}, {echo, #{a => [1, 2]}}, 1000)),
    Pid = peer:call(?config(peer, Config), erlang, whereis, [srv]),
    ?assertEqual(by_pid, teleport:gs_call(Pid, {echo, by_pid}, infinity)).

reply_from_another_process(Config) ->
    ?assertEqual({other, 7}, teleport:gs_call({srv, ?config(node, Config)}, {reply_from_other, 7})).

noreply_then_reply_later(Config) ->
    ?assertEqual({later, x},
                 teleport:gs_call({srv, ?config(node, Config)}, {reply_later, x, 200}, 2000)).

timeout_shape(Config) ->
    Dest = {srv, ?config(node, Config)},
    Req = {sleep, 500},
    ?assertExit({timeout, {teleport, gs_call, [Dest, Req, 100]}},
                teleport:gs_call(Dest, Req, 100)).

late_reply_never_lands(Config) ->
    Dest = {srv, ?config(node, Config)},
    ?assertExit({timeout, _}, teleport:gs_call(Dest, {reply_later, late, 300}, 50)),
    %% The reply is sent 250 ms after the timeout; it must be dropped by the VM.
    timer:sleep(600),
    {messages, Msgs} = process_info(self(), messages),
    ?assertEqual([], Msgs),
    %% The server is fine and so is the path.
    ?assertEqual(ok, teleport:gs_call(Dest, {echo, ok})).

%% teleport_calls on the callee's node forgets a call once it ends, once the caller's timeout
%% has passed, or, with an infinite timeout, when the caller dies (teleport_replies on the
%% caller's node monitors such a caller and cancels its call over teleport).
abandoned_calls_leave_nothing_behind(Config) ->
    {Peer, Node} = {?config(peer, Config), ?config(node, Config)},
    Dest = {srv, Node},
    Pending = fun() -> peer:call(Peer, teleport_calls, pending, []) end,
    ?assertEqual(0, Pending()),
    Caller = spawn(fun() -> teleport:gs_call(Dest, {reply_later, x, 60000}, infinity) end),
    ok = teleport_soak:wait_until(fun() -> Pending() =:= 1 end, 5000),
    exit(Caller, kill),
    ok = teleport_soak:wait_until(fun() -> Pending() =:= 0 end, 5000),
    T0 = erlang:monotonic_time(millisecond),
    ?assertExit({timeout, _}, teleport:gs_call(Dest, {reply_later, y, 60000}, 300)),
    ok = teleport_soak:wait_until(fun() -> Pending() =:= 0 end, 5000),
    ct:pal("the finite call was forgotten ~b ms after it began",
           [erlang:monotonic_time(millisecond) - T0]),
    %% The callee's late reply to a forgotten call goes nowhere and breaks nothing.
    ?assertEqual(ok, teleport:gs_call(Dest, {echo, ok})).

%% No process per call: with 200 calls waiting on the callee (`{noreply, _}'), the callee's
%% node runs no more processes than before them, and the `From' the callee sees is
%% teleport_calls. Then all 200 replies arrive.
no_process_per_call(Config) ->
    {Peer, Node} = {?config(peer, Config), ?config(node, Config)},
    Dest = {srv, Node},
    CallsPid = peer:call(Peer, erlang, whereis, [teleport_calls]),
    ?assertEqual(CallsPid, teleport:gs_call(Dest, from_pid)),
    ok = teleport:gs_call(Dest, hold_replies),
    Before = peer:call(Peer, erlang, system_info, [process_count]),
    Self = self(),
    Callers = [spawn_link(fun() -> Self ! {self(), teleport:gs_call(Dest, {held, I}, 30000)} end)
               || I <- lists:seq(1, 200)],
    ok = teleport_soak:wait_until(
           fun() -> peer:call(Peer, teleport_calls, pending, []) =:= 200 end, 10000),
    During = peer:call(Peer, erlang, system_info, [process_count]),
    ct:pal("processes on the callee's node: ~b before, ~b with 200 calls waiting",
           [Before, During]),
    ?assert(During - Before < 10),
    ?assertEqual(200, teleport:gs_call(Dest, release_replies)),
    Replies = [receive {C, R} -> R after 10000 -> ct:fail({no_reply, C}) end || C <- Callers],
    ?assertEqual([{held, I} || I <- lists:seq(1, 200)], Replies),
    ?assertEqual(0, peer:call(Peer, teleport_calls, pending, [])),
    %% teleport_calls itself can be called: it cannot monitor itself, so it answers at once.
    ?assertEqual(0, teleport:gs_call({teleport_calls, Node}, pending, 5000)).

noproc_shape(Config) ->
    Dest = {no_such_server, ?config(node, Config)},
    ?assertExit({noproc, {teleport, gs_call, [Dest, x, 1000]}}, teleport:gs_call(Dest, x, 1000)).

callee_crash_mid_call(Config) ->
    Dest = {srv, ?config(node, Config)},
    Req = {crash, my_reason},
    ?assertExit({my_reason, {teleport, gs_call, [Dest, Req, 5000]}},
                teleport:gs_call(Dest, Req, 5000)).

local_destination(_Config) ->
    {ok, _} = calls_test_server:start(local_srv),
    try
        ?assertEqual(here, teleport:gs_call(local_srv, {echo, here})),
        ?assertEqual(here, teleport:gs_call({local_srv, node()}, {echo, here})),
        ?assertExit({timeout, {teleport, gs_call, [local_srv, {sleep, 300}, 50]}},
                    teleport:gs_call(local_srv, {sleep, 300}, 50)),
        ?assertExit({noproc, {teleport, gs_call, [nobody_here, x, 100]}},
                    teleport:gs_call(nobody_here, x, 100))
    after
        gen_server:stop(local_srv)
    end.

big_reply_not_over_disterl(Config) ->
    Node = ?config(node, Config),
    Dest = {srv, Node},
    ?assertEqual(warm, teleport:gs_call(Dest, {echo, warm})),
    Size = 10 * 1024 * 1024,
    {In0, Out0} = dist_bytes(Node),
    T0 = erlang:monotonic_time(microsecond),
    Reply = teleport:gs_call(Dest, {bytes, Size}, 30000),
    T1 = erlang:monotonic_time(microsecond),
    {In1, Out1} = dist_bytes(Node),
    ?assertEqual(Size, byte_size(Reply)),
    ct:pal("10 MB reply in ~b us; disterl bytes in ~b, out ~b during the call",
           [T1 - T0, In1 - In0, Out1 - Out0]),
    %% Monitors and the like may cross disterl; 10 MB must not.
    ?assert(In1 - In0 < 64 * 1024),
    ?assert(Out1 - Out0 < 64 * 1024).

gs_cast(Config) ->
    Dest = {srv, ?config(node, Config)},
    ?assertEqual(ok, teleport:gs_cast(Dest, one)),
    ?assertEqual(ok, teleport:gs_cast(Dest, two)),
    ?assertEqual(ok, teleport:gs_cast({srv, 'nobody@nohost'}, lost)),
    ?assertEqual(ok, teleport:gs_cast(42, lost)),
    %% Same sender, same destination: the call is ordered after the casts.
    ?assertEqual([one, two], teleport:gs_call(Dest, casts)).

%% As with gen_server over disterl, a call made after casts to the same server is served
%% after them: the call request rides the connection of its server, not of teleport_calls.
casts_then_call_in_order(Config) ->
    Dest = {srv, ?config(node, Config)},
    Out = [begin
               ok = teleport:gs_cast(Dest, I),
               lists:last(teleport:gs_call(Dest, casts))
           end || I <- lists:seq(1, 200)],
    ?assertEqual(lists:seq(1, 200), Out).

abcast_with_a_bad_node(Config) ->
    {_, Node2, _} = S2 = start_peer(),
    {_, Node3, _} = S3 = start_peer(),
    try
        Nodes = [?config(node, Config), Node2, Node3],
        ?assertEqual(abcast, teleport:abcast(['bad@nohost' | Nodes], srv, {hello, 1})),
        %% A call from this process comes after its cast on each node.
        [?assertEqual([{hello, 1}], teleport:gs_call({srv, N}, casts)) || N <- Nodes],
        Stats = teleport:stats(),
        [?assertMatch(#{msgs_out := _}, maps:get(N, Stats)) || N <- Nodes]
    after
        teleport_test_util:stop_peers([S2, S3])
    end.

multi_call_with_a_node_down(Config) ->
    Node = ?config(node, Config),
    {_, Node2, _} = S2 = start_peer(),
    teleport_test_util:stop_peer(S2),
    {Replies, Bad} = teleport:multi_call([Node, Node2], srv, {echo, m}, 3000),
    ?assertEqual([{Node, m}], Replies),
    ?assertEqual([Node2], Bad),
    %% A node without the server is bad too; the local node has none.
    ?assertEqual({[{Node, m}], [node()]}, teleport:multi_call([Node, node()], srv, {echo, m})).

node_killed_mid_call(Config) ->
    Node = ?config(node, Config),
    {_, _, OsPid} = ?config(started, Config),
    _ = spawn(fun() -> timer:sleep(300), teleport_test_util:kill_os_process(OsPid) end),
    T0 = erlang:monotonic_time(millisecond),
    ?assertExit({{nodedown, Node}, {teleport, gs_call, _}},
                teleport:gs_call({srv, Node}, {sleep, 60000}, 60000)),
    Waited = erlang:monotonic_time(millisecond) - T0,
    ct:pal("nodedown seen after ~b ms", [Waited]),
    ?assert(Waited < 10000).

%% A call sends nothing over disterl: no monitor per call (which waited behind disterl's
%% bulk). Before, each call sent a monitor and a demonitor of teleport_calls there.
calls_cross_no_disterl(Config) ->
    Node = ?config(node, Config),
    Dest = {srv, Node},
    %% The first call to the node watches it, over disterl, once.
    ?assertEqual(warm, teleport:gs_call(Dest, {echo, warm})),
    {Sent0, Got0} = dist_packets(Node),
    [I = teleport:gs_call(Dest, {echo, I}, 5000) || I <- lists:seq(1, 200)],
    [I = teleport:gs_call(Dest, {echo, I}, infinity) || I <- lists:seq(1, 20)],
    {Sent1, Got1} = dist_packets(Node),
    ct:pal("disterl packets during 220 calls: ~b sent, ~b received",
           [Sent1 - Sent0, Got1 - Got0]),
    %% A tick may cross; 440 monitor messages must not, nor the 40 of the callee's node
    %% monitoring the callers with an infinite timeout.
    ?assert(Sent1 - Sent0 < 10),
    ?assert(Got1 - Got0 < 10),
    ?assertEqual(0, teleport_replies:waiting()).

%% teleport_calls on the callee's node goes away while callers wait: they exit with its
%% reason, as with a monitor of their own. Its successor is watched anew.
teleport_calls_down_mid_call(Config) ->
    {Peer, Node} = {?config(peer, Config), ?config(node, Config)},
    Dest = {srv, Node},
    Self = self(),
    Kill = fun() ->
                   Callers = [spawn(fun() ->
                                            Self ! {self(), catch teleport:gs_call(
                                                                    Dest, {reply_later, x, 60000}, T)}
                                    end) || T <- [30000, infinity]],
                   ok = teleport_soak:wait_until(
                          fun() -> peer:call(Peer, teleport_calls, pending, []) =:= 2 end,
                          5000),
                   ?assertEqual(2, teleport_replies:waiting()),
                   Calls = peer:call(Peer, erlang, whereis, [teleport_calls]),
                   true = peer:call(Peer, erlang, exit, [Calls, kill]),
                   [receive {C, R} -> R after 10000 -> ct:fail({no_answer, C}) end
                    || C <- Callers]
           end,
    Exits = Kill(),
    ?assertMatch([{'EXIT', {killed, {teleport, gs_call, [Dest, _, 30000]}}},
                  {'EXIT', {killed, {teleport, gs_call, [Dest, _, infinity]}}}], Exits),
    ?assertEqual(0, teleport_replies:waiting()),
    %% The supervisor started another; it serves, and it is watched too.
    ok = teleport_soak:wait_until(
           fun() -> is_pid(peer:call(Peer, erlang, whereis, [teleport_calls])) end, 5000),
    ?assertEqual(again, teleport:gs_call(Dest, {echo, again})),
    ?assertMatch([{'EXIT', {killed, _}}, {'EXIT', {killed, _}}], Kill()).

%% A caller killed while it waits leaves no note behind on its node: with a finite timeout
%% the note is swept at a reply once the timeout has passed, with an infinite one it goes
%% when the caller dies.
killed_callers_leave_no_note(Config) ->
    Dest = {srv, ?config(node, Config)},
    ?assertEqual(0, teleport_replies:waiting()),
    Finite = spawn(fun() -> teleport:gs_call(Dest, {reply_later, y, 60000}, 200) end),
    Infinite = spawn(fun() -> teleport:gs_call(Dest, {reply_later, x, 60000}, infinity) end),
    ok = teleport_soak:wait_until(fun() -> teleport_replies:waiting() =:= 2 end, 5000),
    exit(Infinite, kill),
    ok = teleport_soak:wait_until(fun() -> teleport_replies:waiting() =:= 1 end, 5000),
    exit(Finite, kill),
    %% Past the timeout and the sweep's interval, a reply sweeps the note.
    timer:sleep(1200),
    ?assertEqual(1, teleport_replies:waiting()),
    ?assertEqual(ok, teleport:gs_call({srv, ?config(node, Config)}, {echo, ok})),
    ?assertEqual(0, teleport_replies:waiting()).

%% A cancel of an infinite call may overtake its request (they ride different connections):
%% the request is dropped when it comes, the callee never sees it. The messages go to
%% teleport_calls over disterl, and so does erpc, which therefore sees them handled.
early_cancel_drops_its_call(Config) ->
    Node = ?config(node, Config),
    Dest = {srv, Node},
    Pending = fun() -> erpc:call(Node, teleport_calls, pending, []) end,
    ok = teleport:gs_call(Dest, hold_replies),
    [Early, Control] = [erlang:alias() || _ <- [1, 2]],
    {teleport_calls, Node} ! {'$teleport_cancel', Early},
    {teleport_calls, Node} ! {'$teleport_call', srv, {held, early}, self(), Early, infinity},
    ?assertEqual(0, Pending()),
    %% The control: the same request without a cancel is served (and held).
    {teleport_calls, Node} ! {'$teleport_call', srv, {held, control}, self(), Control, infinity},
    ?assertEqual(1, Pending()),
    ?assertEqual(1, teleport:gs_call(Dest, release_replies)),
    %% A cancel of a call that is not there breaks nothing either.
    {teleport_calls, Node} ! {'$teleport_cancel', make_ref()},
    ?assertEqual(ok, teleport:gs_call(Dest, {echo, ok}, infinity)),
    [erlang:unalias(A) || A <- [Early, Control]].

%% teleport_replies restarting loses no caller's watch: its table belongs to teleport_sup,
%% and the new one watches again what the notes name. Before, a caller waiting across the
%% restart was never told that teleport_calls there went away (an infinite one hung).
replies_restart_keeps_the_watches(Config) ->
    {Peer, Node} = {?config(peer, Config), ?config(node, Config)},
    Dest = {srv, Node},
    Self = self(),
    Callers = [spawn(fun() -> Self ! {self(), catch teleport:gs_call(
                                                    Dest, {reply_later, x, 60000}, T)}
                     end) || T <- [30000, infinity]],
    ok = teleport_soak:wait_until(
           fun() -> peer:call(Peer, teleport_calls, pending, []) =:= 2 end, 5000),
    Old = whereis(teleport_replies),
    exit(Old, kill),
    ok = teleport_soak:wait_until(
           fun() -> is_pid(whereis(teleport_replies)) andalso whereis(teleport_replies) =/= Old
           end, 5000),
    ?assertEqual(2, teleport_replies:waiting()),
    Calls = peer:call(Peer, erlang, whereis, [teleport_calls]),
    true = peer:call(Peer, erlang, exit, [Calls, kill]),
    Exits = [receive {C, R} -> R after 10000 -> ct:fail({not_told, C}) end || C <- Callers],
    ?assertMatch([{'EXIT', {killed, _}}, {'EXIT', {killed, _}}], Exits),
    ?assertEqual(0, teleport_replies:waiting()).

%% An infinite call whose request cannot be sent leaves nothing behind: neither its note
%% nor the monitor of its caller (one was left per failed call, for the caller's life). Here
%% the request is larger than the callee's node takes (its max_frame_bytes), which the node
%% told in the handshake: the call exits too_large at once, the node staying watched.
failed_infinite_calls_leave_no_monitor(_Config) ->
    {ok, {_, Node, _} = Small} = teleport_test_util:start_peer(
                                   #{prefix => calls, link => true, connect_all => true,
                                     env => [{max_frame_bytes, 65536}]}),
    try
        {ok, _} = erpc:call(Node, calls_test_server, start, [srv]),
        Dest = {srv, Node},
        ?assertEqual(up, teleport:gs_call(Dest, {echo, up}, infinity)),
        Big = {echo, binary:copy(<<7>>, 100000)},
        Monitors = fun() ->
                           {monitors, Ms} = process_info(whereis(teleport_replies), monitors),
                           length([M || {process, P} = M <- Ms, P =:= self()])
                   end,
        [?assertExit({too_large, _}, teleport:gs_call(Dest, Big, infinity))
         || _ <- lists:seq(1, 20)],
        %% What teleport_replies was sent is handled before this call is.
        _ = sys:get_state(teleport_replies),
        ?assertEqual(0, Monitors()),
        ?assertEqual(0, teleport_replies:waiting()),
        %% The same steps one by one, so that teleport_replies surely monitors the caller
        %% before the wait is given up (a request that fails at once is usually given up
        %% first): forget/1 removes that monitor too.
        Alias = erlang:alias([reply]),
        ok = teleport_replies:expect(Alias, Node, infinity),
        _ = sys:get_state(teleport_replies),
        ?assertEqual(1, Monitors()),
        ok = teleport_replies:forget(Alias),
        _ = sys:get_state(teleport_replies),
        ?assertEqual(0, Monitors()),
        ?assertEqual(0, teleport_replies:waiting()),
        ?assertEqual(still, teleport:gs_call(Dest, {echo, still}, infinity))
    after
        teleport_test_util:stop_peer(Small)
    end.

%% On a node that is not distributed a call to another node exits nodedown, as sending does,
%% and takes nothing down with it. (Watching the node crashed teleport_replies: a monitor of
%% a remote name raises badarg there; six such calls stopped teleport.)
call_from_an_undistributed_node(_Config) ->
    {ok, Peer, nonode@nohost} = peer:start_link(#{connection => standard_io,
                                                  args => ["-pa" | code:get_path()]}),
    try
        ok = peer:call(Peer, teleport, start, []),
        Replies = peer:call(Peer, erlang, whereis, [teleport_replies]),
        Dest = {srv, 'nobody@nohost'},
        [?assertMatch({'EXIT', {{nodedown, 'nobody@nohost'}, {teleport, gs_call, _}}},
                      peer:call(Peer, erlang, apply, [fun catch_call/1, [Dest]]))
         || _ <- lists:seq(1, 8)],
        ?assertEqual(Replies, peer:call(Peer, erlang, whereis, [teleport_replies]))
    after
        peer:stop(Peer)
    end.

catch_call(Dest) ->
    catch teleport:gs_call(Dest, x, 1000).

%% When a caller's node goes down, the callee's node gives up its calls with an infinite
%% timeout (it watches the node, not each caller).
caller_node_down_ends_infinite_calls(Config) ->
    {Peer, Node} = {?config(peer, Config), ?config(node, Config)},
    {CallerPeer, _, OsPid} = Caller = start_peer(),
    try
        _ = peer:call(CallerPeer, erlang, spawn,
                      [teleport, gs_call, [{srv, Node}, {reply_later, x, 60000}, infinity]]),
        Pending = fun() -> peer:call(Peer, teleport_calls, pending, []) end,
        ok = teleport_soak:wait_until(fun() -> Pending() =:= 1 end, 5000),
        teleport_test_util:kill_os_process(OsPid),
        ok = teleport_soak:wait_until(fun() -> Pending() =:= 0 end, 10000)
    after
        teleport_test_util:stop_peer(Caller)
    end.

%% Packets sent and received on the disterl connection to Node.
dist_packets(Node) ->
    [Ctrl] = [C || {N, C} <- erlang:system_info(dist_ctrl), N =:= Node],
    {ok, [{send_cnt, Sent}, {recv_cnt, Got}]} = inet:getstat(Ctrl, [send_cnt, recv_cnt]),
    {Sent, Got}.

%% Bytes received and sent on the disterl connection to Node.
dist_bytes(Node) ->
    [Ctrl] = [C || {N, C} <- erlang:system_info(dist_ctrl), N =:= Node],
    {ok, [{recv_oct, In}, {send_oct, Out}]} = inet:getstat(Ctrl, [recv_oct, send_oct]),
    {In, Out}.
