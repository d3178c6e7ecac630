%% @doc EUnit tests of `teleport_codec' against the VM's own `term_to_binary/1,2' and
%% `binary_to_term/1,2': fixed terms of every type and tag, malformed and hostile input,
%% safe mode and the zero-copy promises.
-module(teleport_codec_tests).

-include_lib("eunit/include/eunit.hrl").

-export([identifiers_through_renames/2]).

%%%===================================================================
%%% Fixed cases: every type and tag
%%%===================================================================

%% Every case is checked five ways, each as its own test so that one broken direction does
%% not hide the others.
roundtrip_test_() ->
    [{Name ++ ": " ++ Rel, {timeout, 60, fun() -> check_relation(Rel, T) end}}
     || {Name, T} <- cases(),
        Rel <- ["encode |> binary_to_term", "term_to_binary |> decode",
                "term_to_binary(compressed) |> decode", "encode |> decode (iolist)",
                "teleport:term_to_iolist =:= encode"]].

check_relation("encode |> binary_to_term", T) ->
    IoList = teleport_codec:encode(T),
    ?assert(is_list(IoList)),
    assert_exact(binary_to_term(iolist_to_binary(IoList)), T);
check_relation("term_to_binary |> decode", T) ->
    assert_exact(teleport_codec:decode(term_to_binary(T)), T);
check_relation("term_to_binary(compressed) |> decode", T) ->
    assert_exact(teleport_codec:decode(term_to_binary(T, [compressed])), T);
check_relation("encode |> decode (iolist)", T) ->
    assert_exact(teleport_codec:decode(teleport_codec:encode(T)), T);
check_relation("teleport:term_to_iolist =:= encode", T) ->
    ?assert(teleport:term_to_iolist(T) =:= teleport_codec:encode(T)).

cases() ->
    atom_cases() ++ integer_cases() ++ float_cases() ++ binary_cases() ++ tuple_cases()
        ++ list_cases() ++ map_cases() ++ identifier_cases() ++ fun_cases() ++ mixed_cases().

atom_cases() ->
    Hiragana = list_to_atom([16#3042]),
    Latin1 = list_to_atom([252, 110, 239]), % 'ünï'
    Many = [list_to_atom("teleport_atom_" ++ integer_to_list(I)) || I <- lists:seq(1, 200)],
    [{"atom ok", ok},
     {"atom ''", ''},
     {"atom true", true},
     {"atom dirty (the NIF's own answer for \"too big\")", dirty},
     {"atom 'ünï' (Latin-1 > 127)", Latin1},
     {"atom of chars 128..255", list_to_atom(lists:seq(128, 255))},
     {"atom of chars 1..127", list_to_atom(lists:seq(1, 127))},
     {"atom U+3042", Hiragana},
     {"atom with U+1F600 (4-byte UTF-8)", list_to_atom([$a, 16#3042, 16#1F600])},
     {"atom of 255 ASCII chars", list_to_atom(lists:duplicate(255, $a))},
     {"atom of 255 Latin-1 chars (510 UTF-8 bytes)", list_to_atom(lists:duplicate(255, 255))},
     {"atom of 255 chars U+3042 (765 UTF-8 bytes)", list_to_atom(lists:duplicate(255, 16#3042))},
     {"repeated atoms (atom cache)",
      {ok, ok, error, ok, Latin1, Latin1, Hiragana, Hiragana, '', '', ok}},
     {"200 distinct atoms, twice (cache collisions)", Many ++ lists:reverse(Many)}].

integer_cases() ->
    [{"int " ++ integer_to_list(I), I}
     || I <- [0, 1, 255, 256, -1, -255, -256, (1 bsl 27) - 1, -(1 bsl 27),
              (1 bsl 31) - 1, 1 bsl 31, -(1 bsl 31), -(1 bsl 31) - 1,
              (1 bsl 32) - 1, 1 bsl 32, (1 bsl 59) - 1, 1 bsl 59, -(1 bsl 59) - 1,
              (1 bsl 63) - 1, 1 bsl 63, -(1 bsl 63), -(1 bsl 63) - 1,
              (1 bsl 64) - 1, 1 bsl 64, -(1 bsl 64), -(1 bsl 64) + 1]]
        ++ [{"int 2^1000", 1 bsl 1000},
            {"int -2^1000", -(1 bsl 1000)},
            {"int 2^1000 - 1", (1 bsl 1000) - 1},
            {"int 2^2040 (> 255 digit bytes: LARGE_BIG_EXT)", 1 bsl 2040},
            {"int -2^100000", -(1 bsl 100000)},
            {"ints of all sizes in a list", [(1 bsl N) - 1 || N <- lists:seq(0, 130)]
                                            ++ [-(1 bsl N) || N <- lists:seq(0, 130)]}].

float_cases() ->
    [{"float 0.0", 0.0},
     {"float -0.0", negative_zero()},
     {"float 1.5", 1.5},
     {"float -2.75", -2.75},
     {"float pi", math:pi()},
     {"float 1.5e308", 1.5e308},
     {"float -1.5e308", -1.5e308},
     {"float smallest normal", 2.2250738585072014e-308},
     {"float smallest subnormal 5.0e-324", 5.0e-324},
     {"float -5.0e-324", -5.0e-324},
     {"floats in a tuple with -0.0", {0.0, negative_zero(), 1.0e-300, 1.0e300}}].

binary_cases() ->
    Big = pattern(1 bsl 20),
    <<_:1, Unaligned:3000/binary, _/bitstring>> = Big,
    [{"binary <<>>", <<>>},
     {"binary of 1 byte", <<7>>},
     {"binary of 64 bytes (heap binary)", pattern(64)},
     {"binary of 65 bytes (refc binary)", pattern(65)},
     {"binary of 2047 bytes", pattern(2047)},
     {"binary of 2048 bytes", pattern(2048)},
     {"binary of 1 MB", Big},
     {"sub-binary of 10 bytes", binary:part(Big, 7, 10)},
     {"sub-binary of 3000 bytes", binary:part(Big, 1, 3000)},
     {"sub-binary of 70000 bytes", binary:part(Big, 5, 70000)},
     {"sub-binary at a bit offset", Unaligned},
     {"bitstring <<1:3>>", <<1:3>>},
     {"bitstring <<255, 3:2>>", <<255, 3:2>>},
     {"bitstring of 2047 bytes + 7 bits", <<(pattern(2047))/binary, 100:7>>},
     {"bitstring of 1 MB + 1 bit", <<Big/binary, 1:1>>},
     {"sub-bitstring", element(2, split_binary(<<Big/binary, 5:3>>, 1000))},
     {"binaries and bitstrings together",
      [<<>>, <<1:1>>, pattern(100), pattern(5000), <<(pattern(3000))/binary, 1:2>>, Big]}].

tuple_cases() ->
    [{"tuple {}", {}},
     {"tuple {a}", {a}},
     {"tuple of 255", list_to_tuple(lists:seq(1, 255))},
     {"tuple of 256 (LARGE_TUPLE_EXT)", list_to_tuple(lists:seq(1, 256))},
     {"tuple of 70000", list_to_tuple([{I, I * 2} || I <- lists:seq(1, 70000)])},
     {"nested tuples", {{}, {{}}, {a, {b, {c, {}}}}}},
     {"tuples nested 100000 deep", nest_tuple(100000)}].

list_cases() ->
    [{"list []", []},
     {"list [1,2,3]", [1, 2, 3]},
     {"improper list [a|b]", [a | b]},
     {"improper list [1,2|3]", [1, 2 | 3]},
     {"improper list [x|<<\"bin\">>]", [x | <<"bin">>]},
     {"improper list with a tuple tail", [1 | {2, 3}]},
     {"list [[]]", [[]]},
     {"string \"abc\"", "abc"},
     {"string of bytes 0..255", lists:seq(0, 255)},
     {"string of 65535 bytes (STRING_EXT maximum)", bytes_list(65535)},
     {"list of 65536 bytes", bytes_list(65536)},
     {"list of 70000 bytes (beyond STRING_EXT)", bytes_list(70000)},
     {"list of 1000 300s", lists:duplicate(1000, 300)},
     {"list of bytes then 256", lists:seq(0, 255) ++ [256]},
     {"list of bytes then -1", [1, 2, 3, -1]},
     {"improper list of bytes [1,2|3]", [1, 2 | 3]},
     {"string with a non-byte tail", [$a, $b | "c" ++ [1000]]},
     {"unicode string (not bytes)", [16#3042, 16#3044, 16#1F600]},
     {"list 1..70000", lists:seq(1, 70000)},
     {"list of mixed terms", [1.5, <<"x">>, {t}, "s", [], [[]], a | []]},
     {"list of strings", [lists:seq(1, N) || N <- lists:seq(0, 100)]},
     {"list nested 100000 deep", nest_list(100000)},
     {"improper lists nested 1000 deep",
      lists:foldl(fun(I, Acc) -> [I | Acc] end, tail, lists:seq(1, 1000))}].

map_cases() ->
    [{"map #{}", #{}},
     {"map of 2", #{a => 1, b => 2}},
     {"map of 32 keys", maps:from_list([{I, I} || I <- lists:seq(1, 32)])},
     {"map of 33 keys (hash map)", maps:from_list([{I, I} || I <- lists:seq(1, 33)])},
     {"map of 1000 keys", maps:from_list([{{k, I}, [I]} || I <- lists:seq(1, 1000)])},
     {"map with map, tuple, list, binary and float keys",
      #{#{a => 1} => x, {1, 2} => y, [1, 2] => z, <<"k">> => v, 1.5 => f, -0 => zero,
        #{#{} => #{}} => nested}},
     {"nested maps", #{a => #{b => #{c => #{}}}, d => [#{e => f}]}},
     {"map with large binary values", #{big => pattern(5000), small => pattern(10)}}].

identifier_cases() ->
    Dead = spawn(fun() -> ok end),
    Port = hd(erlang:ports()),
    [{"local pid self()", self()},
     {"local pid of a dead process", Dead},
     {"pid of another node", remote_pid()},
     {"local reference", make_ref()},
     {"monitor reference", monitor_ref()},
     {"reference of another node", remote_ref()},
     {"local port", Port},
     {"port of another node", remote_port()},
     {"pids, refs and ports together",
      {self(), remote_pid(), make_ref(), remote_ref(), Port, remote_port(), [Dead]}}].

fun_cases() ->
    X = 42,
    Y = "free",
    Z = pattern(3000),
    [{"local fun with free variables", fun(A) -> {X, Y, A} end},
     {"local fun with a 3000-byte binary in its environment", fun() -> byte_size(Z) end},
     {"local fun without free variables", fun() -> ok end},
     {"external fun lists:map/2", fun lists:map/2},
     {"external fun of an unloaded module", fun teleport_no_such_module:f/3},
     {"funs in a list", [fun lists:map/2, fun(A) -> A + X end, fun erlang:self/0]}].

mixed_cases() ->
    Big = pattern(100000),
    [{"everything in one tuple",
      {ok, 'ünï', list_to_atom([16#3042]), 1 bsl 70, -5, 2.5, pattern(3000), <<1:3>>,
       [a | b], "str", #{k => [v]}, self(), make_ref(), hd(erlang:ports()),
       fun lists:map/2, {}, []}},
     {"100 KB binary dominating the buffer, among small terms",
      {msg, Big, [a, 1, 2.5, "s", pattern(100)], #{k => v}, self()}},
     {"two 100 KB binaries", [Big, binary:part(Big, 1, 99990)]},
     {"map of 100 keys beside a 100 KB binary",
      {maps:from_list([{{k, I}, I} || I <- lists:seq(1, 100)]), Big,
       #{a => 1, 'ünï' => [1.5], <<"k">> => "v"}}},
     {"the same 3000-byte binary many times", lists:duplicate(50, pattern(3000))}].

%%%===================================================================
%%% Malformed input
%%%===================================================================

%% Every prefix of a valid encoding: decode/1 fails with badarg exactly where
%% binary_to_term/1 does.
truncation_test_() ->
    [{"every prefix of " ++ Name, {timeout, 60, fun() -> check_prefixes(Enc, all) end}}
     || {Name, Enc} <- small_encodings()]
        ++ [{"prefixes of " ++ Name, {timeout, 120, fun() -> check_prefixes(Enc, sampled) end}}
            || {Name, Enc} <- large_encodings()].

check_prefixes(Enc, Which) ->
    Size = byte_size(Enc),
    Lengths = case Which of
                  all -> lists:seq(0, Size - 1);
                  sampled -> lists:usort(lists:seq(0, min(Size - 1, 300))
                                         ++ lists:seq(max(0, Size - 300), Size - 1)
                                         ++ lists:seq(0, Size - 1, 997))
              end,
    Mismatches = [{Len, Want, Got} || Len <- Lengths,
                                      {Want, Got} <- [compare(binary:part(Enc, 0, Len), [])],
                                      not agree(Want, Got)],
    ?assertEqual([], lists:sublist(Mismatches, 5)).

%% Random byte changes (deterministic seed): decode/1 and binary_to_term/1 agree, both
%% succeeding with the same term or both raising badarg. Compressed encodings apart, so that
%% a failure names its kind of input.
byte_flip_test_() ->
    [{"plain encodings", {timeout, 120, fun() -> flip_test(plain, 1000, 400) end}},
     {"compressed encodings", {timeout, 120, fun() -> flip_test(compressed, 1000, 400) end}}].

flip_test(Kind, SmallN, LargeN) ->
    _ = rand:seed(exsss, {1, 2, 3}),
    Small = [{E, []} || {_, E} <- small_encodings(), kind(E) =:= Kind],
    Large = [{E, Payloads} || {_, E, Payloads} <- large_encodings_with_payloads(),
                              kind(E) =:= Kind],
    ?assertNotEqual([], Small ++ Large),
    Mismatches = lists:append([flip_mismatches(E, Payloads, N)
                               || {Encs, N} <- [{Small, SmallN}, {Large, LargeN}],
                                  {E, Payloads} <- Encs]),
    ?assertEqual([], lists:sublist(Mismatches, 3)).

kind(<<131, 80, _/binary>>) -> compressed;
kind(_) -> plain.

%% N mutations of a byte or three of Enc, away from the data of Payloads (large binaries, where
%% any value is fine) and from a compressed term's size field (which binary_to_term/1 trusts
%% for its allocation); the ones where decode/1 and binary_to_term/1 disagree.
flip_mismatches(Enc, Payloads, N) ->
    Holes = [{P, P + L} || Payload <- Payloads, {P, L} <- [binary:match(Enc, Payload)]],
    Allowed = list_to_tuple([P || P <- lists:seq(0, byte_size(Enc) - 1),
                                  not in_compressed_size(Enc, P),
                                  not lists:any(fun({S, E}) -> P >= S andalso P < E end, Holes)]),
    lists:filtermap(
      fun(_) ->
              Bin = flip(Enc, Allowed, rand:uniform(3)),
              {Want, Got} = compare(Bin, []),
              case agree(Want, Got) of
                  true -> false;
                  false -> {true, {short(Bin), short(Want), short(Got)}}
              end
      end, lists:seq(1, N)).

in_compressed_size(<<131, 80, _/binary>>, P) -> P >= 2 andalso P < 6;
in_compressed_size(_, _) -> false.

flip(Bin, _Allowed, 0) ->
    Bin;
flip(Bin, Allowed, K) ->
    Pos = element(rand:uniform(tuple_size(Allowed)), Allowed),
    <<Before:Pos/binary, Old, After/binary>> = Bin,
    New = (Old + rand:uniform(255)) rem 256,
    flip(<<Before/binary, New, After/binary>>, Allowed, K - 1).

small_encodings() ->
    Terms = [ok, 'ünï', list_to_atom([16#3042]), 0, 300, -1, 1 bsl 40, 1 bsl 100, -(1 bsl 70),
             1.5, negative_zero(), <<>>, <<"bin">>, <<1:3>>, <<255, 3:2>>, {}, {a, b},
             list_to_tuple(lists:seq(1, 300)), [], [1, 2, 3], [a | b], "abc", [300, 400],
             #{}, #{a => 1, {b} => [c]}, maps:from_list([{I, I} || I <- lists:seq(1, 40)]),
             self(), make_ref(), remote_pid(), remote_ref(), hd(erlang:ports()), remote_port(),
             fun lists:map/2, fun() -> ok end,
             {msg, [1, 2.5, "s", <<"b">>, #{k => v}, {x, -5}], self(), make_ref()}],
    [{"term_to_binary(" ++ short(T) ++ ")", term_to_binary(T)} || T <- Terms]
        ++ [{"encode(" ++ short(T) ++ ")", iolist_to_binary(teleport_codec:encode(T))}
            || T <- Terms]
        ++ [{"term_to_binary(" ++ short(T) ++ ", [compressed])", term_to_binary(T, [compressed])}
            || T <- [lists:duplicate(100, ok), pattern(300), #{a => lists:seq(1, 100)}]]
        ++ [{"FLOAT_EXT 1.5", float_ext(1.5)},
            {"PID_EXT", old_pid_ext()},
            {"ATOM_EXT 'ünï' (Latin-1)", <<131, 100, 0, 3, 252, 110, 239>>},
            {"bignum with leading zero digits", <<131, 110, 4, 0, 5, 0, 0, 0>>},
            {"LIST_EXT of length 0 with a tail", <<131, 108, 0, 0, 0, 0, 97, 5>>}].

%% Encodings of 64 KiB and more, so that decode/1 takes its own parser's path (all but the
%% compressed one, which goes to the VM's decoder; a shareable binary takes it from 16 KiB).
large_encodings() ->
    [{Name, Enc} || {Name, Enc, _} <- large_encodings_with_payloads()].

%% Each with the large binaries it holds (not periodic, so that each is found once).
large_encodings_with_payloads() ->
    Big = random_bytes(100000, 1),
    Other = random_bytes(70000, 2),
    T = {hdr, [a, 1, 2.5, "str", {x, -5, 1 bsl 70}], Big, #{k => v, 1 => [2]}, self(),
         make_ref(), <<"tail">>, 'ünï', list_to_atom([16#3042])},
    [{"term_to_binary of a 100 KB binary among small terms", term_to_binary(T), [Big]},
     {"encode of a 100 KB binary among small terms",
      iolist_to_binary(teleport_codec:encode(T)), [Big]},
     {"term_to_binary of a 100 KB and a 70 KB binary",
      term_to_binary([Big, {a, [1, 2]}, Other, "end"]), [Big, Other]},
     {"term_to_binary of 100 KB of random bytes and 400 KB of a pattern, compressed",
      term_to_binary({hdr, Big, [a, 1.5], pattern(400000)}, [compressed]), []}].

hostile_test_() ->
    [{"LIST_EXT claiming 4G elements",
      ?_assertError(badarg, teleport_codec:decode(<<131, 108, 255, 255, 255, 255, 106>>))},
     {"BINARY_EXT claiming 4 GB",
      ?_assertError(badarg, teleport_codec:decode(<<131, 109, 255, 255, 255, 255>>))},
     {"LARGE_TUPLE_EXT claiming 4G elements",
      ?_assertError(badarg, teleport_codec:decode(<<131, 105, 255, 255, 255, 255, 97, 1>>))},
     {"MAP_EXT claiming 2G pairs",
      ?_assertError(badarg, teleport_codec:decode(<<131, 116, 128, 0, 0, 0, 97, 1>>))},
     {"LARGE_BIG_EXT claiming 4 GB of digits",
      ?_assertError(badarg, teleport_codec:decode(<<131, 111, 255, 255, 255, 255, 0, 1>>))},
     {"BIT_BINARY_EXT claiming 4 GB",
      ?_assertError(badarg, teleport_codec:decode(<<131, 77, 255, 255, 255, 255, 1>>))},
     {"empty input", ?_assertError(badarg, teleport_codec:decode(<<>>))},
     {"version byte only", ?_assertError(badarg, teleport_codec:decode(<<131>>))},
     {"bad version byte", ?_assertError(badarg, teleport_codec:decode(<<130, 97, 1>>))},
     {"unknown tag", ?_assertError(badarg, teleport_codec:decode(<<131, 1, 2, 3>>))},
     {"ATOM_CACHE_REF", ?_assertError(badarg, teleport_codec:decode(<<131, 82, 0>>))},
     {"NaN", ?_assertError(badarg, teleport_codec:decode(<<131, 70, 127, 248, 0, 0, 0, 0, 0, 0>>))},
     {"atom of 256 characters",
      ?_assertError(badarg, teleport_codec:decode(<<131, 118, 1, 0, (binary:copy(<<"a">>, 256))/binary>>))},
     {"atom of invalid UTF-8", ?_assertError(badarg, teleport_codec:decode(<<131, 119, 1, 255>>))},
     {"map with a repeated key",
      ?_assertError(badarg, teleport_codec:decode(<<131, 116, 0, 0, 0, 2, 97, 1, 97, 2, 97, 1, 97, 3>>))},
     {"the hostile inputs agree with binary_to_term/1",
      fun() ->
              Inputs = [<<131, 108, 255, 255, 255, 255, 106>>, <<131, 109, 255, 255, 255, 255>>,
                        <<>>, <<131>>, <<130, 97, 1>>, <<131, 1, 2, 3>>,
                        <<131, 116, 0, 0, 0, 2, 97, 1, 97, 2, 97, 1, 97, 3>>],
              ?assertEqual([], [{I, W, G} || I <- Inputs, {W, G} <- [compare(I, [])],
                                             not agree(W, G)])
      end},
     {"compressed term claiming 4 GB: badarg, quickly, without allocating",
      {timeout, 30, fun compressed_bomb/0}},
     {"64 KiB+ term malformed at the end", {timeout, 30, fun large_malformed_at_end/0}},
     {"64 KiB+ term malformed in the middle", {timeout, 30, fun large_malformed_in_middle/0}},
     {"non-binary input",
      [?_assertError(badarg, teleport_codec:decode(foo)),
       ?_assertError(badarg, teleport_codec:decode(42)),
       ?_assertError(badarg, teleport_codec:decode([1, foo])),
       ?_assertError(badarg, teleport_codec:decode([<<131>> | foo])),
       ?_assertError(badarg, teleport_codec:decode(<<131, 97, 1:3>>)),
       ?_assertError(badarg, teleport_codec:decode(self()))]},
     {"bad options",
      [?_assertError(badarg, teleport_codec:decode(term_to_binary(ok), [bogus])),
       ?_assertError(badarg, teleport_codec:decode(term_to_binary(ok), [safe, bogus])),
       ?_assertError(badarg, teleport_codec:decode(term_to_binary(ok), [{safe, true}])),
       ?_assertError(badarg, teleport_codec:decode(term_to_binary(ok), bogus)),
       ?_assertError(badarg, teleport_codec:decode(term_to_binary(ok), safe))]},
     {"bad options: improper option list raises badarg, as binary_to_term/2 does",
      ?_assertError(badarg, teleport_codec:decode(term_to_binary(ok), [safe | bogus]))},
     {"iodata input",
      [?_assertEqual(1, teleport_codec:decode([<<131>>, [97], 1])),
       ?_assertEqual(ok, teleport_codec:decode([[], <<131, 119, 2>> | <<"ok">>])),
       ?_assertEqual(1, teleport_codec:decode(<<131, 97, 1, 0, 0>>)),
       ?_assertEqual(ok, teleport_codec:decode(term_to_binary(ok), [safe, safe]))]}].

compressed_bomb() ->
    Bomb = <<131, 80, 255, 255, 255, 255, 120, 156>>,
    _ = catch teleport_codec:decode(Bomb), % warm up: module loading is not measured
    erlang:garbage_collect(),
    MemBefore = erlang:memory(total),
    {AllocBefore, _} = allocated(), % also restarts the allocators' peaks
    HwmBefore = rss_high_water_mark(),
    T0 = erlang:monotonic_time(millisecond),
    Result = (catch teleport_codec:decode(Bomb)),
    Ms = erlang:monotonic_time(millisecond) - T0,
    {_, AllocPeak} = allocated(),
    MemAfter = erlang:memory(total),
    HwmAfter = rss_high_water_mark(),
    ?assertMatch({'EXIT', {badarg, _}}, Result),
    ?assert(Ms < 500),
    ?assert(MemAfter - MemBefore < 100 bsl 20),
    ?assert(AllocPeak - AllocBefore < 100 bsl 20),
    ?assert(HwmAfter - HwmBefore < 100 bsl 20).

large_malformed_at_end() ->
    Enc = term_to_binary({pattern(100000), [a, b]}),
    Size = byte_size(Enc),
    106 = binary:last(Enc),
    Body = binary:part(Enc, 0, Size - 1),
    Variants = [Body,                                % truncated
                <<Body/binary, 255>>,                 % unknown tag instead of []
                <<Body/binary, 100, 0>>,              % truncated ATOM_EXT
                <<Body/binary, 109, 0, 0, 0, 9, 1>>,  % BINARY_EXT longer than the rest
                <<Body/binary, 108, 255, 255, 255, 255>>],
    lists:foreach(
      fun(V) ->
              ?assertError(badarg, binary_to_term(V)),
              ?assertError(badarg, teleport_codec:decode(V)),
              ?assertError(badarg, teleport_codec:decode(V, [safe]))
      end, Variants).

large_malformed_in_middle() ->
    %% [Big, a, b] with its list length claiming one element more than there is.
    Enc = term_to_binary([pattern(100000), a, b]),
    <<131, 108, 3:32, Rest/binary>> = Enc,
    Bad = <<131, 108, 4:32, Rest/binary>>,
    ?assertError(badarg, binary_to_term(Bad)),
    ?assertError(badarg, teleport_codec:decode(Bad)),
    %% A map with a repeated key after a shared binary.
    Big = pattern(100000),
    Dup = <<131, 116, 2:32, 97, 1, 109, (byte_size(Big)):32, Big/binary, 97, 1, 97, 2>>,
    ?assertError(badarg, binary_to_term(Dup)),
    ?assertError(badarg, teleport_codec:decode(Dup)).

%%%===================================================================
%%% Forged funs
%%%===================================================================

%% OTP 25's binary_to_term/1 accepts a NEW_FUN_EXT whose creator is not a pid, and the VM
%% crashes when such a fun is later encoded (term_to_binary/1); decode/1,2 must refuse it (and any
%% fun whose fields or Size do not hold) on every path: small input, compressed input, large
%% input decoded by the VM and large input decoded by the NIF's own parser. The result of a
%% decode that wrongly succeeds is never looked at, only reported as `returned', so that the
%% test fails without crashing its VM.
forged_fun_test_() ->
    [{Name ++ ", " ++ Path ++ Mode,
      fun() -> ?assertEqual(badarg, decode_outcome(Wrap(Forged), Opts)) end}
     || {Name, Forged} <- forged_funs(),
        {Path, Wrap} <- forged_fun_paths(),
        {Mode, Opts} <- [{"", none}, {", safe", [safe]}]]
        ++ [{"control: a genuine fun, " ++ Path,
             fun() -> ?assertEqual(returned, decode_outcome(Wrap(genuine_fun_ext()), [safe])) end}
            || {Path, Wrap} <- forged_fun_paths()]
        ++ [{"genuine funs still decode, on every path", {timeout, 60, fun genuine_funs_decode/0}}].

