%% @doc Finding a peer's teleport listener, over distributed Erlang.
%%
%% `teleport_server' asks the peer's `teleport_server' where it listens (the request is
%% also what lets this node connect in there), from a worker process so that a slow or
%% absent peer never blocks it. This module is that worker, the bookkeeping of who waits
%% for which node, why a peer could not be found (in words, for the log), and how often a
%% pool whose peer's teleport went away is looked for again before its queue is given up.
%%
%% Invariant: every caller recorded as waiting for a node is handed back exactly once, by
%% {@link done/3}, with the worker's outcome, whether the worker returned, crashed or was
%% killed. The worker is monitored, never only spawned: a bare `spawn' that dies sends
%% nothing, and its callers (in `gen_server:call(..., infinity)') would wait for ever.
%%
%% Why `spawn_monitor' and not a worker under a supervisor: the worker is one question
%% with one answer, wanted only by the process that asked. A supervisor would restart it
%% (a crashed question is not worth asking again blindly; the owner decides), and the
%% owner would still need a monitor to learn that it died. The worker hands its answer
%% back as its exit reason, as `erpc' does, so the owner gets exactly one message, `DOWN',
%% whatever happens to it: no answer and `DOWN' to pair up, no answer after a `DOWN'.
-module(teleport_discovery).

-export([ask/2, peer_address/2, host_part/1, explain/1, retry_delay/1, retry_waits/0]).
-export([new/0, find/4, asking/2, done/3, worker/1]).

-export_type([found/0, unreachable/0, outcome/0, asker/0, pending/0]).

%% Where a peer's listener is, and the largest frame it reads (`undefined' if it did not
%% say; every handshake says it again).
-type found() :: {ok, inet:ip_address(), inet:port_number(), pos_integer() | undefined}.

%% Why a peer's listener could not be found.
-type unreachable() :: this_node | not_distributed | {no_dist_connection, node()}
                     | {no_teleport, node()} | {no_answer, node(), timeout()}
                     | {call_failed, node(), term()} | {no_address, node(), string()}
                     | {crashed, node(), term()}.

-type outcome() :: found() | {error, unreachable()}.

%% What a worker runs: {@link ask/2} for a node, or any function giving an outcome.
-type asker() :: fun(() -> outcome()).

%% The nodes being looked for: each with its worker's monitor and the callers waiting.
-opaque pending() :: #{nodes := #{node() => {reference(), [gen_server:from()]}},
                       refs := #{reference() => node()}}.

%% A worker's exit reason when it has an answer (anything else: it crashed or was killed).
-define(ANSWER(Outcome), {?MODULE, answer, Outcome}).

%% How long to wait before looking again for a stale pool's peer after each failed
%% attempt: the first attempt is made at once, then 5 more over 3.1 s (100 ms doubling, the
%% last wait 1.6 s). Long enough for the peer's teleport application to be stopped and
%% started again (a restart by hand or by a release upgrade), short enough that messages
%% to a teleport gone for good are not held for long before they are dropped and counted.
%% The pool keeps its queue meanwhile, and senders keep queuing (within max_queue_bytes).
%% Not configurable: no one has needed another schedule yet.
-define(RETRY_WAITS, [100, 200, 400, 800, 1600]).

%%--------------------------------------------------------------------------------------------
%% Who waits for which node

%% @doc No node being looked for.
-spec new() -> pending().
new() ->
    #{nodes => #{}, refs => #{}}.

