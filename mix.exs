defmodule Mix.Tasks.Compile.TeleportNif do
  @moduledoc """
  Builds teleport's Rust NIF with cargo (`native/build.sh`) before Mix's own compilers, so
  that teleport needs no hex package (no rustler_mix) to build as a dependency.
  """
  use Mix.Task.Compiler

  @impl Mix.Task.Compiler
  def run(_args) do
    script = Path.join(__DIR__, "native/build.sh")

    case System.cmd("sh", [script], stderr_to_stdout: true) do
      {_, 0} ->
        {:ok, []}

      {out, status} ->
        Mix.shell().error("teleport: native/build.sh failed (exit #{status}):\n" <> out)
        {:error, []}
    end
  end
end

defmodule Teleport.MixProject do
  use Mix.Project

  def project do
    [
      app: :teleport,
      version: "0.1.0",
      elixir: "~> 1.14",
      language: :erlang,
      # rebar3 owns _build/<profile>; Mix builds beside it so the two never clobber each other.
      build_path: "_build/mix",
      compilers: [:teleport_nif | Mix.compilers()],
      erlc_paths: ["lib"],
      erlc_options: [:debug_info, :warnings_as_errors],
      elixirc_paths: ["lib"],
      test_paths: ["test"],
      test_pattern: "*_test.exs",
      deps: []
    ]
  end

  # Keep in step with lib/teleport.app.src, which rebar3 reads: Mix makes its own .app.
  def application do
    [
      mod: {:teleport_app, []},
      registered: [:teleport_sup, :teleport_server, :teleport_log, :teleport_calls, :teleport_replies],
      extra_applications: [:logger, public_key: :optional]
    ]
  end
end
