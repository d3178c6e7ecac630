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

    assert {[{^node, ^state}], [:nobody@nohost]} =
             Teleport.multi_call([node, :nobody@nohost], :echo, @get, 5_000)

    assert {:error, :nodedown} = Teleport.send({:echo, :nobody@nohost}, :x)
  end

  test "call failures exit like GenServer.call", %{node: node} do
    dest = {:no_such_server, node}

    assert {:noproc, {:teleport, :gs_call, [^dest, :x, 1_000]}} =
             catch_exit(Teleport.call(dest, :x, 1_000))
  end

  test "examples/stats_reporter.erl reports what teleport counted", %{node: node} do
    reporter = stats_reporter()
    me = self()
    report = fn n, d -> send(me, {:report, n, d}) end
    {:ok, pid} = reporter.start_link(%{interval: 60_000, report: report})
    on_exit(fn -> if Process.alive?(pid), do: reporter.stop(pid) end)
    # Nobody is registered under this name there: the message is counted, then dropped.
    assert :ok = Teleport.send({:nobody_here, node}, :binary.copy("y", 2_000_000))

    assert %{msgs_out: msgs, bytes_out: bytes, interval_ms: ms} =
             reported_out(reporter, pid, node, 2_000_000)

    assert msgs >= 1 and bytes >= 2_000_000 and ms >= 0
    # Without a `report` fun, each report is one logger event.
    :ok = reporter.stop(pid)
    {:ok, pid} = reporter.start_link(%{interval: 60_000, level: :warning})
    out0 = Teleport.stats()[node].bytes_out
    assert :ok = Teleport.send({:nobody_here, node}, :binary.copy("z", 1_000_000))
    wait_until(fn -> Teleport.stats()[node].bytes_out - out0 >= 1_000_000 end)

    log =
      ExUnit.CaptureLog.capture_log(fn ->
        :ok = reporter.report_now(pid)
        Process.sleep(100)
      end)

    assert log =~ ~r/teleport stats #{node} over [0-9.]+ s: out [0-9]+ msgs 1.0 MB/
    :ok = reporter.stop(pid)
  end

  test "stats_reporter's deltas: counters increase, gauges as they are, restarts from zero" do
    reporter = stats_reporter()
    before = %{a: %{msgs_out: 10, bytes_out: 1000, queued_bytes: 500, connections: 2}}

    assert %{
             a: %{msgs_out: 5, bytes_out: 500, queued_bytes: 0, connections: 2},
             b: %{msgs_out: 3, connections: 1}
           } ==
             reporter.deltas(before, %{
               a: %{msgs_out: 15, bytes_out: 1500, queued_bytes: 0, connections: 2},
               b: %{msgs_out: 3, connections: 1}
             })

    # Counters that went back: teleport restarted, so they count from zero.
    assert %{a: %{msgs_out: 2, bytes_out: 20, queued_bytes: 0, connections: 1}} ==
             reporter.deltas(before, %{
               a: %{msgs_out: 2, bytes_out: 20, queued_bytes: 0, connections: 1}
             })
  end

  # The example compiled and loaded here (a module name in a variable: not a dependency).
  defp stats_reporter do
    file = ~c"#{Path.expand("../examples/stats_reporter.erl", __DIR__)}"
    {:ok, mod, bin} = :compile.file(file, [:binary, :return_errors])
    {:module, mod} = :code.load_binary(mod, file, bin)
    mod
  end

  # Asks for a report every 20 ms until `bytes` sent to `node` have been counted (a send
  # returns once the message is queued, on a connection that may still be opening; it is
  # counted when written), for 5 s at most; returns the deltas summed.
  defp reported_out(reporter, pid, node, bytes, acc \\ %{}, tries \\ 250) do
    :ok = reporter.report_now(pid)

    # The report, if any, was sent before report_now/1 returned.
    acc =
      receive do
        {:report, ^node, d} -> Map.merge(acc, d, fn _, a, b -> a + b end)
      after
        0 -> acc
      end

    if Map.get(acc, :bytes_out, 0) >= bytes or tries == 0 do
      acc
    else
      Process.sleep(20)
      reported_out(reporter, pid, node, bytes, acc, tries - 1)
    end
  end

  defp wait_until(fun, tries \\ 250) do
    cond do
      fun.() ->
        :ok

      tries == 0 ->
        flunk("timed out")

      true ->
        Process.sleep(20)
        wait_until(fun, tries - 1)
    end
  end

  defp state, do: :binary.copy("x", 5_000_000)

  defp dist_bytes(node) do
    [ctrl] = for {^node, c} <- :erlang.system_info(:dist_ctrl), do: c
    {:ok, [recv_oct: i, send_oct: o]} = :inet.getstat(ctrl, [:recv_oct, :send_oct])
    {i, o}
  end
