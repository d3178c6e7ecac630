%% @doc One incoming connection's reader: it reads the socket on the VM's schedulers, as
%% disterl reads its own, instead of on a thread of teleport's.
%%
%% Each turn is a call to the NIF (`teleport_nif:reader_run/2'): it reads what the socket has,
%% within a budget, and delivers each whole frame to its destination with `enif_send' from
%% this process's scheduler. Between turns the socket is watched with `enif_select', whose
%% `{select, Reader, _, ready_input}' message starts the next. A frame too long for a normal
%% scheduler is read on a dirty I/O scheduler (`reader_run_dirty/2'); a turn whose budget ran
%% out goes on from `handle_continue/2', so that other processes run in between. Deadlines
%% (an acknowledgement due, the steps of closing) are the gen_server timeout, and the
%% listener closing sends `teleport_tick'.
-module(teleport_reader).
-behaviour(gen_server).

-export([start_link/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, handle_continue/2,
         terminate/2]).

-type state() :: #{reader := teleport_nif:reader(),
                   id := non_neg_integer(),
                   %% Where the next turn runs.
                   where := normal | dirty}.

%% @doc Starts the reader of the incoming connection `Reader'.
-spec start_link(teleport_nif:reader()) -> {ok, pid()}.
start_link(Reader) ->
    gen_server:start_link(?MODULE, Reader, []).

%% @private
-spec init(teleport_nif:reader()) -> {ok, state(), {continue, tick}}.
init(Reader) ->
    %% Trapped so that terminate/2 runs at shutdown: it hands the connection over.
    process_flag(trap_exit, true),
    Id = teleport_nif:reader_attach(Reader),
    {ok, #{reader => Reader, id => Id, where => normal}, {continue, tick}}.

%% @private
-spec handle_continue(read | tick, state()) ->
          {noreply, state(), timeout() | {continue, read}} | {stop, normal, state()}.
handle_continue(Event, State) ->
    turn(Event, State).

%% @private
-spec handle_info(term(), state()) ->
          {noreply, state(), timeout() | {continue, read}} | {stop, normal, state()}.
handle_info({select, Reader, _, ready_input}, State = #{reader := Reader}) ->
    turn(read, State);
handle_info(timeout, State) ->
    turn(tick, State);
handle_info(teleport_tick, State) ->
    turn(tick, State);
handle_info({'EXIT', _, Reason}, State) ->
    {stop, Reason, State};
handle_info(_Other, State) ->
    %% Anything else: a turn all the same, which sets the deadline again (a bare noreply
    %% would cancel it).
    turn(tick, State).

%% @private
-spec handle_call(term(), gen_server:from(), state()) -> {reply, {error, unknown_call}, state()}.
handle_call(_Request, _From, State) ->
    {reply, {error, unknown_call}, State}.

%% @private
-spec handle_cast(term(), state()) -> {noreply, state()}.
handle_cast(_Msg, State) ->
    {noreply, State}.

%% @private
%% The connection ends with this process. If its listener is closing, it still says LAST
%% and lingers, on a thread of its own, so that a node shutting down does not wait for it.
-spec terminate(term(), state()) -> ok.
terminate(_Reason, #{reader := Reader}) ->
    teleport_nif:reader_detach(Reader).

%% One turn, where the last one said.
-spec turn(read | tick, state()) ->
          {noreply, state(), timeout() | {continue, read}} | {stop, normal, state()}.
turn(Event, State = #{reader := Reader, where := Where}) ->
    Answer = case Where of
                 normal -> teleport_nif:reader_run(Reader, Event);
                 dirty -> teleport_nif:reader_run_dirty(Reader, Event)
             end,
    case Answer of
        {wait, Timeout, Next} -> {noreply, State#{where := Next}, Timeout};
        more -> {noreply, State#{where := normal}, {continue, read}};
        dirty -> {noreply, State#{where := dirty}, {continue, read}};
        done -> {stop, normal, State}
    end.