genuine_fun_ext() ->
    <<131, Fun/binary>> = term_to_binary(fun_with_free_vars(42, "free")),
    Fun.

%% Funs as OTP 25 writes them (NEW_FUN_EXT, no version byte), with one part forged.
forged_funs() ->
    {Fixed, Middle, Creator, Free} = fun_parts(fun_with_free_vars(42, "free")),
    Port = <<89, (pid_node(Creator))/binary, 7:32, 0:32>>,
    {Fixed1, Middle1, Creator1, _Free1} = fun_parts(fun_with_free_var(x)),
    [{"creator a small integer", new_fun_ext(Fixed, Middle, <<97, 0>>, Free)},
     {"creator an atom", new_fun_ext(Fixed, Middle, <<100, 0, 2, "ok">>, Free)},
     {"creator a port", new_fun_ext(Fixed, Middle, Port, Free)},
     {"forged fun in the free variables of a genuine fun",
      new_fun_ext(Fixed1, Middle1, Creator1, new_fun_ext(Fixed, Middle, <<97, 0>>, Free))},
     {"Size one more than the fun's bytes (in a tuple, so that the bytes exist)",
      size_plus(new_fun_ext(Fixed, Middle, Creator, Free), 1)},
     {"Size one less than the fun's bytes", size_plus(new_fun_ext(Fixed, Middle, Creator, Free), -1)}].

