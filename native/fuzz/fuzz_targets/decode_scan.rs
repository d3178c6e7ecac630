//! `decode_scan`: arbitrary bytes through `layout` and the raw `parse` with a builder that
//! makes nothing (`Term = ()`), like the NIF's validating scan. It never refuses a value, so
//! inputs that the `Value` builder stops at (repeated map keys) go on through the parser.
//!
//! Checks: no panic, no hang, no more heap than the input's budget; every slice the parser
//! hands to the builder lies inside the input and is what it claims to be (an opaque term's
//! encoding starts with its tag, a binary sits at its offset, an atom's text ends its raw
//! encoding); the end offset of a parsed term lies inside the input; a compressed header's
//! claimed size is at most `MAX_INFLATE_RATIO` times the deflated bytes. Input that starts with
//! the version byte is parsed from offset 1 and also decoded with `decode_value`: both must
//! agree on the outcome, the end offset and the error (the `Value` builder may only fail
//! earlier, with `Refused`). Other input is parsed from offset 0, as a bare term.
#![no_main]

use libfuzzer_sys::fuzz_target;
use teleport_core::decode::{layout, may_hold_fun, parse, Builder, DecodeError, Layout};
use teleport_core::etf::*;
use teleport_core::value::decode_value_used;
use teleport_fuzz::{dispose, run_check};

fuzz_target!(|data: &[u8]| run_check(data, check));

fn check(data: &[u8]) {
    let lay = layout(data);
    if let Ok(Layout::Compressed { inflated }) = lay {
        let deflated = data.len() - 6;
        assert!(
            inflated > 0 && inflated <= deflated * MAX_INFLATE_RATIO,
            "compressed header claims {inflated} bytes from {deflated}"
        );
    }
    let start = usize::from(data.first() == Some(&VERSION));
    let mut scan = Scan {
        input: data,
        funs: 0,
    };
    let scanned = parse(data, start, &mut scan);
    // The scan that lets the VM's decoder skip the fun check (`check_for_vm`) is never
    // wrong: where it says no fun, the parse meets none.
    if !may_hold_fun(&data[start..]) {
        assert_eq!(scan.funs, 0, "the fun scan missed a fun");
    }
    if let Ok(((), end)) = scanned {
        assert!(
            end > start && end <= data.len(),
            "term from {start} ends at {end} of {}",
            data.len()
        );
    }
    if start == 1 && lay == Ok(Layout::Plain) {
        let decoded = decode_value_used(data);
        let outcome = match &decoded {
            Ok((_, end)) => Ok(*end),
            Err(e) => Err(*e),
        };
        if let Ok((v, _)) = decoded {
            dispose(v);
        }
        match (scanned.map(|(_, end)| end), outcome) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "scan and decode_value end at different offsets"),
            (Ok(_), Err(DecodeError::Refused)) => {}
            (Err(a), Err(b)) => assert!(
                a == b || b == DecodeError::Refused,
                "scan fails with {a:?}, decode_value with {b:?}"
            ),
            (a, b) => panic!("scan gives {a:?}, decode_value gives {b:?}"),
        }
    }
}

/// A builder that makes nothing and checks what the parser hands it.
struct Scan<'a> {
    input: &'a [u8],
    /// Funs met.
    funs: usize,
}

impl Scan<'_> {
    /// `part` is a slice of the input; returns its offset there.
    fn offset_of(&self, part: &[u8], what: &str) -> usize {
        let base = self.input.as_ptr() as usize;
        let at = part.as_ptr() as usize;
        assert!(
            at >= base && at + part.len() <= base + self.input.len(),
            "{what} of {} bytes is not inside the input",
            part.len()
        );
        at - base
    }
}

impl Builder for Scan<'_> {
    type Term = ();

    fn int(&mut self, _: i64) -> Result<(), DecodeError> {
        Ok(())
    }
    fn float(&mut self, v: f64) -> Result<(), DecodeError> {
        assert!(v.is_finite(), "float {v}");
        Ok(())
    }
    fn atom(&mut self, text: &[u8], utf8: bool, raw: &[u8]) -> Result<(), DecodeError> {
        self.offset_of(raw, "an atom's encoding");
        let (tags, header): (&[u8], usize) = match raw.first() {
            Some(&ATOM_EXT) | Some(&ATOM_UTF8_EXT) => (&[ATOM_EXT, ATOM_UTF8_EXT], 3),
            _ => (&[SMALL_ATOM_EXT, SMALL_ATOM_UTF8_EXT], 2),
        };
        assert!(tags.contains(&raw[0]), "atom tag {}", raw[0]);
        assert_eq!(utf8, matches!(raw[0], ATOM_UTF8_EXT | SMALL_ATOM_UTF8_EXT));
        assert_eq!(raw.len(), header + text.len(), "atom header and text");
        assert!(
            std::ptr::eq(&raw[header..], text),
            "atom text is not in its encoding"
        );
        if utf8 {
            let s = std::str::from_utf8(text).expect("utf-8 atom text");
            assert!(s.chars().count() <= MAX_ATOM_CHARS);
        } else {
            assert!(text.len() <= MAX_ATOM_CHARS);
        }
        Ok(())
    }
    fn binary(&mut self, data: &[u8], offset: usize) -> Result<(), DecodeError> {
        assert_eq!(self.offset_of(data, "a binary"), offset, "binary offset");
        assert!(
            offset >= 5,
            "a binary at {offset} leaves no room for its header"
        );
        assert_eq!(self.input[offset - 5], BINARY_EXT);
        Ok(())
    }
    fn opaque(&mut self, tag: u8, raw: &[u8]) -> Result<(), DecodeError> {
        self.offset_of(raw, "an opaque term");
        self.funs += usize::from(matches!(tag, NEW_FUN_EXT | EXPORT_EXT));
        assert_eq!(
            raw.first(),
            Some(&tag),
            "opaque term's encoding starts with its tag"
        );
        assert!(
            matches!(
                tag,
                NEW_PID_EXT
                    | PID_EXT
                    | NEW_PORT_EXT
                    | V4_PORT_EXT
                    | PORT_EXT
                    | NEWER_REFERENCE_EXT
                    | NEW_REFERENCE_EXT
                    | REFERENCE_EXT
                    | NEW_FUN_EXT
                    | EXPORT_EXT
                    | BIT_BINARY_EXT
                    | FLOAT_EXT
                    | SMALL_BIG_EXT
                    | LARGE_BIG_EXT
            ),
            "opaque tag {tag}"
        );
        Ok(())
    }
    fn nil(&mut self) -> Result<(), DecodeError> {
        Ok(())
    }
    fn string(&mut self, bytes: &[u8]) -> Result<(), DecodeError> {
        let at = self.offset_of(bytes, "a string");
        assert!(at >= 3 && self.input[at - 3] == STRING_EXT, "string header");
        Ok(())
    }
    fn tuple(&mut self, _: &mut [()]) -> Result<(), DecodeError> {
        Ok(())
    }
    fn list(&mut self, elems: &mut [()], _: ()) -> Result<(), DecodeError> {
        assert!(
            elems.len() < self.input.len(),
            "{} list elements",
            elems.len()
        );
        Ok(())
    }
    fn map(&mut self, pairs: &mut [()]) -> Result<(), DecodeError> {
        assert!(
            pairs.len().is_multiple_of(2),
            "a map of {} keys and values",
            pairs.len()
        );
        Ok(())
    }
}
