%% @doc A PropEr property of `teleport_codec', run by EUnit: for random terms of every type,
%% `encode/1' agrees with `binary_to_term/1' and `decode/1,2' with `term_to_binary/1,2'.
%%
%% PropEr's header `proper/include/proper.hrl' is shipped by Debian's `erlang-proper-dev', which
%% the project's setup does not install (only `erlang-proper', the beams), so the few macros
%% used here are defined below exactly as that header defines them (`?LET' is `?PLET' because
%% EUnit's header has a `?LET' of its own).
-module(prop_codec_tests).

-include_lib("eunit/include/eunit.hrl").

-define(FORALL(X, RawType, Prop), proper:forall(RawType, fun(X) -> Prop end)).
-define(PLET(X, RawType, Gen), proper_types:bind(RawType, fun(X) -> Gen end, false)).
-define(SIZED(SizeArg, Gen), proper_types:sized(fun(SizeArg) -> Gen end)).
-define(LAZY(X), proper_types:lazy(fun() -> X end)).
-define(WHENFAIL(Action, Prop), proper:whenfail(fun() -> Action end, fun() -> Prop end)).

%% Largest size handed to the recursive generator (PropEr's own size grows to 42).
-define(MAX_SIZE, 20).

codec_property_test_() ->
    {timeout, 300,
     fun() ->
             ?assert(proper:quickcheck(prop_codec(), [{numtests, 10000}, {to_file, user}]))
     end}.

prop_codec() ->
    Fixed = fixed_values(),
    ?FORALL(T, term_gen(Fixed), check(T)).

%% Every direction, each reported by name when it fails.
check(T) ->
    Enc = teleport_codec:encode(T),
    EncBin = iolist_to_binary(Enc),
    Plain = term_to_binary(T),
    Compressed = term_to_binary(T, [compressed]),
    Checks = [{"encode |> binary_to_term", fun() -> exact(binary_to_term(EncBin), T) end},
              {"encode |> decode (iolist)", fun() -> exact(teleport_codec:decode(Enc), T) end},
              {"term_to_binary |> decode", fun() -> exact(teleport_codec:decode(Plain), T) end},
              {"term_to_binary(compressed) |> decode",
               fun() -> exact(teleport_codec:decode(Compressed), T) end},
              {"term_to_binary |> decode [safe] agrees with binary_to_term [safe]",
               fun() -> same_outcome(Plain, [safe]) end},
              {"encode |> decode [safe] agrees with binary_to_term [safe]",
               fun() -> same_outcome(EncBin, [safe]) end}],
    Failed = [{Name, Why} || {Name, F} <- Checks, Why <- [run(F)], Why =/= ok],
    ?WHENFAIL(io:format(user, "~nfailed: ~p~n", [Failed]), Failed =:= []).

run(F) ->
    try F() of
        true -> ok;
        false -> different
    catch
        C:R -> {C, R}
    end.

same_outcome(Bin, Opts) ->
    outcome(fun() -> binary_to_term(Bin, Opts) end)
        =:= outcome(fun() -> teleport_codec:decode(Bin, Opts) end).

outcome(F) ->
    try {ok, term_to_binary(F())}
    catch
        error:badarg -> badarg;
        C:R -> {C, R}
    end.

%% Equal as terms and bit for bit (0.0 =:= -0.0 on OTP 25).
exact(A, B) ->
    A =:= B andalso term_to_binary(A) =:= term_to_binary(B).

%%%-------------------------------------------------------------------
%%% Generators
%%%-------------------------------------------------------------------

%% Values made once: pids, references, ports and funs that generators pick from.
fixed_values() ->
    Node = <<"peer@teleport.example">>,
    NodeAtom = <<119, (byte_size(Node)), Node/binary>>,
    #{pids => [self(), spawn(fun() -> ok end),
               binary_to_term(<<131, 88, NodeAtom/binary, 42:32, 0:32, 7:32>>)],
      refs => [binary_to_term(<<131, 90, 3:16, NodeAtom/binary, 7:32, 1:32, 2:32, 3:32>>)],
      ports => [hd(erlang:ports()), binary_to_term(<<131, 89, NodeAtom/binary, 99:32, 7:32>>)],
      funs => [fun lists:map/2, fun erlang:self/0, fun teleport_no_such_module:f/3,
               fun() -> ok end]}.

%% Mostly terms of a few dozen nodes; now and then one holding a large binary or a long list
%% of bytes, the inputs that take the codec's other paths (shared binaries, STRING_EXT limit).
term_gen(Fixed) ->
    ?SIZED(Size, proper_types:frequency(
                   [{40, term_gen(min(Size, ?MAX_SIZE), Fixed)},
                    {1, ?LAZY(heavy_gen(Fixed))}])).

heavy_gen(Fixed) ->
    Small = term_gen(6, Fixed),
    proper_types:oneof(
      [%% Large enough for decode/1 to return it as a sub-binary of its input (from 16 KiB,
       %% and from 64 KiB, where an input dense with atoms takes the same parser).
       ?PLET({N, T}, {proper_types:integer(16384, 65535), Small}, {T, bytes(N), T}),
       ?PLET({N, T}, {proper_types:integer(65536, 140000), Small}, {T, bytes(N), T}),
       ?PLET({N, T}, {proper_types:integer(65536, 140000), Small},
             [bytes(N), T, binary:copy(<<"x">>, N div 2)]),
       %% Several large binaries, none of them 1/16 of the buffer.
       ?PLET(T, Small, [T | [bytes(65536 + I) || I <- lists:seq(1, 20)]]),
       %% Lists of bytes around STRING_EXT's limit of 65535.
       ?PLET({N, T}, {proper_types:integer(65530, 65540), Small},
             {[I rem 256 || I <- lists:seq(1, N)], T})]).

