%% Load and fault-test helpers shared by faults_SUITE, hostile_SUITE and `make soak'.
%%
%% - Peers are started and stopped with teleport_test_util:start_peer/1 and stop_peer/1, as
%%   in every suite; the setup calls it runs before teleport starts are start_soak_rx/1,
%%   start_seq_rx/1 and blob/0 of this module.
%% - Sequenced traffic: every message is `{soak, Key, Seq, Off, Size, Payload}' where Payload
%%   is `binary:part(blob(), Off, Size)' of a 2 MB blob that every node derives from the same
%%   seed, so a receiver checks the content of every message, not just its number.
%% - Receivers: `soak_rx' (counters only, for millions of messages: next expected sequence
%%   number, count, bytes, out-of-sequence, corrupt, done marker) and `seq_rx' (keeps every
%%   sequence number received, for the fault tests that must say exactly what was lost).
%% - Streamers (send until told to stop, recording every error with its time) and callers
%%   (gs_call in a loop), for the fault tests.
%% - The soak: round/3 runs 8 senders on each sender node to the receivers on a receiver
%%   node; main/0 (`make soak') repeats full rounds for SOAK_MINUTES, sampling each node's
%%   VmRSS, and checks that nothing was lost, duplicated, reordered or corrupted and that RSS
%%   stays flat.
-module(teleport_soak).

-compile([export_all, nowarn_export_all]).

-define(BLOB_SIZE, (2 * 1024 * 1024)).
-define(MAX_MSG, (1024 * 1024)).
%% Streamer counters: last accepted seq at Id, failed sends at ?ERR_OFFSET + Id.
-define(ERR_OFFSET, 32).

%%============================================================================================
%% Peers

%% VmRSS of an OS process, in KB (0 if it is gone).
rss_kb(OsPid) ->
    case file:read_file("/proc/" ++ OsPid ++ "/status") of
        {ok, Text} ->
            case re:run(Text, "VmRSS:\\s+(\\d+) kB", [{capture, all_but_first, list}]) of
                {match, [Kb]} -> list_to_integer(Kb);
                nomatch -> 0
            end;
        {error, _} ->
            0
    end.

%%============================================================================================
%% Small utilities

now_ms() -> erlang:monotonic_time(millisecond).

%% Wall-clock ms: the same clock on every node of this machine (monotonic time is per VM).
wall_ms() -> erlang:system_time(millisecond).

wait_until(Fun, Timeout) ->
    Deadline = now_ms() + Timeout,
    wait_until_deadline(Fun, Deadline).

wait_until_deadline(Fun, Deadline) ->
    case Fun() of
        true -> ok;
        false ->
            case now_ms() > Deadline of
                true -> timeout;
                false -> timer:sleep(20), wait_until_deadline(Fun, Deadline)
            end
    end.

env_int(Name, Default) ->
    case os:getenv(Name) of
        false -> Default;
        "" -> Default;
        Text -> list_to_integer(Text)
    end.

percentile([], _) -> undefined;
percentile(Sorted, P) ->
    N = length(Sorted),
    lists:nth(max(1, min(N, round(P / 100 * N + 0.5))), Sorted).

median(L) -> percentile(lists:sort(L), 50).

%% [1,2,3,7,8,10] -> [{1,3},{7,8},{10,10}]
ranges([]) -> [];
ranges([H | T]) -> ranges(T, H, H, []).

ranges([], From, To, Acc) -> lists:reverse([{From, To} | Acc]);
ranges([X | T], From, To, Acc) when X =:= To + 1 -> ranges(T, From, X, Acc);
ranges([X | T], From, To, Acc) -> ranges(T, X, X, [{From, To} | Acc]).

%%============================================================================================
%% Payloads

%% The same 2 MB of pseudo-random bytes on every node.
blob() ->
    case persistent_term:get({?MODULE, blob}, undefined) of
        undefined ->
            {Bin, _} = rand:bytes_s(?BLOB_SIZE, rand:seed_s(exsss, {17, 42, 4711})),
            persistent_term:put({?MODULE, blob}, Bin),
            Bin;
        Bin ->
            Bin
    end.