%% The paths of decode/1,2 a forged fun (no version byte) is sent down; all but the first
%% two make inputs of 64 KiB and more.
forged_fun_paths() ->
    Big = pattern(100000),
    [{"small input", fun(F) -> <<131, F/binary>> end},
     {"compressed input",
      fun(F) ->
              Plain = <<104, 2, F/binary, 100, 0, 2, "ok">>,
              <<131, 80, (byte_size(Plain)):32, (zlib:compress(Plain))/binary>>
      end},
     {"after a shared 100 KB binary (the NIF's parser)",
      fun(F) -> <<131, 104, 3, 109, (byte_size(Big)):32, Big/binary, F/binary, 106>> end},
     {"after 30000 atoms (the NIF's parser, nothing shared)",
      fun(F) ->
              <<131, 108, 30001:32, (binary:copy(<<119, 2, "ok">>, 30000))/binary, F/binary, 106>>
      end},
     {"after 40000 small integers (the VM's decoder)",
      fun(F) ->
              <<131, 108, 40001:32, (binary:copy(<<97, 7>>, 40000))/binary, F/binary, 106>>
      end}].

%% A tuple of the fun and 'ok', so that a larger Size than the fun's still fits the input.
size_plus(<<112, Size:32, Rest/binary>>, D) ->
    <<104, 2, 112, (Size + D):32, Rest/binary, 100, 0, 2, "ok">>.

