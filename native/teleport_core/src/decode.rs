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

/// An atom given by its index in the VM's atom table (2 or 3 bytes): a VM-internal encoding
/// that no encoder writes for others, but that `binary_to_term/1` accepts on OTP 25 (an index
/// beyond the table is `badarg`). Parsed (see [`Builder::atom_by_index`]) so that
/// [`check_for_vm`] refuses nothing that `binary_to_term/1` accepts.
const ATOM_INTERNAL_REF2: u8 = 73;
/// See [`ATOM_INTERNAL_REF2`].
const ATOM_INTERNAL_REF3: u8 = 75;

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

/// Whether `input` (a whole encoded term) may hold a binary that [`share_on_decode`] would
/// share: somewhere a `BINARY_EXT` tag followed by a length that is at least
/// [`DECODE_SHARE_MIN`] and a 16th of the input, and fits in the bytes after it.
///
/// A necessary condition, checked at memory speed without parsing: `false` means that no
/// binary of the term is to be shared, for sure; `true` may be wrong (the bytes found may be
/// inside a binary or a float rather than a tag), and then only [`parse`] can tell.
pub fn may_share(input: &[u8]) -> bool {
    let total = input.len();
    if total < DECODE_SHARE_MIN {
        return false;
    }
    // A length L <= total has a first byte of at most total >> 24, and L >= DECODE_SHARE_MIN
    // (a multiple of 256 below 65536) makes its first two bytes not both zero or its third
    // at least DECODE_SHARE_MIN >> 8: a cheap filter for the loop that vectorises.
    const _: () = assert!(DECODE_SHARE_MIN % 256 == 0 && DECODE_SHARE_MIN < 65536);
    const THIRD_MIN: u8 = (DECODE_SHARE_MIN >> 8) as u8;
    let first_max = (total >> 24).min(255) as u8;
    let hit = |b: &[u8]| {
        (b[0] == BINARY_EXT) & (b[1] <= first_max) & (((b[1] | b[2]) != 0) | (b[3] >= THIRD_MIN))
    };
    let exact = |at: usize| {
        let Some(len) = input.get(at + 1..at + 5) else {
            return false;
        };
        let len = u32::from_be_bytes(len.try_into().unwrap()) as usize;
        input[at] == BINARY_EXT && share_on_decode(len, total) && len <= total - (at + 5)
    };
    const BLOCK: usize = 64;
    let mut at = 0;
    while at + BLOCK + 3 <= total {
        let block = &input[at..at + BLOCK + 3];
        let mut any = false;
        for j in 0..BLOCK {
            any |= hit(&block[j..j + 4]);
        }
        if any && (at..at + BLOCK).any(exact) {
            return true;
        }
        at += BLOCK;
    }
    (at..total).any(exact)
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
    /// references, funs, bitstrings, bignums beyond 64 bits, `FLOAT_EXT`.
    /// `raw` is its whole encoding, tag included. For most of these the parser only checked
    /// that their lengths fit in the input; funs (`NEW_FUN_EXT`, `EXPORT_EXT`) it checked
    /// field by field, free variables included, since OTP 25's decoder trusts parts of them
    /// (see [`check_for_vm`]). The builder is not asked to make a fun's free variables: the
    /// VM makes them from `raw`.
    fn opaque(&mut self, tag: u8, raw: &[u8]) -> Result<Self::Term, DecodeError>;
    /// An atom given by its index in the VM's atom table (tag 73 or 75, VM-internal encodings
    /// that `binary_to_term/1` accepts); `raw` is its whole encoding, tag included. Only the
    /// VM can tell which atom it is, so builders not backed by the VM refuse it, as this
    /// default does, with `BadTag`.
    fn atom_by_index(&mut self, raw: &[u8]) -> Result<Self::Term, DecodeError> {
        Err(DecodeError::BadTag(raw[0]))
    }
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
    /// The free variables of a `NEW_FUN_EXT` that starts (at its tag) at `at` and, as its
    /// Size field claims, ends just before `end`. They are checked, not built.
    Fun {
        at: usize,
        end: usize,
    },
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

    /// Skips an atom (the node name inside a pid, port or reference, the module of a fun),
    /// checking its text as the VM does.
    fn skip_atom(&mut self) -> Result<(), DecodeError> {
        let tag = self.u8()?;
        let n = match tag {
            ATOM_EXT | ATOM_UTF8_EXT => self.u16()?,
            SMALL_ATOM_EXT | SMALL_ATOM_UTF8_EXT => self.u8()? as usize,
            ATOM_INTERNAL_REF2 => return self.take(2).map(|_| ()),
            ATOM_INTERNAL_REF3 => return self.take(3).map(|_| ()),
            t => return Err(DecodeError::BadTag(t)),
        };
        check_atom(
            self.take(n)?,
            matches!(tag, ATOM_UTF8_EXT | SMALL_ATOM_UTF8_EXT),
        )
    }

    /// Skips the OldIndex or OldUniq of a fun: an integer as `term_to_binary/1` writes it,
    /// `SMALL_INTEGER_EXT` or `INTEGER_EXT`.
    fn skip_fun_int(&mut self) -> Result<(), DecodeError> {
        match self.u8()? {
            SMALL_INTEGER_EXT => self.take(1)?,
            INTEGER_EXT => self.take(4)?,
            t => return Err(DecodeError::BadTag(t)),
        };
        Ok(())
    }

    /// Skips the creator of a fun, which must be a pid: OTP 25 decodes whatever term is
    /// there and takes it for a pid, and encoding the fun later (`term_to_binary/1`, a send
    /// to another node) crashes the VM.
    fn skip_fun_creator(&mut self) -> Result<(), DecodeError> {
        let tag = self.u8()?;
        let rest = match tag {
            NEW_PID_EXT => 12,
            PID_EXT => 9,
            t => return Err(DecodeError::BadTag(t)),
        };
        self.skip_atom()?;
        self.take(rest).map(|_| ())
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
    // Open funs around the current node. Inside a fun nodes are checked but not built (the
    // builder gets the whole fun as one opaque term): building them too would make the
    // work quadratic in the nesting depth of funs in funs.
    let mut in_funs = 0usize;
    // What `b` makes of a node whose fields have all been read, or `None` inside a fun.
    macro_rules! build {
        ($made:expr) => {
            if in_funs > 0 {
                None
            } else {
                Some($made?)
            }
        };
    }
    loop {
        let at = inp.pos;
        let tag = inp.u8()?;
        let mut term = match tag {
            SMALL_INTEGER_EXT => {
                let v = inp.u8()? as i64;
                build!(b.int(v))
            }
            INTEGER_EXT => {
                let v = i32::from_be_bytes(inp.take(4)?.try_into().unwrap());
                build!(b.int(v as i64))
            }
            NEW_FLOAT_EXT => {
                let v = f64::from_be_bytes(inp.take(8)?.try_into().unwrap());
                if !v.is_finite() {
                    return Err(DecodeError::BadFloat);
                }
                build!(b.float(v))
            }
            ATOM_EXT | SMALL_ATOM_EXT | ATOM_UTF8_EXT | SMALL_ATOM_UTF8_EXT => {
                let n = match tag {
                    ATOM_EXT | ATOM_UTF8_EXT => inp.u16()?,
                    _ => inp.u8()? as usize,
                };
                let text = inp.take(n)?;
                let utf8 = matches!(tag, ATOM_UTF8_EXT | SMALL_ATOM_UTF8_EXT);
                check_atom(text, utf8)?;
                build!(b.atom(text, utf8, &input[at..inp.pos]))
            }
            ATOM_INTERNAL_REF2 | ATOM_INTERNAL_REF3 => {
                inp.take(if tag == ATOM_INTERNAL_REF2 { 2 } else { 3 })?;
                build!(b.atom_by_index(&input[at..inp.pos]))
            }
            NIL_EXT => build!(b.nil()),
            STRING_EXT => {
                let n = inp.u16()?;
                let bytes = inp.take(n)?;
                build!(b.string(bytes))
            }
            BINARY_EXT => {
                let n = inp.u32()?;
                let offset = inp.pos;
                let data = inp.take(n)?;
                build!(b.binary(data, offset))
            }
            SMALL_BIG_EXT | LARGE_BIG_EXT => {
                let n = if tag == SMALL_BIG_EXT {
                    inp.u8()? as usize
                } else {
                    inp.u32()?
                };
                // Any sign byte but 0 is negative to the VM; the same here, so that the
                // check before the VM's decoder (`check_for_vm`) refuses nothing it accepts.
                let negative = inp.u8()? != 0;
                let digits = inp.take(n)?;
                match small_big(negative, digits) {
                    Some(v) => build!(b.int(v)),
                    None => build!(b.opaque(tag, &input[at..inp.pos])),
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
                build!(b.tuple(&mut []))
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
                build!(b.map(&mut []))
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
                build!(b.opaque(tag, &input[at..inp.pos]))
            }
            NEWER_REFERENCE_EXT | NEW_REFERENCE_EXT => {
                let words = inp.u16()?;
                inp.skip_atom()?;
                let creation = if tag == NEWER_REFERENCE_EXT { 4 } else { 1 };
                inp.take(creation + 4 * words)?;
                build!(b.opaque(tag, &input[at..inp.pos]))
            }
            REFERENCE_EXT => {
                inp.skip_atom()?;
                inp.take(5)?;
                build!(b.opaque(tag, &input[at..inp.pos]))
            }
            // Size:32 (counting itself and every byte after it), Arity:8, Uniq:16 bytes,
            // Index:32, NumFree:32, Module (atom), OldIndex and OldUniq (integers), Pid (the
            // creator), then NumFree terms. Every field is checked, for the VM's decoder
            // trusts some of them (on OTP 25 it does not check that the creator is a pid).
            NEW_FUN_EXT => {
                let size = inp.u32()?;
                let end = (at + 1)
                    .checked_add(size)
                    .filter(|&end| size >= 4 && end <= input.len())
                    .ok_or(DecodeError::BadLength)?;
                inp.take(1 + 16 + 4)?; // Arity, Uniq, Index
                let free = inp.u32()?;
                inp.skip_atom()?;
                inp.skip_fun_int()?;
                inp.skip_fun_int()?;
                inp.skip_fun_creator()?;
                // Each free variable takes at least a byte, before the end Size claims.
                if free > end.saturating_sub(inp.pos) {
                    return Err(DecodeError::BadLength);
                }
                if free > 0 {
                    open.push(Open {
                        kind: Kind::Fun { at, end },
                        start: values.len(),
                        left: free,
                    });
                    in_funs += 1;
                    continue;
                }
                if inp.pos != end {
                    return Err(DecodeError::BadLength);
                }
                build!(b.opaque(tag, &input[at..end]))
            }
            // Module (atom), Function (atom), Arity (SMALL_INTEGER_EXT), as OTP requires.
            EXPORT_EXT => {
                inp.skip_atom()?;
                inp.skip_atom()?;
                match inp.u8()? {
                    SMALL_INTEGER_EXT => inp.take(1)?,
                    t => return Err(DecodeError::BadTag(t)),
                };
                build!(b.opaque(tag, &input[at..inp.pos]))
            }
            BIT_BINARY_EXT => {
                let n = inp.u32()?;
                inp.take(1 + n)?;
                build!(b.opaque(tag, &input[at..inp.pos]))
            }
            FLOAT_EXT => {
                inp.take(31)?;
                build!(b.opaque(tag, &input[at..inp.pos]))
            }
            t => return Err(DecodeError::BadTag(t)),
        };
        // A value is complete: hand it to its container, closing every container it fills.
        loop {
            let Some(top) = open.last_mut() else {
                // Outside every fun, so something was built.
                return Ok((term.ok_or(DecodeError::Refused)?, inp.pos));
            };
            // `None` inside a fun: nothing to keep, only to count.
            values.extend(term);
            top.left -= 1;
            if top.left > 0 {
                break;
            }
            let Open { kind, start, .. } = open.pop().unwrap();
            if let Kind::Fun { end, .. } = kind {
                // The free variables end exactly where Size says the fun does.
                if inp.pos != end {
                    return Err(DecodeError::BadLength);
                }
                in_funs -= 1;
            }
            term = match kind {
                _ if in_funs > 0 => None,
                Kind::Tuple => Some(b.tuple(&mut values[start..])?),
                Kind::Map => Some(b.map(&mut values[start..])?),
                Kind::List => {
                    let tail = values.pop().unwrap();
                    Some(b.list(&mut values[start..], tail)?)
                }
                Kind::Fun { at, end } => Some(b.opaque(NEW_FUN_EXT, &input[at..end])?),
            };
            values.truncate(start);
        }
    }
}

/// A [`Builder`] that makes nothing: [`parse`] with it only checks the input.
struct Check;

impl Builder for Check {
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
    fn binary(&mut self, _: &[u8], _: usize) -> Result<(), DecodeError> {
        Ok(())
    }
    fn opaque(&mut self, _: u8, _: &[u8]) -> Result<(), DecodeError> {
        Ok(())
    }
    // The VM decides whether the index is an atom; nothing here for a fun to hide in.
    fn atom_by_index(&mut self, _: &[u8]) -> Result<(), DecodeError> {
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

/// Checks a whole plain encoded term (version byte first) before it goes to the VM's own
/// decoder (`enif_binary_to_term`), which must never see a malformed fun: OTP 25 accepts a
/// `NEW_FUN_EXT` whose creator is not a pid, and the VM crashes when such a fun is later
/// encoded. So every fun is checked field by field, its Size included. An error means
/// `badarg`.
///
/// Inputs holding neither a `NEW_FUN_EXT` nor an `EXPORT_EXT` byte anywhere cannot hold a
/// fun and pass at memory speed, untouched: the VM's decoder checks everything else itself.
/// The others are parsed whole by [`parse`], which checks every fun field by field. The
/// parse must be whole, not a search for fun tags: only the parse knows which bytes are
/// tags and which are data (a 112 inside a binary is no fun).
pub fn check_for_vm(input: &[u8]) -> Result<(), DecodeError> {
    let body = input.get(1..).unwrap_or_default();
    if !body.contains(&NEW_FUN_EXT) && !body.contains(&EXPORT_EXT) {
        return Ok(());
    }
    // Those bytes are often no tags (a node name with a `p` in every pid): a scan that only
    // steps over terms, without a stack or an allocation, tells before the whole parse runs.
    if !may_hold_fun(body) {
        return Ok(());
    }
    parse(input, 1, &mut Check).map(|_| ())
}

/// Whether the term at the start of `body` may hold a fun: it steps over every term, keeping
/// only a count of the terms still to step over (a tuple, list or map adds its elements), and
/// says `true` as soon as it meets a fun's tag, or anything it does not step over exactly
/// (another tag, a length past the end): [`parse`] then checks it all. `false` means that the
/// VM's decoder meets no fun in the term, whatever follows it.
pub fn may_hold_fun(body: &[u8]) -> bool {
    let u8_at = |at: usize| body.get(at).map(|&b| b as usize);
    let u16_at =
        |at: usize| Some(u16::from_be_bytes(body.get(at..at + 2)?.try_into().ok()?) as usize);
    let u32_at =
        |at: usize| Some(u32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?) as usize);
    // The length of the atom at `at` (a node's name in a pid, port or reference).
    let atom_at = |at: usize| match body.get(at)? {
        &ATOM_EXT | &ATOM_UTF8_EXT => Some(3 + u16_at(at + 1)?),
        &SMALL_ATOM_EXT | &SMALL_ATOM_UTF8_EXT => Some(2 + u8_at(at + 1)?),
        _ => None,
    };
    let (mut at, mut left) = (0usize, 1usize);
    while left > 0 {
        left -= 1;
        let Some(&tag) = body.get(at) else {
            return true;
        };
        let next = at + 1;
        // Bytes of this term after its tag, and the terms it holds.
        let step = match tag {
            SMALL_INTEGER_EXT => Some((1, 0)),
            INTEGER_EXT => Some((4, 0)),
            NEW_FLOAT_EXT => Some((8, 0)),
            FLOAT_EXT => Some((31, 0)),
            NIL_EXT => Some((0, 0)),
            SMALL_TUPLE_EXT => u8_at(next).map(|n| (1, n)),
            LARGE_TUPLE_EXT => u32_at(next).map(|n| (4, n)),
            // The elements and the tail.
            LIST_EXT => u32_at(next).map(|n| (4, n + 1)),
            MAP_EXT => u32_at(next).and_then(|n| Some((4, n.checked_mul(2)?))),
            STRING_EXT => u16_at(next).map(|n| (2 + n, 0)),
            BINARY_EXT => u32_at(next).map(|n| (4 + n, 0)),
            BIT_BINARY_EXT => u32_at(next).map(|n| (5 + n, 0)),
            SMALL_BIG_EXT => u8_at(next).map(|n| (2 + n, 0)),
            LARGE_BIG_EXT => u32_at(next).map(|n| (5 + n, 0)),
            ATOM_EXT | ATOM_UTF8_EXT => u16_at(next).map(|n| (2 + n, 0)),
            SMALL_ATOM_EXT | SMALL_ATOM_UTF8_EXT => u8_at(next).map(|n| (1 + n, 0)),
            NEW_PID_EXT => atom_at(next).map(|a| (a + 12, 0)),
            PID_EXT => atom_at(next).map(|a| (a + 9, 0)),
            NEW_PORT_EXT => atom_at(next).map(|a| (a + 8, 0)),
            V4_PORT_EXT => atom_at(next).map(|a| (a + 12, 0)),
            PORT_EXT => atom_at(next).map(|a| (a + 5, 0)),
            NEWER_REFERENCE_EXT => {
                u16_at(next).and_then(|n| Some((2 + atom_at(next + 2)? + 4 + 4 * n, 0)))
            }
            NEW_REFERENCE_EXT => {
                u16_at(next).and_then(|n| Some((2 + atom_at(next + 2)? + 1 + 4 * n, 0)))
            }
            REFERENCE_EXT => atom_at(next).map(|a| (a + 5, 0)),
            // Funs, and whatever else.
            _ => None,
        };
        let Some((bytes, holds)) = step else {
            return true;
        };
        at = next + bytes;
        left += holds;
        // Every term takes a byte at least: more than that cannot be there.
        if at > body.len() || left > body.len() - at {
            return true;
        }
    }
    false
}

pub mod inflate {
    //! `inflate`: the zlib stream (RFC 1950) of a compressed term (`term_to_binary(T,
    //! [compressed])`), inflated without the VM, so that it can be done on a dirty scheduler.
    //!
    //! The inflater is `miniz_oxide`'s (pure Rust, fuzzed, the one `flate2` uses): this is
    //! untrusted input, and a well-kept decoder beats a hand-written one. Output goes into a
    //! buffer of exactly the size the term's header claims, so it can never grow past it;
    //! anything else (a preset dictionary, a bad checksum, more or fewer bytes than claimed)
    //! is an error, as with `binary_to_term/1`.

    use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
    use miniz_oxide::inflate::TINFLStatus;

    /// Why a stream does not inflate (details only matter to tests).
    #[derive(Debug, PartialEq, Eq)]
    pub struct Bad(&'static str);

    /// Inflates the zlib stream `input` into `out` (appended), which must then have grown by
    /// exactly `size` bytes. Bytes after the stream are ignored.
    pub fn zlib(input: &[u8], size: usize, out: &mut Vec<u8>) -> Result<(), Bad> {
        let [cmf, flg, ..] = *input else {
            return Err(Bad("input ends early"));
        };
        // miniz checks these too; checked here so that the errors are named.
        if cmf & 0x0F != 8 || cmf >> 4 > 7 || (cmf as u16 * 256 + flg as u16) % 31 != 0 {
            return Err(Bad("not a zlib stream"));
        }
        if flg & 0x20 != 0 {
            return Err(Bad("preset dictionary"));
        }
        let start = out.len();
        out.resize(start + size, 0);
        // The whole input is here and the output buffer is the whole output: no wrapping
        // window, no "more input" state. The decompressor is about 11 KB: not on the stack.
        let flags = inflate_flags::TINFL_FLAG_PARSE_ZLIB_HEADER
            | inflate_flags::TINFL_FLAG_COMPUTE_ADLER32
            | inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
        let mut state = Box::<DecompressorOxide>::default();
        let (status, _read, written) = decompress(&mut state, input, &mut out[start..], 0, flags);
        let result = match status {
            TINFLStatus::Done if written == size => Ok(()),
            TINFLStatus::Done => Err(Bad("fewer bytes than claimed")),
            TINFLStatus::HasMoreOutput => Err(Bad("more bytes than claimed")),
            TINFLStatus::Adler32Mismatch => Err(Bad("bad checksum")),
            TINFLStatus::FailedCannotMakeProgress | TINFLStatus::NeedsMoreInput => {
                Err(Bad("input ends early"))
            }
            _ => Err(Bad("corrupt stream")),
        };
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        // Made with Python's zlib.compress (levels 0, 1, 9) of the bytes noted.
        const STORED_HELLO: &[u8] = &[
            0x78, 0x01, 0x01, 0x05, 0x00, 0xfa, 0xff, b'h', b'e', b'l', b'l', b'o', 0x06, 0x2c,
            0x02, 0x15,
        ];

        #[test]
        fn stored_block() {
            let mut out = vec![131];
            zlib(STORED_HELLO, 5, &mut out).unwrap();
            assert_eq!(out, b"\x83hello");
            let mut out = Vec::new();
            assert!(zlib(STORED_HELLO, 4, &mut out).is_err());
            let mut out = Vec::new();
            assert!(zlib(STORED_HELLO, 6, &mut out).is_err());
            let mut bad = STORED_HELLO.to_vec();
            *bad.last_mut().unwrap() ^= 1;
            assert_eq!(zlib(&bad, 5, &mut Vec::new()), Err(Bad("bad checksum")));
            assert!(zlib(&STORED_HELLO[..10], 5, &mut Vec::new()).is_err());
        }

        // zlib.compressobj(9, DEFLATED, 15, 9, Z_FIXED) of b"abcabcabcabc hello hello hello".
        const FIXED: &[u8] = &[
            0x78, 0x01, 0x4b, 0x4c, 0x4a, 0x4e, 0x84, 0x21, 0x85, 0x8c, 0xd4, 0x9c, 0x9c, 0x7c,
            0x64, 0x12, 0x00, 0xac, 0xff, 0x0b, 0x35,
        ];
        // zlib.compress(bytes(range(256)) * 3 + b"a\\0" * 5000 + b"teleport" * 50, 9).
        const DYNAMIC: &[u8] = &[
            0x78, 0xda, 0x63, 0x60, 0x64, 0x62, 0x66, 0x61, 0x65, 0x63, 0xe7, 0xe0, 0xe4, 0xe2,
            0xe6, 0xe1, 0xe5, 0xe3, 0x17, 0x10, 0x14, 0x12, 0x16, 0x11, 0x15, 0x13, 0x97, 0x90,
            0x94, 0x92, 0x96, 0x91, 0x95, 0x93, 0x57, 0x50, 0x54, 0x52, 0x56, 0x51, 0x55, 0x53,
            0xd7, 0xd0, 0xd4, 0xd2, 0xd6, 0xd1, 0xd5, 0xd3, 0x37, 0x30, 0x34, 0x32, 0x36, 0x31,
            0x35, 0x33, 0xb7, 0xb0, 0xb4, 0xb2, 0xb6, 0xb1, 0xb5, 0xb3, 0x77, 0x70, 0x74, 0x72,
            0x76, 0x71, 0x75, 0x73, 0xf7, 0xf0, 0xf4, 0xf2, 0xf6, 0xf1, 0xf5, 0xf3, 0x0f, 0x08,
            0x0c, 0x0a, 0x0e, 0x09, 0x0d, 0x0b, 0x8f, 0x88, 0x8c, 0x8a, 0x8e, 0x89, 0x8d, 0x8b,
            0x4f, 0x48, 0x4c, 0x4a, 0x4e, 0x49, 0x4d, 0x4b, 0xcf, 0xc8, 0xcc, 0xca, 0xce, 0xc9,
            0xcd, 0xcb, 0x2f, 0x28, 0x2c, 0x2a, 0x2e, 0x29, 0x2d, 0x2b, 0xaf, 0xa8, 0xac, 0xaa,
            0xae, 0xa9, 0xad, 0xab, 0x6f, 0x68, 0x6c, 0x6a, 0x6e, 0x69, 0x6d, 0x6b, 0xef, 0xe8,
            0xec, 0xea, 0xee, 0xe9, 0xed, 0xeb, 0x9f, 0x30, 0x71, 0xd2, 0xe4, 0x29, 0x53, 0xa7,
            0x4d, 0x9f, 0x31, 0x73, 0xd6, 0xec, 0x39, 0x73, 0xe7, 0xcd, 0x5f, 0xb0, 0x70, 0xd1,
            0xe2, 0x25, 0x4b, 0x97, 0x2d, 0x5f, 0xb1, 0x72, 0xd5, 0xea, 0x35, 0x6b, 0xd7, 0xad,
            0xdf, 0xb0, 0x71, 0xd3, 0xe6, 0x2d, 0x5b, 0xb7, 0x6d, 0xdf, 0xb1, 0x73, 0xd7, 0xee,
            0x3d, 0x7b, 0xf7, 0xed, 0x3f, 0x70, 0xf0, 0xd0, 0xe1, 0x23, 0x47, 0x8f, 0x1d, 0x3f,
            0x71, 0xf2, 0xd4, 0xe9, 0x33, 0x67, 0xcf, 0x9d, 0xbf, 0x70, 0xf1, 0xd2, 0xe5, 0x2b,
            0x57, 0xaf, 0x5d, 0xbf, 0x71, 0xf3, 0xd6, 0xed, 0x3b, 0x77, 0xef, 0xdd, 0x7f, 0xf0,
            0xf0, 0xd1, 0xe3, 0x27, 0x4f, 0x9f, 0x3d, 0x7f, 0xf1, 0xf2, 0xd5, 0xeb, 0x37, 0x6f,
            0xdf, 0xbd, 0xff, 0xf0, 0xf1, 0xd3, 0xe7, 0x2f, 0x5f, 0xbf, 0x7d, 0xff, 0xf1, 0xf3,
            0xd7, 0xef, 0x3f, 0x7f, 0xff, 0xfd, 0x67, 0x18, 0xf5, 0xff, 0x88, 0xf6, 0x7f, 0x22,
            0xc3, 0x28, 0x1c, 0x85, 0xa3, 0x70, 0x14, 0x8e, 0xc2, 0x51, 0x38, 0x0a, 0x47, 0xe1,
            0x28, 0x1c, 0x85, 0xa3, 0x70, 0x14, 0x8e, 0xc2, 0x51, 0x38, 0x0a, 0x47, 0xe1, 0x28,
            0x1c, 0x85, 0xa3, 0x70, 0x14, 0x8e, 0xc2, 0x51, 0x38, 0x0a, 0x47, 0xe1, 0x28, 0x1c,
            0x85, 0xa3, 0x70, 0x14, 0x8e, 0xc2, 0x51, 0x38, 0x0a, 0x47, 0xe1, 0x28, 0x1c, 0x85,
            0xa3, 0x70, 0x14, 0x8e, 0xc2, 0x51, 0x38, 0xf4, 0x61, 0x49, 0x6a, 0x4e, 0x6a, 0x41,
            0x7e, 0x51, 0xc9, 0x28, 0x3d, 0x38, 0x68, 0x00, 0x2e, 0xeb, 0x91, 0x3e,
        ];

        #[test]
        fn fixed_and_dynamic_blocks() {
            let mut out = Vec::new();
            zlib(FIXED, 30, &mut out).unwrap();
            assert_eq!(out, b"abcabcabcabc hello hello hello");
            let mut want: Vec<u8> = (0..=255u8).cycle().take(768).collect();
            for _ in 0..5000 {
                want.extend_from_slice(b"a\0");
            }
            for _ in 0..50 {
                want.extend_from_slice(b"teleport");
            }
            let mut out = Vec::new();
            zlib(DYNAMIC, want.len(), &mut out).unwrap();
            assert_eq!(out, want);
            // Every truncation and every single-byte change is refused, never a panic.
            for n in 0..DYNAMIC.len() {
                assert!(zlib(&DYNAMIC[..n], want.len(), &mut Vec::new()).is_err());
            }
            for at in 0..DYNAMIC.len() {
                for flip in [1u8, 0x80, 0xff] {
                    let mut bad = DYNAMIC.to_vec();
                    bad[at] ^= flip;
                    let mut out = Vec::new();
                    if zlib(&bad, want.len(), &mut out).is_ok() {
                        assert_eq!(out, want, "byte {at} ^ {flip}");
                    }
                }
            }
        }

        #[test]
        fn each_refusal_is_named_and_leaves_the_output_as_it_was() {
            let cases: [(&[u8], usize, &str); 5] = [
                (STORED_HELLO, 4, "more bytes than claimed"),
                (STORED_HELLO, 6, "fewer bytes than claimed"),
                (&STORED_HELLO[..10], 5, "input ends early"),
                (&[0x78, 0x20, 0, 0, 0, 0], 1, "preset dictionary"),
                (&[0x79, 0x01, 0x01], 1, "not a zlib stream"),
            ];
            for (input, size, why) in cases {
                let mut out = vec![131];
                assert_eq!(zlib(input, size, &mut out), Err(Bad(why)), "{why}");
                assert_eq!(out, [131], "{why}");
            }
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
        // binary_to_term/1 takes any sign byte but 0 for negative.
        assert_eq!(decode_value(&[131, 110, 1, 2, 5]), Ok(Value::Int(-5)));
        assert_eq!(
            decode_value(&[131, 111, 0, 0, 0, 1, 7, 5]),
            Ok(Value::Int(-5))
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
        // Atoms by index: delimited, refused by builders without a VM (the `Value` one),
        // accepted by the check before the VM's decoder, which takes them.
        let by_index = term(&[&[104, 3, 75, 0, 0, 1, 73, 0, 1], &GENUINE_FUN[1..]]);
        assert_eq!(decode_value(&by_index), Err(DecodeError::BadTag(75)));
        assert_eq!(check_for_vm(&by_index), Ok(()));
        assert!(check_for_vm(&by_index[..by_index.len() - 1]).is_err());
        let pid = [88, 73, 0, 1, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            decode_value(&term(&[&pid])),
            Ok(Value::Opaque(88, pid.to_vec()))
        );
    }

    /// `tfun:mk(5, <<"ab">>)` (with `mk(X, Y) -> fun(Z) -> {X, Y, Z} end.`) as OTP 25's
    /// `term_to_binary/1` writes it: a `NEW_FUN_EXT` with two free variables.
    const GENUINE_FUN: &[u8] = &[
        131, 112, 0, 0, 0, 81, 1, 126, 70, 35, 69, 181, 198, 56, 168, 183, 195, 74, 215, 227, 180,
        7, 56, 0, 0, 0, 0, 0, 0, 0, 2, 100, 0, 4, 116, 102, 117, 110, 97, 0, 98, 3, 242, 49, 26,
        88, 100, 0, 13, 110, 111, 110, 111, 100, 101, 64, 110, 111, 104, 111, 115, 116, 0, 0, 0, 9,
        0, 0, 0, 0, 0, 0, 0, 0, 97, 5, 109, 0, 0, 0, 2, 97, 98,
    ];

    /// `self()` of `nonode@nohost` as OTP 25 writes it (`NEW_PID_EXT`).
    fn pid() -> Vec<u8> {
        let mut pid = vec![NEW_PID_EXT, ATOM_EXT, 0, 13];
        pid.extend_from_slice(b"nonode@nohost");
        pid.extend_from_slice(&[0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0]);
        pid
    }

    /// A `NEW_FUN_EXT` (no version byte) of `GENUINE_FUN`'s code with the given creator and
    /// free variables; Size is `size_delta` more than the true size.
    fn fun_ext(creator: &[u8], free: &[&[u8]], size_delta: i64) -> Vec<u8> {
        let mut body = GENUINE_FUN[6..27].to_vec(); // Arity, Uniq, Index
        body.extend_from_slice(&(free.len() as u32).to_be_bytes());
        body.extend_from_slice(&GENUINE_FUN[31..45]); // Module, OldIndex, OldUniq
        body.extend_from_slice(creator);
        for f in free {
            body.extend_from_slice(f);
        }
        let size = (body.len() as i64 + 4 + size_delta) as u32;
        let mut fun = vec![NEW_FUN_EXT];
        fun.extend_from_slice(&size.to_be_bytes());
        fun.extend_from_slice(&body);
        fun
    }

    /// A whole encoded term: the version byte, then `parts`.
    fn term(parts: &[&[u8]]) -> Vec<u8> {
        let mut t = vec![VERSION];
        for p in parts {
            t.extend_from_slice(p);
        }
        t
    }

    const FREE: [&[u8]; 2] = [&[97, 5], &[109, 0, 0, 0, 2, 97, 98]];

    #[test]
    fn genuine_funs_are_kept_whole() {
        let fun = fun_ext(&pid(), &FREE, 0);
        assert_eq!(
            term(&[&fun]),
            GENUINE_FUN,
            "the helper writes what OTP writes"
        );
        let opaque = Value::Opaque(NEW_FUN_EXT, fun.clone());
        assert_eq!(decode_value(GENUINE_FUN), Ok(opaque.clone()));
        // A fun among other terms, after it: Size tells where it ends.
        let tuple = term(&[&[104, 2], &fun, &[97, 7]]);
        assert_eq!(
            decode_value(&tuple),
            Ok(Value::Tuple(vec![opaque.clone(), Value::Int(7)]))
        );
        // A fun in the free variables of a fun; no free variables; the old PID_EXT creator.
        let nested = fun_ext(&pid(), &[&fun, &[97, 1]], 0);
        let bare = fun_ext(&pid(), &[], 0);
        let mut old_pid = vec![PID_EXT];
        old_pid.extend_from_slice(&pid()[1..17]); // the node atom
        old_pid.extend_from_slice(&[0, 0, 0, 9, 0, 0, 0, 0, 0]);
        let old = fun_ext(&old_pid, &FREE, 0);
        for f in [&nested, &bare, &old] {
            assert_eq!(
                decode_value(&term(&[f])),
                Ok(Value::Opaque(NEW_FUN_EXT, f.clone()))
            );
        }
        for t in [GENUINE_FUN, &tuple, &term(&[&nested])] {
            assert_eq!(check_for_vm(t), Ok(()));
        }
    }

    #[test]
    fn fun_creator_must_be_a_pid() {
        let port = {
            let mut p = vec![NEW_PORT_EXT];
            p.extend_from_slice(&pid()[1..17]);
            p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
            p
        };
        let creators: [&[u8]; 5] = [
            &[SMALL_INTEGER_EXT, 0],
            &[ATOM_EXT, 0, 2, b'o', b'k'],
            &[NIL_EXT],
            &[SMALL_TUPLE_EXT, 0],
            &port,
        ];
        for creator in creators {
            let forged = fun_ext(creator, &FREE, 0);
            let want = DecodeError::BadTag(creator[0]);
            assert_eq!(decode_value(&term(&[&forged])), Err(want), "{creator:?}");
            assert_eq!(check_for_vm(&term(&[&forged])), Err(want));
            // Also when it hides in a genuine fun's free variables, or after other terms.
            let nested = fun_ext(&pid(), &[&[97, 1], &forged], 0);
            assert_eq!(check_for_vm(&term(&[&nested])), Err(want));
            let late = term(&[
                &[108, 0, 0, 0, 2, 109, 0, 0, 0, 1, 112, 97, 1],
                &forged,
                &[106],
            ]);
            assert_eq!(check_for_vm(&late), Err(want));
        }
    }

    #[test]
    fn fun_size_must_match_its_bytes() {
        for delta in [-100, -4, -1, 1, 2, 30, 1 << 20] {
            let fun = fun_ext(&pid(), &FREE, delta);
            // In a tuple with bytes after the fun, so that a larger Size still fits.
            let t = term(&[&[104, 2], &fun, &[100, 0, 40], &[b'x'; 40]]);
            let e = decode_value(&t).unwrap_err();
            assert!(
                matches!(e, DecodeError::BadLength | DecodeError::BadTag(_)),
                "delta {delta}: {e:?}"
            );
            assert!(check_for_vm(&t).is_err(), "delta {delta}");
        }
        // Size below its own 4 bytes, and Size beyond the input.
        for size in [0u32, 3, u32::MAX] {
            let mut fun = fun_ext(&pid(), &FREE, 0);
            fun[1..5].copy_from_slice(&size.to_be_bytes());
            assert_eq!(
                decode_value(&term(&[&fun])),
                Err(DecodeError::BadLength),
                "size {size}"
            );
        }
    }

    #[test]
    fn funs_nested_deep_are_checked_without_recursion_or_rebuilding() {
        // 100,000 funs, each the only free variable of the one around it: 7 MB.
        let depth = 100_000;
        let head = fun_ext(&pid(), &[&[]], 0); // NumFree 1, the free variable left out
        let inner = fun_ext(&pid(), &FREE, 0);
        let total = depth * head.len() + inner.len();
        let mut input = vec![VERSION];
        for i in 0..depth {
            let size = (total - i * head.len() - 1) as u32;
            input.push(NEW_FUN_EXT);
            input.extend_from_slice(&size.to_be_bytes());
            input.extend_from_slice(&head[5..]);
        }
        input.extend_from_slice(&inner);
        assert_eq!(check_for_vm(&input), Ok(()));
        // One opaque term for the outermost fun: inner funs are not built (each would copy
        // its whole encoding, quadratic work in all).
        let (v, end) = crate::value::decode_value_used(&input).unwrap();
        assert_eq!(end, input.len());
        assert!(matches!(&v, Value::Opaque(NEW_FUN_EXT, raw) if raw[..] == input[1..]));
        // The innermost creator forged: found, however deep.
        let at = input.len() - inner.len() + 44;
        assert_eq!(input[at], NEW_PID_EXT);
        input[at] = NEW_PORT_EXT;
        assert_eq!(check_for_vm(&input), Err(DecodeError::BadTag(NEW_PORT_EXT)));
    }

    #[test]
    fn truncated_funs_are_refused() {
        let nested = term(&[&fun_ext(&pid(), &[&GENUINE_FUN[1..], &[97, 1]], 0)]);
        for whole in [GENUINE_FUN, &nested] {
            for n in 0..whole.len() {
                assert!(decode_value(&whole[..n]).is_err(), "{n} bytes");
            }
            // From the fun's tag on, the fun is checked, and found cut short.
            for n in 2..whole.len() {
                assert!(check_for_vm(&whole[..n]).is_err(), "{n} bytes");
            }
        }
    }

    #[test]
    fn fun_fields_are_checked() {
        let fun = fun_ext(&pid(), &FREE, 0);
        let with = |at: usize, old: usize, new: &[u8]| {
            let mut f = fun[..at].to_vec();
            f.extend_from_slice(new);
            f.extend_from_slice(&fun[at + old..]);
            let size = (f.len() - 1) as u32;
            f[1..5].copy_from_slice(&size.to_be_bytes());
            decode_value(&term(&[&f]))
        };
        // Offsets in `fun` (no version byte): Module at 30, OldIndex at 37, OldUniq at 39.
        assert_eq!(with(30, 7, &[97, 1]), Err(DecodeError::BadTag(97)));
        assert_eq!(with(30, 7, &[119, 1, 0xff]), Err(DecodeError::BadAtom));
        assert_eq!(with(37, 2, &[110, 1, 0, 5]), Err(DecodeError::BadTag(110)));
        assert_eq!(
            with(39, 5, &[100, 0, 1, b'x']),
            Err(DecodeError::BadTag(100))
        );
        // The same field values in other allowed encodings are fine.
        assert!(with(30, 7, &[119, 4, b't', b'f', b'u', b'n']).is_ok());
        assert!(with(37, 2, &[98, 0, 0, 0, 0]).is_ok());
        // NumFree claiming more (or fewer) free variables than Size leaves room for.
        for free in [0u32, 1, 3, 1000, u32::MAX] {
            let mut f = fun.clone();
            f[26..30].copy_from_slice(&free.to_be_bytes());
            assert!(decode_value(&term(&[&f])).is_err(), "NumFree {free}");
        }
    }

    #[test]
    fn exports_need_two_atoms_and_a_small_arity() {
        let mut export = vec![EXPORT_EXT, ATOM_EXT, 0, 5];
        export.extend_from_slice(b"lists");
        export.extend_from_slice(&[ATOM_EXT, 0, 3]);
        export.extend_from_slice(b"sum");
        let good = term(&[&export, &[SMALL_INTEGER_EXT, 1]]);
        assert_eq!(
            decode_value(&good),
            Ok(Value::Opaque(EXPORT_EXT, good[1..].to_vec()))
        );
        assert_eq!(check_for_vm(&good), Ok(()));
        let bad: [(Vec<u8>, DecodeError); 4] = [
            (
                term(&[&export, &[INTEGER_EXT, 0, 0, 0, 1]]),
                DecodeError::BadTag(INTEGER_EXT),
            ),
            (term(&[&export, &[NIL_EXT]]), DecodeError::BadTag(NIL_EXT)),
            (
                term(&[&[EXPORT_EXT, SMALL_INTEGER_EXT, 1], &export[8..], &[97, 1]]),
                DecodeError::BadTag(SMALL_INTEGER_EXT),
            ),
            (
                term(&[&export[..9], &[BINARY_EXT, 0, 0, 0, 0, 97, 1]]),
                DecodeError::BadTag(BINARY_EXT),
            ),
        ];
        for (input, want) in bad {
            assert_eq!(decode_value(&input), Err(want), "{input:?}");
            assert_eq!(check_for_vm(&input), Err(want));
        }
    }

    #[test]
    fn check_for_vm_parses_only_inputs_that_may_hold_funs() {
        // No fun tag byte anywhere: left to the VM's decoder, malformed or not.
        assert_eq!(check_for_vm(&[131, 108, 255, 255, 255, 255, 106]), Ok(()));
        assert_eq!(check_for_vm(&[]), Ok(()));
        // A forged fun as the bytes of a binary is no fun.
        let forged = fun_ext(&[SMALL_INTEGER_EXT, 0], &FREE, 0);
        let mut bin = vec![131, BINARY_EXT];
        bin.extend_from_slice(&(forged.len() as u32).to_be_bytes());
        bin.extend_from_slice(&forged);
        assert_eq!(check_for_vm(&bin), Ok(()));
        // A fun tag byte makes the whole input checked.
        assert_eq!(
            check_for_vm(&[131, 108, 255, 255, 255, 255, 112]),
            Err(DecodeError::BadLength)
        );
    }

    /// `may_share` as its definition says, one position at a time.
    fn may_share_slowly(input: &[u8]) -> bool {
        (0..input.len()).any(|at| {
            input[at] == BINARY_EXT
                && input.get(at + 1..at + 5).is_some_and(|len| {
                    let len = u32::from_be_bytes(len.try_into().unwrap()) as usize;
                    share_on_decode(len, input.len()) && len <= input.len() - (at + 5)
                })
        })
    }

    #[test]
    fn may_share_finds_every_shareable_binary() {
        let big = DECODE_SHARE_MIN;
        // A term with one binary of `big` bytes after `pad` bytes of small terms.
        for pad in [0, 1, 2, 61, 62, 63, 64, 65, 1000] {
            let mut input = vec![131, 104, 2];
            input.extend(std::iter::repeat(106).take(pad));
            input.push(BINARY_EXT);
            input.extend_from_slice(&(big as u32).to_be_bytes());
            input.resize(input.len() + big, 0);
            // Valid or not after the padding, the binary is found.
            assert!(may_share(&input), "pad {pad}");
            assert!(may_share_slowly(&input));
            // One byte short: the length does not fit.
            input.pop();
            assert!(!may_share(&input), "pad {pad}, truncated");
            assert!(!may_share_slowly(&input));
        }
        // Many small binaries (each tag followed by a small length) share nothing.
        let mut input = vec![131, 108, 0, 0, 40, 0];
        for i in 0..10240u32 {
            input.extend_from_slice(&[BINARY_EXT, 0, 0, 0, 3, b'a', b'b', (i % 251) as u8]);
        }
        input.push(106);
        assert!(!may_share(&input));
        // A binary that is too small a share of the input is not shared either.
        let mut input = vec![131, 104, 2, BINARY_EXT];
        input.extend_from_slice(&(big as u32).to_be_bytes());
        input.resize(input.len() + big, 1);
        input.extend(std::iter::repeat(97).take(16 * big));
        assert!(!may_share(&input));
        assert!(!may_share_slowly(&input));
    }

    #[test]
    fn may_share_reads_every_byte_of_the_length_near_the_bar() {
        // Lengths whose bytes the filter looks at differently: the third byte at its bar and
        // just under it, the second byte set, a length past 64 KiB.
        let min = DECODE_SHARE_MIN;
        for len in [min - 256, min - 1, min, min + 255, 65535, 65536, 70000] {
            let mut input = vec![131, 104, 2, 106, BINARY_EXT];
            input.extend_from_slice(&(len as u32).to_be_bytes());
            input.resize(input.len() + len, 0);
            // Padding, so that even the shortest input is long enough to be scanned.
            input.extend(std::iter::repeat(106).take(512));
            assert_eq!(may_share(&input), len >= min, "len {len}");
            assert_eq!(may_share_slowly(&input), len >= min, "len {len}");
        }
    }

    #[test]
    fn may_share_agrees_with_its_definition_on_noise() {
        // Bytes where tags and plausible lengths are common.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..300 {
            let len = DECODE_SHARE_MIN + round * 37;
            let input: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    match x % 8 {
                        0 => BINARY_EXT,
                        1 | 2 => 0,
                        3 => 1,
                        _ => (x >> 32) as u8,
                    }
                })
                .collect();
            assert_eq!(may_share(&input), may_share_slowly(&input), "round {round}");
        }
    }

    #[test]
    fn trailing_bytes_are_ignored() {
        let (v, end) = crate::value::decode_value_used(&[131, 97, 1, 0, 0]).unwrap();
        assert_eq!((v, end), (Value::Int(1), 3));
    }

    #[test]
    fn the_fun_scan_steps_over_every_term_that_is_no_fun() {
        // A node name with a `p` (112) and a `q` (113), in every kind of identifier, inside
        // every kind of container, beside every kind of scalar.
        let node: &[u8] = &[ATOM_EXT, 0, 4, b'p', b'@', b'q', b'h'];
        let with_node =
            |tag: u8, before: &[u8], after: &[u8]| [&[tag][..], before, node, after].concat();
        let ids = [
            with_node(NEW_PID_EXT, &[], &[112; 12]),
            with_node(PID_EXT, &[], &[113; 9]),
            with_node(NEW_PORT_EXT, &[], &[112; 8]),
            with_node(V4_PORT_EXT, &[], &[112; 12]),
            with_node(PORT_EXT, &[], &[112; 5]),
            with_node(NEWER_REFERENCE_EXT, &[0, 2], &[112; 12]),
            with_node(NEW_REFERENCE_EXT, &[0, 2], &[112; 9]),
            with_node(REFERENCE_EXT, &[], &[112; 5]),
        ];
        let scalars: [&[u8]; 12] = [
            &[SMALL_INTEGER_EXT, 112],
            &[INTEGER_EXT, 112, 113, 0, 1],
            &[NEW_FLOAT_EXT, 64, 0, 0, 0, 0, 0, 0, 112],
            &[STRING_EXT, 0, 2, 112, 113],
            &[BINARY_EXT, 0, 0, 0, 1, 112],
            &[BIT_BINARY_EXT, 0, 0, 0, 1, 3, 112],
            &[SMALL_BIG_EXT, 1, 0, 112],
            &[LARGE_BIG_EXT, 0, 0, 0, 1, 0, 113],
            &[SMALL_ATOM_UTF8_EXT, 1, b'p'],
            &[ATOM_UTF8_EXT, 0, 1, b'q'],
            &[NIL_EXT],
            &[SMALL_TUPLE_EXT, 0],
        ];
        let mut parts: Vec<Vec<u8>> = ids.to_vec();
        parts.extend(scalars.iter().map(|s| s.to_vec()));
        let n = parts.len() as u8;
        let tuple = [vec![SMALL_TUPLE_EXT, n], parts.concat()].concat();
        let list = [vec![LIST_EXT, 0, 0, 0, n], parts.concat(), vec![NIL_EXT]].concat();
        let map = [vec![MAP_EXT, 0, 0, 0, n / 2], parts.concat()].concat();
        let large = [
            vec![LARGE_TUPLE_EXT, 0, 0, 0, 3],
            tuple.clone(),
            list.clone(),
            map.clone(),
        ]
        .concat();
        for t in [&tuple, &list, &map, &large] {
            assert!(!may_hold_fun(t), "{t:?}");
            assert_eq!(check_for_vm(&[&[VERSION][..], t].concat()), Ok(()));
            // Cut short anywhere, it cannot tell: the parse decides.
            for cut in 0..t.len() {
                assert!(may_hold_fun(&t[..cut]), "{cut} bytes of {t:?}");
            }
        }
        // A fun anywhere among them is seen; so is a tag the scan does not know.
        let fun = fun_ext(&pid(), &FREE, 0);
        let export: &[u8] = &[
            EXPORT_EXT,
            SMALL_ATOM_EXT,
            1,
            b'm',
            SMALL_ATOM_EXT,
            1,
            b'f',
            97,
            1,
        ];
        for hidden in [&fun[..], export, &[COMPRESSED, 0, 0, 0, 0]] {
            for at in [0, 3, parts.len()] {
                let mut with = parts.clone();
                with.insert(at, hidden.to_vec());
                let inner = with.concat();
                let n = with.len() as u8;
                let tuple = [vec![SMALL_TUPLE_EXT, n], inner.clone()].concat();
                let list = [vec![LIST_EXT, 0, 0, 0, n], inner, vec![NIL_EXT]].concat();
                assert!(may_hold_fun(&tuple) && may_hold_fun(&list));
            }
        }
        // More terms claimed than bytes left.
        assert!(may_hold_fun(&[LIST_EXT, 0xFF, 0xFF, 0xFF, 0xFF, NIL_EXT]));
        assert!(may_hold_fun(&[MAP_EXT, 0xFF, 0xFF, 0xFF, 0xFF]));
    }
}
