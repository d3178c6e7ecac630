%% @doc Receives `teleport:gs_call/3' and `teleport:multi_call/4' requests that arrived over
%% teleport, and runs each as a genuine local `gen_server' call from a short-lived worker, so
%% the callee needs no change: it sees a local caller, replies with `{reply, R, S}' or
%% `gen_server:reply/2' as usual, and its reply goes back to the caller's node over teleport.
%%
%% The worker reports the callee's own exit (or `noproc') over teleport too, on the same path
%% as a reply, so a reply can never be overtaken by a `DOWN' travelling over disterl. It
%% gives up when the caller's timeout passes or the caller dies.
-module(teleport_calls).
-behaviour(gen_server).

-export([start_link/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).
-export([worker/5]).

%% @doc Starts the server, registered as `teleport_calls'.
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() ->
    gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

%% @private
-spec init([]) -> {ok, #{}}.
init([]) ->
    {ok, #{}}.

%% @private
-spec handle_call(term(), gen_server:from(), map()) -> {reply, {error, unknown_request}, map()}.
handle_call(_Request, _From, State) ->
    {reply, {error, unknown_request}, State}.

%% @private
-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast(_Msg, State) ->
    {noreply, State}.

%% @private
-spec handle_info(term(), map()) -> {noreply, map()}.
handle_info({'$teleport_call', Dest, Request, Caller, Alias, Timeout}, State)
  when (is_pid(Dest) orelse is_atom(Dest)), is_pid(Caller), is_reference(Alias),
       (Timeout =:= infinity orelse (is_integer(Timeout) andalso Timeout >= 0)) ->
    _ = proc_lib:spawn(?MODULE, worker, [Dest, Request, Caller, Alias, Timeout]),
    {noreply, State};
handle_info(Other, State) ->
    logger:notice("teleport_calls: ignored a message that is no call request: ~0P",
                  [Other, 10], #{domain => [teleport]}),
    {noreply, State}.

%% @private Makes one local call and answers the remote caller.
-spec worker(pid() | atom(), term(), pid(), reference(), timeout()) -> ok.
worker(Dest, Request, Caller, Alias, Timeout) ->
    case is_atom(Dest) andalso whereis(Dest) of
        undefined -> answer(Caller, Alias, {exit, noproc});
        false -> call(Dest, Request, Caller, Alias, Timeout);
        Pid -> call(Pid, Request, Caller, Alias, Timeout)
    end.

-spec call(pid(), term(), pid(), reference(), timeout()) -> ok.
call(Pid, Request, Caller, Alias, Timeout) ->
    %% A finite timeout bounds this worker anyway; only an infinite one needs to learn that
    %% the caller died, and a monitor of a remote process costs two disterl messages.
    CallerMon = case Timeout of
                    infinity -> erlang:monitor(process, Caller);
                    _ -> none
                end,
    Mref = erlang:monitor(process, Pid),
    %% The same message gen_server:call/3 sends; the reply comes back to this worker.
    Pid ! {'$gen_call', {self(), Mref}, Request},
    receive
        {Mref, Reply} ->
            erlang:demonitor(Mref, [flush]),
            answer(Caller, Alias, {reply, Reply});
        {'DOWN', Mref, process, _, Reason} ->
            answer(Caller, Alias, {exit, Reason});
        {'DOWN', CallerMon, process, _, _} ->
            %% Nobody is waiting any more.
            ok
    after Timeout ->
            ok
    end.

-spec answer(pid(), reference(), {reply, term()} | {exit, term()}) -> ok.
answer(Caller, Alias, Result) ->
    _ = teleport:send({teleport_replies, node(Caller)}, {'$teleport_reply', Alias, Result}),
    ok.
