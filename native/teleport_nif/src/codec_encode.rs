//! `codec_encode`: walks an Erlang term and writes it with [`teleport_core::encode::Writer`].
//!
//! The walk is iterative (no recursion on the scheduler's small stack) and budgeted: on a
//! normal scheduler it gives up after about a millisecond of work and tells the caller to
//! run it again on a dirty scheduler, so no normal scheduler is ever blocked for long.
//! Large binaries are not copied: the returned iolist holds the caller's own binary terms.

use rustler::sys::{
    enif_get_atom, enif_get_double, enif_get_int64, enif_get_list_cell, enif_get_map_size,
    enif_get_tuple, enif_get_uint64, enif_inspect_binary, enif_make_list_from_array,
    enif_make_new_binary, enif_map_iterator_create, enif_map_iterator_destroy,
    enif_map_iterator_get_pair, enif_map_iterator_next, enif_release_binary, enif_term_to_binary,
    enif_term_type, ErlNifBinary, ErlNifCharEncoding, ErlNifEnv, ErlNifMapIterator,
    ErlNifMapIteratorEntry, ErlNifTerm, ErlNifTermType,
};
use rustler::{Env, ResourceArc, Term};
use std::mem::MaybeUninit;
use teleport_core::encode::{Chunk, Patch, Writer};
use teleport_core::etf::ENCODE_SHARE_MIN;

/// Work units a normal scheduler may spend before handing the term to a dirty scheduler.
/// One unit is one term visited or 64 bytes copied; 40k units take well under 1 ms.
pub const NORMAL_BUDGET: usize = 40_000;

/// Work units that make one Erlang reduction, for reduction accounting of dirty runs.
pub const UNITS_PER_REDUCTION: usize = 10;

/// Output buffers larger than this are handed to Erlang without a copy, as resource binaries.
const RESOURCE_BINARY_MIN: usize = 64 * 1024;

/// The encoded bytes, kept alive by the binaries that point into them.
pub struct OutBuf(Vec<u8>);

#[rustler::resource_impl]
impl rustler::Resource for OutBuf {}

/// The encoder gave up because its budget ran out.
pub struct OverBudget;

/// What one encode produced: the writer's output plus the binaries it shares.
pub struct Encoded {
    pub buf: Vec<u8>,
    pub chunks: Vec<Chunk>,
    pub shared: Vec<ErlNifTerm>,
    /// Work units spent.
    pub work: usize,
}

enum Work {
    Term(ErlNifTerm),
    /// The rest of a list whose first `count` elements are written.
    ListRest {
        rest: ErlNifTerm,
        patch: Patch,
        count: u32,
    },
}

/// A tiny direct-mapped cache from atom to where its encoding already sits in the output.
struct AtomCache([(ErlNifTerm, u32, u32); 64]);

impl AtomCache {
    #[inline]
    fn slot(atom: ErlNifTerm) -> usize {
        // An atom term is its index shifted left by 6 above the tag bits. `ErlNifTerm` is a
        // transparent wrapper around the term's machine word.
        let bits: usize = unsafe { std::mem::transmute(atom) };
        (bits >> 6) & 63
    }
}

/// Encodes `term` (version byte first). `budget` is `Some(units)` on a normal scheduler.
///
/// # Safety
/// `env` and `term` must be a live env and a term of it.
pub unsafe fn encode(
    env: *mut ErlNifEnv,
    term: ErlNifTerm,
    budget: Option<usize>,
) -> Result<Encoded, OverBudget> {
    let mut w = Writer::with_capacity(256);
    w.version();
    let (shared, work) = write_term(env, term, &mut w, budget)?;
    let (buf, chunks) = w.finish();
    Ok(Encoded {
        work: work + buf.len() / 64,
        buf,
        chunks,
        shared,
    })
}

