%% @doc What `ring_bench' runs on its peer nodes: the ring worker, the echo and ping
%% servers (all three as this one gen_server), the disterl pinger, and the drivers of the
%% small-message, call and single-stream scenarios. Every function taking a `Transport'
%% sends with `!' for `disterl' and with `teleport:send/2' for `teleport'.
-module(bench_agent).
-behaviour(gen_server).

-export([start_ring_worker/2, ring_name/1, start_ping_server/0, start_echo/2,
         start_pinger/2, pinger_active/2, pinger_samples/1, stop/1]).
-export([small_receiver/0, small_run/4, call_run/4, stream_receiver/2, stream_run/4]).
-export([bulk_run/4, flood_start/3, flood_start/4, flood_stop/1, timed_receiver/0, timed_samples/1,
         seq_receiver/0, seq_report/1, seq_start/4, seq_start/5, seq_stop/1, watch_nodes/0, node_events/1]).
-export([gc_all/0, node_info/0, message/1, open_pool/3]).
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

%% `{m, Bin}' of exactly `Bytes' bytes in the external format, `Bin' random.
message(Bytes) ->
    Overhead = byte_size(term_to_binary({m, <<>>})),
    {m, crypto:strong_rand_bytes(Bytes - Overhead)}.

%% The message is made here (`{message, Bytes}') when it is too large to pass around.
small_sender(Parent, T, Receiver, Count, {message, Bytes}) ->
    small_sender(Parent, T, Receiver, Count, message(Bytes));
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
%%% The link benchmark (net_bench): bulk from several senders, small messages flooding
%%% beside it, sequenced streams across a link cut, node events

