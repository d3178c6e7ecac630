%% The TLS part of `make bench': teleport over TLS against disterl over TLS
%% (`inet_tls_dist'), on nodes of their own whose disterl runs over TLS and whose teleport
%% takes the same files (its default beside `-ssl_dist_optfile'):
%% - one stream of 10 MB messages, one sender (pool_size = 1), with teleport plain's figure
%%   from the same run beside it;
%% - 100-byte messages, 8 pairs;
%% - a ring sized so that disterl-TLS rounds stay well under 20 s.
%%
%% The benchmark makes its own CA and certificates (teleport_certs) in a temporary
%% directory, removed at the end. This node's disterl is plain and cannot talk to those
%% nodes: it drives them over their standard I/O (peer's `standard_io' connection), and each
%% scenario runs from one of them over their TLS disterl (the functions exported for that).
-module(tls_bench).

-export([run/1, print/1, json/1, targets/2]).
%% Run on the TLS nodes.
-export([connect/1, stream/4, small/5, ring_setup/3, ring_round/3, ring_teardown/1]).

-define(MiB, 1048576).

%% @doc Runs the scenarios; the results for print/1, json/1 and targets/2.
run(#{quick := Quick}) ->
    Q = fun(Full, Small) -> case Quick of true -> Small; false -> Full end end,
    Cfg = #{ring_nodes => 6, ring_workers => 2,
            ring_bytes => ring_bench:env_int("TLS_RING_BYTES", Q(10 * ?MiB, ?MiB)),
            ring_rounds => ring_bench:env_int("TLS_RING_ROUNDS", Q(3, 1)),
            %% Per transport: disterl TLS moves 10 MB messages at tens of MB/s, and 40 of
            %% them take teleport TLS a few tenths of a second (10 took a tenth, too short
            %% a round to be read).
            stream_frames => #{disterl => ring_bench:env_int("TLS_STREAM_FRAMES", Q(10, 3)),
                               teleport => ring_bench:env_int("TLS_STREAM_FRAMES_TELEPORT",
                                                              Q(40, 10))},
            stream_bytes => 10 * ?MiB,
            stream_rounds => ring_bench:env_int("TLS_STREAM_ROUNDS", Q(3, 1)),
            small_pairs => 8, small_count => ring_bench:env_int("TLS_SMALL_COUNT", Q(25000, 2000)),
            small_rounds => ring_bench:env_int("TLS_SMALL_ROUNDS", Q(3, 1))},
    Dir = filename:join("/tmp", "teleport_tls_bench_" ++ os:getpid()),
    ok = filelib:ensure_path(Dir),
    try
        OptFile = optfile(Dir),
        ring_bench:step("tls: starting ~b nodes whose disterl runs over TLS "
                        "(-proto_dist inet_tls -ssl_dist_optfile), teleport taking the same "
                        "files; 2 of them with pool_size = 1", [maps:get(ring_nodes, Cfg) + 2]),
        Nodes = boot(OptFile, maps:get(ring_nodes, Cfg)),
        try scenarios(Cfg, Nodes)
        after [catch peer:stop(P) || {P, _} <- maps:get(ring, Nodes) ++ maps:get(pair, Nodes)]
        end
    after
        _ = file:del_dir_r(Dir)
    end.

