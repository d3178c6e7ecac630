%% @doc teleport: Erlang messages over pools of TCP connections, beside distributed Erlang.
%%
%% This module is the public API. The codec is here for drop-in users of the 2015 prototype
%% (`term_to_iolist/1'); the messaging calls arrive with the transport.
-module(teleport).

-export([term_to_iolist/1]).

%% @doc Encodes `Term' in the external term format as an iolist that keeps large binaries by
%% reference. The same as {@link teleport_codec:encode/1}; kept under the name the 2015
%% prototype exported.
-spec term_to_iolist(term()) -> iolist().
term_to_iolist(Term) ->
    teleport_codec:encode(Term).
