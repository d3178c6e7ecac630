%% @doc What `ring_bench' runs on its peer nodes: the ring worker, the echo and ping
%% servers (all three as this one gen_server), the disterl pinger, and the drivers of the
%% small-message, call and single-stream scenarios. Every function taking a `Transport'
%% sends with `!' for `disterl' and with `teleport:send/2' for `teleport'.
-module(bench_agent).
-behaviour(gen_server).

-export([start_ring_worker/2, ring_name/1, start_ping_server/0, start_echo/2,
         start_pinger/2, pinger_active/2, pinger_samples/1, stop/1]).
-export([small_receiver/0, small_run/4, call_run/4, stream_receiver/2, stream_run/4]).
-export([gc_all/0, node_info/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

%%% ----------------------------------------------------------------------------------------
%%% Starting things (called over erpc; nothing is linked to the short-lived erpc process)

%% @doc The ring worker `I', registered as `ring_worker_<I>'; `Nodes' is the ring in order.
start_ring_worker(I, Nodes) ->
    gen_server:start({local, ring_name(I)}, ?MODULE, {ring, I, Nodes}, []).

ring_name(I) ->
    list_to_atom("ring_worker_" ++ integer_to_list(I)).

%% @doc A gen_server registered as `bench_ping' that answers `ping' with `pong'.
start_ping_server() ->
    gen_server:start({local, bench_ping}, ?MODULE, ping, []).

%% @doc A gen_server registered as `Name' that answers `{get, Bytes}' with a binary of that
%% size, made once here (one per size in `Sizes').
start_echo(Name, Sizes) ->
    gen_server:start({local, Name}, ?MODULE, {echo, Sizes}, []).

%% @doc A process that starts a tiny `gen_server:call(Server, ping)' over disterl every
%% `IntervalMs', each from a fresh process, so a slow ping never delays the next one (no
%% coordinated omission); `pinger_samples/1' takes what was measured so far. It starts
%% active; `pinger_active/2' pauses and resumes it.
start_pinger(Server, IntervalMs) ->
    Pid = spawn(fun() ->
                        process_flag(priority, high),
                        pinger(Server, IntervalMs * 1000, mono_us(), [])
                end),
    {ok, Pid}.

pinger_active(Pid, Active) ->
    Pid ! {active, Active},
    ok.

%% @doc `[{OsTimeUs, LatencyUs, LateUs}]' since the last call: when the ping was due
%% (os:system_time), how long the call took (from just before `gen_server:call/3' to its
%% return, in the calling process), and how late the ticker was in starting it.
pinger_samples(Pid) ->
    Ref = make_ref(),
    Pid ! {samples, self(), Ref},
    receive {Ref, Samples} -> Samples after 30000 -> error(pinger_timeout) end.

stop(Pid) when is_pid(Pid) ->
    exit(Pid, kill),
    ok;
stop(Name) when is_atom(Name) ->
    case whereis(Name) of
        undefined -> ok;
        Pid -> stop(Pid)
    end.

%%% ----------------------------------------------------------------------------------------
%%% The gen_server: ring worker, ping server or echo server

init({ring, I, Nodes}) ->
    {ok, #{kind => ring, index => I, name => ring_name(I), route => route(Nodes),
           payload => <<"prime">>, hash => hash(<<"prime">>), pending => #{}}};
init(ping) ->
    {ok, #{kind => ping}};
init({echo, Sizes}) ->
    {ok, #{kind => echo, replies => maps:from_list([{S, rand_bytes(S)} || S <- Sizes])}}.

%% The nodes after this one, around the ring.
route(Nodes) ->
    {Before, [_Me | After]} = lists:splitwith(fun(N) -> N =/= node() end, Nodes),
    After ++ Before.

handle_call(ping, _From, State = #{kind := ping}) ->
    {reply, pong, State};
handle_call({get, Size}, _From, State = #{kind := echo, replies := Replies}) ->
    {reply, maps:get(Size, Replies), State};
handle_call({prepare, Bytes}, _From, State = #{kind := ring}) ->
    Payload = rand_bytes(Bytes),
    {reply, ok, State#{payload := Payload, hash := hash(Payload)}}.

%% Starts one trip around the ring: the time runs until `ring_done' comes back.
handle_cast({go, T, Kind, Controller, Ref},
            State = #{kind := ring, name := Name, route := [Next | Rest], pending := Pending}) ->
    %% The hash of what is sent was computed beforehand: only the last node hashes in the
    %% timed part.
    {Payload, Hash} = case Kind of
                          prime -> {<<"prime">>, hash(<<"prime">>)};
                          bulk -> {maps:get(payload, State), maps:get(hash, State)}
                      end,
    T0 = mono_us(),
    send(T, {Name, Next}, {ring, T, self(), Ref, Rest, Payload}),
    {noreply, State#{pending := Pending#{Ref => {T0, Controller, Hash}}}}.

handle_info({ring, T, Origin, Ref, [], Payload}, State) ->
    %% The last node of the ring: done, with the hash of what arrived.
    send(T, Origin, {ring_done, Ref, hash(Payload)}),
    {noreply, State};
handle_info({ring, T, Origin, Ref, [Next | Rest], Payload}, State = #{name := Name}) ->
    send(T, {Name, Next}, {ring, T, Origin, Ref, Rest, Payload}),
    {noreply, State};
handle_info({ring_done, Ref, Hash}, State = #{index := I, pending := Pending}) ->
    T1 = mono_us(),
    {{T0, Controller, Sent}, Pending1} = maps:take(Ref, Pending),
    Controller ! {ring_result, Ref, #{node => node(), index => I, us => T1 - T0,
                                      hash_ok => Hash =:= Sent}},
    {noreply, State#{pending := Pending1}};
handle_info(_Other, State) ->
    {noreply, State}.

%%% ----------------------------------------------------------------------------------------
%%% The pinger

pinger(Server, IntervalUs, paused, Acc) ->
    receive
        {samples, From, Ref} ->
            From ! {Ref, lists:reverse(Acc)},
            pinger(Server, IntervalUs, paused, []);
        {pinged, Sample} ->
            pinger(Server, IntervalUs, paused, [Sample | Acc]);
        {active, true} ->
            pinger(Server, IntervalUs, mono_us(), Acc);
        {active, false} ->
            pinger(Server, IntervalUs, paused, Acc)
    end;
pinger(Server, IntervalUs, Due, Acc) ->
    Wait = Due - mono_us(),
    receive
        {samples, From, Ref} ->
            From ! {Ref, lists:reverse(Acc)},
            pinger(Server, IntervalUs, Due, []);
        {pinged, Sample} ->
            pinger(Server, IntervalUs, Due, [Sample | Acc]);
        {active, true} ->
            pinger(Server, IntervalUs, Due, Acc);
        {active, false} ->
            pinger(Server, IntervalUs, paused, Acc)
    after max(0, ceil_div(Wait, 1000)) ->
            Self = self(),
            DueOs = os:system_time(microsecond) - (mono_us() - Due),
            _ = spawn(fun() ->
                              T0 = mono_us(),
                              _ = (catch gen_server:call(Server, ping, 10000)),
                              T1 = mono_us(),
                              Self ! {pinged, {DueOs, T1 - T0, T0 - Due}}
                      end),
            pinger(Server, IntervalUs, Due + IntervalUs, Acc)
    end.

ceil_div(A, B) when A =< 0 -> A div B;
ceil_div(A, B) -> (A + B - 1) div B.

%%% ----------------------------------------------------------------------------------------
%%% Small messages: senders here, receivers on the other node

%% @doc A receiver: counts every message until `{fin, Transport, From, Ref}', then answers
%% `{ack, Ref, Count}' over the same transport and starts counting again.
small_receiver() ->
    spawn(fun() -> small_receive(0) end).

small_receive(N) ->
    receive
        {fin, T, From, Ref} ->
            send(T, From, {ack, Ref, N}),
            small_receive(0);
        stop ->
            ok;
        _ ->
            small_receive(N + 1)
    end.

%% @doc One sender per receiver, each sends `Count' copies of `Msg', then `fin'; returns
%% `{ElapsedUs, [CountAcked]}': from releasing the senders to the last ack.
small_run(T, Receivers, Count, Msg) ->
    Self = self(),
    Senders = [spawn_link(fun() -> small_sender(Self, T, R, Count, Msg) end) || R <- Receivers],
    [receive {ready, S} -> ok end || S <- Senders],
    T0 = mono_us(),
    [S ! go || S <- Senders],
    Acks = [receive {acked, S, N} -> N end || S <- Senders],
    {mono_us() - T0, Acks}.

small_sender(Parent, T, Receiver, Count, Msg) ->
    Parent ! {ready, self()},
    receive go -> ok end,
    ok = send_n(T, Receiver, Msg, Count),
    Ref = make_ref(),
    send(T, Receiver, {fin, T, self(), Ref}),
    receive {ack, Ref, N} -> Parent ! {acked, self(), N} end.

send_n(_T, _Dest, _Msg, 0) ->
    ok;
send_n(disterl, Dest, Msg, N) ->
    Dest ! Msg,
    send_n(disterl, Dest, Msg, N - 1);
send_n(teleport, Dest, Msg, N) ->
    ok = teleport:send(Dest, Msg),
    send_n(teleport, Dest, Msg, N - 1).

%%% ----------------------------------------------------------------------------------------
%%% Calls: one caller per server, each calls in a loop for `DurationMs'

%% @doc Returns `{ElapsedUs, Calls, LatenciesUs}'.
call_run(T, Servers, Request, DurationMs) ->
    Self = self(),
    Callers = [spawn_link(fun() -> caller(Self, T, S, Request, DurationMs) end)
               || S <- Servers],
    [receive {ready, C} -> ok end || C <- Callers],
    T0 = mono_us(),
    [C ! go || C <- Callers],
    Results = [receive {called, C, Lats} -> Lats end || C <- Callers],
    Elapsed = mono_us() - T0,
    Lats = lists:append(Results),
    {Elapsed, length(Lats), Lats}.

caller(Parent, T, Server, Request, DurationMs) ->
    Parent ! {ready, self()},
    receive go -> ok end,
    End = mono_us() + DurationMs * 1000,
    Parent ! {called, self(), call_loop(T, Server, Request, End, [])}.

call_loop(T, Server, Request, End, Acc) ->
    T0 = mono_us(),
    _ = case T of
            disterl -> gen_server:call(Server, Request, 30000);
            teleport -> teleport:gs_call(Server, Request, 30000)
        end,
    T1 = mono_us(),
    Acc1 = [T1 - T0 | Acc],
    case T1 >= End of
        true -> Acc1;
        false -> call_loop(T, Server, Request, End, Acc1)
    end.

%%% ----------------------------------------------------------------------------------------
%%% One stream: one sender, one receiver, large messages

%% @doc A receiver that expects `Count' messages, then answers the one `{stream_fin, ...}'.
stream_receiver(T, Count) ->
    {ok, spawn(fun() -> stream_receive(T, Count, 0) end)}.

stream_receive(T, 0, Bytes) ->
    receive
        {stream_fin, From, Ref} -> send(T, From, {stream_ack, Ref, Bytes})
    end;
stream_receive(T, Left, Bytes) ->
    receive
        {stream, Bin} -> stream_receive(T, Left - 1, Bytes + byte_size(Bin))
    end.

%% @doc Sends `Count' messages of `Bytes' random bytes to `Receiver', then waits until it
%% has them all. Returns `{ElapsedUs, BytesReceived}'.
stream_run(T, Receiver, Count, Bytes) ->
    Payload = rand_bytes(Bytes),
    Ref = make_ref(),
    T0 = mono_us(),
    ok = send_n(T, Receiver, {stream, Payload}, Count),
    send(T, Receiver, {stream_fin, self(), Ref}),
    receive
        {stream_ack, Ref, Got} -> {mono_us() - T0, Got}
    after 120000 ->
            error(stream_timeout)
    end.

%%% ----------------------------------------------------------------------------------------
%%% Helpers

%% @doc Garbage-collects every process of the node.
gc_all() ->
    [erlang:garbage_collect(P) || P <- processes()],
    ok.

%% @doc The node's OS pid, schedulers and teleport counters.
node_info() ->
    #{os_pid => os:getpid(),
      schedulers => erlang:system_info(schedulers_online),
      teleport_stats => (catch teleport:stats()),
      pool_info => (catch teleport_server:pool_info())}.

send(disterl, Dest, Msg) ->
    Dest ! Msg,
    ok;
send(teleport, Dest, Msg) ->
    ok = teleport:send(Dest, Msg).

hash(Bin) ->
    {byte_size(Bin), erlang:crc32(Bin)}.

rand_bytes(N) ->
    crypto:strong_rand_bytes(N).

mono_us() ->
    erlang:monotonic_time(microsecond).
