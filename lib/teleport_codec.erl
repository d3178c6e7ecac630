%% @doc The external term format, encoded and decoded by teleport's NIF.
%%
%% `encode/1' is `term_to_iovec/1' with the same zero-copy promise: binaries of at least
%% 2048 bytes are not copied, the returned iolist holds the caller's own binaries.
%% `decode/1,2' is `binary_to_term/1,2', except that a buffer whose bulk is one or a few large
%% binaries (each at least 16 KiB and at least 1/16 of the buffer) returns them as
%% sub-binaries of the buffer instead of copies. A sub-binary keeps the whole buffer alive,
%% which is why small binaries are always copied.
%%
%% Neither call blocks a normal scheduler for long: small terms are handled in place and
%% charged to the caller in reductions; large ones move to a dirty CPU scheduler, and the
%% work done there is charged with `erlang:bump_reductions/1'.
-module(teleport_codec).

-export([encode/1, decode/1, decode/2]).

-include("teleport_nif.hrl").

-type decode_option() :: safe.
-export_type([decode_option/0]).

%% @doc Encodes `Term' in the external term format (`binary_to_term(iolist_to_binary(
%% encode(T))) =:= T' for every term). Large binaries are referenced, not copied.
-spec encode(term()) -> iolist().
encode(Term) ->
    ?NORMAL_OR_DIRTY(teleport_nif:codec_encode(Term), teleport_nif:codec_encode_dirty(Term)).

%% @doc Decodes a term encoded by {@link encode/1} or `term_to_binary/1,2' (compressed
%% included). Raises `badarg' where `binary_to_term/1' does.
-spec decode(iodata()) -> term().
decode(Bin) when is_binary(Bin) ->
    decode_binary(Bin, false);
decode(Data) ->
    decode_binary(to_binary(Data), false).

%% @doc As {@link decode/1}; with `safe' no new atoms (nor external funs) are created and
%% input that would need them raises `badarg', as with `binary_to_term/2'.
-spec decode(iodata(), [decode_option()]) -> term().
decode(Data, Opts) ->
    Safe = safe(Opts, Opts, false),
    decode_binary(to_binary(Data), Safe).

%% Compressed terms are inflated by the NIF too (on a dirty scheduler when large).
-spec decode_binary(binary(), boolean()) -> term().
decode_binary(Bin, Safe) ->
    ?NORMAL_OR_DIRTY(teleport_nif:codec_decode(Bin, Safe),
                     teleport_nif:codec_decode_dirty(Bin, Safe)).

%% Whether the options (a proper list of `safe') ask for safe mode.
-spec safe(term(), term(), boolean()) -> boolean().
safe([], _Opts, Safe) -> Safe;
safe([safe | Rest], Opts, _Safe) -> safe(Rest, Opts, true);
safe(_, Opts, _Safe) -> erlang:error(badarg, [Opts]).

-spec to_binary(iodata()) -> binary().
to_binary(Bin) when is_binary(Bin) -> Bin;
to_binary(Data) ->
    try iolist_to_binary(Data)
    catch error:badarg -> erlang:error(badarg, [Data])
    end.
