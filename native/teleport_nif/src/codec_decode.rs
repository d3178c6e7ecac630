//! `codec_decode`: makes Erlang terms from the external term format.
//!
//! A buffer that holds no binary worth sharing goes straight to the VM's own decoder
//! (`enif_binary_to_term`), which is as fast as `binary_to_term/1` itself. Only a buffer whose
//! bulk is one or a few large binaries is decoded here, so that those binaries become
//! sub-binaries of the buffer instead of copies (zero-copy receive). Whenever this path
//! fails, the VM's decoder gets the whole input and has the last word, so errors are exactly
//! those of `binary_to_term/1`.

use rustler::sys::{
    enif_binary_to_term, enif_make_atom_len, enif_make_double, enif_make_existing_atom_len,
    enif_make_int64, enif_make_list_cell, enif_make_list_from_array, enif_make_map_from_arrays,
    enif_make_new_binary, enif_make_string_len, enif_make_sub_binary, enif_make_tuple_from_array,
    ErlNifCharEncoding, ErlNifEnv, ErlNifTerm, ERL_NIF_BIN2TERM_SAFE,
};
use teleport_core::decode::{layout, parse, Builder, DecodeError, Layout};
use teleport_core::etf::{share_on_decode, DECODE_SHARE_MIN, VERSION};

/// Finds out whether any binary in the buffer would be shared, building nothing.
struct Scan {
    total: usize,
    shared_bytes: usize,
}

impl Builder for Scan {
    type Term = ();
    fn int(&mut self, _: i64) -> Result<(), DecodeError> {
        Ok(())
    }
    fn float(&mut self, _: f64) -> Result<(), DecodeError> {
        Ok(())
    }
    fn atom(&mut self, _: &[u8], _: bool, _: &[u8]) -> Result<(), DecodeError> {
        Ok(())
    }
    fn binary(&mut self, data: &[u8], _: usize) -> Result<(), DecodeError> {
        if share_on_decode(data.len(), self.total) {
            self.shared_bytes += data.len();
        }
        Ok(())
    }
    fn opaque(&mut self, _: u8, _: &[u8]) -> Result<(), DecodeError> {
        Ok(())
    }
    fn nil(&mut self) -> Result<(), DecodeError> {
        Ok(())
    }
    fn string(&mut self, _: &[u8]) -> Result<(), DecodeError> {
        Ok(())
    }
    fn tuple(&mut self, _: &mut [()]) -> Result<(), DecodeError> {
        Ok(())
    }
    fn list(&mut self, _: &mut [()], _: ()) -> Result<(), DecodeError> {
        Ok(())
    }
    fn map(&mut self, _: &mut [()]) -> Result<(), DecodeError> {
        Ok(())
    }
}

/// Makes terms in `env`; large binaries become sub-binaries of `input_term`.
struct Make {
    env: *mut ErlNifEnv,
    input_term: ErlNifTerm,
    total: usize,
    safe: bool,
    /// Scratch space for handing one subterm to the VM's decoder.
    scratch: Vec<u8>,
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
        if utf8 && !text.is_ascii() {
            // NIF 2.16 makes atoms from Latin-1 only.
            return self.opaque(0, raw);
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
    fn binary(&mut self, data: &[u8], offset: usize) -> Result<ErlNifTerm, DecodeError> {
        unsafe {
            if share_on_decode(data.len(), self.total) {
                return Ok(enif_make_sub_binary(
                    self.env,
                    self.input_term,
                    offset,
                    data.len(),
                ));
            }
            let mut term = ErlNifTerm::default();
            let dst = enif_make_new_binary(self.env, data.len(), &mut term);
            std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len());
            Ok(term)
        }
    }
    fn opaque(&mut self, _tag: u8, raw: &[u8]) -> Result<ErlNifTerm, DecodeError> {
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
        let keys: Vec<_> = pairs.iter().step_by(2).copied().collect();
        let values: Vec<_> = pairs.iter().skip(1).step_by(2).copied().collect();
        let mut map = ErlNifTerm::default();
        let ok = unsafe {
            enif_make_map_from_arrays(
                self.env,
                keys.as_ptr(),
                values.as_ptr(),
                keys.len(),
                &mut map,
            )
        };
        if ok == 0 {
            return Err(DecodeError::Refused); // a repeated key
        }
        Ok(map)
    }
}

/// The VM's own decoder on the whole input: `None` where `binary_to_term/1` raises `badarg`.
unsafe fn vm_decode(env: *mut ErlNifEnv, input: &[u8], safe: bool) -> Option<ErlNifTerm> {
    let flags = if safe { ERL_NIF_BIN2TERM_SAFE } else { 0 };
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
    safe: bool,
) -> Option<(ErlNifTerm, usize)> {
    match layout(input).ok()? {
        Layout::Compressed { inflated } => {
            return vm_decode(env, input, safe).map(|t| (t, inflated));
        }
        Layout::Plain => {}
    }
    // Too small to hold a binary worth sharing, or nothing to share from.
    let Some(input_term) = input_term.filter(|_| input.len() >= DECODE_SHARE_MIN) else {
        return vm_decode(env, input, safe).map(|t| (t, input.len()));
    };
    let mut scan = Scan {
        total: input.len(),
        shared_bytes: 0,
    };
    if parse(input, 1, &mut scan).is_err() || scan.shared_bytes == 0 {
        return vm_decode(env, input, safe).map(|t| (t, input.len()));
    }
    let mut make = Make {
        env,
        input_term,
        total: input.len(),
        safe,
        scratch: Vec::new(),
    };
    match parse(input, 1, &mut make) {
        Ok((term, _)) => Some((term, input.len() - scan.shared_bytes)),
        Err(_) => vm_decode(env, input, safe).map(|t| (t, input.len())),
    }
}