scenarios(Cfg, #{ring := Ring, pair := Pair}) ->
    [{P1, A}, {_, B} | _] = Ring,
    [{S1, SA}, {_, SB}] = Pair,
    #{stream_frames := F, stream_bytes := Size, stream_rounds := SR} = Cfg,
    ring_bench:step("tls stream: 10 MB messages (~b over disterl TLS, ~b over teleport TLS "
                    "a round), ~s -> ~s", [maps:get(disterl, F), maps:get(teleport, F), SA, SB]),
    Stream = rounds(SR, fun(T) ->
                                N = maps:get(T, F),
                                {Us, Got} = call(S1, stream, [T, SB, N, Size]),
                                Got =:= N * Size orelse erlang:error({tls_stream_lost, T, Got}),
                                #{gb_per_s => Got / Us / 1000}
                        end, gb_per_s, "GB/s"),
    #{small_pairs := Pairs, small_count := Count, small_rounds := SmR} = Cfg,
    ring_bench:step("tls small: ~b pairs ~s -> ~s, ~b messages of 100 bytes per sender",
                    [Pairs, A, B, Count]),
    Small = rounds(SmR, fun(T) ->
                                {Us, Acks} = call(P1, small, [T, B, Pairs, Count,
                                                              bench_agent:message(100)]),
                                [erlang:error({tls_small_lost, T, Acks}) || N <- Acks, N =/= Count],
                                #{msgs_per_s => Pairs * Count / (Us / 1.0e6)}
                        end, msgs_per_s, "msgs/s"),
    #{ring_workers := W, ring_bytes := Bytes, ring_rounds := RR} = Cfg,
    RingNodes = [N || {_, N} <- Ring],
    ring_bench:step("tls ring: ~b nodes x ~b workers x ~s", [length(RingNodes), W,
                                                            bench_report:fmt_mb(Bytes)]),
    Workers = call(P1, ring_setup, [RingNodes, W, Bytes]),
    RingR = rounds(RR, fun(T) -> #{wall_s => call(P1, ring_round, [Workers, T, Bytes]) / 1.0e6}
                       end, wall_s, "s"),
    _ = call(P1, ring_teardown, [Workers]),
    Cfg#{stream => Stream, small => Small, ring => RingR}.

%% A warm-up of each transport, then `N' rounds, alternating which goes first: the rounds.
rounds(N, Run, Key, Unit) ->
    Once = fun(T, Label) ->
                   R = Run(T),
                   ring_bench:step("tls ~s ~-8s ~s ~s", [Label, T, bench_report:fmt_float(
                                                                      maps:get(Key, R), 3),
                                                         Unit]),
                   R#{transport => T}
           end,
    _ = [Once(T, "warm-up") || T <- [disterl, teleport]],
    lists:append([[maps:put(round, R, Once(T, io_lib:format("round ~b/~b", [R, N])))
                   || T <- case R rem 2 of 1 -> [disterl, teleport]; 0 -> [teleport, disterl] end]
                  || R <- lists:seq(1, N)]).

%% A call on a TLS node, over its standard I/O.
call(Peer, F, A) ->
    peer:call(Peer, ?MODULE, F, A, 600000).

%% The CA, one certificate for this host (every node is on it) and the optfile.
optfile(Dir) ->
    [_, Host] = string:split(atom_to_list(node()), "@"),
    Ca = teleport_certs:ca("teleport bench CA"),
    Files = teleport_certs:issue(Dir, "node", Ca, Host, []),
    teleport_certs:optfile(filename:join(Dir, "ssl_dist.conf"), Files).

%% Boots `N' ring nodes and a pair with pool_size = 1, all over TLS disterl, teleport
%% started on each, every node connected to the others of its set.
boot(OptFile, N) ->
    Args = ["-proto_dist", "inet_tls", "-ssl_dist_optfile", OptFile,
            "-setcookie", atom_to_list(erlang:get_cookie()), "-connect_all", "false",
            "-pa" | code:get_path()],
    Specs = [{ring, I, []} || I <- lists:seq(1, N)] ++ [{pair, I, [{pool_size, 1}]} || I <- [1, 2]],
    Parent = self(),
    Pids = [spawn(fun() ->
                          Name = list_to_atom(lists:concat(["tb", os:getpid(), "_", Set, I])),
                          Parent ! {booted, self(), peer:start(#{name => Name, args => Args,
                                                                 connection => standard_io,
                                                                 wait_boot => 60000})}
                  end) || {Set, I, _} <- Specs],
    Booted = [receive {booted, P, {ok, Peer, Node}} -> {Peer, Node}
              after 120000 -> error(tls_peer_boot_timeout)
              end || P <- Pids],
    [begin
         [ok = peer:call(Peer, application, set_env, [teleport, K, V]) || {K, V} <- Env],
         ok = peer:call(Peer, teleport, start, [])
     end || {{_, _, Env}, {Peer, _}} <- lists:zip(Specs, Booted)],
    Sets = lists:zip([S || {S, _, _} <- Specs], Booted),
    Nodes = #{ring => [B || {ring, B} <- Sets], pair => [B || {pair, B} <- Sets]},
    [ok = peer:call(Peer, ?MODULE, connect, [[Nd || {_, Nd} <- Set]])
     || Set <- maps:values(Nodes), {Peer, _} <- Set],
    Nodes.

%%% ----------------------------------------------------------------------------------------
%%% On the TLS nodes

%% @doc Connects this node to every node of `Nodes' over (TLS) disterl.
connect(Nodes) ->
    [true = net_kernel:connect_node(N) || N <- Nodes, N =/= node()],
    ok.

%% @doc `F' messages of `Size' bytes from here to `To' over `T': {Us, BytesReceived}.
stream(T, To, F, Size) ->
    ok = bench_agent:gc_all(),
    ok = erpc:call(To, bench_agent, gc_all, []),
    {ok, Rcv} = erpc:call(To, bench_agent, stream_receiver, [T, F]),
    bench_agent:stream_run(T, Rcv, F, Size).

%% @doc `Pairs' senders here, each sending `Count' `Msg's to a receiver of its own on `To'
%% over `T': {Us, Acks}.
small(T, To, Pairs, Count, Msg) ->
    ok = bench_agent:gc_all(),
    Receivers = [erpc:call(To, bench_agent, small_receiver, []) || _ <- lists:seq(1, Pairs)],
    try bench_agent:small_run(T, Receivers, Count, Msg)
    after [R ! stop || R <- Receivers]
    end.

