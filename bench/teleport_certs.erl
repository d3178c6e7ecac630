%% A CA and node certificates as PEM files, made with public_key:pkix_test_data/1 for the
%% TLS tests (tls_SUITE) and the TLS benchmark (tls_bench): nothing is committed.
-module(teleport_certs).

-include_lib("public_key/include/public_key.hrl").

-export([ca/1, issue/5, optfile/2]).

%% RSA with SHA-256: public_key signs with EC keys under an algorithm identifier that
%% carries the curve, which rustls (rightly) refuses, and its default digest is SHA-1.
-define(KEY, {rsa, 2048, 65537}).

%% @doc A root CA named `Name'.
-spec ca(string()) -> public_key:test_root_cert().
ca(Name) ->
    public_key:pkix_test_root_cert(Name, [{key, ?KEY}, {digest, sha256}]).

%% @doc A certificate for `Hosts' that `Ca' issued, its key and the CA, as PEM files
%% `Name'.crt, `Name'.key and `Name'-ca.crt in `Dir'; `Extra': more pkix_test_data peer
%% options (`{validity, {From, To}}'). A host that is an IP address is named both as one
%% (what rustls checks) and as a DNS name (what `ssl' checks for a node name's host).
-spec issue(file:filename(), string(), public_key:test_root_cert(), [string()], list()) ->
          #{certfile := file:filename(), keyfile := file:filename(),
            cacertfile := file:filename()}.
issue(Dir, Name, Ca, Hosts, Extra) ->
    Names = lists:append([[{dNSName, H} | case inet:parse_strict_address(H) of
                                              {ok, Ip} -> [{iPAddress, ip_octets(Ip)}];
                                              {error, _} -> []
                                          end] || H <- Hosts]),
    San = #'Extension'{extnID = ?'id-ce-subjectAltName', critical = false,
                       extnValue = Names},
    %% One certificate serves both directions: a node dials and accepts.
    Eku = #'Extension'{extnID = ?'id-ce-extKeyUsage', critical = false,
                       extnValue = [?'id-kp-serverAuth', ?'id-kp-clientAuth']},
    Peer = [{key, ?KEY}, {digest, sha256}, {extensions, [San, Eku]} | Extra],
    Chain = #{root => Ca, intermediates => [], peer => Peer},
    #{server_config := Opts} =
        public_key:pkix_test_data(#{server_chain => Chain, client_chain => Chain}),
    {cert, Cert} = lists:keyfind(cert, 1, Opts),
    {key, {Type, KeyDer}} = lists:keyfind(key, 1, Opts),
    #{cert := CaCert} = Ca,
    Write = fun(Suffix, Entries) ->
                    F = filename:join(Dir, Name ++ Suffix),
                    ok = file:write_file(F, public_key:pem_encode(Entries)),
                    F
            end,
    #{certfile => Write(".crt", [{'Certificate', Cert, not_encrypted}]),
      keyfile => Write(".key", [{Type, KeyDer, not_encrypted}]),
      cacertfile => Write("-ca.crt", [{'Certificate', CaCert, not_encrypted}])}.

%% @doc Writes `Path', an -ssl_dist_optfile file for the files `Files' as a TLS cluster has
%% it (both sides verify their peer); returns `Path'.
-spec optfile(file:filename(), map()) -> file:filename().
optfile(Path, #{certfile := C, keyfile := K, cacertfile := Ca}) ->
    Common = [{certfile, C}, {keyfile, K}, {cacertfile, Ca}, {verify, verify_peer}],
    ok = file:write_file(Path, io_lib:format("~p.~n", [[{server, [{fail_if_no_peer_cert, true}
                                                                  | Common]},
                                                        {client, Common}]])),
    Path.

%% An IP address as the octets of a certificate's iPAddress name.
ip_octets({A, B, C, D}) -> <<A, B, C, D>>;
ip_octets(Ip6) -> << <<W:16>> || W <- tuple_to_list(Ip6) >>.
