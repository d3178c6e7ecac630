%% @doc The caller's end of calls over teleport: hands the replies that arrive to the callers
%% waiting for them, and tells them when the callee's node, or teleport on it, goes away.
%%
%% A reply goes through the caller's alias (OTP 24+): once a caller has timed out its alias
%% is gone, and a late reply is dropped by the VM instead of landing in the caller's mailbox.
%%
%% Going away is seen through one monitor per node called, of `teleport_calls' there, made by
%% the first call to that node, rather than one per call: a monitor of a remote process is a
%% message over disterl and its removal another, and behind a disterl connection busy with
%% bulk those two waited as long as the bulk did (a 1 KB call took milliseconds while 10 MB
%% messages crossed disterl). So each waiting caller is noted in a table by the caller itself,
%% with no message to this process (see {@link expect/3}), and the note goes when the reply is
%% handed over, when the caller gives up, or when `DOWN' is passed on.
%%
%% The table holds `{Alias, Node, Expiry, Caller}' per waiting caller and `{Node, Monitor}'
%% per node watched. When a node's monitor fires, its entry goes first and its callers are
%% told next; a caller notes itself first and looks for the node's entry next, and asks for a
%% new watch when it is missing. So a caller either is told, or asks for a watch after the
%% old one fired, and the new one fires at once if the node is still gone. (Unlike a monitor
%% made by the call itself, a `DOWN' that fired just before a call but is not handled yet can
%% still end that call.)
%%
%% The table belongs to `teleport_sup' ({@link create_table/0}), so that it outlives this
%% process: a new `teleport_replies' watches again every node a note names and monitors again
%% every caller that waits with no timeout, and nobody's wait loses its `DOWN'.
%%
%% A caller killed while it waits leaves its note behind; notes whose caller's timeout has
%% passed are swept at the next reply (at most once a second), so no timer runs while idle.
%% A caller that waits with an infinite timeout is monitored here instead (locally); when
%% it dies, its note goes and teleport_calls on the callee's node is told to give the call
%% up (`{'$teleport_cancel', Alias}'), so that no monitor of it crosses disterl either. A
%% cancel that cannot go at once (the lane is full, or down) is tried again every second,
%% for a minute: this process never waits on a lane, every reply of the node passes here.
-module(teleport_replies).
-behaviour(gen_server).

-export([start_link/0, create_table/0, expect/3, sent/2, forget/1, waiting/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

%% Notes past their caller's timeout are swept at most this often (at a reply).
-define(SWEEP_MS, 1000).
%% A cancel not sent is tried again this often, this many times.
-define(RETRY_MS, 1000).
-define(CANCEL_TRIES, 60).

-record(state, {%% The monitors of teleport_calls on the nodes watched.
                nodes = #{} :: #{reference() => node()},
                %% The monitors of callers that wait with an infinite timeout, both ways:
                %% by monitor and by the caller's alias.
                callers = #{} :: #{reference() => reference()},
                caller_mons = #{} :: #{reference() => reference()},
                %% Cancels still to send: node, alias, tries left.
                cancels = [] :: [{node(), reference(), non_neg_integer()}],
                %% Monotonic milliseconds of the last sweep.
                swept :: integer()}).

%% @doc Starts the server, registered as `teleport_replies'.
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() ->
    gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

%% @doc Creates the table of waiting callers and watched nodes, owned by the calling process
%% (`teleport_sup', which lives as long as teleport does).
-spec create_table() -> ok.
create_table() ->
    %% A start right after a failed one: application:start/1 returned before the failed
    %% start's supervisor, which owned the table, was gone; its table goes with it.
    ok = table_gone(5000),
    _ = ets:new(?MODULE, [named_table, public, set, {write_concurrency, true},
                          {read_concurrency, true}]),
    ok.

-spec table_gone(non_neg_integer()) -> ok.
table_gone(Ms) ->
    case ets:whereis(?MODULE) of
        undefined -> ok;
        _ when Ms =:= 0 -> ok;
        _ -> timer:sleep(1), table_gone(Ms - 1)
    end.

%% @doc Notes that the calling process waits at `Alias' for an answer from `Node', for
%% `Timeout'; makes sure `Node' is watched. Called by the caller before it sends the request
%% (and {@link sent/2} after).
-spec expect(reference(), node(), timeout()) -> ok | {error, not_started | nodedown}.
expect(Alias, Node, Timeout) ->
    try
        true = ets:insert(?MODULE, {Alias, Node, expiry(Timeout), self()}),
        _ = Timeout =:= infinity andalso (?MODULE ! {caller, self(), Alias}),
        case ets:member(?MODULE, Node) of
            true -> ok;
            false -> gen_server:call(?MODULE, {watch, Node}, infinity)
        end
    catch
        error:badarg -> {error, not_started};
        exit:{noproc, _} -> {error, not_started}
    end.

%% @doc The request of the wait at `Alias' went out: its `Timeout' runs from now (sending may
%% have waited on the lane), so its note is not swept while the caller still waits.
-spec sent(reference(), timeout()) -> ok.
sent(_Alias, infinity) ->
    ok;
sent(Alias, Timeout) ->
    _ = catch ets:update_element(?MODULE, Alias, {3, expiry(Timeout)}),
    ok.

%% @doc Removes the caller's note: it no longer waits at `Alias' (it timed out, or its
%% request could not be sent).
-spec forget(reference()) -> ok.
forget(Alias) ->
    case catch ets:take(?MODULE, Alias) of
        [{_, _, infinity, _}] ->
            %% Its monitor goes too (it was asked for before this).
            _ = catch ?MODULE ! {forget, Alias},
            ok;
        _ ->
            ok
    end.

%% @doc How many callers on this node wait for an answer over teleport right now.
-spec waiting() -> non_neg_integer().
waiting() ->
    ets:select_count(?MODULE, [{{'_', '_', '_', '_'}, [], [true]}]).

%% @private
%% Whatever an earlier teleport_replies watched is watched again, from the notes.
-spec init([]) -> {ok, #state{}}.
init([]) ->
    true = ets:match_delete(?MODULE, {'_', '_'}),
    Notes = ets:match_object(?MODULE, {'_', '_', '_', '_'}),
    State0 = #state{swept = now_ms()},
    State1 = lists:foldl(fun(Node, S) ->
                                 try watch(Node, S) catch error:badarg -> S end
                         end, State0, lists:usort([Node || {_, Node, _, _} <- Notes])),
    {ok, lists:foldl(fun({Alias, _, infinity, Pid}, S) -> watch_caller(Pid, Alias, S);
                        (_, S) -> S
                     end, State1, Notes)}.

%% @private
-spec handle_call(term(), gen_server:from(), #state{}) ->
          {reply, ok | {error, nodedown | unknown_request}, #state{}}.
handle_call({watch, Node}, _From, State) when is_atom(Node) ->
    case ets:member(?MODULE, Node) of
        true ->
            {reply, ok, State};
        false ->
            try watch(Node, State) of
                State1 -> {reply, ok, State1}
            catch
                %% This node is not distributed: no node can be called.
                error:badarg -> {reply, {error, nodedown}, State}
            end
    end;
handle_call(_Request, _From, State) ->
    {reply, {error, unknown_request}, State}.

%% @private
-spec handle_cast(term(), #state{}) -> {noreply, #state{}}.
handle_cast(_Msg, State) ->
    {noreply, State}.

%% @private
-spec handle_info(term(), #state{}) -> {noreply, #state{}}.
handle_info({'$teleport_reply', Alias, Result}, State) when is_reference(Alias) ->
    %% The notes go first (the call's, and those the sweep finds expired): a caller that has
    %% its answer never sees its note, or one this answer sweeps, still there.
    State1 = maybe_sweep(done(Alias, State)),
    Alias ! {Alias, Result},
    {noreply, State1};
handle_info({caller, Pid, Alias}, State) ->
    %% An infinite wait: the caller is watched until its answer comes or it dies. This
    %% message was sent before the request, so it is here before any answer.
    case ets:member(?MODULE, Alias) of
        true -> {noreply, watch_caller(Pid, Alias, State)};
        false -> {noreply, State}
    end;
handle_info({forget, Alias}, State) ->
    {noreply, done(Alias, State)};
handle_info({'DOWN', Mon, process, _, Reason}, State = #state{nodes = Nodes, callers = Callers}) ->
    case {Nodes, Callers} of
        {#{Mon := Node}, _} ->
            %% The entry goes before the callers are told: one that notes itself after
            %% the select below finds no entry and asks for a new watch.
            true = ets:delete(?MODULE, Node),
            Waiting = ets:select(?MODULE, [{{'$1', Node, '_', '_'}, [], ['$1']}]),
            _ = [Alias ! {Alias, {down, Reason}} || Alias <- Waiting],
            {noreply, lists:foldl(fun done/2, State#state{nodes = maps:remove(Mon, Nodes)},
                                  Waiting)};
        {_, #{Mon := Alias}} ->
            %% The caller died waiting: teleport_calls there may give the call up.
            Cancels = [{Node, Alias, ?CANCEL_TRIES}
                       || {_, Node, _, _} <- ets:lookup(?MODULE, Alias)],
            {noreply, send_cancels(Cancels, done(Alias, State))};
        _ ->
            {noreply, State}
    end;
handle_info(retry_cancels, State = #state{cancels = Cancels}) ->
    {noreply, send_cancels(Cancels, State#state{cancels = []})};
handle_info(Other, State) ->
    logger:notice("teleport_replies: ignored a message that is no reply: ~0P",
                  [Other, 10], #{domain => [teleport]}),
    {noreply, State}.

%%%===================================================================
%%% Watches and notes
%%%===================================================================

%% Monitors teleport_calls on Node (badarg where this node is not distributed).
-spec watch(node(), #state{}) -> #state{}.
watch(Node, State = #state{nodes = Nodes}) ->
    Mon = erlang:monitor(process, {teleport_calls, Node}),
    true = ets:insert(?MODULE, {Node, Mon}),
    State#state{nodes = Nodes#{Mon => Node}}.

-spec watch_caller(pid(), reference(), #state{}) -> #state{}.
watch_caller(Pid, Alias, State = #state{callers = Callers, caller_mons = ByAlias}) ->
    Mon = erlang:monitor(process, Pid),
    State#state{callers = Callers#{Mon => Alias}, caller_mons = ByAlias#{Alias => Mon}}.

%% The wait at Alias is over: its note goes, and its caller's monitor if it has one.
-spec done(reference(), #state{}) -> #state{}.
done(Alias, State = #state{caller_mons = ByAlias}) ->
    true = ets:delete(?MODULE, Alias),
    case maps:take(Alias, ByAlias) of
        {Mon, Rest} ->
            erlang:demonitor(Mon, [flush]),
            State#state{callers = maps:remove(Mon, State#state.callers), caller_mons = Rest};
        error ->
            State
    end.

%% Sends each cancel without waiting (nosuspend, noconnect); keeps those that could not go
%% for another try, while they have tries left.
-spec send_cancels([{node(), reference(), non_neg_integer()}], #state{}) -> #state{}.
send_cancels(Cancels, State) ->
    Left = [{Node, Alias, Tries - 1}
            || {Node, Alias, Tries} <- Cancels, not cancel_sent(Node, Alias), Tries > 1],
    case {Left, State#state.cancels} of
        {[], _} ->
            State;
        {_, []} ->
            _ = erlang:send_after(?RETRY_MS, self(), retry_cancels),
            State#state{cancels = Left};
        {_, Waiting} ->
            State#state{cancels = Left ++ Waiting}
    end.

-spec cancel_sent(node(), reference()) -> boolean().
cancel_sent(Node, Alias) ->
    ok =:= (catch teleport:send({teleport_calls, Node}, {'$teleport_cancel', Alias},
                                [nosuspend, noconnect])).

-spec expiry(timeout()) -> integer() | infinity.
expiry(infinity) -> infinity;
expiry(Timeout) -> now_ms() + Timeout.

%% Removes the notes whose caller stopped waiting without removing them (it was killed).
%% An infinite wait is removed by its caller's monitor instead.
-spec maybe_sweep(#state{}) -> #state{}.
maybe_sweep(State = #state{swept = Swept}) ->
    Now = now_ms(),
    case Now - Swept >= ?SWEEP_MS of
        true ->
            _ = ets:select_delete(?MODULE, [{{'_', '_', '$1', '_'},
                                              [{is_integer, '$1'}, {'<', '$1', Now}],
                                              [true]}]),
            State#state{swept = Now};
        false ->
            State
    end.

-spec now_ms() -> integer().
now_ms() ->
    erlang:monotonic_time(millisecond).
