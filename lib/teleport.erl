%% @doc teleport: Erlang messages over pools of TCP connections, beside distributed Erlang.
%%
%% `send/2' replaces `Dest ! Msg' for a destination on another node: the message travels
%% over one of a pool of teleport connections to that node, never over the disterl
%% connection, so large messages neither delay disterl's own traffic nor suspend senders
%% with `busy_dist_port'.
%%
%% == Guarantees ==
%% <ul>
%% <li>Order: messages from one process to one destination arrive in the order sent (the
%% pair always uses the same connection); casts and calls from one process to one server
%% stay in order too. A message to `{Name, Node}' and one to the pid registered as `Name'
%% are two destinations and may overtake each other.</li>
%% <li>Delivery: while both nodes and their teleport applications stay up, nothing is lost,
%% duplicated or reordered, even when connections die: the receiver acknowledges what it
%% delivered, the sender keeps every message until then and, on the next connection, sends
%% again from the first one the receiver did not deliver (which it drops if it had it
%% after all). Messages are lost only when the node goes down (what the pool held is
%% dropped and counted in `stats/0', `dropped', and `nodedown' tells), or when the
%% receiving node's teleport restarts: the messages written to its old incarnation and not
%% acknowledged are dropped and counted (`dropped'), never delivered twice.</li>
%% <li>Destinations that do not exist drop the message silently, as with `!'.</li>
%% <li>Peers prove they hold the same cookie as for distributed Erlang before anything they
%% send is decoded.</li>
%% </ul>
-module(teleport).

-export([start/0, stop/0, send/2, send/3, stats/0, info/0, term_to_iolist/1]).
-export([send_answer/3]).
-export([gs_call/2, gs_call/3, gs_cast/2, abcast/2, abcast/3, multi_call/2, multi_call/3,
         multi_call/4]).

-type dest() :: pid() | atom() | {atom(), node()}.
%% Where a message goes: a pid, a local registered name, or `{Name, Node}'.
-type send_option() :: nosuspend | noconnect.
%% See {@link send/3}.
-type reason() :: nodedown | not_started | too_large.
%% Why a send failed: the node cannot be reached, teleport is not running on this node, or
%% the message is too large for one frame.
-type server_ref() :: pid() | atom() | {atom(), node()}.
%% A `gen_server' (or `gen_statem'): a pid, a local registered name, or `{Name, Node}'.
-type call_site() :: {module(), atom(), [term()]}.
%% Where a call failed, as it appears in exit reasons: `{teleport, gs_call, Args}'.
-type address() :: {inet:ip_address(), inet:port_number()}.
-type conn_info() ::
        #{index := non_neg_integer(),
          state := down | connecting | up | closed,
          peer_addr := address(),
          local_addr := address() | undefined,
          queued_bytes := non_neg_integer(),
          frames_in_queue := non_neg_integer(),
          unacked_frames := non_neg_integer(),
          unacked_bytes := non_neg_integer(),
          last_acked := non_neg_integer(),
          msgs_out := non_neg_integer(),
          bytes_out := non_neg_integer(),
          writes := non_neg_integer(),
          last_error := binary() | undefined,
          connected_since := integer() | undefined,
          reconnects := non_neg_integer(),
          sndbuf := non_neg_integer() | undefined,
          recbuf := non_neg_integer() | undefined}.
%% One outgoing connection of a pool (see {@link info/0}).
-type incoming_info() ::
        #{id := non_neg_integer(),
          peer := node() | undefined,
          state := handshaking | up,
          peer_addr := address() | undefined,
          local_addr := address() | undefined,
          msgs_in := non_neg_integer(),
          bytes_in := non_neg_integer(),
          connected_since := integer(),
          sndbuf := non_neg_integer(),
          recbuf := non_neg_integer(),
          reader := pid() | undefined,
          longest_turn_cpu_us := non_neg_integer(),
          longest_turn_wall_us := non_neg_integer()}.
%% One connection accepted by this node's listener (see {@link info/0}).
-type listener_info() ::
        #{ip := inet:ip_address(),
          port := inet:port_number(),
          handshaking := non_neg_integer(),
          socket_opts := teleport_config:socket_opts(),
          incoming := [incoming_info()]}.
