%% @doc The application environment of `teleport', read and checked in one place.
%%
%% Every key has a default; a bad value stops the application with
%% `{invalid_config, Key, Value, Expected}', naming the key and what it accepts.
%%
%% `socket_opts' is a map or a proplist of socket options, applied to every teleport
%% connection (both directions) and to the listening socket:
%% <ul>
%% <li>`sndbuf', `recbuf': `SO_SNDBUF', `SO_RCVBUF' in bytes; unset (the default), the
%% kernel autotunes them;</li>
%% <li>`nodelay': `TCP_NODELAY', default `true';</li>
%% <li>`keepalive': `SO_KEEPALIVE', default `false'; `keepalive_time',
%% `keepalive_interval' (seconds) and `keepalive_retries' set its timings and turn it on;</li>
%% <li>`priority': `SO_PRIORITY'; `tos': `IP_TOS' (`IPV6_TCLASS' on IPv6);</li>
%% <li>`user_timeout': `TCP_USER_TIMEOUT' in milliseconds;</li>
%% <li>`bind_ip': the local address of outgoing connections.</li>
%% </ul>
%% A bad option is reported as `{invalid_config, socket_opts, {Option, Value}, Expected}',
%% `Expected' naming the option and the values it accepts.
%%
%% `tls' says whether and how teleport's connections are encrypted: `false', a map of PEM
%% files, `{optfile, Path}', or unset (as disterl does); `teleport_tls' has its forms.
-module(teleport_config).

-export([load/0, defaults/0, socket_opts/1]).

