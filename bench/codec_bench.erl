%% @doc The codec benchmark: `teleport_codec:encode/1' against `erlang:term_to_iovec/1' and
%% `teleport_codec:decode/1' against `erlang:binary_to_term/1', on the same inputs.
%%
%% Cases:
%%   a      `{msg, <<10 MB random>>}'
%%   a'     `{msg, <<100 MB random>>}' (with a: encode/decode time must not grow with size)
%%   b      a structured term of about 1 MB (term_to_binary size): a list of tuples of atoms,
%%          small integers, short binaries, small maps and floats
%%   c      a ~100-byte `{'$gen_call', {Pid, Ref}, {get, <<"some key">>, 42}}' message
%% Then a breakdown of b by term shape (atoms / integers / binaries / maps / floats) and of c
%% (with and without the pid and reference), to show where time goes.
%%
%% Each function is warmed up, then sampled for a bounded time in its own fresh process.
%% Fast operations are timed in batches (the batch size is picked so that one sample takes
%% about 200 us) and every sample is divided by its batch size. The decode input is always
%% `term_to_binary(Term)'. Ratios are teleport/VM of median throughput: > 1.0 means teleport
%% is faster. Results also go to `bench/results/codec.json'.
%%
%% Run with `make bench-codec', or `codec_bench:main()' with teleport's ebin on the path.
-module(codec_bench).

-export([main/0, main/1]).

%% Time spent sampling one function on one case, and warming it up before.
-define(MEASURE_MS, 1500).
-define(WARMUP_MS, 300).
%% The shorter budget of the shape breakdown.
-define(SHAPE_MEASURE_MS, 500).
-define(SHAPE_WARMUP_MS, 100).
%% Target duration of one sample: fast operations are batched up to this.
-define(SAMPLE_TARGET_NS, 200000).
-define(MAX_BATCH, 10000).

-define(MB, 1000000).

%% @doc Runs the whole benchmark (cases, shape breakdown, summary table, JSON file).
main() ->
    main(#{}).

%% @doc As `main/0'; options: `shapes => false' skips the shape breakdown,
%% `json => Path' writes the results elsewhere.
main(Opts) when is_map(Opts) ->
    T0 = erlang:monotonic_time(millisecond),
    ok = ensure_loaded(),
    Machine = machine_info(),
    print_machine(Machine),
    rand:seed(exsss, {17, 42, 4711}),
    Cases = cases(),
    io:format("~ninputs (size = byte_size(term_to_binary(Term))):~n"),
    [io:format("  ~-3s ~-52s ~12s bytes~n", [Id, Desc, fmt_int(Size)])
     || #{id := Id, desc := Desc, size := Size} <- Cases],
    lists:foreach(fun check_roundtrip/1, Cases),
    io:format("~nround trips checked: encode -> binary_to_term and decode =:= original~n"),
    Results = [run_case(C, ?WARMUP_MS, ?MEASURE_MS) || C <- Cases],
    [BigCase] = [C || #{id := "a'"} = C <- Cases],
    ZeroCopy = zero_copy_check(BigCase),
    Shapes = case maps:get(shapes, Opts, true) of
                 true ->
                     io:format("~n==== shape breakdown (~b ms per function) ====~n",
                               [?SHAPE_MEASURE_MS]),
                     [run_case(C, ?SHAPE_WARMUP_MS, ?SHAPE_MEASURE_MS) || C <- shape_cases()];
                 false ->
                     []
             end,
    Targets = targets(Results),
    print_summary(Results, Shapes, Targets, ZeroCopy),
    Elapsed = erlang:monotonic_time(millisecond) - T0,
    io:format("~ntotal run time: ~.1f s~n", [Elapsed / 1000]),
    Path = maps:get(json, Opts, json_path()),
    write_json(Path, Machine, Results, Shapes, Targets, ZeroCopy, Elapsed),
    io:format("results written to ~ts~n", [Path]),
    ok.

ensure_loaded() ->
    case code:ensure_loaded(teleport_nif) of
        {module, teleport_nif} -> ok;
        Error -> erlang:error({teleport_nif_not_loaded, Error})
    end.

%%% ----------------------------------------------------------------------------------------
%%% Inputs

cases() ->
    Ten = random_bytes(10 * ?MB),
    Hundred = random_bytes(100 * ?MB),
    [mk_case("a", "{msg, <<10 MB random>>}", {msg, Ten}),
     mk_case("a'", "{msg, <<100 MB random>>}", {msg, Hundred}),
     mk_case("b", "structured list of tuples, ~1 MB", structured(?MB)),
     mk_case("c", "{'$gen_call', {Pid, Ref}, {get, <<\"some key\">>, 42}}", small_call())].

mk_case(Id, Desc, Term) ->
    Bin = term_to_binary(Term),
    #{id => Id, desc => Desc, term => Term, bin => Bin, size => byte_size(Bin)}.

random_bytes(N) ->
    try crypto:strong_rand_bytes(N)
    catch _:_ -> rand:bytes(N)
    end.

small_call() ->
    {'$gen_call', {self(), make_ref()}, {get, <<"some key">>, 42}}.

%% A list of records as an application might send them, about `Target' bytes encoded.
structured(Target) ->
    Sample = [record(I) || I <- lists:seq(1, 1000)],
    PerRecord = (byte_size(term_to_binary(Sample)) - 6) / 1000,
    N = round(Target / PerRecord),
    [record(I) || I <- lists:seq(1, N)].

record(I) ->
    Status = element(1 + (I rem 5), {active, idle, blocked, pending, deleted}),
    Kind = element(1 + (I rem 3), {user, group, service}),
    Name = rand_bin(5 + rand:uniform(36) - 1),
    Meta = #{id => I rem 1000,
             weight => rand:uniform(100),
             region => element(1 + (I rem 4), {eu, us, asia, other}),
             tag => rand_bin(5 + rand:uniform(10))},
    {Kind, I, Status, Name, Meta, rand:uniform() * 1000.0, rand:uniform(255)}.

