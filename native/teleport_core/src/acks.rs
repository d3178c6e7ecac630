//! Acknowledgements: how a sender learns which of its frames the peer delivered, so that it
//! can keep every frame until then and send again what a dead connection took with it.
//!
//! The receiver of a lane acknowledges cumulatively, on the reverse direction of the same
//! TCP connection, which carries nothing else after the handshake:
//!
//! ```text
//! receiver -> sender  ACK   'a', Seq:64    every frame of the lane up to Seq is delivered
//!                     LAST  'z', Seq:64    the same, and this connection delivers no more
//! ```
//!
//! A LAST is what a closing listener says (its teleport is stopping): the sender then knows
//! that the frames after Seq were not delivered, and sends them to whatever listens next, a
//! new incarnation included, instead of dropping them as unknown.
//!
//! An ack goes out after [`ACK_FRAMES`] frames or [`ACK_BYTES`] bytes delivered since the
//! last one, or [`ACK_DELAY`] after the first frame it would cover, whichever comes first:
//! one small write per many small frames, one per large frame, and a burst's tail is not
//! held for long. Acks are written without blocking: a sender that does not read them never
//! stalls the receiver's reader (the next ack covers what a skipped one would have).
//!
//! [`Acker`] is the receiver's policy, [`AckReader`] the sender's parser; both are plain
//! state machines, tested here without sockets.

use std::io;
use std::time::{Duration, Instant};

/// The tag of an ACK.
pub const ACK_TAG: u8 = b'a';
/// The tag of a LAST.
pub const LAST_TAG: u8 = b'z';
/// Bytes of one ACK on the wire.
pub const ACK_LEN: usize = 9;

/// An ack is due after this many frames delivered since the last one...
pub const ACK_FRAMES: u32 = 64;
/// ... or this many bytes ...
pub const ACK_BYTES: usize = 1024 * 1024;
/// ... or this long after the first frame it would cover.
pub const ACK_DELAY: Duration = Duration::from_millis(5);

/// The bytes of an ACK of every frame up to `seq`.
pub fn encode(seq: u64) -> [u8; ACK_LEN] {
    tagged(ACK_TAG, seq)
}

/// The bytes of a LAST: every frame up to `seq`, and no more.
pub fn encode_last(seq: u64) -> [u8; ACK_LEN] {
    tagged(LAST_TAG, seq)
}

fn tagged(tag: u8, seq: u64) -> [u8; ACK_LEN] {
    let mut a = [tag; ACK_LEN];
    a[1..].copy_from_slice(&seq.to_be_bytes());
    a
}

/// Where acks are written: without blocking, as much as fits.
pub trait AckOut {
    /// Writes what it can of `bytes` at once; how much (0 when nothing fits now).
    fn try_write(&mut self, bytes: &[u8]) -> io::Result<usize>;
}

/// The receiving side's acknowledgement policy for one connection.
#[derive(Debug)]
pub struct Acker {
    frames: u32,
    bytes: usize,
    /// When the first frame not yet acknowledged was delivered.
    owed_since: Option<Instant>,
    /// The rest of an ACK a full socket cut short, and where that rest starts.
    tail: Option<([u8; ACK_LEN], usize)>,
}

impl Default for Acker {
    fn default() -> Self {
        Acker::new()
    }
}

impl Acker {
    /// Nothing owed yet.
    pub fn new() -> Acker {
        Acker {
            frames: 0,
            bytes: 0,
            owed_since: None,
            tail: None,
        }
    }

    /// Counts a frame of `len` bytes delivered (or dropped as undeliverable) at `now`.
    pub fn delivered(&mut self, len: usize, now: Instant) {
        self.frames += 1;
        self.bytes += len;
        self.owed_since.get_or_insert(now);
    }

    /// Whether some delivered frame is not acknowledged yet, or an ACK is only partly out:
    /// either way the reader must come back to it, even if no other frame arrives.
    pub fn owed(&self) -> bool {
        self.owed_since.is_some() || self.tail.is_some()
    }

