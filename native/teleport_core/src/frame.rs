//! Data frames: what travels on an authenticated teleport connection, and the one place that
//! builds them ([`Draft`]).
//!
//! ```text
//! Len:32 | Kind:8 | Flags:8 | DestLen:16 | Seq:64 | Dest:DestLen | Term
//! ```
//! `Len` counts every byte after itself. `Flags` is reserved: no flag is defined, and a frame
//! with any bit set is refused (so a future flag cannot be silently ignored by an older node).
//! `Seq` numbers the frames of a lane (one pool slot and its successive connections) from 1
//! in each session of that lane: the receiver delivers frame `n` only after frame `n - 1`,
//! drops one it already delivered (a resend after a reconnection), and closes the connection
//! on a gap. The sender writes it when the frame first goes out on a connection
//! ([`OutFrame::stamp`]), not when it is built, so that frames dropped before being written
//! leave no hole. `Dest` is the destination in the external term format, version byte
//! first: a pid for [`Kind::ToPid`], the atom of a registered name for [`Kind::ToName`]
//! (which the receiver decodes in safe mode: no atom is ever made for it). `Term` is the
//! message in the external term format, version byte first.

use crate::encode::Writer;
use crate::etf;
use crate::out_frame::{OutFrame, Shared};
use std::fmt;
use std::sync::Arc;

/// Bytes of the length prefix.
pub const LEN_BYTES: usize = 4;
/// Bytes of the fixed part after the length: kind, flags, destination length, sequence.
pub const FIXED_BYTES: usize = 12;
/// Where `Seq` is, counted from the first byte of the length prefix.
pub const SEQ_AT: usize = LEN_BYTES + 4;

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
    /// A reserved flag bit is set.
    BadFlags(u8),
    /// The destination runs past the end of the frame, or the term is missing.
    Truncated,
    /// The destination is not a pid (for [`Kind::ToPid`]) or an atom (for [`Kind::ToName`]).
    BadDest,
    /// The frame's sequence number skips some: frames of the lane were lost on the way.
    Gap {
        /// The sequence number the receiver expected.
        expected: u64,
        /// The one the frame carries.
        got: u64,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::BadLength(n) => write!(f, "frame length {n} is out of bounds"),
            FrameError::BadKind(k) => write!(f, "unknown frame kind {k}"),
            FrameError::BadFlags(b) => write!(f, "unknown frame flags {b:#04x}"),
            FrameError::Truncated => f.write_str("frame ends inside its header"),
            FrameError::BadDest => f.write_str("frame destination is not a pid or an atom"),
            FrameError::Gap { expected, got } => {
                write!(f, "frame {got} arrived where frame {expected} was due")
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// A parsed frame body (everything after the length prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// What `dest` is.
    pub kind: Kind,
    /// Its number on its lane.
    pub seq: u64,
    /// The destination.
    pub dest: &'a [u8],
    /// The message, external term format, version byte first.
    pub term: &'a [u8],
}

/// What a frame body's header says, checked: the receiver parses it once, as it reads the
/// frame, and hands it on with the body, where [`Header::dest`] and [`Header::term`] find
/// the parts without looking at the header again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the destination is.
    pub kind: Kind,
    /// The frame's number on its lane.
    pub seq: u64,
    dest_len: usize,
}

impl Header {
    /// Parses and checks the header of `body`: a known kind, no flags, a destination of its
    /// kind (see [`check_dest`]) and a term after it.
    pub fn parse(body: &[u8]) -> Result<Header, FrameError> {
        if body.len() < FIXED_BYTES {
            return Err(FrameError::Truncated);
        }
        let kind = match body[0] {
            1 => Kind::ToPid,
            2 => Kind::ToName,
            k => return Err(FrameError::BadKind(k)),
        };
        if body[1] != 0 {
            return Err(FrameError::BadFlags(body[1]));
        }
        let dest_len = u16::from_be_bytes([body[2], body[3]]) as usize;
        if dest_len >= body.len() - FIXED_BYTES {
            return Err(FrameError::Truncated);
        }
        check_dest(kind, &body[FIXED_BYTES..FIXED_BYTES + dest_len])?;
        Ok(Header {
            kind,
            seq: seq(body),
            dest_len,
        })
    }