%% What decode/1 (Opts = none) or decode/2 did: `badarg' or `returned', never the term.
decode_outcome(Bin, Opts) ->
    try
        _ = case Opts of
                none -> teleport_codec:decode(Bin);
                _ -> teleport_codec:decode(Bin, Opts)
            end,
        returned
    catch
        error:badarg -> badarg
    end.

genuine_funs_decode() ->
    Local = fun_with_free_vars(42, "free"),
    Nested = fun_with_free_var(Local),
    Big = pattern(100000),
    Terms = [fun lists:sum/1, Local, Nested, {Big, Local, fun lists:sum/1},
             lists:duplicate(30000, ok) ++ [Nested], lists:duplicate(40000, 7) ++ [Local]],
    lists:foreach(
      fun(T) ->
              Encs = [term_to_binary(T), term_to_binary(T, [compressed]),
                      iolist_to_binary(teleport_codec:encode(T))],
              [begin
                   ?assert(teleport_codec:decode(E) =:= T),
                   ?assert(teleport_codec:decode(E, [safe]) =:= T)
               end || E <- Encs]
      end, Terms),
    Sum = teleport_codec:decode(term_to_binary(fun lists:sum/1)),
    ?assertEqual(6, Sum([1, 2, 3])),
    Decoded = teleport_codec:decode(term_to_binary(Local)),
    ?assertEqual({42, "free", 7}, Decoded(7)),
    ?assertEqual(term_to_binary(Local), term_to_binary(Decoded)),
    DecodedNested = teleport_codec:decode(term_to_binary(Nested)),
    Inner = DecodedNested(),
    ?assertEqual({42, "free", 8}, Inner(8)).

