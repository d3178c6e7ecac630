%% @doc The application environment of `teleport', read and checked in one place.
%%
%% Every key has a default; a bad value stops the application with
%% `{invalid_config, Key, Value, Expected}', naming the key and what it accepts.
-module(teleport_config).

-export([load/0, defaults/0]).

-type config() :: #{port := inet:port_number(),
                    listen_ip := inet:ip_address(),
                    pool_size := pos_integer(),
                    max_queue_bytes := pos_integer(),
                    max_frame_bytes := pos_integer(),
                    eager_connect := boolean(),
                    connect_timeout := pos_integer(),
                    handshake_timeout := pos_integer(),
                    discovery_timeout := pos_integer(),
                    log_to_default_handler := boolean()}.
-export_type([config/0]).

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
      log_to_default_handler => true}.

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
check(Key, V) when is_integer(V), V > 0 -> check_size(Key, V);
check(Key, V) -> bad(Key, V, "a positive integer").

-spec check_size(atom(), pos_integer()) -> pos_integer().
check_size(max_frame_bytes, V) when V > 16#FFFFFFFF ->
    bad(max_frame_bytes, V, "at most 4294967295 (frames carry a 32-bit length)");
check_size(_Key, V) -> V.

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
