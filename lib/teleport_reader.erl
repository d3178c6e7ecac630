%% @doc One incoming connection's reader: it reads the socket on the VM's schedulers, as
%% disterl reads its own, instead of on a thread of teleport's.
%%
%% The reader owns a port on a duplicate of the connection's socket (`gen_tcp:fdopen/2',
%% `{active, true}'): the schedulers poll a busy port's socket themselves, where a NIF's
%% `enif_select' readiness always passes through the VM's poll thread, which then wakes a
%% scheduler (a call over teleport costs two such wake-ups). What the port reads is fed to the
%% NIF (`teleport_nif:reader_feed/2'), which parses the frames, checks their numbers, decodes
%% each and delivers it with `enif_send' from this process's scheduler, within a budget: the
%% rest of a chunk goes on from `handle_continue/2', so that other processes run in between.
%%
%% A frame too long for a normal scheduler is read otherwise: the port is stopped
%% (`{active, false}'), what it had sent is fed on a dirty I/O scheduler, and the rest of the
%% frame is read from the socket itself (`reader_run_dirty/2', straight into the VM binary it
%% is decoded from), waiting on `enif_select' between reads; once the frames are small again
%% the port reads on. Deadlines (an acknowledgement due, the steps of closing) are the
%% gen_server timeout, and the listener closing sends `teleport_tick'.
-module(teleport_reader).
-behaviour(gen_server).

-export([start_link/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, handle_continue/2,
         terminate/2]).

-type state() :: #{reader := teleport_nif:reader(),
                   id := non_neg_integer(),
                   sock := inet:socket(),
                   %% Who reads now: the port, or this process on a dirty scheduler (a large
                   %% frame), with `enif_select'.
                   mode := port | dirty,
                   %% The port stopped because chunks piled up here (see backlog/1).
                   paused := boolean()}.

%% Chunks the port may have sent ahead before it is stopped until they are fed: up to this
%% many of 256 KB. `{active, N}' would bound them too, but a port in that mode is served by
%% the VM's poll thread again (6-9 k wake-ups a second at 30 k calls/s, measured).
-define(BACKLOG, 32).

%% What the port read: bytes, or how the stream ended.
-type data() :: binary() | eof | {error, atom()}.

-type result() :: {noreply, state(), timeout() | {continue, {feed, data()} | read}}
                | {stop, normal, state()}.

%% @doc Starts the reader of the incoming connection `Reader'.
-spec start_link(teleport_nif:reader()) -> {ok, pid()} | {error, term()}.
start_link(Reader) ->
    gen_server:start_link(?MODULE, Reader, []).

%% @private
-spec init(teleport_nif:reader()) -> {ok, state(), {continue, tick}} | {stop, term()}.
init(Reader) ->
    %% Trapped so that terminate/2 runs at shutdown: it hands the connection over.
    process_flag(trap_exit, true),
    Id = teleport_nif:reader_attach(Reader),
    %% The socket's options are set already (teleport_config's socket_opts); the port only
    %% reads, and closes its duplicate when this process ends.
    case open_port(teleport_nif:reader_fd(Reader)) of
        {ok, Sock} ->
            {ok, #{reader => Reader, id => Id, sock => Sock, mode => port, paused => false},
             {continue, tick}};
        {error, Reason} ->
            teleport_nif:reader_detach(Reader),
            {stop, {fdopen, Reason}}
    end.

%% The port on the socket's duplicate `Fd': `inet' (not the `socket' backend, which
%% `enif_select's), raw chunks of up to 256 KB, sent as they are read; a reset is an error
%% (`show_econnreset'), not a clean close.
-spec open_port(non_neg_integer() | closed) -> {ok, inet:socket()} | {error, term()}.
open_port(closed) ->
    {error, closed};
open_port(Fd) ->
    gen_tcp:fdopen(Fd, [{inet_backend, inet}, binary, {packet, raw}, {active, true},
                        {buffer, 256 * 1024}, {show_econnreset, true}]).

%% @private
-spec handle_continue(tick | read | {feed, data()}, state()) -> result().
handle_continue({feed, Data}, State) ->
    feed(Data, State);
handle_continue(Event, State) ->
    turn(Event, State).

