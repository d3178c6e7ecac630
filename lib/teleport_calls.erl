%% @doc Serves `teleport:gs_call/3' and `teleport:multi_call/4' requests that arrived over
%% teleport: it makes each a genuine local `gen_server' call on behalf of the remote caller,
%% so the callee needs no change, and sends the reply back to the caller's node over teleport.
%%
%% No process is spawned per call. The request is sent to the callee exactly as
%% `gen_server:call/3' sends it, with a `From' of `{self(), [alias | Mref]}', where `Mref' is
%% a monitor of the callee that is also an alias of this process. The callee replies with
%% `{reply, R, S}' or `gen_server:reply/2' as usual; the reply reaches this process through
%% the alias, and the monitor's `DOWN' says the callee died. Either one ends the call and goes
%% back to the caller on the same path, so a reply is never overtaken by a `DOWN' travelling
%% over disterl. Removing the monitor also removes the alias, so a reply that comes after
%% the call was given up is dropped by the VM.
%%
%% A call is given up when the caller's timeout has passed (a sweep once a second, cheaper
%% than a timer per call) or, for an infinite timeout only, when the caller's node says the
%% caller died (`teleport_replies' there monitors it and sends `{'$teleport_cancel', Alias}')
%% or when the caller's node goes down (`monitor_node/2', once per node: local, no message).
%% Nothing per call crosses disterl: a monitor of a remote caller would be two messages
%% there, which wait behind disterl's bulk and would hold this process up.
%%
%% A cancel rides another connection than its request and may overtake it: a cancel for
%% no known call is kept for a minute, and the request it names is dropped when it comes.
-module(teleport_calls).
-behaviour(gen_server).