    /// Where the term starts in the body.
    pub fn term_at(&self) -> usize {
        FIXED_BYTES + self.dest_len
    }

    /// The destination, in `body` (the body this header was parsed from).
    pub fn dest<'a>(&self, body: &'a [u8]) -> &'a [u8] {
        &body[FIXED_BYTES..self.term_at()]
    }

    /// The term, in `body` (the body this header was parsed from).
    pub fn term<'a>(&self, body: &'a [u8]) -> &'a [u8] {
        &body[self.term_at()..]
    }

    /// The whole frame, its parts in `body` (the body this header was parsed from).
    pub fn frame<'a>(&self, body: &'a [u8]) -> Frame<'a> {
        Frame {
            kind: self.kind,
            seq: self.seq,
            dest: self.dest(body),
            term: self.term(body),
        }
    }
}

/// Checks a length prefix against the receiver's limit before anything is allocated.
pub fn check_len(prefix: [u8; LEN_BYTES], max_frame_bytes: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len <= FIXED_BYTES || len > max_frame_bytes {
        return Err(FrameError::BadLength(len));
    }
    Ok(len)
}

/// The sequence number of a frame body at least [`FIXED_BYTES`] long (as [`check_len`]
/// guarantees), read before the rest is looked at.
pub fn seq(body: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&body[SEQ_AT - LEN_BYTES..SEQ_AT - LEN_BYTES + 8]);
    u64::from_be_bytes(b)
}

/// Parses a frame body (see [`Header::parse`]).
pub fn parse(body: &[u8]) -> Result<Frame<'_>, FrameError> {
    Header::parse(body).map(|h| h.frame(body))
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

/// A frame being built: its header and destination are written, and [`Draft::term`] takes
/// the message. Every frame is built here, so that its layout is known in one place.
#[derive(Debug)]
#[must_use = "a draft must be finished into a frame"]
pub struct Draft(Writer);

impl Draft {
    /// Starts a frame for `dest`, the destination's encoding without its version byte (a
    /// pid, or an atom: see [`check_dest`]), at most 65534 bytes. The term's version byte is
    /// written too: what [`Draft::term`] writes next is the term itself.
    pub fn new(kind: Kind, dest: &[u8]) -> Draft {
        Draft::writing_dest(kind, |w| w.raw(dest))
    }

    /// As [`Draft::new`], with the destination written by `write_dest` straight into the
    /// frame (bytes only, no shared binary), so that no buffer of its own is needed. It must
    /// write at most 65534 bytes: more would not fit the 16-bit length, and is cut there
    /// (which the receiver refuses).
    pub fn writing_dest(kind: Kind, write_dest: impl FnOnce(&mut Writer)) -> Draft {
        let mut w = match crate::recycle::SPARES.take() {
            Some((buf, chunks)) => Writer::from_vecs(buf, chunks),
            None => Writer::with_capacity(256),
        };
        // Length and sequence number are filled in later: by `finish` and `OutFrame::stamp`;
        // the destination's length once it is written.
        w.raw(&[0, 0, 0, 0, kind as u8, 0, 0, 0]);
        w.raw(&[0; 8]);
        let dest_at = w.buffered();
        w.version();
        write_dest(&mut w);
        let dest_len = u16::try_from(w.buffered() - dest_at).unwrap_or(u16::MAX);
        w.overwrite(LEN_BYTES + 2, &dest_len.to_be_bytes());
        w.version();
        Draft(w)
    }

    /// Where the message is written, after its version byte.
    pub fn term(&mut self) -> &mut Writer {
        &mut self.0
    }

