%% teleport_discovery without a peer: the address chosen for a listener, host parts, every
%% reason in words, the retry schedule, and the bookkeeping of who waits, with workers that
%% answer, crash or are killed.
-module(teleport_discovery_tests).

-include_lib("eunit/include/eunit.hrl").

%%--------------------------------------------------------------------------------------------
%% Address choice

a_listener_on_one_address_is_reached_there_test() ->
    ?assertEqual({ok, {10, 1, 2, 3}}, teleport_discovery:peer_address('a@b', {10, 1, 2, 3})),
    ?assertEqual({ok, {0, 0, 0, 0, 0, 0, 0, 1}},
                 teleport_discovery:peer_address('a@b', {0, 0, 0, 0, 0, 0, 0, 1})).

%% This node is not distributed in eunit, so there is no disterl connection to take the
%% address from: the host name's address is used.
a_listener_on_every_interface_is_reached_at_the_host_names_address_test() ->
    ?assertEqual({ok, {127, 0, 0, 1}},
                 teleport_discovery:peer_address('a@127.0.0.1', {0, 0, 0, 0})),
    ?assertEqual({ok, {127, 0, 0, 1}},
                 teleport_discovery:peer_address('a@127.0.0.1', {0, 0, 0, 0, 0, 0, 0, 0})).

a_listener_on_every_interface_with_no_host_to_resolve_has_no_address_test() ->
    ?assertEqual({error, {no_address, nohost, ""}},
                 teleport_discovery:peer_address(nohost, {0, 0, 0, 0})),
    ?assertEqual({error, {no_address, 'a@', ""}},
                 teleport_discovery:peer_address('a@', {0, 0, 0, 0, 0, 0, 0, 0})).

the_host_part_is_after_the_first_at_sign_test() ->
    ?assertEqual("host", teleport_discovery:host_part('name@host')),
    ?assertEqual("b@c", teleport_discovery:host_part('a@b@c')),
    ?assertEqual("", teleport_discovery:host_part('a@')),
    ?assertEqual("", teleport_discovery:host_part(nohost)).

asking_this_node_is_refused_without_asking_test() ->
    ?assertEqual({error, this_node}, teleport_discovery:ask(node(), 100)).

asking_from_a_node_that_is_not_distributed_says_so_test() ->
    case is_alive() of
        false -> ?assertEqual({error, not_distributed}, teleport_discovery:ask('x@y', 100));
        true -> ok % another test made this node distributed: nothing to check here
    end.

%%--------------------------------------------------------------------------------------------
%% Reasons in words

every_reason_is_a_sentence_naming_the_node_test() ->
    N = 'peer@somewhere',
    Reasons = [{no_dist_connection, N}, {no_teleport, N}, {no_answer, N, 5000},
               {call_failed, N, {unexpected_reply, what}}, {no_address, N, "somewhere"},
               {crashed, N, {badarith, [{m, f, 0, []}]}}],
    lists:foreach(
      fun(Reason) ->
              Text = teleport_discovery:explain(Reason),
              ?assert(io_lib:char_list(Text)),
              ?assertNotEqual(nomatch, string:find(Text, "peer@somewhere"))
      end, Reasons),
    ?assertNotEqual(nomatch, string:find(teleport_discovery:explain({no_answer, N, 5000}),
                                         "5000 ms")),
    ?assertNotEqual(nomatch, string:find(teleport_discovery:explain({crashed, N, boom}),
                                         "boom")),
    [?assert(io_lib:char_list(teleport_discovery:explain(R)))
     || R <- [this_node, not_distributed]].

%%--------------------------------------------------------------------------------------------
%% Retry schedule

a_stale_pool_is_looked_for_five_more_times_over_about_three_seconds_then_given_up_test() ->
    Waits = [W || F <- lists:seq(1, 5), {retry, W} <- [teleport_discovery:retry_delay(F)]],
    ?assertEqual([100, 200, 400, 800, 1600], Waits),
    ?assertEqual(give_up, teleport_discovery:retry_delay(6)),
    ?assertEqual(give_up, teleport_discovery:retry_delay(100)).

%%--------------------------------------------------------------------------------------------
%% Who waits, and workers that answer, crash or are killed

an_answer_goes_to_the_caller_that_waited_test() ->
    From = from(),
    P = teleport_discovery:find('n@h', From, fun() -> {ok, {127, 0, 0, 1}, 4000, 1024} end,
                                teleport_discovery:new()),
    ?assert(teleport_discovery:asking('n@h', P)),
    {Node, Outcome, Waiters, P1} = await_done(P),
    ?assertEqual({'n@h', {ok, {127, 0, 0, 1}, 4000, 1024}, [From]}, {Node, Outcome, Waiters}),
    ?assertNot(teleport_discovery:asking('n@h', P1)).

