%% @doc The Erlang end of teleport's log bridge: Rust's `tracing' events, forwarded by the NIF
%% (`native/teleport_nif/src/log.rs'), become `logger' events with domain `[teleport]'.
%%
%% The NIF's forwarding thread sends `{teleport_log, Level, Event, Fields}' to the process
%% registered as `teleport_log': `Level' is `error | warning | info | debug', `Event' a
%% snake_case atom such as `connection_lost', `Fields' a map with atom keys and integer,
%% boolean or binary values, e.g. `#{peer => <<"a@b">>, index => 3}'. While this process is
%% not running, the NIF drops events and counts them; the next delivered event then carries
%% the count as `dropped => N', logged here as "teleport: N log events were dropped".
%%
%% Each event is logged as a report: `logger:log(Level, Fields#{event => Event},
%% #{domain => [teleport], report_cb => fun teleport_log:format_report/1})', which the default
%% formatter prints as `teleport connection_lost: index=3 peer=a@b'. Handlers and filters can
%% still see the fields one by one in the report. A field named `event' is hidden by the event
%% name; `dropped' is reserved for the drop count.
%%
%% So that a flood of bad connections cannot flood the log, at most 20 events per second are
%% logged per event name; the rest are counted and summed up once per second in one warning:
%% `teleport connection_lost: 980 similar events suppressed'.
%%
%% Which Rust events are sent at all is set with {@link set_level/1} (default `info'); the
%% `logger' configuration then filters as usual: its primary level is `notice' by default, so
%% `info' and `debug' events need `logger:set_primary_config(level, ...)' to show; and OTP's
%% `default' handler only prints events with no domain or domain `[otp | _]', so it needs
%% `logger:add_handler_filter(default, teleport, {fun logger_filters:domain/2, {log, sub,
%% [teleport]}})' (or the same filter in the handler's `sys.config' entry) to print these.
-module(teleport_log).

-behaviour(gen_server).