%% This node's listener (see {@link info/0}).
-type info() :: #{listener => listener_info(), node() => [conn_info()]}.
%% What {@link info/0} returns.
-export_type([dest/0, send_option/0, reason/0, server_ref/0, info/0, conn_info/0,
              incoming_info/0, listener_info/0]).

-include("teleport_nif.hrl").

%% A blocked sender retries after 1, 2, 4, 8 ms, then every 8 ms.
-define(MAX_BACKOFF, 8).

%% @doc Starts the teleport application and what it needs.
%%
%% When teleport itself cannot start, the error is why, as `teleport_server' stopped (and
%% logged in words): `{error, {invalid_config, Key, Value, Expected}}' for a bad value in
%% the application environment (`Expected' a string: what `Key' accepts),
%% `{error, {nif_not_loaded, Text}}' when `priv/teleport_nif.so' is missing or does not
%% load, `{error, {listen_failed, Ip, Port, Reason}}' when the listener cannot be opened,
%% `{error, {socket_opt_refused, Option, Value, Reason}}' when the kernel refuses a socket
%% option. Other failures are `application:ensure_all_started/1''s.
-spec start() -> ok | {error, term()}.
start() ->
    case application:ensure_all_started(teleport) of
        {ok, _} ->
            ok;
        {error, {teleport, {{shutdown, {failed_to_start_child, teleport_server, Why}}, _}}} ->
            {error, Why};
        {error, _} = Error ->
            Error
    end.


%% @doc Stops the teleport application: pools and the listener close.
-spec stop() -> ok | {error, term()}.
stop() ->
    application:stop(teleport).

%% @doc Sends `Msg' to `Dest' like `Dest ! Msg', over teleport when `Dest' is on another
%% node. Blocks (only this sender) while the chosen connection's queue is full.
%% Raises `badarg' for a malformed destination, and for an unregistered local name, as `!'.
-spec send(dest(), term()) -> ok | {error, reason()}.
send(Dest, Msg) ->
    case send(Dest, Msg, []) of
        ok -> ok;
        {error, _} = Error -> Error
    end.

%% @doc `send/2' with `erlang:send/3''s options: `nosuspend' returns `nosuspend' instead of
%% waiting when the connection's queue is full; `noconnect' returns `noconnect' instead of
%% setting up a pool to a node that has none.
-spec send(dest(), term(), [send_option()]) ->
          ok | nosuspend | noconnect | {error, reason()}.
send(Pid, Msg, Opts) when is_pid(Pid), is_list(Opts) ->
    check_opts(Pid, Msg, Opts),
    case node(Pid) of
        Node when Node =:= node() -> Pid ! Msg, ok;
        Node -> remote(Node, Pid, Pid, Msg, Opts)
    end;
send({Name, Node} = Dest, Msg, Opts) when is_atom(Name), is_atom(Node), is_list(Opts) ->
    check_opts(Dest, Msg, Opts),
    case Node =:= node() of
        true -> Dest ! Msg, ok;
        false -> remote(Node, Name, Name, Msg, Opts)
    end;
send(Name, Msg, Opts) when is_atom(Name), is_list(Opts) ->
    check_opts(Name, Msg, Opts),
    Name ! Msg,
    ok;
send(Dest, Msg, Opts) ->
    erlang:error(badarg, [Dest, Msg, Opts]).

%% @doc `gen_server:call(Dest, Request)' over teleport, with the default timeout of 5 s.
-spec gs_call(server_ref(), term()) -> term().
gs_call(Dest, Request) ->
    gs_call(Dest, Request, 5000).

%% @doc A drop-in for `gen_server:call/3' (or a `gen_statem' call) to a server on another
%% node: the request travels over teleport, and so does the reply. The callee needs no
%% change: on its node `teleport_calls' makes the call locally and sends the reply back.
%%
%% Returns the reply. Exits like `gen_server:call/3', with `{teleport, gs_call, [Dest,
%% Request, Timeout]}' in place of `{gen_server, call, ...}': `{timeout, _}', `{noproc, _}',
%% `{{nodedown, Node}, _}', or the callee's own exit reason if it dies during the call. A
%% reply that arrives after the timeout is dropped, never left in the mailbox.
%%
%% Differences from `gen_server:call/3': the callee sees `teleport_calls' on its own node,
%% not the caller, as the `From' pid (a callee that monitors or links to its caller reaches
%% that long-lived process, not the caller); a server on the local node is called with
%% `gen_server:call/3' itself.
-spec gs_call(server_ref(), term(), timeout()) -> term().
gs_call(Dest, Request, Timeout) ->
    MFA = {?MODULE, gs_call, [Dest, Request, Timeout]},
    case target(Dest) of
        local ->
            try
                gen_server:call(Dest, Request, Timeout)
            catch
                exit:{Reason, {gen_server, call, _}} -> exit({Reason, MFA})
            end;
        {Node, Target} ->
            Alias = request(Node, Target, Request, Timeout, MFA),
            await(Alias, Node, Timeout, MFA);
        badarg ->
            erlang:error(badarg, [Dest, Request, Timeout])
    end.

