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
%% pair always uses the same connection). A message to `{Name, Node}' and one to the pid
%% registered as `Name' are two destinations and may overtake each other.</li>
%% <li>Delivery: while both nodes stay up and connected, nothing is lost. When a connection
%% fails, the frame it was writing is lost; frames still queued go out on the next
%% connection. When the node goes down, what was queued for it is dropped and counted in
%% `stats/0' (`dropped').</li>
%% <li>Destinations that do not exist drop the message silently, as with `!'.</li>
%% <li>Peers prove they hold the same cookie as for distributed Erlang before anything they
%% send is decoded.</li>
%% </ul>
-module(teleport).

-export([start/0, stop/0, send/2, send/3, stats/0, term_to_iolist/1]).

-type dest() :: pid() | atom() | {atom(), node()}.
-type send_option() :: nosuspend | noconnect.
-type reason() :: nodedown | not_started | too_large.
-export_type([dest/0, send_option/0, reason/0]).

-define(TABLE, teleport_pools).
%% A blocked sender retries after 1, 2, 4, 8 ms, then every 8 ms.
-define(MAX_BACKOFF, 8).

%% @doc Starts the teleport application and what it needs.
-spec start() -> ok | {error, term()}.
start() ->
    case application:ensure_all_started(teleport) of
        {ok, _} -> ok;
        {error, _} = Error -> Error
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
        Node -> remote(Node, Pid, Msg, Opts)
    end;
send({Name, Node} = Dest, Msg, Opts) when is_atom(Name), is_atom(Node), is_list(Opts) ->
    check_opts(Dest, Msg, Opts),
    case Node =:= node() of
        true -> Dest ! Msg, ok;
        false -> remote(Node, Name, Msg, Opts)
    end;
send(Name, Msg, Opts) when is_atom(Name), is_list(Opts) ->
    check_opts(Name, Msg, Opts),
    Name ! Msg,
    ok;
send(Dest, Msg, Opts) ->
    erlang:error(badarg, [Dest, Msg, Opts]).

%% @doc Counters per peer node: messages and bytes each way, bytes queued, messages
%% dropped, reconnections and connections up.
-spec stats() -> #{node() => #{atom() => non_neg_integer()}}.
stats() ->
    case teleport_server:runtime() of
        {ok, Rt} ->
            maps:from_list([{binary_to_atom(Node, utf8), Counters}
                            || {Node, Counters} <- teleport_nif:runtime_stats(Rt)]);
        {error, not_started} ->
            #{}
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

-spec remote(node(), pid() | atom(), term(), [send_option()]) ->
          ok | nosuspend | noconnect | {error, reason()}.
remote(Node, Dest, Msg, Opts) ->
    case pool(Node, Opts) of
        {ok, Pool} -> push(Node, Pool, Dest, Msg, Opts, 1, true);
        Other -> Other
    end.

-spec pool(node(), [send_option()]) ->
          {ok, teleport_nif:pool()} | noconnect | {error, nodedown | not_started}.
pool(Node, Opts) ->
    try ets:lookup(?TABLE, Node) of
        [{_, Pool}] -> {ok, Pool};
        [] ->
            case lists:member(noconnect, Opts) of
                true -> noconnect;
                false -> teleport_server:connect(Node)
            end
    catch
        error:badarg -> {error, not_started}
    end.

-spec push(node(), teleport_nif:pool(), pid() | atom(), term(), [send_option()],
           pos_integer(), boolean()) -> ok | nosuspend | {error, reason()}.
push(Node, Pool, Dest, Msg, Opts, Backoff, MayRetry) ->
    case nif_send(Pool, Dest, Msg) of
        ok ->
            ok;
        busy ->
            case lists:member(nosuspend, Opts) of
                true ->
                    nosuspend;
                false ->
                    %% Only this sender waits; other connections and disterl keep flowing.
                    receive after Backoff -> ok end,
                    push(Node, Pool, Dest, Msg, Opts, min(2 * Backoff, ?MAX_BACKOFF), MayRetry)
            end;
        closed when MayRetry ->
            %% The pool was torn down or its peer moved: get a new one, once.
            case teleport_server:reconnect(Node, Pool) of
                {ok, New} -> push(Node, New, Dest, Msg, Opts, Backoff, false);
                Error -> Error
            end;
        closed ->
            {error, nodedown};
        too_large ->
            {error, too_large}
    end.

-spec nif_send(teleport_nif:pool(), pid() | atom(), term()) ->
          ok | busy | closed | too_large.
nif_send(Pool, Dest, Msg) ->
    case teleport_nif:pool_send(Pool, Dest, Msg) of
        dirty ->
            {Result, Reductions} = teleport_nif:pool_send_dirty(Pool, Dest, Msg),
            erlang:bump_reductions(Reductions),
            Result;
        Result ->
            Result
    end.
