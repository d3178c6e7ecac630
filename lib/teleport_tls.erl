%% @doc The `tls' key of the application environment: its forms, checked at start, and the
%% map the NIF loads the files from (`teleport_nif:runtime_start/6').
%%
%% <ul>
%% <li>`false': plain connections, as disterl without TLS;</li>
%% <li>a map or a proplist: `certfile', `keyfile' (default: the certfile, as `ssl' reads it),
%% `cacertfile' (PEM paths), `password' (of an encrypted key), `verify' (`verify_peer', the
%% default, or `verify_none', for tests only, logged as a warning), `server_name_check'
%% (default `true': the dialer checks that the acceptor's certificate names the host of the
%% node it dials, as `inet_tls_dist' does) and `versions' (as `ssl' takes it; teleport speaks
%% `'tlsv1.3'' and `'tlsv1.2'', both by default, and two teleport nodes that both allow
%% 1.3 agree on it; older versions in the list are passed over, so that an optfile that
%% allows them still serves);</li>
%% <li>`{optfile, Path}': the file `-ssl_dist_optfile' reads (`[{server, Opts}, {client,
%% Opts}]'), so that a TLS cluster points teleport at the file it already has; the keys
%% above are taken from its `server' options, then its `client' ones, and its other `ssl'
%% options are left to disterl;</li>
%% <li>unset: as disterl does. Plain beside plain disterl; beside disterl over TLS
%% (`-proto_dist inet_tls' or `inet6_tls') the file of `-ssl_dist_optfile', and a refusal
%% to start without one: teleport never sends in clear beside an encrypted disterl unless the
%% operator says `tls => false'.</li>
%% </ul>
%%
%% Here only the form is checked (`{invalid_config, tls, Value, Expected}'); the files are
%% read when the runtime starts, where a missing or unreadable one, one without PEM, a key
%% that is not the certificate's, a wrong password or an expired certificate stops the start
%% with `{invalid_config, tls, Config, Why}', `Why' naming the file.
-module(teleport_tls).

-export([check/1, nif_opts/1]).
-export_type([config/0]).

%% The password is kept in a closure, so that a crash report or `sys:get_state/1' never
%% prints it.
-type config() :: false |
                  #{certfile := binary(), keyfile := binary(), cacertfile := binary(),
                    password => fun(() -> string()),
                    verify := verify_peer | verify_none, server_name_check := boolean(),
                    versions := [version(), ...]}.
-type version() :: 'tlsv1.3' | 'tlsv1.2'.

-define(KEYS, [certfile, keyfile, cacertfile, password, verify, server_name_check, versions]).
%% The versions teleport speaks, then those `ssl' knows that it passes over.
-define(VERSIONS, ['tlsv1.3', 'tlsv1.2']).
-define(OLD_VERSIONS, ['tlsv1.1', tlsv1]).

%% @doc The `tls' value `Value' (`disterl': unset) as teleport runs it. Raises
%% `error({invalid_config, tls, Value, Expected})' on a bad one.
-spec check(term()) -> config().
check(false) ->
    false;
check(disterl) ->
    case dist_tls() of
        none ->
            false;
        Proto ->
            case init:get_argument(ssl_dist_optfile) of
                {ok, [[Path | _] | _]} ->
                    optfile(Path, disterl);
                _ ->
                    bad(disterl, "tls set outright (a map of certfile, keyfile, cacertfile; "
                        "{optfile, Path}; or false): disterl runs over TLS here (-proto_dist " ++
                            Proto ++ ") without -ssl_dist_optfile, whose files teleport would "
                        "use, and teleport does not send in clear beside it unless told")
            end
    end;
check({optfile, Path} = V) when is_list(Path); is_binary(Path) ->
    optfile(Path, V);
check(V) when is_map(V) ->
    opts(maps:to_list(V), V);
check(V) when is_list(V) ->
    %% As proplists:get_value/2 reads a list: the first of two entries wins.
    opts(lists:reverse([pair(O, V) || O <- V]), V);
check(V) ->
    bad(V, "false, a map or proplist of " ++ names() ++ ", or {optfile, Path}").

%% @doc What the NIF loads: the files, and the key's PEM if a password opens it (Erlang's
%% `public_key' decrypts it; the decrypted key is never written anywhere). `{error, Why}'
%% if the password does not open it.
-spec nif_opts(config()) -> {ok, false | map()} | {error, string()}.
nif_opts(false) ->
    {ok, false};