%% @doc A drop-in for `gen_server:cast/2' over teleport: always `ok'. The same message shape
%% serves `gen_statem:cast/2'; `gen_event:notify/2' is `send(Dest, {notify, Event})'.
-spec gs_cast(server_ref(), term()) -> ok.
gs_cast(Dest, Msg) ->
    _ = (catch send(Dest, {'$gen_cast', Msg})),
    ok.

%% @doc `abcast([node() | nodes()], Name, Msg)'.
-spec abcast(atom(), term()) -> abcast.
abcast(Name, Msg) ->
    abcast([node() | nodes()], Name, Msg).

%% @doc A drop-in for `gen_server:abcast/3': casts `Msg' to the server registered as `Name'
%% on each of `Nodes'. The message is encoded once for all of them.
-spec abcast([node()], atom(), term()) -> abcast.
abcast(Nodes, Name, Msg) when is_list(Nodes), is_atom(Name) ->
    Cast = {'$gen_cast', Msg},
    {Local, Remote} = lists:partition(fun(N) -> N =:= node() end, lists:usort(Nodes)),
    _ = [catch Name ! Cast || _ <- Local],
    Pooled = [{N, P} || N <- Remote, {ok, P} <- [pool(N, [])]],
    Results = case Pooled of
                  [] -> [];
                  _ -> send_many([P || {_, P} <- Pooled], Name, Cast)
              end,
    %% A full or closed connection: that node gets its own send (which waits or reconnects).
    _ = [send({Name, N}, Cast) || {{N, _}, R} <- lists:zip(Pooled, Results), R =/= ok],
    abcast.

%% @doc `multi_call([node() | nodes()], Name, Request, infinity)'.
-spec multi_call(atom(), term()) -> {[{node(), term()}], [node()]}.
multi_call(Name, Request) ->
    multi_call([node() | nodes()], Name, Request, infinity).

%% @doc `multi_call(Nodes, Name, Request, infinity)'.
-spec multi_call([node()], atom(), term()) -> {[{node(), term()}], [node()]}.
multi_call(Nodes, Name, Request) ->
    multi_call(Nodes, Name, Request, infinity).

%% @doc A drop-in for `gen_server:multi_call/4' over teleport: calls the server registered as
%% `Name' on each node at once and waits at most `Timeout' in all. Returns the replies and
%% the nodes that did not answer (down, no such server, it crashed, or too late).
-spec multi_call([node()], atom(), term(), timeout()) -> {[{node(), term()}], [node()]}.
multi_call(Nodes, Name, Request, Timeout) when is_list(Nodes), is_atom(Name) ->
    MFA = {?MODULE, multi_call, [Nodes, Name, Request, Timeout]},
    Pending = [{try_request(Node, Name, Request, Timeout, MFA), Node}
               || Node <- lists:usort(Nodes)],
    Deadline = case Timeout of
                   infinity -> infinity;
                   _ -> erlang:monotonic_time(millisecond) + Timeout
               end,
    collect(Pending, Deadline, [], []).

-spec try_request(node(), atom(), term(), timeout(), call_site()) -> reference() | error.
try_request(Node, Name, Request, Timeout, MFA) ->
    try request(Node, Name, Request, Timeout, MFA)
    catch exit:_ -> error
    end.

