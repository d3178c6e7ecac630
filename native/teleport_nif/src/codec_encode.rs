//! `codec_encode`: walks an Erlang term and writes it with [`teleport_core::encode::Writer`].
//!
//! The walk is iterative (no recursion on the scheduler's small stack) and budgeted: on a
//! normal scheduler it gives up after well under a millisecond of work, or as soon as it can
//! tell that the rest will not fit, and tells the caller to run it again on a dirty scheduler,
//! so no normal scheduler is ever blocked for long. Large binaries are not copied: the
//! returned iolist holds the caller's own binary terms.
//!
//! Speed: small integers, atoms, `[]` and list cells are recognised from the bits of the term
//! word (see [`crate::term_word`]); containers are walked in place (a frame per open tuple,
//! list or map, no copy of their elements); atoms' encodings are kept per thread (an atom's
//! text never changes); and the scratch memory of a walk is kept per thread between calls.

use crate::local_id::{with_vm_encoding, write_remote, LocalIds};
use crate::term_word::{self, debug_check, is_atom, is_cons, small, word, NIL};
use rustler::sys::{
    enif_alloc_env, enif_binary_to_term, enif_compare, enif_get_atom, enif_get_double,
    enif_get_int64, enif_get_list_cell, enif_get_map_size, enif_get_tuple, enif_get_uint64,
    enif_inspect_binary, enif_make_list_cell, enif_make_list_from_array, enif_make_new_binary,
    enif_map_iterator_create, enif_map_iterator_destroy, enif_map_iterator_get_pair,
    enif_map_iterator_next, enif_term_type, ErlNifBinary, ErlNifCharEncoding, ErlNifEnv,
    ErlNifMapIterator, ErlNifMapIteratorEntry, ErlNifTerm, ErlNifTermType,
};
use rustler::{Env, Term};
use std::cell::Cell;
use std::mem::MaybeUninit;
use std::sync::OnceLock;
use teleport_core::encode::{Chunk, Patch, Writer};
use teleport_core::etf::ENCODE_SHARE_MIN;

/// Work units a normal scheduler may spend before handing the term to a dirty scheduler.
/// One unit is one term visited or 64 bytes copied (about 2-4 ns); 100k units take about
/// 0.3 ms, well under the 1 ms a NIF may hold a normal scheduler.
pub const NORMAL_BUDGET: usize = 100_000;

/// Work units that make one Erlang reduction, for reduction accounting of dirty runs.
pub const UNITS_PER_REDUCTION: usize = 10;

/// Work charged for a pid, port or reference the VM encodes (150-250 ns).
const OPAQUE_UNITS: usize = 32;

/// Bignums up to this many bytes are encoded on a normal scheduler; larger ones move the
/// encode to a dirty one.
const NORMAL_MAX_BIGNUM_BYTES: usize = 4096;

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

/// An open container, in the order the walk entered them.
#[derive(Clone, Copy)]
enum Frame {
    /// A tuple's elements still to write are `next..end` (on the VM heap, from
    /// `enif_get_tuple`); it has `arity` elements.
    Tuple {
        next: *const ErlNifTerm,
        end: *const ErlNifTerm,
        arity: usize,
        work0: usize,
    },
    /// A map's keys and values still to write are `pairs[next..end]`; they start at `start`.
    Pairs {
        next: usize,
        end: usize,
        start: usize,
        work0: usize,
    },
    /// A list whose first `count` elements are written; `rest` is what follows them.
    List {
        rest: ErlNifTerm,
        patch: Patch,
        count: u32,
        work0: usize,
    },
}

/// One atom's encoding, as this thread last wrote it.
#[derive(Clone, Copy)]
struct AtomSlot {
    /// The atom's term word; 0 (never an atom) for an empty slot.
    key: usize,
    len: u8,
    bytes: [u8; 55],
}

const ATOM_SLOTS: usize = 256;

