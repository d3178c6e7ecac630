%% The TLS part of `make bench' and of `make bench-net': teleport over TLS against disterl
%% over TLS (`inet_tls_dist'), on nodes of their own whose disterl runs over TLS and whose
%% teleport takes the same files (its default beside `-ssl_dist_optfile'):
%% - one stream of 10 MB messages, one sender (pool_size = 1), with teleport plain's figure
%%   from the same run beside it (`make bench': its own stream scenario; `make bench-net':
%%   two plain nodes on the same hosts, in the same rounds);
%% - 100-byte messages, 8 pairs;
%% - a ring sized so that disterl-TLS rounds stay well under 20 s.
%%
%% The benchmark makes its own CA and one certificate for every host (teleport_certs) in a
%% temporary directory, removed at the end. The controlling node's disterl is plain and
%% cannot talk to those nodes: it drives them over their standard I/O (peer's `standard_io'
%% connection), and each scenario runs from one of them over their TLS disterl (the
%% functions exported for that).
-module(tls_bench).

-export([run/1, run/3, print/1, json/1, targets/1, targets/2]).
%% Run on the TLS nodes.
-export([connect/1, stream/4, small/5, ring_setup/3, ring_round/3, ring_teardown/1]).

-define(MiB, 1048576).

%% @doc The scenarios on nodes of this machine; the results for print/1, json/1 and
%% targets/2.
run(#{quick := Quick}) ->
    [_, Host] = string:split(atom_to_list(node()), "@"),
    Start = fun(Name, _Host, Args) ->
                    {ok, Peer, Node} =
                        peer:start(#{name => Name, connection => standard_io, wait_boot => 60000,
                                     args => ["-setcookie", atom_to_list(erlang:get_cookie()),
                                              "-connect_all", "false", "-pa" | code:get_path()]
                                     ++ Args}),
                    {Peer, Node}
            end,
    run(Quick, #{ring => [Host || _ <- lists:seq(1, 6)], pair => [Host, Host]}, Start).

%% @doc The scenarios on nodes that `Start(Name, Host, Args)' starts (`{Peer, Node}', driven
%% over standard I/O, `Args' added to its command line) on the hosts of `Hosts': `ring' (one
%% node each), `pair' (the stream's sender and receiver, pool_size = 1) and, if given,
%% `plain': where two plain nodes (pool_size = 1) run the stream over plain teleport in the
%% same rounds.
run(Quick, Hosts, Start) ->
    Cfg = config(Quick, length(maps:get(ring, Hosts))),
    Dir = filename:join("/tmp", "teleport_tls_bench_" ++ os:getpid()),
    ok = filelib:ensure_path(Dir),
    try
        OptFile = optfile(Dir, lists:usort(lists:append(maps:values(Hosts)))),
        Tls = ["-proto_dist", "inet_tls", "-ssl_dist_optfile", OptFile],
        Specs = [{ring, H, Tls, []} || H <- maps:get(ring, Hosts)] ++
            [{pair, H, Tls, [{pool_size, 1}]} || H <- maps:get(pair, Hosts)] ++
            [{plain, H, [], [{pool_size, 1}]} || H <- maps:get(plain, Hosts, [])],
        ring_bench:step("tls: starting ~b nodes whose disterl runs over TLS "
                        "(-proto_dist inet_tls -ssl_dist_optfile), teleport taking the same "
                        "files; 2 of them with pool_size = 1~s",
                        [maps:get(ring_nodes, Cfg) + 2,
                         [" (and 2 plain nodes, pool_size = 1)" || maps:is_key(plain, Hosts)]]),
        Nodes = boot(Specs, Start),
        try scenarios(Cfg, Nodes)
        after [catch peer:stop(P) || {P, _} <- lists:append(maps:values(Nodes))]
        end
    after
        _ = file:del_dir_r(Dir)
    end.

config(Quick, RingNodes) ->
    Q = fun(Full, Small) -> case Quick of true -> Small; false -> Full end end,
    #{ring_nodes => RingNodes, ring_workers => 2,
      ring_bytes => ring_bench:env_int("TLS_RING_BYTES", Q(10 * ?MiB, ?MiB)),
      ring_rounds => ring_bench:env_int("TLS_RING_ROUNDS", Q(3, 1)),
      %% Per transport: disterl TLS moves 10 MB messages at tens of MB/s, and 40 of them
      %% take teleport TLS a few tenths of a second (10 took a tenth, too short a round to
      %% be read).
      stream_frames => #{disterl => ring_bench:env_int("TLS_STREAM_FRAMES", Q(10, 3)),
                         teleport => ring_bench:env_int("TLS_STREAM_FRAMES_TELEPORT", Q(40, 10))},
      stream_bytes => 10 * ?MiB,
      stream_rounds => ring_bench:env_int("TLS_STREAM_ROUNDS", Q(3, 1)),
      small_pairs => 8, small_count => ring_bench:env_int("TLS_SMALL_COUNT", Q(25000, 2000)),
      small_rounds => ring_bench:env_int("TLS_SMALL_ROUNDS", Q(3, 1))}.

