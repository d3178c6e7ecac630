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
%% than a timer per call) or, for an infinite timeout only, when the caller dies: a monitor
%% of a remote process costs two disterl messages, which a finite timeout makes needless.
-module(teleport_calls).
-behaviour(gen_server).

-export([start_link/0, pending/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

%% How often calls past their caller's timeout are forgotten.
-define(SWEEP_MS, 1000).

-record(call, {caller :: pid(),
               alias :: reference(),
               %% Monotonic milliseconds after which the caller no longer waits.
               deadline :: integer() | infinity,
               %% A monitor of the caller, for an infinite timeout only.
               caller_mon :: reference() | none}).

-record(state, {%% Calls in progress, by the callee monitor that is also their alias, and
                %% (for infinite timeouts) the caller monitor to the callee monitor.
                calls = #{} :: #{reference() => #call{} | {caller, reference()}},
                %% Whether a sweep is due: only while some call has a deadline.
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
    length([C || C = #call{} <- maps:values(Calls)]);
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
handle_info({'$teleport_call', Dest, Request, Caller, Alias, Timeout}, State)
  when (is_pid(Dest) orelse is_atom(Dest)), is_pid(Caller), is_reference(Alias),
       (Timeout =:= infinity orelse (is_integer(Timeout) andalso Timeout >= 0)) ->
    {noreply, start(Dest, Request, #call{caller = Caller, alias = Alias,
                                         deadline = deadline(Timeout), caller_mon = none},
                    State)};
handle_info({'DOWN', Mon, process, _, Reason}, State = #state{calls = Calls}) ->
    case Calls of
        #{Mon := #call{}} ->
            %% The callee died.
            {noreply, finish(Mon, {exit, Reason}, State)};
        #{Mon := {caller, Mref}} ->
            %% Nobody is waiting any more.
            erlang:demonitor(Mref, [flush]),
            {noreply, forget(Mref, State)};
        #{} ->
            {noreply, State}
    end;
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
    case Call of
        #call{deadline = infinity, caller = Caller} ->
            CallerMon = erlang:monitor(process, Caller),
            State#state{calls = Calls#{Mref => Call#call{caller_mon = CallerMon},
                                       CallerMon => {caller, Mref}}};
        #call{} ->
            ensure_sweep(State#state{calls = Calls#{Mref => Call}})
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
forget(Mref, State = #state{calls = Calls}) ->
    case maps:take(Mref, Calls) of
        {#call{caller_mon = none}, Rest} ->
            State#state{calls = Rest};
        {#call{caller_mon = CallerMon}, Rest} ->
            erlang:demonitor(CallerMon, [flush]),
            State#state{calls = maps:remove(CallerMon, Rest)};
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

%% Forgets the calls whose caller gave up waiting; their monitors (and aliases) go too.
-spec sweep(#state{}) -> #state{}.
sweep(State = #state{calls = Calls}) ->
    Now = erlang:monotonic_time(millisecond),
    {Left, Finite} =
        maps:fold(fun(Mref, #call{deadline = D}, {Keep, N}) when D =/= infinity, D < Now ->
                          erlang:demonitor(Mref, [flush]),
                          {maps:remove(Mref, Keep), N};
                     (_, #call{deadline = D}, {Keep, N}) when D =/= infinity ->
                          {Keep, N + 1};
                     (_, _, Acc) ->
                          Acc
                  end, {Calls, 0}, Calls),
    case Finite of
        0 -> State#state{calls = Left};
        _ -> ensure_sweep(State#state{calls = Left})
    end.
