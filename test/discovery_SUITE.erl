%% Finding a peer's listener, between real nodes started with OTP's `peer' on this machine:
%% a discovery worker that dies still has its callers answered; a pool whose peer's teleport
%% is briefly away keeps its queue while it is looked for again, and is closed (its queue
%% dropped and counted) only when it stays away past the retries.
%%
%% The runner starts distribution if needed; every case starts fresh peers, and
%% end_per_testcase stops them, even after a failure.
-module(discovery_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile([export_all, nowarn_export_all]).

-import(teleport_test_util, [capture_logs/0, wait_log/1]).

-define(PEERS, discovery_SUITE_peers).

suite() ->
    [{timetrap, {seconds, 60}}].

all() ->
    [a_discovery_worker_that_dies_still_answers_every_caller,
     a_teleport_restart_within_the_retries_delivers_everything_queued_in_order,
     a_teleport_gone_past_the_retries_closes_the_pool_and_counts_what_it_dropped,
     a_cookie_fixed_at_runtime_heals_the_pool].

init_per_suite(Config) ->
    Started = teleport_test_util:start_distribution("discovery_ct_"),
    Holder = teleport_test_util:start_tables([{?PEERS, [set]}]),
    [{started_dist, Started}, {peer_table_holder, Holder} | Config].

end_per_suite(Config) ->
    teleport_test_util:reset_teleport(),
    ?config(peer_table_holder, Config) ! stop,
    teleport_test_util:stop_distribution(?config(started_dist, Config)),
    ok.

init_per_testcase(_, Config) ->
    flush(),
    Config.

end_per_testcase(_, _Config) ->
    [teleport_test_util:stop_peer(S) || {_, S} <- ets:tab2list(?PEERS)],
    true = ets:delete_all_objects(?PEERS),
    ok = teleport_test_util:stop_capturing_logs(),
    teleport_test_util:reset_teleport(),
    flush(),
    ok.

%%--------------------------------------------------------------------------------------------
%% A worker that dies

%% The peer runs no teleport, but a process registered there as teleport_server takes the
%% runner's question and never answers (the runner's discovery_timeout is 10 minutes, so
%% nothing but the worker's death can end the wait). Three senders wait for the pool. The
%% worker is killed: every sender gets {error, nodedown} and the log names the reason.
%%
%% Fixed bug: the worker was a bare spawn; had it died, its callers (in
%% gen_server:call(..., infinity)) would have waited for ever.
a_discovery_worker_that_dies_still_answers_every_caller(_Config) ->
    teleport_test_util:restart_teleport([{discovery_timeout, 600000}]),
    {P, Node} = start_peer(#{teleport => false}),
    Self = self(),
    _ = peer:call(P, erlang, spawn, [?MODULE, silent_server, [Self]]),
    receive {silent_server, registered} -> ok after 5000 -> ct:fail(no_silent_server) end,
    capture_logs(),
    Senders = [spawn_link(fun() -> Self ! {sent, I, teleport:send({x, Node}, I)} end)
               || I <- [1, 2, 3]],
    Worker = receive {asked_by, W} -> W after 10000 -> ct:fail(nobody_asked) end,
    ct:pal("discovery worker ~p (senders ~p) asked; killing it", [Worker, Senders]),
    exit(Worker, kill),
    Results = [receive {sent, I, R} -> R after 30000 -> {no_answer, I} end || I <- [1, 2, 3]],
    ?assertEqual(lists:duplicate(3, {error, nodedown}), Results),
    Line = wait_log(fun(T) -> string:find(T, "cannot reach") =/= nomatch end),
    ct:pal("logged: ~ts", [Line]),
    ?assertNotEqual(nomatch, string:find(Line, "died: killed")),
    ?assertNotEqual(nomatch, string:find(Line, atom_to_list(Node))),
    ok.

%% On the peer: stands in for a teleport_server that takes calls and never answers; tells
%% the runner which process asked.
silent_server(Runner) ->
    true = register(teleport_server, self()),
    Runner ! {silent_server, registered},
    silent_loop(Runner).

silent_loop(Runner) ->
    receive
        {'$gen_call', {Pid, _Tag}, listen_info} -> Runner ! {asked_by, Pid}, silent_loop(Runner);
        _ -> silent_loop(Runner)
    end.

%%--------------------------------------------------------------------------------------------
%% A peer's teleport briefly away

%% The peer's teleport application stops (its listener closes, and so do the runner's
%% connections to it). Once none of the runner's connections is up, 100 messages are sent
%% (nothing is written into a socket the peer closed); once the log says the pool was
%% refused, found no teleport behind it and keeps its queue, 100 more. Every send returns
%% ok. The peer's teleport starts again, on another port, within the retries: every
%% message arrives, in order, none dropped, and the log says where the listener was found
%% again.
%%
%% Fixed bug: the first stale notice re-discovered at once, found no teleport there, and
%% closed the pool: what was queued was dropped, and sends meanwhile got {error, nodedown}.
a_teleport_restart_within_the_retries_delivers_everything_queued_in_order(_Config) ->
    teleport_test_util:restart_teleport([]),
    {P, Node, Port0} = start_warm_peer(),
    S0 = node_stats(Node),
    capture_logs(),
    ok = peer:call(P, application, stop, [teleport]),
    ok = wait_until(fun() -> no_connection_up(Node) end, 10000),
    N = 200,
    %% Half before the pool is refused and found to have no teleport behind it, half after
    %% (while it is looked for again).
    Before = [teleport:send({coll, Node}, {seq, I}) || I <- lists:seq(1, N div 2)],
    Kept = wait_log(fun(T) -> string:find(T, "keeps its queue") =/= nomatch end),
    After = [teleport:send({coll, Node}, {seq, I}) || I <- lists:seq(N div 2 + 1, N)],
    Results = Before ++ After,
    ok = peer:call(P, teleport, start, []),
    {ok, Port1} = peer:call(P, teleport_server, listen_port, []),
    ct:pal("peer's teleport back on port ~b (was ~b); pool_info ~p",
           [Port1, Port0, maps:get(Node, teleport_server:pool_info(), none)]),
    ?assertEqual(lists:duplicate(N, ok), Results),
    ?assertNotEqual(Port0, Port1),
    Got = collected(P, N + 1, 20000),
    ?assertEqual([warm_up | [{seq, I} || I <- lists:seq(1, N)]], Got),
    Delta = delta(node_stats(Node), S0),
    ct:pal("stats delta ~p", [Delta]),
    ?assertEqual(0, maps:get(dropped, Delta)),
    ?assertEqual(N, maps:get(msgs_out, Delta)),
    %% The log says where the listener was found again.
    Found = wait_log(fun(T) -> string:find(T, "listener again at") =/= nomatch end),
    ct:pal("logged:~n~ts~n~ts", [Kept, Found]),
    ?assertNotEqual(nomatch, string:find(Found, integer_to_list(Port1))),
    ok.

%% The same, but the peer's teleport stays away: reconnect/2 and connect/1 get the same
%% pool back, the sends are accepted and queued while the pool is looked for again, then
%% the pool is closed, what it queued is counted as dropped, the log says so, and sends get
%% {error, nodedown}. Once the peer's teleport is back, a new pool delivers again.
a_teleport_gone_past_the_retries_closes_the_pool_and_counts_what_it_dropped(_Config) ->
    teleport_test_util:restart_teleport([]),
    {P, Node, _Port0} = start_warm_peer(),
    S0 = node_stats(Node),
    {ok, Pool} = teleport_pools:lookup(Node),
    ok = peer:call(P, application, stop, [teleport]),
    ok = wait_until(fun() -> no_connection_up(Node) end, 10000),
    capture_logs(),
    %% Meanwhile a repair (what a send that got `closed' asks for) and a connect get the
    %% same pool back, at once.
    ?assertEqual({ok, Pool}, teleport_server:reconnect(Node, Pool)),
    ?assertEqual({ok, Pool}, teleport_server:connect(Node)),
    N = 50,
    Results = [teleport:send({coll, Node}, {seq, I}) || I <- lists:seq(1, N)],
    ?assertEqual(lists:duplicate(N, ok), Results),
    ok = wait_until(fun() -> teleport_pools:lookup(Node) =/= {ok, Pool} end, 30000),
    Line = wait_log(fun(T) -> string:find(T, "gave up") =/= nomatch end),
    ct:pal("logged: ~ts", [Line]),
    ?assertNotEqual(nomatch, string:find(Line, atom_to_list(Node))),
    ?assertNotEqual(nomatch, string:find(Line, "teleport is not running on")),
    ?assertEqual(none, teleport_pools:lookup(Node)),
    ok = wait_until(fun() -> maps:get(queued_bytes, node_stats(Node)) =:= 0 end, 5000),
    Delta = delta(node_stats(Node), S0),
    ct:pal("stats delta ~p", [Delta]),
    ?assertEqual(N, maps:get(dropped, Delta)),
    ?assertEqual(0, maps:get(msgs_out, Delta)),
    ?assertEqual({error, nodedown}, teleport:send({coll, Node}, while_away)),
    ok = peer:call(P, teleport, start, []),
    ok = teleport:send({coll, Node}, back),
    ?assertEqual([warm_up, back], collected(P, 2, 20000)),
    ok.

