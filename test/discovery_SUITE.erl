%% Finding a peer's listener, between real nodes started with OTP's `peer' on this machine:
%% a discovery worker that dies still has its callers answered.
%%
%% The runner starts distribution if needed; every case starts fresh peers, and
%% end_per_testcase stops them, even after a failure.
-module(discovery_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile([export_all, nowarn_export_all]).

-define(PEERS, discovery_SUITE_peers).

suite() ->
    [{timetrap, {seconds, 60}}].

all() ->
    [a_discovery_worker_that_dies_still_answers_every_caller].

init_per_suite(Config) ->
    Started = teleport_test_util:start_distribution("discovery_ct_"),
    Holder = teleport_test_util:start_tables([{?PEERS, [set]}]),
    [{started_dist, Started}, {peer_table_holder, Holder} | Config].

end_per_suite(Config) ->
    teleport_test_util:reset_teleport(),
    ?config(peer_table_holder, Config) ! stop,
    teleport_test_util:stop_distribution(?config(started_dist, Config)),
    ok.

init_per_testcase(_, Config) ->
    flush(),
    Config.

end_per_testcase(_, _Config) ->
    [teleport_soak:stop_peer(S) || {_, S} <- ets:tab2list(?PEERS)],
    true = ets:delete_all_objects(?PEERS),
    _ = logger:remove_handler(discovery_capture),
    teleport_test_util:reset_teleport(),
    flush(),
    ok.

%%--------------------------------------------------------------------------------------------
%% A worker that dies

%% The peer runs no teleport, but a process registered there as teleport_server takes the
%% runner's question and never answers (the runner's discovery_timeout is 10 minutes, so
%% nothing but the worker's death can end the wait). Three senders wait for the pool. The
%% worker is killed: every sender gets {error, nodedown} and the log names the reason.
%%
%% Fixed bug: the worker was a bare spawn; had it died, its callers (in
%% gen_server:call(..., infinity)) would have waited for ever.
a_discovery_worker_that_dies_still_answers_every_caller(_Config) ->
    teleport_test_util:restart_teleport([{discovery_timeout, 600000}]),
    {P, Node} = start_peer(#{teleport => false}),
    Self = self(),
    _ = peer:call(P, erlang, spawn, [?MODULE, silent_server, [Self]]),
    receive {silent_server, registered} -> ok after 5000 -> ct:fail(no_silent_server) end,
    capture_logs(),
    Senders = [spawn_link(fun() -> Self ! {sent, I, teleport:send({x, Node}, I)} end)
               || I <- [1, 2, 3]],
    Worker = receive {asked_by, W} -> W after 10000 -> ct:fail(nobody_asked) end,
    ct:pal("discovery worker ~p (senders ~p) asked; killing it", [Worker, Senders]),
    exit(Worker, kill),
    Results = [receive {sent, I, R} -> R after 30000 -> {no_answer, I} end || I <- [1, 2, 3]],
    ?assertEqual(lists:duplicate(3, {error, nodedown}), Results),
    Line = wait_log(fun(T) -> string:find(T, "cannot reach") =/= nomatch end),
    ct:pal("logged: ~ts", [Line]),
    ?assertNotEqual(nomatch, string:find(Line, "died: killed")),
    ?assertNotEqual(nomatch, string:find(Line, atom_to_list(Node))),
    ok.

%% On the peer: stands in for a teleport_server that takes calls and never answers; tells
%% the runner which process asked.
silent_server(Runner) ->
    true = register(teleport_server, self()),
    Runner ! {silent_server, registered},
    silent_loop(Runner).

silent_loop(Runner) ->
    receive
        {'$gen_call', {Pid, _Tag}, listen_info} -> Runner ! {asked_by, Pid}, silent_loop(Runner);
        _ -> silent_loop(Runner)
    end.

%%--------------------------------------------------------------------------------------------
%% Helpers

start_peer(Opts) ->
    Name = peer:random_name(discovery),
    case teleport_soak:start_peer(Name, Opts#{on_start => fun record_peer/1}) of
        {ok, {P, Node, _}} -> {P, Node};
        {error, Reason} -> ct:fail({peer_start_failed, Name, Reason})
    end.

record_peer({Peer, _, _} = Started) ->
    true = ets:insert(?PEERS, {Peer, Started}).

%% Sends this node's log events (of domain [teleport]) to the test process as text.
capture_logs() ->
    Self = self(),
    _ = logger:remove_handler(discovery_capture),
    ok = logger:add_handler(discovery_capture, ?MODULE, #{config => #{pid => Self}}).

%% logger handler callback for capture_logs/0.
log(#{msg := Msg, meta := Meta}, #{config := #{pid := Pid}}) ->
    case maps:get(domain, Meta, []) of
        [teleport | _] -> Pid ! {log, text(Msg)};
        _ -> ok
    end.

text({string, S}) -> unicode:characters_to_list(S);
text({report, R}) -> lists:flatten(io_lib:format("~0tp", [R]));
text({Format, Args}) -> lists:flatten(io_lib:format(Format, Args)).

%% The first captured log line that Pred accepts (within 10 s).
wait_log(Pred) ->
    receive
        {log, Text} ->
            case Pred(Text) of
                true -> Text;
                false -> wait_log(Pred)
            end
    after 10000 ->
            ct:fail(no_such_log_line)
    end.

flush() ->
    receive _ -> flush() after 0 -> ok end.