nif_opts(#{password := Password, keyfile := Keyfile} = Config) ->
    case decrypt(Keyfile, Password()) of
        {ok, Pem} -> {ok, (maps:remove(password, Config))#{key => Pem}};
        {error, _} = Error -> Error
    end;
nif_opts(Config) ->
    {ok, Config}.

%% The options of an `-ssl_dist_optfile' file at `Path' (`V': the value, for errors).
-spec optfile(file:filename_all(), term()) -> config().
optfile(Path, V) ->
    case file:consult(Path) of
        {ok, Read} ->
            %% One term, the list of both sides (as inet_tls_dist reads it), or the sides.
            Terms = case Read of
                        [List] when is_list(List) -> List;
                        _ -> Read
                    end,
            Side = fun(S) ->
                           case lists:keyfind(S, 1, Terms) of
                               {S, Opts} when is_list(Opts) -> Opts;
                               _ -> []
                           end
                   end,
            %% One identity serves both directions: the server's options first. Only
            %% teleport's keys are taken; the file's other ssl options are disterl's.
            Opts = [O || {K, _} = O <- Side(server) ++ Side(client), lists:member(K, ?KEYS)],
            Sni = [O || {server_name_indication, disable} = O <- Side(client)],
            opts(lists:reverse(Opts) ++ [{server_name_check, false} || Sni =/= []], V);
        {error, Why} ->
            bad(V, "a file as -ssl_dist_optfile reads it ([{server, Opts}, {client, Opts}]): " ++
                    text(Path) ++ ": " ++ file:format_error(Why))
    end.

%% The options `Pairs' (later ones win), checked; an unknown key is an error.
-spec opts([{atom(), term()}], term()) -> config().
opts(Pairs, V) ->
    Opts = maps:from_list(Pairs),
    case [K || K <- maps:keys(Opts), not lists:member(K, ?KEYS)] of
        [Unknown | _] ->
            bad(V, "only the keys " ++ names() ++ " (not " ++ atom_to_list(Unknown) ++ ")");
        _ ->
            ok
    end,
    File = fun(K) ->
                   case maps:find(K, Opts) of
                       {ok, F} when is_list(F); is_binary(F) -> unicode:characters_to_binary(F);
                       {ok, F} -> bad(V, atom_to_list(K) ++ ": a file name, not " ++ show(F));
                       error -> bad(V, atom_to_list(K) ++ " (a PEM file) is missing")
                   end
           end,
    Cert = File(certfile),
    Base = #{certfile => Cert,
             keyfile => case maps:is_key(keyfile, Opts) of
                            true -> File(keyfile);
                            false -> Cert
                        end,
             cacertfile => File(cacertfile),
             verify => case maps:get(verify, Opts, verify_peer) of
                           Verify when Verify =:= verify_peer; Verify =:= verify_none -> Verify;
                           Other -> bad(V, "verify: verify_peer or verify_none, not " ++
                                            show(Other))
                       end,
             server_name_check => case maps:get(server_name_check, Opts, true) of
                                      B when is_boolean(B) -> B;
                                      Other -> bad(V, "server_name_check: true or false, "
                                                   "not " ++ show(Other))
                                  end,
             versions => versions(maps:get(versions, Opts, ?VERSIONS), V)},
    case maps:find(password, Opts) of
        {ok, P} when is_list(P); is_binary(P) ->
            Password = unicode:characters_to_list(P),
            Base#{password => fun() -> Password end};
        {ok, _} ->
            bad(V, "password: a string");
        error ->
            Base
    end.

%% The versions of `List' that teleport speaks: at least one, each one `ssl' knows.
-spec versions(term(), term()) -> [version(), ...].
versions(List, V) ->
    Expected = "versions: a list of 'tlsv1.3' and 'tlsv1.2' (teleport's versions)",
    case known_versions(List) andalso [X || X <- ?VERSIONS, lists:member(X, List)] of
        false -> bad(V, Expected ++ ", not " ++ show(List));
        [] -> bad(V, Expected ++ ": " ++ show(List) ++ " holds neither");
        Speaks -> Speaks
    end.

%% Whether `List' is a proper list of versions `ssl' knows.
-spec known_versions(term()) -> boolean().
known_versions([X | Rest]) ->
    lists:member(X, ?VERSIONS ++ ?OLD_VERSIONS) andalso known_versions(Rest);
known_versions([]) -> true;
known_versions(_) -> false.

-spec pair(term(), term()) -> {atom(), term()}.
pair({K, Value}, _V) when is_atom(K) -> {K, Value};
pair(Other, V) -> bad(V, "{Key, Value} pairs of " ++ names() ++ ", not " ++ show(Other)).

%% The key of `Keyfile' opened with `Password', as unencrypted PEM.
-spec decrypt(binary(), string()) -> {ok, binary()} | {error, string()}.
decrypt(Keyfile, Password) ->
    Types = ['RSAPrivateKey', 'ECPrivateKey', 'DSAPrivateKey', 'PrivateKeyInfo'],
    case file:read_file(Keyfile) of
        {error, Why} ->
            {error, "cannot read " ++ text(Keyfile) ++ ": " ++ file:format_error(Why)};
        {ok, Pem} ->
            case [E || {Type, _, _} = E <- public_key:pem_decode(Pem), lists:member(Type, Types)] of
                [] ->
                    {error, text(Keyfile) ++ " holds no PEM private key"};
                [Entry | _] ->
                    try public_key:pem_entry_decode(Entry, Password) of
                        Key -> {ok, public_key:pem_encode([public_key:pem_entry_encode(
                                                             element(1, Key), Key)])}
                    catch
                        _:_ -> {error, "the password does not open the key in " ++
                                    text(Keyfile)}
                    end
            end
    end.

%% The TLS protocol disterl runs over (`-proto_dist'), or `none'.
-spec dist_tls() -> string() | none.
dist_tls() ->
    case init:get_argument(proto_dist) of
        {ok, Protos} ->
            case [P || P <- lists:append(Protos), lists:suffix("_tls", P)] of
                [P | _] -> P;
                [] -> none
            end;
        error ->
            none
    end.

-spec names() -> string().
names() ->
    lists:flatten(lists:join(", ", [atom_to_list(K) || K <- ?KEYS])).

-spec text(file:filename_all()) -> string().
text(Name) -> unicode:characters_to_list(Name).

-spec show(term()) -> string().
show(Term) -> lists:flatten(io_lib:format("~0p", [Term])).

-spec bad(term(), string()) -> no_return().
bad(Value, Expected) ->
    erlang:error({invalid_config, tls, redact(Value), Expected}).

%% `Value' as an error may show it: without its password.
-spec redact(term()) -> term().
redact(#{password := _} = Map) -> Map#{password := redacted};
redact(List) when is_list(List) ->
    [case O of {password, _} -> {password, redacted}; _ -> O end || O <- List];
redact(Value) -> Value.
