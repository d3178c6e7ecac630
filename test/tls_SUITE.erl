%% teleport over TLS between peer nodes: delivery and calls; certificates of another CA, of
%% another host, expired; TLS against plain both ways; the `optfile' form and the default
%% inherited from disterl over TLS; every bad file; hostile bytes at a TLS listener.
%%
%% The suite makes its own CA and certificates (public_key:pkix_test_data/1) in the CT
%% priv_dir; no key is committed.
-module(tls_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile([export_all, nowarn_export_all]).

-import(teleport_test_util, [capture_logs/0, wait_log/1]).

-define(PEERS, tls_SUITE_peers).

suite() ->
    [{timetrap, {seconds, 120}}].

all() ->
    [send_and_call_over_tls, another_ca_is_refused, another_host_is_refused,
     plain_and_tls_do_not_connect, tls_versions, optfile_form, inherited_from_tls_disterl,
     bad_files_stop_the_start, password_protected_key, hostile_bytes_at_a_tls_listener].

init_per_suite(Config) ->
    Started = teleport_test_util:start_distribution("tls_ct_"),
    Holder = teleport_test_util:start_tables([{?PEERS, [set]}]),
    Dir = ?config(priv_dir, Config),
    [_, Host] = string:split(atom_to_list(node()), "@"),
    Ca = teleport_certs:ca("teleport test CA"),
    Other = teleport_certs:ca("another CA"),
    Files = #{node => teleport_certs:issue(Dir, "node", Ca, [Host], []),
              peer => teleport_certs:issue(Dir, "peer", Ca, [Host], []),
              stranger => teleport_certs:issue(Dir, "stranger", Other, [Host], []),
              elsewhere => teleport_certs:issue(Dir, "elsewhere", Ca, ["elsewhere.example"], []),
              expired => teleport_certs:issue(Dir, "expired", Ca, [Host],
                               [{validity, {{2019, 1, 1}, {2020, 1, 1}}}]),
              soon => teleport_certs:issue(Dir, "soon", Ca, [Host],
                            [{validity, {{2019, 1, 1}, in_days(3)}}])},
    [{started_dist, Started}, {peer_table_holder, Holder}, {files, Files}, {host, Host}
     | Config].

end_per_suite(Config) ->
    _ = teleport:stop(),
    ?config(peer_table_holder, Config) ! stop,
    teleport_test_util:stop_distribution(?config(started_dist, Config)),
    ok.

init_per_testcase(_, Config) ->
    true = ets:delete_all_objects(?PEERS),
    Config.

end_per_testcase(_, _Config) ->
    ok = teleport_test_util:stop_capturing_logs(),
    teleport_test_util:reset_teleport(),
    teleport_test_util:stop_peers([P || {_, P} <- ets:tab2list(?PEERS)]),
    ok.

%%--------------------------------------------------------------------------------------------
%% Cases

%% Messages (a 4 MB binary among them) and gs_call over TLS, both ways: the reply comes back
%% over the peer's TLS pool.
send_and_call_over_tls(Config) ->
    ok = restart(tls(Config, node)),
    {Peer, Node} = start_peer(tls(Config, peer)),
    Big = crypto:strong_rand_bytes(4 * 1024 * 1024),
    Msgs = [{n, I} || I <- lists:seq(1, 50)] ++ [{big, Big}, last],
    [ok = teleport:send({coll, Node}, M) || M <- Msgs],
    %% Compared by digest: a failure would print 4 MB.
    Digest = fun(L) -> erlang:md5(term_to_binary(L)) end,
    ?assertEqual(Digest(Msgs), Digest(teleport_test_util:collected(Peer, coll, length(Msgs)))),
    {ok, _} = peer:call(Peer, calls_test_server, start, [srv]),
    ?assertEqual(hello, teleport:gs_call({srv, Node}, {echo, hello}, 5000)),
    ?assertEqual(byte_size(Big),
                 byte_size(teleport:gs_call({srv, Node}, {bytes, byte_size(Big)}, 10000))),
    ct:pal("info: ~p", [teleport:info()]).

%% A peer whose certificate another CA issued: neither way connects; nothing is delivered.
another_ca_is_refused(Config) ->
    ok = restart(tls(Config, node)),
    {Peer, Node} = start_peer(tls(Config, stranger)),
    nothing_delivered(Peer, Node).

%% The dialer checks that the acceptor's certificate names the host of its node name: a
%% certificate for another host is refused, unless server_name_check is off.
another_host_is_refused(Config) ->
    ok = restart(tls(Config, node)),
    {Peer, Node} = start_peer(tls(Config, elsewhere)),
    %% (The peer, dialing this node, finds the right host in this node's certificate.)
    nothing_delivered(Peer, Node, [to_peer]),
    ok = restart((tls(Config, node))#{server_name_check => false}),
    ok = teleport:send({coll, Node}, now_it_goes),
    ?assertEqual([now_it_goes], teleport_test_util:collected(Peer, coll, 1)).

%% A TLS node and a plain node do not connect, and the TLS side logs which side expects
%% what; nothing is delivered either way.
plain_and_tls_do_not_connect(Config) ->
    ok = restart(tls(Config, node)),
    capture_logs(),
    {Peer, Node} = start_peer(false),
    ok = peer:call(Peer, teleport, send, [{coll, node()}, from_plain]),
    Line = wait_log(fun(T) -> string:find(T, "requires TLS") =/= nomatch end),
    ct:pal("logged: ~ts", [Line]),
    nothing_delivered(Peer, Node),
    %% The peer keeps trying (every 2 s at most); the listener said it once (a line a
    %% minute per address).
    ?assertEqual(none, next_line_with("requires TLS", 3000)).

%% A node told to speak only TLS 1.2 (as `ssl' takes `versions') delivers and calls with
%% a peer that allows both; older versions in the list are passed over; a 1.3-only peer
%% and a 1.2-only node have no version in common and do not connect.
tls_versions(Config) ->
    ok = restart((tls(Config, node))#{versions => ['tlsv1.2', 'tlsv1.1']}),
    {Peer, Node} = start_peer(tls(Config, peer)),
    ok = teleport:send({coll, Node}, over_tls_1_2),
    ?assertEqual([over_tls_1_2], teleport_test_util:collected(Peer, coll, 1)),
    {ok, _} = peer:call(Peer, calls_test_server, start, [srv]),
    ?assertEqual(hello, teleport:gs_call({srv, Node}, {echo, hello}, 5000)),
    ok = restart((tls(Config, node))#{versions => ['tlsv1.2']}),
    {Peer13, Node13} = start_peer((tls(Config, peer))#{versions => ['tlsv1.3']}),
    nothing_delivered(Peer13, Node13).

%% The next log line of teleport's within `Ms' that holds `Text', or none.
next_line_with(Text, Ms) ->
    Until = erlang:monotonic_time(millisecond) + Ms,
    Left = fun() -> max(0, Until - erlang:monotonic_time(millisecond)) end,
    case teleport_test_util:next_log(Left()) of
        none -> none;
        Line ->
            case string:find(Line, Text) of
                nomatch -> next_line_with(Text, Left());
                _ -> Line
            end
    end.

%% `{optfile, Path}': the file -ssl_dist_optfile reads.
optfile_form(Config) ->
    Path = optfile(Config, node, "node_dist.conf"),
    ok = restart({optfile, Path}),
    {Peer, Node} = start_peer({optfile, optfile(Config, peer, "peer_dist.conf")}),
    ok = teleport:send({coll, Node}, via_optfile),
    ?assertEqual([via_optfile], teleport_test_util:collected(Peer, coll, 1)),
    %% A file that is not one.
    ?assertMatch({error, {invalid_config, tls, {optfile, "/nonexistent/x.conf"}, _}},
                 restart({optfile, "/nonexistent/x.conf"})).

%% Unset on nodes whose disterl runs over TLS: teleport takes the files of their
%% -ssl_dist_optfile, and messages go between two such nodes. Without an optfile it
%% refuses to start (it never sends in clear beside an encrypted disterl), until told
%% `tls => false'. The peers are driven over their standard I/O (their disterl speaks TLS,
%% this node's does not).
inherited_from_tls_disterl(Config) ->
    Path = optfile(Config, peer, "inherited_dist.conf"),
    Dist = ["-proto_dist", "inet_tls", "-ssl_dist_optfile", Path],
    [{PeerA, NodeA}, {PeerB, NodeB}] = [tls_disterl_peer(Dist) || _ <- [a, b]],
    ?assertEqual({ok, [["inet_tls"]]}, peer:call(PeerA, init, get_argument, [proto_dist])),
    [?assertEqual(ok, peer:call(P, teleport, start, [])) || P <- [PeerA, PeerB]],
    ?assertMatch(#{tls := #{certfile := _, verify := verify_peer}},
                 peer:call(PeerA, teleport_config, load, [])),
    _ = peer:call(PeerA, teleport_test_util, start_collector, [coll]),
    ?assert(peer:call(PeerB, net_kernel, connect_node, [NodeA])),
    ok = peer:call(PeerB, teleport, send, [{coll, NodeA}, inherited]),
    ?assertEqual([inherited], teleport_test_util:collected(PeerA, coll, 1)),
    _ = NodeB,
    %% No optfile (the options on the command line): refused, naming the protocol.
    {PeerC, _} = tls_disterl_peer(["-proto_dist", "inet_tls"]),
    Refused = peer:call(PeerC, teleport, start, []),
    ct:pal("teleport:start/0 beside TLS disterl without an optfile: ~p", [Refused]),
    ?assertMatch({error, {invalid_config, tls, disterl, _}}, Refused),
    {error, {invalid_config, _, _, Expected}} = Refused,
    ?assertNotEqual(nomatch, string:find(Expected, "inet_tls")),
    ok = peer:call(PeerC, application, set_env, [teleport, tls, false]),
    ?assertEqual(ok, peer:call(PeerC, teleport, start, [])).

%% A peer whose disterl runs with `Args', teleport not started (and not cover-registered:
%% that goes over this node's plain disterl).
tls_disterl_peer(Args) ->
    {ok, {Peer, Node, _}} =
        teleport_test_util:start_peer(#{prefix => tls_dist, teleport => false, cover => false,
                                        args => Args, on_start => fun record/1}),
    {Peer, Node}.

%% Every fault of the files stops the start with {invalid_config, tls, _, Why}, Why naming
%% the file and what is wrong; a certificate that expires within 7 days starts, with a
%% warning.
bad_files_stop_the_start(Config) ->
    Dir = ?config(priv_dir, Config),
    Good = tls(Config, node),
    #{certfile := Cert} = Good,
    NotPem = filename:join(Dir, "not.pem"),
    ok = file:write_file(NotPem, <<"not a PEM file\n">>),
    #{keyfile := OtherKey} = tls(Config, peer),
    Cases = [{Good#{certfile => "/nonexistent/node.crt"}, ["/nonexistent/node.crt", "cannot read"]},
             {Good#{keyfile => NotPem}, [NotPem, "private key"]},
             {Good#{cacertfile => NotPem}, [NotPem, "certificate"]},
             {Good#{keyfile => OtherKey}, [OtherKey, "not the key of the certificate"]},
             {tls(Config, expired), ["expired.crt", "expired"]}],
    lists:foreach(
      fun({Tls, Words}) ->
              Result = restart(Tls),
              ct:pal("~p: ~p", [Tls, Result]),
              ?assertMatch({error, {invalid_config, tls, _, _}}, Result),
              {error, {invalid_config, tls, _, Why}} = Result,
              [?assertNotEqual(nomatch, string:find(Why, W)) || W <- Words],
              ?assertEqual(undefined, whereis(teleport_server))
      end, Cases),
    %% Forms refused before any file is read.
    [?assertMatch({error, {invalid_config, tls, _, _}}, restart(Bad))
     || Bad <- [true, #{certfile => Cert}, Good#{verify => maybe}, Good#{colour => blue},
                Good#{server_name_check => 1}, [{certfile, Cert}, junk],
                Good#{versions => ['tlsv1.1']}, Good#{versions => 'tlsv1.3'},
                Good#{versions => [sslv3]}, Good#{versions => []},
                Good#{versions => ['tlsv1.3' | 'tlsv1.2']}]],
    %% Soon to expire: it starts, and says so.
    capture_logs(),
    ok = restart(tls(Config, soon)),
    Line = wait_log(fun(T) -> string:find(T, "expires within 7 days") =/= nomatch end),
    ct:pal("logged: ~ts", [Line]).

%% A password-protected key opens with its password; a wrong one stops the start, the
%% password shown nowhere.
password_protected_key(Config) ->
    Dir = ?config(priv_dir, Config),
    Good = #{keyfile := Keyfile} = tls(Config, node),
    {ok, Pem} = file:read_file(Keyfile),
    [Entry | _] = public_key:pem_decode(Pem),
    Key = public_key:pem_entry_decode(Entry),
    Salt = crypto:strong_rand_bytes(8),
    Encrypted = public_key:pem_entry_encode(element(1, Key), Key,
                                            {{"DES-EDE3-CBC", Salt}, "s3cret"}),
    Locked = filename:join(Dir, "locked.key"),
    ok = file:write_file(Locked, public_key:pem_encode([Encrypted])),
    Wrong = restart(Good#{keyfile => Locked, password => "wrong"}),
    ct:pal("wrong password: ~p", [Wrong]),
    ?assertMatch({error, {invalid_config, tls, _, _}}, Wrong),
    {error, {invalid_config, tls, Shown, Why}} = Wrong,
    ?assertNotEqual(nomatch, string:find(Why, "password")),
    ?assertEqual(nomatch, string:find(lists:flatten(io_lib:format("~p", [Shown])), "wrong")),
    %% Without the password: no key in it that can be read.
    ?assertMatch({error, {invalid_config, tls, _, _}}, restart(Good#{keyfile => Locked})),
    ok = restart(Good#{keyfile => Locked, password => "s3cret"}),
    {Peer, Node} = start_peer(tls(Config, peer)),
    ok = teleport:send({coll, Node}, unlocked),
    ?assertEqual([unlocked], teleport_test_util:collected(Peer, coll, 1)).

%% Bytes that are not TLS, a TLS opening that stalls, a huge record: each connection is
%% closed (within the handshake deadline), nothing is delivered, and the listener serves
%% a real peer after.
hostile_bytes_at_a_tls_listener(Config) ->
    ok = restart(tls(Config, node), [{handshake_timeout, 1000}]),
    {ok, Port} = teleport_server:listen_port(),
    Answers = [hostile(Port, B) || B <- [<<"GET / HTTP/1.0\r\n\r\n">>,
                                         <<16#16, 16#03>>,
                                         <<16#16, 16#03, 16#01, 16#ff, 16#ff, 1, 2, 3>>,
                                         <<16#16, 16#03, 16#03, 0, 4, 9, 9, 9, 9>>]],
    ct:pal("answers: ~p", [Answers]),
    [?assert(Ms < 3000) || {Ms, _} <- Answers],
    {Peer, _Node} = start_peer(tls(Config, peer)),
    ok = register_collector(coll_here),
    ok = peer:call(Peer, teleport, send, [{coll_here, node()}, still_served]),
    receive {collected, still_served} -> ok after 10000 -> ct:fail(not_delivered) end.

%%--------------------------------------------------------------------------------------------
%% Helpers

in_days(N) ->
    {Date, _} = calendar:gregorian_seconds_to_datetime(
                  calendar:datetime_to_gregorian_seconds(calendar:universal_time()) +
                      N * 86400),
    Date.

%% The tls config of the identity `Who', trusting the test CA.
tls(Config, Who) ->
    Files = maps:get(Who, ?config(files, Config)),
    #{node := #{cacertfile := Ca}} = ?config(files, Config),
    Files#{cacertfile => Ca}.

%% An -ssl_dist_optfile file for `Who', as a TLS cluster has it.
optfile(Config, Who, Name) ->
    teleport_certs:optfile(filename:join(?config(priv_dir, Config), Name), tls(Config, Who)).

restart(Tls) -> restart(Tls, []).

%% Restarts teleport here with `tls' = `Tls': ok, or teleport:start/0's error.
restart(Tls, Env) ->
    teleport_test_util:reset_teleport(),
    [ok = application:set_env(teleport, K, V) || {K, V} <- [{tls, Tls} | Env]],
    teleport:start().

%% A peer running teleport with `tls' = `Tls' and a collector `coll'.
start_peer(Tls) ->
    {ok, {Peer, Node, _}} =
        teleport_test_util:start_peer(#{prefix => tls, env => [{tls, Tls}],
                                        setup => [{teleport_test_util, start_collector, [coll]}],
                                        on_start => fun record/1}),
    {Peer, Node}.

record({Peer, _, _} = Started) ->
    true = ets:insert(?PEERS, {Peer, Started}).

%% Nothing goes either way between this node and `Node', though both try.
nothing_delivered(Peer, Node) ->
    nothing_delivered(Peer, Node, [to_peer, from_peer]).

%% Nothing goes from this node to `Node' (`to_peer') or back (`from_peer').
nothing_delivered(Peer, Node, Ways) ->
    ok = register_collector(coll_here),
    [_ = teleport:send({coll, Node}, from_runner) || lists:member(to_peer, Ways)],
    [_ = peer:call(Peer, teleport, send, [{coll_here, node()}, from_peer])
     || lists:member(from_peer, Ways)],
    timer:sleep(1500),
    ?assertEqual([], teleport_test_util:collected(Peer, coll, 0)),
    receive {collected, M} -> ct:fail({delivered, M}) after 0 -> ok end,
    ct:pal("info: ~p", [teleport:info()]).

%% A process here registered as `Name' that passes every message to the test process.
register_collector(Name) ->
    Self = self(),
    catch unregister(Name),
    Pid = spawn_link(fun Loop() -> receive M -> Self ! {collected, M}, Loop() end end),
    true = register(Name, Pid),
    ok.

%% Connects to `Port' here, sends `Bytes', and waits for the close: {Ms, Answer}.
hostile(Port, Bytes) ->
    T0 = erlang:monotonic_time(millisecond),
    {ok, S} = gen_tcp:connect({127, 0, 0, 1}, Port, [binary, {active, false}]),
    ok = gen_tcp:send(S, Bytes),
    Answer = read_to_close(S, <<>>),
    {erlang:monotonic_time(millisecond) - T0, Answer}.

read_to_close(S, Acc) ->
    case gen_tcp:recv(S, 0, 10000) of
        {ok, B} -> read_to_close(S, <<Acc/binary, B/binary>>);
        {error, _} -> gen_tcp:close(S), Acc
    end.
