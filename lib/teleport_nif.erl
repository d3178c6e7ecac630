%% @doc The NIF stub: every function here is replaced by its Rust version from
%% `priv/teleport_nif.so' when the module loads. Nothing but `teleport_*' modules should call
%% it; they add the argument checks, the dirty-scheduler hand-off and the reduction accounting.
-module(teleport_nif).

-export([codec_encode/1, codec_encode_dirty/1, codec_decode/2, codec_decode_dirty/2]).

-on_load(init/0).

-define(NOT_LOADED, erlang:nif_error({not_loaded, ?MODULE})).

%% @private Loads the shared library; a failure names the file and says how to build it.
-spec init() -> ok | {error, term()}.
init() ->
    Path = filename:join(priv_dir(), "teleport_nif"),
    case erlang:load_nif(Path, 0) of
        ok ->
            ok;
        {error, {Reason, Text}} = Error ->
            logger:error("teleport: cannot load its NIF from ~ts.so (~p: ~ts); build it with "
                         "'rebar3 compile', 'mix compile' or 'sh native/build.sh' in the "
                         "teleport source directory",
                         [Path, Reason, Text], #{domain => [teleport]}),
            Error
    end.

-spec priv_dir() -> file:filename().
priv_dir() ->
    case code:priv_dir(teleport) of
        {error, bad_name} ->
            %% Not loaded as an application (e.g. modules on the path by hand): ../priv.
            filename:join(filename:dirname(filename:dirname(code:which(?MODULE))), "priv");
        Dir ->
            Dir
    end.

%% @doc Encodes within a normal scheduler's budget: an iolist, or `dirty' if too big.
-spec codec_encode(term()) -> iolist() | dirty.
codec_encode(_Term) -> ?NOT_LOADED.

%% @doc Encodes on a dirty CPU scheduler: the iolist and the reductions to charge.
-spec codec_encode_dirty(term()) -> {iolist(), non_neg_integer()}.
codec_encode_dirty(_Term) -> ?NOT_LOADED.

%% @doc Decodes a binary on a normal scheduler, or answers `dirty' if it is too big.
-spec codec_decode(binary(), boolean()) -> term().
codec_decode(_Bin, _Safe) -> ?NOT_LOADED.

%% @doc Decodes on a dirty CPU scheduler: the term and the reductions to charge.
-spec codec_decode_dirty(binary(), boolean()) -> {term(), non_neg_integer()}.
codec_decode_dirty(_Bin, _Safe) -> ?NOT_LOADED.
