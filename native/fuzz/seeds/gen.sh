#!/bin/sh
# Regenerates the seed corpus seeds/decode_etf/ from a local Erlang/OTP: real encodings of
# assorted terms by term_to_binary/1,2, and a few hand-made ones for tags that current OTP no
# longer writes (each checked with binary_to_term/1). Run from anywhere: sh native/fuzz/seeds/gen.sh
# The frame_stream seeds (which wrap these in frames) and the handshake seeds are written by
# `cargo run --manifest-path native/fuzz/Cargo.toml --example gen_seeds` instead.
set -eu
cd "$(dirname "$0")"
mkdir -p decode_etf
erl -noshell -eval '
  W = fun(Name, Bin) ->
          _ = binary_to_term(Bin),
          ok = file:write_file(filename:join("decode_etf", Name), Bin)
      end,
  T = fun(Name, Term) -> W(Name, term_to_binary(Term)) end,
  Node = atom_to_binary(node(), utf8),
  NodeA = <<119, (byte_size(Node)), Node/binary>>,
  T("scalars", {ok, 0, 255, 256, -1, -2147483648, 2147483647, 3.25, -0.0, 1.0e300, [], <<>>}),
  T("atoms", [a, '\''with space'\'', '\''ünïcode'\'', '\''日本'\'', true, list_to_atom(lists:duplicate(255, $x))]),
  W("atoms_latin1", term_to_binary({a, '\''é'\'', abc}, [{minor_version, 1}])),
  W("float_ext", term_to_binary({1.5, -2.0e-10}, [{minor_version, 0}])),
  T("bigints", [1 bsl 63, -(1 bsl 63), (1 bsl 63) - 1, 1 bsl 64, -(1 bsl 64) + 1,
                 12345678901234567890123456789, -(1 bsl 200)]),
  T("large_big", 1 bsl 2100),
  T("pid_ref_port", {self(), make_ref(), hd(erlang:ports())}),
  T("funs", [fun lists:map/2, fun(X) -> X + 1 end]),
  T("maps_small", #{a => 1, <<"b">> => [1, 2], {c} => #{}, 1.5 => x, [] => <<1, 2, 3>>}),
  T("map_large", maps:from_list([{K, K * K} || K <- lists:seq(1, 40)])),
  T("lists", [[1, [2, [3, [4 | five]]]], "string", [a | b], [<<1, 2, 3>>, <<1:3>>, 3.14],
               lists:seq(250, 260), [[], [[]]]]),
  T("string_long", lists:duplicate(300, $z)),
  T("binaries", [<<0:8>>, <<"hello world">>, <<5:7>>, binary:copy(<<1, 2, 3, 4>>, 100)]),
  T("tuple_large", list_to_tuple(lists:seq(1, 300))),
  T("deep_tuple", lists:foldl(fun(_, A) -> {A} end, x, lists:seq(1, 200))),
  T("deep_list", lists:foldl(fun(I, A) -> [I, A] end, [], lists:seq(1, 100))),
  W("compressed", term_to_binary(lists:duplicate(200, {hello, "world"}), [compressed])),
  %% Old encodings that OTP 25 reads but no longer writes.
  W("old_pid", <<131, 103, NodeA/binary, 0:32, 0:32, 0:8>>),
  W("old_port", <<131, 102, NodeA/binary, 7:32, 0:8>>),
  W("v4_port", <<131, 120, NodeA/binary, 1:64, 1:32>>),
  W("old_ref", <<131, 101, NodeA/binary, 1:32, 0:8>>),
  W("new_ref", <<131, 114, 3:16, NodeA/binary, 0:8, 1:32, 2:32, 3:32>>),
  halt().'