-spec collect([{reference() | error, node()}], integer() | infinity,
              [{node(), term()}], [node()]) -> {[{node(), term()}], [node()]}.
collect([], _Deadline, Replies, Bad) ->
    {lists:sort(Replies), lists:sort(Bad)};
collect([{error, Node} | Rest], Deadline, Replies, Bad) ->
    collect(Rest, Deadline, Replies, [Node | Bad]);
collect([{Alias, Node} | Rest], Deadline, Replies, Bad) ->
    Left = case Deadline of
               infinity -> infinity;
               _ -> max(0, Deadline - erlang:monotonic_time(millisecond))
           end,
    case catch await(Alias, Node, Left, undefined) of
        {'EXIT', _} -> collect(Rest, Deadline, Replies, [Node | Bad]);
        Reply -> collect(Rest, Deadline, [{Node, Reply} | Replies], Bad)
    end.

%% Where a call goes: the local node, or a node and the pid or name there.
-spec target(term()) -> local | {node(), pid() | atom()} | badarg.
target(Pid) when is_pid(Pid), node(Pid) =:= node() -> local;
target(Pid) when is_pid(Pid) -> {node(Pid), Pid};
target(Name) when is_atom(Name) -> local;
target({Name, Node}) when is_atom(Name), Node =:= node() -> local;
target({Name, Node}) when is_atom(Name), is_atom(Node) -> {Node, Name};
target(_) -> badarg.

