%% Tests of the log bridge: teleport_log alone (fake NIF messages), then end to end from a
%% Rust `tracing' event emitted in a NIF to a `logger' handler.
%%
%% This module is also the `logger' handler: log/2 forwards each event of domain [teleport]
%% to the test process, as `{logged, LogEvent}'.
-module(teleport_log_tests).

-include_lib("eunit/include/eunit.hrl").

-export([log/2]).

-define(HANDLER, teleport_log_tests_handler).

%% logger handler callback.
log(LogEvent, #{config := #{pid := Pid}}) ->
    Pid ! {logged, LogEvent},
    ok.

%% Runs Test (or Test(Owned)) with teleport_log running and the handler sending to this
%% process. Owned: teleport_log was started here, not by a running teleport application.
%% The default handler is kept quiet about [teleport] meanwhile, in case it was configured to
%% print it (the floods would fill the test output).
with_bridge(Test) when is_function(Test, 0) ->
    with_bridge(fun(_Owned) -> Test() end);
with_bridge(Test) ->
    %% If the teleport application runs, its supervised teleport_log serves as well.
    Owned = whereis(teleport_log) =:= undefined,
    Owned andalso ({ok, _} = gen_server:start({local, teleport_log}, teleport_log, [], [])),
    ok = logger:add_handler(?HANDLER, ?MODULE,
                            #{level => all,
                              filter_default => log,
                              filters => [{teleport, {fun logger_filters:domain/2,
                                                      {stop, not_equal, [teleport]}}}],
                              config => #{pid => self()}}),
    _ = logger:add_handler_filter(default, ?HANDLER,
                                  {fun logger_filters:domain/2, {stop, sub, [teleport]}}),
    try
        Test(Owned)
    after
        _ = logger:remove_handler_filter(default, ?HANDLER),
        ok = logger:remove_handler(?HANDLER),
        %% The test may have restarted it: stop whichever runs now.
        Owned andalso gen_server:stop(teleport_log),
        flush()
    end.

flush() ->
    receive {logged, _} -> flush() after 0 -> ok end.

%% The next logged event whose report has Event; other events are skipped.
expect_event(Event) ->
    receive
        {logged, #{msg := {report, #{event := Event}}} = LogEvent} -> LogEvent
    after 2000 ->
        error({timeout, Event})
    end.

%% The next logged event with a format-string message that matches Re, as text.
expect_text(Re) ->
    receive
        {logged, #{msg := {Format, Args}}} = Msg when is_list(Format) ->
            Text = lists:flatten(io_lib:format(Format, Args)),
            case re:run(Text, Re, [unicode]) of
                {match, _} -> Text;
                nomatch -> error({unexpected, Msg})
            end
    after 3000 ->
        error({timeout, Re})
    end.

%% What the default formatter makes of an event, on one line.
formatted(LogEvent) ->
    lists:flatten(io_lib:format("~ts", [logger_formatter:format(LogEvent,
                                                                #{single_line => true})])).

%% --- teleport_log alone ------------------------------------------------------------------

report_test() ->
    with_bridge(fun() ->
        teleport_log ! {teleport_log, warning, connection_lost, #{peer => <<"a@b">>, index => 3}},
        #{level := Level, msg := {report, Report}, meta := Meta} = LogEvent =
            expect_event(connection_lost),
        ?assertEqual(warning, Level),
        ?assertMatch(#{domain := [teleport], peer := <<"a@b">>, index := 3,
                       teleport_event := connection_lost}, Meta),
        ?assertEqual(#{event => connection_lost, peer => <<"a@b">>, index => 3}, Report),
        ?assertMatch({match, _},
                     re:run(formatted(LogEvent), "teleport connection_lost: index=3 peer=a@b$"))
    end).

format_report_test() ->
    Text = fun(Report) ->
               {F, A} = teleport_log:format_report(Report),
               unicode:characters_to_binary(io_lib:format(F, A))
           end,
    ?assertEqual(<<"teleport accept_failed">>, Text(#{event => accept_failed})),
    ?assertEqual(<<"teleport e: a=true b=-1 c=\"connection reset\" d=\"\" e=\"k=v\" "
                   "f=dé"/utf8>>,
                 Text(#{event => e, a => true, b => -1, c => <<"connection reset">>, d => <<>>,
                        e => <<"k=v">>, f => <<"dé"/utf8>>})),
    ?assertEqual(<<"teleport e: x=<<255>>">>, Text(#{event => e, x => <<255>>})),
    ?assertEqual(<<"#{a => 1}">>, Text(#{a => 1})).

ignores_foreign_messages_test() ->
    with_bridge(fun() ->
        teleport_log ! {teleport_log, loud, e, #{}},
        teleport_log ! {teleport_log, warning, "e", #{}},
        teleport_log ! hello,
        teleport_log ! {teleport_log, warning, after_junk, #{}},
        _ = expect_event(after_junk),
        ?assert(is_process_alive(whereis(teleport_log)))
    end).

dropped_count_test() ->
    with_bridge(fun() ->
        teleport_log ! {teleport_log, warning, after_drops, #{dropped => 7, peer => <<"p">>}},
        "teleport: 7 log events were dropped" ++ _ = expect_text("log events were dropped"),
        #{msg := {report, Report}} = expect_event(after_drops),
        ?assertEqual(#{event => after_drops, peer => <<"p">>}, Report)
    end).

flood_test_() ->
    {timeout, 30, fun flood/0}.

flood() ->
    with_bridge(fun() ->
        T0 = erlang:monotonic_time(millisecond),
        [teleport_log ! {teleport_log, warning, flood_event, #{n => N}}
         || N <- lists:seq(1, 1000)],
        %% Another name is not held back by the flood.
        teleport_log ! {teleport_log, warning, other_event, #{}},
        Summary = expect_text("flood_event: [0-9]+ similar events suppressed"),
        Elapsed = erlang:monotonic_time(millisecond) - T0,
        Logged = count_flood(0),
        {match, [Suppressed]} = re:run(Summary, "([0-9]+) similar", [{capture, all_but_first,
                                                                        list}]),
        ?assertEqual(1000, Logged + list_to_integer(Suppressed)),
        ?assertEqual(20, Logged),
        _ = expect_event(other_event),
        ?assertEqual("teleport flood_event: 980 similar events suppressed", Summary),
        %% The summary comes once the window (a second) is over.
        ?assert(Elapsed >= 1000 andalso Elapsed < 3000),
        %% And nothing more: one summary per window.
        receive {logged, #{msg := {F, _}}} = M when is_list(F) -> error({unexpected, M})
        after 1200 -> ok
        end
    end).

%% Counts the flood events already in the mailbox (they precede the summary).
count_flood(N) ->
    receive {logged, #{msg := {report, #{event := flood_event}}}} -> count_flood(N + 1)
    after 0 -> N
    end.

%% --- end to end through the NIF ---------------------------------------------------------

nif_event_test() ->
    with_bridge(fun() ->
        %% The NIF runs on this process's normal scheduler; the record travels through the
        %% forwarding thread.
        ok = teleport_nif:log_emit_test(warning, <<"hello wörld"/utf8>>),
        #{level := warning, msg := {report, Report}, meta := Meta} = LogEvent =
            expect_event(test_event),
        ?assertMatch(#{domain := [teleport]}, Meta),
        ?assertEqual(#{event => test_event, text => <<"hello wörld"/utf8>>}, Report),
        ?assertMatch({match, _}, re:run(formatted(LogEvent), "teleport test_event: text=\"hello "
                                                             "wörld\"$", [unicode]))
    end).

nif_truncates_values_test() ->
    with_bridge(fun() ->
        ok = teleport_nif:log_emit_test(warning, binary:copy(<<"x">>, 5000)),
        #{msg := {report, #{text := Long}}} = expect_event(test_event),
        ?assertEqual(binary:copy(<<"x">>, 1024), Long),
        %% Cut at a character boundary: 1 + 511 * 2 bytes, not 1024.
        Accents = binary:copy(<<"é"/utf8>>, 600),
        ok = teleport_nif:log_emit_test(warning, <<"x", Accents/binary>>),
        #{msg := {report, #{text := Cut}}} = expect_event(test_event),
        ?assertEqual(<<"x", (binary:copy(<<"é"/utf8>>, 511))/binary>>, Cut)
    end).

nif_level_test() ->
    with_bridge(fun() ->
        try
            ok = teleport_log:set_level(error),
            ok = teleport_nif:log_emit_test(warning, <<"hidden">>),
            ok = teleport_nif:log_emit_test(error, <<"shown">>),
            %% Records arrive in order, so "hidden" would come first.
            #{level := error, msg := {report, #{text := <<"shown">>}}} =
                expect_event(test_event),
            ok = teleport_log:set_level(warning),
            ok = teleport_nif:log_emit_test(info, <<"hidden">>),
            ok = teleport_nif:log_emit_test(warning, <<"warning">>),
            #{level := warning, msg := {report, #{text := <<"warning">>}}} =
                expect_event(test_event),
            ?assertError(function_clause, teleport_log:set_level(trace)),
            ?assertError(badarg, teleport_nif:log_set_level(trace)),
            ?assertError(badarg, teleport_nif:log_emit_test(trace, <<>>))
        after
            ok = teleport_log:set_level(info)
        end
    end).

nif_debug_test() ->
    #{level := Primary} = logger:get_primary_config(),
    with_bridge(fun() ->
        try
            ok = logger:set_primary_config(level, all),
            ok = teleport_log:set_level(debug),
            ok = teleport_nif:log_emit_test(debug, <<"dbg">>),
            #{level := debug, msg := {report, #{text := <<"dbg">>}}} = expect_event(test_event)
        after
            ok = teleport_log:set_level(info),
            ok = logger:set_primary_config(level, Primary)
        end
    end).

nif_dropped_test() ->
    with_bridge(fun(false) ->
                        %% Supervised: stopping it here would just restart it.
                        ok;
                   (true) ->
                        nif_dropped()
                end).

nif_dropped() ->
    ok = gen_server:stop(teleport_log),
    [ok = teleport_nif:log_emit_test(warning, <<"lost">>) || _ <- [1, 2, 3]],
    %% Let the forwarding thread find no teleport_log and count the three.
    timer:sleep(200),
    {ok, _} = gen_server:start({local, teleport_log}, teleport_log, [], []),
    ok = teleport_nif:log_emit_test(warning, <<"found">>),
    Text = expect_text("log events were dropped"),
    {match, [N]} = re:run(Text, "teleport: ([0-9]+) log", [{capture, all_but_first, list}]),
    ?assert(list_to_integer(N) >= 3),
    #{msg := {report, #{text := <<"found">>} = Report}} = expect_event(test_event),
    ?assertNot(maps:is_key(dropped, Report)).
