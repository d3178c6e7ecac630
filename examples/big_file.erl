%% @doc The example of `examples/big_file.sh': node A sends a big file to node B over
%% teleport (and then, for comparison, over distributed Erlang) while a process on A pings
%% B over distributed Erlang every 50 ms. It prints each chunk as it goes, the throughput,
%% and the ping's latencies: idle, during the teleport transfer, during the disterl one.
%%
%% Node B runs `receiver/1': a process registered as `big_file_rx' writes what it receives
%% to a file and hashes it, and one registered as `big_file_echo' answers pings.
%% Node A runs `sender/4', with `stats_reporter' (examples/stats_reporter.erl) logging what
%% teleport counted after each transfer. Both nodes run teleport.
-module(big_file).

-export([receiver/1, sender/4]).

-define(PING_EVERY, 50).

%%--------------------------------------------------------------------------------------------
%% Node B

%% @doc Runs node B: writes each file it is sent to `OutFile' (overwriting the previous one)
%% and answers with its size and SHA-256. Halts the node when told `stop'.
-spec receiver(file:filename()) -> no_return().
receiver(OutFile) ->
    ok = teleport:start(),
    register(big_file_echo, spawn_link(fun echo/0)),
    register(big_file_rx, self()),
    receive_file(OutFile, undefined).

receive_file(OutFile, State) ->
    receive
        {start, Transport} ->
            {ok, Fd} = file:open(OutFile, [write, raw, binary]),
            receive_file(OutFile, {Transport, Fd, crypto:hash_init(sha256), 0});
        {chunk, Bin} ->
            {Transport, Fd, Hash, Bytes} = State,
            ok = file:write(Fd, Bin),
            receive_file(OutFile, {Transport, Fd, crypto:hash_update(Hash, Bin),
                                   Bytes + byte_size(Bin)});
        {done, From} ->
            {Transport, Fd, Hash, Bytes} = State,
            ok = file:close(Fd),
            reply(Transport, From, {received, Bytes, crypto:hash_final(Hash)}),
            receive_file(OutFile, undefined);
        stop ->
            erlang:halt(0)
    end.

%% The answer goes back the way the file came.
reply(teleport, From, Msg) -> ok = teleport:send(From, Msg);
reply(disterl, From, Msg) -> From ! Msg, ok.

%% Answers pings over distributed Erlang.
echo() ->
    receive
        {ping, From, T0} -> From ! {pong, T0}
    end,
    echo().

%%--------------------------------------------------------------------------------------------
%% Node A

%% @doc Runs node A: sends `File' to node `BName' (on this host) in messages of
%% `ChunkBytes', over `teleport', `disterl' or `both' (one after the other), while pinging
%% B over distributed Erlang; prints as it goes, then halts (status 1 if a copy differs).
-spec sender(string(), file:filename(), pos_integer(), teleport | disterl | both) ->
          no_return().
sender(BName, File, ChunkBytes, Mode) ->
    [_, Host] = string:split(atom_to_list(node()), "@"),
    B = list_to_atom(BName ++ "@" ++ Host),
    ok = teleport:start(),
    wait_for(B, 20000),
    Size = filelib:file_size(File),
    Hash = file_hash(File),
    io:format("~s: ~s, sha256 ~s, in messages of ~s~n",
              [File, mb(Size), hex(Hash), mb(min(ChunkBytes, Size))]),
    %% The pool to B opens on the first send; a round trip makes it ready.
    ok = teleport:send({big_file_rx, B}, {start, teleport}),
    ok = teleport:send({big_file_rx, B}, {done, self()}),
    receive {received, 0, _} -> ok after 10000 -> exit(no_answer_from_b) end,
    Pinger = spawn_link(fun() -> pinger(B) end),
    timer:sleep(1000),
    Idle = window(Pinger),
    io:format("disterl ping to ~s while idle: ~s~n", [B, latencies(Idle)]),
    %% teleport's counters after each transfer, one line per peer node. The `report' fun
    %% prints them in line with the rest; without it they would go to `logger'.
    Print = fun(Node, Delta) ->
                    {Format, Args} = stats_reporter:format_report(#{node => Node,
                                                                    delta => Delta}),
                    io:format("  " ++ Format ++ "~n", Args)
            end,
    {ok, _} = stats_reporter:start_link(#{interval => 60000, report => Print}),
    Transports = case Mode of
                     both -> [teleport, disterl];
                     _ -> [Mode]
                 end,
    Results = [{T, transfer(T, B, File, Size, ChunkBytes, Hash, Pinger)} || T <- Transports],
    io:format("~nsummary (~s in messages of ~s):~n", [mb(Size), mb(min(ChunkBytes, Size))]),
    io:format("  ~-9s ~10s   disterl ping p50 / p99 / max~n", ["", "MB/s"]),
    io:format("  ~-9s ~10s   ~s~n", [idle, "", percentiles(Idle)]),
    [io:format("  ~-9s ~10.1f   ~s~n", [T, Size / 1.0e6 / Secs, percentiles(Lat)])
     || {T, {_, Secs, Lat}} <- Results],
    {big_file_rx, B} ! stop,
    erlang:halt(case lists:all(fun({_, {Ok, _, _}}) -> Ok end, Results) of
                    true -> 0;
                    false -> 1
                end).

%% Sends the file once over `Transport' and waits for B's answer.
transfer(Transport, B, File, Size, ChunkBytes, Hash, Pinger) ->
    io:format("~nover ~s:~n", [Transport]),
    Send = fun(Msg) -> send(Transport, {big_file_rx, B}, Msg) end,
    Send({start, Transport}),
    _ = window(Pinger),
    T0 = erlang:monotonic_time(),
    {ok, Fd} = file:open(File, [read, raw, binary]),
    Chunks = (Size + ChunkBytes - 1) div ChunkBytes,
    Lat = send_chunks(Fd, Send, ChunkBytes, Size, 1, Chunks, 0, T0, Pinger, []),
    ok = file:close(Fd),
    Send({done, self()}),
    {Bytes, Got} = receive {received, N, H} -> {N, H} after 120000 -> exit(no_answer) end,
    Secs = seconds(T0),
    All = Lat ++ window(Pinger),
    Ok = Bytes =:= Size andalso Got =:= Hash,
    io:format("  B received ~s in ~.2f s: ~.1f MB/s; sha256 ~s; disterl ping ~s~n",
              [mb(Bytes), Secs, Bytes / 1.0e6 / Secs,
               case Ok of true -> "ok"; false -> "DIFFERS: " ++ hex(Got) end,
               latencies(All)]),
    ok = stats_reporter:report_now(stats_reporter),
    {Ok, Secs, All}.

