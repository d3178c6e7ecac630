%% A plain gen_server, unaware of teleport, used as the callee in calls_SUITE.
-module(calls_test_server).
-behaviour(gen_server).

-export([start/1, init/1, handle_call/3, handle_cast/2]).

start(Name) ->
    gen_server:start({local, Name}, ?MODULE, [], []).

init([]) ->
    {ok, #{casts => []}}.

handle_call({echo, X}, _From, S) ->
    {reply, X, S};
handle_call({reply_from_other, X}, From, S) ->
    _ = spawn(fun() -> gen_server:reply(From, {other, X}) end),
    {noreply, S};
handle_call({reply_later, X, Ms}, From, S) ->
    _ = spawn(fun() -> timer:sleep(Ms), gen_server:reply(From, {later, X}) end),
    {noreply, S};
handle_call({sleep, Ms}, _From, S) ->
    timer:sleep(Ms),
    {reply, slept, S};
handle_call({crash, Reason}, _From, _S) ->
    exit(Reason);
handle_call({bytes, N}, _From, S) ->
    {reply, binary:copy(<<"x">>, N), S};
handle_call(from_pid, {Pid, _}, S) ->
    {reply, Pid, S};
handle_call(hold_replies, _From, S) ->
    {reply, ok, S#{held => []}};
handle_call({held, _} = Req, From, S = #{held := Held}) ->
    {noreply, S#{held := [{From, Req} | Held]}};
handle_call(release_replies, _From, S = #{held := Held}) ->
    _ = [gen_server:reply(From, Req) || {From, Req} <- Held],
    {reply, length(Held), maps:remove(held, S)};
handle_call(casts, _From, S = #{casts := Casts}) ->
    {reply, lists:reverse(Casts), S}.

handle_cast(Msg, S = #{casts := Casts}) ->
    {noreply, S#{casts := [Msg | Casts]}}.
