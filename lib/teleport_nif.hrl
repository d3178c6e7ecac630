%% The one way teleport calls a NIF that may outgrow a normal scheduler's slice: `Normal'
%% (a call of the fast NIF) runs first; when it answers `dirty', `Dirty' (the same call of
%% its `_dirty' twin, on a dirty CPU scheduler) does the whole work and answers
%% `{Result, Reductions}', which are charged to the caller. A macro rather than a function:
%% it costs nothing on the send path, where a fun or an apply/3 per message would.
-define(NORMAL_OR_DIRTY(Normal, Dirty),
        case Normal of
            dirty ->
                {NormalOrDirtyResult__, NormalOrDirtyReductions__} = Dirty,
                erlang:bump_reductions(NormalOrDirtyReductions__),
                NormalOrDirtyResult__;
            NormalOrDirtyResult__ ->
                NormalOrDirtyResult__
        end).
