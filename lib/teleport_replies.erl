%% @doc Hands replies that arrived over teleport to the callers waiting for them, through the
%% caller's alias (OTP 24+): once a caller has timed out its alias is gone, and a late reply
%% is dropped by the VM instead of landing in the caller's mailbox.
-module(teleport_replies).
-behaviour(gen_server).

-export([start_link/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

%% @doc Starts the server, registered as `teleport_replies'.
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() ->
    gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

%% @private
-spec init([]) -> {ok, #{}}.
init([]) ->
    {ok, #{}}.

%% @private
-spec handle_call(term(), gen_server:from(), map()) -> {reply, {error, unknown_request}, map()}.
handle_call(_Request, _From, State) ->
    {reply, {error, unknown_request}, State}.

%% @private
-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast(_Msg, State) ->
    {noreply, State}.

%% @private
-spec handle_info(term(), map()) -> {noreply, map()}.
handle_info({'$teleport_reply', Alias, Result}, State) when is_reference(Alias) ->
    Alias ! {Alias, Result},
    {noreply, State};
handle_info(Other, State) ->
    logger:notice("teleport_replies: ignored a message that is no reply: ~0P",
                  [Other, 10], #{domain => [teleport]}),
    {noreply, State}.
