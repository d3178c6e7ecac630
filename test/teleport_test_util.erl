%% Helpers shared by the test suites: a raw teleport dialer written from the wire protocol
%% (to test the listener from outside), and a message collector to run on peer nodes.
-module(teleport_test_util).

-export([raw_dial/3, start_collector/1, collected/3, ask/1]).

%% The dialer's side of the handshake (native/teleport_core/src/handshake.rs), as node `Me'
%% with cookie `Cookie', against the listener of this node on `Port':
%% {ok, Socket} (in {packet, 2}) | {rejected, Code, closed | Other} | {unexpected, Term}.
raw_dial(Port, Me, Cookie) ->
    {ok, S} = gen_tcp:connect({127, 0, 0, 1}, Port,
                              [binary, {active, false}, {packet, 2}, {nodelay, true}]),
    NonceD = crypto:strong_rand_bytes(32),
    ok = gen_tcp:send(S, <<"HTLPT", 1, (byte_size(Me)):8, Me/binary, NonceD/binary>>),
    Acceptor = atom_to_binary(node(), utf8),
    case gen_tcp:recv(S, 0, 5000) of
        {ok, <<"C", L:8, Acceptor:L/binary, NonceA:32/binary>>} ->
            Names = <<(byte_size(Me)):8, Me/binary, (byte_size(Acceptor)):8, Acceptor/binary>>,
            MacD = crypto:mac(hmac, sha256, Cookie,
                              [<<"teleport-dial", 0, 0, 0>>, NonceA, NonceD, Names]),
            ok = gen_tcp:send(S, <<"A", MacD/binary>>),
            MacA = crypto:mac(hmac, sha256, Cookie,
                              [<<"teleport-accept", 0>>, NonceD, NonceA, Names]),
            case gen_tcp:recv(S, 0, 5000) of
                {ok, <<"K", MacA/binary>>} -> {ok, S};
                {ok, <<"R", Code>>} -> {rejected, Code, after_reject(S)};
                Other -> gen_tcp:close(S), {unexpected, Other}
            end;
        {ok, <<"R", Code>>} ->
            {rejected, Code, after_reject(S)};
        Other ->
            gen_tcp:close(S),
            {unexpected, Other}
    end.

after_reject(S) ->
    R = case gen_tcp:recv(S, 0, 5000) of
            {error, closed} -> closed;
            Other -> Other
        end,
    gen_tcp:close(S),
    R.

%% A process registered as `Name' that keeps every message it gets (run it on a peer with
%% peer:call(Peer, teleport_test_util, start_collector, [Name])).
start_collector(Name) ->
    Pid = spawn(fun() -> collector([]) end),
    true = register(Name, Pid),
    Pid.

collector(Acc) ->
    receive
        {'$get', From} -> From ! {collected, lists:reverse(Acc)}, collector(Acc);
        Msg -> collector([Msg | Acc])
    end.

%% What the collector on `Peer' got, once it has at least `N' messages (or after 5 s).
collected(Peer, Collector, N) ->
    Deadline = erlang:monotonic_time(millisecond) + 5000,
    collected(Peer, Collector, N, Deadline).

collected(Peer, Collector, N, Deadline) ->
    Got = peer:call(Peer, ?MODULE, ask, [Collector]),
    case length(Got) >= N orelse erlang:monotonic_time(millisecond) > Deadline of
        true -> Got;
        false -> timer:sleep(20), collected(Peer, Collector, N, Deadline)
    end.

ask(Pid) ->
    Pid ! {'$get', self()},
    receive {collected, Got} -> Got after 5000 -> error(timeout) end.
