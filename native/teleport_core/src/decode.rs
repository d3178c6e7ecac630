//! The input side of the codec: an iterative parser for the external term format.
//!
//! [`parse`] walks one encoded term and hands every node to a [`Builder`], which makes the
//! value: Erlang terms in the NIF, a [`crate::value::Value`] in tests, or nothing at all in
//! the validating scan that decides whether a buffer is worth decoding with sub-binaries.
//!
//! The parser never recurses (a term nested a million deep cannot overflow a scheduler's
//! stack), never allocates in proportion to a length field it has not checked against the
//! bytes that remain (a length of 4 GB in a 10-byte buffer is refused, not allocated), and
//! only ever reads inside `input`.

use crate::etf::*;
use std::fmt;

/// Why a buffer is not a valid encoded term. The NIF turns every one of these into `badarg`,
/// as `binary_to_term/1` does; the variants are for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The input ended inside a term.
    Truncated,
    /// The first byte is not 131.
    BadVersion,
    /// A tag that `binary_to_term/1` does not accept here.
    BadTag(u8),
    /// A length or count larger than the rest of the input could hold.
    BadLength,
    /// An atom longer than 255 characters or not valid UTF-8.
    BadAtom,
    /// A float that is not finite.
    BadFloat,
    /// A compressed term claiming an impossible inflated size.
    BadCompression,
    /// The builder refused a value (for instance a map with a repeated key).
    Refused,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => f.write_str("input ends inside a term"),
            DecodeError::BadVersion => f.write_str("input does not start with version byte 131"),
            DecodeError::BadTag(t) => write!(f, "unknown or unsupported tag {t}"),
            DecodeError::BadLength => f.write_str("length larger than the input"),
            DecodeError::BadAtom => f.write_str("invalid atom text"),
            DecodeError::BadFloat => f.write_str("float is not finite"),
            DecodeError::BadCompression => f.write_str("invalid compressed term header"),
            DecodeError::Refused => f.write_str("value refused by the term builder"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// What follows the version byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A plain term starting at offset 1.
    Plain,
    /// A zlib-compressed term.
    Compressed {
        /// The size of the inflated term, as its header claims.
        inflated: usize,
    },
}

/// Checks the version byte and, for a compressed term, that its claimed size is one zlib
/// could produce from the bytes present (so nobody allocates 4 GB for a 20-byte input).
pub fn layout(input: &[u8]) -> Result<Layout, DecodeError> {
    match input {
        [] => Err(DecodeError::Truncated),
        [VERSION] => Err(DecodeError::Truncated),
        [VERSION, COMPRESSED, rest @ ..] => {
            let size = rest.get(..4).ok_or(DecodeError::Truncated)?;
            let inflated = u32::from_be_bytes(size.try_into().unwrap()) as usize;
            let deflated = rest.len() - 4;
            if inflated == 0 || inflated > deflated.saturating_mul(MAX_INFLATE_RATIO) {
                return Err(DecodeError::BadCompression);
            }
            Ok(Layout::Compressed { inflated })
        }
        [VERSION, ..] => Ok(Layout::Plain),
        _ => Err(DecodeError::BadVersion),
    }
}

/// Makes values out of the nodes that [`parse`] finds. Containers are built bottom-up: their
/// elements are made first and passed as a slice the builder may move them out of.
pub trait Builder {
    /// A made value.
    type Term: Clone;

