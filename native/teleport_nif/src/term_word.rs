//! What the machine word of a term tells without calling into the VM.
//!
//! On a 64-bit ERTS the low bits of a term word are its tag: a small integer ends in `0xF`
//! (its value is the word shifted right by 4), an atom in `0x0B` (6 bits), `[]` is `0x3B`, a
//! list cell ends in `0b01` and any other boxed term in `0b10`. Only the word itself is looked
//! at, never the memory it may point to: a wrong guess could make a wrong encoding, never a
//! crash. And the guesses are checked once, on the first use, against what the `enif_*`
//! functions say about terms made by the VM; if any disagrees, [`fast_ok`] says no forever and
//! callers use the `enif_*` functions for everything. Debug builds also check every guess.

use rustler::sys::{
    enif_is_empty_list, enif_make_atom_len, enif_make_double, enif_make_int64, enif_make_list_cell,
    enif_make_list_from_array, enif_make_new_binary, enif_make_new_map, enif_make_tuple_from_array,
    enif_term_type, ErlNifEnv, ErlNifTerm, ErlNifTermType,
};
use std::sync::atomic::{AtomicU8, Ordering};

/// The machine word of a term (`ErlNifTerm` is a transparent wrapper around it).
#[inline(always)]
pub fn word(t: ErlNifTerm) -> usize {
    // SAFETY: `ErlNifTerm` is `#[repr(transparent)]` over a `usize`-sized integer.
    unsafe { std::mem::transmute::<ErlNifTerm, usize>(t) }
}

/// The term whose machine word is `w`: only for words read from terms the VM made (an atom's
/// word, for instance, stands for the same atom in every env for the life of the VM).
#[inline(always)]
pub fn from_word(w: usize) -> ErlNifTerm {
    // SAFETY: as for `word`.
    unsafe { std::mem::transmute::<usize, ErlNifTerm>(w) }
}

/// `[]`.
pub const NIL: usize = 0x3B;

/// The value of a small integer, if `w` is one.
#[inline(always)]
pub fn small(w: usize) -> Option<i64> {
    (w & 0xF == 0xF).then_some((w as i64) >> 4)
}

/// Whether `w` is an atom.
#[inline(always)]
pub fn is_atom(w: usize) -> bool {
    w & 0x3F == 0x0B
}

/// Whether `w` is a list cell (a non-empty list).
#[inline(always)]
pub fn is_cons(w: usize) -> bool {
    w & 0x3 == 0x1
}

/// Checks `guess` against `enif_term_type` in debug builds.
#[inline(always)]
pub fn debug_check(env: *mut ErlNifEnv, t: ErlNifTerm, want: ErlNifTermType) {
    if cfg!(debug_assertions) {
        let got = unsafe { enif_term_type(env, t) } as i32;
        let want = want as i32;
        debug_assert!(
            got == want,
            "term word {:#x}: type {got}, guessed {want}",
            word(t)
        );
    }
}

const UNKNOWN: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;
static FAST: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Whether the bit tests of this module agree with the VM (checked once, with `env`).
///
/// # Safety
/// `env` must be a live env (a few terms are made in it the first time).
#[inline]
pub unsafe fn fast_ok(env: *mut ErlNifEnv) -> bool {
    match FAST.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => {
            let ok = cfg!(target_pointer_width = "64") && self_check(env);
            FAST.store(if ok { ON } else { OFF }, Ordering::Relaxed);
            if !ok {
                tracing::warn!(
                    reason = "the VM's term word layout is not the expected one: codec fast paths are off",
                    "codec_fast_paths_off"
                );
            }
            ok
        }
    }
}

/// Makes one term of every kind the bit tests classify and checks each test's answer.
///
/// # Safety
/// `env` must be a live env of the calling thread.
unsafe fn self_check(env: *mut ErlNifEnv) -> bool {
    use ErlNifTermType::*;
    let ty = |t| enif_term_type(env, t) as i32;
    let nil = enif_make_list_from_array(env, std::ptr::null(), 0);
    let mut ok = word(nil) == NIL
        && enif_is_empty_list(env, nil) != 0
        && ty(nil) == ERL_NIF_TERM_TYPE_LIST as i32;
    let smalls = [
        0,
        1,
        -1,
        255,
        256,
        1 << 27,
        -(1 << 27),
        i32::MAX as i64,
        i32::MIN as i64,
    ];
    for v in smalls
        .into_iter()
        .chain([(1 << 59) - 1, -(1 << 59), 0x0123_4567_89ab_cdef >> 5])
    {
        let t = enif_make_int64(env, v);
        ok &= small(word(t)) == Some(v) && ty(t) == ERL_NIF_TERM_TYPE_INTEGER as i32;
    }
    for v in [1 << 59, -(1 << 59) - 1, i64::MAX, i64::MIN] {
        // Too big for a small integer: boxed, and no bit test may claim it.
        let w = word(enif_make_int64(env, v));
        ok &= small(w).is_none() && !is_atom(w) && !is_cons(w) && w != NIL;
    }
    for name in [&b""[..], b"ok", b"true", b"teleport_term_word_check"] {
        let t = enif_make_atom_len(env, name.as_ptr().cast(), name.len());
        ok &=
            is_atom(word(t)) && small(word(t)).is_none() && ty(t) == ERL_NIF_TERM_TYPE_ATOM as i32;
    }
    let one = enif_make_int64(env, 1);
    let cell = enif_make_list_cell(env, one, nil);
    ok &= is_cons(word(cell)) && ty(cell) == ERL_NIF_TERM_TYPE_LIST as i32;
    let mut bin = ErlNifTerm::default();
    enif_make_new_binary(env, 3, &mut bin);
    let others = [
        enif_make_tuple_from_array(env, [one, nil].as_ptr(), 2),
        enif_make_double(env, 1.5),
        enif_make_new_map(env),
        bin,
    ];
    for t in others {
        let w = word(t);
        ok &= small(w).is_none() && !is_atom(w) && !is_cons(w) && w != NIL;
    }
    ok
}
