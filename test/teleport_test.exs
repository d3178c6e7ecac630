defmodule TeleportTest do
  # Real 2-node exchanges: the callee is an Agent (a GenServer that exists on every node),
  # started on a :peer node, called with external funs so no test code has to be loaded there.
  use ExUnit.Case, async: false

  @get {:get, &Function.identity/1}

  setup_all do
    unless Node.alive?() do
      {:ok, _} = :net_kernel.start([:teleport_exunit, :shortnames])
      on_exit(fn -> :net_kernel.stop() end)
    end

    :ok = :teleport.start()

    {:ok, peer, node} =
      :peer.start(%{
        name: :peer.random_name(:exunit),
        args: [~c"-pa" | :code.get_path()],
        connection: :standard_io
      })

    :ok = :peer.call(peer, :teleport, :start, [])
    # :peer talks over stdio; teleport finds the peer's listener over disterl.
    true = Node.connect(node)
    {:ok, _} = :peer.call(peer, Agent, :start, [Function, :identity, [state()], [name: :echo]])
    on_exit(fn -> :peer.stop(peer) end)
    %{node: node, peer: peer}
  end

  test "a GenServer call to another node is answered over teleport", %{node: node} do
    {in0, out0} = dist_bytes(node)
    assert Teleport.call({:echo, node}, @get, 10_000) == state()
    {in1, out1} = dist_bytes(node)
    # The 5 MB reply rode teleport, not disterl.
    assert in1 - in0 < 65_536 and out1 - out0 < 65_536
    assert %{msgs_in: msgs_in} = Teleport.stats()[node]
    assert msgs_in >= 1
  end

  test "send, cast, abcast and multi_call", %{node: node, peer: peer} do
    Process.register(self(), :exunit_receiver)
    # The peer sends to us over teleport.
    :ok = :peer.call(peer, Teleport, :send, [{:exunit_receiver, node()}, {:hello, node}])
    assert_receive {:hello, ^node}, 5_000

    assert :ok = Teleport.cast({:echo, node}, {:cast, &Function.identity/1})
    assert :abcast = Teleport.abcast([node], :echo, {:cast, &Function.identity/1})
    state = state()
    assert {[{^node, ^state}], [:"nobody@nohost"]} =
             Teleport.multi_call([node, :"nobody@nohost"], :echo, @get, 5_000)

    assert {:error, :nodedown} = Teleport.send({:echo, :"nobody@nohost"}, :x)
  end

  test "call failures exit like GenServer.call", %{node: node} do
    dest = {:no_such_server, node}
    assert {:noproc, {:teleport, :gs_call, [^dest, :x, 1_000]}} =
             catch_exit(Teleport.call(dest, :x, 1_000))
  end

  defp state, do: :binary.copy("x", 5_000_000)

  defp dist_bytes(node) do
    [ctrl] = for {^node, c} <- :erlang.system_info(:dist_ctrl), do: c
    {:ok, [recv_oct: i, send_oct: o]} = :inet.getstat(ctrl, [:recv_oct, :send_oct])
    {i, o}
  end
end
