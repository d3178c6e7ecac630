%% @doc The owner of this node's teleport runtime: the listener (a NIF resource), the table
%% of pools to other nodes, and the node monitor that tears a pool down at `nodedown'.
%%
%% Pools are created here and only here, one at a time per node, so 200 processes sending
%% their first message to a fresh node at the same instant get the same pool: the first
%% `connect/1' starts finding the peer's listener and the others wait for its result. The
%% table is read directly by senders; only this process writes it.
%%
%% Peers find each other over distributed Erlang: `connect/1' asks the peer's
%% `teleport_server' for its listener, and that request is what allows the asking node to
%% connect in (with the cookie `erlang:get_cookie(Node)' gives for it).
-module(teleport_server).
-behaviour(gen_server).

-export([start_link/0, connect/1, reconnect/2, runtime/0, pool_info/0, listen_port/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-define(TABLE, teleport_pools).

-type state() :: #{runtime := teleport_nif:runtime(),
                   config := teleport_config:config(),
                   pending := #{node() => [gen_server:from()]}}.

%% @doc Starts the server (from `teleport_sup').
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() ->
    gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

%% @doc The pool to `Node', made if there is none yet. `{error, nodedown}' when the node
%% cannot be reached over distributed Erlang or does not run teleport.
-spec connect(node()) -> {ok, teleport_nif:pool()} | {error, nodedown | not_started}.
connect(Node) ->
    call({connect, Node}).

%% @doc Repairs the pool to `Node' after `Pool' answered `closed': a pool whose peer refused
%% it is pointed at where the peer listens now (its queued messages kept, in order); a pool
%% that was closed is replaced. `{error, nodedown}' if the peer cannot be found.
-spec reconnect(node(), teleport_nif:pool()) ->
          {ok, teleport_nif:pool()} | {error, nodedown | not_started}.
reconnect(Node, Pool) ->
    call({reconnect, Node, Pool}).

%% @doc This node's runtime (for stats), if teleport is running.
-spec runtime() -> {ok, teleport_nif:runtime()} | {error, not_started}.
runtime() ->
    case persistent_term:get({?MODULE, runtime}, undefined) of
        undefined -> {error, not_started};
        Rt -> {ok, Rt}
    end.

%% @doc The state of every connection of every pool.
-spec pool_info() -> #{node() => [map()]}.
pool_info() ->
    maps:from_list([{Node, teleport_nif:pool_info(Pool)}
                    || {Node, Pool} <- ets:tab2list(?TABLE)]).

%% @doc The port this node's teleport listener is bound to.
-spec listen_port() -> {ok, inet:port_number()} | {error, not_started}.
listen_port() ->
    case runtime() of
        {ok, Rt} -> {ok, teleport_nif:runtime_port(Rt)};
        Error -> Error
    end.

-spec call(term()) -> term().
call(Request) ->
    try
        gen_server:call(?MODULE, Request, infinity)
    catch
        exit:{noproc, _} -> {error, not_started}
    end.

%% @private
-spec init([]) -> {ok, state()} | {stop, term()}.
init([]) ->
    process_flag(trap_exit, true),
    try teleport_config:load() of
        Config -> start_runtime(Config)
    catch
        error:{invalid_config, _, _, _} = Reason -> {stop, Reason}
    end.

-spec start_runtime(teleport_config:config()) -> {ok, state()} | {stop, term()}.
start_runtime(Config) ->
    #{listen_ip := Ip, port := Port, max_frame_bytes := MaxFrame,
      handshake_timeout := HandshakeTimeout} = Config,
    Me = atom_to_binary(node(), utf8),
    case teleport_nif:runtime_start(Me, ip_text(Ip), Port, MaxFrame, HandshakeTimeout) of
        {ok, Rt} ->
            _ = ets:new(?TABLE, [named_table, protected, set, {read_concurrency, true}]),
            persistent_term:put({?MODULE, runtime}, Rt),
            ok = net_kernel:monitor_nodes(true),
            log_to_default_handler(maps:get(log_to_default_handler, Config)),
            logger:info("teleport listening on ~ts:~b",
                        [inet:ntoa(Ip), teleport_nif:runtime_port(Rt)],
                        #{domain => [teleport]}),
            {ok, #{runtime => Rt, config => Config, pending => #{}}};
        {error, Reason} ->
            {stop, {listen_failed, Ip, Port, Reason}}
    end.

%% @private
-spec handle_call(term(), gen_server:from(), state()) ->
          {reply, term(), state()} | {noreply, state()}.
handle_call({connect, Node}, From, State) ->
    case ets:lookup(?TABLE, Node) of
        [{_, Pool}] -> {reply, {ok, Pool}, State};
        [] -> {noreply, discover(Node, From, State)}
    end;
handle_call({reconnect, Node, Old}, From, State) ->
    case ets:lookup(?TABLE, Node) of
        [{_, Newer}] when Newer =/= Old ->
            {reply, {ok, Newer}, State};
        _ ->
            %% Find the listener again; the pool in the table, if any, is re-pointed.
            {noreply, discover(Node, From, State)}
    end;
handle_call(listen_info, {Pid, _}, State = #{runtime := Rt, config := #{listen_ip := Ip}}) ->
    %% A peer is about to connect in: let it, with the cookie we share with it.
    Node = node(Pid),
    set_name(Rt),
    allow(Rt, Node),
    {reply, {ok, #{port => teleport_nif:runtime_port(Rt), ip => Ip}}, State};
handle_call(_Request, _From, State) ->
    {reply, {error, unknown_request}, State}.

%% @private
-spec handle_cast(term(), state()) -> {noreply, state()}.
handle_cast(_Msg, State) ->
    {noreply, State}.

%% @private
-spec handle_info(term(), state()) -> {noreply, state()}.
handle_info({discovered, Node, Result}, State = #{pending := Pending}) ->
    {Waiters, Pending1} = case maps:take(Node, Pending) of
                              error -> {[], Pending};
                              Found -> Found
                          end,
    Reply = start_pool(Node, Result, State),
    [gen_server:reply(W, Reply) || W <- Waiters],
    {noreply, State#{pending := Pending1}};
handle_info({nodeup, Node}, State = #{config := #{eager_connect := true}}) ->
    case ets:member(?TABLE, Node) of
        true -> {noreply, State};
        false -> {noreply, discover(Node, none, State)}
    end;
handle_info({nodedown, Node}, State = #{runtime := Rt}) ->
    teleport_nif:runtime_forbid(Rt, atom_to_binary(Node, utf8)),
    case ets:take(?TABLE, Node) of
        [{_, Pool}] ->
            logger:info("teleport: ~ts is down, its pool is closed", [Node],
                        #{domain => [teleport], peer => Node}),
            teleport_nif:pool_close(Pool);
        [] ->
            ok
    end,
    {noreply, State};
handle_info(_Info, State) ->
    {noreply, State}.

%% @private
-spec terminate(term(), state()) -> ok.
terminate(_Reason, #{runtime := Rt}) ->
    [teleport_nif:pool_close(Pool) || {_, Pool} <- ets:tab2list(?TABLE)],
    teleport_nif:runtime_stop(Rt),
    _ = persistent_term:erase({?MODULE, runtime}),
    _ = logger:remove_handler_filter(default, ?MODULE),
    ok.

%% Lets OTP's default handler print events of domain [teleport] (it drops events with a
%% domain of their own unless told otherwise). Already there, or no default handler: fine.
-spec log_to_default_handler(boolean()) -> ok.
log_to_default_handler(false) ->
    ok;
log_to_default_handler(true) ->
    Filter = {fun logger_filters:domain/2, {log, sub, [teleport]}},
    _ = logger:add_handler_filter(default, ?MODULE, Filter),
    ok.

%% Starts finding `Node''s listener unless that is under way; `From' waits for the pool.
-spec discover(node(), gen_server:from() | none, state()) -> state().
discover(Node, From, State = #{pending := Pending, config := Config}) ->
    Waiters = [From || From =/= none],
    case Pending of
        #{Node := Others} ->
            State#{pending := Pending#{Node := Waiters ++ Others}};
        #{} ->
            Self = self(),
            Timeout = maps:get(discovery_timeout, Config),
            _ = spawn(fun() -> Self ! {discovered, Node, ask_listener(Node, Timeout)} end),
            State#{pending := Pending#{Node => Waiters}}
    end.

%% Runs in its own process: asks `Node''s teleport_server where it listens.
-spec ask_listener(node(), timeout()) -> {ok, inet:ip_address(), inet:port_number()} | {error, nodedown}.
ask_listener(Node, _Timeout) when Node =:= node() ->
    {error, nodedown};
ask_listener(Node, Timeout) ->
    case net_kernel:connect_node(Node) of
        true ->
            try gen_server:call({?MODULE, Node}, listen_info, Timeout) of
                {ok, #{port := Port, ip := Ip}} -> peer_address(Node, Ip, Port);
                _ -> {error, nodedown}
            catch
                exit:_ -> {error, nodedown}
            end;
        _ ->
            {error, nodedown}
    end.

%% A peer listening on every interface is reached at the address its disterl connection
%% comes from, else at its host name's address.
-spec peer_address(node(), inet:ip_address(), inet:port_number()) ->
          {ok, inet:ip_address(), inet:port_number()} | {error, nodedown}.
peer_address(Node, Ip, Port) when Ip =:= {0, 0, 0, 0}; Ip =:= {0, 0, 0, 0, 0, 0, 0, 0} ->
    case dist_peer_ip(Node) of
        {ok, PeerIp} -> {ok, PeerIp, Port};
        error -> {error, nodedown}
    end;
peer_address(_Node, Ip, Port) ->
    {ok, Ip, Port}.

-spec dist_peer_ip(node()) -> {ok, inet:ip_address()} | error.
dist_peer_ip(Node) ->
    Via = [Ctrl || {N, Ctrl} <- erlang:system_info(dist_ctrl), N =:= Node],
    case Via of
        [Port] when is_port(Port) ->
            case inet:peername(Port) of
                {ok, {Ip, _}} -> {ok, Ip};
                _ -> host_ip(Node)
            end;
        _ ->
            host_ip(Node)
    end.

-spec host_ip(node()) -> {ok, inet:ip_address()} | error.
host_ip(Node) ->
    case string:split(atom_to_list(Node), "@") of
        [_, Host] ->
            case inet:getaddr(Host, inet) of
                {ok, Ip} -> {ok, Ip};
                {error, _} -> error
            end;
        _ ->
            error
    end.

-spec start_pool(node(), {ok, inet:ip_address(), inet:port_number()} | {error, nodedown},
                 state()) -> {ok, teleport_nif:pool()} | {error, nodedown}.
start_pool(Node, Found, State) ->
    case {ets:lookup(?TABLE, Node), Found} of
        {[{_, Pool}], {ok, Ip, Port}} ->
            allow(maps:get(runtime, State), Node),
            ok = teleport_nif:pool_retarget(Pool, ip_text(Ip), Port),
            {ok, Pool};
        {[{_, Pool}], {error, nodedown}} ->
            %% The peer's teleport is gone while its node may still be up: what waited for
            %% it is dropped and counted.
            true = ets:delete(?TABLE, Node),
            teleport_nif:pool_close(Pool),
            {error, nodedown};
        {[], _} ->
            new_pool(Node, Found, State)
    end.

-spec new_pool(node(), {ok, inet:ip_address(), inet:port_number()} | {error, nodedown},
               state()) -> {ok, teleport_nif:pool()} | {error, nodedown}.
new_pool(Node, {ok, Ip, Port}, #{runtime := Rt, config := Config}) ->
    set_name(Rt),
    #{pool_size := Size, max_queue_bytes := MaxQueue, connect_timeout := ConnectTimeout,
      handshake_timeout := HandshakeTimeout} = Config,
    Cookie = atom_to_binary(erlang:get_cookie(Node), utf8),
    %% The peer may connect back to us too: let it, with the same cookie.
    allow(Rt, Node),
    case teleport_nif:pool_start(Rt, atom_to_binary(Node, utf8), ip_text(Ip), Port, Cookie,
                                 Size, MaxQueue, {ConnectTimeout, HandshakeTimeout}) of
        {ok, Pool} ->
            true = ets:insert(?TABLE, {Node, Pool}),
            {ok, Pool};
        {error, Reason} ->
            logger:warning("teleport: cannot start a pool to ~ts at ~ts:~b: ~p",
                           [Node, inet:ntoa(Ip), Port, Reason], #{domain => [teleport]}),
            {error, nodedown}
    end;
new_pool(_Node, {error, nodedown}, _State) ->
    {error, nodedown}.

%% The node may have become distributed (net_kernel:start/1) after teleport started.
-spec set_name(teleport_nif:runtime()) -> ok.
set_name(Rt) ->
    teleport_nif:runtime_set_name(Rt, atom_to_binary(node(), utf8)).

-spec allow(teleport_nif:runtime(), node()) -> ok.
allow(Rt, Node) ->
    Cookie = atom_to_binary(erlang:get_cookie(Node), utf8),
    teleport_nif:runtime_allow(Rt, atom_to_binary(Node, utf8), Cookie).

-spec ip_text(inet:ip_address()) -> binary().
ip_text(Ip) ->
    list_to_binary(inet:ntoa(Ip)).