-export([start_link/0, set_level/1, format_report/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-export_type([level/0]).

-type level() :: error | warning | info | debug.
%% The levels of the Rust events; `debug' includes tracing's TRACE.

%% Events logged per event name and window; a window lasts ?WINDOW_MS from its first event.
-define(MAX_PER_WINDOW, 20).
-define(WINDOW_MS, 1000).

%% Per event name: when its window started, how many events it logged and suppressed.
-type window() :: {Start :: integer(), Logged :: pos_integer(), Suppressed :: non_neg_integer()}.
-type state() :: #{atom() => window()}.

%% @doc Starts the process and registers it as `teleport_log', where the NIF sends events.
-spec start_link() -> {ok, pid()} | ignore | {error, term()}.
start_link() ->
    gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

%% @doc Sets the least severe level of the Rust events that the NIF sends here (default
%% `info'); takes effect at once in every Rust thread. `debug' includes tracing's TRACE.
-spec set_level(level()) -> ok.
set_level(Level) when Level =:= error; Level =:= warning; Level =:= info; Level =:= debug ->
    teleport_nif:log_set_level(Level).

%% @doc Formats an event's report for `logger' as `teleport <event>: k1=v1 k2=v2', keys in
%% order; values with spaces, quotes or `=' are quoted. A report of another shape is printed
%% as a term.
-spec format_report(logger:report()) -> {io:format(), [term()]}.
format_report(#{event := Event} = Report) when is_atom(Event) ->
    Pairs = [[atom_to_list(K), $=, format_value(V)]
             || {K, V} <- lists:sort(maps:to_list(maps:remove(event, Report))), is_atom(K)],
    case Pairs of
        [] -> {"teleport ~ts", [Event]};
        _ -> {"teleport ~ts: ~ts", [Event, lists:join($\s, Pairs)]}
    end;
format_report(Report) ->
    {"~tp", [Report]}.

-spec format_value(term()) -> unicode:chardata().
format_value(V) when is_integer(V) ->
    integer_to_list(V);
format_value(V) when is_atom(V) ->
    atom_to_list(V);
format_value(V) when is_binary(V) ->
    case unicode:characters_to_list(V) of
        Chars when is_list(Chars) ->
            case Chars =/= [] andalso lists:all(fun is_bare/1, Chars) of
                true -> Chars;
                false -> io_lib:write_string(Chars)
            end;
        _ ->
            %% Not UTF-8 (the NIF sends only UTF-8, but anyone may send here).
            io_lib:format("~w", [V])
    end;
format_value(V) ->
    io_lib:format("~tp", [V]).

%% Characters that keep a value readable without quotes in `key=value' pairs.
-spec is_bare(char()) -> boolean().
is_bare(C) ->
    C > $\s andalso C =/= $" andalso C =/= $= andalso C =/= $\\ andalso C =/= 127.

%% @private
-spec init([]) -> {ok, state()}.
init([]) ->
    %% A flood of events must not make each garbage collection copy a huge mailbox.
    _ = process_flag(message_queue_data, off_heap),
    {ok, #{}}.

%% @private
-spec handle_call(term(), gen_server:from(), state()) -> {reply, {error, unknown_call}, state()}.
handle_call(_Request, _From, State) ->
    {reply, {error, unknown_call}, State}.

%% @private
-spec handle_cast(term(), state()) -> {noreply, state()}.
handle_cast(_Request, State) ->
    {noreply, State}.

%% @private
-spec handle_info(term(), state()) -> {noreply, state()}.
handle_info({teleport_log, Level, Event, Fields}, State)
  when (Level =:= error orelse Level =:= warning orelse Level =:= info orelse Level =:= debug),
       is_atom(Event), is_map(Fields) ->
    Fields1 = report_dropped(Fields),
    {noreply, rate_limited(Level, Event, Fields1, State)};
handle_info({summary, Event, Start}, State) ->
    case State of
        #{Event := {Start, _, Suppressed}} ->
            log_suppressed(Event, Suppressed),
            %% The window is over: the next event opens a new one.
            {noreply, maps:remove(Event, State)};
        #{} ->
            %% A newer window already reported this one (see rate_limited/4).
            {noreply, State}
    end;
handle_info(_Other, State) ->
    %% Not ours: ignore rather than crash the log bridge.
    {noreply, State}.

%% Logs the NIF's count of dropped events, if any, and removes it from the fields.
-spec report_dropped(map()) -> map().
report_dropped(#{dropped := N} = Fields) when is_integer(N), N > 0 ->
    %% Not rate limited: the NIF attaches a count to one event at most, and sums up the rest.
    logger:log(warning, "teleport: ~b log events were dropped (queue full, over budget, or no "
               "teleport_log process)", [N], #{domain => [teleport]}),
    maps:remove(dropped, Fields);
report_dropped(Fields) ->
    Fields.

%% Logs the event unless its name used up its window; counts it then, and arranges for one
%% summary at the end of the window.
-spec rate_limited(level(), atom(), map(), state()) -> state().
rate_limited(Level, Event, Fields, State) ->
    Now = erlang:monotonic_time(millisecond),
    case State of
        #{Event := {Start, Logged, Suppressed}} when Now - Start < ?WINDOW_MS ->
            if
                Logged < ?MAX_PER_WINDOW ->
                    log(Level, Event, Fields),
                    State#{Event := {Start, Logged + 1, Suppressed}};
                true ->
                    _ = Suppressed =:= 0 andalso
                        erlang:send_after(Start + ?WINDOW_MS - Now, self(),
                                          {summary, Event, Start}),
                    State#{Event := {Start, Logged, Suppressed + 1}}
            end;
        #{Event := {_Start, _, Suppressed}} ->
            %% The old window ended but its summary message is still in the mailbox.
            log_suppressed(Event, Suppressed),
            log(Level, Event, Fields),
            State#{Event := {Now, 1, 0}};
        #{} ->
            log(Level, Event, Fields),
            State#{Event => {Now, 1, 0}}
    end.

-spec log(level(), atom(), map()) -> ok.
log(Level, Event, Fields) ->
    %% The peer, connection index and peer address also go into the metadata, so handlers
    %% and formatters can filter and route on them without parsing the report.
    Meta = maps:with([peer, index, addr, from], Fields),
    logger:log(Level, Fields#{event => Event},
               Meta#{domain => [teleport], teleport_event => Event,
                     report_cb => fun ?MODULE:format_report/1}).

-spec log_suppressed(atom(), non_neg_integer()) -> ok.
log_suppressed(_Event, 0) ->
    ok;
log_suppressed(Event, N) ->
    logger:log(warning, "teleport ~ts: ~b similar events suppressed", [Event, N],
               #{domain => [teleport], event => Event, suppressed => N}).