-export([start_link/0, pending/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

%% How often calls past their caller's timeout are forgotten.
-define(SWEEP_MS, 1000).
%% How long a cancel that came before its request is kept.
-define(EARLY_CANCEL_MS, 60000).

-record(call, {caller :: pid(),
               alias :: reference(),
               %% Monotonic milliseconds after which the caller no longer waits.
               deadline :: integer() | infinity}).

-record(state, {%% Calls in progress, by the callee monitor that is also their alias.
                calls = #{} :: #{reference() => #call{}},
                %% Calls with an infinite timeout, by their caller's alias (a cancel names
                %% that), and the nodes of their callers, watched with monitor_node/2.
                infinite = #{} :: #{reference() => reference()},
                nodes = #{} :: #{node() => true},
                %% Cancels that came before their request, with when they are dropped.
                early = #{} :: #{reference() => integer()},
                %% Whether a sweep is due: only while some call has a deadline or some
                %% early cancel is kept.
                sweeping = false :: boolean()}).

%% @doc Starts the server, registered as `teleport_calls'.
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() ->
    gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

%% @doc How many calls this node is serving for remote callers right now.
-spec pending() -> non_neg_integer().
pending() ->
    gen_server:call(?MODULE, pending).

%% @private
-spec init([]) -> {ok, #state{}}.
init([]) ->
    {ok, #state{}}.

%% @private
-spec handle_call(term(), gen_server:from(), #state{}) ->
          {reply, non_neg_integer() | {error, unknown_request}, #state{}}.
handle_call(Request, _From, State) ->
    {reply, own_reply(Request, State), State}.

%% What this process answers to a call, local or (see start_to/4) over teleport.
-spec own_reply(term(), #state{}) -> non_neg_integer() | {error, unknown_request}.
own_reply(pending, #state{calls = Calls}) ->
    map_size(Calls);
own_reply(_Request, _State) ->
    {error, unknown_request}.

%% @private
-spec handle_cast(term(), #state{}) -> {noreply, #state{}}.
handle_cast(_Msg, State) ->
    {noreply, State}.

%% @private
-spec handle_info(term(), #state{}) -> {noreply, #state{}}.
handle_info({[alias | Mref], Reply}, State) when is_reference(Mref) ->
    erlang:demonitor(Mref, [flush]),
    {noreply, finish(Mref, {reply, Reply}, State)};
handle_info({'$teleport_call', Dest, Request, Caller, Alias, Timeout},
            State = #state{early = Early})
  when (is_pid(Dest) orelse is_atom(Dest)), is_pid(Caller), is_reference(Alias),
       (Timeout =:= infinity orelse (is_integer(Timeout) andalso Timeout >= 0)) ->
    case maps:take(Alias, Early) of
        {_, Rest} ->
            %% Cancelled before it came: the caller is gone.
            {noreply, State#state{early = Rest}};
        error ->
            {noreply, start(Dest, Request, #call{caller = Caller, alias = Alias,
                                                 deadline = deadline(Timeout)},
                            State)}
    end;
handle_info({'$teleport_cancel', Alias}, State = #state{infinite = Infinite, early = Early})
  when is_reference(Alias) ->
    case Infinite of
        #{Alias := Mref} ->
            erlang:demonitor(Mref, [flush]),
            {noreply, forget(Mref, State)};
        #{} ->
            Until = erlang:monotonic_time(millisecond) + ?EARLY_CANCEL_MS,
            {noreply, ensure_sweep(State#state{early = Early#{Alias => Until}})}
    end;
handle_info({'DOWN', Mref, process, _, Reason}, State) ->
    %% The callee died (or it is the DOWN of a call already forgotten: flushed then).
    {noreply, finish(Mref, {exit, Reason}, State)};
handle_info({nodedown, Node}, State = #state{calls = Calls, nodes = Nodes}) ->
    %% Nobody there waits any more; the calls with a deadline go at their deadline.
    Gone = [Mref || {Mref, #call{caller = C, deadline = infinity}} <- maps:to_list(Calls),
                    node(C) =:= Node],
    _ = [erlang:demonitor(Mref, [flush]) || Mref <- Gone],
    {noreply, lists:foldl(fun forget/2, State#state{nodes = maps:remove(Node, Nodes)}, Gone)};
handle_info(sweep, State) ->
    {noreply, sweep(State#state{sweeping = false})};
handle_info(Other, State) ->
    logger:notice("teleport_calls: ignored a message that is no call request: ~0P",
                  [Other, 10], #{domain => [teleport]}),
    {noreply, State}.

%%%===================================================================
%%% The path of one call
%%%===================================================================

%% Sends the request the way gen_server:call/3 does, or answers `noproc' at once.
-spec start(pid() | atom(), term(), #call{}, #state{}) -> #state{}.
start(Dest, Request, Call, State) ->
    case is_atom(Dest) of
        true -> start_to(whereis(Dest), Request, Call, State);
        false -> start_to(Dest, Request, Call, State)
    end.

-spec start_to(pid() | undefined, term(), #call{}, #state{}) -> #state{}.
start_to(undefined, _Request, Call, State) ->
    answer(Call, {exit, noproc}),
    State;
start_to(Me, Request, Call, State) when Me =:= self() ->
    %% A call to this very process: a process cannot monitor itself (nor get an alias that
    %% way), so it is answered here, as a local call would be.
    answer(Call, {reply, own_reply(Request, State)}),
    State;
start_to(Pid, Request, Call, State) ->
    send_request(Pid, Request, Call, State).

%% The tag `[alias | Mref]' is the improper list gen_server:call/3 itself sends.
-dialyzer({no_improper_lists, send_request/4}).
-spec send_request(pid(), term(), #call{}, #state{}) -> #state{}.
send_request(Pid, Request, Call, State = #state{calls = Calls}) ->
    Mref = erlang:monitor(process, Pid, [{alias, demonitor}]),
    Pid ! {'$gen_call', {self(), [alias | Mref]}, Request},
    State1 = State#state{calls = Calls#{Mref => Call}},
    case Call of
        #call{deadline = infinity, caller = Caller, alias = Alias} ->
            watch_node(node(Caller),
                       State1#state{infinite = (State1#state.infinite)#{Alias => Mref}});
        #call{} ->
            ensure_sweep(State1)
    end.

%% Watches the node of a caller that waits with an infinite timeout: its nodedown ends
%% those calls. monitor_node/2 is local (nothing crosses disterl); one per node.
-spec watch_node(node(), #state{}) -> #state{}.
watch_node(Node, State = #state{nodes = Nodes}) ->
    case Nodes of
        #{Node := _} ->
            State;
        #{} ->
            %% notalive if this node stopped its distribution meanwhile: nothing to watch,
            %% and its calls go when their callers' nodes cancel them.
            case catch erlang:monitor_node(Node, true) of
                true -> State#state{nodes = Nodes#{Node => true}};
                _ -> State
            end
    end.

%% The call of Mref ended with Result: the caller hears of it, if it was still known.
-spec finish(reference(), {reply, term()} | {exit, term()}, #state{}) -> #state{}.
finish(Mref, Result, State = #state{calls = Calls}) ->
    case Calls of
        #{Mref := Call = #call{}} ->
            answer(Call, Result),
            forget(Mref, State);
        #{} ->
            State
    end.

-spec forget(reference(), #state{}) -> #state{}.
forget(Mref, State = #state{calls = Calls, infinite = Infinite}) ->
    case maps:take(Mref, Calls) of
        {#call{deadline = infinity, alias = Alias}, Rest} ->
            State#state{calls = Rest, infinite = maps:remove(Alias, Infinite)};
        {#call{}, Rest} ->
            State#state{calls = Rest};
        error ->
            State
    end.

-spec answer(#call{}, {reply, term()} | {exit, term()}) -> ok.
answer(#call{caller = Caller, alias = Alias}, Result) ->
    teleport:send_answer(Caller, Alias, Result).

%%%===================================================================
%%% Timeouts
%%%===================================================================

-spec deadline(timeout()) -> integer() | infinity.
deadline(infinity) -> infinity;
deadline(Timeout) -> erlang:monotonic_time(millisecond) + Timeout.

-spec ensure_sweep(#state{}) -> #state{}.
ensure_sweep(State = #state{sweeping = true}) ->
    State;
ensure_sweep(State) ->
    _ = erlang:send_after(?SWEEP_MS, self(), sweep),
    State#state{sweeping = true}.

%% Forgets the calls whose caller gave up waiting (their monitors, and aliases, go too)
%% and the early cancels kept long enough.
-spec sweep(#state{}) -> #state{}.
sweep(State = #state{calls = Calls, early = Early}) ->
    Now = erlang:monotonic_time(millisecond),
    Expired = [Mref || {Mref, #call{deadline = D}} <- maps:to_list(Calls),
                       D =/= infinity, D < Now],
    _ = [erlang:demonitor(Mref, [flush]) || Mref <- Expired],
    State1 = State#state{calls = maps:without(Expired, Calls),
                         early = maps:filter(fun(_, Until) -> Until >= Now end, Early)},
    Waiting = [M || M = #call{deadline = D} <- maps:values(State1#state.calls),
                    D =/= infinity],
    case Waiting =:= [] andalso map_size(State1#state.early) =:= 0 of
        true -> State1;
        false -> ensure_sweep(State1)
    end.