%% @private
-spec handle_info(term(), state()) -> result().
handle_info({tcp, Sock, Data}, State = #{sock := Sock}) ->
    feed(Data, backlog(State));
handle_info({tcp_closed, Sock}, State = #{sock := Sock}) ->
    feed(eof, State);
handle_info({tcp_error, Sock, Reason}, State = #{sock := Sock}) ->
    %% Not a clean end: the connection ends with this error (and it is logged as one).
    feed({error, Reason}, State);
handle_info({select, Reader, _, ready_input}, State = #{reader := Reader, mode := dirty}) ->
    turn(read, State);
handle_info(timeout, State) ->
    turn(tick, State);
handle_info(teleport_tick, State) ->
    turn(tick, State);
handle_info({'EXIT', Sock, _}, State = #{sock := Sock}) ->
    %% The port closed (after the stream ended, or on an error): so does the connection.
    {stop, normal, State};
handle_info({'EXIT', _, Reason}, State) ->
    {stop, Reason, State};
handle_info(_Other, State) ->
    %% A select message left from a dirty read (the port reads now), or anything else: a
    %% turn all the same, which sets the deadline again (a bare noreply would cancel it).
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
%% The connection ends with this process (and the port with it). If its listener is
%% closing, it still says LAST and lingers, on a thread of its own, so that a node shutting
%% down does not wait for it.
-spec terminate(term(), state()) -> ok.
terminate(_Reason, #{reader := Reader}) ->
    teleport_nif:reader_detach(Reader).

%% What the port read, fed to the connection.
-spec feed(data(), state()) -> result().
feed(Data, State = #{reader := Reader, sock := Sock}) ->
    case teleport_nif:reader_feed(Reader, Data) of
        {wait, Timeout, port} ->
            {noreply, backlog(State), Timeout};
        {more, Rest} ->
            {noreply, State, {continue, {feed, Rest}}};
        {dirty, Rest} ->
            %% A large frame: the port stops, what it had sent goes first, then this process
            %% reads the rest of the frame from the socket itself.
            ok = passive(Sock),
            case teleport_nif:reader_feed_dirty(Reader, sent_by(Sock, [Rest])) of
                done -> {stop, normal, State};
                _ -> turn(read, State#{mode := dirty})
            end;
        done ->
            {stop, normal, State}
    end.

%% One turn of this process's own reads (a large frame) or of its deadlines.
-spec turn(read | tick, state()) -> result().
turn(Event, State = #{reader := Reader, mode := Mode, sock := Sock}) ->
    Answer = case Mode of
                 dirty -> teleport_nif:reader_run_dirty(Reader, Event);
                 port -> teleport_nif:reader_run(Reader, Event)
             end,
    case Answer of
        {wait, Timeout, dirty} ->
            ok = passive(Sock),
            {noreply, State#{mode := dirty}, Timeout};
        {wait, Timeout, port} when Mode =:= dirty ->
            %% Small frames again: the port reads on.
            ok = active(Sock),
            {noreply, State#{mode := port, paused := false}, Timeout};
        {wait, Timeout, port} ->
            {noreply, backlog(State), Timeout};
        more ->
            {noreply, State, {continue, read}};
        dirty ->
            ok = passive(Sock),
            {noreply, State#{mode := dirty}, {continue, read}};
        done ->
            {stop, normal, State}
    end.

%% Stops the port while more than ?BACKLOG chunks wait here, so that the kernel's window
%% holds the sender back again; starts it once they are fed.
-spec backlog(state()) -> state().
backlog(State = #{sock := Sock, paused := Paused}) ->
    {message_queue_len, Waiting} = erlang:process_info(self(), message_queue_len),
    if
        not Paused, Waiting > ?BACKLOG ->
            ok = passive(Sock),
            State#{paused := true};
        Paused, Waiting =:= 0 ->
            ok = active(Sock),
            State#{paused := false};
        true ->
            State
    end.

%% Starts the port reading again (a closed one cannot: its close message says so).
-spec active(inet:socket()) -> ok.
active(Sock) ->
    set_active(Sock, true).

%% Stops the port reading (a closed port reads nothing either).
-spec passive(inet:socket()) -> ok.
passive(Sock) ->
    set_active(Sock, false).

-spec set_active(inet:socket(), boolean()) -> ok.
set_active(Sock, Active) ->
    _ = inet:setopts(Sock, [{active, Active}]),
    ok.

%% `Acc' and the data the port sent before it stopped, in order, as one binary; or, if there
%% is none, how the stream ended (`Acc' holds it then). A close message stays for later; the
%% socket's own reads see the end of the stream too.
-spec sent_by(inet:socket(), [data()]) -> data().
sent_by(Sock, Acc) ->
    receive
        {tcp, Sock, Data} -> sent_by(Sock, [Data | Acc])
    after 0 ->
            case [B || B <- lists:reverse(Acc), is_binary(B)] of
                [] -> hd([End || End <- Acc, not is_binary(End)] ++ [eof]);
                Bins -> iolist_to_binary(Bins)
            end
    end.
