//! `codec_decode`: makes Erlang terms from the external term format.
//!
//! A buffer that holds no binary worth sharing goes straight to the VM's own decoder
//! (`enif_binary_to_term`), which is as fast as `binary_to_term/1` itself. Only a buffer whose
//! bulk is one or a few large binaries is decoded here, so that those binaries become
//! sub-binaries of the buffer instead of copies (zero-copy receive). Whenever this path
//! fails, the VM's decoder gets the whole input and has the last word, so errors are those
//! of `binary_to_term/1`, with one exception: no input of `teleport_codec:decode/1,2` goes to
//! the VM's decoder before [`check_for_vm`] has checked every fun in it (OTP 25 accepts funs
//! whose creator is not a pid, and crashes when it later encodes them), so malformed funs are
//! `badarg` there even where `binary_to_term/1` accepts them. Frames from an authenticated
//! peer skip that pass, as disterl does ([`Source::Peer`]).

use crate::term_word::{self, from_word, word};
use rustler::sys::{
    enif_binary_to_term, enif_make_atom_len, enif_make_double, enif_make_existing_atom_len,
    enif_make_int64, enif_make_list_cell, enif_make_list_from_array, enif_make_map_from_arrays,
    enif_make_new_binary, enif_make_string_len, enif_make_sub_binary, enif_make_tuple_from_array,
    ErlNifCharEncoding, ErlNifEnv, ErlNifTerm, ERL_NIF_BIN2TERM_SAFE,
};
use std::cell::Cell;
use teleport_core::decode::inflate;
use teleport_core::decode::{check_for_vm, layout, may_share, parse, Builder, DecodeError, Layout};
use teleport_core::etf::{share_on_decode, DECODE_SHARE_MIN, VERSION};

/// Counts the atoms among the first [`SAMPLE_NODES`] nodes of a term, then stops the parse.
#[derive(Default)]
struct Sample {
    nodes: usize,
    atoms: usize,
}

/// Nodes looked at by [`Sample`]: enough to see a few records of a list of records.
const SAMPLE_NODES: usize = 1024;

impl Sample {
    #[inline]
    fn node(&mut self) -> Result<(), DecodeError> {
        self.nodes += 1;
        if self.nodes >= SAMPLE_NODES {
            return Err(DecodeError::Refused); // enough seen
        }
        Ok(())
    }
}

impl Builder for Sample {
    type Term = ();
    fn int(&mut self, _: i64) -> Result<(), DecodeError> {
        self.node()
    }
    fn float(&mut self, _: f64) -> Result<(), DecodeError> {
        self.node()
    }
    fn atom(&mut self, _: &[u8], _: bool, _: &[u8]) -> Result<(), DecodeError> {
        self.atoms += 1;
        self.node()
    }
    fn binary(&mut self, _: &[u8], _: usize) -> Result<(), DecodeError> {
        self.node()
    }
    fn opaque(&mut self, _: u8, _: &[u8]) -> Result<(), DecodeError> {
        self.node()
    }
    fn nil(&mut self) -> Result<(), DecodeError> {
        self.node()
    }
    fn string(&mut self, _: &[u8]) -> Result<(), DecodeError> {
        self.node()
    }
    fn tuple(&mut self, _: &mut [()]) -> Result<(), DecodeError> {
        self.node()
    }
    fn list(&mut self, _: &mut [()], _: ()) -> Result<(), DecodeError> {
        self.node()
    }
    fn map(&mut self, _: &mut [()]) -> Result<(), DecodeError> {
        self.node()
    }
}

/// Whether the term in `input` is better made here than by the VM's decoder: when atoms are
/// more than about one node in 16 (each costs the VM a lookup in its atom table under a lock,
/// and costs [`Make`] a cache hit), judged on the first nodes. Either way the result is the
/// same; this only picks the faster.
fn atom_heavy(input: &[u8]) -> bool {
    let mut sample = Sample::default();
    let _ = parse(input, 1, &mut sample);
    sample.atoms * 16 >= sample.nodes.max(1)
}

/// Makes terms in `env`; large binaries become sub-binaries of `input_term`.
struct Make {
    env: *mut ErlNifEnv,
    /// The input as a binary term, when large binaries may become sub-binaries of it.
    input_term: Option<ErlNifTerm>,
    total: usize,
    safe: bool,
    /// Scratch space for handing one subterm to the VM's decoder.
    scratch: Vec<u8>,
    /// Scratch space for the keys and values of one map.
    keys: Vec<ErlNifTerm>,
    values: Vec<ErlNifTerm>,
    atoms: Box<AtomCache>,
    /// Bytes of the binaries made sub-binaries of `input_term`.
    shared_bytes: usize,
}