%% @doc One sender per receiver (each made by stream_receiver/2 for `Count'), all released
%% at once; each sends `Count' messages of `Bytes' random bytes, then waits for its
%% receiver to have them all. Returns `{ElapsedUs, BytesReceived}': from the release to
%% the last ack.
-spec bulk_run(disterl | teleport, [pid()], pos_integer(), pos_integer()) ->
          {non_neg_integer(), non_neg_integer()}.
bulk_run(T, Receivers, Count, Bytes) ->
    Self = self(),
    Senders = [spawn_link(fun() ->
                                  Payload = rand_bytes(Bytes),
                                  Self ! {ready, self()},
                                  receive go -> ok end,
                                  Ref = make_ref(),
                                  ok = send_n(T, R, {stream, Payload}, Count),
                                  send(T, R, {stream_fin, self(), Ref}),
                                  receive
                                      {stream_ack, Ref, Got} -> Self ! {bulk_done, self(), Got}
                                  after 600000 -> exit(bulk_timeout)
                                  end
                          end) || R <- Receivers],
    [receive {ready, S} -> ok end || S <- Senders],
    T0 = mono_us(),
    [S ! go || S <- Senders],
    Got = [receive {bulk_done, S, G} -> G end || S <- Senders],
    {mono_us() - T0, lists:sum(Got)}.

%% @doc Starts one sender per receiver (made by timed_receiver/0) that sends `{ts, SentUs,
%% Pad}' of `Bytes' bytes (external format) as fast as it can until flood_stop/1.
%% `SentUs' is os:system_time(microsecond): the nodes share this machine's clock.
-spec flood_start(disterl | teleport, [pid()], pos_integer()) -> {pid(), [pid()], integer()}.
flood_start(T, Receivers, Bytes) ->
    flood_start(T, Receivers, Bytes, 0).

%% @doc flood_start/3, but with `IntervalMs' > 0 each sender sends one message every
%% `IntervalMs' instead of as fast as it can (paced: the latency of a small message behind
%% the bulk, without a backlog of its own).
-spec flood_start(disterl | teleport, [pid()], pos_integer(), non_neg_integer()) ->
          {pid(), [pid()], integer()}.
flood_start(T, Receivers, Bytes, IntervalMs) ->
    Pad = crypto:strong_rand_bytes(max(0, Bytes - byte_size(term_to_binary(
                                                             {ts, 1 bsl 50, <<>>})))),
    Self = self(),
    Senders = [spawn(fun() -> flood(T, R, Pad, IntervalMs, 0) end) || R <- Receivers],
    {Self, Senders, mono_us()}.

flood(T, R, Pad, Ival, N) ->
    %% A look at the mailbox every 64 messages (flooding) or before each (paced).
    Stop = case {Ival, N band 63} of
               {0, 0} -> receive {flood_stop, F, R0} -> {F, R0} after 0 -> false end;
               {0, _} -> false;
               _ -> receive {flood_stop, F, R0} -> {F, R0} after Ival -> false end
           end,
    case Stop of
        false ->
            send(T, R, {ts, os:system_time(microsecond), Pad}),
            flood(T, R, Pad, Ival, N + 1);
        {StopFrom, StopRef} ->
            Fin = make_ref(),
            send(T, R, {fin, T, self(), Fin}),
            Acked = receive {ack, Fin, A} -> A after 120000 -> lost_fin end,
            StopFrom ! {StopRef, self(), N, Acked}
    end.

%% @doc Stops the senders of flood_start/3; once each receiver has acked its last message,
%% returns `{ElapsedUs, [{Sent, Acked}]}' (elapsed from the start to the last ack).
-spec flood_stop({pid(), [pid()], integer()}) ->
          {integer(), [{non_neg_integer() | lost, non_neg_integer() | lost | lost_fin}]}.
flood_stop({_Owner, Senders, T0}) ->
    Ref = make_ref(),
    _ = [S ! {flood_stop, self(), Ref} || S <- Senders],
    Acks = [receive {Ref, S, Sent, Acked} -> {Sent, Acked} after 180000 -> {lost, lost} end
            || S <- Senders],
    {mono_us() - T0, Acks}.

%% @doc A receiver of `{ts, SentUs, _}' messages: counts them and keeps one latency in 8
%% (receive time minus `SentUs'); answers `{fin, ...}' as small_receiver/0 does.
-spec timed_receiver() -> pid().
timed_receiver() ->
    spawn(fun() -> timed_receive(0, []) end).

timed_receive(N, Lats) ->
    receive
        {ts, Sent, _} when N band 7 =:= 0 ->
            timed_receive(N + 1, [os:system_time(microsecond) - Sent | Lats]);
        {ts, _, _} ->
            timed_receive(N + 1, Lats);
        {fin, T, From, Ref} ->
            send(T, From, {ack, Ref, N}),
            timed_receive(0, Lats);
        {samples, From, Ref} ->
            From ! {Ref, Lats},
            timed_receive(N, []);
        stop ->
            ok
    end.

%% @doc The latencies (us) a timed_receiver/0 kept since the last call.
-spec timed_samples(pid()) -> [integer()].
timed_samples(Pid) ->
    Ref = make_ref(),
    Pid ! {samples, self(), Ref},
    receive {Ref, Lats} -> Lats after 30000 -> error(timed_receiver_timeout) end.

%% @doc A receiver of `{seq, Sender, N}' messages that keeps every sequence number per
%% sender, for seq_report/1.
-spec seq_receiver() -> pid().
seq_receiver() ->
    spawn(fun() -> seq_receive(#{}) end).

seq_receive(Got) ->
    receive
        {seq, S, N} ->
            seq_receive(maps:update_with(S, fun(L) -> [N | L] end, [N], Got));
        {seq, S, N, _Pad} ->
            seq_receive(maps:update_with(S, fun(L) -> [N | L] end, [N], Got));
        {report, From, Ref} ->
            From ! {Ref, maps:map(fun(_, L) -> lists:reverse(L) end, Got)},
            seq_receive(Got);
        reset ->
            seq_receive(#{});
        stop ->
            ok
    end.

%% @doc Per sender, what seq_receiver/0 got: `#{Sender => #{received, unique, duplicated,
%% reordered, last, gaps}}'; reordered counts arrivals below the highest number seen before.
-spec seq_report(pid()) -> #{pos_integer() => map()}.
seq_report(Pid) ->
    Ref = make_ref(),
    Pid ! {report, self(), Ref},
    Got = receive {Ref, G} -> G after 30000 -> error(seq_receiver_timeout) end,
    maps:map(fun(_, L) ->
                     Sorted = lists:usort(L),
                     Unique = length(Sorted),
                     {Reordered, Max} = lists:foldl(fun(N, {R, M}) when N < M -> {R + 1, M};
                                                       (N, {R, _}) -> {R, N}
                                                    end, {0, -1}, L),
                     #{received => length(L), unique => Unique,
                       duplicated => length(L) - Unique, reordered => Reordered, last => Max,
                       gaps => gaps(Sorted, 1, [])}
             end, Got).

%% The missing ranges `{From, To}' below the highest number received (at most 20).
gaps(_, _, Acc) when length(Acc) >= 20 -> lists:reverse(Acc);
gaps([], _, Acc) -> lists:reverse(Acc);
gaps([N | Rest], N, Acc) -> gaps(Rest, N + 1, Acc);
gaps([N | Rest], Next, Acc) -> gaps(Rest, N + 1, [{Next, N - 1} | Acc]).

%% @doc `Senders' processes, each sending `{seq, I, N}' (N = 1, 2, ...) to `Receiver'
%% every `IntervalMs' until seq_stop/1.
-spec seq_start(disterl | teleport, pid(), pos_integer(), pos_integer()) -> {seq, [pid()]}.
seq_start(T, Receiver, Senders, IntervalMs) ->
    Pids = [spawn(fun() -> seq_send(T, Receiver, I, IntervalMs, 1, 0) end)
            || I <- lists:seq(1, Senders)],
    {seq, Pids}.

