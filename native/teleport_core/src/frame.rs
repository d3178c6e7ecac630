//! Data frames: what travels on an authenticated teleport connection.
//!
//! ```text
//! Len:32 | Kind:8 | Flags:8 | DestLen:16 | Dest:DestLen | Term
//! ```
//! `Len` counts every byte after itself. `Dest` is the destination in the external term
//! format, version byte first: a pid for [`Kind::ToPid`], the atom of a registered name for
//! [`Kind::ToName`] (which the receiver decodes in safe mode: no atom is ever made for it). `Term` is the message in the external term format, version byte first.
//! [`FLAG_SHARED`] tells the receiver that the term holds binaries worth decoding as
//! sub-binaries of the frame, so the frame should be read into a buffer of its own.

use crate::encode::Writer;
use crate::etf;
use std::fmt;

/// Bytes of the length prefix.
pub const LEN_BYTES: usize = 4;
/// Bytes of the fixed part after the length: kind, flags, destination length.
pub const FIXED_BYTES: usize = 4;
/// The term holds large binaries: read the frame into its own buffer and decode zero-copy.
pub const FLAG_SHARED: u8 = 1;

/// What a frame's destination is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A pid.
    ToPid = 1,
    /// A locally registered name.
    ToName = 2,
}

/// Why a frame is refused. Any of these closes the connection it came on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix is below the fixed part or above the receiver's `max_frame_bytes`.
    BadLength(usize),
    /// The kind byte is unknown.
    BadKind(u8),
    /// The destination runs past the end of the frame, or the term is missing.
    Truncated,
    /// The destination is not a pid (for [`Kind::ToPid`]) or an atom (for [`Kind::ToName`]).
    BadDest,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::BadLength(n) => write!(f, "frame length {n} is out of bounds"),
            FrameError::BadKind(k) => write!(f, "unknown frame kind {k}"),
            FrameError::Truncated => f.write_str("frame ends inside its header"),
            FrameError::BadDest => f.write_str("frame destination is not a pid or an atom"),
        }
    }
}

impl std::error::Error for FrameError {}

/// A parsed frame body (everything after the length prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// What `dest` is.
    pub kind: Kind,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// The destination.
    pub dest: &'a [u8],
    /// The message, external term format, version byte first.
    pub term: &'a [u8],
}

/// Checks a length prefix against the receiver's limit before anything is allocated.
pub fn check_len(prefix: [u8; LEN_BYTES], max_frame_bytes: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len <= FIXED_BYTES || len > max_frame_bytes {
        return Err(FrameError::BadLength(len));
    }
    Ok(len)
}

/// Parses a frame body.
pub fn parse(body: &[u8]) -> Result<Frame<'_>, FrameError> {
    if body.len() < FIXED_BYTES {
        return Err(FrameError::Truncated);
    }
    let kind = match body[0] {
        1 => Kind::ToPid,
        2 => Kind::ToName,
        k => return Err(FrameError::BadKind(k)),
    };
    let dest_len = u16::from_be_bytes([body[2], body[3]]) as usize;
    let rest = &body[FIXED_BYTES..];
    if dest_len >= rest.len() {
        return Err(FrameError::Truncated);
    }
    let (dest, term) = rest.split_at(dest_len);
    Ok(Frame {
        kind,
        flags: body[1],
        dest,
        term,
    })
}

/// Checks that a destination is what its kind says, by its outer tag, before the VM's own
/// decoder sees it: a pid (whose only inner term is its node's atom) or an atom. Anything
/// else could hide a term the VM's decoder mishandles, such as a forged fun (OTP 25 accepts
/// a NEW_FUN_EXT whose creator is no pid, and crashes using it).
pub fn check_dest(kind: Kind, dest: &[u8]) -> Result<(), FrameError> {
    let ok = match (kind, dest) {
        (Kind::ToPid, [etf::VERSION, tag, ..]) => {
            matches!(*tag, etf::NEW_PID_EXT | etf::PID_EXT)
        }
        (Kind::ToName, [etf::VERSION, tag, ..]) => matches!(
            *tag,
            etf::ATOM_UTF8_EXT | etf::SMALL_ATOM_UTF8_EXT | etf::ATOM_EXT | etf::SMALL_ATOM_EXT
        ),
        _ => false,
    };
    ok.then_some(()).ok_or(FrameError::BadDest)
}

/// The position of a frame being written, to be completed by [`finish`].
#[derive(Debug)]
#[must_use = "a started frame must be finished"]
pub struct Started(usize);

