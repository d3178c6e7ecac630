defmodule Teleport do
  @moduledoc """
  Elixir facade for teleport: Erlang messaging over pools of TCP connections per node pair,
  beside distributed Erlang.

  Every function delegates to the Erlang module `:teleport`; see its documentation for the
  guarantees (ordering per sender/destination pair, delivery, flow control) and the
  security model.

      Teleport.send({MyServer, :"b@host"}, {:data, big_binary})
      Teleport.call({MyServer, :"b@host"}, :get, 5_000)

  Configuration is the `:teleport` application environment (`config/*.exs`):

      config :teleport, pool_size: 4, max_queue_bytes: 32 * 1024 * 1024
  """

  @typedoc "A process: a pid, a local registered name, or `{name, node}`."
  @type dest :: pid | atom | {atom, node}

  @typedoc "Why a send failed."
  @type reason :: :nodedown | :not_started | :too_large

  @doc """
  Sends `msg` to `dest` like `Kernel.send/2`, over teleport when `dest` is on another node.

  Blocks only the calling process while the chosen connection's queue is full. Raises
  `ArgumentError` for a malformed destination, as `Kernel.send/2` does.
  """
  @spec send(dest, term) :: :ok | {:error, reason}
  defdelegate send(dest, msg), to: :teleport

  @doc """
  `send/2` with options: `:nosuspend` returns `:nosuspend` instead of waiting when the
  connection is full; `:noconnect` returns `:noconnect` instead of opening a pool.
  """
  @spec send(dest, term, [:nosuspend | :noconnect]) ::
          :ok | :nosuspend | :noconnect | {:error, reason}
  defdelegate send(dest, msg, opts), to: :teleport

  @doc """
  A drop-in for `GenServer.call/3` to a server on another node: the request and the reply
  both travel over teleport, and the server's code does not change. Exits like
  `GenServer.call/3`, with `{:teleport, :gs_call, [dest, request, timeout]}` as the location.
  """
  @spec call(dest, term, timeout) :: term
  def call(dest, request, timeout \\ 5_000), do: :teleport.gs_call(dest, request, timeout)

  @doc "A drop-in for `GenServer.cast/2` over teleport. Always `:ok`."
  @spec cast(dest, term) :: :ok
  defdelegate cast(dest, msg), to: :teleport, as: :gs_cast

  @doc """
  A drop-in for `GenServer.abcast/3`: casts `msg` to the server registered as `name` on
  every node of `nodes`, encoding it once.
  """
  @spec abcast([node], atom, term) :: :abcast
  def abcast(nodes \\ [node() | Node.list()], name, msg), do: :teleport.abcast(nodes, name, msg)

  @doc """
  A drop-in for `GenServer.multi_call/4`: `{replies, bad_nodes}`.
  """
  @spec multi_call([node], atom, term, timeout) :: {[{node, term}], [node]}
  def multi_call(nodes \\ [node() | Node.list()], name, request, timeout \\ :infinity),
    do: :teleport.multi_call(nodes, name, request, timeout)

  @doc "Counters per peer node (messages, bytes, queued bytes, drops, connections)."
  @spec stats() :: %{node => %{atom => non_neg_integer}}
  defdelegate stats(), to: :teleport
end