    /// Whether an ack should go out now.
    pub fn due(&self, now: Instant) -> bool {
        self.frames >= ACK_FRAMES
            || self.bytes >= ACK_BYTES
            || self
                .owed_since
                .is_some_and(|t| now.saturating_duration_since(t) >= ACK_DELAY)
    }

    /// When the ack owed is due by its delay: [`ACK_DELAY`] after the first frame it covers,
    /// or at once for the rest of an ACK a full socket cut short. `None` if none is owed.
    pub fn due_at(&self) -> Option<Instant> {
        match (self.tail, self.owed_since) {
            (Some(_), _) => Some(Instant::now()),
            (None, since) => since.map(|t| t + ACK_DELAY),
        }
    }

    /// Acknowledges every frame up to `upto` on `out`, without blocking. An ACK cut short by
    /// a full socket is finished first next time; until then no other starts (the stream
    /// stays whole). Only a socket error is an error.
    pub fn flush(&mut self, out: &mut impl AckOut, upto: u64) -> io::Result<()> {
        // The counters restart either way: a sender that does not read is asked again only
        // after as many frames more, not on every frame.
        self.frames = 0;
        self.bytes = 0;
        if let Some((rest, at)) = self.tail.take() {
            // Kept until it is out whole, through errors too: anything written after a cut
            // ACK would be read as its rest.
            self.tail = Some((rest, at));
            let n = out.try_write(&rest[at..])?;
            if at + n < ACK_LEN {
                self.tail = Some((rest, at + n));
                return Ok(());
            }
            self.tail = None;
        }
        self.send(out, encode(upto))
    }

    /// Says LAST up to `upto` (after the rest of a cut ACK, if any): this connection
    /// delivers no more. Returns whether all of it is out; if not, call it again.
    pub fn finish(&mut self, out: &mut impl AckOut, upto: u64) -> io::Result<bool> {
        if let Some((rest, at)) = self.tail {
            if rest[0] == LAST_TAG {
                // The LAST itself was cut: finish it.
                let n = out.try_write(&rest[at..])?;
                self.tail = (at + n < ACK_LEN).then_some((rest, at + n));
                return Ok(self.tail.is_none());
            }
            let n = out.try_write(&rest[at..])?;
            if at + n < ACK_LEN {
                self.tail = Some((rest, at + n));
                return Ok(false);
            }
            self.tail = None;
        }
        self.send(out, encode_last(upto))?;
        Ok(self.tail.is_none())
    }

    fn send(&mut self, out: &mut impl AckOut, ack: [u8; ACK_LEN]) -> io::Result<()> {
        let n = out.try_write(&ack)?;
        if n < ACK_LEN {
            self.tail = Some((ack, n));
        }
        self.owed_since = None;
        Ok(())
    }
}

/// Why the reverse direction of a connection is not a stream of ACKs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotAnAck(pub u8);

impl std::fmt::Display for NotAnAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the peer sent byte {:#04x} where an ack was due", self.0)
    }
}

impl std::error::Error for NotAnAck {}

/// The sending side's parser of the ACKs coming back, which may arrive cut anywhere.
#[derive(Debug, Default)]
pub struct AckReader {
    part: [u8; ACK_LEN],
    have: usize,
    last: bool,
}