/// Writes a frame header for `dest` into `w`; the term follows (version byte first).
/// `dest` must be at most 65535 bytes.
pub fn start(w: &mut Writer, kind: Kind, dest: &[u8]) -> Started {
    let at = w.buffered();
    w.raw(&[0, 0, 0, 0, kind as u8, 0]);
    w.raw(&(dest.len() as u16).to_be_bytes());
    w.raw(dest);
    Started(at)
}

/// Fills in the length and flags of a frame started at `started`, now that its term is
/// written. Fails if the frame does not fit the 32-bit length.
pub fn finish(w: &mut Writer, started: Started, flags: u8) -> Result<usize, FrameError> {
    let len = w.total_len() - started.0 - LEN_BYTES;
    let len32 = u32::try_from(len).map_err(|_| FrameError::BadLength(len))?;
    w.overwrite(started.0, &len32.to_be_bytes());
    w.overwrite(started.0 + LEN_BYTES + 1, &[flags]);
    Ok(len + LEN_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::Chunk;

    #[test]
    fn a_written_frame_parses_back() {
        let mut w = Writer::default();
        let s = start(&mut w, Kind::ToName, b"echo");
        w.version();
        w.atom_utf8(b"hi");
        let total = finish(&mut w, s, 0).unwrap();
        let (buf, chunks) = w.finish();
        assert_eq!(
            chunks,
            vec![Chunk::Bytes {
                start: 0,
                end: total
            }]
        );
        let len = check_len(buf[..4].try_into().unwrap(), 1 << 20).unwrap();
        assert_eq!(len, buf.len() - 4);
        let f = parse(&buf[4..]).unwrap();
        assert_eq!(
            f,
            Frame {
                kind: Kind::ToName,
                flags: 0,
                dest: b"echo",
                term: &[131, 119, 2, b'h', b'i'],
            }
        );
    }

    #[test]
    fn shared_binaries_count_in_the_length() {
        let mut w = Writer::default();
        let s = start(&mut w, Kind::ToPid, &[1, 2, 3]);
        w.version();
        w.binary_ref(100_000);
        let total = finish(&mut w, s, FLAG_SHARED).unwrap();
        assert_eq!(total, 4 + 4 + 3 + 1 + 5 + 100_000);
        let (buf, _) = w.finish();
        assert_eq!(
            u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize,
            total - 4
        );
        assert_eq!(buf[5], FLAG_SHARED);
    }

    #[test]
    fn lengths_are_checked_before_allocating() {
        assert_eq!(
            check_len(u32::MAX.to_be_bytes(), 1 << 30),
            Err(FrameError::BadLength(u32::MAX as usize))
        );
        assert_eq!(check_len([0, 0, 0, 4], 100), Err(FrameError::BadLength(4)));
        assert_eq!(check_len([0, 0, 0, 100], 100), Ok(100));
    }

    #[test]
    fn malformed_bodies_are_refused() {
        assert_eq!(parse(&[1, 0, 0]), Err(FrameError::Truncated));
        assert_eq!(parse(&[9, 0, 0, 0, 131]), Err(FrameError::BadKind(9)));
        // Destination as long as the rest: no term left.
        assert_eq!(parse(&[2, 0, 0, 2, b'a', b'b']), Err(FrameError::Truncated));
        assert_eq!(parse(&[2, 0, 255, 255, b'a']), Err(FrameError::Truncated));
    }

    #[test]
    fn destinations_must_be_pids_or_atoms() {
        let pid = [131, etf::NEW_PID_EXT, 119, 1, b'a', 0, 0, 0, 1];
        let atom = [131, etf::SMALL_ATOM_UTF8_EXT, 2, b'h', b'i'];
        assert_eq!(check_dest(Kind::ToPid, &pid), Ok(()));
        assert_eq!(check_dest(Kind::ToPid, &[131, etf::PID_EXT]), Ok(()));
        assert_eq!(check_dest(Kind::ToName, &atom), Ok(()));
        assert_eq!(check_dest(Kind::ToName, &[131, etf::ATOM_EXT]), Ok(()));
        // The other kind's destination, a fun, a tuple, no version byte, nothing.
        assert_eq!(check_dest(Kind::ToPid, &atom), Err(FrameError::BadDest));
        assert_eq!(check_dest(Kind::ToName, &pid), Err(FrameError::BadDest));
        assert_eq!(
            check_dest(Kind::ToPid, &[131, 112, 0]),
            Err(FrameError::BadDest)
        );
        assert_eq!(
            check_dest(Kind::ToName, &[131, 104, 1]),
            Err(FrameError::BadDest)
        );
        assert_eq!(
            check_dest(Kind::ToName, &atom[1..]),
            Err(FrameError::BadDest)
        );
        assert_eq!(check_dest(Kind::ToPid, &[]), Err(FrameError::BadDest));
    }
}
