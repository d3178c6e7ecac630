defmodule TeleportMixDepTest do
  # teleport as a dependency of a fresh project, the way users take it: a mix project with
  # `{:teleport, path: ...}` and a rebar3 project with teleport in `_checkouts/`. Each
  # project is made in a temporary directory, built with its own tool (no hex: neither kind
  # of dependency needs it) and run: its node starts a :peer node, and a 1 MB message goes
  # each way over teleport. Both builds reuse this checkout's native/target, so cargo only
  # checks that the NIF is up to date.
  #
  # With TELEPORT_GIT_DEP_TEST=1 it also builds both kinds of project with a git dependency
  # on this repository's committed `main` (a clone, so cargo builds the NIF from scratch in
  # the clone's native/target: half a minute or more each).
  use ExUnit.Case, async: false

  @moduletag timeout: 600_000
  @moduletag :mix_dep

  @root Path.expand("..", __DIR__)
  @payload 1_000_000

  # What both projects check, written once: Elixir for the mix project...
  @elixir_app ~S"""
  defmodule App do
    # Started on both nodes: sends back, over teleport, whatever it is sent.
    def echo do
      receive do
        {from, msg} -> :ok = Teleport.send(from, msg)
      end

      echo()
    end

    def main(payload) do
      name = :"mixdep_#{System.unique_integer([:positive])}"
      {:ok, _} = :net_kernel.start([name, :shortnames])
      :ok = :teleport.start()

      {:ok, peer, node} =
        :peer.start(%{
          name: :peer.random_name(:mixdep_peer),
          args: [~c"-pa" | :code.get_path()],
          connection: :standard_io
        })

      :ok = :peer.call(peer, :teleport, :start, [])
      true = Node.connect(node)
      Node.spawn(node, fn -> Process.register(self(), :app_echo); echo() end)
      wait_registered(node, :app_echo)

      big = :binary.copy("x", payload)
      :ok = Teleport.send({:app_echo, node}, {self(), {:ping, big}})

      receive do
        {:ping, ^big} ->
          %{msgs_out: out, msgs_in: inn} = Teleport.stats()[node]
          IO.puts("TELEPORT_OK #{byte_size(big)} bytes there and back, msgs_out=#{out} msgs_in=#{inn}")
      after
        15_000 -> IO.puts("TELEPORT_TIMEOUT"); System.halt(1)
      end

      :peer.stop(peer)
    end

    defp wait_registered(node, name) do
      case :rpc.call(node, :erlang, :whereis, [name]) do
        pid when is_pid(pid) -> :ok
        _ -> Process.sleep(10); wait_registered(node, name)
      end
    end
  end
  """

  # ...and Erlang for the rebar3 project.
  @erlang_app ~S"""
  -module(app).
  -export([main/1, echo/0]).

  %% Started on both nodes: sends back, over teleport, whatever it is sent.
  echo() ->
      receive {From, Msg} -> ok = teleport:send(From, Msg) end,
      echo().

  main(Payload) ->
      ok = teleport:start(),
      {ok, Peer, Node} = peer:start(#{name => peer:random_name(rebardep_peer),
                                      args => ["-pa" | code:get_path()],
                                      connection => standard_io}),
      ok = peer:call(Peer, teleport, start, []),
      true = net_kernel:connect_node(Node),
      _ = spawn(Node, fun() -> register(app_echo, self()), echo() end),
      wait_registered(Node, app_echo),
      Big = binary:copy(<<"x">>, Payload),
      ok = teleport:send({app_echo, Node}, {self(), {ping, Big}}),
      receive
          {ping, Big} ->
              #{msgs_out := Out, msgs_in := In} = maps:get(Node, teleport:stats()),
              io:format("TELEPORT_OK ~b bytes there and back, msgs_out=~b msgs_in=~b~n",
                        [byte_size(Big), Out, In])
      after 15000 ->
          io:format("TELEPORT_TIMEOUT~n"),
          halt(1)
      end,
      peer:stop(Peer).

  wait_registered(Node, Name) ->
      case rpc:call(Node, erlang, whereis, [Name]) of
          Pid when is_pid(Pid) -> ok;
          _ -> timer:sleep(10), wait_registered(Node, Name)
      end.
  """

  setup do
    dir = Path.join(System.tmp_dir!(), "teleport_dep_#{System.unique_integer([:positive])}")
    File.mkdir_p!(dir)
    on_exit(fn -> File.rm_rf!(dir) end)
    %{dir: dir}
  end

  test "a mix project with {:teleport, path: ...} builds and sends", %{dir: dir} do
    mix_project(dir, ~s|{:teleport, path: #{inspect(@root)}}|)
  end

  test "a rebar3 project with teleport in _checkouts builds and sends", %{dir: dir} do
    rebar3_project(dir, fn ->
      File.mkdir_p!(Path.join(dir, "_checkouts"))
      :ok = File.ln_s(@root, Path.join(dir, "_checkouts/teleport"))
    end)
  end

  if System.get_env("TELEPORT_GIT_DEP_TEST") == "1" do
    test "a mix project with {:teleport, git: ...} builds and sends", %{dir: dir} do
      mix_project(dir, ~s|{:teleport, git: "file://#{@root}", branch: "main"}|)
    end

    test "a rebar3 project with a git dependency on teleport builds and sends", %{dir: dir} do
      rebar3_project(dir, fn -> :ok end)
    end
  end

  defp mix_project(dir, dep) do
    File.write!(Path.join(dir, "mix.exs"), """
    defmodule App.MixProject do
      use Mix.Project

      def project do
        [app: :app, version: "0.1.0", elixir: "~> 1.14", deps: [#{dep}]]
      end

      def application, do: [extra_applications: [:logger]]
    end
    """)

    File.mkdir_p!(Path.join(dir, "lib"))
    File.write!(Path.join(dir, "lib/app.ex"), @elixir_app)
    run!(dir, "mix", ["deps.get"])
    out = run!(dir, "mix", ["compile"])
    refute out =~ "warning", out
    out = run!(dir, "mix", ["run", "-e", "App.main(#{@payload})"])
    assert out =~ "TELEPORT_OK #{@payload} bytes there and back", out
  end

  defp rebar3_project(dir, setup) do
    File.write!(Path.join(dir, "rebar.config"), """
    {erl_opts, [debug_info]}.
    {deps, [{teleport, {git, "file://#{@root}", {branch, "main"}}}]}.
    """)

    File.mkdir_p!(Path.join(dir, "src"))

    File.write!(Path.join(dir, "src/app.app.src"), """
    {application, app, [{description, "depends on teleport"}, {vsn, "0.1.0"},
                        {applications, [kernel, stdlib, teleport]}]}.
    """)

    File.write!(Path.join(dir, "src/app.erl"), @erlang_app)
    setup.()
    run!(dir, "rebar3", ["compile"])
    ebins = Path.wildcard(Path.join(dir, "_build/default/{lib,checkouts}/*/ebin"))
    assert Enum.any?(ebins, &String.ends_with?(&1, "/teleport/ebin")), inspect(ebins)
    name = "rebardep_#{System.unique_integer([:positive])}"

    args =
      ["-noshell", "-sname", name] ++
        Enum.flat_map(ebins, &["-pa", &1]) ++
        ["-eval", "app:main(#{@payload}), halt()."]

    out = run!(dir, "erl", args)
    assert out =~ "TELEPORT_OK #{@payload} bytes there and back", out
  end

  # Runs a build tool in `dir` with a clean Mix environment (this test runs under
  # MIX_ENV=test; the projects build in dev, as a user's would).
  defp run!(dir, cmd, args) do
    env = [
      {"MIX_ENV", "dev"},
      {"MIX_BUILD_PATH", nil},
      {"MIX_DEPS_PATH", nil},
      {"MIX_EXS", nil},
      {"MIX_LOCKFILE", nil},
      {"MIX_TARGET", nil}
    ]

    {out, status} = System.cmd(cmd, args, cd: dir, env: env, stderr_to_stdout: true)
    assert status == 0, "#{cmd} #{Enum.join(args, " ")} exited with #{status}:\n#{out}"
    out
  end
end