/// A direct-mapped cache from atom to its encoding. Atoms are never freed nor renamed on
/// OTP 25, so an atom's term word stands for the same text for the life of the VM.
struct AtomCache([AtomSlot; ATOM_SLOTS]);

/// Memory a walk needs, kept per thread between calls.
struct Scratch {
    frames: Vec<Frame>,
    pairs: Vec<ErlNifTerm>,
    bytes: Vec<u8>,
    atoms: Box<AtomCache>,
}

impl Scratch {
    fn new() -> Box<Scratch> {
        Box::new(Scratch {
            frames: Vec::with_capacity(32),
            pairs: Vec::new(),
            bytes: Vec::new(),
            atoms: Box::new(AtomCache(
                [AtomSlot {
                    key: 0,
                    len: 0,
                    bytes: [0; 55],
                }; ATOM_SLOTS],
            )),
        })
    }
}

thread_local! {
    static SCRATCH: Cell<Option<Box<Scratch>>> = const { Cell::new(None) };
    /// An output buffer and chunk list left by the last small encode on this thread.
    static OUT: Cell<Option<(Vec<u8>, Vec<Chunk>)>> = const { Cell::new(None) };
}

/// Largest output buffer kept for reuse between calls: a fresh one costs a page fault every
/// 4 KiB (and unmapping it later), which costs more than encoding into it.
const KEEP_CAPACITY: usize = 8 << 20;

fn take_scratch() -> Box<Scratch> {
    SCRATCH.with(|s| s.take()).unwrap_or_else(Scratch::new)
}

fn put_scratch(mut s: Box<Scratch>) {
    s.frames.clear();
    s.pairs.clear();
    if s.pairs.capacity() > KEEP_CAPACITY / 64 {
        s.pairs = Vec::new();
    }
    if s.bytes.capacity() > KEEP_CAPACITY / 64 {
        s.bytes = Vec::new();
    }
    SCRATCH.with(|c| c.set(Some(s)));
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
    let mut w = match OUT.with(|o| o.take()) {
        Some((buf, chunks)) => Writer::from_vecs(buf, chunks),
        None => Writer::with_capacity(if budget.is_some() { 1024 } else { 64 * 1024 }),
    };
    w.version();
    let result = write_term(env, term, &mut w, budget);
    let (buf, chunks) = w.finish();
    match result {
        Ok((shared, work)) => Ok(Encoded {
            work: work + buf.len() / 64,
            buf,
            chunks,
            shared,
        }),
        Err(over) => {
            give_back(buf, chunks);
            Err(over)
        }
    }
}

/// Keeps an output buffer for the next encode on this thread.
fn give_back(buf: Vec<u8>, chunks: Vec<Chunk>) {
    if buf.capacity() <= KEEP_CAPACITY {
        OUT.with(|o| o.set(Some((buf, chunks))));
    }
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
    let mut scratch = take_scratch();
    let limit = budget.unwrap_or(usize::MAX);
    let mut walk = Walk {
        env,
        fast: term_word::fast_ok(env),
        w,
        s: &mut scratch,
        shared: Vec::new(),
        work: 0,
        limit,
        check_at: 0,
        opaque: [(0, 0, 0); OPAQUE_SLOTS],
        ids: LocalIds::default(),
    };
    walk.reset_checks();
    let result = walk.run(term);
    let (shared, work) = (walk.shared, walk.work);
    put_scratch(scratch);
    result.map(|()| (shared, work))
}

const OPAQUE_SLOTS: usize = 8;

/// One walk over one term.
struct Walk<'a> {
    env: *mut ErlNifEnv,
    /// Whether the term word bit tests are usable.
    fast: bool,
    w: &'a mut Writer,
    s: &'a mut Scratch,
    shared: Vec<ErlNifTerm>,
    work: usize,
    limit: usize,
    /// When `work` passes this, [`Walk::checkpoint`] runs.
    check_at: usize,
    /// Pids, ports and references written in this walk: term word, offset and length of
    /// their encoding in the output (a term word stands for one term during one NIF call).
    opaque: [(usize, u32, u32); OPAQUE_SLOTS],
    /// This node, for the local identifiers written here.
    ids: LocalIds,
}

