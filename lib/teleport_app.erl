%% @doc The `teleport' application.
-module(teleport_app).
-behaviour(application).

-export([start/2, stop/1]).

%% @private
-spec start(application:start_type(), term()) -> {ok, pid()} | {error, term()}.
start(_Type, _Args) ->
    teleport_sup:start_link().

%% @private
-spec stop(term()) -> ok.
stop(_State) ->
    ok.
