defmodule TeleportCodecTest do
  use ExUnit.Case, async: true

  test "the NIF loads under mix and round-trips a term" do
    term = {:msg, :binary.copy("x", 10_000), [1, 2.5, %{a: "b"}], self()}
    assert :erlang.binary_to_term(IO.iodata_to_binary(:teleport_codec.encode(term))) == term
    assert :teleport_codec.decode(:erlang.term_to_binary(term)) == term
  end

  test "large binaries are kept by reference in the iolist" do
    big = :crypto.strong_rand_bytes(1_000_000)
    assert Enum.any?(:teleport_codec.encode({:msg, big}), &:erts_debug.same(&1, big))
  end
end