callers_for_a_node_share_one_worker_test() ->
    Self = self(),
    [F1, F2, F3] = [from() || _ <- [1, 2, 3]],
    Blocked = fun() ->
                      Self ! {asking, self()},
                      receive go -> {error, {no_teleport, 'n@h'}} end
              end,
    Never = fun() -> error(a_second_worker_ran) end,
    P0 = teleport_discovery:find('n@h', F1, Blocked, teleport_discovery:new()),
    P1 = teleport_discovery:find('n@h', F2, Never, P0),
    P2 = teleport_discovery:find('n@h', none, Never, P1),
    P3 = teleport_discovery:find('n@h', F3, Never, P2),
    Worker = receive {asking, W} -> W after 5000 -> error(no_worker) end,
    Worker ! go,
    {Node, Outcome, Waiters, _} = await_done(P3),
    ?assertEqual('n@h', Node),
    ?assertEqual({error, {no_teleport, 'n@h'}}, Outcome),
    ?assertEqual(lists:sort([F1, F2, F3]), lists:sort(Waiters)),
    receive {asking, _} -> error(a_second_worker_ran) after 0 -> ok end.

a_worker_that_exits_hands_back_its_callers_with_the_reason_test() ->
    [F1, F2] = [from(), from()],
    Exits = fun() -> exit(lost_the_plot) end,
    P0 = teleport_discovery:find('n@h', F1, Exits, teleport_discovery:new()),
    P = teleport_discovery:find('n@h', F2, Exits, P0),
    {'n@h', Outcome, Waiters, P1} = await_done(P),
    ?assertEqual({error, {crashed, 'n@h', lost_the_plot}}, Outcome),
    ?assertEqual(lists:sort([F1, F2]), lists:sort(Waiters)),
    ?assertNot(teleport_discovery:asking('n@h', P1)).

%% (The VM prints its own error report for the uncaught error: that is expected.)
a_worker_that_raises_hands_back_its_callers_with_the_error_test() ->
    From = from(),
    Raises = fun() -> {ok, _} = file:read_file("/nonexistent/teleport") end,
    P = teleport_discovery:find('n@h', From, Raises, teleport_discovery:new()),
    ?assertMatch({'n@h', {error, {crashed, 'n@h', {{badmatch, {error, enoent}}, [_ | _]}}},
                  [From], _},
                 await_done(P)).

a_worker_killed_from_outside_hands_back_its_callers_test() ->
    Self = self(),
    From = from(),
    Hangs = fun() -> Self ! {asking, self()}, receive never -> {error, this_node} end end,
    P = teleport_discovery:find('n@h', From, Hangs, teleport_discovery:new()),
    Worker = receive {asking, W} -> W after 5000 -> error(no_worker) end,
    exit(Worker, kill),
    ?assertMatch({'n@h', {error, {crashed, 'n@h', killed}}, [From], _}, await_done(P)).

workers_for_different_nodes_answer_separately_test() ->
    [FA, FB] = [from(), from()],
    P0 = teleport_discovery:find('a@h', FA, fun() -> {error, {no_teleport, 'a@h'}} end,
                                 teleport_discovery:new()),
    P1 = teleport_discovery:find('b@h', FB, fun() -> exit(boom) end, P0),
    {N1, _, W1, P2} = await_done(P1),
    {N2, _, W2, P3} = await_done(P2),
    ?assertEqual([{'a@h', [FA]}, {'b@h', [FB]}], lists:sort([{N1, W1}, {N2, W2}])),
    ?assertNot(teleport_discovery:asking('a@h', P3)),
    ?assertNot(teleport_discovery:asking('b@h', P3)).

a_monitor_that_is_not_a_workers_is_unknown_test() ->
    {Pid, Ref} = spawn_monitor(fun() -> ok end),
    receive {'DOWN', Ref, process, Pid, Reason} ->
            ?assertEqual(unknown, teleport_discovery:done(Ref, Reason, teleport_discovery:new()))
    after 5000 -> error(no_down)
    end.

%%--------------------------------------------------------------------------------------------
%% Helpers

%% A caller as gen_server:reply/2 takes it.
from() ->
    {self(), make_ref()}.

%% The next worker DOWN, taken by done/3 (which must know it).
await_done(P) ->
    receive
        {'DOWN', Ref, process, _, Reason} ->
            case teleport_discovery:done(Ref, Reason, P) of
                unknown -> error({unknown_down, Reason});
                Done -> Done
            end
    after 5000 ->
            error(no_worker_down)
    end.