-type config() :: #{port := inet:port_number(),
                    listen_ip := inet:ip_address(),
                    pool_size := pos_integer(),
                    max_queue_bytes := pos_integer(),
                    max_frame_bytes := pos_integer(),
                    eager_connect := boolean(),
                    connect_timeout := pos_integer(),
                    handshake_timeout := pos_integer(),
                    discovery_timeout := pos_integer(),
                    log_to_default_handler := boolean(),
                    thread_nice := 0..19,
                    socket_opts := socket_opts(),
                    %% `disterl' only in defaults/0: load/0 resolves it.
                    tls := teleport_tls:config() | disterl}.
-type socket_opts() :: #{sndbuf => pos_integer(),
                         recbuf => pos_integer(),
                         nodelay := boolean(),
                         keepalive := boolean(),
                         keepalive_time => pos_integer(),
                         keepalive_interval => pos_integer(),
                         keepalive_retries => pos_integer(),
                         priority => non_neg_integer(),
                         tos => 0..255,
                         user_timeout => non_neg_integer(),
                         bind_ip => inet:ip_address()}.
-export_type([config/0, socket_opts/0]).

-define(INT_MAX, 2147483647).

%% @doc The default of every key.
-spec defaults() -> config().
defaults() ->
    #{port => 0,
      listen_ip => dist_ip(),
      %% One connection per scheduler lets every scheduler's senders write at once;
      %% at least 2 so one large message never holds up all the others.
      pool_size => max(2, erlang:system_info(schedulers_online)),
      max_queue_bytes => 64 * 1024 * 1024,
      max_frame_bytes => 1024 * 1024 * 1024,
      eager_connect => false,
      connect_timeout => 5000,
      handshake_timeout => 5000,
      discovery_timeout => 5000,
      %% OTP's default handler drops events with a domain of their own; teleport's
      %% warnings about peers are worth seeing without configuring anything.
      log_to_default_handler => true,
      %% teleport's OS threads run this much below the VM's schedulers (a nice value), so
      %% that with the CPU short the schedulers win and disterl's own small traffic is served;
      %% with the CPU free it costs nothing (README, Configuration, has the measurement).
      thread_nice => 10,
      %% Buffers are left to the kernel's autotuning: fixed sizes measured no faster on
      %% one stream and slower with 256 KB (README, Configuration).
      socket_opts => socket_opts(#{}),
      %% As disterl: plain beside plain disterl, disterl's files beside disterl over TLS.
      tls => disterl}.

%% @doc Reads every key from the `teleport' application environment, with defaults.
%% Raises `error({invalid_config, Key, Value, Expected})' on a bad value.
-spec load() -> config().
load() ->
    maps:map(fun(Key, Default) ->
                     check(Key, application:get_env(teleport, Key, Default))
             end, defaults()).

-spec check(atom(), term()) -> term().
check(port, V) when is_integer(V), V >= 0, V =< 65535 -> V;
check(port, V) -> bad(port, V, "an integer 0..65535 (0: any free port)");
check(listen_ip, V) ->
    case parse_ip(V) of
        {ok, Ip} -> Ip;
        error -> bad(listen_ip, V, "an IP address tuple or string, or 'any'")
    end;
check(Key, V) when is_boolean(V), Key =:= eager_connect orelse Key =:= log_to_default_handler ->
    V;
check(Key, V) when Key =:= eager_connect; Key =:= log_to_default_handler ->
    bad(Key, V, "true or false");
check(socket_opts, V) ->
    socket_opts(V);
check(tls, V) ->
    teleport_tls:check(V);
check(thread_nice, V) when is_integer(V), V >= 0, V =< 19 -> V;
check(thread_nice, V) ->
    bad(thread_nice, V, "an integer 0..19: how much lower than the VM's the priority of "
        "teleport's threads is (a nice value; 0: the same)");
check(Key, V) when is_integer(V), V > 0 -> check_size(Key, V);
check(Key, V) -> bad(Key, V, "a positive integer").

-spec check_size(atom(), pos_integer()) -> pos_integer().
check_size(max_frame_bytes, V) when V > 16#FFFFFFFF ->
    bad(max_frame_bytes, V, "at most 4294967295 (frames carry a 32-bit length)");
check_size(pool_size, V) when V > 1024 ->
    bad(pool_size, V, "at most 1024");
check_size(_Key, V) -> V.

%% @doc Checks socket options given as a map or a proplist (`[{sndbuf, 1048576}, nodelay]')
%% and completes them with the defaults. Raises `error({invalid_config, socket_opts,
%% {Option, Value}, Expected})' for a bad one.
-spec socket_opts(term()) -> socket_opts().
socket_opts(Opts) when is_map(Opts) ->
    socket_opts_map(Opts);
socket_opts(Opts) when is_list(Opts) ->
    Pairs = [socket_opt_pair(O) || O <- Opts],
    %% As proplists:get_value/2 reads a list: the first of two entries wins.
    socket_opts_map(maps:from_list(lists:reverse(Pairs)));
socket_opts(Opts) ->
    bad(socket_opts, Opts, "a map or a proplist of socket options: " ++ option_names()).

-spec socket_opt_pair(term()) -> {atom(), term()}.
socket_opt_pair({Key, Value}) when is_atom(Key) -> {Key, Value};
socket_opt_pair(Key) when is_atom(Key) -> {Key, true};
socket_opt_pair(Other) ->
    bad(socket_opts, Other, "{Option, Value} or an option name (true), the options: " ++
            option_names()).

-spec socket_opts_map(map()) -> socket_opts().
socket_opts_map(Opts) ->
    Pairs = lists:sort(maps:to_list(Opts)),
    case [Pair || {K, _} = Pair <- Pairs, not lists:member(K, socket_opt_keys())] of
        [Unknown | _] -> bad(socket_opts, Unknown, "one of the options " ++ option_names());
        [] -> ok
    end,
    Checked = maps:from_list([{K, check_socket_opt(K, V)} || {K, V} <- Pairs]),
    Timings = [K || K <- [keepalive_time, keepalive_interval, keepalive_retries],
                    maps:is_key(K, Checked)],
    Keepalive = case {maps:find(keepalive, Checked), Timings} of
                    {{ok, false}, [_ | _]} ->
                        bad(socket_opts, {keepalive, false},
                            "keepalive: true (or not given) when keepalive_time, "
                            "keepalive_interval or keepalive_retries is set");
                    {{ok, On}, _} -> On;
                    {error, []} -> false;
                    {error, _} -> true
                end,
    maps:merge(#{nodelay => true}, Checked#{keepalive => Keepalive}).

-spec socket_opt_keys() -> [atom()].
socket_opt_keys() ->
    [sndbuf, recbuf, nodelay, keepalive, keepalive_time, keepalive_interval, keepalive_retries,
     priority, tos, user_timeout, bind_ip].

-spec option_names() -> string().
option_names() ->
    lists:flatten(lists:join(", ", [atom_to_list(K) || K <- socket_opt_keys()])).

-spec check_socket_opt(atom(), term()) -> term().
check_socket_opt(Key, V) when Key =:= sndbuf; Key =:= recbuf ->
    int_opt(Key, V, 1, ?INT_MAX,
            "an integer 1..2147483647, bytes (" ++ sockopt_name(Key) ++ "; the kernel doubles "
            "it and caps it at net.core." ++ sysctl(Key) ++ "; not set: autotuned)");
check_socket_opt(Key, V) when Key =:= nodelay; Key =:= keepalive ->
    case is_boolean(V) of
        true -> V;
        false -> bad_opt(Key, V, "true or false (" ++ sockopt_name(Key) ++ ")")
    end;
check_socket_opt(keepalive_time, V) ->
    int_opt(keepalive_time, V, 1, 32767,
            "an integer 1..32767, seconds idle before the first probe (TCP_KEEPIDLE)");
check_socket_opt(keepalive_interval, V) ->
    int_opt(keepalive_interval, V, 1, 32767,
            "an integer 1..32767, seconds between probes (TCP_KEEPINTVL)");
check_socket_opt(keepalive_retries, V) ->
    int_opt(keepalive_retries, V, 1, 127,
            "an integer 1..127, probes unanswered before the connection drops (TCP_KEEPCNT)");
check_socket_opt(priority, V) ->
    int_opt(priority, V, 0, ?INT_MAX,
            "an integer 0..2147483647 (SO_PRIORITY; above 6 needs CAP_NET_ADMIN)");
check_socket_opt(tos, V) ->
    int_opt(tos, V, 0, 255, "an integer 0..255 (IP_TOS, IPV6_TCLASS on IPv6)");
check_socket_opt(user_timeout, V) ->
    int_opt(user_timeout, V, 0, ?INT_MAX,
            "an integer 0..2147483647, milliseconds (TCP_USER_TIMEOUT; 0: the kernel's)");
check_socket_opt(bind_ip, V) ->
    case V =/= any andalso parse_ip(V) of
        {ok, Ip} -> Ip;
        _ -> bad_opt(bind_ip, V, "an IP address tuple or string, the local address of "
                                 "outgoing connections")
    end.

-spec int_opt(atom(), term(), integer(), integer(), string()) -> integer().
int_opt(_Key, V, Min, Max, _Expected) when is_integer(V), V >= Min, V =< Max -> V;
int_opt(Key, V, _Min, _Max, Expected) -> bad_opt(Key, V, Expected).

-spec sockopt_name(atom()) -> string().
sockopt_name(sndbuf) -> "SO_SNDBUF";
sockopt_name(recbuf) -> "SO_RCVBUF";
sockopt_name(nodelay) -> "TCP_NODELAY";
sockopt_name(keepalive) -> "SO_KEEPALIVE".

-spec sysctl(sndbuf | recbuf) -> string().
sysctl(sndbuf) -> "wmem_max";
sysctl(recbuf) -> "rmem_max".

-spec bad_opt(atom(), term(), string()) -> no_return().
bad_opt(Key, V, Expected) ->
    bad(socket_opts, {Key, V}, atom_to_list(Key) ++ ": " ++ Expected).

-spec parse_ip(term()) -> {ok, inet:ip_address()} | error.
parse_ip(any) -> {ok, {0, 0, 0, 0}};
parse_ip(Ip) when is_tuple(Ip) ->
    case inet:ntoa(Ip) of
        {error, _} -> error;
        _ -> {ok, Ip}
    end;
parse_ip(Ip) when is_list(Ip); is_binary(Ip) ->
    case inet:parse_address(unicode:characters_to_list(Ip)) of
        {ok, Addr} -> {ok, Addr};
        {error, _} -> error
    end;
parse_ip(_) -> error.

-spec bad(atom(), term(), string()) -> no_return().
bad(Key, Value, Expected) ->
    erlang:error({invalid_config, Key, Value, Expected}).

%% The address distributed Erlang listens on: the interface it is told to use, else any.
-spec dist_ip() -> inet:ip_address().
dist_ip() ->
    case application:get_env(kernel, inet_dist_use_interface) of
        {ok, Ip} when is_tuple(Ip) -> Ip;
        _ -> {0, 0, 0, 0}
    end.
