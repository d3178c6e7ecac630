%% Helpers shared by the test suites and `make soak': distribution and teleport on the
%% runner, the one peer starter (start_peer/1, for every suite and the soak; see "Peers"
%% below), the OS-level handling of a peer's process (SIGSTOP, SIGCONT, SIGKILL), a raw
%% teleport dialer written from the wire protocol (to test the listener from outside), and
%% a message collector to run on peer nodes.
-module(teleport_test_util).

-export([start_distribution/1, stop_distribution/1, start_tables/1, restart_teleport/1,
         reset_teleport/0]).
-export([start_peer/1, start_peer_retrying/2, start_peers/1, stop_peer/1, stop_peers/1,
         stop_os_process/1, continue_os_process/1, kill_os_process/1]).
-export([raw_dial/3, raw_frame/3, raw_frame/4, start_collector/1, collected/3, ask/1,
         forged_fun/0]).
-export([capture_logs/0, stop_capturing_logs/0, log/2, wait_log/1, wait_event/1, next_log/1]).

-export_type([peer_opts/0, started/0]).

%% What start_peer/1 returns: the `peer' process that controls the node, the node, and its
%% OS pid (as os:getpid/0 gives it there), for stop_os_process/1 and the like and for
%% reading its /proc entry.
-type started() :: {Peer :: pid(), Node :: node(), OsPid :: string()}.

%% Every key is optional; see start_peer/1 for what each does and its default.
-type peer_opts() :: #{name => atom() | string(),
                       prefix => atom() | string(),
                       env => [{atom(), term()}],
                       setup => [{module(), atom(), [term()]}],
                       teleport => boolean(),
                       args => [string()],
                       code_path => [file:filename()],
                       cover => boolean(),
                       connection => standard_io | distribution,
                       connect_all => boolean(),
                       link => boolean(),
                       on_start => fun((started()) -> term())}.

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