/// Encoded atoms (tag, length and text, up to 31 bytes) and the atoms they stand for, kept
/// per thread between calls. Atoms are never freed on OTP 25, so an atom found once stays
/// valid for the life of the VM; a hit skips the VM's atom table (a hash lookup under a
/// lock, which is most of what `binary_to_term/1` spends on a term full of atoms). In safe
/// mode a hit is an atom that exists, which is all that safe mode asks.
struct AtomCache([CachedAtom; ATOM_CACHE_SLOTS]);

const ATOM_CACHE_SLOTS: usize = 512;

#[derive(Clone, Copy)]
struct CachedAtom {
    /// The atom's term word; 0 (never an atom) for an empty slot.
    atom: usize,
    len: u8,
    raw: [u8; 31],
}

thread_local! {
    static ATOM_CACHE: Cell<Option<Box<AtomCache>>> = const { Cell::new(None) };
}

impl AtomCache {
    fn take() -> Box<AtomCache> {
        ATOM_CACHE.with(|c| c.take()).unwrap_or_else(|| {
            Box::new(AtomCache(
                [CachedAtom {
                    atom: 0,
                    len: 0,
                    raw: [0; 31],
                }; ATOM_CACHE_SLOTS],
            ))
        })
    }

    fn put(self: Box<Self>) {
        ATOM_CACHE.with(|c| c.set(Some(self)));
    }

    #[inline]
    fn slot(raw: &[u8]) -> usize {
        let mut h = raw.len() as u64;
        for chunk in raw.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            h = (h ^ u64::from_le_bytes(word)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
        (h >> 40) as usize % ATOM_CACHE_SLOTS
    }

    #[inline]
    fn get(&self, raw: &[u8]) -> Option<ErlNifTerm> {
        let e = &self.0[Self::slot(raw)];
        (e.atom != 0 && e.raw.get(..e.len as usize) == Some(raw)).then(|| from_word(e.atom))
    }

    #[inline]
    fn insert(&mut self, raw: &[u8], atom: ErlNifTerm) {
        if raw.len() <= 31 {
            let e = &mut self.0[Self::slot(raw)];
            e.atom = word(atom);
            e.len = raw.len() as u8;
            e.raw[..raw.len()].copy_from_slice(raw);
        }
    }
}

impl Make {
    fn flags(&self) -> u32 {
        if self.safe {
            ERL_NIF_BIN2TERM_SAFE
        } else {
            0
        }
    }
}

impl Builder for Make {
    type Term = ErlNifTerm;

    fn int(&mut self, v: i64) -> Result<ErlNifTerm, DecodeError> {
        Ok(unsafe { enif_make_int64(self.env, v) })
    }
    fn float(&mut self, v: f64) -> Result<ErlNifTerm, DecodeError> {
        Ok(unsafe { enif_make_double(self.env, v) })
    }
    fn atom(&mut self, text: &[u8], utf8: bool, raw: &[u8]) -> Result<ErlNifTerm, DecodeError> {
        if let Some(atom) = self.atoms.get(raw) {
            return Ok(atom);
        }
        let atom = self.new_atom(text, utf8, raw)?;
        if term_word::is_atom(word(atom)) {
            self.atoms.insert(raw, atom);
        }
        Ok(atom)
    }
    fn binary(&mut self, data: &[u8], offset: usize) -> Result<ErlNifTerm, DecodeError> {
        self.make_binary(data, offset)
    }
    fn opaque(&mut self, tag: u8, raw: &[u8]) -> Result<ErlNifTerm, DecodeError> {
        self.vm_opaque(tag, raw)
    }
    fn atom_by_index(&mut self, raw: &[u8]) -> Result<ErlNifTerm, DecodeError> {
        self.vm_opaque(raw[0], raw)
    }
    fn nil(&mut self) -> Result<ErlNifTerm, DecodeError> {
        Ok(unsafe { enif_make_list_from_array(self.env, std::ptr::null(), 0) })
    }
    fn string(&mut self, bytes: &[u8]) -> Result<ErlNifTerm, DecodeError> {
        Ok(unsafe {
            enif_make_string_len(
                self.env,
                bytes.as_ptr().cast(),
                bytes.len(),
                ErlNifCharEncoding::ERL_NIF_LATIN1,
            )
        })
    }
    fn tuple(&mut self, elems: &mut [ErlNifTerm]) -> Result<ErlNifTerm, DecodeError> {
        Ok(unsafe { enif_make_tuple_from_array(self.env, elems.as_ptr(), elems.len() as u32) })
    }
    fn list(
        &mut self,
        elems: &mut [ErlNifTerm],
        tail: ErlNifTerm,
    ) -> Result<ErlNifTerm, DecodeError> {
        let mut list = tail;
        for &e in elems.iter().rev() {
            list = unsafe { enif_make_list_cell(self.env, e, list) };
        }
        Ok(list)
    }
    fn map(&mut self, pairs: &mut [ErlNifTerm]) -> Result<ErlNifTerm, DecodeError> {
        self.keys.clear();
        self.values.clear();
        for kv in pairs.chunks_exact(2) {
            self.keys.push(kv[0]);
            self.values.push(kv[1]);
        }
        let mut map = ErlNifTerm::default();
        let ok = unsafe {
            enif_make_map_from_arrays(
                self.env,
                self.keys.as_ptr(),
                self.values.as_ptr(),
                self.keys.len(),
                &mut map,
            )
        };
        if ok == 0 {
            return Err(DecodeError::Refused); // a repeated key
        }
        Ok(map)
    }
}

impl Make {
    fn new(env: *mut ErlNifEnv, input_term: Option<ErlNifTerm>, total: usize, safe: bool) -> Make {
        Make {
            env,
            input_term,
            total,
            safe,
            scratch: Vec::new(),
            keys: Vec::new(),
            values: Vec::new(),
            atoms: AtomCache::take(),
            shared_bytes: 0,
        }
    }

