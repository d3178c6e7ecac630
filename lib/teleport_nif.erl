%% @doc The NIF stub: every function here is replaced by its Rust version from
%% `priv/teleport_nif.so' when the module loads. Nothing but `teleport_*' modules should call
%% it; they add the argument checks, the dirty-scheduler hand-off and the reduction accounting.
-module(teleport_nif).

-export([codec_encode/1, codec_encode_dirty/1, codec_decode/2, codec_decode_dirty/2,
         log_set_level/1, log_emit_test/2]).
-export([runtime_start/6, runtime_set_name/2, runtime_stop/1, runtime_port/1, runtime_allow/3,
         runtime_forbid/2, runtime_stats/1, runtime_info/1]).
-export([pool_start/8, pool_send/4, pool_send_dirty/4, pool_send_many/3, pool_send_many_dirty/3,
         pool_retarget/4, pool_limit_frames/2, pool_close/1, pool_info/1]).
-export([reader_attach/1, reader_fd/1, reader_feed/2, reader_feed_dirty/2, reader_run/2,
         reader_run_dirty/2, reader_detach/1]).
-export([diag_panic/0, diag_local_ids/0]).

-export_type([runtime/0, pool/0, reader/0, reader_answer/0, feed_answer/0]).

-opaque runtime() :: reference().
%% This node's listener, peers allowed in, and counters (a NIF resource).
-opaque pool() :: reference().
%% The outgoing connections to one peer (a NIF resource).
-opaque reader() :: reference().
%% One incoming connection, as its `teleport_reader' process reads it (a NIF resource).
-type reader_answer() :: {wait, timeout(), port | dirty} | more | dirty | done.
%% What a reader's turn of its own reads left: wait for what the port reads (`port'), or for
%% the socket's `select' message (`dirty': a large frame is being read), the timeout or
%% `teleport_tick'; run again; run the dirty variant; it ended.
-type fed() :: binary() | eof | {error, atom()}.
%% What the reader's port read: bytes, the end of the stream, or the socket's error.
-type feed_answer() :: {wait, timeout(), port} | {more | dirty, fed()} | done.
%% What a turn fed with the port's bytes left: wait for more; feed the rest next; stop the
%% port and go on with `reader_feed_dirty/2' and `reader_run_dirty/2'; it ended.

-on_load(init/0).

-define(NOT_LOADED, erlang:nif_error({not_loaded, ?MODULE})).

%% @private Loads the shared library; a failure names the file and says how to build it.
-spec init() -> ok | {error, term()}.
init() ->
    Path = filename:join(priv_dir(), "teleport_nif"),
    case erlang:load_nif(Path, 0) of
        ok ->
            ok;
        {error, {Reason, Text}} = Error ->
            logger:error("teleport: cannot load its NIF from ~ts.so (~p: ~ts); build it with "
                         "'rebar3 compile', 'mix compile' or 'sh native/build.sh' in the "
                         "teleport source directory",
                         [Path, Reason, Text], #{domain => [teleport]}),
            Error
    end.

-spec priv_dir() -> file:filename().
priv_dir() ->
    case code:priv_dir(teleport) of
        {error, bad_name} ->
            %% Not loaded as an application (e.g. modules on the path by hand): ../priv.
            filename:join(filename:dirname(filename:dirname(code:which(?MODULE))), "priv");
        Dir ->
            Dir
    end.

%% @doc Encodes within a normal scheduler's budget: an iolist, or `dirty' if too big.
-spec codec_encode(term()) -> iolist() | dirty.
codec_encode(_Term) -> ?NOT_LOADED.

%% @doc Encodes on a dirty CPU scheduler: the iolist and the reductions to charge.
-spec codec_encode_dirty(term()) -> {iolist(), non_neg_integer()}.
codec_encode_dirty(_Term) -> ?NOT_LOADED.

%% @doc Decodes a binary on a normal scheduler, or answers `dirty' if it is too big.
-spec codec_decode(binary(), boolean()) -> term().
codec_decode(_Bin, _Safe) -> ?NOT_LOADED.

%% @doc Decodes on a dirty CPU scheduler: the term and the reductions to charge.
-spec codec_decode_dirty(binary(), boolean()) -> {term(), non_neg_integer()}.
codec_decode_dirty(_Bin, _Safe) -> ?NOT_LOADED.

%% @doc Listens on `Ip:Port' for node `Me' (`Ip' as text, port 0 for any), announcing each
%% authenticated connection to the calling process as `{teleport_accepted, Reader}', for a
%% `teleport_reader' to read. `SockOpts' are
%% the socket options of the listener and of every connection, incoming and outgoing: the
%% map {@link teleport_config:nif_socket_opts/1} makes. `Limits': the largest frame read, the
%% bound on an incoming handshake (ms), and how much lower than the VM's the OS priority of
%% teleport's threads is (`thread_nice' in teleport_config). `Tls': `false' (plain), or the
%% map {@link teleport_tls:nif_opts/1} makes, whose files are loaded here (`{tls, Why}'
%% names the file and the fault). An option the kernel refuses on the listening socket is
%% `{socket_opt, Option, Reason}'.
-spec runtime_start(binary(), binary(), inet:port_number(),
                    #{atom() => integer() | boolean() | binary()},
                    #{max_frame_bytes := pos_integer(), handshake_timeout := pos_integer(),
                      thread_nice := 0..19},
                    false | map()) ->
          {ok, runtime()} |
          {error, {bad_ip, binary()} | {listen, binary()} | {socket_opt, atom(), binary()} |
           {tls, binary()}}.
runtime_start(_Me, _Ip, _Port, _SockOpts, _Limits, _Tls) -> ?NOT_LOADED.

%% @doc Makes the calling process the reader of an incoming connection (it is monitored: if
%% it dies, the connection ends); returns the connection's id, as `teleport:info/0' and the
%% logs name it.
-spec reader_attach(reader()) -> non_neg_integer().
reader_attach(_Reader) -> ?NOT_LOADED.

%% @doc A duplicate of the connection's socket, for the reader's port (`gen_tcp:fdopen/2').
-spec reader_fd(reader()) -> non_neg_integer() | closed.
reader_fd(_Reader) -> ?NOT_LOADED.

%% @doc A turn on a normal scheduler with what the port read (`eof': the stream ended;
%% `{error, Reason}': the socket failed, and the connection ends with that error).
-spec reader_feed(reader(), fed()) -> feed_answer().
reader_feed(_Reader, _Data) -> ?NOT_LOADED.

%% @doc `reader_feed/2' on a dirty I/O scheduler: takes all of it, frames of any length.
-spec reader_feed_dirty(reader(), fed()) -> feed_answer().
reader_feed_dirty(_Reader, _Data) -> ?NOT_LOADED.

%% @doc A turn of the reader on a normal scheduler: `read' when the socket is readable,
%% `tick' otherwise (a deadline passed, the listener closed, or the first turn).
-spec reader_run(reader(), read | tick) -> reader_answer().
reader_run(_Reader, _Event) -> ?NOT_LOADED.

%% @doc `reader_run/2' on a dirty I/O scheduler, for frames too long for a normal one.
-spec reader_run_dirty(reader(), read | tick) -> reader_answer().
reader_run_dirty(_Reader, _Event) -> ?NOT_LOADED.

%% @doc Ends the reading now (the reader process is stopping). A connection whose listener
%% is closing still says LAST and lingers, on a thread of its own.
-spec reader_detach(reader()) -> ok.
reader_detach(_Reader) -> ?NOT_LOADED.

%% @doc Sets this node's name, as handshakes state it from now on.
-spec runtime_set_name(runtime(), binary()) -> ok.
runtime_set_name(_Runtime, _Me) -> ?NOT_LOADED.

%% @doc Stops listening and closes every incoming connection.
-spec runtime_stop(runtime()) -> ok.
runtime_stop(_Runtime) -> ?NOT_LOADED.

%% @doc The port the listener is bound to.
-spec runtime_port(runtime()) -> inet:port_number().
runtime_port(_Runtime) -> ?NOT_LOADED.

%% @doc Lets node `Node' (its name as a binary) connect in, proving it knows `Cookie'.
-spec runtime_allow(runtime(), binary(), binary()) -> ok.
runtime_allow(_Runtime, _Node, _Cookie) -> ?NOT_LOADED.

%% @doc Stops node `Node' from connecting in.
-spec runtime_forbid(runtime(), binary()) -> ok.
runtime_forbid(_Runtime, _Node) -> ?NOT_LOADED.

%% @doc The counters of every peer seen, by node name.
-spec runtime_stats(runtime()) -> [{binary(), #{atom() => non_neg_integer()}}].
runtime_stats(_Runtime) -> ?NOT_LOADED.

%% @doc The listener and its incoming connections (`teleport:info/0' shows them), each
%% connection's `peer' a node name as a binary, `undefined' while it shakes hands.
-spec runtime_info(runtime()) -> #{atom() => term()}.
runtime_info(_Runtime) -> ?NOT_LOADED.

%% @doc Starts `Size' connection slots to node `Peer' at `Ip:Port'; they connect on first use.
%% When the peer refuses their connections, the calling process (the pool's owner) gets
%% `{teleport_pool_stale, Peer}' and should find the peer's listener and retarget the pool.
-spec pool_start(runtime(), binary(), binary(), inet:port_number(), binary(), pos_integer(),
                 pos_integer(), {pos_integer(), pos_integer()}) ->
          {ok, pool()} | {error, term()}.
pool_start(_Runtime, _Peer, _Ip, _Port, _Cookie, _Size, _MaxQueueBytes, _TimeoutsMs) ->
    ?NOT_LOADED.

%% @doc Encodes `Msg' into a frame for `Dest' (a pid or a name registered on the peer) and
%% queues or writes it, within a normal scheduler's budget, on the connection of (caller,
%% `Key'); `Key' is `Dest' but for call requests, keyed by the server they call.
-spec pool_send(pool(), pid() | atom(), term(), term()) ->
          ok | busy | closed | too_large | dirty.
pool_send(_Pool, _Dest, _Key, _Msg) -> ?NOT_LOADED.

%% @doc `pool_send/4' on a dirty CPU scheduler, with the reductions to charge.
-spec pool_send_dirty(pool(), pid() | atom(), term(), term()) ->
          {ok | busy | closed | too_large, non_neg_integer()}.
pool_send_dirty(_Pool, _Dest, _Key, _Msg) -> ?NOT_LOADED.

%% @doc Encodes `Msg' once into a frame for the name `Name' and queues it on every pool:
%% one result per pool, in order, or `dirty' when too big for a normal scheduler.
-spec pool_send_many([pool()], atom(), term()) -> [ok | busy | closed | too_large] | dirty.
pool_send_many(_Pools, _Name, _Msg) -> ?NOT_LOADED.

%% @doc `pool_send_many/3' on a dirty CPU scheduler, with the reductions to charge.
-spec pool_send_many_dirty([pool()], atom(), term()) ->
          {[ok | busy | closed | too_large], non_neg_integer()}.
pool_send_many_dirty(_Pools, _Name, _Msg) -> ?NOT_LOADED.

%% @doc Points the pool at `Ip:Port', where its peer listens now, proving `Cookie' (the one
%% shared with the peer now); what the pool holds goes there.
-spec pool_retarget(pool(), binary(), inet:port_number(), binary()) ->
          ok | {error, {bad_ip, binary()}}.
pool_retarget(_Pool, _Ip, _Port, _Cookie) -> ?NOT_LOADED.

%% @doc Tells the pool the largest frame body its peer reads (its `max_frame_bytes'), so
%% that larger messages are refused with `too_large' before a handshake says it again.
-spec pool_limit_frames(pool(), pos_integer()) -> ok.
pool_limit_frames(_Pool, _MaxFrameBytes) -> ?NOT_LOADED.

%% @doc Tears the pool down; queued messages are dropped and counted.
-spec pool_close(pool()) -> ok.
pool_close(_Pool) -> ?NOT_LOADED.

%% @doc The state and counters of each connection of the pool (`teleport:info/0' shows them).
-spec pool_info(pool()) -> [#{atom() => term()}].
pool_info(_Pool) -> ?NOT_LOADED.

%% @doc Sets the least severe level of Rust `tracing' events sent to `teleport_log'.
-spec log_set_level(error | warning | info | debug) -> ok.
log_set_level(_Level) -> ?NOT_LOADED.

%% @doc Diagnostic: emits a Rust `tracing' event `test_event' with the field `text'.
-spec log_emit_test(error | warning | info | debug, binary()) -> ok.
log_emit_test(_Level, _Text) -> ?NOT_LOADED.

%% @doc Diagnostic: panics inside the NIF, which raises `error:nif_panicked' in the caller;
%% used by tests to show that a Rust panic never takes the VM down.
-spec diag_panic() -> no_return().
diag_panic() -> ?NOT_LOADED.

%% @doc Diagnostic: what the codec's checks of pids, ports and references found so far
%% (whether it writes local ones itself, keeps this node's name between calls, writes pid
%% references, writes those of other nodes); tests use it to see that the fast path they
%% test is the one taken.
-spec diag_local_ids() ->
          #{layout | bounds | pid_refs | remote | remote_refs => unchecked | on | off}.
diag_local_ids() -> ?NOT_LOADED.
