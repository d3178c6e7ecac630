//! Every atom the NIF returns or matches, in one place.

rustler::atoms! {
    /// Returned by a fast-path NIF whose work outgrew a normal scheduler's slice: the
    /// Erlang wrapper then calls the `_dirty` variant.
    dirty,
}
