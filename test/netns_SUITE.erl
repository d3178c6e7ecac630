%% The link benchmark's smoke test: hosts in network namespaces built by teleport_netns
%% (bench/, the same module `make bench-net' uses), each with its own epmd and an egress
%% shaped by tc, nodes started inside them with `-name n@<namespace address>'. Two hosts
%% carry one 10 MB message over teleport and a gen_server:call over disterl; three on a
%% bridge reach each other; afterwards not one namespace of the run is left.
%%
%% Skipped, saying why, where namespaces cannot be made (not root, no iproute2, a kernel
%% without veth or tbf). Nothing here is timed: waits are bounded only so that a hang fails.
-module(netns_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, groups/0, suite/0, init_per_group/2, end_per_group/2]).
-export([bad_parameters_fail_at_once_naming_the_parameter/1,
         two_hosts_carry_a_bulk_message_over_teleport_and_a_call_over_disterl/1,
         hosts_on_the_bridge_reach_each_other_and_only_there/1,
         a_network_leaves_no_namespace_behind/1]).
%% Run on the nodes in the namespaces.
-export([send_bulk/2, wait_collected/2]).

suite() ->
    [{timetrap, {minutes, 2}}].

all() ->
    [bad_parameters_fail_at_once_naming_the_parameter, {group, netns}].

groups() ->
    [{netns, [sequence], [two_hosts_carry_a_bulk_message_over_teleport_and_a_call_over_disterl,
                          hosts_on_the_bridge_reach_each_other_and_only_there,
                          a_network_leaves_no_namespace_behind]}].

init_per_group(netns, Config) ->
    case teleport_netns:available() of
        ok -> Config;
        {no, Why} -> {skip, "network namespaces are not available, so the link smoke test "
                            "is skipped: " ++ Why}
    end.

end_per_group(_, _Config) ->
    ok.

%%--------------------------------------------------------------------------------------------
%% Tests