rand_bin(N) ->
    list_to_binary([$a + rand:uniform(26) - 1 || _ <- lists:seq(1, N)]).

%% Case b taken apart by field, and case c without its pid and reference.
shape_cases() ->
    Recs = structured(?MB),
    Field = fun(K) -> [element(K, R) || R <- Recs] end,
    Atoms = [{element(1, R), element(3, R), maps:get(region, element(5, R))} || R <- Recs],
    Ints = [{element(2, R), element(7, R), maps:get(weight, element(5, R))} || R <- Recs],
    [mk_case("b", "structured (as above)", Recs),
     mk_case("b.atom", "[{Kind, Status, Region}] atoms only", Atoms),
     mk_case("b.int", "[{Id, 0..255, 1..100}] small integers only", Ints),
     mk_case("b.bin", "[Name] binaries of 5-40 bytes", Field(4)),
     mk_case("b.map", "[#{id, weight, region, tag}] 4-key maps", Field(5)),
     mk_case("b.flt", "[Float] floats", Field(6)),
     mk_case("b.tup", "[{Kind, Id}] 2-tuples atom+int", [{element(1, R), element(2, R)} || R <- Recs]),
     mk_case("c", "{'$gen_call', {Pid, Ref}, {get, Key, 42}}", small_call()),
     mk_case("c.nopid", "{'$gen_call', {from, 1234}, {get, Key, 42}}",
             {'$gen_call', {from, 1234}, {get, <<"some key">>, 42}}),
     mk_case("c.pid", "Pid alone", self()),
     mk_case("c.ref", "Ref alone", make_ref())].

