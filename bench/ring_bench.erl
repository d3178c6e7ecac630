%% @doc The transport benchmark behind `make bench': teleport against distributed Erlang
%% (disterl, `!' and `gen_server:call'), on peer nodes of this machine.
%%
%% Scenarios, in this order:
%%   ring    The 2015 ring: RING_NODES nodes x RING_WORKERS workers; every worker sends its
%%           own RING_BYTES random binary around the ring (worker I on node K forwards to
%%           worker I on node K+1; the last node sends `done' with the payload's hash to the
%%           worker that started it), all workers at once. Two node sets of the same size:
%%           set D carries the ring over disterl, set T over teleport, so each set's VmHWM
%%           is the peak RSS of one transport. Rounds alternate D, T / T, D.
%%           Per round: the wall time (from the first `go' to the last `done', measured on
%%           this node), every worker's own trip time, and the CPU time (utime + stime) the
%%           set's 6 OS processes used.
%%   ping    Disterl's own latency: on each set, node 1 makes a tiny gen_server:call over
%%           disterl to node 2 every 10 ms during the whole ring phase, each from a fresh
%%           process (open loop: a slow ping does not delay the next). Samples are sorted
%%           into idle (a quiet window before the ring rounds), bulk on disterl (set D,
%%           during its rounds) and bulk on teleport (set T, during its rounds). Outside
%%           the idle window only the set running a round pings.
%%   rss     Peak RSS per node: VmHWM of every node of each set, read after the ring phase
%%           (before anything else runs on them), and VmRSS sampled every 100 ms.
%%   small   8 sender/receiver pairs between nodes 1 and 2 of set T, 100-byte messages
%%           (external format size), SMALL_COUNT per sender; the receivers count and ack
%%           at the end; msgs/s from releasing the senders to the last ack.
%%   calls   4 callers on node 1 of set T, one echo server each on node 2, each calling in
%%           a loop for CALL_MS: gen_server:call against teleport:gs_call, 1 KB and 1 MB
%%           replies. calls/s, and per-call latency percentiles over all measured rounds.
%%           Then beside bulk: two processes of node 1 send 10 MB messages over disterl to
%%           node 2 as fast as they can while one caller calls for CALL_MS with 1 KB
%%           replies, each transport in turn: the latency of a call queued behind disterl's
%%           bulk, or not.
%%   stream  The physical limit: raw loopback TCP (native/loopback_bench: a sender thread
%%           writes STREAM_FRAMES frames of 10 MB with write_all to a receiver thread), then
%%           teleport with pool_size = 1 between two fresh nodes, one sender, the same
%%           number of 10 MB messages; disterl between the same nodes for reference.
%%
%% Warm-up: one round of each transport per scenario (WARMUP_ROUNDS) runs before the
%% measured rounds and is excluded from every statistic; the ring is also primed (a tiny
%% message around it over the transport of the set) before anything is timed.
%%
%% Results: a table on stdout, bench/results/latest.json and bench/results/latest.svg.
%% Sizes and round counts come from environment variables (see config/0); the defaults
%% are the full size; a run takes about 2.5 minutes on a 2-core machine.
-module(ring_bench).

-export([main/0, main/1]).
%% Shared with net_bench (the same benchmark over hosts in network namespaces).
-export([run_ring/4, check_ring/3, cpu_ticks/1, machine_info/0, loadavg/0, results_dir/0,
         alternating/3]).
%% Shared with scale_bench.
-export([boot_peers/2, proc_status/1, step/2, env_int/2]).

-define(MB, 1000000).
-define(MiB, 1048576).

main() ->
    main(#{}).

main(Opts) ->
    put(t0, now_ms()),
    ok = ensure_dist(),
    ok = ensure_loaded(),
    Cfg = config(),
    Machine = machine_info(),
    print_header(Machine, Cfg),
    Nodes = start_nodes(Cfg),
    Results0 = try
                  Ring = ring_phase(Cfg, Nodes),
                  Small = small_phase(Cfg, Nodes),
                  Calls = calls_phase(Cfg, Nodes),
                  Sizes = sizes_phase(Cfg, Nodes),
                  Stream = stream_phase(Cfg, Nodes),
                  #{ring => Ring, small => Small, calls => Calls, sizes => Sizes,
                    stream => Stream}
              after
                  step("stopping the peer nodes", []),
                  stop_nodes(Nodes)
              end,
    %% On fresh nodes of their own, once the others are gone.
    Results1 = Results0#{scale => scale_bench:run(Cfg)},
    %% On nodes of their own too, whose disterl runs over TLS.
    Tls = tls_bench:run(Cfg),
    Results = Results1#{tls => Tls},
    Elapsed = (now_ms() - get(t0)) / 1000,
    Machine1 = Machine#{loadavg_end => loadavg()},
    PlainStream = bench_report:median([G || #{transport := teleport, gb_per_s := G}
                                                <- maps:get(rounds, maps:get(stream, Results))]),
    Targets = targets(Results) ++ tls_bench:targets(Tls, PlainStream),
    print_summary(Cfg, Results, Targets),
    io:format("~ntotal run time: ~.1f s (machine load average at start ~s, at end ~s)~n",
              [Elapsed, maps:get(loadavg_start, Machine), maps:get(loadavg_end, Machine1)]),
    Dir = maps:get(dir, Opts, results_dir()),
    Json = filename:join(Dir, "latest.json"),
    Svg = filename:join(Dir, "latest.svg"),
    ok = filelib:ensure_dir(Json),
    ok = file:write_file(Json, [bench_report:json(to_json(Machine1, Cfg, Results, Targets,
                                                          Elapsed)), $\n]),
    ok = file:write_file(Svg, chart(Machine1, Cfg, Results)),
    io:format("results written to ~ts and ~ts~n", [Json, Svg]),
    ok.

%%% ----------------------------------------------------------------------------------------
%%% Configuration

config() ->
    Quick = os:getenv("BENCH_QUICK") =:= "1",
    Q = fun(Full, Small) -> case Quick of true -> Small; false -> Full end end,
    #{quick => Quick,
      ring_nodes => env_int("RING_NODES", 6),
      ring_workers => env_int("RING_WORKERS", Q(8, 2)),
      ring_bytes => env_int("RING_BYTES", Q(10 * ?MiB, ?MiB)),
      ring_rounds => env_int("RING_ROUNDS", Q(15, 2)),
      warmup_rounds => env_int("WARMUP_ROUNDS", 1),
      idle_ms => env_int("IDLE_MS", Q(8000, 1000)),
      ping_interval_ms => 10,
      small_pairs => 8,
      small_msg_bytes => 100,
      small_count => env_int("SMALL_COUNT", Q(25000, 2000)),
      small_rounds => env_int("SMALL_ROUNDS", Q(9, 2)),
      callers => env_int("CALLERS", 4),
      call_ms => env_int("CALL_MS", Q(1000, 200)),
      call_sizes => [1024, ?MiB],
      call_rounds => env_int("CALL_ROUNDS", Q(7, 2)),
      stream_frames => env_int("STREAM_FRAMES", Q(100, 10)),
      stream_bytes => 10 * ?MiB,
      stream_rounds => env_int("STREAM_ROUNDS", Q(9, 2)),
      sizes => [100, 1024, 16 * 1024, 64 * 1024, 256 * 1024, ?MiB, 10 * ?MiB, 100 * ?MiB],
      %% Per size and round: about this many bytes, at least 3 and at most 50 000 messages.
      sizes_bytes => env_int("SIZES_BYTES", Q(200 * ?MiB, 20 * ?MiB)),
      sizes_rounds => env_int("SIZES_ROUNDS", Q(3, 1)),
      scale_pools => Q([1, 64, 256], [1, 16]),
      %% teleport's thread_nice on every node; unset: teleport's default.
      thread_nice => env_int("THREAD_NICE", default)}.

env_int(Name, Default) ->
    case os:getenv(Name) of
        false -> Default;
        "" -> Default;
        S -> list_to_integer(string:trim(S))
    end.