%% @doc `W' ring workers on each of `Nodes' (the ring, in order), each with a payload of
%% `Bytes', primed over both transports: the workers.
ring_setup(Nodes, W, Bytes) ->
    Workers = [begin
                   {ok, _} = erpc:call(N, bench_agent, start_ring_worker, [I, Nodes]),
                   {N, I}
               end || N <- Nodes, I <- lists:seq(1, W)],
    [begin
         {_, Primed} = ring_bench:run_ring(Workers, T, prime, 60000),
         ok = ring_bench:check_ring(T, Primed, Workers)
     end || T <- [disterl, teleport]],
    [ok = gen_server:call({bench_agent:ring_name(I), N}, {prepare, Bytes}, 60000)
     || {N, I} <- Workers],
    Workers.

%% @doc One round of the ring over `T': microseconds from the first go to the last done.
ring_round(Workers, T, Bytes) ->
    [ok = erpc:call(N, bench_agent, gc_all, []) || N <- lists:usort([N || {N, _} <- Workers])],
    Timeout = 120000 + Bytes div 1000 * length(Workers) div 10,
    {Us, Res} = ring_bench:run_ring(Workers, T, bulk, Timeout),
    ok = ring_bench:check_ring(T, Res, Workers),
    Us.

%% @doc Stops the ring workers.
ring_teardown(Workers) ->
    [gen_server:stop({bench_agent:ring_name(I), N}) || {N, I} <- Workers],
    ok.

%%% ----------------------------------------------------------------------------------------
%%% Results

med(Rounds, T, K) ->
    bench_report:median([maps:get(K, R) || #{transport := T1} = R <- Rounds, T1 =:= T]).

%% @doc The TLS targets of the TLS issue, as same-run ratios; `PlainGbps': one stream of
%% teleport plain (pool_size = 1) measured in the same run.
targets(#{stream := St, small := Sm, ring := Ri}, PlainGbps) ->
    StreamX = med(St, teleport, gb_per_s) / med(St, disterl, gb_per_s),
    PlainShare = med(St, teleport, gb_per_s) / PlainGbps,
    RingX = med(Ri, teleport, wall_s) / med(Ri, disterl, wall_s),
    SmallX = med(Sm, teleport, msgs_per_s) / med(Sm, disterl, msgs_per_s),
    [#{name => "TLS 10 MB stream >= 10 x disterl TLS", value => StreamX, unit => "x",
       pass => StreamX >= 10},
     #{name => "TLS 10 MB stream >= 0.5 x teleport plain", value => PlainShare, unit => "x",
       pass => PlainShare >= 0.5},
     #{name => "TLS ring <= 0.2 x disterl TLS time", value => RingX, unit => "x",
       pass => RingX =< 0.2},
     #{name => "TLS small msgs, 8 pairs >= 1.0 x disterl TLS", value => SmallX, unit => "x",
       pass => SmallX >= 1.0}].

%% @doc The table of the summary.
print(#{stream := St, small := Sm, ring := Ri} = R) ->
    io:format("~nTLS: teleport over TLS (rustls) vs disterl over TLS (inet_tls_dist), nodes of "
              "their own; ratio = teleport / disterl~n"),
    io:format("  ~s~n", [lists:duplicate(96, $-)]),
    Row = fun(Label, Rounds, K, Fmt) ->
                  D = med(Rounds, disterl, K), T = med(Rounds, teleport, K),
                  io:format("  ~-40s disterl TLS ~12s   teleport TLS ~12s   ratio ~s~n",
                            [Label, Fmt(D), Fmt(T), bench_report:fmt_ratio(T / D)])
          end,
    Row("one stream of 10 MB messages, GB/s", St, gb_per_s,
        fun(V) -> bench_report:fmt_float(V, 3) end),
    Row("small, 8 pairs x 100 B, msgs/s", Sm, msgs_per_s, fun bench_report:fmt_rate/1),
    Row(io_lib:format("ring ~b x ~b x ~s, s per round",
                      [maps:get(ring_nodes, R), maps:get(ring_workers, R),
                       bench_report:fmt_mb(maps:get(ring_bytes, R))]),
        Ri, wall_s, fun(V) -> bench_report:fmt_float(V, 3) end),
    ok.

%% @doc The scenario for latest.json.
json(R) ->
    Per = fun(Rounds, K) ->
                  maps:from_list([{T, #{median => med(Rounds, T, K),
                                        rounds => [maps:get(K, X) || #{transport := T1} = X <- Rounds,
                                                                     T1 =:= T]}}
                                  || T <- [disterl, teleport]])
          end,
    #{id => tls,
      description => "teleport over TLS (rustls, TLS 1.3) vs disterl over TLS (inet_tls_dist), "
                     "on nodes whose disterl runs over TLS and whose teleport takes the same "
                     "-ssl_dist_optfile",
      config => maps:without([stream, small, ring], R),
      stream_gb_per_s => Per(maps:get(stream, R), gb_per_s),
      small_msgs_per_s => Per(maps:get(small, R), msgs_per_s),
      ring_seconds_per_round => Per(maps:get(ring, R), wall_s)}.