%% @doc seq_start/4 with `{seq, I, N, Pad}' messages, `Pad' `PadBytes' random bytes (the
%% same binary in every message).
-spec seq_start(disterl | teleport, pid(), pos_integer(), pos_integer(), non_neg_integer()) ->
          {seq, [pid()]}.
seq_start(T, Receiver, Senders, IntervalMs, PadBytes) ->
    Pad = crypto:strong_rand_bytes(PadBytes),
    Pids = [spawn(fun() -> seq_send(T, Receiver, I, IntervalMs, 1, 0, Pad) end)
            || I <- lists:seq(1, Senders)],
    {seq, Pids}.

seq_send(T, R, I, IntervalMs, N, Errors) ->
    seq_send(T, R, I, IntervalMs, N, Errors, none).

seq_send(T, R, I, IntervalMs, N, Errors, Pad) ->
    receive
        {seq_stop, From, Ref} -> From ! {Ref, self(), #{sent => N - 1, send_errors => Errors}}
    after IntervalMs ->
            Msg = case Pad of
                      none -> {seq, I, N};
                      _ -> {seq, I, N, Pad}
                  end,
            case T of
                disterl -> R ! Msg, seq_send(T, R, I, IntervalMs, N + 1, Errors, Pad);
                teleport ->
                    case teleport:send(R, Msg) of
                        ok -> seq_send(T, R, I, IntervalMs, N + 1, Errors, Pad);
                        %% Refused (the sender is told): not sent, the number is kept.
                        {error, _} -> seq_send(T, R, I, IntervalMs, N, Errors + 1, Pad)
                    end
            end
    end.

%% @doc Stops the senders of seq_start/4: `[#{sent, send_errors}]', in sender order.
-spec seq_stop({seq, [pid()]}) -> [map()].
seq_stop({seq, Pids}) ->
    Ref = make_ref(),
    _ = [P ! {seq_stop, self(), Ref} || P <- Pids],
    [receive {Ref, P, R} -> R after 30000 -> #{sent => lost, send_errors => lost} end
     || P <- Pids].

%% @doc A process recording this node's nodeup/nodedown events (with the reason) as
%% `{OsTimeUs, Event, Node, Reason}', for node_events/1.
-spec watch_nodes() -> pid().
watch_nodes() ->
    Self = self(),
    Pid = spawn(fun() ->
                        ok = net_kernel:monitor_nodes(true, [nodedown_reason]),
                        Self ! {watching, self()},
                        watch([])
                end),
    receive {watching, Pid} -> Pid after 10000 -> error(watch_nodes_timeout) end.

watch(Acc) ->
    receive
        {nodeup, N, _} -> watch([{os:system_time(microsecond), nodeup, N, none} | Acc]);
        {nodedown, N, Info} ->
            watch([{os:system_time(microsecond), nodedown, N,
                    proplists:get_value(nodedown_reason, Info)} | Acc]);
        {events, From, Ref} -> From ! {Ref, lists:reverse(Acc)}, watch(Acc)
    end.

%% @doc The events watch_nodes/0 recorded so far.
-spec node_events(pid()) -> [{integer(), nodeup | nodedown, node(), term()}].
node_events(Pid) ->
    Ref = make_ref(),
    Pid ! {events, self(), Ref},
    receive {Ref, Events} -> Events after 10000 -> error(watch_nodes_timeout) end.

%%% ----------------------------------------------------------------------------------------
%%% Helpers

%% @doc Garbage-collects every process of the node.
gc_all() ->
    [erlang:garbage_collect(P) || P <- processes()],
    ok.

%% @doc Opens every connection of this node's pool to `Node' (`Pool' of them) by sending
%% from many processes (a connection is chosen by sender), to `Receiver'; returns how many
%% are up, waiting at most 20 s for all of them.
open_pool(Node, Receiver, Pool) ->
    Self = self(),
    Senders = [spawn(fun() -> ok = teleport:send(Receiver, x), Self ! {sent, self()} end)
               || _ <- lists:seq(1, 16 * Pool)],
    [receive {sent, S} -> ok end || S <- Senders],
    Up = fun() -> length([C || #{state := up} = C <- maps:get(Node, teleport:info(), [])]) end,
    Deadline = erlang:monotonic_time(millisecond) + 20000,
    wait_up(Up, Pool, Deadline).

wait_up(Up, Pool, Deadline) ->
    N = Up(),
    case N >= Pool orelse erlang:monotonic_time(millisecond) > Deadline of
        true -> N;
        false -> timer:sleep(50), wait_up(Up, Pool, Deadline)
    end.

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