impl Walk<'_> {
    /// Sets when [`Walk::checkpoint`] first runs. On a normal scheduler that is early: a
    /// large term then wastes little of it before it moves to a dirty one.
    fn reset_checks(&mut self) {
        self.check_at = if self.limit != usize::MAX {
            self.work + self.limit / 32
        } else {
            usize::MAX
        };
    }

    /// # Safety
    /// `term` must be a term of `self.env`, which stays live for the whole walk (the env of the
    /// NIF call it runs in).
    unsafe fn run(&mut self, term: ErlNifTerm) -> Result<(), OverBudget> {
        let mut t = term;
        loop {
            self.work += 1;
            if self.work > self.check_at {
                self.checkpoint()?;
            }
            // Either the term is written whole (`None`) or it opened a container whose first
            // element comes next.
            if let Some(first) = self.one(t)? {
                t = first;
                continue;
            }
            match self.next() {
                Some(n) => t = n,
                None => return Ok(()),
            }
        }
    }

    /// Writes `t`, or its header when it is a non-empty container: then a frame is pushed and
    /// its first element returned.
    ///
    /// # Safety
    /// `t` must be a term of `self.env`, which stays live for the whole walk (the env of the NIF call it runs in).
    #[inline(always)]
    unsafe fn one(&mut self, t: ErlNifTerm) -> Result<Option<ErlNifTerm>, OverBudget> {
        use ErlNifTermType::*;
        let x = word(t);
        if self.fast {
            if let Some(v) = small(x) {
                debug_check(self.env, t, ERL_NIF_TERM_TYPE_INTEGER);
                self.w.int(v);
                return Ok(None);
            }
            if is_atom(x) {
                debug_check(self.env, t, ERL_NIF_TERM_TYPE_ATOM);
                self.atom(t);
                return Ok(None);
            }
            if x == NIL {
                debug_check(self.env, t, ERL_NIF_TERM_TYPE_LIST);
                self.w.nil();
                return Ok(None);
            }
            if is_cons(x) {
                debug_check(self.env, t, ERL_NIF_TERM_TYPE_LIST);
                return self.list(t);
            }
            if x & 0x3 == 0x3 {
                // Another immediate: a local pid or port. (Anything else would be encoded
                // right by the VM all the same.)
                self.opaque(t);
                return Ok(None);
            }
        }
        self.boxed(t, enif_term_type(self.env, t))
    }

    /// The terms the bit tests do not classify (all of them when they are off).
    ///
    /// # Safety
    /// `t` must be a term of `self.env`, which stays live for the whole walk (the env of the NIF call it runs in).
    #[inline(never)]
    unsafe fn boxed(
        &mut self,
        t: ErlNifTerm,
        ty: ErlNifTermType,
    ) -> Result<Option<ErlNifTerm>, OverBudget> {
        use ErlNifTermType::*;
        let env = self.env;
        match ty {
            ERL_NIF_TERM_TYPE_TUPLE => {
                let mut arity = 0;
                let mut elems = std::ptr::null();
                enif_get_tuple(env, t, &mut arity, &mut elems);
                let arity = arity as usize;
                self.w.tuple_header(arity);
                if arity == 0 {
                    return Ok(None);
                }
                // Every element costs at least a unit: do not start what cannot finish.
                if arity > self.limit - self.work {
                    return Err(OverBudget);
                }
                self.s.frames.push(Frame::Tuple {
                    next: elems.add(1),
                    end: elems.add(arity),
                    arity,
                    work0: self.work,
                });
                Ok(Some(*elems))
            }
            ERL_NIF_TERM_TYPE_BITSTRING => {
                let mut bin = MaybeUninit::<ErlNifBinary>::uninit();
                if enif_inspect_binary(env, t, bin.as_mut_ptr()) == 0 {
                    // Not a whole number of bytes, and of a size only its encoding tells.
                    self.unknown_size(t, false)?;
                    return Ok(None);
                }
                let bin = bin.assume_init();
                if bin.size >= ENCODE_SHARE_MIN {
                    self.w.binary_ref(bin.size);
                    self.shared.push(t);
                } else {
                    self.w
                        .binary(std::slice::from_raw_parts(bin.data, bin.size));
                    self.work += bin.size / 64;
                }
                Ok(None)
            }
            ERL_NIF_TERM_TYPE_MAP => self.map(t),
            ERL_NIF_TERM_TYPE_FLOAT => {
                let mut f = 0.0;
                enif_get_double(env, t, &mut f);
                self.w.float(f);
                Ok(None)
            }
            ERL_NIF_TERM_TYPE_INTEGER => {
                let mut i = 0i64;
                let mut u = 0u64;
                if enif_get_int64(env, t, &mut i) != 0 {
                    self.w.int(i);
                } else if enif_get_uint64(env, t, &mut u) != 0 {
                    self.w.uint(u);
                } else {
                    self.unknown_size(t, small_bignum(t))?;
                }
                Ok(None)
            }
            ERL_NIF_TERM_TYPE_ATOM => {
                self.atom(t);
                Ok(None)
            }
            ERL_NIF_TERM_TYPE_LIST => {
                if rustler::sys::enif_is_empty_list(env, t) != 0 {
                    self.w.nil();
                    return Ok(None);
                }
                self.list(t)
            }
            ERL_NIF_TERM_TYPE_PID | ERL_NIF_TERM_TYPE_PORT | ERL_NIF_TERM_TYPE_REFERENCE => {
                self.opaque(t);
                Ok(None)
            }
            // Funs (whose environment may be of any size) and whatever a later VM adds.
            _ => {
                self.unknown_size(t, false)?;
                Ok(None)
            }
        }
    }

    /// A pid, port or reference: written here when it is a local one (see [`LocalIds`]) or a
    /// pid or reference of another node ([`write_remote`]), else the VM's own encoding, asked
    /// for once per walk.
    ///
    /// # Safety
    /// `t` must be a term of `self.env`, which stays live for the whole walk (the env of the NIF call it runs in).
    unsafe fn opaque(&mut self, t: ErlNifTerm) {
        if self.fast && (self.ids.write(self.env, t, self.w) || write_remote(self.env, t, self.w)) {
            self.work += 1;
            return;
        }
        let x = word(t);
        let slot = (x >> 4) % OPAQUE_SLOTS;
        let (key, at, len) = self.opaque[slot];
        if key == x {
            self.w.repeat(at as usize, len as usize);
            return;
        }
        let start = self.w.buffered();
        fallback(self.env, t, self.w);
        let len = self.w.buffered() - start;
        self.opaque[slot] = (x, start as u32, len as u32);
        if start > u32::MAX as usize {
            self.opaque[slot].0 = 0;
        }
        self.work += OPAQUE_UNITS;
    }

    /// A term the VM encodes and whose size is not known before: on a normal scheduler it
    /// moves the whole encode to a dirty one, unless the caller knows it is `small`.
    ///
    /// # Safety
    /// `t` must be a term of `self.env`, which stays live for the whole walk (the env of the NIF call it runs in).
    unsafe fn unknown_size(&mut self, t: ErlNifTerm, small: bool) -> Result<(), OverBudget> {
        if self.limit != usize::MAX && !small {
            return Err(OverBudget);
        }
        let start = self.w.buffered();
        fallback(self.env, t, self.w);
        self.work += (self.w.buffered() - start) / 64;
        Ok(())
    }

    /// # Safety
    /// `t` must be a term of `self.env`, which stays live for the whole walk (the env of the NIF call it runs in).
    #[inline(always)]
    unsafe fn atom(&mut self, t: ErlNifTerm) {
        let x = word(t);
        let slot = &mut self.s.atoms.0[(x >> 6) % ATOM_SLOTS];
        if slot.key == x {
            self.w.raw(&slot.bytes[..slot.len as usize]);
            return;
        }
        let start = self.w.buffered();
        write_atom(self.env, t, self.w);
        let written = &self.w.bytes()[start..];
        if written.len() <= slot.bytes.len() {
            slot.key = x;
            slot.len = written.len() as u8;
            slot.bytes[..written.len()].copy_from_slice(written);
        }
    }

    /// # Safety
    /// `t` must be a term of `self.env`, which stays live for the whole walk (the env of the NIF call it runs in).
    #[inline(always)]
    unsafe fn is_nil(&self, t: ErlNifTerm) -> bool {
        if self.fast {
            word(t) == NIL
        } else {
            rustler::sys::enif_is_empty_list(self.env, t) != 0
        }
    }

    /// A non-empty list: `STRING_EXT` if it is a proper list of at most 65535 bytes, else
    /// the header of a `LIST_EXT` (with the leading bytes already written) and its frame.
    ///
    /// # Safety
    /// `t` must be a term of `self.env`, which stays live for the whole walk (the env of the NIF call it runs in).
    unsafe fn list(&mut self, t: ErlNifTerm) -> Result<Option<ErlNifTerm>, OverBudget> {
        let env = self.env;
        let bytes = &mut self.s.bytes;
        bytes.clear();
        let mut cur = t;
        let (mut head, mut tail) = (ErlNifTerm::default(), ErlNifTerm::default());
        let mut work = self.work;
        loop {
            if bytes.len() == u16::MAX as usize
                || enif_get_list_cell(env, cur, &mut head, &mut tail) == 0
            {
                break;
            }
            let b = if self.fast {
                match small(word(head)) {
                    Some(v @ 0..=255) => v as u8,
                    _ => break,
                }
            } else {
                let mut v = 0i64;
                if enif_get_int64(env, head, &mut v) == 0 || !(0..=255).contains(&v) {
                    break;
                }
                v as u8
            };
            bytes.push(b);
            cur = tail;
            work += 1;
            if work > self.limit {
                return Err(OverBudget);
            }
        }
        self.work = work;
        let n = bytes.len();
        if n > 0 && self.is_nil(cur) {
            self.w.string(&self.s.bytes);
            return Ok(None);
        }
        // A list, not a string: the bytes seen so far are its first elements.
        let patch = self.w.list_header();
        for &b in &self.s.bytes {
            self.w.int(b as i64);
        }
        self.s.frames.push(Frame::List {
            rest: cur,
            patch,
            count: n as u32,
            work0: self.work - n,
        });
        Ok(self.next())
    }

    /// # Safety
    /// `t` must be a term of `self.env`, which stays live for the whole walk (the env of the NIF call it runs in).
    unsafe fn map(&mut self, t: ErlNifTerm) -> Result<Option<ErlNifTerm>, OverBudget> {
        let env = self.env;
        let mut size = 0;
        enif_get_map_size(env, t, &mut size);
        self.w.map_header(size);
        if size == 0 {
            return Ok(None);
        }
        // A key and a value per pair, a unit each at least, and a unit to fetch the pair.
        if size.saturating_mul(3) > self.limit - self.work {
            return Err(OverBudget);
        }
        let start = self.s.pairs.len();
        let mut iter = MaybeUninit::<ErlNifMapIterator>::uninit();
        if enif_map_iterator_create(
            env,
            t,
            iter.as_mut_ptr(),
            ErlNifMapIteratorEntry::ERL_NIF_MAP_ITERATOR_HEAD,
        ) != 0
        {
            let pairs = &mut self.s.pairs;
            pairs.reserve(2 * size);
            let (mut k, mut v) = (ErlNifTerm::default(), ErlNifTerm::default());
            while enif_map_iterator_get_pair(env, iter.as_mut_ptr(), &mut k, &mut v) != 0 {
                pairs.push(k);
                pairs.push(v);
                enif_map_iterator_next(env, iter.as_mut_ptr());
            }
            enif_map_iterator_destroy(env, iter.as_mut_ptr());
        }
        self.work += size;
        let end = self.s.pairs.len();
        if end == start {
            return Ok(None); // cannot happen: a map of `size` pairs has pairs
        }
        self.s.frames.push(Frame::Pairs {
            next: start + 1,
            end,
            start,
            work0: self.work,
        });
        Ok(Some(self.s.pairs[start]))
    }

    /// The next term to write: the next element of the innermost open container, closing
    /// the containers that are done. `None` when the whole term is written.
    ///
    /// # Safety
    /// The open containers' terms must be terms of `self.env`, live for the whole walk.
    #[inline(always)]
    unsafe fn next(&mut self) -> Option<ErlNifTerm> {
        loop {
            let frame = self.s.frames.last_mut()?;
            match frame {
                Frame::Tuple { next, end, .. } => {
                    if *next < *end {
                        let t = **next;
                        *next = next.add(1);
                        return Some(t);
                    }
                }
                Frame::Pairs {
                    next, end, start, ..
                } => {
                    if *next < *end {
                        let t = self.s.pairs[*next];
                        *next += 1;
                        return Some(t);
                    }
                    let start = *start;
                    self.s.pairs.truncate(start);
                }
                Frame::List {
                    rest, patch, count, ..
                } => {
                    let r = *rest;
                    let (mut head, mut tail) = (ErlNifTerm::default(), ErlNifTerm::default());
                    if !(self.fast && word(r) == NIL)
                        && enif_get_list_cell(self.env, r, &mut head, &mut tail) != 0
                    {
                        *rest = tail;
                        *count += 1;
                        self.work += 1;
                        return Some(head);
                    }
                    let (patch, count) = (*patch, *count);
                    self.s.frames.pop();
                    self.w.patch(patch, count);
                    if self.is_nil(r) {
                        self.w.nil();
                        continue;
                    }
                    return Some(r); // an improper tail: written as a term
                }
            }
            self.s.frames.pop();
        }
    }

    /// Runs when the work passes `check_at` on a normal scheduler: gives up when the budget
    /// is spent, or early when the containers still open hold more than a quarter of what is
    /// left of it (judging each by the average cost of its elements so far), so that a large
    /// term wastes little before it moves to a dirty scheduler. (A term that would just fit
    /// may move too: that costs a dirty scheduler's few microseconds, and proving that it
    /// fits could cost as much as encoding it.)
    ///
    /// # Safety
    /// The open containers' terms must be terms of `self.env`, live for the whole walk.
    #[cold]
    unsafe fn checkpoint(&mut self) -> Result<(), OverBudget> {
        if self.work > self.limit {
            return Err(OverBudget);
        }
        let left = (self.limit - self.work) / 4;
        let mut estimate = 0usize;
        for f in self.s.frames.iter() {
            let (done, remaining, work0) = match *f {
                Frame::Tuple {
                    next,
                    end,
                    arity,
                    work0,
                    ..
                } => {
                    let remaining = end.offset_from(next) as usize;
                    (arity - remaining, Some(remaining), work0)
                }
                Frame::Pairs {
                    next,
                    end,
                    start,
                    work0,
                } => (next - start, Some(end - next), work0),
                Frame::List { count, work0, .. } => (count as usize, None, work0),
            };
            let per = ((self.work - work0) / done.max(1)).max(1);
            let cap = (left - estimate.min(left)) / per + 1;
            let remaining = match (remaining, *f) {
                (Some(r), _) => r,
                (None, Frame::List { rest, .. }) => count_cells(self.env, rest, cap),
                (None, _) => 0,
            };
            estimate = estimate.saturating_add(remaining.saturating_mul(per));
            if estimate > left {
                return Err(OverBudget);
            }
        }
        self.check_at = self.limit.min(self.work.saturating_mul(2));
        Ok(())
    }
}