/// Writes `term` (no version byte) into `w`; returns the binaries it shares, in the order
/// of their [`Chunk::Shared`] indexes, and the work units spent.
///
/// # Safety
/// `env` and `term` must be a live env and a term of it.
pub unsafe fn write_term(
    env: *mut ErlNifEnv,
    term: ErlNifTerm,
    w: &mut Writer,
    budget: Option<usize>,
) -> Result<(Vec<ErlNifTerm>, usize), OverBudget> {
    let limit = budget.unwrap_or(usize::MAX);
    let w = &mut *w;
    let mut shared = Vec::new();
    let mut cache = AtomCache([(ErlNifTerm::default(), 0, 0); 64]);
    let mut stack = vec![Work::Term(term)];
    let mut work = 0usize;
    while let Some(item) = stack.pop() {
        work += 1;
        if work > limit {
            return Err(OverBudget);
        }
        let t = match item {
            Work::Term(t) => t,
            Work::ListRest { rest, patch, count } => {
                let (mut head, mut tail) = (ErlNifTerm::default(), ErlNifTerm::default());
                if enif_get_list_cell(env, rest, &mut head, &mut tail) != 0 {
                    stack.push(Work::ListRest {
                        rest: tail,
                        patch,
                        count: count + 1,
                    });
                    stack.push(Work::Term(head));
                    continue;
                }
                w.patch(patch, count);
                if is_nil(env, rest) {
                    w.nil();
                    continue;
                }
                rest // an improper tail: encode it as a term
            }
        };
        match enif_term_type(env, t) {
            ErlNifTermType::ERL_NIF_TERM_TYPE_INTEGER => {
                let mut i = 0i64;
                let mut u = 0u64;
                if enif_get_int64(env, t, &mut i) != 0 {
                    w.int(i);
                } else if enif_get_uint64(env, t, &mut u) != 0 {
                    w.uint(u);
                } else {
                    fallback(env, t, w);
                }
            }
            ErlNifTermType::ERL_NIF_TERM_TYPE_ATOM => {
                let slot = AtomCache::slot(t);
                let (cached, at, len) = cache.0[slot];
                if cached == t {
                    w.repeat(at as usize, len as usize);
                } else {
                    let start = w.buffered();
                    write_atom(env, t, w);
                    cache.0[slot] = (t, start as u32, (w.buffered() - start) as u32);
                }
            }
            ErlNifTermType::ERL_NIF_TERM_TYPE_TUPLE => {
                let mut arity = 0;
                let mut elems = std::ptr::null();
                enif_get_tuple(env, t, &mut arity, &mut elems);
                w.tuple_header(arity as usize);
                if arity > 0 {
                    let elems = std::slice::from_raw_parts(elems, arity as usize);
                    stack.extend(elems.iter().rev().map(|&e| Work::Term(e)));
                }
            }
            ErlNifTermType::ERL_NIF_TERM_TYPE_LIST => {
                let (mut head, mut tail) = (ErlNifTerm::default(), ErlNifTerm::default());
                if enif_get_list_cell(env, t, &mut head, &mut tail) == 0 {
                    w.nil();
                } else if let Some(n) = write_string(env, t, w) {
                    work += n / 64;
                } else {
                    let patch = w.list_header();
                    stack.push(Work::ListRest {
                        rest: tail,
                        patch,
                        count: 1,
                    });
                    stack.push(Work::Term(head));
                }
            }
            ErlNifTermType::ERL_NIF_TERM_TYPE_BITSTRING => {
                let mut bin = MaybeUninit::<ErlNifBinary>::uninit();
                if enif_inspect_binary(env, t, bin.as_mut_ptr()) == 0 {
                    fallback(env, t, w); // not a whole number of bytes
                    continue;
                }
                let bin = bin.assume_init();
                if bin.size >= ENCODE_SHARE_MIN {
                    w.binary_ref(bin.size);
                    shared.push(t);
                } else {
                    w.binary(std::slice::from_raw_parts(bin.data, bin.size));
                    work += bin.size / 64;
                }
            }
            ErlNifTermType::ERL_NIF_TERM_TYPE_FLOAT => {
                let mut f = 0.0;
                enif_get_double(env, t, &mut f);
                w.float(f);
            }
            ErlNifTermType::ERL_NIF_TERM_TYPE_MAP => {
                let mut size = 0;
                enif_get_map_size(env, t, &mut size);
                w.map_header(size);
                let at = stack.len();
                let mut iter = MaybeUninit::<ErlNifMapIterator>::uninit();
                if enif_map_iterator_create(
                    env,
                    t,
                    iter.as_mut_ptr(),
                    ErlNifMapIteratorEntry::ERL_NIF_MAP_ITERATOR_HEAD,
                ) != 0
                {
                    let (mut k, mut v) = (ErlNifTerm::default(), ErlNifTerm::default());
                    while enif_map_iterator_get_pair(env, iter.as_mut_ptr(), &mut k, &mut v) != 0 {
                        stack.push(Work::Term(k));
                        stack.push(Work::Term(v));
                        enif_map_iterator_next(env, iter.as_mut_ptr());
                    }
                    enif_map_iterator_destroy(env, iter.as_mut_ptr());
                }
                stack[at..].reverse();
                work += size;
            }
            // Pids, ports, references and funs: the VM's own encoding.
            _ => fallback(env, t, w),
        }
    }
    Ok((shared, work))
}