%%% ----------------------------------------------------------------------------------------
%%% Nodes

ensure_dist() ->
    case node() of
        nonode@nohost ->
            _ = os:cmd("epmd -daemon"),
            Name = list_to_atom("ring_bench_" ++ os:getpid()),
            {ok, _} = net_kernel:start([Name, shortnames]),
            ok;
        _ ->
            ok
    end.

ensure_loaded() ->
    case code:ensure_loaded(teleport_nif) of
        {module, teleport_nif} -> ok;
        Error -> erlang:error({teleport_nif_not_loaded, Error})
    end.

%% Set D (disterl ring), set T (teleport ring), and the pair S (pool_size = 1).
start_nodes(#{ring_nodes := N} = Cfg) ->
    step("starting ~b peer nodes (2 ring sets of ~b, 1 pair with pool_size = 1)",
         [2 * N + 2, N]),
    Specs = [{d, I, []} || I <- lists:seq(1, N)] ++ [{t, I, []} || I <- lists:seq(1, N)]
        ++ [{s, I, [{pool_size, 1}]} || I <- [1, 2]],
    Booted = boot_peers(Cfg, [{lists:concat(["rb", os:getpid(), "_", Set, I]), Env}
                              || {Set, I, Env} <- Specs]),
    All = [{Set, M#{index => I}} || {{Set, I, _}, M} <- lists:zip(Specs, Booted)],
    Nodes = #{d => [M || {d, M} <- All], t => [M || {t, M} <- All],
              s => [M || {s, M} <- All]},
    step("nodes up: ~s", [string:join([atom_to_list(maps:get(node, M))
                                       || {_, M} <- All], ", ")]),
    Nodes.

%% Boots peer nodes of this machine at once, each running teleport with the benchmark's
%% common environment (THREAD_NICE) and its own: [{Name, Env}] -> [#{peer, node, os_pid}],
%% in the same order. connect_all is false: the sets stay apart (no global mesh).
boot_peers(#{thread_nice := Nice}, Specs) ->
    Common = case Nice of
                 default -> [];
                 _ -> [{thread_nice, Nice}]
             end,
    Cookie = atom_to_list(erlang:get_cookie()),
    Args = ["-setcookie", Cookie, "-connect_all", "false", "-pa" | code:get_path()],
    Parent = self(),
    Pids = [spawn(fun() ->
                          Parent ! {booted, self(), peer:start(#{name => list_to_atom(Name),
                                                                 args => Args})}
                  end) || {Name, _} <- Specs],
    Booted = [receive {booted, P, R} -> R after 120000 -> error(peer_boot_timeout) end
              || P <- Pids],
    [begin
         {ok, Peer, Node} = R,
         [ok = erpc:call(Node, application, set_env, [teleport, K, V])
          || {K, V} <- Common ++ Env],
         ok = erpc:call(Node, teleport, start, []),
         #{os_pid := OsPid} = erpc:call(Node, bench_agent, node_info, []),
         #{peer => Peer, node => Node, os_pid => OsPid}
     end || {{_, Env}, R} <- lists:zip(Specs, Booted)].

stop_nodes(Nodes) ->
    [catch peer:stop(P) || {_, Ms} <- maps:to_list(Nodes), #{peer := P} <- Ms],
    ok.

nodes_of(Ms) -> [N || #{node := N} <- Ms].

set_of(disterl, #{d := D}) -> D;
set_of(teleport, #{t := T}) -> T.

%%% ----------------------------------------------------------------------------------------
%%% The ring (with the disterl pings and the RSS samples running alongside)

ring_phase(Cfg, Nodes) ->
    #{ring_workers := W, ring_bytes := Bytes, ring_rounds := Rounds,
      warmup_rounds := Warmup, idle_ms := IdleMs, ping_interval_ms := Interval} = Cfg,
    Transports = [disterl, teleport],
    step("ring: starting ~b workers per node, pingers, RSS sampler", [W]),
    Workers = maps:from_list(
                [{T, begin
                         Set = nodes_of(set_of(T, Nodes)),
                         [begin
                              {ok, _} = erpc:call(N, bench_agent, start_ring_worker, [I, Set]),
                              {N, I}
                          end || N <- Set, I <- lists:seq(1, W)]
                     end} || T <- Transports]),
    Pingers = maps:from_list(
                [{T, begin
                         [N1, N2 | _] = nodes_of(set_of(T, Nodes)),
                         {ok, _} = erpc:call(N2, bench_agent, start_ping_server, []),
                         {ok, P} = erpc:call(N1, bench_agent, start_pinger,
                                             [{bench_ping, N2}, Interval]),
                         P
                     end} || T <- Transports]),
    RssNodes = [{T, N, OsPid} || T <- Transports, #{node := N, os_pid := OsPid} <- set_of(T, Nodes)],
    Sampler = start_sampler(RssNodes, 100),
    step("ring: priming (a tiny message around each ring over its transport)", []),
    [begin
         {_, Primed} = run_ring(maps:get(T, Workers), T, prime, 60000),
         check_ring(T, Primed, maps:get(T, Workers))
     end || T <- Transports],
    step("ring: making the payloads (~s random per worker)", [bench_report:fmt_mb(Bytes)]),
    [ok = gen_server:call({bench_agent:ring_name(I), N}, {prepare, Bytes}, 60000)
     || T <- Transports, {N, I} <- maps:get(T, Workers)],
    [gc_set(set_of(T, Nodes)) || T <- Transports],
    Baseline = maps:from_list([{N, proc_status(OsPid)} || {_, N, OsPid} <- RssNodes]),
    step("ring: idle window of ~b ms (pings only)", [IdleMs]),
    IdleStart = os_us(),
    timer:sleep(IdleMs),
    IdleWindow = {IdleStart, os_us()},
    %% From now on only the set running a round pings (an idle set's pings would wake its
    %% schedulers and take CPU from the other set).
    [ok = erpc:call(node(P), bench_agent, pinger_active, [P, false]) || P <- maps:values(Pingers)],
    timer:sleep(100),
    ClkTck = list_to_integer(string:trim(os:cmd("getconf CLK_TCK"))),
    Timeout = 120000 + Bytes div 1000 * length(maps:get(disterl, Workers)) div 10,
    Run = fun(T, Label) ->
                  gc_set(set_of(T, Nodes)),
                  Pinger = maps:get(T, Pingers),
                  ok = erpc:call(node(Pinger), bench_agent, pinger_active, [Pinger, true]),
                  timer:sleep(300),
                  OsPids = [OsPid || #{os_pid := OsPid} <- set_of(T, Nodes)],
                  Cpu0 = cpu_ticks(OsPids),
                  Start = os_us(),
                  {WallUs, Res} = run_ring(maps:get(T, Workers), T, bulk, Timeout),
                  End = os_us(),
                  CpuS = (cpu_ticks(OsPids) - Cpu0) / ClkTck,
                  ok = erpc:call(node(Pinger), bench_agent, pinger_active, [Pinger, false]),
                  check_ring(T, Res, maps:get(T, Workers)),
                  Us = [U || #{us := U} <- Res],
                  S = bench_report:stats(Us),
                  step("ring ~s ~-8s ~s per round (~s CPU); per worker p50 ~s, max ~s",
                       [Label, T, bench_report:fmt_s(WallUs / 1.0e6), bench_report:fmt_s(CpuS),
                        bench_report:fmt_us(maps:get(p50, S)), bench_report:fmt_us(maps:get(max, S))]),
                  #{transport => T, wall_s => WallUs / 1.0e6, window => {Start, End},
                    cpu_s => CpuS, worker_us => Us, worker_stats => S}
          end,
    _ = [Run(T, io_lib:format("warm-up ~b/~b", [R, Warmup]))
         || R <- lists:seq(1, Warmup), T <- Transports],
    Measured = lists:append(
                 [[maps:put(round, R, Run(T, io_lib:format("round ~b/~b", [R, Rounds])))
                   || T <- alternate(R, Transports)] || R <- lists:seq(1, Rounds)]),
    step("ring: collecting pings, RSS and teleport counters", []),
    PingSamples = maps:map(fun(_T, P) -> pinger_samples(P) end, Pingers),
    Samples = stop_sampler(Sampler),
    Hwm = maps:from_list([{N, proc_status(OsPid)} || {_, N, OsPid} <- RssNodes]),
    [erpc:call(node(P), bench_agent, stop, [P]) || P <- maps:values(Pingers)],
    [erpc:call(N, bench_agent, stop, [bench_ping]) || T <- Transports,
                                                      N <- lists:sublist(nodes_of(set_of(T, Nodes)), 2)],
    TeleportStats = [{N, erpc:call(N, teleport, stats, [])} || N <- nodes_of(set_of(teleport, Nodes))],
    %% Free the payloads: the later scenarios use nodes of set T.
    [gen_server:stop({bench_agent:ring_name(I), N}) || T <- Transports, {N, I} <- maps:get(T, Workers)],
    Windows = [{T, W1} || #{transport := T, window := W1} <- Measured],
    #{rounds => Measured,
      ping => ping_summary(PingSamples, IdleWindow, Windows),
      rss => rss_summary(RssNodes, Baseline, Hwm, Samples),
      teleport_stats => TeleportStats}.

%% ABBA: odd rounds disterl first, even rounds teleport first.
alternate(R, Ts) when R rem 2 =:= 1 -> Ts;
alternate(_R, Ts) -> lists:reverse(Ts).

%% Runs Run(Transport, Label) Warmup times for each transport (results not kept), then
%% Rounds rounds of both, alternating which goes first, each result tagged with its round.
-spec alternating(fun((disterl | teleport, iodata()) -> map()), non_neg_integer(),
                  pos_integer()) -> [map()].
alternating(Run, Warmup, Rounds) ->
    _ = [Run(T, io_lib:format("warm-up ~b/~b", [R, Warmup]))
         || R <- lists:seq(1, Warmup), T <- [disterl, teleport]],
    lists:append([[maps:put(round, R, Run(T, io_lib:format("round ~b/~b", [R, Rounds])))
                   || T <- alternate(R, [disterl, teleport])]
                  || R <- lists:seq(1, Rounds)]).

gc_set(Ms) ->
    [ok = erpc:call(N, bench_agent, gc_all, []) || N <- nodes_of(Ms)],
    ok.

%% Starts every worker (as close together as this node can) and collects their reports.
run_ring(Workers, T, Kind, Timeout) ->
    Ref = make_ref(),
    T0 = mono_us(),
    [gen_server:cast({bench_agent:ring_name(I), N}, {go, T, Kind, self(), Ref})
     || {N, I} <- Workers],
    Results = [receive
                   {ring_result, Ref, Result} -> Result
               after Timeout ->
                       erlang:error({ring_timeout, T, Kind})
               end || _ <- Workers],
    {mono_us() - T0, Results}.

check_ring(T, Results, Workers) ->
    Got = lists:sort([{N, I} || #{node := N, index := I} <- Results]),
    case Got =:= lists:sort(Workers) of
        true -> ok;
        false -> erlang:error({ring_missing_workers, T, Workers -- Got})
    end,
    case [R || #{hash_ok := false} = R <- Results] of
        [] -> ok;
        Bad -> erlang:error({ring_payload_corrupted, T, Bad})
    end.

pinger_samples(P) ->
    erpc:call(node(P), bench_agent, pinger_samples, [P], 60000).

%% Sorts the ping samples into idle, bulk on disterl (set D's pinger during set D's rounds)
%% and bulk on teleport (set T's during set T's).
ping_summary(Samples, {IdleStart, IdleEnd}, Windows) ->
    In = fun(T, Ss) -> [S || {Due, _, _} = S <- Ss,
                             lists:any(fun({T1, {A, B}}) -> T1 =:= T andalso Due >= A andalso Due =< B end,
                                       Windows)]
         end,
    Idle = fun(Ss) -> [S || {Due, _, _} = S <- Ss, Due >= IdleStart, Due =< IdleEnd] end,
    D = maps:get(disterl, Samples),
    T = maps:get(teleport, Samples),
    Conds = [{idle, Idle(D) ++ Idle(T)},
             {idle_set_d, Idle(D)},
             {idle_set_t, Idle(T)},
             {bulk_on_disterl, In(disterl, D)},
             {bulk_on_teleport, In(teleport, T)}],
    [{C, #{latency_us => bench_report:stats([L || {_, L, _} <- Ss]),
           ticker_late_us => bench_report:stats([Late || {_, _, Late} <- Ss])}} || {C, Ss} <- Conds].

%% utime + stime of OS processes, in clock ticks.
cpu_ticks(OsPids) ->
    lists:sum([case file:read_file("/proc/" ++ P ++ "/stat") of
                   {ok, Text} ->
                       [_, After] = string:split(Text, ")", trailing),
                       Fields = string:lexemes(After, " "),
                       binary_to_integer(lists:nth(12, Fields)) + binary_to_integer(lists:nth(13, Fields));
                   _ ->
                       0
               end || P <- OsPids]).

%%% RSS

start_sampler(RssNodes, IntervalMs) ->
    Parent = self(),
    spawn_link(fun() -> sampler(Parent, RssNodes, IntervalMs, []) end).

sampler(Parent, RssNodes, IntervalMs, Acc) ->
    receive
        {stop, Ref} -> Parent ! {Ref, Acc}
    after IntervalMs ->
            Now = os_us(),
            New = [{N, Now, maps:get(vmrss, proc_status(OsPid), 0)} || {_, N, OsPid} <- RssNodes],
            sampler(Parent, RssNodes, IntervalMs, New ++ Acc)
    end.

stop_sampler(Pid) ->
    Ref = make_ref(),
    Pid ! {stop, Ref},
    receive {Ref, Samples} -> Samples after 10000 -> [] end.

%% VmRSS and VmHWM of an OS process, in bytes.
proc_status(OsPid) ->
    case file:read_file("/proc/" ++ OsPid ++ "/status") of
        {ok, Text} ->
            maps:from_list(
              [{list_to_atom(string:lowercase(K)), list_to_integer(V) * 1024}
               || {match, [K, V]} <- [re:run(Line, "^(VmRSS|VmHWM):\\s+(\\d+) kB",
                                             [{capture, [1, 2], list}])
                                      || Line <- string:split(Text, "\n", all)]]);
        _ ->
            #{}
    end.

rss_summary(RssNodes, Baseline, Hwm, Samples) ->
    maps:from_list(
      [{T, begin
               Per = [#{node => N,
                        baseline_rss => maps:get(vmrss, maps:get(N, Baseline), 0),
                        vmhwm => maps:get(vmhwm, maps:get(N, Hwm), 0),
                        sampled_peak_rss => lists:max([0 | [R || {N1, _, R} <- Samples, N1 =:= N]])}
                      || {T1, N, _} <- RssNodes, T1 =:= T],
               Hwms = [H || #{vmhwm := H} <- Per],
               Peaks = [P || #{sampled_peak_rss := P} <- Per],
               #{per_node => Per,
                 vmhwm_max => lists:max(Hwms), vmhwm_min => lists:min(Hwms),
                 vmhwm_median => bench_report:median(Hwms),
                 vmhwm_mean => lists:sum(Hwms) / length(Hwms),
                 vmhwm_sum => lists:sum(Hwms),
                 sampled_peak_max => lists:max(Peaks),
                 sampled_peak_sum => lists:sum(Peaks)}
           end} || T <- [disterl, teleport]]).

%%% ----------------------------------------------------------------------------------------
%%% Small messages

small_phase(Cfg, #{t := [#{node := A}, #{node := B} | _]}) ->
    #{small_pairs := Pairs, small_msg_bytes := MsgBytes, small_count := Count,
      small_rounds := Rounds, warmup_rounds := Warmup} = Cfg,
    step("small messages: ~b pairs ~s -> ~s, ~b messages of ~b bytes per sender",
         [Pairs, A, B, Count, MsgBytes]),
    Receivers = [erpc:call(B, bench_agent, small_receiver, []) || _ <- lists:seq(1, Pairs)],
    Msg = small_msg(MsgBytes),
    Run = fun(T, Label) ->
                  erpc:call(A, bench_agent, gc_all, []),
                  {Us, Acks} = erpc:call(A, bench_agent, small_run, [T, Receivers, Count, Msg],
                                         300000),
                  [erlang:error({small_lost_messages, T, Acks}) || N <- Acks, N =/= Count],
                  Rate = Pairs * Count / (Us / 1.0e6),
                  step("small ~s ~-8s ~s msgs/s (~s)",
                       [Label, T, bench_report:fmt_rate(Rate), bench_report:fmt_us(Us)]),
                  #{transport => T, msgs_per_s => Rate, elapsed_us => Us}
          end,
    Measured = alternating(Run, Warmup, Rounds),
    [R ! stop || R <- Receivers],
    #{rounds => Measured, message_bytes => byte_size(term_to_binary(Msg)),
      message => "{m, <<random bytes>>}"}.

%% `{m, Bin}' of exactly `Bytes' bytes in the external format.
small_msg(Bytes) ->
    bench_agent:message(Bytes).

%%% ----------------------------------------------------------------------------------------
%%% One sender, one receiver, message sizes from 100 B to 100 MB

sizes_phase(Cfg, #{t := [#{node := A}, #{node := B} | _]}) ->
    #{sizes := Sizes, sizes_bytes := Budget, sizes_rounds := Rounds,
      warmup_rounds := Warmup} = Cfg,
    step("sizes: one sender on ~s, one receiver on ~s, about ~s per size and round",
         [A, B, bench_report:fmt_mb(Budget)]),
    Receiver = erpc:call(B, bench_agent, small_receiver, []),
    Results = [{Size, size_rounds(A, Receiver, Size, Budget, Rounds, Warmup)} || Size <- Sizes],
    Receiver ! stop,
    #{by_size => Results}.

size_rounds(A, Receiver, Size, Budget, Rounds, Warmup) ->
    Count = max(3, min(50000, Budget div Size)),
    Run = fun(T, Label) ->
                  erpc:call(A, bench_agent, gc_all, []),
                  {Us, Acks} = erpc:call(A, bench_agent, small_run,
                                         [T, [Receiver], Count, {message, Size}], 300000),
                  [erlang:error({sizes_lost_messages, T, Size, Acks}) || N <- Acks, N =/= Count],
                  MBps = Count * Size / Us,
                  step("sizes ~s ~s ~-8s ~b msgs, ~s MB/s",
                       [size_label(Size), Label, T, Count, bench_report:fmt_float(MBps, 1)]),
                  #{transport => T, mb_per_s => MBps, count => Count, elapsed_us => Us}
          end,
    alternating(Run, Warmup, Rounds).

%%% ----------------------------------------------------------------------------------------
%%% Calls

calls_phase(Cfg, #{t := [#{node := A}, #{node := B} | _]}) ->
    #{callers := C, call_ms := Ms, call_sizes := Sizes, call_rounds := Rounds,
      warmup_rounds := Warmup} = Cfg,
    Servers = [begin
                   Name = list_to_atom("bench_echo_" ++ integer_to_list(I)),
                   {ok, _} = erpc:call(B, bench_agent, start_echo, [Name, Sizes]),
                   {Name, B}
               end || I <- lists:seq(1, C)],
    Results = [{Size, calls_size(A, B, Servers, Size, Ms, Rounds, Warmup)} || Size <- Sizes],
    Beside = calls_beside_bulk(A, B, hd(Servers), Ms),
    [erpc:call(B, bench_agent, stop, [Name]) || {Name, _} <- Servers],
    #{callers => C, call_ms => Ms, by_size => Results, beside_bulk => Beside}.

%% One caller with 1 KB replies while node A floods node B with 10 MB messages over disterl:
%% [{Transport, Latency stats}].
calls_beside_bulk(A, B, Server, Ms) ->
    step("calls beside bulk: 2 senders of 10 MB over disterl ~s -> ~s, 1 caller, 1 KB replies",
         [A, B]),
    Rcvs = [erpc:call(B, bench_agent, timed_receiver, []) || _ <- [1, 2]],
    Flood = erpc:call(A, bench_agent, flood_start, [disterl, Rcvs, 10 * ?MiB]),
    timer:sleep(200),
    Res = [begin
               {_Us, N, Lats} = erpc:call(A, bench_agent, call_run,
                                          [T, [Server], {get, 1024}, Ms], 300000),
               S = bench_report:stats(Lats),
               step("calls beside bulk ~-8s ~b calls, latency p50 ~s p99 ~s",
                    [T, N, bench_report:fmt_us(maps:get(p50, S)),
                     bench_report:fmt_us(maps:get(p99, S))]),
               {T, S}
           end || T <- [disterl, teleport]],
    _ = erpc:call(A, bench_agent, flood_stop, [Flood], 300000),
    [R ! stop || R <- Rcvs],
    Res.

calls_size(A, B, Servers, Size, Ms, Rounds, Warmup) ->
    step("calls: ~b callers on ~s, servers on ~s, ~s replies, ~b ms per round",
         [length(Servers), A, B, size_label(Size), Ms]),
    Run = fun(T, Label, Dur) ->
                  erpc:call(A, bench_agent, gc_all, []),
                  {Us, N, Lats} = erpc:call(A, bench_agent, call_run,
                                            [T, Servers, {get, Size}, Dur], 300000),
                  Rate = N / (Us / 1.0e6),
                  S = bench_report:stats(Lats),
                  step("calls ~s ~s ~-8s ~s calls/s, latency p50 ~s p99 ~s",
                       [size_label(Size), Label, T, bench_report:fmt_rate(Rate),
                        bench_report:fmt_us(maps:get(p50, S)), bench_report:fmt_us(maps:get(p99, S))]),
                  #{transport => T, calls_per_s => Rate, calls => N, elapsed_us => Us,
                    latencies_us => Lats}
          end,
    _ = [Run(T, io_lib:format("warm-up ~b/~b", [R, Warmup]), max(200, Ms div 3))
         || R <- lists:seq(1, Warmup), T <- [disterl, teleport]],
    Measured = lists:append([[maps:put(round, R, Run(T, io_lib:format("round ~b/~b", [R, Rounds]), Ms))
                              || T <- alternate(R, [disterl, teleport])]
                             || R <- lists:seq(1, Rounds)]),
    Measured.

size_label(N) when N >= ?MiB, N rem ?MiB =:= 0 -> integer_to_list(N div ?MiB) ++ " MB";
size_label(N) when N >= 1024, N rem 1024 =:= 0 -> integer_to_list(N div 1024) ++ " KB";
size_label(N) -> integer_to_list(N) ++ " B".

%%% ----------------------------------------------------------------------------------------
%%% One stream: raw loopback TCP, teleport with pool_size = 1, disterl

stream_phase(Cfg, #{s := [#{node := A}, #{node := B}]}) ->
    #{stream_frames := F, stream_bytes := Size, stream_rounds := Rounds,
      warmup_rounds := Warmup} = Cfg,
    Bin = loopback_bin(),
    step("stream: ~b x ~s messages, one sender; raw TCP (~ts), teleport pool_size = 1 "
         "~s -> ~s, disterl", [F, bench_report:fmt_mb(Size), Bin, A, B]),
    Kinds = case filelib:is_regular(Bin) of
                true -> [raw, teleport, disterl];
                false ->
                    step("stream: ~ts is missing (make bench builds it): raw TCP skipped", [Bin]),
                    [teleport, disterl]
            end,
    Run = fun(K, Label) ->
                  Gbps = stream_once(K, Bin, A, B, F, Size),
                  step("stream ~s ~-8s ~s GB/s", [Label, K, bench_report:fmt_float(Gbps, 3)]),
                  #{transport => K, gb_per_s => Gbps}
          end,
    _ = [Run(K, io_lib:format("warm-up ~b/~b", [R, Warmup]))
         || R <- lists:seq(1, Warmup), K <- Kinds],
    Measured = lists:append([[maps:put(round, R, Run(K, io_lib:format("round ~b/~b", [R, Rounds])))
                              || K <- rotate(R, Kinds)] || R <- lists:seq(1, Rounds)]),
    Info = [{N, erpc:call(N, teleport_server, pool_info, [])} || N <- [A]],
    #{rounds => Measured, frames => F, frame_bytes => Size, pool_info_after => Info,
      loopback_binary => Bin}.

rotate(R, L) ->
    K = (R - 1) rem length(L),
    lists:nthtail(K, L) ++ lists:sublist(L, K).

stream_once(raw, Bin, _A, _B, F, Size) ->
    Out = os:cmd(lists:flatten(io_lib:format("~ts --frames ~b --size ~b --rounds 1",
                                             [Bin, F, Size]))),
    case re:run(Out, "\"rounds\":\\[([0-9.]+)\\]", [{capture, [1], list}]) of
        {match, [G]} -> list_to_float(G);
        nomatch -> erlang:error({loopback_bench_failed, Out})
    end;
stream_once(T, _Bin, A, B, F, Size) ->
    erpc:call(A, bench_agent, gc_all, []),
    erpc:call(B, bench_agent, gc_all, []),
    {ok, Rcv} = erpc:call(B, bench_agent, stream_receiver, [T, F]),
    {Us, Got} = erpc:call(A, bench_agent, stream_run, [T, Rcv, F, Size], 300000),
    case Got =:= F * Size of
        true -> Got / Us / 1000;
        false -> erlang:error({stream_lost_bytes, T, Got, F * Size})
    end.

loopback_bin() ->
    case os:getenv("LOOPBACK_BENCH") of
        false -> filename:join([project_root(), "_build", "loopback_bench", "release",
                                "loopback_bench"]);
        Path -> Path
    end.

%%% ----------------------------------------------------------------------------------------
%%% Targets

%% The targets of the small-message issue (README, Benchmark), as same-run ratios.
targets(#{ring := Ring, small := Small, calls := Calls, sizes := Sizes, stream := Stream,
          scale := Scale}) ->
    Med = fun(Rounds, K, T) -> bench_report:median([maps:get(K, R) || #{transport := T1} = R <- Rounds, T1 =:= T]) end,
    Ratio = fun(Rounds, K) -> Med(Rounds, K, teleport) / Med(Rounds, K, disterl) end,
    StreamMed = fun(T) -> case [G || #{transport := T1, gb_per_s := G} <- maps:get(rounds, Stream), T1 =:= T] of
                              [] -> undefined;
                              Gs -> bench_report:median(Gs)
                          end
                end,
    Ping = maps:from_list(maps:get(ping, Ring)),
    P99 = fun(C) -> maps:get(p99, maps:get(latency_us, maps:get(C, Ping)), 0) end,
    Rss = maps:get(rss, Ring),
    Hwm = fun(T) -> maps:get(vmhwm_max, maps:get(T, Rss)) end,
    RingRatio = Ratio(maps:get(rounds, Ring), wall_s),
    SmallRatio = Ratio(maps:get(rounds, Small), msgs_per_s),
    CallRatio = fun(Size) -> Ratio(proplists:get_value(Size, maps:get(by_size, Calls)), calls_per_s) end,
    PingRatio = P99(bulk_on_teleport) / max(1, P99(bulk_on_disterl)),
    {WorstSize, WorstRatio} =
        lists:foldl(fun({Size, SzR}, {_, Worst} = Acc) ->
                            case Ratio(SzR, mb_per_s) of
                                R when Worst =:= undefined; R < Worst -> {Size, R};
                                _ -> Acc
                            end
                    end, {none, undefined}, maps:get(by_size, Sizes)),
    Share = case StreamMed(raw) of
                undefined -> undefined;
                Raw -> StreamMed(teleport) / Raw
            end,
    RssRatio = Hwm(teleport) / Hwm(disterl),
    Threads = scale_bench:threads_added(Scale, 256),
    ThreadCap = 2 * erlang:system_info(schedulers_online) + 4,
    [#{name => "ring: teleport median <= 0.54 x disterl", value => RingRatio, unit => "x",
       pass => RingRatio =< 0.54},
     #{name => "small msgs, 8 pairs: >= 1.5 x disterl msgs/s", value => SmallRatio, unit => "x",
       pass => SmallRatio >= 1.5},
     #{name => "gs_call 1 KB replies >= 1.0 x gen_server:call", value => CallRatio(1024),
       unit => "x", pass => CallRatio(1024) >= 1.0},
     #{name => "gs_call 1 MB replies >= 1.5 x gen_server:call", value => CallRatio(?MiB),
       unit => "x", pass => CallRatio(?MiB) >= 1.5},
     #{name => "one sender, every size >= 1.0 x (worst: " ++ size_label(WorstSize) ++ ")",
       value => WorstRatio, unit => "x", pass => WorstRatio >= 1.0},
     #{name => "ping p99, bulk on teleport <= 0.25 x on disterl", value => PingRatio, unit => "x",
       pass => PingRatio =< 0.25},
     #{name => "1 connection >= 85% of raw loopback", value => Share, unit => "",
       pass => Share =/= undefined andalso Share >= 0.85},
     #{name => "peak RSS (max node VmHWM) <= 0.82 x disterl", value => RssRatio, unit => "x",
       pass => RssRatio =< 0.82},
     #{name => "threads added, 256 connections <= " ++ integer_to_list(ThreadCap),
       value => Threads, unit => "", pass => Threads =/= undefined andalso Threads =< ThreadCap}].

