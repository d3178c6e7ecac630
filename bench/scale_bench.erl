%% @doc What teleport costs per connection: for pools of 1, 64 and 256 connections between two
%% fresh peer nodes, each node's OS threads and RSS before the pool and with all of its
%% connections up, and how often teleport's threads wake up per second while nothing is sent
%% (an idle connection should cost none).
%%
%% Part of `make bench' (ring_bench runs it and prints its table).
-module(scale_bench).

-export([run/1, print/1, json/1, threads_added/2]).

%% How long the idle window for counting wake-ups is.
-define(IDLE_MS, 2000).

%% @doc One measurement per pool size of `scale_pools'.
run(#{scale_pools := Pools} = Cfg) ->
    [measure(Cfg, Pool) || Pool <- Pools].

measure(Cfg, Pool) ->
    ring_bench:step("scale: a pool of ~b connections between two fresh nodes", [Pool]),
    Tag = lists:concat(["rb", os:getpid(), "_scale", Pool]),
    [X, Y] = Ms = ring_bench:boot_peers(Cfg, [{Tag ++ "x", [{pool_size, Pool}]},
                                              {Tag ++ "y", []}]),
    try
        #{node := NX, os_pid := PX} = X,
        #{node := NY, os_pid := PY} = Y,
        true = erpc:call(NX, net_kernel, connect_node, [NY]),
        Before = [snapshot(P) || P <- [PX, PY]],
        Receiver = erpc:call(NY, bench_agent, small_receiver, []),
        Up = erpc:call(NX, bench_agent, open_pool, [NY, Receiver, Pool], 60000),
        %% Let the last handshakes' and acknowledgements' wake-ups pass.
        timer:sleep(500),
        With = [snapshot(P) || P <- [PX, PY]],
        timer:sleep(?IDLE_MS),
        Idle = [snapshot(P) || P <- [PX, PY]],
        Receiver ! stop,
        Wakeups = lists:sum([maps:get(switches, I) - maps:get(switches, W)
                             || {W, I} <- lists:zip(With, Idle)]) * 1000 / ?IDLE_MS,
        R = #{connections => Pool, connections_up => Up,
              sender => node_result(hd(Before), hd(With), Pool),
              receiver => node_result(lists:last(Before), lists:last(With), Pool),
              idle_wakeups_per_s => Wakeups},
        ring_bench:step("scale ~b: ~b up; threads ~b / ~b (sender / receiver), "
                        "~.1f idle wake-ups/s", [Pool, Up, maps:get(threads, hd(With)),
                                                 maps:get(threads, lists:last(With)), Wakeups]),
        R
    after
        [catch peer:stop(P) || #{peer := P} <- Ms]
    end.

node_result(Before, With, Pool) ->
    #{threads => maps:get(threads, With),
      teleport_threads => maps:get(teleport_threads, With),
      threads_added => maps:get(threads, With) - maps:get(threads, Before),
      rss => maps:get(rss, With),
      rss_per_connection => (maps:get(rss, With) - maps:get(rss, Before)) / Pool}.

%% Threads, teleport's among them, their context switches so far, and RSS of an OS process.
snapshot(OsPid) ->
    Dir = "/proc/" ++ OsPid ++ "/task",
    {ok, Tids} = file:list_dir(Dir),
    Threads = [thread(filename:join(Dir, T)) || T <- Tids],
    Ours = [S || {"teleport_" ++ _, S} <- Threads],
    #{threads => length(Threads), teleport_threads => length(Ours),
      switches => lists:sum(Ours),
      rss => maps:get(vmrss, ring_bench:proc_status(OsPid), 0)}.

%% {Name, ContextSwitches} of a thread (a vanished thread counts as nothing).
thread(Dir) ->
    case {file:read_file(filename:join(Dir, "comm")), file:read_file(filename:join(Dir, "status"))} of
        {{ok, Comm}, {ok, Status}} ->
            Switches = [list_to_integer(V)
                        || {match, [V]} <- [re:run(L, "^(?:non)?voluntary_ctxt_switches:\\s+(\\d+)",
                                                   [{capture, [1], list}])
                                            || L <- string:split(Status, "\n", all)]],
            {string:trim(binary_to_list(Comm)), lists:sum(Switches)};
        _ ->
            {"", 0}
    end.

%% @doc The OS threads teleport added to the node that has the pool of `Pool' connections,
%% or `undefined' when that size was not measured.
threads_added(Results, Pool) ->
    case [R || #{connections := P} = R <- Results, P =:= Pool] of
        [#{sender := #{threads_added := S}, receiver := #{threads_added := R}}] -> max(S, R);
        [] -> undefined
    end.

%% @doc The table of the summary.
print(Results) ->
    io:format("~nconnections per node pair: OS threads (teleport's) and RSS per node, idle wake-ups~n"),
    io:format("  ~s~n", [lists:duplicate(96, $-)]),
    io:format("  ~5s ~4s | ~18s ~18s | ~16s ~16s | ~s~n",
              ["conns", "up", "sender threads", "receiver threads", "sender RSS/conn",
               "recv RSS/conn", "idle wake-ups/s (both)"]),
    [io:format("  ~5b ~4b | ~18s ~18s | ~16s ~16s | ~.1f~n",
               [P, Up, threads(S), threads(R), kb(S), kb(R), W])
     || #{connections := P, connections_up := Up, sender := S, receiver := R,
          idle_wakeups_per_s := W} <- Results],
    ok.

threads(#{threads := T, teleport_threads := O, threads_added := A}) ->
    io_lib:format("~b (~b), +~b", [T, O, A]).

kb(#{rss_per_connection := B}) ->
    bench_report:fmt_float(B / 1024, 1) ++ " KB".

%% @doc The scenario for latest.json.
json(Results) ->
    #{id => connections_scale,
      description => "a pool of N connections between two fresh nodes: threads and RSS per "
                     "node with all connections up (threads_added and rss_per_connection "
                     "against the same node before the pool), and the context switches per "
                     "second of teleport's threads on both nodes while idle",
      by_connections => Results}.
