%% Helpers shared by the test suites: a raw teleport dialer written from the wire protocol
%% (to test the listener from outside), and a message collector to run on peer nodes.
-module(teleport_test_util).

-export([start_distribution/1, stop_distribution/1, start_tables/1, restart_teleport/1,
         reset_teleport/0, stop_peers/1]).
-export([raw_dial/3, raw_frame/3, raw_frame/4, start_collector/1, collected/3, ask/1,
         forged_fun/0]).

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

%% Named public ETS tables ([{Name, Options}]) owned by a process that lives until sent
%% `stop': a suite's tables outlive init_per_suite's process (CT runs it in one of its own).
%% Returns the owner once the tables exist.
-spec start_tables([{atom(), [term()]}]) -> pid().
start_tables(Tables) ->
    Self = self(),
    Owner = spawn(fun() ->
                          [_ = ets:new(Name, [named_table, public | Opts]) || {Name, Opts} <- Tables],
                          Self ! {tables_ready, self()},
                          receive stop -> ok end
                  end),
    receive {tables_ready, Owner} -> Owner
    after 5000 -> error(tables_not_created)
    end.

%% Stops teleport on this node and clears its application environment.
-spec reset_teleport() -> ok.
reset_teleport() ->
    _ = teleport:stop(),
    [application:unset_env(teleport, K) || {K, _} <- application:get_all_env(teleport)],
    ok.

%% Restarts teleport on this node with exactly the application environment `Env'.
-spec restart_teleport([{atom(), term()}]) -> ok.
restart_teleport(Env) ->
    reset_teleport(),
    [ok = application:set_env(teleport, K, V) || {K, V} <- Env],
    ok = teleport:start(),
    {ok, Port} = teleport_server:listen_port(),
    ct:pal("~p: teleport on port ~b with env ~p", [node(), Port, Env]).

%% The dialer's side of the handshake (native/teleport_core/src/handshake.rs), version 3, as
%% node `Me' with cookie `Cookie', against the listener of this node on `Port'. It claims lane
%% 65535, which no pool uses (they have at most 1024 slots): were it a lane of `Me''s real
%% pool, the listener would take it for that slot's replacement connection (lanes.rs); and a
%% random session, so the lane starts at frame 1.
%% {ok, Socket} (in {packet, 2}) | {rejected, Code, closed | Other} | {unexpected, Term}.
raw_dial(Port, Me, Cookie) ->
    {ok, S} = gen_tcp:connect({127, 0, 0, 1}, Port,
                              [binary, {active, false}, {packet, 2}, {nodelay, true}]),
    NonceD = crypto:strong_rand_bytes(32),
    ok = gen_tcp:send(S, <<"HTLPT", 3, (byte_size(Me)):8, Me/binary, NonceD/binary>>),
    Acceptor = atom_to_binary(node(), utf8),
    case gen_tcp:recv(S, 0, 5000) of
        {ok, <<"C", L:8, Acceptor:L/binary, NonceA:32/binary>>} ->
            Names = <<(byte_size(Me)):8, Me/binary, (byte_size(Acceptor)):8, Acceptor/binary>>,
            LaneSession = <<65535:16, (crypto:strong_rand_bytes(8))/binary>>,
            MacD = crypto:mac(hmac, sha256, Cookie,
                              [<<"teleport-dial", 0, 0, 0>>, NonceA, NonceD, Names, LaneSession]),
            ok = gen_tcp:send(S, <<"A", MacD/binary, LaneSession/binary>>),
            case gen_tcp:recv(S, 0, 5000) of
                {ok, <<"K", MacA:32/binary, Told:20/binary>>} ->
                    MacA = crypto:mac(hmac, sha256, Cookie, [<<"teleport-accept", 0>>, NonceD,
                                                             NonceA, Names, Told]),
                    {ok, S};
                {ok, <<"R", Code>>} -> {rejected, Code, after_reject(S)};
                Other -> gen_tcp:close(S), {unexpected, Other}
            end;
        {ok, <<"R", Code>>} ->
            {rejected, Code, after_reject(S)};
        Other ->
            gen_tcp:close(S),
            {unexpected, Other}
    end.

%% Data frame number `Seq' (native/teleport_core/src/frame.rs; a connection's first is 1)
%% that sends `Msg' to `Dest', a pid or a name registered on the acceptor, length prefix
%% included.
raw_frame(Seq, Dest, Msg) when is_pid(Dest) ->
    raw_frame(Seq, 1, term_to_binary(Dest), term_to_binary(Msg));
raw_frame(Seq, Dest, Msg) when is_atom(Dest) ->
    raw_frame(Seq, 2, term_to_binary(Dest), term_to_binary(Msg)).

%% The same from its parts as they go on the wire, which need not be valid: the kind
%% (1: to a pid, 2: to a name), the encoded destination and the encoded message.
raw_frame(Seq, Kind, Dest, Term) ->
    Body = <<Kind, 0, (byte_size(Dest)):16, Seq:64, Dest/binary, Term/binary>>,
    <<(byte_size(Body)):32, Body/binary>>.

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

%% A fun in the external term format (version byte first) that OTP 25's binary_to_term/1
%% accepts although its creator is the integer 0, not a pid, and that crashes the VM once
%% encoded again: teleport must refuse it wherever untrusted bytes are decoded.
forged_fun() ->
    Body = <<0, 0:128, 0:32, 0:32, 119, 5, "lists", 97, 0, 97, 0, 97, 0>>,
    <<131, 112, (4 + byte_size(Body)):32, Body/binary>>.

%% Stops peers ([{Peer, Node}]) started with peer:start, collecting their cover data first
%% when cover runs.
-spec stop_peers([{pid(), node()}]) -> ok.
stop_peers(Peers) ->
    [begin
         ok = teleport_cover:peer_stopping(Node),
         catch peer:stop(Peer)
     end || {Peer, Node} <- Peers],
    ok.