#[inline]
unsafe fn is_nil(env: *mut ErlNifEnv, t: ErlNifTerm) -> bool {
    rustler::sys::enif_is_empty_list(env, t) != 0
}

/// Writes a Latin-1 atom directly; any other atom goes through the VM's encoder.
pub unsafe fn write_atom(env: *mut ErlNifEnv, t: ErlNifTerm, w: &mut Writer) {
    let mut buf = [0u8; 256];
    let n = enif_get_atom(
        env,
        t,
        buf.as_mut_ptr().cast(),
        buf.len() as u32,
        ErlNifCharEncoding::ERL_NIF_LATIN1,
    );
    if n > 0 {
        w.atom_latin1(&buf[..n as usize - 1]);
    } else {
        fallback(env, t, w);
    }
}

/// If the non-empty list `t` is a proper list of at most 65535 integers in 0..=255, writes it
/// as `STRING_EXT` and returns its length.
unsafe fn write_string(env: *mut ErlNifEnv, t: ErlNifTerm, w: &mut Writer) -> Option<usize> {
    let mut bytes = Vec::new();
    let mut cur = t;
    let (mut head, mut tail) = (ErlNifTerm::default(), ErlNifTerm::default());
    while enif_get_list_cell(env, cur, &mut head, &mut tail) != 0 {
        let mut c = 0i64;
        if bytes.len() == u16::MAX as usize
            || enif_get_int64(env, head, &mut c) == 0
            || !(0..=255).contains(&c)
        {
            return None;
        }
        bytes.push(c as u8);
        cur = tail;
    }
    if !is_nil(env, cur) {
        return None;
    }
    w.string(&bytes);
    Some(bytes.len())
}

/// Writes `t` as the VM encodes it (its `term_to_binary` without the version byte).
pub unsafe fn fallback(env: *mut ErlNifEnv, t: ErlNifTerm, w: &mut Writer) {
    let mut bin = MaybeUninit::<ErlNifBinary>::uninit();
    if enif_term_to_binary(env, t, bin.as_mut_ptr()) == 0 {
        // Only out of memory makes this fail, and then the VM is already going down.
        panic!("enif_term_to_binary failed");
    }
    let mut bin = bin.assume_init();
    w.raw(&std::slice::from_raw_parts(bin.data, bin.size)[1..]);
    enif_release_binary(&mut bin);
}

/// Turns the output into an iolist of binaries: the writer's bytes (as resource binaries when
/// large, so they are not copied again) with the shared binaries in their places.
pub fn to_iolist<'a>(env: Env<'a>, out: Encoded) -> Term<'a> {
    let raw_env = env.as_c_arg();
    let mut parts: Vec<ErlNifTerm> = Vec::with_capacity(out.chunks.len());
    if out.buf.len() >= RESOURCE_BINARY_MIN {
        let res = ResourceArc::new(OutBuf(out.buf));
        for c in &out.chunks {
            parts.push(match *c {
                Chunk::Bytes { start, end } => res
                    .make_binary(env, |b: &OutBuf| &b.0[start..end])
                    .to_term(env)
                    .as_c_arg(),
                Chunk::Shared { index, .. } => out.shared[index as usize],
            });
        }
    } else {
        for c in &out.chunks {
            parts.push(match *c {
                Chunk::Bytes { start, end } => unsafe {
                    let mut term = ErlNifTerm::default();
                    let dst = enif_make_new_binary(raw_env, end - start, &mut term);
                    std::ptr::copy_nonoverlapping(out.buf[start..].as_ptr(), dst, end - start);
                    term
                },
                Chunk::Shared { index, .. } => out.shared[index as usize],
            });
        }
    }
    unsafe {
        Term::new(
            env,
            enif_make_list_from_array(raw_env, parts.as_ptr(), parts.len() as u32),
        )
    }
}