/// The number of list cells in `list`, counting no further than `cap`.
///
/// # Safety
/// `env` must be live and `list` a term of it.
unsafe fn count_cells(env: *mut ErlNifEnv, list: ErlNifTerm, cap: usize) -> usize {
    let (mut head, mut tail) = (ErlNifTerm::default(), ErlNifTerm::default());
    let mut cur = list;
    let mut n = 0;
    while n < cap && enif_get_list_cell(env, cur, &mut head, &mut tail) != 0 {
        cur = tail;
        n += 1;
    }
    n
}

/// Whether the bignum `t` has at most [`NORMAL_MAX_BIGNUM_BYTES`] bytes of digits: compared
/// with ±256^N, which the VM does in constant time when the sizes differ.
///
/// # Safety
/// `t` must be a live integer term (a bignum).
unsafe fn small_bignum(t: ErlNifTerm) -> bool {
    struct Bounds {
        high: ErlNifTerm,
        low: ErlNifTerm,
    }
    // SAFETY: the terms live in a process-independent env that is never freed, and are only
    // read (compared), which any thread may do.
    unsafe impl Send for Bounds {}
    unsafe impl Sync for Bounds {}
    static BOUNDS: OnceLock<Option<Bounds>> = OnceLock::new();
    let bounds = BOUNDS.get_or_init(|| {
        let env = enif_alloc_env();
        let make = |negative: u8| {
            // LARGE_BIG_EXT: 256^N is N zero bytes and a one.
            let n = NORMAL_MAX_BIGNUM_BYTES + 1;
            let mut ext = vec![131, 111];
            ext.extend_from_slice(&(n as u32).to_be_bytes());
            ext.push(negative);
            ext.resize(ext.len() + n - 1, 0);
            ext.push(1);
            let mut t = ErlNifTerm::default();
            (enif_binary_to_term(env, ext.as_ptr(), ext.len(), &mut t, 0) == ext.len()).then_some(t)
        };
        Some(Bounds {
            high: make(0)?,
            low: make(1)?,
        })
    });
    match bounds {
        Some(b) => enif_compare(t, b.high) < 0 && enif_compare(t, b.low) > 0,
        None => false,
    }
}

