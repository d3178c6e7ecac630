%% @doc The table of this node's pools, one per peer node, and where each was last pointed.
%%
%% Every read and write of the table goes through this module, so its name and the shape of
%% its rows are defined here and nowhere else. `teleport_server' creates it (and so owns
%% it: it goes away when that process does) and is the only writer, one pool at a time per
%% node; senders read it on every send, concurrently, without asking that process.
%%
%% A row is `{Node, Pool, Target}': `Target' is the listener address the pool was last
%% pointed at, kept so the owner can clear a pool's stale mark without moving it.
-module(teleport_pools).

-export([new/0, lookup/1, member/1, all/0, target/1]).
-export([insert/3, retarget/2, take/1]).

-export_type([target/0]).

-define(TABLE, teleport_pools).

%% Where a pool's connections go: the peer's listener.
-type target() :: {inet:ip_address(), inet:port_number()}.

%% @doc Creates the table, owned by the calling process (`teleport_server').
-spec new() -> ok.
new() ->
    ?TABLE = ets:new(?TABLE, [named_table, protected, set, {read_concurrency, true}]),
    ok.

%% @doc The pool to `Node', from any process; `{error, not_started}' when teleport is not
%% running (there is no table).
-spec lookup(node()) -> {ok, teleport_nif:pool()} | none | {error, not_started}.
lookup(Node) ->
    try ets:lookup(?TABLE, Node) of
        [{_, Pool, _}] -> {ok, Pool};
        [] -> none
    catch
        error:badarg -> {error, not_started}
    end.

%% @doc Whether there is a pool to `Node' (teleport must be running).
-spec member(node()) -> boolean().
member(Node) ->
    ets:member(?TABLE, Node).

%% @doc Every pool, by peer node; empty when teleport is not running.
-spec all() -> [{node(), teleport_nif:pool()}].
all() ->
    try ets:tab2list(?TABLE) of
        Rows -> [{Node, Pool} || {Node, Pool, _} <- Rows]
    catch
        error:badarg -> []
    end.

%% @doc Where the pool to `Node' was last pointed.
-spec target(node()) -> {ok, target()} | none.
target(Node) ->
    case ets:lookup(?TABLE, Node) of
        [{_, _, Target}] -> {ok, Target};
        [] -> none
    end.

%% @doc Records the pool to `Node' (by its owner only), pointed at `Target'.
-spec insert(node(), teleport_nif:pool(), target()) -> ok.
insert(Node, Pool, Target) ->
    true = ets:insert(?TABLE, {Node, Pool, Target}),
    ok.

%% @doc Records that the pool to `Node' now points at `Target' (by its owner only).
-spec retarget(node(), target()) -> ok.
retarget(Node, Target) ->
    true = ets:update_element(?TABLE, Node, {3, Target}),
    ok.

%% @doc Removes the pool to `Node' from the table (by its owner only) and returns it.
-spec take(node()) -> {ok, teleport_nif:pool()} | none.
take(Node) ->
    case ets:take(?TABLE, Node) of
        [{_, Pool, _}] -> {ok, Pool};
        [] -> none
    end.