%%% ----------------------------------------------------------------------------------------
%%% Printing

print_header(M, Cfg) ->
    io:format("teleport transport benchmark: OTP ~s (erts ~s), ~s, ~b cores (~s), ~s~n"
              "machine load average at start: ~s~n",
              [maps:get(otp_release, M), maps:get(erts_version, M), maps:get(rustc, M),
               maps:get(cores, M), maps:get(cpu_model, M), maps:get(kernel, M),
               maps:get(loadavg_start, M)]),
    io:format("ring ~b nodes x ~b workers x ~s, ~b measured rounds per transport + ~b warm-up~s~n",
              [maps:get(ring_nodes, Cfg), maps:get(ring_workers, Cfg),
               bench_report:fmt_mb(maps:get(ring_bytes, Cfg)), maps:get(ring_rounds, Cfg),
               maps:get(warmup_rounds, Cfg),
               case maps:get(quick, Cfg) of true -> " (BENCH_QUICK=1: reduced sizes)"; false -> "" end]),
    io:format("~n").

step(Fmt, Args) ->
    io:format("[~6.1f s] " ++ Fmt ++ "~n", [(now_ms() - get(t0)) / 1000 | Args]).

print_summary(Cfg, #{ring := Ring, small := Small, calls := Calls, sizes := Sizes,
                     stream := Stream} = Results, Targets) ->
    Med = fun(Rounds, T, K) -> bench_report:median([maps:get(K, R) || #{transport := T1} = R <- Rounds, T1 =:= T]) end,
    Line = fun() -> io:format("  ~s~n", [lists:duplicate(96, $-)]) end,
    io:format("~n======================================== summary ========================================~n"),
    io:format("medians over the measured rounds (warm-up excluded); ratio = teleport / disterl~n~n"),
    %% Ring
    RR = maps:get(rounds, Ring),
    io:format("ring: ~b nodes x ~b workers x ~s, seconds per round (first go to last done)~n",
              [maps:get(ring_nodes, Cfg), maps:get(ring_workers, Cfg),
               bench_report:fmt_mb(maps:get(ring_bytes, Cfg))]),
    io:format("  ~-8s ~10s ~10s ~10s | per worker trip:  ~9s ~9s ~9s ~9s ~9s~n",
              ["", "median", "min", "max", "min", "p50", "p90", "p99", "max"]),
    Line(),
    [begin
         Walls = [S || #{transport := T1, wall_s := S} <- RR, T1 =:= T],
         All = bench_report:stats(lists:append([U || #{transport := T1, worker_us := U} <- RR, T1 =:= T])),
         io:format("  ~-8s ~10s ~10s ~10s | all rounds:       ~9s ~9s ~9s ~9s ~9s~n",
                   [T, fmt3(bench_report:median(Walls)), fmt3(lists:min(Walls)), fmt3(lists:max(Walls))
                    | [fmt3(maps:get(K, All) / 1.0e6) || K <- [min, p50, p90, p99, max]]])
     end || T <- [disterl, teleport]],
    io:format("  ratio    ~10s~n", [bench_report:fmt_ratio(Med(RR, teleport, wall_s) / Med(RR, disterl, wall_s))]),
    io:format("  CPU seconds per round (all nodes of the set, median): disterl ~s, teleport ~s, ratio ~s~n",
              [fmt3(Med(RR, disterl, cpu_s)), fmt3(Med(RR, teleport, cpu_s)),
               bench_report:fmt_ratio(Med(RR, teleport, cpu_s) / Med(RR, disterl, cpu_s))]),
    io:format("~n  per round: wall s   CPU s | per-worker trip s: min p50 p90 p99 max~n"),
    [io:format("  ~2b ~-8s ~8s ~7s | ~8s ~8s ~8s ~8s ~8s~n",
               [R, T, fmt3(W), fmt3(C) | [fmt3(maps:get(K, S) / 1.0e6) || K <- [min, p50, p90, p99, max]]])
     || #{round := R, transport := T, wall_s := W, cpu_s := C, worker_stats := S} <- RR],
    %% Small messages
    SR = maps:get(rounds, Small),
    io:format("~nsmall messages: 8 pairs, ~b-byte messages, msgs/s~n", [maps:get(message_bytes, Small)]),
    Line(),
    [io:format("  ~-8s median ~12s   min ~12s   max ~12s~n",
               [T, bench_report:fmt_rate(Med(SR, T, msgs_per_s)),
                bench_report:fmt_rate(lists:min(V)), bench_report:fmt_rate(lists:max(V))])
     || T <- [disterl, teleport], V <- [[X || #{transport := T1, msgs_per_s := X} <- SR, T1 =:= T]]],
    io:format("  ratio    ~s~n", [bench_report:fmt_ratio(Med(SR, teleport, msgs_per_s) / Med(SR, disterl, msgs_per_s))]),
    %% Calls
    io:format("~ncalls: ~b callers, gen_server:call (disterl) vs teleport:gs_call, calls/s and "
              "per-call latency over all measured rounds~n", [maps:get(callers, Calls)]),
    Line(),
    io:format("  ~-5s ~-8s ~12s | ~9s ~9s ~9s ~9s ~9s~n", ["reply", "", "calls/s", "min", "p50", "p90", "p99", "max"]),
    [begin
         CR = proplists:get_value(Size, maps:get(by_size, Calls)),
         [begin
              S = bench_report:stats(lists:append([L || #{transport := T1, latencies_us := L} <- CR, T1 =:= T])),
              io:format("  ~-5s ~-8s ~12s | ~9s ~9s ~9s ~9s ~9s~n",
                        [size_label(Size), T, bench_report:fmt_rate(Med(CR, T, calls_per_s))
                         | [bench_report:fmt_us(maps:get(K, S)) || K <- [min, p50, p90, p99, max]]])
          end || T <- [disterl, teleport]],
         io:format("  ~-5s ratio    ~12s~n", [size_label(Size),
                                            bench_report:fmt_ratio(Med(CR, teleport, calls_per_s) / Med(CR, disterl, calls_per_s))])
     end || Size <- maps:get(call_sizes, Cfg)],
    io:format("  beside disterl bulk (2 senders of 10 MB over disterl), 1 caller, 1 KB replies:~n"),
    Beside = maps:get(beside_bulk, Calls),
    [io:format("  1 KB  ~-8s ~12s | ~9s ~9s ~9s ~9s ~9s~n",
               [T, integer_to_list(maps:get(count, S)) ++ " calls"
                | [bench_report:fmt_us(maps:get(K, S)) || K <- [min, p50, p90, p99, max]]])
     || {T, S} <- Beside],
    BP = fun(K) -> maps:get(K, proplists:get_value(teleport, Beside))
                       / max(1, maps:get(K, proplists:get_value(disterl, Beside))) end,
    io:format("  1 KB  latency ratio p50 ~s, p99 ~s~n",
              [bench_report:fmt_ratio(BP(p50)), bench_report:fmt_ratio(BP(p99))]),
    %% Sizes
    io:format("~none sender to one receiver by message size, MB/s (1e6 bytes)~n"),
    Line(),
    io:format("  ~-7s ~8s ~10s ~10s ~8s~n", ["size", "msgs", "disterl", "teleport", "ratio"]),
    [io:format("  ~-7s ~8b ~10s ~10s ~8s~n",
               [size_label(Size), maps:get(count, hd(SzR)),
                bench_report:fmt_float(Med(SzR, disterl, mb_per_s), 1),
                bench_report:fmt_float(Med(SzR, teleport, mb_per_s), 1),
                bench_report:fmt_ratio(Med(SzR, teleport, mb_per_s) / Med(SzR, disterl, mb_per_s))])
     || {Size, SzR} <- maps:get(by_size, Sizes)],
    %% Ping
    io:format("~ndisterl latency: gen_server:call every 10 ms between two ring nodes~n"),
    Line(),
    io:format("  ~-32s ~6s | ~9s ~9s ~9s ~9s | ticker late p99~n", ["", "pings", "p50", "p90", "p99", "max"]),
    [begin
         #{latency_us := L, ticker_late_us := Sv} = proplists:get_value(C, maps:get(ping, Ring)),
         case maps:get(count, L) of
             0 -> io:format("  ~-32s ~6b~n", [C, 0]);
             N -> io:format("  ~-32s ~6b | ~9s ~9s ~9s ~9s | ~9s~n",
                            [C, N | [bench_report:fmt_us(maps:get(K, L)) || K <- [p50, p90, p99, max]]]
                            ++ [bench_report:fmt_us(maps:get(p99, Sv))])
         end
     end || {C, _} <- maps:get(ping, Ring)],
    %% Stream
    STR = maps:get(rounds, Stream),
    io:format("~none stream: ~b x ~s messages, one sender, GB/s (1e9 bytes)~n",
              [maps:get(frames, Stream), bench_report:fmt_mb(maps:get(frame_bytes, Stream))]),
    Line(),
    RawMed = case [G || #{transport := raw, gb_per_s := G} <- STR] of
                 [] -> undefined;
                 Gs -> bench_report:median(Gs)
             end,
    [begin
         V = [G || #{transport := K1, gb_per_s := G} <- STR, K1 =:= K],
         Share = case RawMed of
                     undefined -> "";
                     _ -> "  (" ++ bench_report:fmt_float(100 * bench_report:median(V) / RawMed, 0) ++ "% of raw)"
                 end,
         io:format("  ~-22s median ~7s   min ~7s   max ~7s~s~n",
                   [stream_label(K), fmt3(bench_report:median(V)), fmt3(lists:min(V)), fmt3(lists:max(V)), Share])
     end || K <- [raw, teleport, disterl], [x || #{transport := K1} <- STR, K1 =:= K] =/= []],
    %% RSS
    Rss = maps:get(rss, Ring),
    io:format("~npeak RSS per node during the ring phase (set D: disterl, set T: teleport)~n"),
    Line(),
    io:format("  ~-8s ~-11s ~-11s ~-11s ~-11s | ~s~n", ["", "VmHWM max", "median", "min", "sum", "VmRSS sampled peak max / baseline median"]),
    [begin
         #{vmhwm_max := Mx, vmhwm_median := Md, vmhwm_min := Mn, vmhwm_sum := Sm,
           sampled_peak_max := SP, per_node := Per} = maps:get(T, Rss),
         io:format("  ~-8s ~-11s ~-11s ~-11s ~-11s | ~s / ~s~n",
                   [T, bench_report:fmt_mb(Mx), bench_report:fmt_mb(Md), bench_report:fmt_mb(Mn),
                    bench_report:fmt_mb(Sm), bench_report:fmt_mb(SP),
                    bench_report:fmt_mb(bench_report:median([B || #{baseline_rss := B} <- Per]))])
     end || T <- [disterl, teleport]],
    io:format("  per node VmHWM: ~s~n",
              [string:join([io_lib:format("~s ~s", [T, string:join([bench_report:fmt_float(H / ?MB, 0) || #{vmhwm := H} <- maps:get(per_node, maps:get(T, Rss))], "/")])
                            || T <- [disterl, teleport]], "; ") ++ " (MB)"]),
    ok = scale_bench:print(maps:get(scale, Results)),
    ok = tls_bench:print(maps:get(tls, Results)),
    %% Targets
    io:format("~ntargets:~n"),
    [io:format("  ~-48s ~10s  ~s~n",
               [Name, case V of undefined -> "n/a"; _ -> bench_report:fmt_float(V, 2) ++ U end,
                case P of true -> "PASS"; false -> "MISS" end])
     || #{name := Name, value := V, unit := U, pass := P} <- Targets],
    ok.

stream_label(raw) -> "raw loopback TCP";
stream_label(teleport) -> "teleport pool_size=1";
stream_label(disterl) -> "disterl".

fmt3(S) -> bench_report:fmt_float(S, 3).

%%% ----------------------------------------------------------------------------------------
%%% JSON and SVG

to_json(Machine, Cfg, #{ring := Ring, small := Small, calls := Calls, sizes := Sizes,
                        stream := Stream} = Results,
        Targets, Elapsed) ->
    Over = fun(Rounds, K, T) -> [maps:get(K, R) || #{transport := T1} = R <- Rounds, T1 =:= T] end,
    Dist = fun(Vs) -> bench_report:stats(Vs) end,
    RR = maps:get(rounds, Ring),
    RingMed = fun(T) -> bench_report:median(Over(RR, wall_s, T)) end,
    RingJ = #{id => ring,
              description => "every worker sends its own random binary around the ring; "
                             "the last node acks the worker with the payload's hash",
              nodes => maps:get(ring_nodes, Cfg), workers_per_node => maps:get(ring_workers, Cfg),
              payload_bytes => maps:get(ring_bytes, Cfg),
              measured_rounds_per_transport => maps:get(ring_rounds, Cfg),
              warmup_rounds_per_transport => maps:get(warmup_rounds, Cfg),
              seconds_per_round => maps:from_list([{T, #{median => RingMed(T), rounds => Over(RR, wall_s, T),
                                                         distribution => Dist(Over(RR, wall_s, T))}}
                                                   || T <- [disterl, teleport]]),
              ratio_teleport_over_disterl => RingMed(teleport) / RingMed(disterl),
              cpu_seconds_per_round => maps:from_list([{T, #{median => bench_report:median(Over(RR, cpu_s, T)),
                                                             rounds => Over(RR, cpu_s, T)}}
                                                       || T <- [disterl, teleport]]),
              rounds => [#{round => R, transport => T, seconds => W, cpu_seconds => C,
                           per_worker_seconds => maps:map(fun(count, V) -> V; (_, V) -> V / 1.0e6 end, S)}
                         || #{round := R, transport := T, wall_s := W, cpu_s := C, worker_stats := S} <- RR],
              teleport_stats_after => [{N, St} || {N, St} <- maps:get(teleport_stats, Ring)]},
    SR = maps:get(rounds, Small),
    SmallMed = fun(T) -> bench_report:median(Over(SR, msgs_per_s, T)) end,
    SmallJ = #{id => small_messages, pairs => maps:get(small_pairs, Cfg),
               message_bytes => maps:get(message_bytes, Small),
               messages_per_sender => maps:get(small_count, Cfg),
               msgs_per_s => maps:from_list([{T, #{median => SmallMed(T), rounds => Over(SR, msgs_per_s, T),
                                                   distribution => Dist(Over(SR, msgs_per_s, T))}}
                                             || T <- [disterl, teleport]]),
               ratio_teleport_over_disterl => SmallMed(teleport) / SmallMed(disterl)},
    CallsJ = [begin
                  CR = proplists:get_value(Size, maps:get(by_size, Calls)),
                  Med = fun(T) -> bench_report:median(Over(CR, calls_per_s, T)) end,
                  #{id => list_to_atom("calls_" ++ lists:filter(fun(C) -> C =/= $\s end, size_label(Size))),
                    reply_bytes => Size, callers => maps:get(callers, Calls),
                    seconds_per_round => maps:get(call_ms, Calls) / 1000,
                    calls_per_s => maps:from_list([{T, #{median => Med(T), rounds => Over(CR, calls_per_s, T),
                                                         distribution => Dist(Over(CR, calls_per_s, T))}}
                                                   || T <- [disterl, teleport]]),
                    latency_us => maps:from_list([{T, Dist(lists:append(Over(CR, latencies_us, T)))}
                                                  || T <- [disterl, teleport]]),
                    ratio_teleport_over_disterl => Med(teleport) / Med(disterl)}
              end || Size <- maps:get(call_sizes, Cfg)]
        ++ [#{id => calls_1KB_beside_disterl_bulk, reply_bytes => 1024, callers => 1,
              seconds_per_round => maps:get(call_ms, Calls) / 1000,
              description => "two processes send 10 MB messages over disterl between the same "
                             "two nodes meanwhile",
              latency_us => maps:from_list(maps:get(beside_bulk, Calls))}],
    SizesJ = #{id => one_sender_by_size,
               description => "one sender process to one receiver process, the same two nodes "
                              "for both transports; MB/s = 1e6 bytes per second",
               by_size => [begin
                               Med = fun(T) -> bench_report:median(Over(SzR, mb_per_s, T)) end,
                               #{message_bytes => Size, messages => maps:get(count, hd(SzR)),
                                 mb_per_s => maps:from_list([{T, #{median => Med(T),
                                                                   rounds => Over(SzR, mb_per_s, T)}}
                                                             || T <- [disterl, teleport]]),
                                 ratio_teleport_over_disterl => Med(teleport) / Med(disterl)}
                           end || {Size, SzR} <- maps:get(by_size, Sizes)]},
    PingJ = #{id => disterl_latency, interval_ms => maps:get(ping_interval_ms, Cfg),
              description => "gen_server:call over disterl from node 1 to node 2 of a ring set, "
                             "one every interval_ms, each from a fresh process (open loop); "
                             "latency_us: the call's duration; ticker_late_us: how late the "
                             "(high-priority) ticker started it",
              conditions => maps:from_list(maps:get(ping, Ring))},
    STR = maps:get(rounds, Stream),
    Kinds = [K || K <- [raw, teleport, disterl], Over(STR, gb_per_s, K) =/= []],
    StMed = fun(K) -> bench_report:median(Over(STR, gb_per_s, K)) end,
    StreamJ = #{id => single_connection, frames => maps:get(frames, Stream),
                frame_bytes => maps:get(frame_bytes, Stream),
                gb_per_s => maps:from_list([{K, #{median => StMed(K), rounds => Over(STR, gb_per_s, K),
                                                  distribution => Dist(Over(STR, gb_per_s, K))}}
                                            || K <- Kinds]),
                teleport_share_of_raw => case lists:member(raw, Kinds) of
                                             true -> StMed(teleport) / StMed(raw);
                                             false -> null
                                         end,
                pool_info_after => maps:get(pool_info_after, Stream)},
    RssJ = maps:put(id, peak_rss, maps:get(rss, Ring)),
    {obj, [{benchmark, "teleport_transport"},
           {machine, Machine},
           {config, maps:without([call_sizes, sizes], Cfg)},
           {warmup, "one round per transport per scenario before the measured rounds, excluded; "
                    "the rings are primed with a tiny message first"},
           {scenarios, [RingJ, SmallJ | CallsJ] ++ [SizesJ, PingJ, StreamJ, RssJ,
                                                     scale_bench:json(maps:get(scale, Results)),
                                                     tls_bench:json(maps:get(tls, Results))]},
           {targets, [maps:remove(unit, T) || T <- Targets]},
           {total_run_time_s, Elapsed}]}.

chart(Machine, Cfg, #{ring := Ring, small := Small, calls := Calls, sizes := Sizes,
                      stream := Stream}) ->
    Over = fun(Rounds, K, T) -> [maps:get(K, R) || #{transport := T1} = R <- Rounds, T1 =:= T] end,
    Bar = fun(Label, Series, Vs) ->
                  #{label => Label, series => Series, value => bench_report:median(Vs),
                    lo => bench_report:pct(Vs, 0.1), hi => bench_report:pct(Vs, 0.9)}
          end,
    Two = fun(Rounds, K) -> [Bar(atom_to_list(T), T, Over(Rounds, K, T)) || T <- [disterl, teleport]] end,
    RR = maps:get(rounds, Ring),
    Workers = fun(T) -> [U / 1.0e6 || U <- lists:append(Over(RR, worker_us, T))] end,
    RoundsCap = "whiskers: p10-p90 over the measured rounds",
    RingPanels =
        [#{title => io_lib:format("Ring ~bx~b x ~s: s per round",
                                  [maps:get(ring_nodes, Cfg), maps:get(ring_workers, Cfg),
                                   bench_report:fmt_mb(maps:get(ring_bytes, Cfg))]),
           unit => "seconds", better => lower, caption => RoundsCap, bars => Two(RR, wall_s)},
         #{title => "Ring: per-worker trip time", unit => "seconds", better => lower,
           caption => "whiskers: p10-p90 over all workers of all rounds",
           bars => [Bar(atom_to_list(T), T, Workers(T)) || T <- [disterl, teleport]]},
         #{title => "Ring: CPU time per round (6 nodes)", unit => "CPU seconds", better => lower,
           caption => RoundsCap ++ " (utime + stime)", bars => Two(RR, cpu_s)}],
    SmallPanel = #{title => "Small messages, 8 pairs, 100 B", unit => "msgs/s",
                   caption => RoundsCap, bars => Two(maps:get(rounds, Small), msgs_per_s)},
    CallPanels = [#{title => "Calls, " ++ size_label(Size) ++ " replies (" ++
                        integer_to_list(maps:get(callers, Calls)) ++ " callers)",
                    unit => "calls/s", caption => RoundsCap,
                    bars => Two(proplists:get_value(Size, maps:get(by_size, Calls)), calls_per_s)}
                  || Size <- maps:get(call_sizes, Cfg)],
    SizeRatio = fun(SzR) ->
                        Med = fun(T) -> bench_report:median(Over(SzR, mb_per_s, T)) end,
                        Med(teleport) / Med(disterl)
                end,
    SizesPanel = #{title => "One sender: teleport / disterl throughput by size", unit => "ratio",
                   caption => "bar: ratio of the medians; 1.0 is disterl's throughput",
                   bars => [begin
                                R = SizeRatio(SzR),
                                #{label => size_label(Size), series => teleport, value => R,
                                  lo => R, hi => R}
                            end || {Size, SzR} <- maps:get(by_size, Sizes)]},
    Ping = maps:get(ping, Ring),
    PingBar = fun(Label, Series, C) ->
                      L = maps:get(latency_us, proplists:get_value(C, Ping)),
                      Ms = fun(K) -> maps:get(K, L, 0) / 1000 end,
                      #{label => Label, series => Series, value => Ms(p99), lo => Ms(p50), hi => Ms(max)}
              end,
    PingPanel = #{title => "Disterl ping (gen_server:call) p99", unit => "ms", better => lower,
                  caption => "bar: p99; whisker: p50 to max",
                  bars => [PingBar("idle", other, idle_set_t),
                           PingBar("bulk: disterl", disterl, bulk_on_disterl),
                           PingBar("bulk: teleport", teleport, bulk_on_teleport)]},
    STR = maps:get(rounds, Stream),
    StreamPanel = #{title => "One stream of 10 MB messages", unit => "GB/s", caption => RoundsCap,
                    bars => [Bar(L, K, Over(STR, gb_per_s, K))
                             || {K, L} <- [{raw, "raw TCP"}, {teleport, "teleport"}, {disterl, "disterl"}],
                                Over(STR, gb_per_s, K) =/= []]},
    Rss = maps:get(rss, Ring),
    RssPanel = #{title => "Peak RSS per ring node (VmHWM)", unit => "MB", better => lower,
                 caption => "bar: median node; whiskers: min-max over nodes",
                 bars => [begin
                              #{vmhwm_median := Md, vmhwm_min := Mn, vmhwm_max := Mx} = maps:get(T, Rss),
                              #{label => atom_to_list(T), series => T, value => Md / ?MB,
                                lo => Mn / ?MB, hi => Mx / ?MB}
                          end || T <- [disterl, teleport]]},
    Title = "teleport vs distributed Erlang",
    Sub = io_lib:format("~s; OTP ~s, ~s, ~b cores; load average at start ~s, at end ~s",
                        [maps:get(timestamp, Machine), maps:get(otp_release, Machine),
                         maps:get(rustc, Machine), maps:get(cores, Machine),
                         maps:get(loadavg_start, Machine), maps:get(loadavg_end, Machine)]),
    bench_report:svg(Title, Sub, RingPanels ++ [SmallPanel | CallPanels]
                     ++ [SizesPanel, PingPanel, StreamPanel, RssPanel]).