%% 100 B to 1 MB, mostly small: 90% 101..1000 B, 9.5% 1..64 KB, 0.5% 64 KB..1 MB (the
%% last two log-uniform).
msg_size() ->
    case rand:uniform(1000) of
        X when X =< 900 -> 100 + rand:uniform(900);
        X when X =< 995 -> log_uniform(1000, 65536);
        _ -> log_uniform(65536, ?MAX_MSG)
    end.

log_uniform(Lo, Hi) ->
    min(Hi, round(Lo * math:pow(Hi / Lo, rand:uniform()))).

%% A message of Size bytes of the blob: {Off, Payload}.
payload(Blob, Size) ->
    Off = rand:uniform(?BLOB_SIZE - Size + 1) - 1,
    {Off, binary:part(Blob, Off, Size)}.

msg(Key, Seq, Blob, Size) ->
    {Off, Payload} = payload(Blob, Size),
    {soak, Key, Seq, Off, Size, Payload}.

intact(Blob, Off, Size, Payload) ->
    byte_size(Payload) =:= Size andalso Payload =:= binary:part(Blob, Off, Size).

%%============================================================================================
%% soak_rx: a receiver that counts (for millions of messages)

%% State per Key: {Next, Count, Bytes, OutOfSeq, Corrupt, Done}.
start_soak_rx(Name) ->
    Blob = blob(),
    Pid = spawn(fun() ->
                        process_flag(message_queue_data, off_heap),
                        soak_rx_loop(Blob, #{})
                end),
    true = register(Name, Pid),
    Pid.

soak_rx_loop(Blob, St) ->
    receive
        {soak, Key, Seq, Off, Size, Payload} ->
            Ok = intact(Blob, Off, Size, Payload),
            {Next, Count, Bytes, Bad, Corrupt, Done} =
                case St of
                    #{Key := V} -> V;
                    #{} -> {1, 0, 0, 0, 0, undefined}
                end,
            Bad1 = case Seq =:= Next of true -> Bad; false -> Bad + 1 end,
            Corrupt1 = case Ok of true -> Corrupt; false -> Corrupt + 1 end,
            soak_rx_loop(Blob, St#{Key => {Seq + 1, Count + 1, Bytes + Size, Bad1, Corrupt1,
                                           Done}});
        {soak_done, Key, Last} ->
            V = case St of
                    #{Key := {N, C, B, Bad, Cor, _}} -> {N, C, B, Bad, Cor, Last};
                    #{} -> {1, 0, 0, 0, 0, Last}
                end,
            soak_rx_loop(Blob, St#{Key => V});
        {soak_report, From, Ref} ->
            From ! {Ref, St},
            soak_rx_loop(Blob, St);
        {soak_reset, From, Ref} ->
            From ! {Ref, ok},
            soak_rx_loop(Blob, #{});
        _ ->
            soak_rx_loop(Blob, St)
    end.

soak_rx_report(Name) -> ask(Name, soak_report).

soak_rx_reset(Name) -> ask(Name, soak_reset).

ask(Name, Tag) ->
    Ref = make_ref(),
    Name ! {Tag, self(), Ref},
    receive {Ref, Result} -> Result after 30000 -> error({no_answer, Name, Tag}) end.

%%============================================================================================
%% seq_rx: a receiver that keeps every sequence number (for the fault tests)

start_seq_rx(Name) ->
    Blob = blob(),
    Pid = spawn(fun() -> seq_rx_loop(Blob, #{}, #{}, 0) end),
    true = register(Name, Pid),
    Pid.

%% Seqs: Key => reversed [Seq]; Done: Key => Last; Corrupt: count.
seq_rx_loop(Blob, Seqs, Done, Corrupt) ->
    receive
        {soak, Key, Seq, Off, Size, Payload} ->
            Corrupt1 = case intact(Blob, Off, Size, Payload) of
                           true -> Corrupt;
                           false -> Corrupt + 1
                       end,
            seq_rx_loop(Blob, Seqs#{Key => [Seq | maps:get(Key, Seqs, [])]}, Done, Corrupt1);
        {soak_done, Key, Last} ->
            seq_rx_loop(Blob, Seqs, Done#{Key => Last}, Corrupt);
        {seq_report, From, Ref} ->
            From ! {Ref, #{seqs => maps:map(fun(_, L) -> lists:reverse(L) end, Seqs),
                           done => Done, corrupt => Corrupt}},
            seq_rx_loop(Blob, Seqs, Done, Corrupt);
        _ ->
            seq_rx_loop(Blob, Seqs, Done, Corrupt)
    end.

seq_rx_report(Name) -> ask(Name, seq_report).

%% What happened to one key: Accepted is the last sequence number the sender got `ok' for
%% (it numbers only accepted messages, 1..Accepted). Received is what arrived, in order.
analyze(Accepted, Received) ->
    InOrder = is_strictly_increasing(Received),
    Lost = ordsets:subtract(lists:seq(1, Accepted), ordsets:from_list(Received)),
    Extra = [S || S <- Received, S > Accepted orelse S < 1],
    #{accepted => Accepted, received => length(Received),
      distinct => length(lists:usort(Received)), in_order => InOrder,
      lost => length(Lost), lost_ranges => ranges(Lost), extra => Extra,
      order_breaks => order_breaks(Received, 1, [])}.

%% The first few places where a sequence number is not above the one before it:
%% {Position, Previous, ThisOne}.
order_breaks([A, B | T], I, Acc) when A < B -> order_breaks([B | T], I + 1, Acc);
order_breaks([A, B | T], I, Acc) when length(Acc) < 5 -> order_breaks([B | T], I + 1, [{I + 1, A, B} | Acc]);
order_breaks(_, _, Acc) -> lists:reverse(Acc).

is_strictly_increasing([A, B | T]) when A < B -> is_strictly_increasing([B | T]);
is_strictly_increasing([_, _ | _]) -> false;
is_strictly_increasing(_) -> true.

%%============================================================================================
%% Streamers: send sequenced messages until told to stop

%% Opts: key (default {node(), Id}), counters (atomics of at least ?ERR_OFFSET + Id: the last
%% accepted seq is put at index Id, the count of sends not `ok' at ?ERR_OFFSET + Id), send_opts ([] | [nosuspend]), sizes (mixed | small | {fixed, N}),
%% pause_every (messages between pauses, default 20), pause_ms (default 1),
%% retry_ms (after an error, default 20).
start_streamer(Id, Dest, Opts) ->
    Parent = self(),
    spawn_link(fun() -> streamer_init(Parent, Id, Dest, Opts) end).

streamer_init(Parent, Id, Dest, Opts) ->
    rand:seed(exsss, {Id, erlang:unique_integer([positive]), 3}),
    St = #{parent => Parent, id => Id, dest => Dest, blob => blob(),
           key => maps:get(key, Opts, {node(), Id}),
           counters => maps:get(counters, Opts, undefined),
           send_opts => maps:get(send_opts, Opts, []),
           sizes => maps:get(sizes, Opts, mixed),
           pause_every => maps:get(pause_every, Opts, 20),
           pause_ms => maps:get(pause_ms, Opts, 1),
           retry_ms => maps:get(retry_ms, Opts, 20),
           seq => 0, bytes => 0, attempts => 0, results => #{},
           first_error => undefined, last_error => undefined, resumed => undefined,
           failing => false, max_send_us => 0,
           started_at => wall_ms()},
    streamer_loop(St).

streamer_loop(St) ->
    receive
        stop -> streamer_finish(St)
    after 0 ->
            streamer_loop(streamer_step(St))
    end.

streamer_step(St = #{dest := Dest, key := Key, seq := Seq, blob := Blob, sizes := Sizes,
                     send_opts := SendOpts, attempts := Att}) ->
    Size = case Sizes of
               mixed -> msg_size();
               small -> 100 + rand:uniform(400);
               {fixed, N} -> N
           end,
    Msg = msg(Key, Seq + 1, Blob, Size),
    T0 = erlang:monotonic_time(microsecond),
    Result = teleport:send(Dest, Msg, SendOpts),
    Us = erlang:monotonic_time(microsecond) - T0,
    St1 = St#{attempts := Att + 1, max_send_us := max(Us, maps:get(max_send_us, St)),
              results := maps:update_with(result_tag(Result), fun(C) -> C + 1 end, 1,
                                          maps:get(results, St))},
    case Result of
        ok ->
            St2 = St1#{seq := Seq + 1, bytes := maps:get(bytes, St) + Size, failing := false},
            St3 = case maps:get(failing, St) of
                      true ->
                          Resumed = {Seq + 1, wall_ms()},
                          maps:get(parent, St) ! {stream_event, maps:get(id, St), resumed, Resumed},
                          St2#{resumed := Resumed};
                      false -> St2
                  end,
            case maps:get(counters, St) of
                undefined -> ok;
                Ctr -> atomics:put(Ctr, maps:get(id, St), Seq + 1)
            end,
            maybe_pause(St3),
            St3;
        Other ->
            Now = wall_ms(),
            St2 = St1#{failing := true, last_error := {Now, Seq, Other}},
            St3 = case maps:get(first_error, St) of
                      undefined ->
                          maps:get(parent, St) ! {stream_event, maps:get(id, St), first_error,
                                                  {Now, Seq, Other}},
                          St2#{first_error := {Now, Seq, Other}};
                      _ -> St2
                  end,
            case maps:get(counters, St) of
                undefined -> ok;
                Ctr2 -> atomics:add(Ctr2, ?ERR_OFFSET + maps:get(id, St), 1)
            end,
            timer:sleep(maps:get(retry_ms, St)),
            St3
    end.

result_tag({error, R}) -> R;
result_tag(R) -> R.

maybe_pause(#{pause_every := Every, pause_ms := Ms, seq := Seq}) ->
    case Seq rem Every of
        0 -> timer:sleep(Ms);
        _ -> ok
    end.

%% The done marker rides the same pair, so it arrives after everything the pair delivered.
streamer_finish(St = #{parent := Parent, id := Id, dest := Dest, key := Key, seq := Seq}) ->
    Marker = send_marker(Dest, {soak_done, Key, Seq}, now_ms() + 5000),
    Report = maps:without([blob, parent, counters, dest], St#{marker => Marker}),
    Parent ! {stream_report, Id, Report},
    ok.

send_marker(Dest, Msg, Deadline) ->
    case teleport:send(Dest, Msg) of
        ok -> ok;
        Error ->
            case now_ms() > Deadline of
                true -> Error;
                false -> timer:sleep(50), send_marker(Dest, Msg, Deadline)
            end
    end.

%% Stops streamers and collects their reports: #{Id => Report}.
stop_streamers(Streamers, Timeout) ->
    [Pid ! stop || {_Id, Pid} <- Streamers],
    maps:from_list(
      [receive {stream_report, Id, R} -> unlink(Pid), {Id, R}
       after Timeout -> error({streamer_stuck, Id})
       end || {Id, Pid} <- Streamers]).

%%============================================================================================
%% Callers: gs_call in a loop

%% Records, with wall-clock times, how each call ended.
start_caller(Id, Dest, Req, Timeout, ReportTo) ->
    spawn(fun() -> caller_loop(#{id => Id, dest => Dest, req => Req, timeout => Timeout,
                                 report_to => ReportTo, oks => 0, exits => [],
                                 oks_after_exit => 0}) end).

caller_loop(St = #{dest := Dest, req := Req, timeout := Timeout}) ->
    receive
        stop ->
            maps:get(report_to, St) ! {caller_report, maps:get(id, St), node(),
                                       St#{exits := lists:reverse(maps:get(exits, St))}}
    after 0 ->
            T0 = wall_ms(),
            St1 = try teleport:gs_call(Dest, Req, Timeout) of
                      _ ->
                          case maps:get(exits, St) of
                              [] -> St#{oks := maps:get(oks, St) + 1};
                              _ ->
                                  case maps:get(oks_after_exit, St) of
                                      0 -> maps:get(report_to, St) !
                                               {caller_event, maps:get(id, St), resumed, wall_ms()};
                                      _ -> ok
                                  end,
                                  St#{oks_after_exit := maps:get(oks_after_exit, St) + 1}
                          end
                  catch
                      exit:{Reason, _} ->
                          Now = wall_ms(),
                          Exits = maps:get(exits, St),
                          %% Keep the first exit of each kind in a row, not every retry.
                          Kind = exit_kind(Reason),
                          Exits1 = case Exits of
                                       [{_, _, K} | _] when K =:= Kind -> Exits;
                                       _ ->
                                           Info = {Now, Now - T0, Kind},
                                           maps:get(report_to, St) !
                                               {caller_event, maps:get(id, St), exit, Info},
                                           [Info | Exits]
                                   end,
                          timer:sleep(20),
                          St#{exits := Exits1}
                  end,
            caller_loop(St1)
    end.

%% One call, reported with how long it took: {one_call, Tag, Ms, {ok, Reply} | {exit, Kind}}.
one_call(Tag, Dest, Req, Timeout, ReportTo) ->
    spawn(fun() ->
                  T0 = wall_ms(),
                  R = try teleport:gs_call(Dest, Req, Timeout) of
                          Reply -> {ok, Reply}
                      catch
                          exit:{Reason, _} -> {exit, exit_kind(Reason)}
                      end,
                  ReportTo ! {one_call, Tag, T0, wall_ms() - T0, R}
          end).

exit_kind({nodedown, _}) -> nodedown;
exit_kind(R) when is_atom(R) -> R;
exit_kind(R) -> R.

%%============================================================================================
%% The soak: 8 senders on each sender node -> the receivers on one node

%% Peer side: starts Count senders; each sends N messages spread at random over Rxs
%% (each {Name, Node}), one sequence per receiver, then a done marker to each receiver,
%% then tells Ctl.
start_senders(Ctl, Round, Count, Rxs, N) ->
    Blob = blob(),
    [spawn(fun() ->
                   rand:seed(exsss, {Round, Id, erlang:phash2(node())}),
                   soak_sender(Ctl, Id, list_to_tuple(Rxs), N, Blob)
           end) || Id <- lists:seq(1, Count)].

soak_sender(Ctl, Id, Rxs, N, Blob) ->
    receive go -> ok end,
    K = tuple_size(Rxs),
    Key = {node(), Id},
    T0 = now_ms(),
    {Seqs, Bytes, Errors} = soak_send(Rxs, K, Key, Blob, N, erlang:make_tuple(K, 0), 0, 0),
    T1 = now_ms(),
    [ok = teleport:send(element(I, Rxs), {soak_done, Key, element(I, Seqs)})
     || I <- lists:seq(1, K)],
    Ctl ! {soak_sender_done, Key, N, Bytes, Errors, T1 - T0}.

soak_send(_Rxs, _K, _Key, _Blob, 0, Seqs, Bytes, Errors) ->
    {Seqs, Bytes, Errors};
soak_send(Rxs, K, Key, Blob, Left, Seqs, Bytes, Errors) ->
    I = rand:uniform(K),
    Seq = element(I, Seqs) + 1,
    Size = msg_size(),
    case teleport:send(element(I, Rxs), msg(Key, Seq, Blob, Size)) of
        ok ->
            case rand:uniform(500) of
                1 -> timer:sleep(rand:uniform(3));
                _ -> ok
            end,
            soak_send(Rxs, K, Key, Blob, Left - 1, setelement(I, Seqs, Seq), Bytes + Size,
                      Errors);
        _Error ->
            %% Not expected while every node is up: counted, retried.
            timer:sleep(10),
            soak_send(Rxs, K, Key, Blob, Left, Seqs, Bytes, Errors + 1)
    end.

%% Ctx: #{senders := [{Peer, Node, OsPid}], receiver := {Peer, Node, OsPid},
%%        rx_names := [atom()], per_node := pos_integer()}.
%% Runs one round of N messages per sender; returns its figures and verdict.
round(Ctx = #{senders := Senders, receiver := {RP, RNode, _}, rx_names := Names}, Round, N) ->
    PerNode = maps:get(per_node, Ctx, 8),
    [ok = peer:call(RP, ?MODULE, soak_rx_reset, [Name]) || Name <- Names],
    Rxs = [{Name, RNode} || Name <- Names],
    Pids = lists:append([peer:call(P, ?MODULE, start_senders, [self(), Round, PerNode, Rxs, N])
                         || {P, _, _} <- Senders]),
    T0 = now_ms(),
    [Pid ! go || Pid <- Pids],
    NSenders = length(Pids),
    Timeout = max(120000, N div 50),
    Done = [receive {soak_sender_done, Key, Sent, Bytes, Errors, Ms} -> {Key, Sent, Bytes, Errors, Ms}
            after Timeout -> error({soak_senders_stuck, Round})
            end || _ <- lists:seq(1, NSenders)],
    T1 = now_ms(),
    ExpectKeys = NSenders * length(Names),
    Reports = wait_reports(RP, Names, ExpectKeys, now_ms() + 120000),
    T2 = now_ms(),
    Entries = lists:append([maps:to_list(R) || R <- Reports]),
    Received = lists:sum([C || {_, {_, C, _, _, _, _}} <- Entries]),
    RxBytes = lists:sum([B || {_, {_, _, B, _, _, _}} <- Entries]),
    OutOfSeq = lists:sum([Bad || {_, {_, _, _, Bad, _, _}} <- Entries]),
    Corrupt = lists:sum([Cor || {_, {_, _, _, _, Cor, _}} <- Entries]),
    Missing = lists:sum([max(0, D - C) || {_, {_, C, _, _, _, D}} <- Entries, is_integer(D)]),
    Surplus = lists:sum([max(0, C - D) || {_, {_, C, _, _, _, D}} <- Entries, is_integer(D)]),
    NotDone = length([K || {K, {_, _, _, _, _, undefined}} <- Entries])
        + max(0, ExpectKeys - length(Entries)),
    Sent = lists:sum([S || {_, S, _, _, _} <- Done]),
    SentBytes = lists:sum([B || {_, _, B, _, _} <- Done]),
    Errors = lists:sum([E || {_, _, _, E, _} <- Done]),
    #{round => Round, sent => Sent, sent_bytes => SentBytes, received => Received,
      received_bytes => RxBytes, out_of_sequence => OutOfSeq, corrupt => Corrupt,
      missing => Missing, surplus => Surplus, not_done => NotDone, send_errors => Errors,
      send_ms => T1 - T0, total_ms => T2 - T0,
      ok => Sent =:= Received andalso SentBytes =:= RxBytes andalso OutOfSeq =:= 0
          andalso Corrupt =:= 0 andalso Missing =:= 0 andalso Surplus =:= 0
          andalso NotDone =:= 0 andalso Errors =:= 0}.

%% Polls the receivers until every sender's done marker reached each of them.
wait_reports(RP, Names, ExpectKeys, Deadline) ->
    Reports = [peer:call(RP, ?MODULE, soak_rx_report, [Name], 30000) || Name <- Names],
    Keys = lists:sum([map_size(R) || R <- Reports]),
    AllDone = lists:all(fun(R) -> lists:all(fun({_, _, _, _, _, D}) -> D =/= undefined end,
                                            maps:values(R))
                        end, Reports),
    case (Keys >= ExpectKeys andalso AllDone) orelse now_ms() > Deadline of
        true -> Reports;
        false -> timer:sleep(200), wait_reports(RP, Names, ExpectKeys, Deadline)
    end.

%% Samples the VmRSS of each {Label, OsPid} every Ms; stop with stop_sampler/1.
start_sampler(Targets, Ms) ->
    T0 = now_ms(),
    spawn_link(fun() -> sampler_loop(Targets, Ms, T0, []) end).

sampler_loop(Targets, Ms, T0, Acc) ->
    Sample = {now_ms() - T0, [{L, rss_kb(P)} || {L, P} <- Targets]},
    receive
        {stop, From, Ref} -> From ! {Ref, lists:reverse([Sample | Acc])}
    after Ms ->
            sampler_loop(Targets, Ms, T0, [Sample | Acc])
    end.

stop_sampler(Pid) ->
    Ref = make_ref(),
    Pid ! {stop, self(), Ref},
    receive {Ref, Samples} -> unlink(Pid), Samples after 10000 -> [] end.

%% Flatness: samples after WarmupMs; the median of the last third within Tolerance of the
%% first third's. Returns [{Label, FirstMedianKb, LastMedianKb, Ratio, Ok}].
rss_verdict(Samples, WarmupMs, Tolerance) ->
    After = [S || {T, _} = S <- Samples, T >= WarmupMs],
    Labels = case Samples of [{_, L} | _] -> [Lbl || {Lbl, _} <- L]; [] -> [] end,
    Third = length(After) div 3,
    [begin
         Series = [proplists:get_value(Label, Vs) || {_, Vs} <- After],
         First = median(lists:sublist(Series, max(1, Third))),
         Last = median(lists:nthtail(length(Series) - max(1, Third), Series)),
         Ratio = Last / max(1, First),
         {Label, First, Last, Ratio, Third >= 1 andalso Ratio =< 1 + Tolerance}
     end || Label <- Labels, length(After) >= 3].

%%============================================================================================
%% make soak

main() ->
    Minutes = env_int("SOAK_MINUTES", 2),
    N = env_int("SOAK_MSGS", 200000),
    SampleMs = env_int("SOAK_SAMPLE_MS", 3000),
    KillEvery = env_int("SOAK_KILL_EVERY_S", 0),
    _ = teleport_test_util:start_distribution("soak_ctl_"),
    io:format("soak: 2 sender nodes x 8 senders x ~b messages per round (100 B..1 MB, mostly "
              "small) to 4 receivers on a third node, for ~b min~s~n",
              [N, Minutes, case KillEvery of
                               0 -> "";
                               _ -> io_lib:format("; the receiver's teleport sockets killed "
                                                  "(ss -K) every ~b s", [KillEvery])
                           end]),
    Started = [begin
                   {ok, S} = teleport_test_util:start_peer(#{prefix => Name,
                                                             setup => setup_for(Name)}),
                   S
               end || Name <- [soak_s1, soak_s2, soak_rx]],
    try
        soak(Started, Minutes, N, SampleMs, KillEvery)
    after
        teleport_test_util:stop_peers(Started)
    end.

setup_for(soak_rx) -> [{?MODULE, start_soak_rx, [Name]} || Name <- rx_names()];
setup_for(_) -> [{?MODULE, blob, []}].

rx_names() -> [soak_rx_1, soak_rx_2, soak_rx_3, soak_rx_4].

soak([S1, S2, R], Minutes, N, SampleMs, KillEvery) ->
    Ctx = #{senders => [S1, S2], receiver => R, rx_names => rx_names(), per_node => 8},
    Labels = [{node_label(Node), OsPid} || {_, Node, OsPid} <- [S1, S2, R]],
    %% Warm-up round (small, not counted): pools up, code loaded, allocators primed.
    W = round(Ctx, 0, 2000),
    io:format("warm-up round: ~s~n", [round_line(W)]),
    Sampler = start_sampler(Labels, SampleMs),
    {RP, _, _} = R,
    {ok, RxPort} = peer:call(RP, teleport_server, listen_port, []),
    Killer = start_killer(RxPort, KillEvery),
    T0 = now_ms(),
    Deadline = T0 + Minutes * 60000,
    Rounds = soak_rounds(Ctx, 1, N, Deadline, []),
    Elapsed = now_ms() - T0,
    Kills = stop_killer(Killer),
    Samples = stop_sampler(Sampler),
    io:format("~nsocket kills: ~p~n", [Kills]),
    Msgs = lists:sum([maps:get(received, R1) || R1 <- Rounds]),
    Bytes = lists:sum([maps:get(received_bytes, R1) || R1 <- Rounds]),
    AllOk = lists:all(fun(R1) -> maps:get(ok, R1) end, Rounds),
    io:format("~ntotals: ~b rounds, ~b messages, ~.2f GB in ~.1f s: ~b msgs/s, ~.1f MB/s; "
              "lost/duplicated/out of sequence/corrupt: ~b/~b/~b/~b~n",
              [length(Rounds), Msgs, Bytes / 1.0e9, Elapsed / 1000, Msgs * 1000 div max(1, Elapsed),
               Bytes / 1.0e6 / (Elapsed / 1000),
               lists:sum([maps:get(missing, R1) || R1 <- Rounds]),
               lists:sum([maps:get(surplus, R1) || R1 <- Rounds]),
               lists:sum([maps:get(out_of_sequence, R1) || R1 <- Rounds]),
               lists:sum([maps:get(corrupt, R1) || R1 <- Rounds])]),
    io:format("~nVmRSS samples (MB), every ~b ms:~n~8s ~s~n", [SampleMs, "t (s)",
              lists:join(" ", [io_lib:format("~12s", [L]) || {L, _} <- Labels])]),
    [io:format("~8.1f ~s~n", [T / 1000, lists:join(" ", [io_lib:format("~12.1f", [Kb / 1024])
                                                     || {_, Kb} <- Vs])])
     || {T, Vs} <- Samples],
    %% Warm-up: the first round, or the first fifth of the run, whichever is longer.
    Warmup = max(case Rounds of [R1 | _] -> maps:get(total_ms, R1); [] -> 0 end div 2,
                 Elapsed div 5),
    Verdict = rss_verdict(Samples, Warmup, 0.20),
    io:format("~nRSS after ~.1f s of warm-up, median of the first third -> last third:~n",
              [Warmup / 1000]),
    [io:format("  ~-12s ~8.1f MB -> ~8.1f MB (x~.3f) ~s~n",
               [L, F / 1024, La / 1024, Ratio, case Ok of true -> "flat"; false -> "GROWING" end])
     || {L, F, La, Ratio, Ok} <- Verdict],
    RssOk = Verdict =/= [] andalso lists:all(fun({_, _, _, _, Ok}) -> Ok end, Verdict),
    case AllOk andalso RssOk of
        true -> io:format("~nsoak: PASSED~n"), ok;
        false -> io:format("~nsoak: FAILED (delivery ok: ~p, RSS flat: ~p)~n", [AllOk, RssOk]),
                 error(soak_failed)
    end.

%% Every Seconds (0: never), destroys the teleport connections to the receiver's listener on
%% Port with `ss -K' (needs root), alternately from the receiver's end and the senders'.
%% Stop it with stop_killer/1, which returns [{SecondsIn, Side, SocketsDestroyed}].
start_killer(_Port, 0) ->
    none;
start_killer(Port, Seconds) ->
    T0 = now_ms(),
    spawn_link(fun() -> killer_loop(Port, Seconds * 1000, T0, receiver, []) end).

killer_loop(Port, Ms, T0, Side, Acc) ->
    receive
        {stop, From, Ref} -> From ! {Ref, lists:reverse(Acc)}
    after Ms ->
            Filter = case Side of
                         receiver -> io_lib:format("sport = :~b", [Port]);
                         sender -> io_lib:format("dport = :~b", [Port])
                     end,
            Out = os:cmd(lists:flatten(["ss -K -tn '", Filter, "' 2>&1"])),
            Killed = length([L || L <- string:split(Out, "\n", all),
                                  string:prefix(L, "ESTAB") =/= nomatch]),
            Next = case Side of receiver -> sender; sender -> receiver end,
            killer_loop(Port, Ms, T0, Next, [{(now_ms() - T0) div 1000, Side, Killed} | Acc])
    end.

stop_killer(none) ->
    [];
stop_killer(Pid) ->
    Ref = make_ref(),
    Pid ! {stop, self(), Ref},
    receive {Ref, Kills} -> unlink(Pid), Kills after 10000 -> [] end.

soak_rounds(Ctx, I, N, Deadline, Acc) ->
    case now_ms() >= Deadline andalso Acc =/= [] of
        true ->
            lists:reverse(Acc);
        false ->
            R = round(Ctx, I, N),
            io:format("round ~b: ~s~n", [I, round_line(R)]),
            soak_rounds(Ctx, I + 1, N, Deadline, [R | Acc])
    end.

round_line(R = #{sent := Sent, received := Rx, received_bytes := B, total_ms := Ms}) ->
    io_lib:format("~b sent, ~b received, ~.1f MB in ~.1f s (~b msgs/s, ~.1f MB/s); "
                  "missing ~b, surplus ~b, out of sequence ~b, corrupt ~b, not done ~b, "
                  "send errors ~b: ~s",
                  [Sent, Rx, B / 1.0e6, Ms / 1000, Rx * 1000 div max(1, Ms),
                   B / 1.0e6 / max(0.001, Ms / 1000),
                   maps:get(missing, R), maps:get(surplus, R), maps:get(out_of_sequence, R),
                   maps:get(corrupt, R), maps:get(not_done, R), maps:get(send_errors, R),
                   case maps:get(ok, R) of true -> "ok"; false -> "FAILED" end]).

node_label(Node) ->
    [Name | _] = string:split(atom_to_list(Node), "@"),
    %% peer:random_name gives soak_s1-123-456: keep the prefix.
    hd(string:split(Name, "-")).