fun_with_free_vars(X, Y) ->
    fun(A) -> {X, Y, A} end.

fun_with_free_var(X) ->
    fun() -> X end.

%% A fun's NEW_FUN_EXT as term_to_binary/1 writes it: the fields from Arity to NumFree;
%% Module, OldIndex and OldUniq; the creator pid; the free variables.
fun_parts(Fun) ->
    <<131, 112, _Size:32, Fixed:25/binary, Rest0/binary>> = term_to_binary(Fun),
    {Module, Rest1} = split_atom(Rest0),
    {OldIndex, Rest2} = split_int(Rest1),
    {OldUniq, Rest3} = split_int(Rest2),
    <<88, Rest4/binary>> = Rest3,
    {Node, <<Numbers:12/binary, Free/binary>>} = split_atom(Rest4),
    {Fixed, <<Module/binary, OldIndex/binary, OldUniq/binary>>,
     <<88, Node/binary, Numbers/binary>>, Free}.

new_fun_ext(Fixed, Middle, Creator, Free) ->
    Body = <<Fixed/binary, Middle/binary, Creator/binary, Free/binary>>,
    <<112, (byte_size(Body) + 4):32, Body/binary>>.

pid_node(<<88, Rest/binary>>) ->
    {Node, _} = split_atom(Rest),
    Node.

split_atom(<<T, L:16, _:L/binary, _/binary>> = B) when T =:= 100; T =:= 118 ->
    split_binary(B, 3 + L);
split_atom(<<T, L, _:L/binary, _/binary>> = B) when T =:= 115; T =:= 119 ->
    split_binary(B, 2 + L).

split_int(<<97, _, _/binary>> = B) -> split_binary(B, 2);
split_int(<<98, _:32, _/binary>> = B) -> split_binary(B, 5).

%%%===================================================================
%%% Safe mode
%%%===================================================================

safe_test_() ->
    [{"new atom (SMALL_ATOM_UTF8_EXT) refused, no atom created",
      fun() -> refuses_new_atom(fun(N) -> small_utf8_atom(N) end, <<"teleport_never_">>) end},
     {"new non-ASCII atom (SMALL_ATOM_UTF8_EXT) refused, no atom created",
      fun() -> refuses_new_atom(fun(N) -> small_utf8_atom(N) end,
                                <<"teleport_ünï_never_"/utf8>>) end},
     {"new atom (ATOM_EXT, Latin-1) refused, no atom created",
      fun() -> refuses_new_atom(fun(N) -> <<100, (byte_size(N)):16, N/binary>> end,
                                <<"teleport_latin1_never_">>) end},
     {"new atom inside a 64 KiB+ term refused, no atom created",
      {timeout, 30, fun() -> refuses_new_atom(fun large_with_atom/1, <<"teleport_large_never_">>) end}},
     {"new non-ASCII atom inside a 64 KiB+ term refused, no atom created",
      {timeout, 30, fun() -> refuses_new_atom(fun large_with_atom/1,
                                              <<"teleport_large_ünï_never_"/utf8>>) end}},
     {"new atom beside a shared 20 KB binary (teleport's parser from 16 KiB) refused",
      fun() -> refuses_new_atom(fun(Name) -> with_atom(Name, 20000) end,
                                <<"teleport_mid_never_">>) end},
     {"new atom after the large binary of a 64 KiB+ term refused, no atom created",
      {timeout, 30, fun() -> refuses_new_atom(fun large_with_atom_last/1,
                                              <<"teleport_last_never_">>) end}},
     {"new atom as a pid's node inside a 64 KiB+ term refused, no atom created",
      {timeout, 30, fun() -> refuses_new_atom(fun large_with_pid_node/1,
                                              <<"teleport_node_never_">>) end}},
     {"without safe, a new atom inside a 64 KiB+ term is made", {timeout, 30, fun makes_new_atom/0}},
     {"existing atoms decode with safe", fun existing_atoms_safe/0},
     {"existing atoms inside a 64 KiB+ term decode with safe",
      {timeout, 30, fun existing_atoms_safe_large/0}}].