    /// The finished frame, whose [`crate::encode::Chunk::Shared`] parts `shared` supplies.
    /// Fails if the frame does not fit the 32-bit length.
    pub fn finish(self, shared: Option<Arc<dyn Shared>>) -> Result<OutFrame, FrameError> {
        let mut w = self.0;
        let len = w.total_len() - LEN_BYTES;
        let len32 = u32::try_from(len).map_err(|_| FrameError::BadLength(len))?;
        w.overwrite(0, &len32.to_be_bytes());
        let (buf, chunks) = w.finish_compact();
        Ok(OutFrame::new(buf, chunks, shared))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of a finished frame, as they go on the wire.
    fn wire(f: &OutFrame) -> Vec<u8> {
        let mut v = Vec::new();
        f.slices(&mut v, usize::MAX);
        v.iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn a_built_frame_parses_back_with_its_stamp() {
        let mut d = Draft::new(
            Kind::ToName,
            &[etf::SMALL_ATOM_UTF8_EXT, 4, b'e', b'c', b'h', b'o'],
        );
        d.term().atom_utf8(b"hi");
        let mut f = d.finish(None).unwrap();
        f.stamp(7);
        let buf = wire(&f);
        assert_eq!(f.len(), buf.len());
        let len = check_len(buf[..4].try_into().unwrap(), 1 << 20).unwrap();
        assert_eq!(len, buf.len() - 4);
        assert_eq!(seq(&buf[4..]), 7);
        assert_eq!(
            parse(&buf[4..]).unwrap(),
            Frame {
                kind: Kind::ToName,
                seq: 7,
                dest: &[131, etf::SMALL_ATOM_UTF8_EXT, 4, b'e', b'c', b'h', b'o'],
                term: &[131, 119, 2, b'h', b'i'],
            }
        );
    }

    #[test]
    fn shared_binaries_count_in_the_length() {
        let mut d = Draft::new(Kind::ToPid, &[etf::NEW_PID_EXT, 1, 2]);
        d.term().binary_ref(100_000);
        let f = d.finish(None).unwrap();
        assert_eq!(f.len(), 4 + 12 + 4 + 1 + 5 + 100_000);
        let mut v = Vec::new();
        f.slices(&mut v, 1);
        assert_eq!(
            u32::from_be_bytes(v[0][..4].try_into().unwrap()) as usize,
            f.len() - 4
        );
    }

    #[test]
    fn lengths_are_checked_before_allocating() {
        assert_eq!(
            check_len(u32::MAX.to_be_bytes(), 1 << 30),
            Err(FrameError::BadLength(u32::MAX as usize))
        );
        assert_eq!(
            check_len([0, 0, 0, 12], 100),
            Err(FrameError::BadLength(12))
        );
        assert_eq!(check_len([0, 0, 0, 100], 100), Ok(100));
    }

    #[test]
    fn malformed_bodies_are_refused() {
        let seq0 = [0u8; 8];
        let body = |head: &[u8], rest: &[u8]| [head, &seq0, rest].concat();
        assert_eq!(parse(&[1, 0, 0]), Err(FrameError::Truncated));
        assert_eq!(
            parse(&body(&[9, 0, 0, 0], &[131])),
            Err(FrameError::BadKind(9))
        );
        assert_eq!(
            parse(&body(&[1, 1, 0, 0], &[131])),
            Err(FrameError::BadFlags(1))
        );
        // Destination as long as the rest: no term left.
        assert_eq!(
            parse(&body(&[2, 0, 0, 2], b"ab")),
            Err(FrameError::Truncated)
        );
        assert_eq!(
            parse(&body(&[2, 0, 255, 255], b"a")),
            Err(FrameError::Truncated)
        );
        // A destination that is not of its kind: the header check refuses it too.
        let pid = [131, etf::NEW_PID_EXT, 119, 1, b'a'];
        assert_eq!(
            parse(&body(&[2, 0, 0, 5], &[&pid[..], &[131, 106]].concat())),
            Err(FrameError::BadDest)
        );
        let good = body(&[1, 0, 0, 5], &[&pid[..], &[131, 106]].concat());
        let h = Header::parse(&good).unwrap();
        assert_eq!(
            (h.kind, h.seq, h.term_at()),
            (Kind::ToPid, 0, FIXED_BYTES + 5)
        );
        assert_eq!((h.dest(&good), h.term(&good)), (&pid[..], &[131, 106][..]));
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