%%--------------------------------------------------------------------------------------------
%% A cookie fixed at runtime

%% An operator gives the runner a wrong cookie for P (erlang:set_cookie/2; disterl, already
%% connected, keeps its connection): the runner's pool to P fails its handshakes, and what is
%% sent meanwhile waits in the pool. The operator puts the right cookie back: the pool heals
%% by itself, without a restart of anything, and every message sent arrives, in order.
%%
%% Fixed bug: the pool took the cookie once, when it was made, and kept proving that one;
%% a wrong cookie fixed at runtime was never picked up, and the pool never healed. Now the
%% cookie is read again at every repair of a refused pool (pool_retarget/4).
a_cookie_fixed_at_runtime_heals_the_pool(_Config) ->
    teleport_test_util:restart_teleport([]),
    {P, Node} = start_peer(#{setup => [{teleport_test_util, start_collector, [coll]}]}),
    Right = erlang:get_cookie(Node),
    %% Disterl connects first, with the right cookie, and stays connected.
    pong = net_adm:ping(Node),
    true = erlang:set_cookie(Node, teleport_wrong_cookie),
    try
        [ok = teleport:send({coll, Node}, I) || I <- lists:seq(1, 50)],
        ok = wait_until(fun() ->
                                [C || C = #{last_error := E} <- pool(Node), is_binary(E)] =/= []
                        end, 10000),
        Errors = [E || #{last_error := E} <- pool(Node), is_binary(E)],
        ct:pal("with the wrong cookie: ~p", [Errors]),
        ?assertEqual([], collected(P, 1, 1000)),
        true = erlang:set_cookie(Node, Right),
        [ok = teleport:send({coll, Node}, I) || I <- lists:seq(51, 60)],
        ?assertEqual(lists:seq(1, 60), collected(P, 60, 15000))
    after
        erlang:set_cookie(Node, Right)
    end,
    ok.

pool(Node) ->
    maps:get(Node, teleport_server:pool_info(), []).

%%--------------------------------------------------------------------------------------------
%% Helpers

%% A peer with a collector registered as `coll', and the runner's pool to it up (one
%% message delivered). Returns the peer, its node and its teleport's port.
start_warm_peer() ->
    {P, Node} = start_peer(#{setup => [{teleport_test_util, start_collector, [coll]}]}),
    {ok, Port} = peer:call(P, teleport_server, listen_port, []),
    ok = teleport:send({coll, Node}, warm_up),
    [warm_up] = collected(P, 1, 10000),
    {P, Node, Port}.

%% What the collector on P got, once it has N messages (or after Timeout ms).
collected(P, N, Timeout) ->
    Got = fun() -> peer:call(P, teleport_test_util, ask, [coll]) end,
    _ = wait_until(fun() -> length(Got()) >= N end, Timeout),
    Got().

no_connection_up(Node) ->
    [C || C = #{state := up} <- maps:get(Node, teleport_server:pool_info(), [])] =:= [].

node_stats(Node) ->
    maps:get(Node, teleport:stats(), #{msgs_out => 0, dropped => 0, queued_bytes => 0}).

delta(After, Before) ->
    maps:map(fun(K, V) -> V - maps:get(K, Before, 0) end, After).

wait_until(Fun, Timeout) ->
    teleport_soak:wait_until(Fun, Timeout).

start_peer(Opts) ->
    Name = peer:random_name(discovery),
    case teleport_test_util:start_peer(Opts#{name => Name, on_start => fun record_peer/1}) of
        {ok, {P, Node, _}} -> {P, Node};
        {error, Reason} -> ct:fail({peer_start_failed, Name, Reason})
    end.

record_peer({Peer, _, _} = Started) ->
    true = ets:insert(?PEERS, {Peer, Started}).

flush() ->
    receive _ -> flush() after 0 -> ok end.