check_roundtrip(#{id := Id, term := Term, bin := Bin}) ->
    Enc = teleport_codec:encode(Term),
    Term =:= binary_to_term(iolist_to_binary(Enc)) orelse
        erlang:error({encode_roundtrip_failed, Id}),
    Term =:= teleport_codec:decode(Bin) orelse
        erlang:error({decode_roundtrip_failed, Id}),
    ok.

%%% ----------------------------------------------------------------------------------------
%%% Measurement

fns() ->
    [{encode, teleport, fun teleport_codec:encode/1},
     {encode, vm, fun erlang:term_to_iovec/1},
     {decode, teleport, fun teleport_codec:decode/1},
     {decode, vm, fun erlang:binary_to_term/1}].

run_case(#{id := Id, desc := Desc, term := Term, bin := Bin, size := Size}, WarmMs, MeasureMs) ->
    erlang:garbage_collect(),
    io:format("~n--- ~s: ~s (~s bytes) ---~n", [Id, Desc, fmt_int(Size)]),
    io:format("  ~-6s ~-8s ~7s ~6s ~10s ~10s ~10s ~10s ~10s ~12s ~10s~n",
              ["op", "impl", "samples", "batch", "min", "p50", "p90", "p99", "max",
               "ops/s", "MB/s"]),
    Stats = [begin
                 Input = case Op of encode -> Term; decode -> Bin end,
                 S = measure(F, Input, WarmMs, MeasureMs, Size),
                 print_stats(Op, Impl, S),
                 erlang:garbage_collect(),
                 {{Op, Impl}, S}
             end || {Op, Impl, F} <- fns()],
    Ratio = fun(Op) ->
                    #{p50 := Tel} = proplists:get_value({Op, teleport}, Stats),
                    #{p50 := Vm} = proplists:get_value({Op, vm}, Stats),
                    Vm / Tel
            end,
    R = #{id => Id, desc => Desc, size => Size, stats => Stats,
          encode_ratio => Ratio(encode), decode_ratio => Ratio(decode)},
    io:format("  ratio teleport/VM (median throughput): encode ~s, decode ~s~n",
              [fmt_ratio(maps:get(encode_ratio, R)), fmt_ratio(maps:get(decode_ratio, R))]),
    R.

%% Samples `F(Input)' in a fresh process so that heaps left by other cases do not interfere.
measure(F, Input, WarmMs, MeasureMs, Size) ->
    Parent = self(),
    {Pid, Mon} = spawn_monitor(fun() -> Parent ! {self(), sample(F, Input, WarmMs, MeasureMs)} end),
    receive
        {Pid, Samples0} ->
            erlang:demonitor(Mon, [flush]),
            {Batch, Samples} = Samples0,
            stats(Samples, Batch, Size);
        {'DOWN', Mon, process, Pid, Reason} ->
            erlang:error({benchmark_process_died, Reason})
    end.

sample(F, Input, WarmMs, MeasureMs) ->
    Batch = calibrate(F, Input),
    WarmEnd = now_ns() + WarmMs * 1000000,
    _ = collect(F, Input, Batch, WarmEnd, 0, []),
    erlang:garbage_collect(),
    End = now_ns() + MeasureMs * 1000000,
    {Batch, collect(F, Input, Batch, End, 0, [])}.

%% The batch size that makes one sample last about ?SAMPLE_TARGET_NS.
calibrate(F, Input) ->
    calibrate(F, Input, 1).

calibrate(F, Input, N) ->
    T0 = now_ns(),
    ok = batch(F, Input, N),
    T = now_ns() - T0,
    if
        T >= ?SAMPLE_TARGET_NS; N >= ?MAX_BATCH ->
            max(1, min(?MAX_BATCH, round(N * ?SAMPLE_TARGET_NS / max(T, 1))));
        true ->
            calibrate(F, Input, N * 2)
    end.

%% Per-operation times in ns, one per batch, until the deadline (at least 5 samples).
collect(F, Input, Batch, End, N, Acc) ->
    T0 = now_ns(),
    ok = batch(F, Input, Batch),
    T1 = now_ns(),
    Acc1 = [(T1 - T0) / Batch | Acc],
    case T1 >= End andalso N >= 4 of
        true -> Acc1;
        false -> collect(F, Input, Batch, End, N + 1, Acc1)
    end.

batch(_F, _Input, 0) ->
    ok;
batch(F, Input, N) ->
    _ = F(Input),
    batch(F, Input, N - 1).

now_ns() ->
    erlang:monotonic_time(nanosecond).

stats(Samples, Batch, Size) ->
    S = #{count := N, p50 := P50} = bench_report:stats(Samples),
    S#{batch => Batch, ops => N * Batch,
       ops_per_s => 1.0e9 / P50,
       mb_per_s => Size / P50 * 1.0e9 / ?MB}.

print_stats(Op, Impl, S) ->
    #{count := N, batch := B, min := Min, p50 := P50, p90 := P90, p99 := P99, max := Max,
      ops_per_s := Ops, mb_per_s := MBs} = S,
    io:format("  ~-6s ~-8s ~7b ~6b ~10s ~10s ~10s ~10s ~10s ~12s ~10s~n",
              [Op, Impl, N, B, fmt_ns(Min), fmt_ns(P50), fmt_ns(P90), fmt_ns(P99),
               fmt_ns(Max), fmt_int(round(Ops)), fmt_mbs(MBs)]).

%%% ----------------------------------------------------------------------------------------
%%% Zero-copy check: erlang:memory(binary) growth while an encoding of a' is held

zero_copy_check(#{term := Term, bin := Bin, size := Size}) ->
    Enc = fun teleport_codec:encode/1,
    Vm = fun erlang:term_to_iovec/1,
    Dec = fun teleport_codec:decode/1,
    VmDec = fun erlang:binary_to_term/1,
    R = #{size => Size,
          encode_teleport => binary_growth(Enc, Term),
          encode_vm => binary_growth(Vm, Term),
          decode_teleport => binary_growth(Dec, Bin),
          decode_vm => binary_growth(VmDec, Bin)},
    io:format("~nerlang:memory(binary) growth while one result for a' (~s bytes) is held:~n"
              "  encode: teleport ~s bytes, term_to_iovec ~s bytes~n"
              "  decode: teleport ~s bytes, binary_to_term ~s bytes~n",
              [fmt_int(Size), fmt_int(maps:get(encode_teleport, R)),
               fmt_int(maps:get(encode_vm, R)), fmt_int(maps:get(decode_teleport, R)),
               fmt_int(maps:get(decode_vm, R))]),
    R.

binary_growth(F, Input) ->
    Parent = self(),
    {Pid, Mon} = spawn_monitor(
                   fun() ->
                           erlang:garbage_collect(),
                           B0 = erlang:memory(binary),
                           Result = F(Input),
                           B1 = erlang:memory(binary),
                           %% Keep the result alive until after the measurement.
                           _ = erts_debug:size(Result),
                           Parent ! {self(), B1 - B0}
                   end),
    receive
        {Pid, Growth} ->
            erlang:demonitor(Mon, [flush]),
            Growth;
        {'DOWN', Mon, process, Pid, Reason} ->
            erlang:error({benchmark_process_died, Reason})
    end.

%%% ----------------------------------------------------------------------------------------
%%% Targets and summary

targets(Results) ->
    ById = maps:from_list([{Id, R} || #{id := Id} = R <- Results]),
    Ratio = fun(Id, Key) -> maps:get(Key, maps:get(Id, ById)) end,
    P50 = fun(Id, Op, Impl) ->
                  #{stats := S} = maps:get(Id, ById),
                  maps:get(p50, proplists:get_value({Op, Impl}, S))
          end,
    %% O(1): 10x the bytes may cost at most 2x the time (O(n) would be ~10x).
    Scale = fun(Op, Impl) -> P50("a'", Op, Impl) / P50("a", Op, Impl) end,
    [#{name => "encode b >= 1.0x term_to_iovec", value => Ratio("b", encode_ratio),
       unit => "x", pass => Ratio("b", encode_ratio) >= 1.0},
     #{name => "encode c >= 1.0x term_to_iovec", value => Ratio("c", encode_ratio),
       unit => "x", pass => Ratio("c", encode_ratio) >= 1.0},
     #{name => "decode b >= 1.0x binary_to_term", value => Ratio("b", decode_ratio),
       unit => "x", pass => Ratio("b", decode_ratio) >= 1.0},
     #{name => "decode c >= 1.0x binary_to_term", value => Ratio("c", decode_ratio),
       unit => "x", pass => Ratio("c", decode_ratio) >= 1.0},
     #{name => "encode O(1): p50(a')/p50(a) <= 2.0", value => Scale(encode, teleport),
       unit => "", pass => Scale(encode, teleport) =< 2.0,
       vm => Scale(encode, vm)},
     #{name => "decode O(1): p50(a')/p50(a) <= 2.0", value => Scale(decode, teleport),
       unit => "", pass => Scale(decode, teleport) =< 2.0,
       vm => Scale(decode, vm)}].

print_summary(Results, Shapes, Targets, ZeroCopy) ->
    io:format("~n==================================== summary ====================================~n"),
    io:format("p50 = median time per operation; MB/s from the median and the term_to_binary size;~n"
              "ratio = teleport/VM of median throughput (> 1.0 = teleport faster)~n~n"),
    summary_table(Results),
    case Shapes of
        [] -> ok;
        _ ->
            io:format("~nshape breakdown (shorter runs):~n"),
            summary_table(Shapes)
    end,
    io:format("~ntargets:~n"),
    lists:foreach(
      fun(#{name := Name, value := V, unit := U, pass := Pass} = T) ->
              Extra = case T of
                          #{vm := Vm} -> io_lib:format("  (VM: ~.2f)", [Vm]);
                          _ -> ""
                      end,
              io:format("  ~-40s ~8s  ~-4s~s~n",
                        [Name, [fmt_float(V, 2), U], pass_fail(Pass), Extra])
      end, Targets),
    #{encode_teleport := EncT, encode_vm := EncV} = ZeroCopy,
    io:format("  ~-40s ~8s  ~-4s  (term_to_iovec: ~s)~n",
              ["zero-copy: binary growth, encode a'", fmt_bytes(EncT),
               pass_fail(EncT < 1024 * 1024), fmt_bytes(EncV)]),
    ok.

summary_table(Results) ->
    io:format("  ~-8s ~12s | ~10s ~10s ~11s ~8s | ~10s ~10s ~11s ~8s~n",
              ["case", "bytes", "enc tele", "enc VM", "tele MB/s", "ratio",
               "dec tele", "dec VM", "tele MB/s", "ratio"]),
    io:format("  ~s~n", [lists:duplicate(112, $-)]),
    lists:foreach(
      fun(#{id := Id, size := Size, stats := S, encode_ratio := ER, decode_ratio := DR}) ->
              G = fun(K) -> proplists:get_value(K, S) end,
              #{p50 := ET, mb_per_s := EM} = G({encode, teleport}),
              #{p50 := EV} = G({encode, vm}),
              #{p50 := DT, mb_per_s := DM} = G({decode, teleport}),
              #{p50 := DV} = G({decode, vm}),
              io:format("  ~-8s ~12s | ~10s ~10s ~11s ~8s | ~10s ~10s ~11s ~8s~n",
                        [Id, fmt_int(Size), fmt_ns(ET), fmt_ns(EV), fmt_mbs(EM),
                         fmt_ratio(ER), fmt_ns(DT), fmt_ns(DV), fmt_mbs(DM),
                         fmt_ratio(DR)])
      end, Results).

pass_fail(true) -> "PASS";
pass_fail(false) -> "FAIL".

%%% ----------------------------------------------------------------------------------------
%%% Formatting

fmt_ns(Ns) when Ns < 1000 -> fmt_float(Ns, 0) ++ " ns";
fmt_ns(Ns) when Ns < 1000000 -> fmt_float(Ns / 1000, 2) ++ " us";
fmt_ns(Ns) when Ns < 1000000000 -> fmt_float(Ns / 1000000, 2) ++ " ms";
fmt_ns(Ns) -> fmt_float(Ns / 1000000000, 2) ++ " s".

fmt_mbs(M) when M >= 100000000 -> fmt_float(M / 1000000, 0) ++ " TB/s";
fmt_mbs(M) when M >= 100000 -> fmt_float(M / 1000000, 2) ++ " TB/s";
fmt_mbs(M) when M >= 10000 -> fmt_float(M / 1000, 1) ++ " GB/s";
fmt_mbs(M) -> fmt_float(M, 1).

fmt_bytes(B) when abs(B) >= 1000000 -> fmt_float(B / 1000000, 1) ++ " MB";
fmt_bytes(B) when abs(B) >= 1000 -> fmt_float(B / 1000, 1) ++ " kB";
fmt_bytes(B) -> integer_to_list(B) ++ " B".

fmt_ratio(R) when R >= 100 -> fmt_float(R, 0) ++ "x";
fmt_ratio(R) -> fmt_float(R, 2) ++ "x".

fmt_float(F, 0) -> integer_to_list(round(F));
fmt_float(F, D) -> float_to_list(float(F), [{decimals, D}]).

fmt_int(I) ->
    S = integer_to_list(abs(I)),
    Sign = case I < 0 of true -> "-"; false -> "" end,
    Sign ++ group(lists:reverse(S), []).

group([A, B, C, D | Rest], Acc) -> group([D | Rest], [$,, C, B, A | Acc]);
group(Rest, Acc) -> lists:reverse(Rest) ++ Acc.

%%% ----------------------------------------------------------------------------------------
%%% Machine information and JSON

machine_info() ->
    #{otp_release => erlang:system_info(otp_release),
      erts_version => erlang:system_info(version),
      system_architecture => erlang:system_info(system_architecture),
      schedulers => erlang:system_info(schedulers),
      schedulers_online => erlang:system_info(schedulers_online),
      dirty_cpu_schedulers => erlang:system_info(dirty_cpu_schedulers),
      logical_processors => erlang:system_info(logical_processors),
      logical_processors_available => erlang:system_info(logical_processors_available),
      wordsize => erlang:system_info(wordsize),
      cpu_model => bench_report:cpu_model(),
      os => atom_to_list(element(2, os:type())),
      timestamp => calendar:system_time_to_rfc3339(erlang:system_time(second))}.

print_machine(M) ->
    io:format("teleport codec benchmark: OTP ~s (erts ~s), ~s~n"
              "schedulers ~p (online ~p), dirty CPU schedulers ~p, logical processors ~p, "
              "CPU: ~s~n",
              [maps:get(otp_release, M), maps:get(erts_version, M),
               maps:get(system_architecture, M), maps:get(schedulers, M),
               maps:get(schedulers_online, M), maps:get(dirty_cpu_schedulers, M),
               maps:get(logical_processors, M), maps:get(cpu_model, M)]).

json_path() ->
    Root = case filelib:is_file("rebar.config") of
               true ->
                   ".";
               false ->
                   %% _build/<profile>/lib/teleport/bench/codec_bench.beam -> the project
                   Beam = code:which(?MODULE),
                   lists:foldl(fun(_, D) -> filename:dirname(D) end, Beam, lists:seq(1, 6))
           end,
    filename:join([Root, "bench", "results", "codec.json"]).

write_json(Path, Machine, Results, Shapes, Targets, ZeroCopy, ElapsedMs) ->
    Json = {obj, [{benchmark, "teleport_codec"},
                  {machine, {obj, maps:to_list(Machine)}},
                  {measure_ms_per_function, ?MEASURE_MS},
                  {warmup_ms_per_function, ?WARMUP_MS},
                  {ratio_definition, "teleport/VM of median throughput; > 1.0 = teleport faster"},
                  {cases, [case_json(R) || R <- Results]},
                  {shapes, [case_json(R) || R <- Shapes]},
                  {targets, [{obj, [{name, N}, {value, V}, {pass, P}]
                              ++ [{vm, maps:get(vm, T)} || is_map_key(vm, T)]}
                             || #{name := N, value := V, pass := P} = T <- Targets]},
                  {zero_copy_binary_growth_bytes, {obj, maps:to_list(ZeroCopy)}},
                  {total_run_time_s, ElapsedMs / 1000}]},
    ok = filelib:ensure_dir(Path),
    ok = file:write_file(Path, [bench_report:json(Json), $\n]).

case_json(#{id := Id, desc := Desc, size := Size, stats := Stats,
            encode_ratio := ER, decode_ratio := DR}) ->
    {obj, [{id, Id}, {description, Desc}, {term_to_binary_bytes, Size},
           {encode_ratio, ER}, {decode_ratio, DR},
           {results, [{obj, [{op, Op}, {impl, Impl},
                             {function, fun_name(Op, Impl)},
                             {samples, maps:get(count, S)}, {batch, maps:get(batch, S)},
                             {ops_measured, maps:get(ops, S)},
                             {min_ns, maps:get(min, S)}, {p50_ns, maps:get(p50, S)},
                             {p90_ns, maps:get(p90, S)}, {p99_ns, maps:get(p99, S)},
                             {max_ns, maps:get(max, S)}, {mean_ns, maps:get(mean, S)},
                             {ops_per_s, maps:get(ops_per_s, S)},
                             {mb_per_s, maps:get(mb_per_s, S)}]}
                      || {{Op, Impl}, S} <- Stats]}]}.

fun_name(encode, teleport) -> "teleport_codec:encode/1";
fun_name(encode, vm) -> "erlang:term_to_iovec/1";
fun_name(decode, teleport) -> "teleport_codec:decode/1";
fun_name(decode, vm) -> "erlang:binary_to_term/1".