refuses_new_atom(Wrap, Prefix) ->
    Name = fresh_atom_name(Prefix),
    Inner = Wrap(Name),
    Enc = <<131, Inner/binary>>,
    %% Warm up: nothing below may load code (loading makes atoms).
    ok = teleport_codec:decode(term_to_binary(ok), [safe]),
    _ = (catch binary_to_existing_atom(<<"ok">>, utf8)),
    Before = erlang:system_info(atom_count),
    Result = (catch teleport_codec:decode(Enc, [safe])),
    After = erlang:system_info(atom_count),
    ?assertMatch({'EXIT', {badarg, _}}, Result),
    ?assertEqual(Before, After),
    ?assertError(badarg, binary_to_existing_atom(Name, utf8)),
    %% binary_to_term/2 agrees (and creates nothing either).
    ?assertError(badarg, binary_to_term(Enc, [safe])),
    ?assertError(badarg, binary_to_existing_atom(Name, utf8)).

small_utf8_atom(Name) ->
    <<119, (byte_size(Name)), Name/binary>>.

large_with_atom(Name) ->
    with_atom(Name, 100000).

with_atom(Name, Size) ->
    Bin = pattern(Size),
    <<104, 2, (small_utf8_atom(Name))/binary, 109, (byte_size(Bin)):32, Bin/binary>>.

large_with_atom_last(Name) ->
    Bin = pattern(100000),
    <<108, 3:32, 119, 2, "ok", 109, (byte_size(Bin)):32, Bin/binary,
      (small_utf8_atom(Name))/binary, 106>>.

large_with_pid_node(Name) ->
    Bin = pattern(100000),
    <<104, 2, 109, (byte_size(Bin)):32, Bin/binary,
      88, (small_utf8_atom(Name))/binary, 1:32, 0:32, 1:32>>.

makes_new_atom() ->
    Name = fresh_atom_name(<<"teleport_made_">>),
    Enc = <<131, (large_with_atom(Name))/binary>>,
    {Atom, Bin} = teleport_codec:decode(Enc),
    ?assertEqual(Name, atom_to_binary(Atom, utf8)),
    ?assert(pattern(100000) =:= Bin),
    ?assert({Atom, Bin} =:= binary_to_term(Enc)).

