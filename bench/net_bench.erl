%% @doc The link benchmark behind `make bench-net': teleport against distributed Erlang
%% between hosts joined by a shaped link, the case teleport exists for. The hosts are
%% network namespaces of this machine (teleport_netns): each its own loopback, epmd and
%% address, the egress of each shaped with tc's tbf to LINK_RATE (default 1gbit). Needs
%% root. The nodes run the same code as `make bench' (bench_agent, ring_bench's ring).
%%
%% Scenarios, disterl and teleport alternating (ABBA) in one run, warm-up rounds excluded:
%%   bulk    two hosts A -> B: BULK_SENDERS (4) senders, each BULK_MSGS messages of 10 MB
%%           to its own receiver per round; throughput as a share of the link rate.
%%           Meanwhile a gen_server:call over disterl A -> B every 10 ms (bench_agent's
%%           open-loop pinger): p50/p90/p99/max, against an idle window before; and every
%%           nodeup/nodedown either node saw (tick health: no nodedown expected).
%%   small   the same bulk, plus 8 pairs A -> B flooding 100-byte messages over the same
%%           transport while it runs: small msgs/s and their latency (send to receive, one
%%           in 8 sampled), the bulk's share of the link, the ping.
%%   paced   the same, but each pair sends one small message per millisecond: the latency
%%           of a small message behind the bulk without a backlog of its own.
%%   cut     CUT_SENDERS (4) senders A -> B, each a sequenced message (CUT_MSG_BYTES, 256 KB:
%%           together more than the link carries, so data is always in flight and queued)
%%           every millisecond (as often as the timer allows);
%%           3 s in, host A's link goes down for CUT_S (10) seconds (less than net_ticktime,
%%           so disterl stays up), then up; 5 s later the senders stop, and B's counts are
%%           read once they stop changing: per sender lost, duplicated, reordered.
%%   reset   the same stream, but 3 s in host A's connections of the transport to B are
%%           reset (ss -K), the link staying up: what a connection loss costs.
%%   rate2   the bulk again with the link at LINK_RATE_2 (default 10gbit; empty to skip):
%%           does the CPU or the link limit it?
%%   ring    the 2015 ring over NET_HOSTS (6) hosts on a bridge, one node per host:
%%           RING_WORKERS (8) workers per node, RING_BYTES (10 MB) each, s per round.
%%   tls     on a star of its own, nodes whose disterl runs over TLS (tls_bench, as in
%%           `make bench'): one stream of 10 MB messages host 1 -> 2 over disterl TLS,
%%           teleport TLS and teleport plain (two plain nodes on the same hosts), 8 pairs of
%%           100-byte messages, and the ring over 6 x 2 x 10 MB, disterl TLS against
%%           teleport TLS.
%%
%% Results: a table on stdout, bench/results/net.json and bench/results/net.svg.
-module(net_bench).

-export([main/0, main/1]).

-define(MiB, 1048576).

-spec main() -> ok.
main() ->
    main(#{}).

-spec main(map()) -> ok.
main(Opts) ->
    put(t0, now_ms()),
    Cfg = config(),
    case teleport_netns:available() of
        ok -> ok;
        {no, Why} -> erlang:error({netns_unavailable, Why})
    end,
    Machine = ring_bench:machine_info(),
    print_header(Machine, Cfg),
    Pair = with_net(fun() -> teleport_netns:pair(#{rate => maps:get(rate, Cfg)}) end,
                    fun(Net) -> pair_phase(Cfg, Net) end),
    Ring = with_net(fun() -> teleport_netns:star(maps:get(hosts, Cfg),
                                                 #{rate => maps:get(rate, Cfg)}) end,
                    fun(Net) -> ring_phase(Cfg, Net) end),
    %% The TLS section on a star of its own: its nodes' disterl runs over TLS.
    Tls = with_net(fun() -> teleport_netns:star(maps:get(hosts, Cfg),
                                                #{rate => maps:get(rate, Cfg)}) end,
                   fun(Net) -> tls_phase(Cfg, Net) end),
    Results = Pair#{ring => Ring, tls => Tls},
    Elapsed = (now_ms() - get(t0)) / 1000,
    Machine1 = Machine#{loadavg_end => ring_bench:loadavg()},
    print_summary(Cfg, Results),
    ok = tls_bench:print(Tls),
    io:format("  over a ~s link: teleport TLS fills it where disterl TLS is bound by its CPU; "
              "the loopback targets of `make bench' hold where the CPU is the limit~n",
              [maps:get(rate, Cfg)]),
    [io:format("  ~-48s ~s~n", [Name, bench_report:fmt_float(V, 2) ++ U])
     || #{name := Name, value := V, unit := U} <- tls_bench:targets(Tls)],
    io:format("~ntotal run time: ~.1f s (machine load average at start ~s, at end ~s)~n",
              [Elapsed, maps:get(loadavg_start, Machine), maps:get(loadavg_end, Machine1)]),
    Dir = maps:get(dir, Opts, ring_bench:results_dir()),
    Json = filename:join(Dir, "net.json"),
    Svg = filename:join(Dir, "net.svg"),
    ok = filelib:ensure_dir(Json),
    ok = file:write_file(Json, [bench_report:json(to_json(Machine1, Cfg, Results, Elapsed)), $\n]),
    ok = file:write_file(Svg, chart(Machine1, Cfg, Results)),
    io:format("results written to ~ts and ~ts~n", [Json, Svg]),
    ok.

%% Builds a network, runs `Fun' on it, removes it whatever happens (and checks it is gone).
with_net(Make, Fun) ->
    Net = Make(),
    step("network ~s: namespaces ~s", [maps:get(topology, Net),
                                       string:join(teleport_netns:namespaces(Net), " ")]),
    try
        Fun(Net)
    after
        step("removing the network (nodes, epmds, namespaces)", []),
        ok = teleport_netns:stop(Net),
        case teleport_netns:leftovers(maps:get(run, Net)) of
            [] -> ok;
            Left -> erlang:error({namespaces_left_behind, Left})
        end
    end.

%%% ----------------------------------------------------------------------------------------
%%% Configuration (checked before anything is built)

config() ->
    Quick = os:getenv("BENCH_QUICK") =:= "1",
    Q = fun(Full, Small) -> case Quick of true -> Small; false -> Full end end,
    Rate = teleport_netns:check_rate(env_str("LINK_RATE", "1gbit")),
    Rate2 = case env_str("LINK_RATE_2", "10gbit") of
                "" -> none;
                R2 -> teleport_netns:check_rate(R2)
            end,
    #{quick => Quick,
      rate => Rate, rate_bits => teleport_netns:rate_bits(Rate),
      rate2 => Rate2,
      hosts => teleport_netns:check_hosts(env_int("NET_HOSTS", 6)),
      senders => range("BULK_SENDERS", env_int("BULK_SENDERS", 4), 1, 64),
      bulk_msgs => range("BULK_MSGS", env_int("BULK_MSGS", Q(8, 2)), 1, 1000),
      bulk_bytes => 10 * ?MiB,
      bulk_rounds => range("BULK_ROUNDS", env_int("BULK_ROUNDS", Q(5, 1)), 1, 100),
      small_rounds => range("SMALL_ROUNDS", env_int("SMALL_ROUNDS", Q(3, 1)), 1, 100),
      rate2_rounds => range("RATE2_ROUNDS", env_int("RATE2_ROUNDS", Q(3, 1)), 1, 100),
      warmup_rounds => range("WARMUP_ROUNDS", env_int("WARMUP_ROUNDS", 1), 0, 10),
      idle_ms => range("IDLE_MS", env_int("IDLE_MS", Q(3000, 1000)), 100, 600000),
      ping_interval_ms => 10,
      small_pairs => 8,
      small_msg_bytes => 100,
      paced_interval_ms => 1,
      cut_s => range("CUT_S", env_int("CUT_S", 10), 1, 50),
      cut_senders => range("CUT_SENDERS", env_int("CUT_SENDERS", 4), 1, 64),
      cut_interval_ms => 1,
      cut_msg_bytes => range("CUT_MSG_BYTES", env_int("CUT_MSG_BYTES", 262144), 0, 1048576),
      ring_workers => range("RING_WORKERS", env_int("RING_WORKERS", Q(8, 2)), 1, 64),
      ring_bytes => range("RING_BYTES", env_int("RING_BYTES", Q(10 * ?MiB, ?MiB)), 1, 256 * ?MiB),
      ring_rounds => range("RING_ROUNDS", env_int("RING_ROUNDS", Q(5, 1)), 1, 100)}.

range(_Name, V, Lo, Hi) when is_integer(V), V >= Lo, V =< Hi -> V;
range(Name, V, Lo, Hi) ->
    erlang:error({bad_parameter, Name,
                  lists:flatten(io_lib:format("bad parameter ~s=~p: expected an integer from "
                                              "~b to ~b", [Name, V, Lo, Hi]))}).

env_str(Name, Default) ->
    case os:getenv(Name) of
        false -> Default;
        S -> string:trim(S)
    end.

env_int(Name, Default) ->
    case env_str(Name, "") of
        "" -> Default;
        S ->
            try list_to_integer(S)
            catch error:badarg ->
                    erlang:error({bad_parameter, Name,
                                  lists:flatten(io_lib:format("bad parameter ~s=~ts: expected an "
                                                              "integer", [Name, S]))})
            end
    end.

%%% ----------------------------------------------------------------------------------------
%%% Two hosts: bulk, bulk + small, the cut, the second rate

pair_phase(Cfg, Net) ->
    step("starting node a on host 1 (~s), node b on host 2 (~s)",
         [teleport_netns:host_ip(Net, 1), teleport_netns:host_ip(Net, 2)]),
    {PA, A} = teleport_netns:start_node(Net, 1, #{name => "a"}),
    {PB, B} = teleport_netns:start_node(Net, 2, #{name => "b"}),
    try
        [ok = peer:call(P, teleport, start, []) || P <- [PA, PB]],
        true = peer:call(PA, net_kernel, connect_node, [B]),
        Watch = #{a => peer:call(PA, bench_agent, watch_nodes, []),
                  b => peer:call(PB, bench_agent, watch_nodes, [])},
        {ok, _} = peer:call(PB, bench_agent, start_ping_server, []),
        {ok, Pinger} = peer:call(PA, bench_agent, start_pinger,
                                 [{bench_ping, B}, maps:get(ping_interval_ms, Cfg)]),
        Ctx = #{net => Net, pa => PA, pb => PB, a => A, b => B, pinger => Pinger,
                watch => Watch,
                os_pids => [maps:get(os_pid, peer:call(P, bench_agent, node_info, []))
                            || P <- [PA, PB]]},
        step("nodes up: ~s, ~s; qdisc: ~s", [A, B, hd(teleport_netns:qdisc(Net))]),
        Idle = idle_phase(Cfg, Ctx),
        Bulk = bulk_phase(Cfg, Ctx, bulk, none, maps:get(bulk_rounds, Cfg)),
        Small = bulk_phase(Cfg, Ctx, small, 0, maps:get(small_rounds, Cfg)),
        Paced = bulk_phase(Cfg, Ctx, paced, maps:get(paced_interval_ms, Cfg),
                           maps:get(small_rounds, Cfg)),
        Cut = cut_phase(Cfg, Ctx),
        Reset = reset_phase(Cfg, Ctx),
        Rate2 = case maps:get(rate2, Cfg) of
                    none -> none;
                    R2 ->
                        step("link rate now ~s", [R2]),
                        _ = teleport_netns:set_rate(Net, R2),
                        %% As many more messages as the link is faster (up to 10x): rounds
                        %% of about the same length.
                        Bits2 = teleport_netns:rate_bits(R2),
                        Scale = max(1, min(10, Bits2 div maps:get(rate_bits, Cfg))),
                        Res = bulk_phase(Cfg#{rate => R2, rate_bits => Bits2,
                                              bulk_msgs => Scale * maps:get(bulk_msgs, Cfg)},
                                         Ctx, rate2, none, maps:get(rate2_rounds, Cfg)),
                        _ = teleport_netns:set_rate(Net, maps:get(rate, Cfg)),
                        Res#{rate => R2, messages_per_sender => Scale * maps:get(bulk_msgs, Cfg)}
                end,
        Events = maps:from_list([{K, peer:call(P, bench_agent, node_events, [W])}
                                 || {K, P, W} <- [{a, PA, maps:get(a, Watch)},
                                                  {b, PB, maps:get(b, Watch)}]]),
        #{idle => Idle, bulk => Bulk, small => Small, paced => Paced, cut => Cut,
          reset => Reset, rate2 => Rate2,
          node_events => Events, qdisc => teleport_netns:qdisc(Net),
          teleport_stats => #{a => peer:call(PA, teleport, stats, []),
                              b => peer:call(PB, teleport, stats, [])}}
    after
        [teleport_netns:stop_node(P) || P <- [PA, PB]]
    end.

idle_phase(#{idle_ms := IdleMs}, #{pa := PA, pinger := Pinger}) ->
    step("idle: pings only, ~b ms", [IdleMs]),
    _ = pinger_samples(PA, Pinger),
    timer:sleep(IdleMs),
    ok = peer:call(PA, bench_agent, pinger_active, [Pinger, false]),
    timer:sleep(100),
    Pings = pinger_samples(PA, Pinger),
    #{ping => ping_stats(Pings), pings => Pings}.

pinger_samples(PA, Pinger) ->
    peer:call(PA, bench_agent, pinger_samples, [Pinger], 60000).

%% Rounds of bulk, ABBA; with small messages beside it unless `Small' is `none': flooding
%% (0) or one every `Small' ms per pair.
bulk_phase(Cfg, Ctx, Id, Small, Rounds) ->
    #{warmup_rounds := Warmup, senders := N, bulk_msgs := Count, bulk_bytes := Bytes,
      rate := Rate} = Cfg,
    step("~s: ~b senders x ~b x ~s A -> B~s, link ~s", [Id, N, Count, bench_report:fmt_mb(Bytes),
                                                        case Small of
                                                            none -> "";
                                                            0 -> " + 8 pairs flooding 100 B messages";
                                                            _ -> io_lib:format(" + 8 pairs, a 100 B message "
                                                                               "every ~b ms each", [Small])
                                                        end, Rate]),
    #{pb := PB} = Ctx,
    SmallRcvs = case Small of
                    none -> [];
                    _ -> [peer:call(PB, bench_agent, timed_receiver, [])
                          || _ <- lists:seq(1, maps:get(small_pairs, Cfg))]
                end,
    Events0 = events_count(Ctx),
    Run = fun(T, Label) -> bulk_round(Cfg, Ctx, T, {SmallRcvs, Small}, Id, Label) end,
    Measured = ring_bench:alternating(Run, Warmup, Rounds),
    [R ! stop || R <- SmallRcvs],
    #{rounds => Measured, nodedowns => events_count(Ctx) - Events0}.

bulk_round(Cfg, Ctx, T, {SmallRcvs, SmallIval}, Id, Label) ->
    #{senders := N, bulk_msgs := Count, bulk_bytes := Bytes, rate_bits := RateBits,
      small_msg_bytes := SmallBytes} = Cfg,
    #{pa := PA, pb := PB, pinger := Pinger, os_pids := OsPids} = Ctx,
    [ok = peer:call(P, bench_agent, gc_all, []) || P <- [PA, PB]],
    Rcvs = [begin
                {ok, R} = peer:call(PB, bench_agent, stream_receiver, [T, Count]),
                R
            end || _ <- lists:seq(1, N)],
    _ = pinger_samples(PA, Pinger),
    ok = peer:call(PA, bench_agent, pinger_active, [Pinger, true]),
    Flood = case SmallRcvs of
                [] -> none;
                _ -> peer:call(PA, bench_agent, flood_start, [T, SmallRcvs, SmallBytes, SmallIval])
            end,
    Timeout = 120000 + (N * Count * Bytes * 8 div RateBits) * 3000,
    Cpu0 = ring_bench:cpu_ticks(OsPids),
    {Us, Got} = peer:call(PA, bench_agent, bulk_run, [T, Rcvs, Count, Bytes], Timeout),
    CpuS = (ring_bench:cpu_ticks(OsPids) - Cpu0) / clk_tck(),
    SmallRes = case Flood of
                   none -> #{};
                   _ ->
                       {FUs, Acks} = peer:call(PA, bench_agent, flood_stop, [Flood], 300000),
                       Acked = lists:sum([A || {_, A} <- Acks, is_integer(A)]),
                       Sent = lists:sum([S || {S, _} <- Acks, is_integer(S)]),
                       Lats = lists:append([peer:call(PB, bench_agent, timed_samples, [R], 60000)
                                            || R <- SmallRcvs]),
                       #{small_sent => Sent, small_acked => Acked, small_us => FUs,
                         small_msgs_per_s => Acked / (FUs / 1.0e6),
                         small_latency_us => Lats}
               end,
    ok = peer:call(PA, bench_agent, pinger_active, [Pinger, false]),
    timer:sleep(50),
    Pings = pinger_samples(PA, Pinger),
    Expected = N * Count * Bytes,
    Got =:= Expected orelse erlang:error({bulk_lost_bytes, T, Got, Expected}),
    Share = Got * 8 / (Us / 1.0e6) / RateBits,
    PS = ping_stats(Pings),
    step("~s ~s ~-8s ~s of the link (~s MB/s, CPU ~s s); ping p50 ~s p99 ~s max ~s~s",
         [Id, Label, T, pct(Share), bench_report:fmt_float(Got / Us, 1),
          bench_report:fmt_float(CpuS, 2)
          | [bench_report:fmt_us(maps:get(K, maps:get(latency_us, PS), 0)) || K <- [p50, p99, max]]]
         ++ [case SmallRes of
                 #{small_msgs_per_s := SR, small_latency_us := SL} ->
                     io_lib:format("; small ~s msgs/s, latency p99 ~s",
                                   [bench_report:fmt_rate(SR),
                                    bench_report:fmt_us(maps:get(p99, bench_report:stats(SL), 0))]);
                 _ -> ""
             end]),
    maps:merge(#{transport => T, elapsed_us => Us, bytes => Got, share => Share,
                 mb_per_s => Got / Us, cpu_s => CpuS, cpu_cores => CpuS / (Us / 1.0e6),
                 pings => Pings}, SmallRes).

%% The link cut, once per transport (disterl first).
cut_phase(Cfg, Ctx) ->
    #{cut_s := CutS, cut_senders := N, cut_interval_ms := Ival, cut_msg_bytes := B} = Cfg,
    step("cut: ~b senders A -> B, a sequenced message of ~b bytes each every ~b ms; host A's "
         "link down for ~b s after 3 s", [N, B, Ival, CutS]),
    [cut_round(Cfg, Ctx, T, cut) || T <- [disterl, teleport]].

%% The same stream, but 3 s in host A's connections of the transport to B are reset (as a
%% middlebox or a peer's kernel would), the link staying up.
reset_phase(Cfg, Ctx) ->
    step("reset: the same stream; 3 s in, A's connections of the transport to B are reset "
         "(ss -K), the link stays up", []),
    [cut_round(Cfg, Ctx, T, reset) || T <- [disterl, teleport]].

cut_round(#{cut_s := CutS, cut_senders := N, cut_interval_ms := Ival,
            cut_msg_bytes := PadBytes}, Ctx, T, Kind) ->
    #{net := Net, pa := PA, pb := PB, pinger := Pinger} = Ctx,
    Events0 = events_count(Ctx),
    Rcv = peer:call(PB, bench_agent, seq_receiver, []),
    _ = pinger_samples(PA, Pinger),
    ok = peer:call(PA, bench_agent, pinger_active, [Pinger, true]),
    Stats0 = peer:call(PA, teleport, stats, []),
    Handle = peer:call(PA, bench_agent, seq_start, [T, Rcv, N, Ival, PadBytes]),
    timer:sleep(3000),
    Resets = case Kind of
                 cut ->
                     ok = teleport_netns:link_down(Net, 1),
                     step("cut ~-8s link down", [T]),
                     timer:sleep(CutS * 1000),
                     ok = teleport_netns:link_up(Net, 1),
                     step("cut ~-8s link up", [T]),
                     0;
                 reset ->
                     K = teleport_netns:reset_connections(Net, 1, listener(Ctx, T)),
                     step("reset ~-8s ~b connections reset", [T, K]),
                     K
             end,
    timer:sleep(5000),
    Sent = peer:call(PA, bench_agent, seq_stop, [Handle], 60000),
    Total = lists:sum([S || #{sent := S} <- Sent, is_integer(S)]),
    Report = drain(PB, Rcv, Total, undefined, now_ms(), now_ms() + 90000),
    ok = peer:call(PA, bench_agent, pinger_active, [Pinger, false]),
    timer:sleep(50),
    Pings = pinger_samples(PA, Pinger),
    Rcv ! stop,
    Stats1 = peer:call(PA, teleport, stats, []),
    PerSender = [begin
                     R = maps:get(I, Report, #{received => 0, unique => 0, duplicated => 0,
                                               reordered => 0, last => 0, gaps => []}),
                     #{sent := S, send_errors := E} = lists:nth(I, Sent),
                     R#{sender => I, sent => S, send_errors => E,
                        lost => S - maps:get(unique, R)}
                 end || I <- lists:seq(1, N)],
    Sum = fun(K) -> lists:sum([maps:get(K, P) || P <- PerSender]) end,
    Res = #{transport => T, kind => Kind, connections_reset => Resets,
            cut_s => case Kind of cut -> CutS; reset -> 0 end, per_sender => PerSender,
            sent => Sum(sent), lost => Sum(lost), duplicated => Sum(duplicated),
            reordered => Sum(reordered), send_errors => Sum(send_errors),
            nodedowns => events_count(Ctx) - Events0, pings => Pings,
            teleport_stats_before => Stats0, teleport_stats_after => Stats1},
    step("~s ~-8s sent ~b, lost ~b, duplicated ~b, reordered ~b, refused ~b; "
         "per sender lost ~w; nodedowns ~b; ping max ~s",
         [Kind, T, Sum(sent), Sum(lost), Sum(duplicated), Sum(reordered), Sum(send_errors),
          [maps:get(lost, P) || P <- PerSender], maps:get(nodedowns, Res),
          bench_report:fmt_us(maps:get(max, maps:get(latency_us, ping_stats(Pings)), 0))]),
    Res.

%% Where A's connections of transport T to B go: B's distribution port (from B's epmd) or
%% B's teleport listener.
listener(#{pb := PB, b := B, net := Net}, disterl) ->
    [Name, _] = string:split(atom_to_list(B), "@"),
    {ok, Names} = peer:call(PB, erl_epmd, names, []),
    {teleport_netns:host_ip(Net, 2), proplists:get_value(Name, Names)};
listener(#{pb := PB, net := Net}, teleport) ->
    {ok, Port} = peer:call(PB, teleport_server, listen_port, []),
    {teleport_netns:host_ip(Net, 2), Port}.

%% B's report once everything sent has arrived, or once nothing new came for 15 s (what
%% is missing then is lost), at most until `Deadline'.
drain(PB, Rcv, Total, Last, Since, Deadline) ->
    Report = peer:call(PB, bench_agent, seq_report, [Rcv], 60000),
    Received = lists:sum([R || #{received := R} <- maps:values(Report)]),
    Unique = lists:sum([U || #{unique := U} <- maps:values(Report)]),
    Now = now_ms(),
    if
        Unique >= Total -> Report;
        Now >= Deadline -> Report;
        Received =/= Last -> timer:sleep(500), drain(PB, Rcv, Total, Received, Now, Deadline);
        Now - Since >= 15000 -> Report;
        true -> timer:sleep(500), drain(PB, Rcv, Total, Last, Since, Deadline)
    end.

events_count(#{pa := PA, pb := PB, watch := #{a := WA, b := WB}}) ->
    length([E || {P, W} <- [{PA, WA}, {PB, WB}],
                 {_, nodedown, _, _} = E <- peer:call(P, bench_agent, node_events, [W])]).

%%% ----------------------------------------------------------------------------------------
%%% The ring over N hosts on a bridge

ring_phase(Cfg, Net) ->
    #{hosts := N, ring_workers := W, ring_bytes := Bytes, ring_rounds := Rounds,
      warmup_rounds := Warmup, rate_bits := RateBits} = Cfg,
    step("ring: starting ~b nodes, one per host", [N]),
    Peers = [teleport_netns:start_node(Net, I, #{name => "r" ++ integer_to_list(I)})
             || I <- lists:seq(1, N)],
    try
        Nodes = [Node || {_, Node} <- Peers],
        [ok = peer:call(P, teleport, start, []) || {P, _} <- Peers],
        OsPids = [maps:get(os_pid, peer:call(P, bench_agent, node_info, [])) || {P, _} <- Peers],
        {P1, _} = hd(Peers),
        Workers = [begin
                       {ok, _} = peer:call(P, bench_agent, start_ring_worker, [I, Nodes]),
                       {Node, I}
                   end || {P, Node} <- Peers, I <- lists:seq(1, W)],
        step("ring: ~b workers per node; priming over both transports", [W]),
        [begin
             {_, Primed} = peer:call(P1, ring_bench, run_ring, [Workers, T, prime, 60000], 90000),
             ok = peer:call(P1, ring_bench, check_ring, [T, Primed, Workers])
         end || T <- [disterl, teleport]],
        step("ring: making the payloads (~s random per worker)", [bench_report:fmt_mb(Bytes)]),
        [ok = peer:call(P, gen_server, call, [bench_agent:ring_name(I), {prepare, Bytes}, 60000],
                        90000) || {P, _} <- Peers, I <- lists:seq(1, W)],
        %% Every host's egress carries W payloads from each of the N - 1 hosts before it.
        LinkBound = W * Bytes * (N - 1) * 8 / RateBits,
        Timeout = 120000 + round(LinkBound * 20000),
        Run = fun(T, Label) ->
                      [ok = peer:call(P, bench_agent, gc_all, []) || {P, _} <- Peers],
                      Cpu0 = ring_bench:cpu_ticks(OsPids),
                      {WallUs, Res} = peer:call(P1, ring_bench, run_ring,
                                                [Workers, T, bulk, Timeout], Timeout + 30000),
                      CpuS = (ring_bench:cpu_ticks(OsPids) - Cpu0) / clk_tck(),
                      ok = peer:call(P1, ring_bench, check_ring, [T, Res, Workers]),
                      step("ring ~s ~-8s ~s per round (~s CPU)",
                           [Label, T, bench_report:fmt_s(WallUs / 1.0e6), bench_report:fmt_s(CpuS)]),
                      #{transport => T, wall_s => WallUs / 1.0e6, cpu_s => CpuS,
                        worker_us => [U || #{us := U} <- Res]}
              end,
        Measured = ring_bench:alternating(Run, Warmup, Rounds),
        #{rounds => Measured, link_bound_s => LinkBound, hosts => N, workers => W,
          payload_bytes => Bytes}
    after
        [teleport_netns:stop_node(P) || {P, _} <- Peers]
    end.

%%% ----------------------------------------------------------------------------------------
%%% Helpers


ping_stats(Samples) ->
    #{latency_us => bench_report:stats([L || {_, L, _} <- Samples]),
      ticker_late_us => bench_report:stats([Late || {_, _, Late} <- Samples])}.

clk_tck() ->
    list_to_integer(string:trim(os:cmd("getconf CLK_TCK"))).

pct(Share) -> bench_report:fmt_float(100 * Share, 1) ++ "%".

over(Rounds, K, T) -> [maps:get(K, R) || #{transport := T1} = R <- Rounds, T1 =:= T].

med(Rounds, K, T) -> bench_report:median(over(Rounds, K, T)).

pings_of(Rounds, T) -> lists:append(over(Rounds, pings, T)).

step(Fmt, Args) ->
    io:format("[~6.1f s] " ++ Fmt ++ "~n", [(now_ms() - get(t0)) / 1000 | Args]).

now_ms() -> erlang:monotonic_time(millisecond).

%%% ----------------------------------------------------------------------------------------
%%% Printing

print_header(M, Cfg) ->
    io:format("teleport link benchmark: OTP ~s (erts ~s), ~s, ~b cores (~s), ~s~n"
              "hosts are network namespaces of this machine, egress shaped by tc tbf to ~s "
              "(no delay emulation); machine load average at start: ~s~n~n",
              [maps:get(otp_release, M), maps:get(erts_version, M), maps:get(rustc, M),
               maps:get(cores, M), maps:get(cpu_model, M), maps:get(kernel, M),
               maps:get(rate, Cfg), maps:get(loadavg_start, M)]).

%% The summary: one table (markdown, as the README shows it), then the details.
print_summary(Cfg, Results) ->
    io:format("~n======================================== summary ========================================~n"),
    io:format("medians over the measured rounds (warm-up excluded), latencies over every sample~n~n"),
    io:format("| scenario | disterl | teleport |~n|---|---|---|~n"),
    [io:format("| ~ts | ~ts | ~ts |~n", [Name, D, T]) || {Name, D, T} <- rows(Cfg, Results)],
    #{cut := Cut, reset := Reset} = Results,
    io:format("~nlink cut and reset, per sender (sent / lost / duplicated / reordered / refused):~n"),
    _ = [begin
         io:format("  ~-5s ~-8s", [K, T]),
         [io:format("  #~b: ~b/~b/~b/~b/~b", [I, S, L, D, R, E])
          || #{sender := I, sent := S, lost := L, duplicated := D, reordered := R,
               send_errors := E} <- PS],
         io:format("~n"),
         [io:format("           sender ~b missing ~w~n", [I, G])
          || #{sender := I, gaps := G} <- PS, G =/= []]
     end || #{transport := T, kind := K, per_sender := PS} <- Cut ++ Reset],
    ok.

rows(Cfg, #{idle := Idle, bulk := Bulk, small := Small, paced := Paced, cut := Cut,
            reset := Reset, rate2 := Rate2, ring := Ring}) ->
    PR = maps:get(rounds, Paced),
    Rate = maps:get(rate, Cfg),
    BR = maps:get(rounds, Bulk),
    SR = maps:get(rounds, Small),
    Both = fun(F) -> {F(disterl), F(teleport)} end,
    Row = fun(Name, F) -> {D, T} = Both(F), {Name, D, T} end,
    Ping = fun(Rounds) ->
                   fun(T) ->
                           L = maps:get(latency_us, ping_stats(pings_of(Rounds, T))),
                           string:join([bench_report:fmt_us(maps:get(K, L, 0))
                                        || K <- [p50, p90, p99, max]], " / ")
                   end
           end,
    IdleL = maps:get(latency_us, maps:get(ping, Idle)),
    IdleS = string:join([bench_report:fmt_us(maps:get(K, IdleL, 0)) || K <- [p50, p90, p99, max]],
                        " / "),
    N = maps:get(senders, Cfg),
    Share = fun(Rounds) -> fun(T) -> pct(med(Rounds, share, T)) ++ " (" ++
                                         bench_report:fmt_float(med(Rounds, mb_per_s, T), 0) ++
                                         " MB/s)" end end,
    SmallLat = fun(Rs) -> fun(T) ->
                       S = bench_report:stats(lists:append(over(Rs, small_latency_us, T))),
                       string:join([bench_report:fmt_us(maps:get(K, S, 0)) || K <- [p50, p99, max]],
                                   " / ")
               end end,
    CutOf = fun(T) -> hd([C || #{transport := T1} = C <- Cut, T1 =:= T]) end,
    ResetOf = fun(T) -> hd([C || #{transport := T1} = C <- Reset, T1 =:= T]) end,
    RR = maps:get(rounds, Ring),
    [Row(io_lib:format("bulk: ~b senders x 10 MB A -> B, share of ~s", [N, Rate]), Share(BR)),
     Row("disterl ping during bulk, p50 / p90 / p99 / max", Ping(BR)),
     {"disterl ping idle, p50 / p90 / p99 / max", IdleS, IdleS},
     Row("nodedowns during bulk (tick health)",
         fun(_) -> integer_to_list(maps:get(nodedowns, Bulk)) ++ " (both transports)" end),
     Row("bulk + small: 100 B msgs/s (8 pairs) while the link is full",
         fun(T) -> bench_report:fmt_rate(med(SR, small_msgs_per_s, T)) end),
     Row("bulk + small: small msg latency p50 / p99 / max", SmallLat(SR)),
     Row("bulk + small: bulk's share of the link", Share(SR)),
     Row("bulk + small: disterl ping p50 / p90 / p99 / max", Ping(SR)),
     Row(io_lib:format("bulk + paced small (8 pairs, 1 per ~b ms each): latency p50 / p99 / max",
                       [maps:get(paced_interval_ms, Cfg)]), SmallLat(PR)),
     Row("bulk + paced small: delivered msgs/s", fun(T) -> bench_report:fmt_rate(med(PR, small_msgs_per_s, T)) end),
     Row("bulk + paced small: bulk's share of the link", Share(PR))]
    ++ case Rate2 of
           none -> [];
           #{rate := R2, rounds := R2R} ->
               [Row(io_lib:format("bulk at ~s: share of the link; CPU busy (2 nodes, of ~b cores)",
                                  [R2, erlang:system_info(logical_processors)]),
                    fun(T) -> (Share(R2R))(T) ++ "; " ++
                                  bench_report:fmt_float(med(R2R, cpu_cores, T), 2) ++ " cores"
                    end)]
       end
    ++ [Row(io_lib:format("ring: ~b hosts x ~b workers x ~s, s per round (link-bound ~.2f s)",
                          [maps:get(hosts, Ring), maps:get(workers, Ring),
                           bench_report:fmt_mb(maps:get(payload_bytes, Ring)),
                           maps:get(link_bound_s, Ring)]),
            fun(T) -> bench_report:fmt_float(med(RR, wall_s, T), 3) ++ " (CPU " ++
                          bench_report:fmt_float(med(RR, cpu_s, T), 2) ++ " s)" end),
        Row(io_lib:format("link cut ~b s: lost / duplicated / reordered of sent", [maps:get(cut_s, Cfg)]),
            fun(T) ->
                    #{lost := L, duplicated := D, reordered := R, sent := S} = CutOf(T),
                    io_lib:format("~b / ~b / ~b of ~b", [L, D, R, S])
            end),
        Row("link cut: nodedowns; ping max",
            fun(T) ->
                    C = CutOf(T),
                    L = maps:get(latency_us, ping_stats(maps:get(pings, C))),
                    io_lib:format("~b; ~s", [maps:get(nodedowns, C), bench_report:fmt_us(maps:get(max, L, 0))])
            end),
        Row("connections reset (ss -K), link up: lost / duplicated / reordered of sent; nodedowns",
            fun(T) ->
                    #{lost := L, duplicated := D, reordered := R, sent := S, nodedowns := ND,
                      connections_reset := K} = ResetOf(T),
                    io_lib:format("~b / ~b / ~b of ~b; ~b (~b reset)", [L, D, R, S, ND, K])
            end)].

%% tls_bench's scenarios between the hosts of `Net': a TLS node on each for the ring, a
%% TLS pair and a plain pair (pool_size = 1) on hosts 1 and 2 for the stream.
tls_phase(#{quick := Quick}, Net) ->
    Hosts = teleport_netns:hosts(Net),
    Ips = [Ip || #{ip := Ip} <- Hosts],
    Index = maps:from_list([{Ip, I} || #{ip := Ip, index := I} <- Hosts]),
    Start = fun(Name, Ip, Args) ->
                    teleport_netns:start_node(Net, maps:get(Ip, Index), #{name => Name,
                                                                          args => Args})
            end,
    [H1, H2 | _] = Ips,
    tls_bench:run(Quick, #{ring => Ips, pair => [H1, H2], plain => [H1, H2]}, Start).

%%% ----------------------------------------------------------------------------------------
%%% JSON and SVG

to_json(Machine, Cfg, Results, Elapsed) ->
    #{idle := Idle, bulk := Bulk, small := Small, paced := Paced, cut := Cut, reset := Reset,
      rate2 := Rate2, ring := Ring, qdisc := Qdisc, node_events := Events} = Results,
    Ts = [disterl, teleport],
    Dist = fun bench_report:stats/1,
    Rounds = fun(Rs, Keys) -> [maps:with([round, transport | Keys], R) || R <- Rs] end,
    BulkJ = fun(Id, #{rounds := Rs} = B, Rate) ->
                    #{id => Id, link_rate => Rate, senders => maps:get(senders, Cfg),
                      messages_per_sender => maps:get(messages_per_sender, B,
                                                      maps:get(bulk_msgs, Cfg)),
                      message_bytes => maps:get(bulk_bytes, Cfg),
                      nodedowns => maps:get(nodedowns, B, 0),
                      share_of_link => maps:from_list([{T, Dist(over(Rs, share, T))} || T <- Ts]),
                      mb_per_s => maps:from_list([{T, Dist(over(Rs, mb_per_s, T))} || T <- Ts]),
                      cpu_s_per_round => maps:from_list([{T, Dist(over(Rs, cpu_s, T))} || T <- Ts]),
                      disterl_ping => maps:from_list([{T, ping_stats(pings_of(Rs, T))} || T <- Ts]),
                      rounds => Rounds(Rs, [share, mb_per_s, elapsed_us, bytes, cpu_s, cpu_cores,
                                            small_msgs_per_s, small_sent, small_acked])}
            end,
    SmallJ = fun(Id, Sm) -> maps:merge(BulkJ(Id, Sm, maps:get(rate, Cfg)),
                        #{pairs => maps:get(small_pairs, Cfg),
                          small_message_bytes => maps:get(small_msg_bytes, Cfg),
                          small_msgs_per_s => maps:from_list([{T, Dist(over(maps:get(rounds, Sm),
                                                               small_msgs_per_s, T))} || T <- Ts]),
                          small_latency_us => maps:from_list([{T, Dist(lists:append(over(maps:get(rounds, Sm),
                                                                            small_latency_us, T)))
                                               } || T <- Ts]),
                          small_interval_ms => case Id of
                                                   bulk_plus_paced_small -> maps:get(paced_interval_ms, Cfg);
                                                   _ -> flood
                                               end,
                          small_latency => "send (os:system_time) to receive, one message in 8; "
                                           "flooding senders' latency includes their own queue"}) end,
    CutJ = #{id => link_cut, cut_s => maps:get(cut_s, Cfg), senders => maps:get(cut_senders, Cfg),
             interval_ms => maps:get(cut_interval_ms, Cfg),
             message_pad_bytes => maps:get(cut_msg_bytes, Cfg),
             description => "sequenced messages A -> B; host A's eth0 down for cut_s seconds "
                            "3 s in, up again, senders stopped 5 s later; counts read once "
                            "nothing more arrives (15 s) or all arrived. lost = sent - unique "
                            "received; refused = teleport:send returned an error (not sent)",
             transports => [maps:without([pings], C#{disterl_ping => ping_stats(maps:get(pings, C))})
                            || C <- Cut]},
    ResetJ = #{id => connections_reset, senders => maps:get(cut_senders, Cfg),
               description => "the link_cut stream; 3 s in, host A's TCP connections of the "
                              "transport to B (B's dist port or teleport listener) are reset "
                              "with ss -K, the link staying up",
               transports => [maps:without([pings], C#{disterl_ping => ping_stats(maps:get(pings, C))})
                              || C <- Reset]},
    RR = maps:get(rounds, Ring),
    RingJ = #{id => ring, hosts => maps:get(hosts, Ring), workers_per_node => maps:get(workers, Ring),
              payload_bytes => maps:get(payload_bytes, Ring),
              link_bound_s_per_round => maps:get(link_bound_s, Ring),
              seconds_per_round => maps:from_list([{T, Dist(over(RR, wall_s, T))} || T <- Ts]),
              cpu_seconds_per_round => maps:from_list([{T, Dist(over(RR, cpu_s, T))} || T <- Ts]),
              per_worker_trip_us => maps:from_list([{T, Dist(lists:append(over(RR, worker_us, T)))} || T <- Ts]),
              rounds => Rounds(RR, [wall_s, cpu_s])},
    {obj, [{benchmark, "teleport_link"},
           {machine, Machine},
           {link, #{rate => maps:get(rate, Cfg), rate_bits_per_s => maps:get(rate_bits, Cfg),
                    qdisc => Qdisc,
                    shaping => "tc tbf on the egress (eth0) of every host; burst 1 ms at the "
                               "rate (at least 256 KB), latency 10 ms",
                    delay => "none: the kernel has no netem; propagation delay is not emulated",
                    hosts => "network namespaces of one machine, sharing its CPUs"}},
           {config, Cfg},
           {warmup, "warmup_rounds per transport per scenario before the measured rounds, excluded"},
           {scenarios, [#{id => idle_ping, interval_ms => maps:get(ping_interval_ms, Cfg),
                          disterl_ping => maps:get(ping, Idle)},
                        BulkJ(bulk, Bulk, maps:get(rate, Cfg)),
                        SmallJ(bulk_plus_small, Small), SmallJ(bulk_plus_paced_small, Paced),
                        CutJ, ResetJ, RingJ,
                        tls_bench:json(maps:get(tls, Results))]
            ++ case Rate2 of
                   none -> [];
                   #{rate := R2} -> [BulkJ(bulk_second_rate, Rate2, R2)]
               end},
           {node_events, Events},
           {teleport_stats_after, maps:get(teleport_stats, Results)},
           {total_run_time_s, Elapsed}]}.

chart(Machine, Cfg, Results) ->
    #{idle := Idle, bulk := Bulk, small := Small, paced := Paced, cut := Cut, reset := Reset,
      rate2 := Rate2, ring := Ring} = Results,
    Ts = [disterl, teleport],
    Bar = fun(Label, Series, Vs) ->
                  #{label => Label, series => Series, value => bench_report:median(Vs),
                    lo => bench_report:pct(Vs, 0.1), hi => bench_report:pct(Vs, 0.9)}
          end,
    Two = fun(Rs, K, Scale) -> [Bar(atom_to_list(T), T, [V * Scale || V <- over(Rs, K, T)])
                                || T <- Ts] end,
    Caption = "whiskers: p10-p90 over the measured rounds",
    LatBar = fun(Label, Series, Us) ->
                     S = bench_report:stats(Us),
                     Ms = fun(K) -> maps:get(K, S, 0) / 1000 end,
                     #{label => Label, series => Series, value => Ms(p99), lo => Ms(p50),
                       hi => Ms(max)}
             end,
    PingUs = fun(Samples) -> [L || {_, L, _} <- Samples] end,
    BR = maps:get(rounds, Bulk),
    SR = maps:get(rounds, Small),
    Rate = maps:get(rate, Cfg),
    Panels =
        [#{title => "Bulk 4 x 10 MB A->B: share of " ++ Rate, unit => "% of the link rate",
           caption => Caption, top => 100, bars => Two(BR, share, 100)},
         #{title => "Disterl ping p99 during the bulk", unit => "ms", better => lower,
           caption => "bar: p99; whisker: p50 to max",
           bars => [LatBar("idle", other, PingUs(maps:get(pings, Idle))),
                    LatBar("bulk: disterl", disterl, PingUs(pings_of(BR, disterl))),
                    LatBar("bulk: teleport", teleport, PingUs(pings_of(BR, teleport)))]},
         #{title => "100 B msgs/s while the link is full", unit => "msgs/s",
           caption => Caption, bars => Two(SR, small_msgs_per_s, 1)},
         #{title => "100 B latency p99, link full, flooding", unit => "ms", better => lower,
           caption => "bar: p99; whisker: p50 to max",
           bars => [LatBar(atom_to_list(T), T, lists:append(over(SR, small_latency_us, T)))
                    || T <- Ts]},
         #{title => "100 B latency p99, link full, paced", unit => "ms", better => lower,
           caption => "8 pairs, one message per ms each; bar: p99; whisker: p50 to max",
           bars => [LatBar(atom_to_list(T), T,
                           lists:append(over(maps:get(rounds, Paced), small_latency_us, T)))
                    || T <- Ts]},
         #{title => io_lib:format("Ring over ~b hosts: s per round", [maps:get(hosts, Ring)]),
           unit => "seconds", better => lower, caption => Caption,
           bars => Two(maps:get(rounds, Ring), wall_s, 1)},
         #{title => io_lib:format("Link cut ~b s, reset: messages lost", [maps:get(cut_s, Cfg)]),
           unit => "messages (of about " ++
               integer_to_list(lists:max([S || #{sent := S} <- Cut])) ++ " sent)",
           better => lower, caption => "one cut, one reset per transport; lost = sent - received",
           bars => [#{label => atom_to_list(K), series => T, value => L}
                    || #{transport := T, kind := K, lost := L} <- Cut ++ Reset]}]
        ++ case Rate2 of
               none -> [];
               #{rate := R2, rounds := R2R} ->
                   [#{title => "Bulk at " ++ R2 ++ ": share of the link",
                      unit => "% of the link rate", top => 100,
                      caption => Caption ++ "; below 90%: CPU-bound",
                      bars => Two(R2R, share, 100)}]
           end,
    Title = "teleport vs distributed Erlang over a shaped link (" ++ Rate ++ ")",
    Sub = io_lib:format("~s; hosts in network namespaces of one ~b-core machine, tc tbf, no "
                        "delay; OTP ~s; load average at start ~s, at end ~s",
                        [maps:get(timestamp, Machine), maps:get(cores, Machine),
                         maps:get(otp_release, Machine), maps:get(loadavg_start, Machine),
                         maps:get(loadavg_end, Machine)]),
    bench_report:svg(Title, Sub, Panels,
                     #{legend => [{disterl, "disterl (!)"}, {teleport, "teleport"},
                                  {other, "idle"}],
                       footer => "bars: median over measured rounds (warm-up excluded) unless "
                                 "the caption says otherwise; teleport in blue, disterl in "
                                 "orange"}).