scenarios(Cfg, #{ring := Ring, pair := Pair} = Nodes) ->
    [{P1, A}, {_, B} | _] = Ring,
    Senders = #{disterl => Pair, teleport => Pair, plain => maps:get(plain, Nodes, [])},
    [{_, SA}, {_, SB}] = Pair,
    #{stream_frames := F, stream_bytes := Size, stream_rounds := SR} = Cfg,
    StreamTs = [disterl, teleport] ++ [plain || maps:is_key(plain, Nodes)],
    ring_bench:step("tls stream: 10 MB messages (~b over disterl TLS, ~b over teleport TLS~s "
                    "a round), ~s -> ~s", [maps:get(disterl, F), maps:get(teleport, F),
                                           [" and plain" || maps:is_key(plain, Nodes)], SA, SB]),
    Stream = rounds(SR, StreamTs,
                    fun(T) ->
                            [{S1, _}, {_, To}] = maps:get(T, Senders),
                            Over = case T of plain -> teleport; _ -> T end,
                            N = maps:get(Over, F),
                            {Us, Got} = call(S1, stream, [Over, To, N, Size]),
                            Got =:= N * Size orelse erlang:error({tls_stream_lost, T, Got}),
                            #{gb_per_s => Got / Us / 1000}
                    end, gb_per_s, "GB/s"),
    #{small_pairs := Pairs, small_count := Count, small_rounds := SmR} = Cfg,
    ring_bench:step("tls small: ~b pairs ~s -> ~s, ~b messages of 100 bytes per sender",
                    [Pairs, A, B, Count]),
    Small = rounds(SmR, [disterl, teleport],
                   fun(T) ->
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
    RingR = rounds(RR, [disterl, teleport],
                   fun(T) -> #{wall_s => call(P1, ring_round, [Workers, T, Bytes]) / 1.0e6} end,
                   wall_s, "s"),
    _ = call(P1, ring_teardown, [Workers]),
    Cfg#{stream => Stream, small => Small, ring => RingR}.

%% A warm-up of each transport of `Ts', then `N' rounds, rotating which goes first: the
%% rounds.
rounds(N, Ts, Run, Key, Unit) ->
    Once = fun(T, Label) ->
                   R = Run(T),
                   ring_bench:step("tls ~s ~-8s ~s ~s", [Label, T, bench_report:fmt_float(
                                                                      maps:get(Key, R), 3),
                                                         Unit]),
                   R#{transport => T}
           end,
    _ = [Once(T, "warm-up") || T <- Ts],
    lists:append([[maps:put(round, R, Once(T, io_lib:format("round ~b/~b", [R, N])))
                   || T <- rotate(R - 1, Ts)]
                  || R <- lists:seq(1, N)]).

rotate(K, Ts) ->
    {A, B} = lists:split(K rem length(Ts), Ts),
    B ++ A.

%% A call on a TLS node, over its standard I/O.
call(Peer, F, A) ->
    peer:call(Peer, ?MODULE, F, A, 600000).

%% The CA, one certificate for every host of `Hosts' and the optfile.
optfile(Dir, Hosts) ->
    Ca = teleport_certs:ca("teleport bench CA"),
    Files = teleport_certs:issue(Dir, "node", Ca, Hosts, []),
    teleport_certs:optfile(filename:join(Dir, "ssl_dist.conf"), Files).

%% Starts a node for each `{Set, Host, Args, Env}' of `Specs' (`Start', as run/3 takes it),
%% sets `Env' in its teleport and starts it, and connects every node to the others of its
%% set: `#{Set => [{Peer, Node}]}'.
boot(Specs, Start) ->
    Parent = self(),
    Pids = [spawn(fun() ->
                          Name = lists:concat(["tb", os:getpid(), "_", Set, I]),
                          Parent ! {booted, self(), catch Start(Name, Host, Args)}
                  end) || {I, {Set, Host, Args, _}} <- lists:enumerate(Specs)],
    Booted = [receive {booted, P, {Peer, Node}} when is_pid(Peer) -> {Peer, Node};
                      {booted, P, Failed} -> erlang:error({tls_peer_boot_failed, Failed})
              after 120000 -> error(tls_peer_boot_timeout)
              end || P <- Pids],
    [begin
         [ok = peer:call(Peer, application, set_env, [teleport, K, V]) || {K, V} <- Env],
         ok = peer:call(Peer, teleport, start, [])
     end || {{_, _, _, Env}, {Peer, _}} <- lists:zip(Specs, Booted)],
    Sets = lists:zip([S || {S, _, _, _} <- Specs], Booted),
    Nodes = maps:groups_from_list(fun({S, _}) -> S end, fun({_, B}) -> B end, Sets),
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

%% @doc targets/2 against the plain stream of the same rounds (run/3 with `plain' hosts).
targets(#{stream := St} = R) ->
    targets(R, med(St, plain, gb_per_s)).

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
    _ = [io:format("  ~-40s teleport plain ~s GB/s on the same hosts: TLS / plain ~s~n",
                   ["", bench_report:fmt_float(med(St, plain, gb_per_s), 3),
                    bench_report:fmt_ratio(med(St, teleport, gb_per_s) /
                                               med(St, plain, gb_per_s))])
         || lists:any(fun(#{transport := T}) -> T =:= plain end, St)],
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
                                  || T <- lists:usort([T || #{transport := T} <- Rounds])])
          end,
    #{id => tls,
      description => "teleport over TLS (rustls, TLS 1.3) vs disterl over TLS (inet_tls_dist), "
                     "on nodes whose disterl runs over TLS and whose teleport takes the same "
                     "-ssl_dist_optfile",
      config => maps:without([stream, small, ring], R),
      stream_gb_per_s => Per(maps:get(stream, R), gb_per_s),
      small_msgs_per_s => Per(maps:get(small, R), msgs_per_s),
      ring_seconds_per_round => Per(maps:get(ring, R), wall_s)}.
