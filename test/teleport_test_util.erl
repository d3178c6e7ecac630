%% Helpers shared by the test suites: a raw teleport dialer written from the wire protocol
%% (to test the listener from outside), and a message collector to run on peer nodes.
-module(teleport_test_util).

-export([start_distribution/1, stop_distribution/1]).
-export([raw_dial/3, start_collector/1, collected/3, ask/1]).

%% Makes the test runner a distributed node named `Prefix' ++ its OS pid (unique, in case
%% another run is going on), unless it already is one. Returns whether it started
%% distribution, for stop_distribution/1. A clean CI machine has no epmd running, and
%% net_kernel:start/1 (unlike `erl -sname') does not start one: start it here and retry
%% while the freshly forked daemon is not listening yet.
-spec start_distribution(string()) -> boolean().
start_distribution(Prefix) ->
    case node() of
        nonode@nohost ->
            _ = os:cmd("epmd -daemon"),
            Name = list_to_atom(Prefix ++ os:getpid()),
            ok = start_net_kernel(Name, 50),
            true;
        _ ->
            false
    end.

start_net_kernel(Name, Tries) ->
    case net_kernel:start([Name, shortnames]) of
        {ok, _} -> ok;
        {error, _} when Tries > 1 -> timer:sleep(100), start_net_kernel(Name, Tries - 1);
        {error, Reason} -> error({no_distribution, Reason})
    end.

-spec stop_distribution(boolean()) -> ok.
stop_distribution(true) -> _ = net_kernel:stop(), ok;
stop_distribution(false) -> ok.

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