    fn done(self) {
        self.atoms.put();
    }

    fn new_atom(&mut self, text: &[u8], utf8: bool, raw: &[u8]) -> Result<ErlNifTerm, DecodeError> {
        if utf8 && !text.is_ascii() {
            // NIF 2.16 makes atoms from Latin-1 only.
            return self.vm_opaque(0, raw);
        }
        unsafe {
            if self.safe {
                let mut atom = ErlNifTerm::default();
                let found = enif_make_existing_atom_len(
                    self.env,
                    text.as_ptr().cast(),
                    text.len(),
                    &mut atom,
                    ErlNifCharEncoding::ERL_NIF_LATIN1,
                );
                if found == 0 {
                    return Err(DecodeError::Refused);
                }
                Ok(atom)
            } else {
                Ok(enif_make_atom_len(
                    self.env,
                    text.as_ptr().cast(),
                    text.len(),
                ))
            }
        }
    }
    fn make_binary(&mut self, data: &[u8], offset: usize) -> Result<ErlNifTerm, DecodeError> {
        unsafe {
            if let Some(input_term) = self.input_term {
                if share_on_decode(data.len(), self.total) {
                    self.shared_bytes += data.len();
                    return Ok(enif_make_sub_binary(
                        self.env,
                        input_term,
                        offset,
                        data.len(),
                    ));
                }
            }
            let mut term = ErlNifTerm::default();
            let dst = enif_make_new_binary(self.env, data.len(), &mut term);
            std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len());
            Ok(term)
        }
    }
    fn vm_opaque(&mut self, _tag: u8, raw: &[u8]) -> Result<ErlNifTerm, DecodeError> {
        self.scratch.clear();
        self.scratch.push(VERSION);
        self.scratch.extend_from_slice(raw);
        let mut term = ErlNifTerm::default();
        let used = unsafe {
            enif_binary_to_term(
                self.env,
                self.scratch.as_ptr(),
                self.scratch.len(),
                &mut term,
                self.flags(),
            )
        };
        if used != self.scratch.len() {
            return Err(DecodeError::Refused);
        }
        Ok(term)
    }
}

/// Where the bytes come from, which says how far they are trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `teleport_codec:decode/1,2`: anything, from anywhere. `safe` creates no atoms. Every
    /// fun is checked before the VM's decoder sees it ([`check_for_vm`]).
    Api {
        /// The `safe` option: no new atoms.
        safe: bool,
    },
    /// A frame from an authenticated peer. It holds the cookie, so it could send the same
    /// bytes over disterl (or run any code here): it is decoded as disterl decodes, atoms
    /// made, and without [`check_for_vm`]'s pass over the input, which every message would
    /// pay (most hold a byte 112 or 113).
    Peer,
}

impl Source {
    fn safe(self) -> bool {
        matches!(self, Source::Api { safe: true })
    }
}