%% Sends a call request to `Node''s teleport_calls; returns the alias the answer comes to
%% (and that the first message through it removes). teleport_replies, which hands answers to
%% it, is told of the wait first, and watches `Node': no monitor per call crosses disterl.
%% The request takes the connection of (this process, `Target'), so it stays behind the
%% casts and messages this process sent to `Target', as with disterl.
-spec request(node(), pid() | atom(), term(), timeout(), call_site()) -> reference().
request(Node, Target, Request, Timeout, MFA) ->
    Alias = erlang:alias([reply]),
    Msg = {'$teleport_call', Target, Request, self(), Alias, Timeout},
    Sent = case teleport_replies:expect(Alias, Node, Timeout) of
               ok -> remote(Node, teleport_calls, Target, Msg, []);
               NotNoted -> NotNoted
           end,
    case Sent of
        ok ->
            teleport_replies:sent(Alias, Timeout),
            Alias;
        {error, Reason} ->
            teleport_replies:forget(Alias),
            erlang:unalias(Alias),
            exit({call_error(Reason, Node), MFA})
    end.

-spec call_error(term(), node()) -> term().
call_error(nodedown, Node) -> {nodedown, Node};
call_error(Reason, _Node) -> Reason.

%% @private The end of a call on the callee's node: `teleport_calls' sends the call's result
%% to `teleport_replies' on the caller's node, which hands it to the caller's alias. It rides
%% the connection of (teleport_calls, the caller), so answers to different callers spread
%% over the pool; one caller's calls are sequential anyway.
-spec send_answer(pid(), reference(), {reply, term()} | {exit, term()}) -> ok.
send_answer(Caller, Alias, Result) ->
    _ = remote(node(Caller), teleport_replies, Caller, {'$teleport_reply', Alias, Result}, []),
    ok.

-spec await(reference(), node(), timeout(), call_site() | undefined) -> term().
await(Alias, Node, Timeout, MFA) ->
    receive
        {Alias, Result} ->
            result(Result, Node, MFA)
    after Timeout ->
            %% Removing the alias makes the VM drop an answer that comes later.
            erlang:unalias(Alias),
            teleport_replies:forget(Alias),
            receive
                {Alias, Result} -> result(Result, Node, MFA)
            after 0 ->
                    exit({timeout, MFA})
            end
    end.

%% What the call returns, or how it exits: `{down, _}' comes from teleport_replies, when
%% teleport_calls on `Node' went away (`noconnection': the node did).
-spec result({reply, term()} | {exit, term()} | {down, term()}, node(),
             call_site() | undefined) -> term().
result({reply, Reply}, _Node, _MFA) -> Reply;
result({exit, Reason}, _Node, MFA) -> exit({Reason, MFA});
result({down, noconnection}, Node, MFA) -> exit({{nodedown, Node}, MFA});
result({down, Reason}, _Node, MFA) -> exit({Reason, MFA}).

-spec send_many([teleport_nif:pool()], atom(), term()) -> [ok | busy | closed | too_large].
send_many(Pools, Name, Msg) ->
    ?NORMAL_OR_DIRTY(teleport_nif:pool_send_many(Pools, Name, Msg),
                     teleport_nif:pool_send_many_dirty(Pools, Name, Msg)).

%% @doc Counters per peer node: messages and bytes each way, bytes held (`queued_bytes':
%% queued, or written and not yet acknowledged), messages dropped, messages resent after a
%% connection died (`resent'), reconnections and connections up.
-spec stats() -> #{node() => #{atom() => non_neg_integer()}}.
stats() ->
    case teleport_server:runtime() of
        {ok, Rt} ->
            maps:from_list([{binary_to_atom(Node, utf8), Counters}
                            || {Node, Counters} <- teleport_nif:runtime_stats(Rt)]);
        {error, not_started} ->
            #{}
    end.

%% @doc What this node's teleport is doing: every pool's connections, by peer node, and the
%% listener with its incoming connections. `#{}' when teleport is not running.
%%
%% ```
%% #{listener => #{ip => {0,0,0,0}, port => 41231, handshaking => 0,
%%                 socket_opts => #{nodelay => true, keepalive => false},
%%                 incoming => [#{id => 0, peer => 'b@host', state => up,
%%                                peer_addr => {{127,0,0,1}, 52814},
%%                                local_addr => {{127,0,0,1}, 41231},
%%                                msgs_in => 12, bytes_in => 3310,
%%                                connected_since => 1767225600123,
%%                                sndbuf => 2626560, recbuf => 131072,
%%                                reader => <0.245.0>, longest_turn_cpu_us => 41,
%%                                longest_turn_wall_us => 52}]},
%%   'b@host' => [#{index => 0, state => up,
%%                  peer_addr => {{127,0,0,1}, 38511}, local_addr => {{127,0,0,1}, 52816},
%%                  queued_bytes => 0, frames_in_queue => 0,
%%                  unacked_frames => 0, unacked_bytes => 0, last_acked => 7,
%%                  msgs_out => 7, bytes_out => 1840, writes => 7,
%%                  last_error => undefined,
%%                  connected_since => 1767225600120, reconnects => 0,
%%                  sndbuf => 2626560, recbuf => 131072},
%%                #{index => 1, state => down, ...}]}
%% '''
%%
%% An outgoing connection (`conn_info()'): `index' its slot in the pool (messages of one
%% sender to one destination always take the same slot); `state' `down' (not connected: no
%% message needed it yet, or the last attempt failed and it waits to retry), `connecting'
%% (TCP connect and handshake), `up', or `closed' (the pool was torn down); `peer_addr' the
%% peer's address (its listener's when not up); `local_addr' this end, `undefined' when not
%% up; `queued_bytes' and `frames_in_queue' what waits to be written (frames the writer is
%% writing count in the bytes only); `unacked_frames' and `unacked_bytes' what was written
%% and waits for the peer's acknowledgement (kept to be sent again if the connection dies;
%% it counts against `max_queue_bytes' with the queue), `last_acked' the sequence number of
%% the last message the peer acknowledged on this slot; `msgs_out' and `bytes_out' what
%% this slot wrote over all its connections, frame headers included (a resent message
%% once); `writes' the `writev' calls that wrote them (`msgs_out / writes' is how many
%% messages one system call carried); `last_error' what went wrong last, as text
%% (connecting, the handshake, or a write), else `undefined'; `connected_since' when the
%% current connection came up, in `erlang:system_time(millisecond)' units
%% (`calendar:system_time_to_rfc3339(T, [{unit, millisecond}])' prints it), `undefined'
%% when not up; `reconnects' the connections after the slot's first; `sndbuf' and `recbuf'
%% the socket's buffer sizes as the kernel reports them (Linux shows twice what was set),
%% `undefined' when not up.
%%
%% The listener (`listener_info()'): its `ip' and `port', `handshaking' the connections now
%% proving their cookie, `socket_opts' the options every connection gets (the `socket_opts'
%% configuration with defaults), and `incoming' every accepted connection
%% (`incoming_info()'): `id' the listener's number for it (log events name it `id' too),
%% `peer' the node once it authenticated (`undefined' during the handshake), `state'
%% `handshaking' or `up', `peer_addr' and `local_addr', `msgs_in' and `bytes_in' read from
%% it, `connected_since' when it was accepted, `sndbuf' and `recbuf' as above, `reader' the
%% `teleport_reader' process that reads it (under `teleport_reader_sup'), `undefined' during
%% the handshake, and `longest_turn_cpu_us' and `longest_turn_wall_us' its longest run on a
%% normal scheduler, in its thread's CPU time and in wall-clock time (which the OS
%% stretches when it preempts the scheduler's thread), in microseconds.
%%
%% `stats/0' has the counters per peer node, summed over connections and both ways.
-spec info() -> info().
info() ->
    case teleport_server:listener_info() of
        {ok, Listener} -> (teleport_server:pool_info())#{listener => Listener};
        {error, not_started} -> #{}
    end.

%% @doc Encodes `Term' in the external term format as an iolist that keeps large binaries by

%% reference. The same as {@link teleport_codec:encode/1}; kept under the name the 2015
%% prototype exported.
-spec term_to_iolist(term()) -> iolist().
term_to_iolist(Term) ->
    teleport_codec:encode(Term).

-spec check_opts(term(), term(), list()) -> ok.
check_opts(Dest, Msg, Opts) ->
    case lists:all(fun(O) -> O =:= nosuspend orelse O =:= noconnect end, Opts) of
        true -> ok;
        false -> erlang:error(badarg, [Dest, Msg, Opts])
    end.

%% Sends to `Dest' on `Node' over the connection of (this process, `Key').
-spec remote(node(), pid() | atom(), term(), term(), [send_option()]) ->
          ok | nosuspend | noconnect | {error, reason()}.
remote(Node, Dest, Key, Msg, Opts) ->
    case pool(Node, Opts) of
        {ok, Pool} -> push(Node, Pool, Dest, Key, Msg, Opts, 1, true);
        Other -> Other
    end.

-spec pool(node(), [send_option()]) ->
          {ok, teleport_nif:pool()} | noconnect | {error, nodedown | not_started}.
pool(Node, Opts) ->
    case teleport_pools:lookup(Node) of
        {ok, Pool} ->
            {ok, Pool};
        none ->
            case lists:member(noconnect, Opts) of
                true -> noconnect;
                false -> teleport_server:connect(Node)
            end;
        {error, not_started} = Error ->
            Error
    end.

-spec push(node(), teleport_nif:pool(), pid() | atom(), term(), term(), [send_option()],
           pos_integer(), boolean()) -> ok | nosuspend | {error, reason()}.
push(Node, Pool, Dest, Key, Msg, Opts, Backoff, MayRetry) ->
    case nif_send(Pool, Dest, Key, Msg) of
        ok ->
            ok;
        busy ->
            case lists:member(nosuspend, Opts) of
                true ->
                    nosuspend;
                false ->
                    %% Only this sender waits; other connections and disterl keep flowing.
                    receive after Backoff -> ok end,
                    Next = min(2 * Backoff, ?MAX_BACKOFF),
                    push(Node, Pool, Dest, Key, Msg, Opts, Next, MayRetry)
            end;
        closed when MayRetry ->
            %% The pool was torn down, or its peer refused it (moved, or restarted teleport):
            %% have it repaired, once.
            case teleport_server:reconnect(Node, Pool) of
                {ok, New} -> push(Node, New, Dest, Key, Msg, Opts, Backoff, false);
                Error -> Error
            end;
        closed ->
            {error, nodedown};
        too_large ->
            {error, too_large}
    end.

-spec nif_send(teleport_nif:pool(), pid() | atom(), term(), term()) ->
          ok | busy | closed | too_large.
nif_send(Pool, Dest, Key, Msg) ->
    ?NORMAL_OR_DIRTY(teleport_nif:pool_send(Pool, Dest, Key, Msg),
                     teleport_nif:pool_send_dirty(Pool, Dest, Key, Msg)).