send_chunks(Fd, Send, ChunkBytes, Size, I, N, Sent, T0, Pinger, Acc) ->
    case file:read(Fd, ChunkBytes) of
        eof ->
            Acc;
        {ok, Bin} ->
            Send({chunk, Bin}),
            Sent1 = Sent + byte_size(Bin),
            Lat = window(Pinger),
            io:format("  chunk ~b/~b handed over, ~s of ~s, ~.1f MB/s; disterl ping ~s~n",
                      [I, N, mb(Sent1), mb(Size), Sent1 / 1.0e6 / seconds(T0),
                       latencies(Lat)]),
            send_chunks(Fd, Send, ChunkBytes, Size, I + 1, N, Sent1, T0, Pinger, Acc ++ Lat)
    end.

send(teleport, Dest, Msg) -> ok = teleport:send(Dest, Msg);
send(disterl, Dest, Msg) -> Dest ! Msg, ok.

%% Pings B's echo over distributed Erlang, 50 ms after each answer; `window' returns the
%% latencies (ms) since the last `window'.
pinger(B) ->
    self() ! tick,
    pinger(B, []).

pinger(B, Window) ->
    receive
        tick ->
            {big_file_echo, B} ! {ping, self(), erlang:monotonic_time(microsecond)},
            pinger(B, Window);
        {pong, T0} ->
            erlang:send_after(?PING_EVERY, self(), tick),
            Ms = (erlang:monotonic_time(microsecond) - T0) / 1000,
            pinger(B, [Ms | Window]);
        {window, From} ->
            From ! {window, lists:reverse(Window)},
            pinger(B, [])
    end.

window(Pinger) ->
    Pinger ! {window, self()},
    receive {window, W} -> W end.

wait_for(B, Left) when Left =< 0 ->
    exit({no_node, B});
wait_for(B, Left) ->
    case net_adm:ping(B) =:= pong andalso is_pid(rpc:call(B, erlang, whereis, [big_file_rx])) of
        true -> ok;
        false -> timer:sleep(100), wait_for(B, Left - 100)
    end.

file_hash(File) ->
    {ok, Fd} = file:open(File, [read, raw, binary]),
    H = file_hash(Fd, crypto:hash_init(sha256)),
    ok = file:close(Fd),
    H.

file_hash(Fd, H) ->
    case file:read(Fd, 1 bsl 22) of
        {ok, Bin} -> file_hash(Fd, crypto:hash_update(H, Bin));
        eof -> crypto:hash_final(H)
    end.

latencies([]) -> "n=0";
latencies(L) -> io_lib:format("n=~b max ~.1f ms", [length(L), lists:max(L)]).

percentiles([]) -> "-";
percentiles(L) ->
    S = lists:sort(L),
    P = fun(Q) -> lists:nth(max(1, ceil(Q * length(S))), S) end,
    io_lib:format("~.1f / ~.1f / ~.1f ms (n=~b)", [P(0.5), P(0.99), lists:last(S), length(S)]).

seconds(T0) ->
    max(1.0e-6, erlang:convert_time_unit(erlang:monotonic_time() - T0, native, microsecond) / 1.0e6).

mb(Bytes) -> io_lib:format("~.1f MB", [Bytes / 1.0e6]).

hex(Bin) -> string:lowercase(binary_to_list(binary:part(binary:encode_hex(Bin), 0, 16))) ++ "...".