end

defmodule TeleportDocsAndExamplesTest do
  # What `make docs` and `make example` rely on.
  use ExUnit.Case, async: false

  @root Path.expand("..", __DIR__)

  test "every public function of lib/*.erl has a @doc and a -spec" do
    dir = Path.join(System.tmp_dir!(), "teleport_chunks_#{System.unique_integer([:positive])}")
    on_exit(fn -> File.rm_rf!(dir) end)
    files = Path.wildcard(Path.join(@root, "lib/*.erl")) |> Enum.map(&String.to_charlist/1)

    :ok =
      :edoc.run(files,
        doclet: :edoc_doclet_chunks,
        layout: :edoc_layout_chunks,
        dir: String.to_charlist(dir),
        preprocess: true
      )

    missing =
      for chunk <- Path.wildcard(Path.join(dir, "chunks/*.chunk")),
          {:docs_v1, _, :erlang, _, mod_doc, _, docs} = :erlang.binary_to_term(File.read!(chunk)),
          # A module or function marked @private is not public.
          mod_doc != :hidden,
          mod = String.to_atom(Path.basename(chunk, ".chunk")),
          {{:function, f, a}, _, _, doc, meta} <- docs,
          {f, a} in mod.module_info(:exports),
          doc != :hidden,
          problem <- [doc == %{} && "no @doc", not Map.has_key?(meta, :signature) && "no -spec"],
          problem,
          do: "#{mod}:#{f}/#{a}: #{problem}"

    assert missing == []
  end

  test "every function of the Teleport facade has a @doc and a @spec" do
    {:docs_v1, _, :elixir, _, %{"en" => _}, _, docs} = Code.fetch_docs(Teleport)
    {:ok, specs} = Code.Typespec.fetch_specs(Teleport)
    specs = Map.new(specs)
    exports = Teleport.__info__(:functions)

    missing =
      for {{:function, f, a}, _, _, doc, meta} <- docs,
          arities = Enum.to_list((a - Map.get(meta, :defaults, 0))..a),
          problem <- [
            doc in [:none, :hidden] && "no @doc",
            not Enum.any?(arities, &Map.has_key?(specs, {f, &1})) && "no @spec"
          ],
          problem,
          do: "Teleport.#{f}/#{a}: #{problem}"

    assert missing == []
    # Every exported function is documented (none hidden, none left out).
    documented =
      for {{:function, f, a}, _, _, _, meta} <- docs,
          n <- (a - Map.get(meta, :defaults, 0))..a,
          do: {f, n}

    assert Enum.sort(exports) == Enum.sort(documented)
  end

  @tag timeout: 180_000
  test "examples/big_file.sh sends a file over teleport and over disterl" do
    # teleport as mix built it, whose .app names Elixir's logger among its applications.
    ebin = Path.dirname(to_string(:code.which(:teleport)))
    elixir_libs = Path.dirname(to_string(:code.lib_dir(:elixir)))

    {out, status} =
      System.cmd("sh", [Path.join(@root, "examples/big_file.sh")],
        env: [
          {"BIG_FILE_MB", "16"},
          {"BIG_FILE_CHUNK_MB", "4"},
          {"TELEPORT_EBIN", ebin},
          {"ERL_LIBS", elixir_libs}
        ],
        stderr_to_stdout: true
      )

    assert status == 0, out
    assert out =~ ~r/over teleport:\n(  chunk .*\n){4}  B received 16.0 MB in .* sha256 ok/, out
    assert out =~ ~r/over disterl:\n(  chunk .*\n){4}  B received 16.0 MB in .* sha256 ok/, out

    assert out =~
             ~r/teleport stats big_file_b_[0-9]+@\S+ over [0-9.]+ s: out [0-9]+ msgs 16.0 MB/,
           out
  end
end
