defmodule Teleport do
  @moduledoc """
  Elixir facade for teleport: Erlang messaging over pools of TCP connections per node pair,
  beside distributed Erlang.

  Messages to another node travel over teleport's own connections instead of the disterl
  connection, so a large message neither delays the small ones behind it nor suspends every
  sender to that node (`busy_dist_port`). Each call is a drop-in for its `Kernel` or
  `GenServer` counterpart:

  - `send(dest, msg)` for `Kernel.send/2` (`dest ! msg` in Erlang)
  - `call(dest, request, timeout)` for `GenServer.call/3`
  - `cast(dest, msg)` for `GenServer.cast/2`
  - `abcast(nodes, name, msg)` for `GenServer.abcast/3`
  - `multi_call(nodes, name, request, timeout)` for `GenServer.multi_call/4`

  For example:

      Teleport.send({MyServer, :"b@host"}, {:data, big_binary})
      Teleport.call({MyServer, :"b@host"}, :get, 5_000)

  A destination on the local node gets a plain `send/2` or `GenServer` call. Every function
  delegates to the Erlang module `:teleport`, whose documentation (and the README) has the
  guarantees in full: messages from one process to one destination arrive in order, nothing
  is lost while both nodes stay up and connected, a full connection makes only its sender
  wait, and peers prove they hold the disterl cookie before anything they send is decoded.

  teleport must run on every node that sends or receives (as a dependency it starts with
  your application), and the nodes must be connected, or connectable, over distributed
  Erlang: that is how each node finds the other's teleport listener.

  Configuration is the `:teleport` application environment (`config/*.exs`):

      config :teleport, pool_size: 4, max_queue_bytes: 32 * 1024 * 1024
  """

  @typedoc "A process: a pid, a local registered name, or `{name, node}`."
  @type dest :: pid | atom | {atom, node}

  @typedoc "Why a send failed."
  @type reason :: :nodedown | :not_started | :too_large

  @doc """
  Sends `msg` to `dest` like `Kernel.send/2`, over teleport when `dest` is on another node.

  Returns `:ok` once the message is queued on its connection, `{:error, :nodedown}` if the
  node cannot be reached (it never hangs), `{:error, :not_started}` if teleport is not
  running here, and `{:error, :too_large}` for a message larger than a frame may be.
  Blocks only the calling process while the chosen connection's queue is full. Raises
  `ArgumentError` for a malformed destination or an unregistered local name, as
  `Kernel.send/2` does. A destination that does not exist on the other node drops the
  message silently, as with `Kernel.send/2`.
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
  both travel over teleport, and the server's code does not change (`{:reply, r, s}`, and
  `{:noreply, s}` with `GenServer.reply/2` later, both work).

  Exits like `GenServer.call/3`, with `{:teleport, :gs_call, [dest, request, timeout]}` as
  the location: `{:timeout, _}`, `{:noproc, _}`, `{{:nodedown, node}, _}`, or the server's
  own exit reason. A reply that arrives after the timeout is dropped, never left in the
  mailbox. The server sees `teleport_calls` on its own node, not the caller, as the
  `from` pid (no process is spawned per call). A server on the local node is called with `GenServer.call/3` itself.
  """
  @spec call(dest, term, timeout) :: term
  def call(dest, request, timeout \\ 5_000), do: :teleport.gs_call(dest, request, timeout)

  @doc """
  A drop-in for `GenServer.cast/2` over teleport (also for `:gen_statem.cast/2`). Always
  `:ok`, as a cast to a node that cannot be reached is dropped.
  """
  @spec cast(dest, term) :: :ok
  defdelegate cast(dest, msg), to: :teleport, as: :gs_cast

  @doc """
  A drop-in for `GenServer.abcast/3`: casts `msg` to the server registered as `name` on
  every node of `nodes` (by default this node and every connected node), encoding it once
  for all of them. Always `:abcast`.
  """
  @spec abcast([node], atom, term) :: :abcast
  def abcast(nodes \\ [node() | Node.list()], name, msg), do: :teleport.abcast(nodes, name, msg)

  @doc """
  A drop-in for `GenServer.multi_call/4`: calls the server registered as `name` on every
  node of `nodes` (by default this node and every connected node) at once, waiting at most
  `timeout` in all. Returns `{replies, bad_nodes}`: `{node, reply}` pairs, and the nodes
  that did not answer (down, no such server, it crashed, or too late).
  """
  @spec multi_call([node], atom, term, timeout) :: {[{node, term}], [node]}
  def multi_call(nodes \\ [node() | Node.list()], name, request, timeout \\ :infinity),
    do: :teleport.multi_call(nodes, name, request, timeout)

  @doc """
  Counters per peer node: `:msgs_out`, `:bytes_out`, `:msgs_in`, `:bytes_in` (since
  teleport started), `:queued_bytes` (now), `:dropped` (messages still queued when their
  connection failed or the pool closed), `:reconnects`, and `:connections` and
  `:connections_in` (up now). An empty map if teleport is not running.
  `examples/stats_reporter.erl` turns them into periodic reports.
  """
  @spec stats() :: %{node => %{atom => non_neg_integer}}
  defdelegate stats(), to: :teleport
end