bad_parameters_fail_at_once_naming_the_parameter(_Config) ->
    {'EXIT', {{bad_parameter, "LINK_RATE", Msg}, _}} = (catch teleport_netns:check_rate("fast")),
    ?assertMatch({match, _}, re:run(Msg, "LINK_RATE=\"fast\".*e\\.g\\. 1gbit")),
    ?assertMatch({'EXIT', {{bad_parameter, "LINK_RATE", _}, _}},
                 catch teleport_netns:check_rate("1gbits")),
    ?assertMatch({'EXIT', {{bad_parameter, "LINK_RATE", _}, _}},
                 catch teleport_netns:check_rate("0bit")),
    {'EXIT', {{bad_parameter, "NET_HOSTS", HMsg}, _}} = (catch teleport_netns:check_hosts(9)),
    ?assertMatch({match, _}, re:run(HMsg, "NET_HOSTS=9: expected an integer from 2 to 8")),
    ?assertMatch({'EXIT', {{bad_parameter, "NET_HOSTS", _}, _}},
                 catch teleport_netns:check_hosts(1)),
    %% A bad count is refused before anything is built.
    ?assertMatch({'EXIT', {{bad_parameter, "NET_HOSTS", _}, _}},
                 catch teleport_netns:star(9, #{})),
    ?assertEqual(1000000000, teleport_netns:rate_bits("1gbit")),
    ?assertEqual(10000000000, teleport_netns:rate_bits("10gbit")),
    ?assertEqual(800000, teleport_netns:rate_bits("100kbps")),
    ?assertEqual("500mbit", teleport_netns:check_rate("500mbit")).

two_hosts_carry_a_bulk_message_over_teleport_and_a_call_over_disterl(_Config) ->
    Net = teleport_netns:pair(#{rate => "1gbit"}),
    try
        %% Each host's egress is shaped.
        [?assertMatch({match, _}, re:run(Q, "tbf .*rate 1Gbit")) || Q <- teleport_netns:qdisc(Net)],
        {PA, A} = teleport_netns:start_node(Net, 1, #{name => "a"}),
        {PB, B} = teleport_netns:start_node(Net, 2, #{name => "b"}),
        ?assertEqual('a@10.77.0.1', A),
        ?assertEqual('b@10.77.0.2', B),
        [ok = peer:call(P, teleport, start, []) || P <- [PA, PB]],
        %% disterl: a gen_server:call from A to B.
        {ok, _} = peer:call(PB, bench_agent, start_ping_server, []),
        ?assertEqual(pong, peer:call(PA, gen_server, call, [{bench_ping, B}, ping, 30000])),
        %% teleport: one 10 MB message from A to B, intact, over the namespaces' link.
        _ = peer:call(PB, teleport_test_util, start_collector, [netns_sink]),
        Crc = peer:call(PA, ?MODULE, send_bulk, [{netns_sink, B}, 10 * 1024 * 1024]),
        [{bulk, Size, Got}] = peer:call(PB, ?MODULE, wait_collected, [netns_sink, 1], 70000),
        ?assertEqual({10 * 1024 * 1024, Crc}, {Size, Got}),
        #{B := #{msgs_out := Out}} = peer:call(PA, teleport, stats, []),
        ?assert(Out >= 1),
        %% The pool's connections run between the namespace addresses.
        #{B := Conns} = peer:call(PA, teleport, info, []),
        ?assert(lists:any(fun(#{state := up, local_addr := {{10, 77, 0, 1}, _},
                                peer_addr := {{10, 77, 0, 2}, _}}) -> true;
                             (_) -> false
                          end, Conns)),
        [teleport_netns:stop_node(P) || P <- [PA, PB]]
    after
        ok = teleport_netns:stop(Net)
    end,
    ?assertEqual([], teleport_netns:leftovers(maps:get(run, Net))).

hosts_on_the_bridge_reach_each_other_and_only_there(_Config) ->
    Net = teleport_netns:star(3, #{rate => "1gbit"}),
    try
        Peers = [teleport_netns:start_node(Net, I, #{name => "r" ++ integer_to_list(I)})
                 || I <- [1, 2, 3]],
        [{P1, _}, {_, N2}, {_, N3}] = Peers,
        ?assertEqual([pong, pong], [peer:call(P1, net_adm, ping, [N]) || N <- [N2, N3]]),
        %% The hosts' only way out is the bridge: no default route.
        ?assertEqual([], [R || R <- string:split(peer:call(P1, os, cmd, ["ip route"]), "\n", all),
                               lists:prefix("default", R)]),
        [teleport_netns:stop_node(P) || {P, _} <- Peers]
    after
        ok = teleport_netns:stop(Net)
    end.

a_network_leaves_no_namespace_behind(_Config) ->
    Run = teleport_netns:run_id(),
    Net = teleport_netns:star(2, #{run => Run, rate => "100mbit"}),
    {_Peer, _Node} = teleport_netns:start_node(Net, 1, #{}),
    ?assertEqual(3, length(teleport_netns:leftovers(Run))),
    %% Stopped with its node still running (the cleanup kills it) and its epmds.
    ok = teleport_netns:stop(Net),
    ?assertEqual([], teleport_netns:leftovers(Run)),
    Listed = os:cmd("ip netns list"),
    ?assertEqual(nomatch, string:find(Listed, "tpn" ++ Run)).

%%--------------------------------------------------------------------------------------------
%% On the nodes

%% A random binary of `Bytes' sent to `Dest' over teleport; returns its CRC.
send_bulk(Dest, Bytes) ->
    Bin = crypto:strong_rand_bytes(Bytes),
    ok = teleport:send(Dest, {bulk, Bin}),
    erlang:crc32(Bin).

%% What the collector `Name' got (as `{bulk, Size, Crc}'), once it has `N' messages; gives
%% up after a minute (a hang guard, not a timed assertion).
wait_collected(Name, N) ->
    wait_collected(Name, N, 600).

wait_collected(Name, N, Tries) ->
    Got = teleport_test_util:ask(whereis(Name)),
    case length(Got) >= N orelse Tries =:= 0 of
        true -> [{bulk, byte_size(B), erlang:crc32(B)} || {bulk, B} <- Got];
        false -> timer:sleep(100), wait_collected(Name, N, Tries - 1)
    end.