impl AckReader {
    /// Reads the ACKs in `bytes` (a LAST among them); the highest sequence number they
    /// acknowledge, if any.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<Option<u64>, NotAnAck> {
        let mut best = None;
        while !bytes.is_empty() {
            if self.have == 0 && ((bytes[0] != ACK_TAG && bytes[0] != LAST_TAG) || self.last) {
                // Nothing may follow a LAST.
                return Err(NotAnAck(bytes[0]));
            }
            let n = (ACK_LEN - self.have).min(bytes.len());
            self.part[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == ACK_LEN {
                self.have = 0;
                self.last = self.part[0] == LAST_TAG;
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&self.part[1..]);
                let seq = u64::from_be_bytes(seq);
                best = Some(best.map_or(seq, |b: u64| b.max(seq)));
            }
        }
        Ok(best)
    }

    /// Whether a LAST came: the connection delivers nothing after what it acknowledged.
    pub fn is_last(&self) -> bool {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that takes at most `room` more bytes.
    struct Room {
        room: usize,
        got: Vec<u8>,
    }

    impl AckOut for Room {
        fn try_write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let n = bytes.len().min(self.room);
            self.room -= n;
            self.got.extend_from_slice(&bytes[..n]);
            Ok(n)
        }
    }

    #[test]
    fn an_ack_is_due_after_enough_frames_bytes_or_time() {
        let t0 = Instant::now();
        let mut a = Acker::new();
        assert!(!a.owed() && !a.due(t0));
        for _ in 0..ACK_FRAMES - 1 {
            a.delivered(100, t0);
        }
        assert!(a.owed() && !a.due(t0));
        a.delivered(100, t0);
        assert!(a.due(t0));

        let mut big = Acker::new();
        big.delivered(ACK_BYTES, t0);
        assert!(big.due(t0));

        let mut slow = Acker::new();
        slow.delivered(10, t0);
        assert!(!slow.due(t0 + ACK_DELAY / 2));
        assert!(slow.due(t0 + ACK_DELAY));
    }

    #[test]
    fn an_ack_cut_by_a_full_socket_is_finished_before_the_next() {
        let mut out = Room {
            room: 4,
            got: Vec::new(),
        };
        let mut a = Acker::new();
        a.delivered(1, Instant::now());
        a.flush(&mut out, 5).unwrap();
        // Nothing fits: the tail waits, and no new ack starts in the middle of it. Something
        // is still owed, so the reader comes back to it even if no frame arrives.
        assert!(a.owed());
        a.flush(&mut out, 5).unwrap();
        assert!(a.owed());
        assert_eq!(out.got.len(), 4);
        out.room = 100;
        a.delivered(1, Instant::now());
        a.flush(&mut out, 7).unwrap();
        let mut r = AckReader::default();
        assert_eq!(r.feed(&out.got), Ok(Some(7)));
        assert_eq!(out.got.len(), 2 * ACK_LEN);
    }

    #[test]
    fn acks_cut_anywhere_parse_to_the_highest() {
        let stream: Vec<u8> = [3u64, 9, 4].iter().flat_map(|&s| encode(s)).collect();
        for step in 1..stream.len() {
            let mut r = AckReader::default();
            let mut best = None;
            for piece in stream.chunks(step) {
                if let Some(s) = r.feed(piece).unwrap() {
                    best = Some(best.map_or(s, |b: u64| b.max(s)));
                }
            }
            assert_eq!(best, Some(9), "step {step}");
        }
    }

    #[test]
    fn a_last_ack_says_so_and_nothing_may_follow_it() {
        let mut out = Room {
            room: 13,
            got: Vec::new(),
        };
        let mut a = Acker::new();
        a.delivered(1, Instant::now());
        a.flush(&mut out, 4).unwrap();
        // Room for 4 bytes of the LAST: it is finished on the next call.
        assert!(!a.finish(&mut out, 6).unwrap());
        out.room = 100;
        assert!(a.finish(&mut out, 6).unwrap());
        let mut r = AckReader::default();
        assert_eq!(r.feed(&out.got[..ACK_LEN]), Ok(Some(4)));
        assert!(!r.is_last());
        assert_eq!(r.feed(&out.got[ACK_LEN..]), Ok(Some(6)));
        assert!(r.is_last());
        assert_eq!(r.feed(&encode(7)), Err(NotAnAck(ACK_TAG)));
    }

    #[test]
    fn anything_but_acks_is_refused() {
        let mut r = AckReader::default();
        assert_eq!(r.feed(b"HTTP"), Err(NotAnAck(b'H')));
        let mut r = AckReader::default();
        let mut two = encode(1).to_vec();
        two.push(0);
        assert_eq!(r.feed(&two), Err(NotAnAck(0)));
    }
}
