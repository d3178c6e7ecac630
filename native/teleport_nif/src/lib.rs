//! # teleport_nif
//!
//! The rustler boundary of teleport: each NIF here unpacks its arguments, calls into
//! `teleport_core` or one of this crate's walkers, and packs the result. The Erlang stub is
//! `lib/teleport_nif.erl`; NIF names are `<domain>_<verb>`.
//!
//! Work that may run long has two entry points: the plain NIF runs on a normal scheduler
//! within a budget and answers `dirty` when the work is too big, and the `_dirty` NIF does the
//! whole job on a dirty CPU scheduler and reports the work done, which the Erlang wrapper
//! charges to the caller with `erlang:bump_reductions/1`.

mod atoms;
mod codec_decode;
mod codec_encode;
mod deliver;
mod diag;
mod local_id;
mod log;
mod pool;
mod reader;
mod runtime;
mod term_word;

use codec_encode::{to_iolist, OverBudget, NORMAL_BUDGET, UNITS_PER_REDUCTION};
use rustler::{Binary, Encoder, Env, NifResult, Term};

/// Charges `units` of work to the calling process on a normal scheduler.
pub(crate) fn consume(env: Env, units: usize) {
    let percent = units * 100 / NORMAL_BUDGET;
    if percent > 0 {
        rustler::schedule::consume_timeslice(env, percent.min(100) as i32);
    }
}

/// About how long a process runs before the VM expects it to yield (`enif_consume_timeslice`'s
/// 100 percent).
const TIMESLICE: std::time::Duration = std::time::Duration::from_millis(1);

/// Charges the time `spent` to the calling process on a normal scheduler: work whose cost is
/// not in proportion to its bytes (thousands of small frames decoded and sent) is charged by
/// the clock, so that the process is scheduled out after a millisecond or so of it.
pub(crate) fn consume_time(env: Env, spent: std::time::Duration) {
    // Rounded up: a reader of one tiny frame per turn still pays for its turns.
    let percent = (spent.as_micros() * 100)
        .div_ceil(TIMESLICE.as_micros())
        .max(1);
    rustler::schedule::consume_timeslice(env, percent.min(100) as i32);
}

/// What a NIF on a normal scheduler answers for work done within a budget: the result, its
/// work charged to the caller, or `dirty` when the work outgrew the budget (the Erlang
/// wrapper then calls the `_dirty` variant).
pub(crate) fn normal_answer<'a, T: Encoder>(
    env: Env<'a>,
    done: Result<(T, usize), OverBudget>,
) -> Term<'a> {
    match done {
        Ok((result, work)) => {
            consume(env, work);
            result.encode(env)
        }
        Err(OverBudget) => atoms::dirty().encode(env),
    }
}

/// What a `_dirty` NIF answers for work done without a budget: `{Result, Reductions}`, for
/// the Erlang wrapper to charge with `erlang:bump_reductions/1`.
pub(crate) fn dirty_answer<'a, T: Encoder>(
    env: Env<'a>,
    done: Result<(T, usize), OverBudget>,
) -> Term<'a> {
    let Ok((result, work)) = done else {
        unreachable!("an unlimited budget never runs out")
    };
    (result, work / UNITS_PER_REDUCTION).encode(env)
}

/// An encoding as the iolist the NIF returns, and the work it took.
fn iolist_and_work<'a>(env: Env<'a>, out: codec_encode::Encoded) -> (Term<'a>, usize) {
    let work = out.work;
    (to_iolist(env, out), work)
}

/// Encodes a term to an iolist, or answers `dirty` when the term is too big for a normal
/// scheduler.
#[rustler::nif]
fn codec_encode<'a>(env: Env<'a>, term: Term<'a>) -> Term<'a> {
    let done =
        unsafe { codec_encode::encode(env.as_c_arg(), term.as_c_arg(), Some(NORMAL_BUDGET)) };
    normal_answer(env, done.map(|out| iolist_and_work(env, out)))
}

/// Encodes a term of any size to `{IoList, Reductions}` on a dirty CPU scheduler.
#[rustler::nif(schedule = "DirtyCpu")]
fn codec_encode_dirty<'a>(env: Env<'a>, term: Term<'a>) -> Term<'a> {
    let done = unsafe { codec_encode::encode(env.as_c_arg(), term.as_c_arg(), None) };
    dirty_answer(env, done.map(|out| iolist_and_work(env, out)))
}

/// Decodes a binary holding an encoded term; `dirty` when it is too big for a normal
/// scheduler; raises `badarg` where `binary_to_term/1,2` would.
#[rustler::nif]
fn codec_decode<'a>(env: Env<'a>, input: Binary<'a>, safe: bool) -> NifResult<Term<'a>> {
    if codec_decode::needs_dirty(&input) {
        return Ok(atoms::dirty().encode(env));
    }
    let decoded = unsafe {
        codec_decode::decode(
            env.as_c_arg(),
            Some(input.to_term(env).as_c_arg()),
            &input,
            codec_decode::Source::Api { safe },
        )
    };
    let (term, bytes) = decoded.ok_or(rustler::Error::BadArg)?;
    consume(env, bytes / 4);
    Ok(unsafe { Term::new(env, term) })
}

/// Decodes a binary of any size to `{Term, Reductions}` on a dirty CPU scheduler.
#[rustler::nif(schedule = "DirtyCpu")]
fn codec_decode_dirty<'a>(env: Env<'a>, input: Binary<'a>, safe: bool) -> NifResult<Term<'a>> {
    let decoded = unsafe {
        codec_decode::decode(
            env.as_c_arg(),
            Some(input.to_term(env).as_c_arg()),
            &input,
            codec_decode::Source::Api { safe },
        )
    };
    let (term, bytes) = decoded.ok_or(rustler::Error::BadArg)?;
    let term = unsafe { Term::new(env, term) };
    Ok((term, bytes / 4 / UNITS_PER_REDUCTION).encode(env))
}

/// Runs when the VM loads the library: routes Rust's `tracing` events to Erlang's logger, and
/// opens the reader resource type (which rustler's registration cannot: it needs a `stop`
/// callback).
fn load(env: Env, _info: Term) -> bool {
    log::install();
    reader::open_type(env)
}

rustler::init!("teleport_nif", load = load);
