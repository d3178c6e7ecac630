%% Coverage across nodes: `make cover' runs the suites under `rebar3 ct --cover', which
%% cover-compiles teleport's modules on the node running the suites only. The suites start
%% peer nodes that run teleport too; for what runs there to count, each peer must get the
%% cover-compiled modules before teleport starts on it, and its counts must be fetched before
%% it stops. The suites call:
%%
%%   teleport_cover:peer_started(Node)   right after the peer booted, before teleport:start
%%   teleport_cover:peer_stopping(Node)  right before peer:stop
%%
%% Both are no-ops (returning `ok' at once) unless cover is running on this node with
%% modules compiled, so plain `rebar3 ct' is unaffected. A peer that is killed instead of
%% stopped loses the counts it had not handed over. teleport_nif is left out of cover
%% (rebar.config): its stubs never run once the NIF is loaded, and a cover-compiled copy
%% loaded over a running one could not load the NIF library again.
-module(teleport_cover).

-export([peer_started/1, peer_stopping/1, running/0]).

%% How long a cover call to a peer may take before it is given up (a stopped or dying peer
%% must not hang the suite).
-define(TIMEOUT, 60000).

%% @doc Loads the cover-compiled modules on `Node' (a new peer), if cover is running here.
-spec peer_started(node()) -> ok.
peer_started(Node) ->
    case running() of
        true -> bounded(fun() -> cover:start([Node]) end);
        false -> ok
    end.

%% @doc Fetches `Node''s counts into this node's cover database and takes the node out of
%% cover's list (cover-compiled code is unloaded there: the peer is about to stop), if cover
%% is running here. A node left in the list would make the final collection fail once this
%% node's distribution is stopped.
-spec peer_stopping(node()) -> ok.
peer_stopping(Node) ->
    case running() andalso lists:member(Node, cover:which_nodes()) of
        true -> bounded(fun() -> cover:stop([Node]) end);
        false -> ok
    end.

%% @doc Whether modules are cover-compiled on this node (`rebar3 ct --cover').
-spec running() -> boolean().
running() ->
    whereis(cover_server) =/= undefined andalso is_alive()
        andalso cover:modules() =/= [].

-spec bounded(fun(() -> term())) -> ok.
bounded(Fun) ->
    {Pid, MRef} = spawn_monitor(fun() -> exit({done, Fun()}) end),
    receive
        {'DOWN', MRef, process, Pid, {done, _}} -> ok;
        {'DOWN', MRef, process, Pid, Other} -> ct:pal("teleport_cover: ~p", [Other])
    after ?TIMEOUT ->
            exit(Pid, kill),
            ct:pal("teleport_cover: gave up after ~b ms", [?TIMEOUT])
    end,
    ok.