%% @doc `From' (`none': nobody) waits for `Node''s listener; a worker running `Ask' starts
%% unless one is looking for `Node' already, in which case `From' waits for its outcome and
%% `Ask' is not run.
-spec find(node(), gen_server:from() | none, asker(), pending()) -> pending().
find(Node, From, Ask, P = #{nodes := Nodes, refs := Refs}) ->
    Waiter = [From || From =/= none],
    case Nodes of
        #{Node := {Ref, Others}} ->
            P#{nodes := Nodes#{Node := {Ref, Waiter ++ Others}}};
        #{} ->
            {_Pid, Ref} = spawn_monitor(?MODULE, worker, [Ask]),
            P#{nodes := Nodes#{Node => {Ref, Waiter}}, refs := Refs#{Ref => Node}}
    end.

%% @doc Whether a worker is looking for `Node'.
-spec asking(node(), pending()) -> boolean().
asking(Node, #{nodes := Nodes}) ->
    is_map_key(Node, Nodes).

%% @doc Takes the outcome of a worker from its `DOWN' (`{'DOWN', Ref, process, _, Reason}'):
%% the node, the outcome, and the callers that waited for it (latest first), who must all
%% be answered. A worker that died without an answer gives `{error, {crashed, Node,
%% Reason}}'. `unknown' for a monitor that is not a worker's.
-spec done(reference(), term(), pending()) ->
          {node(), outcome(), [gen_server:from()], pending()} | unknown.
done(Ref, Reason, P = #{nodes := Nodes, refs := Refs}) ->
    case maps:take(Ref, Refs) of
        {Node, Refs1} ->
            {{Ref, Waiters}, Nodes1} = maps:take(Node, Nodes),
            Outcome = case Reason of
                          ?ANSWER(Answer) -> Answer;
                          _ -> {error, {crashed, Node, Reason}}
                      end,
            {Node, Outcome, Waiters, P#{nodes := Nodes1, refs := Refs1}};
        error ->
            unknown
    end.

%% @doc The worker's body (from {@link find/4}): exits with the answer of `Ask'. Exported
%% for `spawn_monitor/3' only.
-spec worker(asker()) -> no_return().
worker(Ask) ->
    exit(?ANSWER(Ask())).

%% @doc How long to wait before the next attempt to find a stale pool's peer, after
%% `Failures' attempts failed in a row; `give_up' once they are all spent.
-spec retry_delay(pos_integer()) -> {retry, pos_integer()} | give_up.
retry_delay(Failures) when Failures =< length(?RETRY_WAITS) ->
    {retry, lists:nth(Failures, ?RETRY_WAITS)};
retry_delay(_Failures) ->
    give_up.

%% @doc Every wait of {@link retry_delay/1}, in order (for the log).
-spec retry_waits() -> [pos_integer()].
retry_waits() ->
    ?RETRY_WAITS.

%%--------------------------------------------------------------------------------------------
%% Asking the peer

%% @doc Asks `Node''s teleport_server where it listens (in a worker: it may take up to
%% `Timeout', and longer to set up the disterl connection).
-spec ask(node(), timeout()) -> outcome().
ask(Node, _Timeout) when Node =:= node() ->
    {error, this_node};
ask(Node, Timeout) ->
    case net_kernel:connect_node(Node) of
        true ->
            try gen_server:call({teleport_server, Node}, listen_info, Timeout) of
                {ok, #{port := Port, ip := Ip} = Info} ->
                    MaxFrame = maps:get(max_frame_bytes, Info, undefined),
                    case peer_address(Node, Ip) of
                        {ok, PeerIp} -> {ok, PeerIp, Port, MaxFrame};
                        Error -> Error
                    end;
                Other -> {error, {call_failed, Node, {unexpected_reply, Other}}}
            catch
                exit:{noproc, _} -> {error, {no_teleport, Node}};
                exit:{timeout, _} -> {error, {no_answer, Node, Timeout}};
                exit:{{nodedown, _}, _} -> {error, {no_dist_connection, Node}};
                exit:Reason -> {error, {call_failed, Node, Reason}}
            end;
        ignored ->
            {error, not_distributed};
        false ->
            {error, {no_dist_connection, Node}}
    end.

%% @doc The address to reach `Node''s listener at, given the one it listens on: that one,
%% unless it listens on every interface; then the address its disterl connection comes
%% from, else its host name's address.
-spec peer_address(node(), inet:ip_address()) -> {ok, inet:ip_address()} | {error, unreachable()}.
peer_address(Node, Ip) when Ip =:= {0, 0, 0, 0}; Ip =:= {0, 0, 0, 0, 0, 0, 0, 0} ->
    case dist_peer_ip(Node) of
        {ok, PeerIp} -> {ok, PeerIp};
        error -> {error, {no_address, Node, host_part(Node)}}
    end;
peer_address(_Node, Ip) ->
    {ok, Ip}.

-spec dist_peer_ip(node()) -> {ok, inet:ip_address()} | error.
dist_peer_ip(Node) ->
    Via = [Ctrl || {N, Ctrl} <- erlang:system_info(dist_ctrl), N =:= Node],
    case Via of
        [Port] when is_port(Port) ->
            case inet:peername(Port) of
                {ok, {Ip, _}} -> {ok, Ip};
                _ -> host_ip(Node)
            end;
        _ ->
            host_ip(Node)
    end.

%% @doc The host part of a node name (after the first `@'); `""' if it has none.
-spec host_part(node()) -> string().
host_part(Node) ->
    case string:split(atom_to_list(Node), "@") of
        [_, Host] -> Host;
        _ -> ""
    end.

-spec host_ip(node()) -> {ok, inet:ip_address()} | error.
host_ip(Node) ->
    case host_part(Node) of
        "" ->
            error;
        Host ->
            case inet:getaddr(Host, inet) of
                {ok, Ip} -> {ok, Ip};
                {error, _} -> error
            end
    end.

%% @doc A reason in words, for the log.
-spec explain(unreachable()) -> string().
explain(this_node) ->
    "it is this node (local destinations need no teleport)";
explain(not_distributed) ->
    "this node is not distributed (start it with -sname or -name, or net_kernel:start/1)";
explain({no_dist_connection, Node}) ->
    lists:flatten(io_lib:format("no distributed Erlang connection to ~ts (net_kernel:connect_node/1"
                                " failed: is it up, and does it have the same cookie?)", [Node]));
explain({no_teleport, Node}) ->
    lists:flatten(io_lib:format("teleport is not running on ~ts (no teleport_server there)",
                                [Node]));
explain({no_answer, Node, Timeout}) ->
    lists:flatten(io_lib:format("teleport_server on ~ts did not answer within ~p ms "
                                "(discovery_timeout)", [Node, Timeout]));
explain({call_failed, Node, Reason}) ->
    lists:flatten(io_lib:format("asking teleport_server on ~ts where it listens failed: ~0tp",
                                [Node, Reason]));
explain({no_address, Node, Host}) ->
    lists:flatten(io_lib:format("~ts listens on every interface, and neither its distributed "
                                "Erlang connection nor its host name ~ts gives an address "
                                "to reach it at", [Node, Host]));
explain({crashed, Node, Reason}) ->
    lists:flatten(io_lib:format("the process asking teleport_server on ~ts where it listens "
                                "died: ~0tp", [Node, Reason])).
