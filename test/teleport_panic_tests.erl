%% A Rust panic inside a NIF must never take the VM down: rustler's NIF wrapper catches the
%% unwind and raises `error:nif_panicked' in the calling process. teleport_nif:diag_panic/0
%% panics on purpose (native/teleport_nif/src/diag.rs).
%%
%% Each panic also prints a line or two on the VM's standard error (Rust's default panic
%% hook): expected here, and not a failure.
-module(teleport_panic_tests).

-include_lib("eunit/include/eunit.hrl").

-define(CALLS, 1000).

a_panic_raises_an_erlang_error_test() ->
    ?assertError(nif_panicked, teleport_nif:diag_panic()),
    %% The caller is alive and well, and so is the NIF.
    ?assert(is_process_alive(self())),
    ?assertEqual({ok, [1]}, teleport_codec:decode(teleport_codec:encode({ok, [1]}))).

a_panic_can_be_caught_and_inspected_test() ->
    Result = try teleport_nif:diag_panic() of
                 Value -> {returned, Value}
             catch
                 Class:Reason:Stack -> {Class, Reason, is_list(Stack)}
             end,
    ?assertEqual({error, nif_panicked, true}, Result).

a_panic_kills_only_the_calling_process_test() ->
    process_flag(trap_exit, true),
    Pid = spawn_link(fun() -> teleport_nif:diag_panic() end),
    receive
        {'EXIT', Pid, Reason} -> ?assertMatch({nif_panicked, [_ | _]}, Reason)
    after 5000 -> ?assert(false)
    end,
    process_flag(trap_exit, false).

many_panics_leave_the_vm_running_test_() ->
    {timeout, 120, fun many_panics/0}.

many_panics() ->
    %% Warm up first, so that one-off allocations (the panic hook's first message, atom and
    %% code loading) are not counted as growth.
    [catch teleport_nif:diag_panic() || _ <- lists:seq(1, 50)],
    garbage_collect(),
    Erl0 = erlang:memory(total),
    Rss0 = rss_bytes(),
    Errors = [panic_reason() || _ <- lists:seq(1, ?CALLS)],
    ?assertEqual(lists:duplicate(?CALLS, nif_panicked), Errors),
    %% Concurrently from many processes as well (several schedulers at once).
    Self = self(),
    Pids = [spawn_link(fun() -> Self ! {self(), [panic_reason() || _ <- lists:seq(1, 20)]} end)
            || _ <- lists:seq(1, 50)],
    [receive {P, Rs} -> ?assertEqual(lists:duplicate(20, nif_panicked), Rs) end || P <- Pids],
    garbage_collect(),
    Erl1 = erlang:memory(total),
    Rss1 = rss_bytes(),
    %% The payload of each panic is freed by rustler's catch_unwind: 2000 panics leave the
    %% VM's memory (and, where it can be read, the OS's view of it) roughly flat.
    ?assert(Erl1 - Erl0 < 16 * 1024 * 1024),
    case {Rss0, Rss1} of
        {undefined, _} -> ok;
        {_, undefined} -> ok;
        _ -> ?assert(Rss1 - Rss0 < 32 * 1024 * 1024)
    end,
    %% The NIF library still works.
    Term = {hello, [1, 2.5, <<"bin">>, #{k => v}], self(), make_ref()},
    ?assertEqual(Term, teleport_codec:decode(teleport_codec:encode(Term))),
    Big = lists:seq(1, 100000),
    ?assertEqual(Big, teleport_codec:decode(teleport_codec:encode(Big))).

panic_reason() ->
    try teleport_nif:diag_panic() of
        Value -> {returned, Value}
    catch
        error:Reason -> Reason
    end.

%% The resident set size of this OS process, from /proc (Linux), or `undefined'.
rss_bytes() ->
    case file:read_file("/proc/self/statm") of
        {ok, Statm} ->
            [_Size, Resident | _] = string:lexemes(Statm, " \n"),
            binary_to_integer(Resident) * 4096;
        {error, _} ->
            undefined
    end.
