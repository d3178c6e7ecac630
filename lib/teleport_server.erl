%% @doc The owner of this node's teleport runtime: the listener (a NIF resource), the table
%% of pools to other nodes, and the node monitor that tears a pool down at `nodedown'.
%%
%% Pools are created here and only here, one at a time per node, so 200 processes sending
%% their first message to a fresh node at the same instant get the same pool: the first
%% `connect/1' starts finding the peer's listener and the others wait for its result. The
%% table (`teleport_pools') is read directly by senders; only this process writes it.
%%
%% Peers find each other over distributed Erlang (`teleport_discovery', in a monitored
%% worker): `connect/1' asks the peer's `teleport_server' for its listener, and that request
%% is what allows the asking node to connect in (with the cookie `erlang:get_cookie(Node)'
%% gives for it).
%%
%% When a peer cannot be found, callers get `{error, nodedown}' and the reason is logged
%% once (until it changes, or the node goes up or down): not reachable over distributed
%% Erlang, no teleport running there, no answer in time, no address to reach it at, or the
%% worker asking died.
%%
%% A pool whose peer refuses it (stale: the peer's teleport restarted, maybe on another
%% port) is pointed at where the peer listens now. While the peer's teleport is away and
%% its node up, the pool keeps its queue, sends to it keep queuing, and the listener is
%% looked for again a few times with backoff (`teleport_discovery:retry_delay/1'); only
%% then is the pool closed, its queue dropped and counted.
-module(teleport_server).
-behaviour(gen_server).

-export([start_link/0, connect/1, reconnect/2, runtime/0, pool_info/0, listen_port/0,
         listener_info/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-type state() :: #{runtime := teleport_nif:runtime(),
                   config := teleport_config:config(),
                   %% The nodes whose listener is being looked for, and who waits.
                   discovery := teleport_discovery:pending(),
                   %% Why each node could not be found, as last logged.
                   unreachable := #{node() => teleport_discovery:unreachable()},
                   %% Stale pools whose peer was not found again yet: failed attempts in a
                   %% row, and the timer of the next one.
                   retrying := #{node() => {pos_integer(), reference()}}}.

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

%% @doc The state of every connection of every pool (see `teleport:info/0' for the fields);
%% empty when teleport is not running.
-spec pool_info() -> #{node() => [map()]}.
pool_info() ->
    maps:from_list([{Node, teleport_nif:pool_info(Pool)}
                    || {Node, Pool} <- teleport_pools:all()]).

%% @doc The listener and its incoming connections (see `teleport:info/0'), with the socket
%% options in force.
-spec listener_info() -> {ok, map()} | {error, not_started}.
listener_info() ->
    case runtime() of
        {ok, Rt} ->
            Info = #{incoming := Incoming} = teleport_nif:runtime_info(Rt),
            Opts = persistent_term:get({?MODULE, socket_opts}, #{}),
            {ok, Info#{incoming := [In#{peer := peer_name(P)} || In = #{peer := P} <- Incoming],
                       socket_opts => Opts}};
        Error ->
            Error
    end.

%% Only a node allowed in by name (runtime_allow/3, with the atom's text) authenticates, so
%% the atom exists already; `undefined' while the handshake runs.
-spec peer_name(binary() | undefined) -> node() | undefined.
peer_name(undefined) -> undefined;
peer_name(Name) -> binary_to_existing_atom(Name, utf8).

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
%% Stops with `{invalid_config, Key, Value, Expected}' for a bad configuration value,
%% `{nif_not_loaded, Why}' when the NIF is missing, `{listen_failed, Ip, Port, Reason}'
%% when the listener cannot be opened, `{socket_opt_refused, Option, Value, Reason}' when
%% the kernel refuses a socket option.
-spec init([]) -> {ok, state()} | {stop, term()}.
init([]) ->
    process_flag(trap_exit, true),
    Result = try teleport_config:load() of
                 Config ->
                     case nif_loaded() of
                         ok -> start_runtime(Config);
                         {error, Reason} -> {stop, Reason}
                     end
             catch
                 error:{invalid_config, _, _, _} = Reason -> {stop, Reason}
             end,
    case Result of
        {stop, Why} ->
            %% No domain: OTP's default handler prints it before teleport's filter is set.
            logger:error("teleport cannot start: ~ts", [explain_start(Why)],
                         #{teleport => start_failed, reason => Why});
        {ok, _} ->
            ok
    end,
    Result.

%% Why teleport did not start, in words.
-spec explain_start(term()) -> string().
explain_start({invalid_config, socket_opts, Value, Expected}) ->
    lists:flatten(io_lib:format("bad socket_opts in the teleport application environment: "
                                "~0tp; expected ~ts", [Value, Expected]));
explain_start({invalid_config, Key, Value, Expected}) ->
    lists:flatten(io_lib:format("bad value of ~p in the teleport application environment: "
                                "~0tp; expected ~ts", [Key, Value, Expected]));
explain_start({nif_not_loaded, Why}) ->
    Why;
explain_start({socket_opt_refused, Option, Value, Reason}) ->
    lists:flatten(io_lib:format("the kernel refused socket option ~p = ~0tp: ~ts",
                                [Option, Value, Reason]));
explain_start({listen_failed, Ip, Port, Reason}) ->
    lists:flatten(io_lib:format("cannot listen on ~ts:~b: ~0tp",
                                [inet:ntoa(Ip), Port, Reason])).

%% teleport_nif's on_load has already logged where it looked and how to build the library.
-spec nif_loaded() -> ok | {error, {nif_not_loaded, string()}}.
nif_loaded() ->
    case code:ensure_loaded(teleport_nif) of
        {module, teleport_nif} ->
            ok;
        {error, What} ->
            {error, {nif_not_loaded,
                     lists:flatten(
                       io_lib:format("teleport_nif did not load (~p): priv/teleport_nif.so is "
                                     "missing or unloadable; build it with 'rebar3 compile', "
                                     "'mix compile' or 'sh native/build.sh'", [What]))}}
    end.

-spec start_runtime(teleport_config:config()) -> {ok, state()} | {stop, term()}.
start_runtime(Config) ->
    #{listen_ip := Ip, port := Port, max_frame_bytes := MaxFrame,
      handshake_timeout := HandshakeTimeout, socket_opts := SockOpts,
      thread_nice := ThreadNice, tls := Tls} = Config,
    Me = atom_to_binary(node(), utf8),
    Limits = #{max_frame_bytes => MaxFrame, handshake_timeout => HandshakeTimeout,
               thread_nice => ThreadNice},
    Started = case teleport_tls:nif_opts(Tls) of
                  {ok, TlsOpts} ->
                      teleport_nif:runtime_start(Me, ip_text(Ip), Port,
                                                 nif_socket_opts(SockOpts), Limits, TlsOpts);
                  {error, Unopened} ->
                      {error, {tls, Unopened}}
              end,
    case Started of
        {ok, Rt} ->
            ok = teleport_pools:new(),
            persistent_term:put({?MODULE, runtime}, Rt),
            persistent_term:put({?MODULE, socket_opts}, SockOpts),
            ok = net_kernel:monitor_nodes(true),
            log_to_default_handler(maps:get(log_to_default_handler, Config)),
            logger:info("teleport listening on ~ts:~b",
                        [inet:ntoa(Ip), teleport_nif:runtime_port(Rt)],
                        #{domain => [teleport]}),
            {ok, #{runtime => Rt, config => Config, discovery => teleport_discovery:new(),
                   unreachable => #{}, retrying => #{}}};
        {error, {socket_opt, Option, Reason}} ->
            {stop, {socket_opt_refused, Option, maps:get(Option, SockOpts, undefined), Reason}};
        {error, {tls, Why}} ->
            %% The files as the key named them (its password stays in its closure).
            {stop, {invalid_config, tls, Tls, unicode:characters_to_list(Why)}};
        {error, Reason} ->
            {stop, {listen_failed, Ip, Port, Reason}}
    end.

%% The socket options as the NIF takes them: addresses as text.
-spec nif_socket_opts(teleport_config:socket_opts()) ->
          #{atom() => integer() | boolean() | binary()}.
nif_socket_opts(Opts = #{bind_ip := Ip}) -> Opts#{bind_ip := ip_text(Ip)};
nif_socket_opts(Opts) -> Opts.

%% @private
-spec handle_call(term(), gen_server:from(), state()) ->
          {reply, term(), state()} | {noreply, state()}.
handle_call({connect, Node}, From, State) ->
    case teleport_pools:lookup(Node) of
        {ok, Pool} -> {reply, {ok, Pool}, State};
        _ -> {noreply, discover(Node, From, State)}
    end;
handle_call({reconnect, Node, Old}, From, State = #{retrying := Retrying}) ->
    case teleport_pools:lookup(Node) of
        {ok, Newer} when Newer =/= Old ->
            {reply, {ok, Newer}, State};
        {ok, Pool} when is_map_key(Node, Retrying) ->
            %% The peer's teleport is away and will be looked for again shortly: the send
            %% that got `closed' queues behind the others instead of waiting for that.
            keep_queuing(Node, Pool),
            {reply, {ok, Pool}, State};
        _ ->
            %% Find the listener again; the pool in the table, if any, is re-pointed.
            {noreply, discover(Node, From, State)}
    end;
handle_call(listen_info, {Pid, _}, State = #{runtime := Rt, config := Config}) ->
    %% A peer is about to connect in: let it, with the cookie we share with it. Our frame
    %% limit lets it refuse a message too large for us before its first connection is up.
    #{listen_ip := Ip, max_frame_bytes := MaxFrame} = Config,
    Node = node(Pid),
    set_name(Rt),
    allow(Rt, Node),
    {reply, {ok, #{port => teleport_nif:runtime_port(Rt), ip => Ip,
                   max_frame_bytes => MaxFrame}}, State};
handle_call(_Request, _From, State) ->
    {reply, {error, unknown_request}, State}.

%% @private
-spec handle_cast(term(), state()) -> {noreply, state()}.
handle_cast(_Msg, State) ->
    {noreply, State}.

%% @private
-spec handle_info(term(), state()) -> {noreply, state()}.
handle_info({'DOWN', Ref, process, _, Reason}, State = #{discovery := Discovery}) ->
    %% A discovery worker is done (answered, crashed or killed): everyone waiting for that
    %% node is answered now, a crash included ({error, nodedown}, the reason logged).
    case teleport_discovery:done(Ref, Reason, Discovery) of
        {Node, Outcome, Waiters, Discovery1} ->
            {noreply, discovered(Node, Outcome, Waiters, State#{discovery := Discovery1})};
        unknown ->
            {noreply, State}
    end;
handle_info({timeout, Timer, {rediscover, Node}}, State = #{retrying := Retrying}) ->
    %% Time to look again for a stale pool's peer (a timer of a spell that ended since,
    %% found or given up, is ignored).
    case Retrying of
        #{Node := {_, Timer}} -> {noreply, discover(Node, none, State)};
        #{} -> {noreply, State}
    end;
handle_info({nodeup, Node}, State = #{config := #{eager_connect := true}}) ->
    State1 = forget_unreachable(Node, State),
    case teleport_pools:member(Node) of
        true -> {noreply, State1};
        false -> {noreply, discover(Node, none, State1)}
    end;
handle_info({nodeup, Node}, State) ->
    {noreply, forget_unreachable(Node, State)};
handle_info({nodedown, Node}, State0 = #{runtime := Rt}) ->
    State = stop_retrying(Node, forget_unreachable(Node, State0)),
    teleport_nif:runtime_forbid(Rt, atom_to_binary(Node, utf8)),
    case teleport_pools:take(Node) of
        {ok, Pool} ->
            logger:info("teleport: ~ts is down, its pool is closed", [Node],
                        #{domain => [teleport], peer => Node}),
            teleport_nif:pool_close(Pool);
        none ->
            ok
    end,
    {noreply, State};
handle_info({teleport_pool_stale, PeerBin}, State = #{retrying := Retrying}) ->
    %% A pool's writer was refused where the peer's listener was (its teleport restarted on
    %% another port, or it no longer lets us in): find it again now, so that what is queued
    %% goes out even if nobody sends any more. Refused again while the peer is being looked
    %% for again: the pool keeps queuing. The name is one of our pools' peers, so its atom
    %% exists.
    Node = binary_to_existing_atom(PeerBin, utf8),
    case teleport_pools:lookup(Node) of
        {ok, Pool} when is_map_key(Node, Retrying) ->
            keep_queuing(Node, Pool),
            {noreply, State};
        {ok, _} ->
            {noreply, discover(Node, none, State)};
        _ ->
            {noreply, State}
    end;
handle_info({teleport_accepted, Reader}, State) ->
    %% A connection authenticated: its reader reads it from now on. One that cannot start
    %% drops the connection (logged), and the peer sends again on its next one.
    case teleport_reader_sup:start_reader(Reader) of
        {ok, _} ->
            ok;
        {error, Reason} ->
            logger:warning("teleport: no reader for an incoming connection: ~0p", [Reason],
                           #{domain => [teleport], reason => Reason})
    end,
    {noreply, State};
handle_info(_Info, State) ->
    {noreply, State}.

%% @private
-spec terminate(term(), state()) -> ok.
terminate(_Reason, #{runtime := Rt}) ->
    [teleport_nif:pool_close(Pool) || {_, Pool} <- teleport_pools:all()],
    teleport_nif:runtime_stop(Rt),
    _ = persistent_term:erase({?MODULE, runtime}),
    _ = persistent_term:erase({?MODULE, socket_opts}),
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
discover(Node, From, State = #{discovery := Discovery, config := Config}) ->
    Timeout = maps:get(discovery_timeout, Config),
    Ask = fun() -> teleport_discovery:ask(Node, Timeout) end,
    State#{discovery := teleport_discovery:find(Node, From, Ask, Discovery)}.

%% Answers everyone who waited for `Node''s listener, and sees to its pool: a found
%% listener gets a pool, or has the pool pointed at it. A stale pool whose peer is not
%% found is looked for again a few times, its queue kept, before it is given up.
-spec discovered(node(), teleport_discovery:outcome(), [gen_server:from()], state()) ->
          state().
discovered(Node, {ok, Ip, Port, _} = Found, Waiters, State0 = #{retrying := Retrying}) ->
    case Retrying of
        #{Node := {Failures, _}} ->
            logger:notice("teleport: found ~ts's listener again at ~ts:~b after ~b failed "
                          "attempts; what its pool queued goes out there",
                          [Node, inet:ntoa(Ip), Port, Failures],
                          #{domain => [teleport], peer => Node});
        #{} ->
            ok
    end,
    State = stop_retrying(Node, forget_unreachable(Node, State0)),
    reply_all(Waiters, start_pool(Node, Found, State)),
    State;
discovered(Node, {error, Why}, Waiters, State) ->
    case teleport_pools:lookup(Node) of
        {ok, Pool} ->
            retry_or_give_up(Node, Pool, Why, Waiters, State);
        _ ->
            reply_all(Waiters, {error, nodedown}),
            note_unreachable(Node, Why, State)
    end.

%% A stale pool's peer was not found (its teleport may be restarting, or gone while the
%% node stays up): look again after a wait, the pool queuing meanwhile (callers get it
%% back, and their sends queue), or, once the attempts are spent (see
%% teleport_discovery:retry_delay/1), close the pool: what it queued is dropped and
%% counted, and sends get {error, nodedown}.
-spec retry_or_give_up(node(), teleport_nif:pool(), teleport_discovery:unreachable(),
                       [gen_server:from()], state()) -> state().
retry_or_give_up(Node, Pool, Why, Waiters, State = #{retrying := Retrying}) ->
    Failures = case Retrying of
                   #{Node := {F, _}} -> F + 1;
                   #{} -> 1
               end,
    case teleport_discovery:retry_delay(Failures) of
        {retry, Wait} ->
            case Failures of
                1 ->
                    Waits = teleport_discovery:retry_waits(),
                    logger:notice("teleport: cannot find ~ts's listener again: ~ts; its pool "
                                  "keeps its queue while it is looked for again (~b times "
                                  "over ~b ms)",
                                  [Node, teleport_discovery:explain(Why), length(Waits),
                                   lists:sum(Waits)],
                                  #{domain => [teleport], peer => Node, reason => Why});
                _ ->
                    ok
            end,
            keep_queuing(Node, Pool),
            Timer = erlang:start_timer(Wait, self(), {rediscover, Node}),
            reply_all(Waiters, {ok, Pool}),
            State#{retrying := Retrying#{Node => {Failures, Timer}}};
        give_up ->
            {ok, Pool} = teleport_pools:take(Node),
            teleport_nif:pool_close(Pool),
            logger:warning("teleport: gave up finding ~ts's listener after ~b attempts: ~ts; "
                           "its pool is closed, what it queued is dropped (counted in "
                           "stats/0 as dropped), and sends to it return {error, nodedown}",
                           [Node, Failures, teleport_discovery:explain(Why)],
                           #{domain => [teleport], peer => Node, reason => Why}),
            reply_all(Waiters, {error, nodedown}),
            #{unreachable := Seen} = State,
            State#{retrying := maps:remove(Node, Retrying), unreachable := Seen#{Node => Why}}
    end.

%% Clears a stale pool's mark without moving it: pointed again where it already points, its
%% connections keep waiting out their backoff (no busy loop against a peer that is away),
%% and sends to it queue again instead of answering `closed'.
-spec keep_queuing(node(), teleport_nif:pool()) -> ok.
keep_queuing(Node, Pool) ->
    {ok, {Ip, Port}} = teleport_pools:target(Node),
    ok = teleport_nif:pool_retarget(Pool, ip_text(Ip), Port, cookie(Node)).

%% Ends `Node''s retry spell, if any.
-spec stop_retrying(node(), state()) -> state().
stop_retrying(Node, State = #{retrying := Retrying}) ->
    case maps:take(Node, Retrying) of
        {{_, Timer}, Retrying1} ->
            _ = erlang:cancel_timer(Timer),
            State#{retrying := Retrying1};
        error ->
            State
    end.

-spec reply_all([gen_server:from()], term()) -> ok.
reply_all(Waiters, Reply) ->
    lists:foreach(fun(W) -> gen_server:reply(W, Reply) end, Waiters).

%% Logs why `Node' cannot be reached, once per reason.
-spec note_unreachable(node(), teleport_discovery:unreachable(), state()) -> state().
note_unreachable(Node, Why, State = #{unreachable := Seen}) ->
    case Seen of
        #{Node := Why} ->
            State;
        #{} ->
            logger:warning("teleport: cannot reach ~ts: ~ts; sends to it return "
                           "{error, nodedown}", [Node, teleport_discovery:explain(Why)],
                           #{domain => [teleport], peer => Node, reason => Why}),
            State#{unreachable := Seen#{Node => Why}}
    end.

-spec forget_unreachable(node(), state()) -> state().
forget_unreachable(Node, State = #{unreachable := Seen}) ->
    State#{unreachable := maps:remove(Node, Seen)}.

%% Points the pool to `Node' at its listener, or starts one.
-spec start_pool(node(), teleport_discovery:found(), state()) ->
          {ok, teleport_nif:pool()} | {error, nodedown}.
start_pool(Node, {ok, Ip, Port, MaxFrame} = Found, State) ->
    case teleport_pools:lookup(Node) of
        {ok, Pool} ->
            %% The cookie is read again for every repair, on both sides (allow/2 here, and
            %% the peer's listen_info): an operator who fixes a wrong cookie at runtime
            %% (erlang:set_cookie/2) heals the pool at its next refused handshake.
            allow(maps:get(runtime, State), Node),
            limit_frames(Pool, MaxFrame),
            ok = teleport_nif:pool_retarget(Pool, ip_text(Ip), Port, cookie(Node)),
            ok = teleport_pools:retarget(Node, {Ip, Port}),
            {ok, Pool};
        _ ->
            new_pool(Node, Found, State)
    end.

-spec new_pool(node(), teleport_discovery:found(), state()) ->
          {ok, teleport_nif:pool()} | {error, nodedown}.
new_pool(Node, {ok, Ip, Port, MaxFrame}, #{runtime := Rt, config := Config}) ->
    set_name(Rt),
    #{pool_size := Size, max_queue_bytes := MaxQueue, connect_timeout := ConnectTimeout,
      handshake_timeout := HandshakeTimeout} = Config,
    %% The peer may connect back to us too: let it, with the same cookie.
    allow(Rt, Node),
    case teleport_nif:pool_start(Rt, atom_to_binary(Node, utf8), ip_text(Ip), Port, cookie(Node),
                                 Size, MaxQueue, {ConnectTimeout, HandshakeTimeout}) of
        {ok, Pool} ->
            limit_frames(Pool, MaxFrame),
            ok = teleport_pools:insert(Node, Pool, {Ip, Port}),
            {ok, Pool};
        {error, Reason} ->
            logger:warning("teleport: cannot start a pool to ~ts at ~ts:~b: ~tp; sends to it "
                           "return {error, nodedown}",
                           [Node, inet:ntoa(Ip), Port, Reason],
                           #{domain => [teleport], peer => Node}),
            {error, nodedown}
    end.

%% Tells the pool the largest frame its peer reads, when the peer said.
-spec limit_frames(teleport_nif:pool(), pos_integer() | undefined) -> ok.
limit_frames(_Pool, undefined) -> ok;
limit_frames(Pool, MaxFrame) -> teleport_nif:pool_limit_frames(Pool, MaxFrame).

%% The node may have become distributed (net_kernel:start/1) after teleport started.
-spec set_name(teleport_nif:runtime()) -> ok.
set_name(Rt) ->
    teleport_nif:runtime_set_name(Rt, atom_to_binary(node(), utf8)).

-spec allow(teleport_nif:runtime(), node()) -> ok.
allow(Rt, Node) ->
    teleport_nif:runtime_allow(Rt, atom_to_binary(Node, utf8), cookie(Node)).

%% The cookie shared with `Node' now.
-spec cookie(node()) -> binary().
cookie(Node) ->
    atom_to_binary(erlang:get_cookie(Node), utf8).

-spec ip_text(inet:ip_address()) -> binary().
ip_text(Ip) ->
    list_to_binary(inet:ntoa(Ip)).