existing_atoms_safe() ->
    T = {ok, 'ünï', list_to_atom([16#3042]), [error, true], #{undefined => ''}},
    assert_exact(teleport_codec:decode(term_to_binary(T), [safe]), T),
    assert_exact(teleport_codec:decode(teleport_codec:encode(T), [safe]), T),
    assert_exact(teleport_codec:decode(term_to_binary(fun lists:map/2), [safe]), fun lists:map/2).

existing_atoms_safe_large() ->
    Big = pattern(100000),
    T = {ok, 'ünï', Big, list_to_atom([16#3042]), [error, true], self(), make_ref()},
    assert_exact(teleport_codec:decode(term_to_binary(T), [safe]), T),
    assert_exact(teleport_codec:decode(teleport_codec:encode(T), [safe]), T).

%%%===================================================================
%%% Local identifiers, written by the NIF
%%%===================================================================

%% The NIF writes local pids, ports and references itself, and pids and references of other
%% nodes (local_id.rs): the bytes must be term_to_binary/1's exactly, for every kind, the
%% extreme numbers included, wherever the identifier stands in the term (the first of each
%% call, or of each node, is the VM's, the others the NIF's).
identifier_bytes_test_() ->
    {timeout, 60, fun identifier_bytes/0}.

identifier_bytes() ->
    %% Pids and references of 20 other nodes: more than the NIF keeps per thread (8).
    Others = [binary_to_term(<<131, Tag, Len/binary, 100, (byte_size(N)):16, N/binary, Rest/binary>>)
              || I <- lists:seq(1, 20),
                 N <- [list_to_binary("other" ++ integer_to_list(I) ++ "@teleport.example")],
                 {Tag, Len, Rest} <- [{88, <<>>, <<I:32, 1:32, 7:32>>},
                                      {90, <<3:16>>, <<7:32, I:32, 2:32, 3:32>>},
                                      %% Numbers of their own: OTP 25.2 crashes on a map
                                      %% whose keys are refs of 3 and of 5 numbers that
                                      %% begin alike.
                                      {90, <<5:16>>, <<7:32, (I + 100):32, 9:32, 9:32, 4:32,
                                                       5:32>>}]],
    Ids = local_identifiers() ++ [remote_pid(), remote_ref(), remote_port() | Others],
    Terms = [{Id} || Id <- Ids]
        ++ [{self(), Id, [Id, Id]} || Id <- Ids]
        ++ [{Id, self(), make_ref(), hd(erlang:ports())} || Id <- Ids]
        ++ [list_to_tuple(Ids), Ids, lists:reverse(Ids)],
    [?assertEqual({T, term_to_binary(T)}, {T, iolist_to_binary(teleport_codec:encode(T))})
     || T <- Terms],
    %% A large map's pairs may come in another order than term_to_binary/1's: the same map.
    Map = maps:from_list([{Id, [Id]} || Id <- Ids]),
    assert_exact(binary_to_term(iolist_to_binary(teleport_codec:encode(Map))), Map),
    %% The test above passes with the VM writing everything too: these say it did not.
    ?assertMatch(#{layout := on, pid_refs := on, remote := on, remote_refs := on},
                 teleport_nif:diag_local_ids()).

%% Every kind of local identifier this node can make: pids and ports at the limits of their
%% numbers, ordinary references, pid references (aliases, monitors with an alias) and magic
%% ones (the NIF leaves those to the VM). No atoms: the NIF writes those in the UTF-8 form,
%% term_to_binary/1 of OTP 25 in the Latin-1 one, so only identifiers are compared byte for
%% byte.
local_identifiers() ->
    Dead = spawn(fun() -> ok end),
    Alias = alias(),
    MonAlias = monitor(process, self(), [{alias, demonitor}]),
    Port = open_port({spawn, "cat"}, []),
    Tab = ets:new(?MODULE, []),
    Ids = [self(), Dead, list_to_pid("<0.0.0>"), list_to_pid("<0.32767.8191>"),
           list_to_pid("<0.1234.5>"), hd(erlang:ports()), Port,
           list_to_port("#Port<0.268435455>"), make_ref(), monitor_ref(),
           list_to_ref("#Ref<0.4294967295.0.262143>"), list_to_ref("#Ref<0.0.0.0>"),
           Alias, MonAlias, atomics:new(1, []), element(2, counters:new(1, [])), Tab],
    unalias(Alias),
    demonitor(MonAlias),
    true = port_close(Port),
    ets:delete(Tab),
    Ids.

%% The name and creation in those bytes change when the node starts or stops distribution,
%% and the NIF keeps them between calls: on a node that starts without distribution, then
%% gets a name, loses it, gets it back (a new creation) and takes another, every call still
%% writes term_to_binary/1's bytes, on every scheduler.
renamed_node_test_() ->
    {timeout, 120, fun renamed_node/0}.

renamed_node() ->
    _ = os:cmd("epmd -daemon"),
    Paths = [D || D <- code:get_path(), not lists:prefix(code:root_dir(), D)],
    {ok, Peer, nonode@nohost} =
        peer:start(#{connection => standard_io, args => ["-pa" | Paths]}),
    try
        Suffix = os:getpid(),
        Stages = peer:call(Peer, ?MODULE, identifiers_through_renames,
                           [list_to_atom("teleport_rename_a" ++ Suffix),
                            list_to_atom("teleport_rename_b" ++ Suffix)], 60000),
        [?assertEqual({Stage, Node, []}, {Stage, Node, Wrong})
         || {Stage, Node, _Creation, Wrong} <- Stages],
        Creations = [C || {_, _, C, _} <- Stages],
        %% Six stages: not distributed, a, a restarted at once, not again, a again, b;
        %% each start of a gets a creation of its own.
        ?assertMatch([0, A, A1, 0, A2, B] when A =/= A1 andalso A1 =/= A2 andalso A =/= A2
                                               andalso A =/= 0 andalso A1 =/= 0
                                               andalso A2 =/= 0 andalso B =/= 0, Creations),
        ?assertMatch(#{layout := on, bounds := on},
                     peer:call(Peer, teleport_nif, diag_local_ids, []))
    after
        peer:stop(Peer)
    end.

%% @private Run on the peer of renamed_node/0: at each stage, the terms whose encoding is not
%% term_to_binary/1's, from many processes (so that every scheduler has its own say).
identifiers_through_renames(A, B) ->
    Steps = [{not_distributed, fun() -> ok end},
             {named_a, fun() -> start_named(A) end},
             %% The same name at once: only the creation changes under the kept node.
             {named_a_restarted, fun() -> ok = net_kernel:stop(), start_named(A) end},
             {stopped, fun() -> ok = net_kernel:stop() end},
             {named_a_again, fun() -> start_named(A) end},
             {named_b, fun() -> ok = net_kernel:stop(), start_named(B) end}],
    [begin
         ok = Step(),
         {Stage, node(), creation(), wrong_encodings()}
     end || {Stage, Step} <- Steps].

start_named(Name) ->
    case net_kernel:start([Name, shortnames]) of
        {ok, _} -> ok;
        {error, _} -> timer:sleep(100), start_named(Name)
    end.

%% This node's creation, as the VM writes it into a pid.
creation() ->
    Bin = term_to_binary(self()),
    binary:decode_unsigned(binary:part(Bin, byte_size(Bin) - 4, 4)).

wrong_encodings() ->
    %% One worker bound to each scheduler (and one free), so that every scheduler thread's
    %% kept node is put to the test.
    Work = fun() ->
                   Ids = local_identifiers(),
                   exit({wrong, [T || _ <- lists:seq(1, 50),
                                      T <- [{self(), Ids}, list_to_tuple(Ids)],
                                      iolist_to_binary(teleport_codec:encode(T))
                                          =/= term_to_binary(T)]})
           end,
    Workers = [spawn_opt(Work, [monitor, {scheduler, S}])
               || S <- lists:seq(1, erlang:system_info(schedulers))]
        ++ [spawn_monitor(Work)],
    lists:append([receive
                      {'DOWN', M, process, W, {wrong, Wrong}} -> Wrong;
                      {'DOWN', M, process, W, Crash} -> [{crashed, Crash}]
                  end || {W, M} <- Workers]).

%%%===================================================================
%%% Zero copy
%%%===================================================================

zero_copy_test_() ->
    [{"encode keeps a 100 MB binary by reference", {timeout, 120, fun encode_shares_100mb/0}},
     {"encode shares binaries of 2048 bytes, copies 2047", fun encode_share_threshold/0},
     {"decode shares a dominating binary, copies a small one", {timeout, 120, fun decode_shares_large_copies_small/0}},
     {"decode shares binaries from 16 KiB, copies smaller ones", fun decode_share_threshold/0},
     {"decode shares two 10 MB binaries", {timeout, 120, fun decode_shares_two/0}},
     {"decode copies 100 binaries of 100 KB", {timeout, 120, fun decode_copies_many/0}},
     {"decode of a sub-binary input at a bit offset", {timeout, 60, fun decode_unaligned_input/0}}].

encode_shares_100mb() ->
    in_fresh_process(
      fun() ->
              Bin = binary:copy(<<"0123456789">>, 10 bsl 20),
              Size = byte_size(Bin),
              erlang:garbage_collect(),
              Before = erlang:memory(binary),
              IoList = teleport_codec:encode({msg, Bin}),
              After = erlang:memory(binary),
              ?assert(After - Before < 1 bsl 20),
              Flat = lists:flatten(IoList),
              ?assert(lists:all(fun erlang:is_binary/1, Flat)),
              Same = [E || E <- Flat, erts_debug:same(E, Bin)],
              ?assertMatch([_], Same),
              ?assertEqual(Size, binary:referenced_byte_size(hd(Same))),
              Buf = iolist_to_binary(IoList),
              {msg, Decoded} = teleport_codec:decode(Buf),
              ?assertEqual(byte_size(Buf), binary:referenced_byte_size(Decoded)),
              ?assert(Decoded =:= Bin),
              ?assert({msg, Bin} =:= binary_to_term(Buf))
      end).

encode_share_threshold() ->
    B2047 = pattern(2047),
    B2048 = pattern(2048),
    Flat2047 = lists:flatten(teleport_codec:encode({B2047})),
    Flat2048 = lists:flatten(teleport_codec:encode({B2048})),
    ?assertEqual([], [E || E <- Flat2047, erts_debug:same(E, B2047)]),
    ?assertMatch([_], [E || E <- Flat2048, erts_debug:same(E, B2048)]),
    %% Sub-binaries are kept by reference too.
    Big = pattern(10000),
    Sub = binary:part(Big, 100, 5000),
    ?assertMatch([_], [E || E <- lists:flatten(teleport_codec:encode([Sub])),
                            erts_debug:same(E, Sub)]).

decode_shares_large_copies_small() ->
    Big = pattern(10 bsl 20),
    Small = pattern(100),
    Buf = iolist_to_binary(teleport_codec:encode({Big, Small})),
    {DBig, DSmall} = Decoded = teleport_codec:decode(Buf),
    ?assertEqual(byte_size(Buf), binary:referenced_byte_size(DBig)),
    ?assertEqual(100, binary:referenced_byte_size(DSmall)),
    ?assert(Decoded =:= {Big, Small}),
    %% The same from term_to_binary/1's encoding.
    Buf2 = term_to_binary({Big, Small}),
    {DBig2, DSmall2} = teleport_codec:decode(Buf2),
    ?assertEqual(byte_size(Buf2), binary:referenced_byte_size(DBig2)),
    ?assertEqual(100, binary:referenced_byte_size(DSmall2)),
    ?assert({DBig2, DSmall2} =:= {Big, Small}).

%% A message of one 64 KB binary (just under 64 KiB once its frame's header is counted) was
%% copied out of its frame while the bar stood at 64 KiB.
decode_share_threshold() ->
    [begin
         Buf = iolist_to_binary(teleport_codec:encode({m, pattern(Size)})),
         {m, D} = teleport_codec:decode(Buf),
         ?assertEqual(pattern(Size), D),
         Want = case Shared of
                    true -> byte_size(Buf);
                    false -> Size
                end,
         ?assertEqual({Size, Want}, {Size, binary:referenced_byte_size(D)})
     end || {Size, Shared} <- [{16383, false}, {16384, true}, {65526, true}]],
    ok.

decode_shares_two() ->
    A = pattern(10 bsl 20),
    B = binary:copy(<<"z">>, 10 bsl 20),
    Buf = term_to_binary({A, b, B}),
    {DA, b, DB} = teleport_codec:decode(Buf),
    ?assertEqual(byte_size(Buf), binary:referenced_byte_size(DA)),
    ?assertEqual(byte_size(Buf), binary:referenced_byte_size(DB)),
    ?assert(DA =:= A),
    ?assert(DB =:= B).

decode_copies_many() ->
    Bins = [binary:copy(<<I>>, 100000) || I <- lists:seq(1, 100)],
    Buf = term_to_binary(Bins),
    Decoded = teleport_codec:decode(Buf),
    ?assert(Decoded =:= Bins),
    ?assertEqual(lists:duplicate(100, 100000), [binary:referenced_byte_size(D) || D <- Decoded]).

decode_unaligned_input() ->
    T = {msg, pattern(200000), [1, 2, 3]},
    Enc = term_to_binary(T),
    <<_:3, Unaligned:(byte_size(Enc))/binary, _:5>> = <<0:3, Enc/binary, 0:5>>,
    assert_exact(teleport_codec:decode(Unaligned), T),
    <<_:10/binary, Sub/binary>> = <<0:80, Enc/binary>>,
    {msg, D, _} = teleport_codec:decode(Sub),
    ?assertEqual(byte_size(Enc) + 10, binary:referenced_byte_size(D)).

%%%===================================================================
%%% Helpers
%%%===================================================================

%% Equal as terms, and equal bit for bit (0.0 =:= -0.0 on OTP 25). Terms holding funs are
%% compared with =:= only: the byte changes of byte_flip_test_ forge funs whose creator is a
%% port instead of a pid, which binary_to_term/1 accepts and OTP 25.2's term_to_binary/1 then
%% crashes the VM on (a VM bug; decode/1 refuses such funs, see forged_fun_test_).
exact(A, B) ->
    A =:= B andalso (has_fun(A) orelse term_to_binary(A) =:= term_to_binary(B)).

has_fun(F) when is_function(F) -> true;
has_fun(T) when is_tuple(T) -> has_fun(tuple_to_list(T));
has_fun(M) when is_map(M) -> has_fun(maps:to_list(M));
has_fun([H | T]) -> has_fun(H) orelse has_fun(T);
has_fun(_) -> false.

assert_exact(Got, Want) ->
    case exact(Got, Want) of
        true -> ok;
        false -> erlang:error({not_exact, [{got, short(Got)}, {want, short(Want)}]})
    end.

%% What binary_to_term/2 and decode/2 make of Bin.
compare(Bin, Opts) ->
    {outcome(fun() -> binary_to_term(Bin, Opts) end),
     outcome(fun() -> teleport_codec:decode(Bin, Opts) end)}.

outcome(F) ->
    try {ok, F()}
    catch
        error:badarg -> badarg;
        C:R -> {C, R}
    end.

agree(badarg, badarg) -> true;
agree({ok, A}, {ok, B}) -> exact(A, B);
%% decode/1 refuses funs whose fields do not hold (a creator that is not a pid, a Size that
%% is not the fun's length...), which binary_to_term/1 accepts on OTP 25 and byte changes
%% forge; forged_fun_test_ and the round trips check that genuine funs are not refused.
agree({ok, A}, badarg) -> has_fun(A);
agree(_, _) -> false.

short(T) ->
    lists:flatten(io_lib:format("~0P", [T, 12])).

negative_zero() ->
    <<F/float>> = <<1:1, 0:63>>,
    F.

%% Bytes that are not all the same (so that a wrong offset shows).
pattern(N) ->
    Block = list_to_binary([I rem 251 || I <- lists:seq(0, 4095)]),
    binary:part(binary:copy(Block, N div 4096 + 1), 0, N).

bytes_list(N) ->
    [I rem 256 || I <- lists:seq(1, N)].

nest_list(N) ->
    lists:foldl(fun(_, Acc) -> [Acc] end, [], lists:seq(1, N)).

nest_tuple(N) ->
    lists:foldl(fun(I, Acc) -> {I, Acc} end, {}, lists:seq(1, N)).

monitor_ref() ->
    {Pid, Ref} = spawn_monitor(fun() -> ok end),
    receive {'DOWN', Ref, process, Pid, _} -> Ref end.

%% Pids, references and ports of another node, as they arrive from one (NEW_PID_EXT,
%% NEWER_REFERENCE_EXT, NEW_PORT_EXT of node 'peer@teleport.example').
-define(NODE, "peer@teleport.example").

node_atom() ->
    <<119, (length(?NODE)), ?NODE>>.

remote_pid() ->
    binary_to_term(<<131, 88, (node_atom())/binary, 42:32, 0:32, 7:32>>).

remote_ref() ->
    binary_to_term(<<131, 90, 3:16, (node_atom())/binary, 7:32, 1:32, 2:32, 3:32>>).

remote_port() ->
    binary_to_term(<<131, 89, (node_atom())/binary, 99:32, 7:32>>).

%% The old 31-byte FLOAT_EXT.
float_ext(F) ->
    Text = list_to_binary(io_lib:format("~.20e", [F])),
    <<131, 99, Text/binary, 0:((31 - byte_size(Text)) * 8)>>.

%% The old PID_EXT (one byte of creation).
old_pid_ext() ->
    <<131, 103, (node_atom())/binary, 5:32, 0:32, 1>>.

%% An atom name (never made into an atom by this module) that is not an atom yet.
fresh_atom_name(Prefix) ->
    Name = <<Prefix/binary, (integer_to_binary(erlang:unique_integer([positive])))/binary, "_",
             (integer_to_binary(erlang:system_time(nanosecond)))/binary>>,
    try binary_to_existing_atom(Name, utf8) of
        _ -> fresh_atom_name(Prefix)
    catch
        error:badarg -> Name
    end.

%% The memory the VM's allocators hold now, and the peak since the last call (each call
%% restarts the peak).
allocated() ->
    Sizes = [{Cur, LastMax} || A <- erlang:system_info(alloc_util_allocators),
                               Info <- [erlang:system_info({allocator, A})], is_list(Info),
                               {instance, _, Props} <- Info,
                               Kind <- [mbcs, sbcs],
                               {_, KProps} <- [lists:keyfind(Kind, 1, Props)],
                               {carriers_size, Cur, LastMax, _} <- KProps],
    {lists:sum([C || {C, _} <- Sizes]), lists:sum([M || {_, M} <- Sizes])}.

%% Deterministic bytes without a period.
random_bytes(N, Seed) ->
    State = rand:seed_s(exsss, {Seed, Seed, Seed}),
    {Bytes, _} = lists:foldl(fun(_, {Acc, S0}) ->
                                     {X, S1} = rand:uniform_s(256, S0),
                                     {[X - 1 | Acc], S1}
                             end, {[], State}, lists:seq(1, N)),
    list_to_binary(Bytes).

%% The OS's high-water mark of this VM's resident memory, in bytes (0 where unknown).
rss_high_water_mark() ->
    case file:read_file("/proc/self/status") of
        {ok, Status} ->
            case re:run(Status, "VmHWM:\\s+(\\d+) kB", [{capture, all_but_first, binary}]) of
                {match, [Kb]} -> binary_to_integer(Kb) * 1024;
                nomatch -> 0
            end;
        {error, _} ->
            0
    end.

in_fresh_process(F) ->
    {Pid, Ref} = spawn_monitor(fun() -> exit({done, catch F()}) end),
    receive
        {'DOWN', Ref, process, Pid, {done, ok}} -> ok;
        {'DOWN', Ref, process, Pid, {done, Other}} -> erlang:error(Other)
    end.