term_gen(Size, Fixed) when Size =< 1 ->
    leaf(Fixed);
term_gen(Size, Fixed) ->
    Child = Size div 3,
    proper_types:frequency(
      [{6, leaf(Fixed)},
       {2, ?LAZY(?PLET(L, children(Size, Child, Fixed), list_to_tuple(L)))},
       {2, ?LAZY(children(Size, Child, Fixed))},
       {1, ?LAZY(?PLET({L, Tail}, {proper_types:non_empty(children(Size, Child, Fixed)),
                                   non_list_leaf(Fixed)},
                       L ++ Tail))},
       {1, ?LAZY(?PLET(KVs, proper_types:resize(Size div 2, proper_types:list(
                                                              {term_gen(Child, Fixed),
                                                               term_gen(Child, Fixed)})),
                       maps:from_list(KVs)))},
       {1, ?LAZY(?PLET(X, term_gen(Child, Fixed), closure(X)))}]).

children(Size, Child, Fixed) ->
    proper_types:resize(Size div 2, proper_types:list(term_gen(Child, Fixed))).

closure(X) ->
    fun(Y) -> {X, Y} end.

leaf(Fixed) ->
    proper_types:frequency(
      [{1, proper_types:exactly([])},
       {4, non_list_leaf(Fixed)},
       {1, string_gen()}]).

non_list_leaf(Fixed) ->
    proper_types:frequency(
      [{4, atom_gen()},
       {5, int_gen()},
       {3, float_gen()},
       {4, binary_gen()},
       {2, bitstring_gen()},
       {1, proper_types:exactly({})},
       {1, one_of(maps:get(pids, Fixed))},
       {1, proper_types:oneof([?PLET(_, proper_types:bool(), make_ref())
                               | [proper_types:exactly(R) || R <- maps:get(refs, Fixed)]])},
       {1, one_of(maps:get(ports, Fixed))},
       {1, one_of(maps:get(funs, Fixed))}]).

one_of(Values) ->
    proper_types:oneof([proper_types:exactly(V) || V <- Values]).

atom_gen() ->
    proper_types:frequency(
      [{3, one_of([ok, '', true, dirty, list_to_atom([252, 110, 239]), list_to_atom([16#3042]),
                   list_to_atom(lists:duplicate(255, $a)), list_to_atom(lists:duplicate(255, 255)),
                   list_to_atom(lists:duplicate(255, 16#3042))])},
       {2, ?PLET(Chars, proper_types:list(char_gen()), list_to_atom(lists:sublist(Chars, 255)))}]).

char_gen() ->
    proper_types:frequency(
      [{4, proper_types:integer($a, $z)},
       {2, proper_types:integer(0, 255)},
       {1, proper_types:integer(16#100, 16#3000)},
       {1, proper_types:integer(16#1F600, 16#1F64F)}]).

int_gen() ->
    proper_types:frequency(
      [{3, proper_types:integer()},
       {2, proper_types:integer(-300, 300)},
       {2, proper_types:largeint()},
       {2, ?PLET({N, Neg, Off}, {proper_types:integer(0, 1100), proper_types:bool(),
                                 proper_types:integer(-2, 2)},
                 case Neg of true -> -(1 bsl N) + Off; false -> (1 bsl N) + Off end)},
       {2, one_of([0, 255, 256, -1, (1 bsl 31) - 1, 1 bsl 31, -(1 bsl 31), -(1 bsl 31) - 1,
                   (1 bsl 63) - 1, 1 bsl 63, -(1 bsl 63), -(1 bsl 63) - 1, (1 bsl 64) - 1,
                   1 bsl 64, -(1 bsl 64)])}]).

float_gen() ->
    <<NegZero/float>> = <<1:1, 0:63>>,
    proper_types:frequency(
      [{4, proper_types:float()},
       {1, one_of([0.0, NegZero, 1.5e308, -1.5e308, 5.0e-324, -5.0e-324,
                   2.2250738585072014e-308])}]).

binary_gen() ->
    proper_types:frequency(
      [{20, proper_types:binary()},
       %% Around encode/1's threshold for keeping a binary by reference.
       {2, ?PLET(N, proper_types:integer(2040, 2100), bytes(N))},
       {1, ?PLET(N, proper_types:integer(2048, 10000), bytes(N))},
       %% Sub-binaries, some of them at a bit offset.
       {2, ?PLET({N, Off, Bits}, {proper_types:integer(0, 3000), proper_types:integer(0, 50),
                                  proper_types:integer(0, 7)},
                 begin
                     <<_:Off/binary, _:Bits, Sub:N/binary, _/bitstring>> = bytes(N + Off + 1),
                     Sub
                 end)}]).

bitstring_gen() ->
    proper_types:frequency(
      [{4, proper_types:bitstring()},
       {1, ?PLET({N, Bits}, {proper_types:integer(2040, 5000), proper_types:integer(1, 7)},
                 <<(bytes(N))/binary, 5:Bits>>)}]).

string_gen() ->
    proper_types:frequency(
      [{4, proper_types:list(proper_types:integer(0, 255))},
       {2, proper_types:list(proper_types:integer(0, 300))},
       {1, proper_types:exactly("abc")}]).

%% N bytes that are not all the same.
bytes(N) ->
    binary:part(binary:copy(<<"teleport-0123456789">>, N div 19 + 1), 0, N).