    /// An integer that fits in 64 bits (also a bignum encoding of such a value).
    fn int(&mut self, v: i64) -> Result<Self::Term, DecodeError>;
    /// A finite float.
    fn float(&mut self, v: f64) -> Result<Self::Term, DecodeError>;
    /// An atom: `text` is Latin-1 (`utf8 == false`) or UTF-8, checked to have at most 255
    /// characters; `raw` is its whole encoding, tag included.
    fn atom(&mut self, text: &[u8], utf8: bool, raw: &[u8]) -> Result<Self::Term, DecodeError>;
    /// A binary: `data` is its bytes, found at `offset` in the input given to [`parse`].
    fn binary(&mut self, data: &[u8], offset: usize) -> Result<Self::Term, DecodeError>;
    /// A term the builder is expected to hand to the VM's own decoder: pids, ports,
    /// references, funs, bitstrings, bignums beyond 64 bits, `FLOAT_EXT`. `raw` is its whole
    /// encoding, tag included; the parser only checked that its lengths fit in the input.
    fn opaque(&mut self, tag: u8, raw: &[u8]) -> Result<Self::Term, DecodeError>;
    /// `[]`.
    fn nil(&mut self) -> Result<Self::Term, DecodeError>;
    /// A proper list of the given bytes, as integers (`STRING_EXT`).
    fn string(&mut self, bytes: &[u8]) -> Result<Self::Term, DecodeError>;
    /// A tuple of `elems`.
    fn tuple(&mut self, elems: &mut [Self::Term]) -> Result<Self::Term, DecodeError>;
    /// A list of `elems` ending in `tail` (`[]` for a proper list).
    fn list(
        &mut self,
        elems: &mut [Self::Term],
        tail: Self::Term,
    ) -> Result<Self::Term, DecodeError>;
    /// A map; `pairs` alternates keys and values.
    fn map(&mut self, pairs: &mut [Self::Term]) -> Result<Self::Term, DecodeError>;
}

#[derive(Clone, Copy)]
enum Kind {
    Tuple,
    List,
    Map,
}

/// An open container: its elements so far sit on the value stack from `start`.
struct Open {
    kind: Kind,
    start: usize,
    left: usize,
}

/// A cursor over the input with bounds-checked reads.
struct Input<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    #[inline]
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated);
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    #[inline]
    fn u8(&mut self) -> Result<u8, DecodeError> {
        let b = *self.bytes.get(self.pos).ok_or(DecodeError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    #[inline]
    fn u16(&mut self) -> Result<usize, DecodeError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap()) as usize)
    }

    #[inline]
    fn u32(&mut self) -> Result<usize, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()) as usize)
    }

    /// A count of `n` items of at least `min_bytes` each must fit in what remains.
    #[inline]
    fn count(&mut self, n: usize, min_bytes: usize) -> Result<usize, DecodeError> {
        if n.saturating_mul(min_bytes) > self.remaining() {
            return Err(DecodeError::BadLength);
        }
        Ok(n)
    }

    /// Skips an atom (the node name inside a pid, port or reference).
    fn skip_atom(&mut self) -> Result<(), DecodeError> {
        let n = match self.u8()? {
            ATOM_EXT | ATOM_UTF8_EXT => self.u16()?,
            SMALL_ATOM_EXT | SMALL_ATOM_UTF8_EXT => self.u8()? as usize,
            t => return Err(DecodeError::BadTag(t)),
        };
        self.take(n).map(|_| ())
    }
}

/// Counts the characters of an atom's text, refusing invalid UTF-8 and more than 255 chars.
fn check_atom(text: &[u8], utf8: bool) -> Result<(), DecodeError> {
    let chars = if utf8 {
        std::str::from_utf8(text)
            .map_err(|_| DecodeError::BadAtom)?
            .chars()
            .count()
    } else {
        text.len()
    };
    if chars > MAX_ATOM_CHARS {
        return Err(DecodeError::BadAtom);
    }
    Ok(())
}

/// The value of a little-endian magnitude if it fits in an `i64` with its sign.
fn small_big(negative: bool, digits: &[u8]) -> Option<i64> {
    let significant = digits.iter().rposition(|&d| d != 0).map_or(0, |i| i + 1);
    if significant > 8 {
        return None;
    }
    let mut le = [0u8; 8];
    le[..significant].copy_from_slice(&digits[..significant]);
    let magnitude = u64::from_le_bytes(le);
    if negative {
        0i64.checked_sub_unsigned(magnitude)
    } else {
        i64::try_from(magnitude).ok()
    }
}