%%============================================================================================
%% Peers
%%
%% One starter for every suite and `make soak', so that what a peer is (its code, its
%% cookie, its cover registration, the order in which its setup and teleport start) is
%% decided in one place.

%% Starts a peer node with OTP's `peer' and prepares it, in this order:
%%   1. boot (`wait_boot' 30 s: several suites boot peers while others load the machine);
%%   2. its OS pid is read, and `on_start' (default: none) is called with the result, in
%%      the calling process: the suites record the peer there, so that it is stopped at the
%%      end of the test case whatever fails after this point;
%%   3. `cover' (default true): teleport_cover:peer_started/1, so that the cover-compiled
%%      modules are loaded before any of them runs there (a no-op unless cover runs);
%%   4. `env' (default []): teleport's application environment on the peer;
%%   5. `setup' (default []): {M, F, A} calls on the peer, before teleport starts, so that
%%      a receiver is registered before any teleport message can arrive (results ignored);
%%   6. `teleport' (default true): teleport:start() there.
%% The node is named `name' exactly, or else peer:random_name(`prefix') (default prefix
%% `peer'). Its command line: `-pa' `code_path' (default: this node's code path without the
%% OTP directories, which the peer has anyway; errors_SUITE gives a copy of teleport's ebin
%% without the NIF instead), this node's cookie, `-connect_all false' unless `connect_all'
%% (peers need no connections to each other), then `args' (default []).
%% `connection' (default standard_io) is how the `peer' process controls the node:
%% standard_io keeps control over the peer's stdin/stdout, so a peer that is SIGSTOPped,
%% killed or cut from the runner over disterl does not take the control channel with it,
%% and peer:call/4 does not connect disterl; `distribution' controls it over disterl (and
%% peer:call/4 then fails with noconnection: call such a node with erpc).
%% `link' (default false): peer:start_link/1 instead of peer:start/1, so the node goes
%% down with the calling process.
%% {ok, started()} | {error, Reason} if the node did not boot (a name still taken by a node
%% just killed, for instance: see start_peer_retrying/2). A step after the boot that fails
%% stops the node and raises the failure again.
-spec start_peer(peer_opts()) -> {ok, started()} | {error, term()}.
start_peer(Opts) ->
    Name = case Opts of
               #{name := N} -> N;
               #{} -> peer:random_name(maps:get(prefix, Opts, peer))
           end,
    ConnectAll = case maps:get(connect_all, Opts, false) of
                     true -> [];
                     false -> ["-connect_all", "false"]
                 end,
    Args = case maps:get(code_path, Opts, non_otp_paths()) of
               [] -> [];
               Paths -> ["-pa" | Paths]
           end ++ ["-setcookie", atom_to_list(erlang:get_cookie())] ++ ConnectAll
        ++ maps:get(args, Opts, []),
    PeerOpts0 = #{name => Name, args => Args, wait_boot => 30000},
    PeerOpts = case maps:get(connection, Opts, standard_io) of
                   standard_io -> PeerOpts0#{connection => standard_io};
                   distribution -> PeerOpts0
               end,
    Start = case maps:get(link, Opts, false) of
                true -> fun peer:start_link/1;
                false -> fun peer:start/1
            end,
    try Start(PeerOpts) of
        {ok, Peer, Node} -> {ok, prepare_peer(Peer, Node, Opts)};
        {error, Reason} -> {error, Reason}
    catch
        Class:Reason -> {error, {Class, Reason}}
    end.

%% The directories of this node's code path that are not OTP's: teleport's ebin and the
%% test modules (suites, helpers, calls_test_server), which the peers run too.
non_otp_paths() ->
    [D || D <- code:get_path(), not lists:prefix(code:root_dir(), D)].

%% Steps 2 to 6 of start_peer/1 on a booted node; on a failure the node is stopped, so that
%% no caller is left with a half-prepared peer it has no handle on.
prepare_peer(Peer, Node, Opts) ->
    Call = case maps:get(connection, Opts, standard_io) of
               standard_io -> fun(M, F, A) -> peer:call(Peer, M, F, A, 15000) end;
               distribution -> fun(M, F, A) -> erpc:call(Node, M, F, A, 15000) end
           end,
    OsPid = try Call(os, getpid, [])
            catch C:R:S -> _ = (catch peer:stop(Peer)), erlang:raise(C, R, S)
            end,
    Started = {Peer, Node, OsPid},
    try
        case maps:get(on_start, Opts, undefined) of
            undefined -> ok;
            Fun -> _ = Fun(Started)
        end,
        case maps:get(cover, Opts, true) of
            true -> ok = teleport_cover:peer_started(Node);
            false -> ok
        end,
        [ok = Call(application, set_env, [teleport, K, V])
         || {K, V} <- maps:get(env, Opts, [])],
        [_ = Call(M, F, A) || {M, F, A} <- maps:get(setup, Opts, [])],
        case maps:get(teleport, Opts, true) of
            true -> ok = Call(teleport, start, []);
            false -> ok
        end,
        Started
    catch
        Class:Reason:Stack ->
            stop_peer(Started),
            erlang:raise(Class, Reason, Stack)
    end.

%% start_peer/1 under the same name until it boots or Timeout ms have passed: a killed
%% node's name stays registered with epmd for a moment, and a test that restarts a node
%% under its old name must wait for that. {error, LastReason} after Timeout.
-spec start_peer_retrying(peer_opts(), non_neg_integer()) ->
          {ok, started()} | {error, term()}.
start_peer_retrying(Opts, Timeout) ->
    start_peer_retrying(Opts, erlang:monotonic_time(millisecond) + Timeout, undefined).

start_peer_retrying(Opts, Deadline, Last) ->
    case erlang:monotonic_time(millisecond) > Deadline of
        true ->
            {error, Last};
        false ->
            case start_peer(Opts) of
                {ok, _} = Ok -> Ok;
                {error, Reason} ->
                    timer:sleep(100),
                    start_peer_retrying(Opts, Deadline, Reason)
            end
    end.

%% start_peer/1 for each of OptsList at once (a boot takes about a second; ring_SUITE boots
%% several), each from a process of its own: `on_start' runs there, and `link' would tie
%% the node to that short-lived process, so it is refused. {ok, [started()]} in the order
%% of OptsList, or, if any failed, {error, Reason} of the first that failed with the others
%% stopped.
-spec start_peers([peer_opts()]) -> {ok, [started()]} | {error, term()}.
start_peers(OptsList) ->
    [error({badarg, link}) || #{link := true} <- OptsList],
    Workers = [spawn_monitor(fun() ->
                                     exit({started, try start_peer(Opts)
                                                    catch C:R:S -> {error, {C, R, S}}
                                                    end})
                             end) || Opts <- OptsList],
    Results = [receive
                   {'DOWN', MRef, process, Pid, {started, Result}} -> Result;
                   {'DOWN', MRef, process, Pid, Other} -> {error, Other}
               end || {Pid, MRef} <- Workers],
    case [R || {error, R} <- Results] of
        [] ->
            {ok, [S || {ok, S} <- Results]};
        [First | _] ->
            [stop_peer(S) || {ok, S} <- Results],
            {error, First}
    end.

%% Stops a peer whatever state it is in (SIGSTOPped, killed, running): SIGCONT first (a
%% stopped node cannot stop), its cover counts fetched (teleport_cover:peer_stopping/1),
%% peer:stop/1 given 10 s, then SIGKILL for a node that did not go. Stopping one twice does
%% no harm.
-spec stop_peer(started()) -> ok.
stop_peer({Peer, Node, OsPid}) ->
    continue_os_process(OsPid),
    ok = teleport_cover:peer_stopping(Node),
    {Pid, MRef} = spawn_monitor(fun() -> catch peer:stop(Peer) end),
    receive {'DOWN', MRef, process, Pid, _} -> ok
    after 10000 -> exit(Pid, kill)
    end,
    _ = os:cmd("kill -9 " ++ OsPid ++ " 2>/dev/null"),
    ok.

%% stop_peer/1 for each.
-spec stop_peers([started()]) -> ok.
stop_peers(Peers) ->
    lists:foreach(fun stop_peer/1, Peers).

%% SIGSTOP: the node is frozen as a hung host is, its sockets open and unread.
-spec stop_os_process(string()) -> ok.
stop_os_process(OsPid) ->
    _ = os:cmd("kill -STOP " ++ OsPid),
    ok.

%% SIGCONT: the frozen node runs again (silently nothing if it is gone).
-spec continue_os_process(string()) -> ok.
continue_os_process(OsPid) ->
    _ = os:cmd("kill -CONT " ++ OsPid ++ " 2>/dev/null"),
    ok.

%% SIGKILL: the node dies without closing anything itself (the kernel closes its sockets).
-spec kill_os_process(string()) -> ok.
kill_os_process(OsPid) ->
    _ = os:cmd("kill -9 " ++ OsPid),
    ok.

%%============================================================================================
%% The wire, from outside

%% The dialer's side of the handshake (native/teleport_core/src/handshake.rs), version 3, as
%% node `Me' with cookie `Cookie', against the listener of this node on `Port'. It claims lane
%% 65535, which no pool uses (they have at most 1024 slots): were it a lane of `Me''s real
%% pool, the listener would take it for that slot's replacement connection (lanes.rs); and a
%% random session, so the lane starts at frame 1.
%% {ok, Socket} (in {packet, 2}) | {rejected, Code, closed | Other} | {unexpected, Term}.
-spec raw_dial(inet:port_number(), binary(), iodata()) ->
          {ok, gen_tcp:socket()} | {rejected, byte(), term()} | {unexpected, term()}.
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
-spec raw_frame(pos_integer(), pid() | atom(), term()) -> binary().
raw_frame(Seq, Dest, Msg) when is_pid(Dest) ->
    raw_frame(Seq, 1, term_to_binary(Dest), term_to_binary(Msg));
raw_frame(Seq, Dest, Msg) when is_atom(Dest) ->
    raw_frame(Seq, 2, term_to_binary(Dest), term_to_binary(Msg)).

%% The same from its parts as they go on the wire, which need not be valid: the kind
%% (1: to a pid, 2: to a name), the encoded destination and the encoded message.
-spec raw_frame(non_neg_integer(), byte(), binary(), binary()) -> binary().
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
-spec start_collector(atom()) -> pid().
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
-spec collected(pid(), pid() | atom(), non_neg_integer()) -> [term()].
collected(Peer, Collector, N) ->
    Deadline = erlang:monotonic_time(millisecond) + 5000,
    collected(Peer, Collector, N, Deadline).

collected(Peer, Collector, N, Deadline) ->
    Got = peer:call(Peer, ?MODULE, ask, [Collector]),
    case length(Got) >= N orelse erlang:monotonic_time(millisecond) > Deadline of
        true -> Got;
        false -> timer:sleep(20), collected(Peer, Collector, N, Deadline)
    end.

%% On the collector's node (collected/3 calls it there): what the collector got so far,
%% oldest first.
-spec ask(pid() | atom()) -> [term()].
ask(Pid) ->
    Pid ! {'$get', self()},
    receive {collected, Got} -> Got after 5000 -> error(timeout) end.

%% A fun in the external term format (version byte first) that OTP 25's binary_to_term/1
%% accepts although its creator is the integer 0, not a pid, and that crashes the VM once
%% encoded again: teleport must refuse it wherever untrusted bytes are decoded.
-spec forged_fun() -> binary().
forged_fun() ->
    Body = <<0, 0:128, 0:32, 0:32, 119, 5, "lists", 97, 0, 97, 0, 97, 0>>,
    <<131, 112, (4 + byte_size(Body)):32, Body/binary>>.

%%============================================================================================
%% Logs

%% Logger events of this node go to the calling process as {logged, Event}, for
%% wait_log/1, wait_event/1 and next_log/1.
-spec capture_logs() -> ok.
capture_logs() ->
    _ = logger:remove_handler(?MODULE),
    flush_logs(),
    ok = logger:add_handler(?MODULE, ?MODULE, #{config => #{to => self()}}).

%% Stops capture_logs/0's capture (end_per_testcase: whether or not it ran).
-spec stop_capturing_logs() -> ok.
stop_capturing_logs() ->
    _ = logger:remove_handler(?MODULE),
    ok.

flush_logs() ->
    receive {logged, _} -> flush_logs() after 0 -> ok end.

%% The logger handler callback.
-spec log(logger:log_event(), logger:handler_config()) -> ok.
log(Event, #{config := #{to := Pid}}) ->
    Pid ! {logged, Event},
    ok.

%% The text of the first event whose formatted text passes Pred (within 10 s).
-spec wait_log(fun((string()) -> boolean())) -> string().
wait_log(Pred) ->
    receive
        {logged, Event} ->
            Text = event_text(Event),
            case Pred(Text) of
                true -> Text;
                false -> wait_log(Pred)
            end
    after 10000 ->
            ct:fail(log_line_not_seen)
    end.

%% The report of the first teleport_log event (a map) passing Pred (within 10 s).
-spec wait_event(fun((map()) -> boolean())) -> map().
wait_event(Pred) ->
    receive
        {logged, #{msg := {report, Report}}} when is_map(Report) ->
            case Pred(Report) of
                true -> Report;
                false -> wait_event(Pred)
            end;
        {logged, _} ->
            wait_event(Pred)
    after 10000 ->
            ct:fail(log_event_not_seen)
    end.

%% The next teleport log line within Timeout ms, or none.
-spec next_log(timeout()) -> string() | none.
next_log(Timeout) ->
    receive
        {logged, #{meta := #{domain := [teleport | _]}} = Event} -> event_text(Event)
    after Timeout -> none
    end.

event_text(#{msg := {string, S}}) ->
    unicode:characters_to_list(S);
event_text(#{msg := {report, R}, meta := Meta}) ->
    case Meta of
        #{report_cb := Cb} when is_function(Cb, 1) ->
            {F, A} = Cb(R),
            lists:flatten(io_lib:format(F, A));
        _ ->
            lists:flatten(io_lib:format("~0tp", [R]))
    end;
event_text(#{msg := {F, A}}) ->
    lists:flatten(io_lib:format(F, A)).