/// The VM's own decoder on the whole input: `None` where `binary_to_term/1` raises `badarg`
/// or, for [`Source::Api`], where [`check_for_vm`] finds a malformed fun, which the VM must
/// not see.
///
/// # Safety
/// `env` must be a live env (process-bound or not) of the calling thread.
unsafe fn vm_decode(env: *mut ErlNifEnv, input: &[u8], source: Source) -> Option<ErlNifTerm> {
    if source != Source::Peer {
        check_for_vm(input).ok()?;
    }
    let flags = if source.safe() {
        ERL_NIF_BIN2TERM_SAFE
    } else {
        0
    };
    let mut term = ErlNifTerm::default();
    let used = enif_binary_to_term(env, input.as_ptr(), input.len(), &mut term, flags);
    (used != 0).then_some(term)
}

/// Inputs up to this size are decoded on a normal scheduler; larger ones on a dirty one.
pub const NORMAL_MAX_BYTES: usize = 64 * 1024;

/// Decodes `input`. Returns the term and the bytes decoded (shared binaries not counted:
/// they cost nothing), or `None` for `badarg`. Large binaries become sub-binaries of
/// `input_term` when it is given, a binary of `env` whose bytes are `input`.
///
/// # Safety
/// `env` must be live and `input_term`, if given, must be a binary of `env` holding `input`.
pub unsafe fn decode(
    env: *mut ErlNifEnv,
    input_term: Option<ErlNifTerm>,
    input: &[u8],
    source: Source,
) -> Option<(ErlNifTerm, usize)> {
    match layout(input).ok()? {
        Layout::Compressed { inflated } => {
            // Inflated here (on a dirty scheduler when large: see `needs_dirty`), then decoded
            // as a plain term; nothing in it can be shared, it is not the caller's binary.
            let mut plain = Vec::new();
            plain.push(VERSION);
            inflate::zlib(&input[6..], inflated, &mut plain).ok()?;
            decode_plain(env, None, &plain, source).map(|(t, _)| (t, inflated))
        }
        Layout::Plain => decode_plain(env, input_term, input, source),
    }
}

/// Whether decoding `input` is work for a dirty scheduler: more than [`NORMAL_MAX_BYTES`] to
/// decode, or to inflate first.
pub fn needs_dirty(input: &[u8]) -> bool {
    input.len() > NORMAL_MAX_BYTES
        || matches!(layout(input), Ok(Layout::Compressed { inflated }) if inflated > NORMAL_MAX_BYTES)
}

/// Inputs at least this long that are dense with atoms are made by teleport's parser rather
/// than the VM's decoder (binaries are shared from the smaller [`DECODE_SHARE_MIN`]).
const ATOM_HEAVY_MIN: usize = 64 * 1024;

/// [`decode`] of a plain (not compressed) term.
///
/// # Safety
/// As for [`decode`]: `env` must be live and `input_term`, if given, a binary of `env`
/// holding `input`.
unsafe fn decode_plain(
    env: *mut ErlNifEnv,
    input_term: Option<ErlNifTerm>,
    input: &[u8],
    source: Source,
) -> Option<(ErlNifTerm, usize)> {
    // Small: the VM's decoder is fastest (and nothing in it is worth sharing).
    if input.len() < DECODE_SHARE_MIN {
        return vm_decode(env, input, source).map(|t| (t, input.len()));
    }
    // Larger: made here when large binaries would become sub-binaries of the input
    // (zero-copy), or, from ATOM_HEAVY_MIN, when atoms abound (they come from a per-thread
    // cache rather than the VM's atom table); else the VM's decoder is faster.
    let share = input_term.is_some() && may_share(input);
    if !share && (input.len() < ATOM_HEAVY_MIN || !atom_heavy(input)) {
        return vm_decode(env, input, source).map(|t| (t, input.len()));
    }
    // No `check_for_vm` needed before this parse: it checks every fun itself before `Make`
    // hands one to the VM's decoder (`vm_opaque`), and `vm_decode` below checks again for
    // the API.
    let mut make = Make::new(
        env,
        input_term.filter(|_| share),
        input.len(),
        source.safe(),
    );
    let made = parse(input, 1, &mut make);
    let shared_bytes = make.shared_bytes;
    make.done();
    match made {
        Ok((term, _)) => Some((term, input.len() - shared_bytes)),
        Err(_) => vm_decode(env, input, source).map(|t| (t, input.len())),
    }
}