/// Writes a Latin-1 atom directly; any other atom goes through the VM's encoder.
///
/// # Safety
/// `env` must be live and `t` an atom of it.
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

/// Writes `t` as the VM encodes it (its `term_to_binary` without the version byte).
///
/// # Safety
/// `env` must be live and `t` a term of it.
pub unsafe fn fallback(env: *mut ErlNifEnv, t: ErlNifTerm, w: &mut Writer) {
    with_vm_encoding(env, t, |bytes| w.raw(&bytes[1..]));
}

/// Turns the output into an iolist of binaries: the writer's bytes copied into binaries of
/// the VM, with the shared binaries in their places; the buffer is kept for the next encode.
///
/// Large outputs are copied too (rather than handed over as resource binaries): the VM's
/// binaries count towards the garbage collector's binary heap and come from its allocator,
/// which keeps freed memory mapped, while a buffer behind a resource binary is freed only
/// when a collection happens to run, and a new one costs a page fault every 4 KiB: more than
/// the copy.
pub fn to_iolist<'a>(env: Env<'a>, out: Encoded) -> Term<'a> {
    let raw_env = env.as_c_arg();
    // Built back to front, one cell per chunk: no array to allocate.
    let list = unsafe {
        let mut list = enif_make_list_from_array(raw_env, std::ptr::null(), 0);
        for c in out.chunks.iter().rev() {
            let part = match *c {
                Chunk::Bytes { start, end } => {
                    let mut term = ErlNifTerm::default();
                    let dst = enif_make_new_binary(raw_env, end - start, &mut term);
                    std::ptr::copy_nonoverlapping(out.buf[start..].as_ptr(), dst, end - start);
                    term
                }
                Chunk::Shared { index, .. } => out.shared[index as usize],
            };
            list = enif_make_list_cell(raw_env, part, list);
        }
        list
    };
    give_back(out.buf, out.chunks);
    unsafe { Term::new(env, list) }
}