/// Parses one term starting at `input[start]` (just after the version byte for a whole
/// encoded term) and returns what `b` made of it and the offset just past it.
///
/// Bytes after the term are not looked at, as with `binary_to_term/1`.
pub fn parse<B: Builder>(
    input: &[u8],
    start: usize,
    b: &mut B,
) -> Result<(B::Term, usize), DecodeError> {
    let mut inp = Input {
        bytes: input,
        pos: start,
    };
    let mut values: Vec<B::Term> = Vec::new();
    let mut open: Vec<Open> = Vec::new();
    loop {
        let at = inp.pos;
        let tag = inp.u8()?;
        let mut term = match tag {
            SMALL_INTEGER_EXT => b.int(inp.u8()? as i64)?,
            INTEGER_EXT => {
                let v = i32::from_be_bytes(inp.take(4)?.try_into().unwrap());
                b.int(v as i64)?
            }
            NEW_FLOAT_EXT => {
                let v = f64::from_be_bytes(inp.take(8)?.try_into().unwrap());
                if !v.is_finite() {
                    return Err(DecodeError::BadFloat);
                }
                b.float(v)?
            }
            ATOM_EXT | SMALL_ATOM_EXT | ATOM_UTF8_EXT | SMALL_ATOM_UTF8_EXT => {
                let n = match tag {
                    ATOM_EXT | ATOM_UTF8_EXT => inp.u16()?,
                    _ => inp.u8()? as usize,
                };
                let text = inp.take(n)?;
                let utf8 = matches!(tag, ATOM_UTF8_EXT | SMALL_ATOM_UTF8_EXT);
                check_atom(text, utf8)?;
                b.atom(text, utf8, &input[at..inp.pos])?
            }
            NIL_EXT => b.nil()?,
            STRING_EXT => {
                let n = inp.u16()?;
                b.string(inp.take(n)?)?
            }
            BINARY_EXT => {
                let n = inp.u32()?;
                let offset = inp.pos;
                b.binary(inp.take(n)?, offset)?
            }
            SMALL_BIG_EXT | LARGE_BIG_EXT => {
                let n = if tag == SMALL_BIG_EXT {
                    inp.u8()? as usize
                } else {
                    inp.u32()?
                };
                let negative = match inp.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::BadTag(tag)),
                };
                let digits = inp.take(n)?;
                match small_big(negative, digits) {
                    Some(v) => b.int(v)?,
                    None => b.opaque(tag, &input[at..inp.pos])?,
                }
            }
            SMALL_TUPLE_EXT | LARGE_TUPLE_EXT => {
                let n = if tag == SMALL_TUPLE_EXT {
                    inp.u8()? as usize
                } else {
                    inp.u32()?
                };
                let n = inp.count(n, 1)?;
                if n > 0 {
                    open.push(Open {
                        kind: Kind::Tuple,
                        start: values.len(),
                        left: n,
                    });
                    continue;
                }
                b.tuple(&mut [])?
            }
            LIST_EXT => {
                // n elements and then the tail: n + 1 terms.
                let n = inp.u32()?;
                let n = inp.count(n + 1, 1)?;
                open.push(Open {
                    kind: Kind::List,
                    start: values.len(),
                    left: n,
                });
                continue;
            }
            MAP_EXT => {
                let n = inp.u32()?;
                let n = inp.count(n, 2)? * 2;
                if n > 0 {
                    open.push(Open {
                        kind: Kind::Map,
                        start: values.len(),
                        left: n,
                    });
                    continue;
                }
                b.map(&mut [])?
            }
            // The types the VM decodes itself: only their extent is found here.
            NEW_PID_EXT | PID_EXT | NEW_PORT_EXT | V4_PORT_EXT | PORT_EXT => {
                inp.skip_atom()?;
                inp.take(match tag {
                    NEW_PID_EXT | V4_PORT_EXT => 12,
                    PID_EXT => 9,
                    NEW_PORT_EXT => 8,
                    _ => 5,
                })?;
                b.opaque(tag, &input[at..inp.pos])?
            }
            NEWER_REFERENCE_EXT | NEW_REFERENCE_EXT => {
                let words = inp.u16()?;
                inp.skip_atom()?;
                let creation = if tag == NEWER_REFERENCE_EXT { 4 } else { 1 };
                inp.take(creation + 4 * words)?;
                b.opaque(tag, &input[at..inp.pos])?
            }
            REFERENCE_EXT => {
                inp.skip_atom()?;
                inp.take(5)?;
                b.opaque(tag, &input[at..inp.pos])?
            }
            NEW_FUN_EXT => {
                let size = inp.u32()?;
                inp.take(size.checked_sub(4).ok_or(DecodeError::BadLength)?)?;
                b.opaque(tag, &input[at..inp.pos])?
            }
            EXPORT_EXT => {
                inp.skip_atom()?;
                inp.skip_atom()?;
                match inp.u8()? {
                    SMALL_INTEGER_EXT => inp.take(1)?,
                    t => return Err(DecodeError::BadTag(t)),
                };
                b.opaque(tag, &input[at..inp.pos])?
            }
            BIT_BINARY_EXT => {
                let n = inp.u32()?;
                inp.take(1 + n)?;
                b.opaque(tag, &input[at..inp.pos])?
            }
            FLOAT_EXT => {
                inp.take(31)?;
                b.opaque(tag, &input[at..inp.pos])?
            }
            t => return Err(DecodeError::BadTag(t)),
        };
        // A value is complete: hand it to its container, closing every container it fills.
        loop {
            let Some(top) = open.last_mut() else {
                return Ok((term, inp.pos));
            };
            values.push(term);
            top.left -= 1;
            if top.left > 0 {
                break;
            }
            let Open { kind, start, .. } = open.pop().unwrap();
            term = match kind {
                Kind::Tuple => b.tuple(&mut values[start..])?,
                Kind::Map => b.map(&mut values[start..])?,
                Kind::List => {
                    let tail = values.pop().unwrap();
                    b.list(&mut values[start..], tail)?
                }
            };
            values.truncate(start);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::{decode_value, Value};

    #[test]
    fn layout_checks_version_and_compression() {
        assert_eq!(layout(&[]), Err(DecodeError::Truncated));
        assert_eq!(layout(&[130, 97, 1]), Err(DecodeError::BadVersion));
        assert_eq!(layout(&[131, 97, 1]), Ok(Layout::Plain));
        assert_eq!(layout(&[131, 80, 0, 0]), Err(DecodeError::Truncated));
        // 4 GB claimed from 3 bytes of zlib data.
        assert_eq!(
            layout(&[131, 80, 255, 255, 255, 255, 1, 2, 3]),
            Err(DecodeError::BadCompression)
        );
        assert_eq!(
            layout(&[131, 80, 0, 0, 0, 100, 1, 2, 3]),
            Ok(Layout::Compressed { inflated: 100 })
        );
    }

    #[test]
    fn absurd_lengths_are_refused_before_allocating() {
        let cases: &[&[u8]] = &[
            &[131, 108, 255, 255, 255, 255, 106],
            &[131, 105, 255, 255, 255, 255, 97, 1],
            &[131, 116, 128, 0, 0, 0, 97, 1],
            &[131, 109, 255, 255, 255, 255, 0],
            &[131, 111, 255, 255, 255, 255, 0, 1],
            &[131, 77, 255, 255, 255, 255, 1],
        ];
        for c in cases {
            let e = decode_value(c).unwrap_err();
            assert!(
                matches!(e, DecodeError::BadLength | DecodeError::Truncated),
                "{c:?}: {e:?}"
            );
        }
    }

    #[test]
    fn deep_nesting_does_not_recurse() {
        let depth = 1_000_000;
        let mut input = vec![131];
        for _ in 0..depth {
            input.extend_from_slice(&[108, 0, 0, 0, 1]);
        }
        input.push(106);
        input.extend(std::iter::repeat(106).take(depth));
        let v = decode_value(&input).unwrap();
        let mut d = 0;
        let mut cur = &v;
        while let Value::List(elems, _) = cur {
            cur = &elems[0];
            d += 1;
        }
        assert_eq!(d, depth);
    }

    #[test]
    fn bignums_that_fit_become_integers() {
        assert_eq!(decode_value(&[131, 110, 1, 0, 5]), Ok(Value::Int(5)));
        assert_eq!(decode_value(&[131, 110, 2, 1, 5, 0]), Ok(Value::Int(-5)));
        let min = [131, 110, 8, 1, 0, 0, 0, 0, 0, 0, 0, 128];
        assert_eq!(decode_value(&min), Ok(Value::Int(i64::MIN)));
        let over = [131, 110, 8, 0, 0, 0, 0, 0, 0, 0, 0, 128];
        assert!(matches!(decode_value(&over), Ok(Value::Opaque(110, _))));
        assert_eq!(
            decode_value(&[131, 110, 1, 2, 5]),
            Err(DecodeError::BadTag(110))
        );
    }

    #[test]
    fn atoms_are_checked() {
        let mut long = vec![131, 118, 1, 0];
        long.extend(std::iter::repeat(b'a').take(256));
        assert_eq!(decode_value(&long), Err(DecodeError::BadAtom));
        // 255 two-byte characters are fine.
        let mut wide = vec![131, 118, 1, 254];
        for _ in 0..255 {
            wide.extend_from_slice("é".as_bytes());
        }
        assert_eq!(decode_value(&wide), Ok(Value::Atom("é".repeat(255))));
        assert_eq!(
            decode_value(&[131, 119, 1, 0xff]),
            Err(DecodeError::BadAtom)
        );
        assert_eq!(
            decode_value(&[131, 115, 1, 0xe9]),
            Ok(Value::Atom("é".to_string()))
        );
    }

    #[test]
    fn floats_must_be_finite() {
        let nan = [131, 70, 127, 248, 0, 0, 0, 0, 0, 0];
        assert_eq!(decode_value(&nan), Err(DecodeError::BadFloat));
        let one = [131, 70, 63, 240, 0, 0, 0, 0, 0, 0];
        assert_eq!(decode_value(&one), Ok(Value::Float(1.0)));
    }

    #[test]
    fn empty_list_header_yields_its_tail() {
        assert_eq!(decode_value(&[131, 108, 0, 0, 0, 0, 106]), Ok(Value::Nil));
        assert_eq!(
            decode_value(&[131, 108, 0, 0, 0, 0, 97, 5]),
            Ok(Value::Int(5))
        );
    }

    #[test]
    fn opaque_types_are_delimited() {
        // A pid as OTP 25 encodes it: NEW_PID_EXT, node 'nonode@nohost', id, serial, creation.
        let mut pid = vec![131, 88, 119, 13];
        pid.extend_from_slice(b"nonode@nohost");
        pid.extend_from_slice(&[0, 0, 0, 80, 0, 0, 0, 0, 0, 0, 0, 0]);
        let mut tup = vec![131, 104, 2];
        tup.extend_from_slice(&pid[1..]);
        tup.extend_from_slice(&[97, 7]);
        assert_eq!(
            decode_value(&tup),
            Ok(Value::Tuple(vec![
                Value::Opaque(88, pid[1..].to_vec()),
                Value::Int(7)
            ]))
        );
        assert_eq!(
            decode_value(&pid[..pid.len() - 1]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            decode_value(&[131, 112, 0, 0, 0, 3]),
            Err(DecodeError::BadLength)
        );
        assert_eq!(decode_value(&[131, 82, 0]), Err(DecodeError::BadTag(82)));
    }

    #[test]
    fn trailing_bytes_are_ignored() {
        let (v, end) = crate::value::decode_value_used(&[131, 97, 1, 0, 0]).unwrap();
        assert_eq!((v, end), (Value::Int(1), 3));
    }
}
