%% Every error of the public API, by the shape of its reason, and the log line that says
%% what failed, where and why: teleport not started, each configuration key with a bad
%% value, each socket option, a bad destination or option, a node that cannot be reached
%% (not at all, or not running teleport), a port in use, a handshake refused for a wrong
%% cookie, and the NIF missing.
%%
%% Log lines are caught with a logger handler of this module that forwards each event to a
%% process (`{logged, Event}'), on this node or on a peer.
-module(errors_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile([export_all, nowarn_export_all]).

-import(teleport_test_util, [capture_logs/0, wait_log/1, wait_event/1, next_log/1]).

suite() ->
    [{timetrap, {seconds, 120}}].

all() ->
    [not_started, bad_config_value_for_each_key, bad_socket_opts, good_socket_opts,
     bad_destination_and_options, unreachable_node, node_without_teleport,
     peer_too_slow_to_answer, port_in_use, socket_opt_the_kernel_refuses,
     wrong_cookie_handshake, unknown_requests, nif_not_loaded,
     start_right_after_a_failed_start].

init_per_suite(Config) ->
    Started = teleport_test_util:start_distribution("errors_ct_"),
    [{started_dist, Started} | Config].

end_per_suite(Config) ->
    _ = teleport:stop(),
    teleport_test_util:stop_distribution(?config(started_dist, Config)),
    ok.

init_per_testcase(_Case, Config) ->
    reset_env(),
    Config.

end_per_testcase(_Case, _Config) ->
    ok = teleport_test_util:stop_capturing_logs(),
    _ = teleport:stop(),
    reset_env(),
    teleport_test_util:stop_peers(peers()),
    erase(peers),
    ok.

reset_env() ->
    teleport_test_util:reset_teleport().

%%--------------------------------------------------------------------------------------------
%% Cases

%% A start right after a failed one fails (or succeeds) for its own reasons: the failed
%% start's supervisor, still exiting when teleport:start/0 returned, owned a table the next
%% start makes again (that start failed with badarg on CI). The window is microseconds, so
%% the case first holds it open: the table's owner lives on 200 ms while the next
%% supervisor makes the table, which waits for it instead of failing.
start_right_after_a_failed_start(_Config) ->
    Self = self(),
    Owner = spawn(fun() ->
                          teleport_replies = ets:new(teleport_replies, [named_table, public]),
                          Self ! {made, self()},
                          receive exit -> timer:sleep(200) end
                  end),
    receive {made, Owner} -> ok end,
    Owner ! exit,
    T0 = erlang:monotonic_time(millisecond),
    ?assertEqual(ok, teleport:start()),
    ?assert(erlang:monotonic_time(millisecond) - T0 >= 150),
    ok = teleport:stop(),
    lists:foreach(
      fun(_) ->
              ok = application:set_env(teleport, socket_opts, #{sndbuf => 0}),
              ?assertMatch({error, {invalid_config, socket_opts, _, _}}, teleport:start()),
              ?assertMatch({error, {invalid_config, socket_opts, _, _}}, teleport:start()),
              ok = application:unset_env(teleport, socket_opts),
              ?assertEqual(ok, teleport:start()),
              ok = teleport:stop()
      end, lists:seq(1, 30)).

%% Before teleport:start/0: sends say not_started, calls exit with it, inspection is empty.
not_started(_Config) ->
    ?assertEqual(undefined, whereis(teleport_server)),
    Dest = {some_name, 'somewhere@nohost'},
    ?assertEqual({error, not_started}, teleport:send(Dest, m)),
    ?assertEqual({error, not_started}, teleport:send(Dest, m, [nosuspend])),
    ?assertEqual({error, not_started}, teleport_server:connect('somewhere@nohost')),
    ?assertEqual({error, not_started}, teleport_server:listen_port()),
    ?assertEqual({error, not_started}, teleport_server:listener_info()),
    ?assertExit({not_started, {teleport, gs_call, [Dest, req, 100]}},
                teleport:gs_call(Dest, req, 100)),
    ?assertEqual(#{}, teleport:stats()),
    ?assertEqual(#{}, teleport:info()),
    ?assertEqual(#{}, teleport_server:pool_info()),
    %% Local destinations do not need teleport.
    ?assertEqual(ok, teleport:send(self(), local)),
    receive local -> ok after 1000 -> ct:fail(local_not_delivered) end,
    ok.

%% Each key of the application environment with a bad value: teleport:start/0 returns
%% {error, {invalid_config, Key, Value, Expected}}, Expected a sentence, nothing is left
%% running, and the reason is logged in words.
bad_config_value_for_each_key(_Config) ->
    Bad = #{port => [70000, -1, "4000"],
            listen_ip => ["not an ip", {1, 2, 3}, 42],
            pool_size => [0, 2.5, two, 1025],
            max_queue_bytes => [0, -1, "64MB"],
            max_frame_bytes => [0, 16#100000000],
            eager_connect => [yes, 1],
            connect_timeout => [0, infinity],
            handshake_timeout => [-5, "5s"],
            discovery_timeout => [1.5, undefined],
            log_to_default_handler => [1, "true"],
            thread_nice => [-1, 20, "5"],
            socket_opts => [42, {nodelay, true}],
            tls => [true, #{certfile => "node.pem"}, {optfile, "ssl_dist.conf"}]},
    %% A new key must get its bad values here too.
    ?assertEqual(lists:sort(maps:keys(teleport_config:defaults())), lists:sort(maps:keys(Bad))),
    capture_logs(),
    lists:foreach(
      fun({Key, Values}) ->
              lists:foreach(
                fun(Value) ->
                        reset_env(),
                        ok = application:set_env(teleport, Key, Value),
                        Result = teleport:start(),
                        ct:pal("~p = ~0p: ~0p", [Key, Value, Result]),
                        ?assertMatch({error, {invalid_config, Key, Value, _}}, Result),
                        {error, {invalid_config, _, _, Expected}} = Result,
                        ?assert(is_sentence(Expected)),
                        ?assertEqual(undefined, whereis(teleport_server)),
                        Line = wait_log(fun(Text) -> string:find(Text, "teleport cannot start")
                                                         =/= nomatch end),
                        ?assertNotEqual(nomatch, string:find(Line, atom_to_list(Key))),
                        ?assertNotEqual(nomatch, string:find(Line, Expected))
                end, Values)
      end, lists:sort(maps:to_list(Bad))),
    %% The 32-bit frame length is named.
    {error, {invalid_config, _, _, Why}} =
        begin reset_env(),
              application:set_env(teleport, max_frame_bytes, 16#100000000),
              teleport:start()
        end,
    ?assertNotEqual(nomatch, string:find(Why, "32-bit")),
    %% And with good values it starts.
    reset_env(),
    ok = teleport:start(),
    ok.

%% Each socket option with a bad value names the option and what it accepts.
bad_socket_opts(_Config) ->
    Bad = [{sndbuf, 0}, {sndbuf, 1 bsl 31}, {recbuf, -1}, {recbuf, big}, {nodelay, 1},
           {keepalive, yes}, {keepalive_time, 0}, {keepalive_time, 32768},
           {keepalive_interval, 0}, {keepalive_retries, 128}, {priority, -1},
           {priority, 1 bsl 31}, {tos, 256}, {tos, -1}, {user_timeout, -1},
           {user_timeout, 1.0}, {bind_ip, "nowhere"}, {bind_ip, any}],
    lists:foreach(
      fun({Opt, Value} = Pair) ->
              [begin
                   Reason = config_error(Opts),
                   ?assertMatch({invalid_config, socket_opts, Pair, _}, Reason),
                   {_, _, _, Expected} = Reason,
                   ?assert(is_sentence(Expected)),
                   ?assert(lists:prefix(atom_to_list(Opt) ++ ": ", Expected))
               end || Opts <- [#{Opt => Value}, [Pair], [Pair, nodelay]]]
      end, Bad),
    %% An option that does not exist: the known ones are listed.
    {invalid_config, socket_opts, {sndbuff, 1}, Known} = config_error([{sndbuff, 1}]),
    [?assertNotEqual(nomatch, string:find(Known, atom_to_list(K)))
     || K <- [sndbuf, recbuf, nodelay, keepalive, keepalive_time, keepalive_interval,
              keepalive_retries, priority, tos, user_timeout, bind_ip]],
    ?assertMatch({invalid_config, socket_opts, {"sndbuf", 1}, _},
                 config_error(#{"sndbuf" => 1})),
    %% Not a map nor a proplist, or an element that is neither a pair nor a name.
    ?assertMatch({invalid_config, socket_opts, 42, "a map or a proplist" ++ _},
                 config_error(42)),
    ?assertMatch({invalid_config, socket_opts, {sndbuf, 1, 2}, _},
                 config_error([{sndbuf, 1, 2}])),
    ?assertMatch({invalid_config, socket_opts, "x", _}, config_error(["x"])),
    %% Keepalive timings with keepalive turned off.
    ?assertMatch({invalid_config, socket_opts, {keepalive, false}, "keepalive: " ++ _},
                 config_error([{keepalive, false}, {keepalive_retries, 3}])),
    ok.

%% Good socket options, in both forms, with the defaults filled in.
good_socket_opts(_Config) ->
    Defaults = #{nodelay => true, keepalive => false},
    ?assertEqual(Defaults, teleport_config:socket_opts(#{})),
    ?assertEqual(Defaults, teleport_config:socket_opts([])),
    ?assertEqual(Defaults, maps:get(socket_opts, teleport_config:load())),
    ?assertEqual(#{nodelay => false, keepalive => false, sndbuf => 1024},
                 teleport_config:socket_opts([{nodelay, false}, {sndbuf, 1024}])),
    %% A bare name is true; of two entries the first wins, as for proplists.
    ?assertEqual(#{nodelay => true, keepalive => true},
                 teleport_config:socket_opts([keepalive, {keepalive, false}])),
    %% Keepalive timings turn keepalive on.
    ?assertEqual(#{nodelay => true, keepalive => true, keepalive_time => 30,
                   keepalive_interval => 5, keepalive_retries => 3},
                 teleport_config:socket_opts(#{keepalive_time => 30, keepalive_interval => 5,
                                               keepalive_retries => 3})),
    ?assertEqual(#{nodelay => true, keepalive => false, bind_ip => {127, 0, 0, 1},
                   priority => 6, tos => 16#b8, user_timeout => 0},
                 teleport_config:socket_opts(#{bind_ip => "127.0.0.1", priority => 6,
                                               tos => 16#b8, user_timeout => 0})),
    ?assertEqual({0, 0, 0, 0, 0, 0, 0, 1},
                 maps:get(bind_ip, teleport_config:socket_opts([{bind_ip, <<"::1">>}]))),
    %% They reach the listener (teleport:info/0 shows them).
    ok = application:set_env(teleport, socket_opts, [{recbuf, 131072}, {user_timeout, 30000}]),
    %% And OTP's default handler may be left alone.
    ok = application:set_env(teleport, log_to_default_handler, false),
    ok = teleport:start(),
    #{listener := #{socket_opts := Opts}} = teleport:info(),
    ?assertEqual(#{nodelay => true, keepalive => false, recbuf => 131072,
                   user_timeout => 30000}, Opts),
    {ok, #{filters := Filters}} = logger:get_handler_config(default),
    ?assertNot(lists:keymember(teleport_server, 1, Filters)),
    ok.

%% Malformed destinations and options raise badarg, as erlang:send/3 does.
bad_destination_and_options(_Config) ->
    ok = teleport:start(),
    [?assertError(badarg, teleport:send(Dest, m))
     || Dest <- [42, "name", <<"name">>, {a, 1}, {1, node()}, {a, b, c}, errors_no_such_name]],
    ?assertError(badarg, teleport:send(self(), m, [bogus])),
    ?assertError(badarg, teleport:send(self(), m, bogus)),
    ?assertError(badarg, teleport:gs_call(42, req)),
    ?assertError(badarg, teleport:gs_call({a, b, c}, req, 100)),
    %% A cast never fails, as gen_server:cast/2.
    ?assertEqual(ok, teleport:gs_cast(42, m)),
    ok.

%% A node that does not exist: {error, nodedown} at once, the reason logged once.
unreachable_node(_Config) ->
    ok = teleport:start(),
    capture_logs(),
    Node = 'errors_nonexistent@nohost',
    Dest = {some_name, Node},
    ?assertEqual({error, nodedown}, teleport:send(Dest, m)),
    Line = wait_log(fun(T) -> string:find(T, "cannot reach") =/= nomatch end),
    ct:pal("logged: ~ts", [Line]),
    ?assertNotEqual(nomatch, string:find(Line, atom_to_list(Node))),
    ?assertNotEqual(nomatch, string:find(Line, "no distributed Erlang connection")),
    %% The same reason again: not logged again.
    ?assertEqual({error, nodedown}, teleport:send(Dest, m)),
    ?assertEqual(none, next_log(500)),
    ?assertEqual(noconnect, teleport:send(Dest, m, [noconnect])),
    ?assertExit({{nodedown, Node}, {teleport, gs_call, [Dest, req, 1000]}},
                teleport:gs_call(Dest, req, 1000)),
    ?assertEqual({[], [Node]}, teleport:multi_call([Node], some_name, req, 1000)),
    ?assertEqual(abcast, teleport:abcast([Node], some_name, m)),
    %% Sending to this node's own name over the pool API is refused the same way.
    ?assertEqual({error, nodedown}, teleport_server:connect(node())),
    Self = wait_log(fun(T) -> string:find(T, "it is this node") =/= nomatch end),
    ct:pal("logged: ~ts", [Self]),
    ok.

%% A node that is up but does not run teleport: {error, nodedown}, logged as such; once
%% teleport runs there, sends go through.
node_without_teleport(Config) ->
    ok = teleport:start(),
    {Peer, Node} = start_peer(Config, false),
    capture_logs(),
    ?assertEqual({error, nodedown}, teleport:send({x, Node}, m)),
    Line = wait_log(fun(T) -> string:find(T, "cannot reach") =/= nomatch end),
    ct:pal("logged: ~ts", [Line]),
    ?assertNotEqual(nomatch, string:find(Line, "teleport is not running on " ++
                                             atom_to_list(Node))),
    ok = peer:call(Peer, teleport, start, []),
    Collector = peer:call(Peer, teleport_test_util, start_collector, [coll]),
    ?assertEqual(ok, teleport:send({coll, Node}, hello)),
    ?assertEqual([hello], teleport_test_util:collected(Peer, Collector, 1)),
    ok.

%% The peer's teleport_server does not answer within discovery_timeout: {error, nodedown},
%% and the log says how long it waited.
peer_too_slow_to_answer(Config) ->
    ok = application:set_env(teleport, discovery_timeout, 300),
    ok = teleport:start(),
    {Peer, Node} = start_peer(Config, true),
    ok = peer:call(Peer, sys, suspend, [teleport_server]),
    capture_logs(),
    {Us, Result} = timer:tc(fun() -> teleport:send({x, Node}, m) end),
    ?assertEqual({error, nodedown}, Result),
    ?assert(Us < 3000000),
    Line = wait_log(fun(T) -> string:find(T, "cannot reach") =/= nomatch end),
    ct:pal("logged: ~ts", [Line]),
    ?assertNotEqual(nomatch, string:find(Line, "did not answer within 300 ms")),
    ok = peer:call(Peer, sys, resume, [teleport_server]),
    ok.

%% The listen port is taken: {listen_failed, Ip, Port, {listen, Text}}.
port_in_use(_Config) ->
    {ok, Taken} = gen_tcp:listen(0, [{ip, {0, 0, 0, 0}}]),
    {ok, Port} = inet:port(Taken),
    ok = application:set_env(teleport, port, Port),
    capture_logs(),
    Result = teleport:start(),
    ct:pal("port ~b taken: ~p", [Port, Result]),
    ?assertMatch({error, {listen_failed, {0, 0, 0, 0}, Port, {listen, _}}}, Result),
    {error, {listen_failed, _, _, {listen, Text}}} = Result,
    ?assertNotEqual(nomatch, string:find(Text, "in use")),
    Line = wait_log(fun(T) -> string:find(T, "teleport cannot start") =/= nomatch end),
    ?assertNotEqual(nomatch, string:find(Line, "0.0.0.0:" ++ integer_to_list(Port))),
    gen_tcp:close(Taken),
    ok.

%% SO_PRIORITY above 6 needs CAP_NET_ADMIN: refused for a user, with the option named.
socket_opt_the_kernel_refuses(_Config) ->
    ok = application:set_env(teleport, socket_opts, #{priority => 7}),
    case teleport:start() of
        ok ->
            {skip, "SO_PRIORITY 7 is allowed here (CAP_NET_ADMIN)"};
        Error ->
            ct:pal("priority 7: ~p", [Error]),
            ?assertMatch({error, {socket_opt_refused, priority, 7, _}}, Error),
            {error, {_, _, _, Text}} = Error,
            ?assertNotEqual(nomatch, string:find(Text, "priority")),
            ok
    end.

%% The peer does not accept our cookie: the connection's last_error and the
%% handshake_failed event say where (peer, index, address) and why.
wrong_cookie_handshake(Config) ->
    ok = teleport:start(),
    {_Peer, Node} = start_peer(Config, true),
    pong = net_adm:ping(Node),
    %% The disterl connection stays up; teleport's pool takes the cookie set now.
    Right = erlang:get_cookie(Node),
    true = erlang:set_cookie(Node, errors_wrong_cookie),
    capture_logs(),
    try
        ?assertEqual(ok, teleport:send({x, Node}, m)),
        Event = wait_event(fun(#{event := handshake_failed}) -> true; (_) -> false end),
        ct:pal("event: ~p", [Event]),
        ?assertMatch(#{peer := _, index := _, addr := _, reason := _}, Event),
        #{peer := PeerName, addr := Addr, reason := Reason} = Event,
        ?assertEqual(atom_to_binary(Node), PeerName),
        {ok, PeerPort} = rpc:call(Node, teleport_server, listen_port, []),
        ?assertMatch({match, _}, re:run(Addr, ":" ++ integer_to_list(PeerPort) ++ "$")),
        ?assertNotEqual(nomatch, string:find(Reason, "rejected")),
        #{Node := Conns} = teleport:info(),
        [LastError] = [E || #{last_error := E} <- Conns, E =/= undefined],
        ct:pal("last_error: ~ts", [LastError]),
        ?assertMatch({match, _}, re:run(LastError, "^handshake with .*:" ++
                                            integer_to_list(PeerPort) ++ ": ")),
        ok
    after
        erlang:set_cookie(Node, Right)
    end.

%% What teleport's servers do not expect: calls are answered {error, unknown_request}, casts
%% and other messages are ignored (the relays log what they ignore), and they live on.
unknown_requests(_Config) ->
    ok = teleport:start(),
    capture_logs(),
    Servers = [teleport_server, teleport_calls, teleport_replies],
    [?assertEqual({error, unknown_request}, gen_server:call(S, bogus)) || S <- Servers],
    [ok = gen_server:cast(S, bogus) || S <- Servers],
    [S ! {bogus, S} || S <- Servers],
    IsIgnored = fun(T) -> string:find(T, ": ignored a message") =/= nomatch end,
    Ignored = lists:sort([wait_log(IsIgnored), wait_log(IsIgnored)]),
    ct:pal("logged: ~p", [Ignored]),
    ?assertMatch(["teleport_calls: ignored " ++ _, "teleport_replies: ignored " ++ _], Ignored),
    Pids = [whereis(S) || S <- Servers],
    ?assert(lists:all(fun erlang:is_process_alive/1, Pids)),
    ?assertMatch({ok, _}, teleport_server:listen_port()),
    ok.

%% The NIF library missing: teleport:start/0 says so, and teleport_nif's on_load logged
%% where it looked and how to build it.
nif_not_loaded(Config) ->
    %% A copy of teleport's ebin without priv/, on a peer that sees no other teleport.
    Lib = filename:join([?config(priv_dir, Config), "nif_missing", "teleport"]),
    Ebin = filename:join(Lib, "ebin"),
    ok = filelib:ensure_dir(filename:join(Ebin, "x")),
    Src = code:lib_dir(teleport, ebin),
    [{ok, _} = file:copy(F, filename:join(Ebin, filename:basename(F)))
     || F <- filelib:wildcard(filename:join(Src, "*.{beam,app}"))],
    Here = filename:dirname(code:which(?MODULE)),
    %% Cover is registered by hand, after the check that teleport comes from the copy (cover
    %% replaces the modules, and code:which/1 says cover_compiled then).
    {ok, {Peer, Node, _}} =
        teleport_test_util:start_peer(#{prefix => errors_nif, code_path => [Ebin, Here],
                                        cover => false, teleport => false,
                                        on_start => fun record_peer/1}),
    ?assertEqual(Ebin, filename:dirname(peer:call(Peer, code, which, [teleport]))),
    %% Under `make cover', teleport's modules there become the cover-compiled ones, all but
    %% teleport_nif, which stays the copy without its library.
    ok = teleport_cover:peer_started(Node),
    ok = peer:call(Peer, logger, add_handler, [teleport_test_util, teleport_test_util,
                                               #{config => #{to => self()}}]),
    Result = peer:call(Peer, teleport, start, []),
    ct:pal("teleport:start() without the NIF: ~p", [Result]),
    ?assertMatch({error, {nif_not_loaded, _}}, Result),
    {error, {nif_not_loaded, Text}} = Result,
    ?assertNotEqual(nomatch, string:find(Text, "native/build.sh")),
    OnLoad = wait_log(fun(T) -> string:find(T, "cannot load its NIF") =/= nomatch end),
    ct:pal("on_load logged: ~ts", [OnLoad]),
    ?assertNotEqual(nomatch, string:find(OnLoad, filename:join([Lib, "priv", "teleport_nif"]))),
    ?assertNotEqual(nomatch, string:find(OnLoad, "rebar3 compile")),
    Line = wait_log(fun(T) -> string:find(T, "teleport cannot start") =/= nomatch end),
    ?assertNotEqual(nomatch, string:find(Line, "teleport_nif did not load")),
    ok.

%%--------------------------------------------------------------------------------------------
%% Helpers

%% The reason teleport:start/0 gives for socket_opts = Opts.
config_error(Opts) ->
    reset_env(),
    ok = application:set_env(teleport, socket_opts, Opts),
    {error, Reason} = teleport:start(),
    %% The same check without starting anything.
    ?assertError(Reason, teleport_config:socket_opts(Opts)),
    Reason.

is_sentence(Text) ->
    io_lib:printable_unicode_list(Text) andalso length(Text) > 5.

%% The peers this test case started (teleport_test_util:started()): CT runs
%% init_per_testcase, the case and end_per_testcase in one process.
peers() ->
    case get(peers) of
        undefined -> [];
        Ps -> Ps
    end.

%% on_start of the peers: recorded for end_per_testcase as soon as they are up.
record_peer(Started) ->
    put(peers, [Started | peers()]).

%% A peer node, with teleport started if StartTeleport.
start_peer(_Config, StartTeleport) ->
    {ok, {Peer, Node, _}} =
        teleport_test_util:start_peer(#{prefix => errors, teleport => StartTeleport,
                                        on_start => fun record_peer/1}),
    {Peer, Node}.