%%% ----------------------------------------------------------------------------------------
%%% Machine information

machine_info() ->
    #{cores => erlang:system_info(logical_processors),
      schedulers_online => erlang:system_info(schedulers_online),
      otp_release => erlang:system_info(otp_release),
      erts_version => erlang:system_info(version),
      system_architecture => erlang:system_info(system_architecture),
      rustc => string:trim(os:cmd("rustc --version 2>/dev/null || echo 'rustc: not found'")),
      cpu_model => bench_report:cpu_model(),
      kernel => string:trim(os:cmd("uname -sr")),
      memory_total_bytes => mem_total(),
      loadavg_start => loadavg(),
      timestamp => calendar:system_time_to_rfc3339(erlang:system_time(second))}.

mem_total() ->
    case file:read_file("/proc/meminfo") of
        {ok, Text} ->
            case re:run(Text, "^MemTotal:\\s*(\\d+) kB", [multiline, {capture, [1], list}]) of
                {match, [Kb]} -> list_to_integer(Kb) * 1024;
                nomatch -> 0
            end;
        _ ->
            0
    end.

loadavg() ->
    case file:read_file("/proc/loadavg") of
        {ok, Text} -> string:join(lists:sublist(string:lexemes(binary_to_list(Text), " "), 3), " ");
        _ -> "unknown"
    end.

project_root() ->
    case filelib:is_file("rebar.config") of
        true ->
            ".";
        false ->
            %% _build/<profile>/lib/teleport/bench/ring_bench.beam -> the project
            Beam = code:which(?MODULE),
            lists:foldl(fun(_, D) -> filename:dirname(D) end, Beam, lists:seq(1, 6))
    end.

results_dir() ->
    filename:join([project_root(), "bench", "results"]).

now_ms() -> erlang:monotonic_time(millisecond).
mono_us() -> erlang:monotonic_time(microsecond).
os_us() -> os:system_time(microsecond).
