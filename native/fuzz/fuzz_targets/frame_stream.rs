//! `frame_stream`: arbitrary bytes as the TCP stream of an authenticated connection, through
//! `teleport_core::pump::read_frames`, cut into reads at points the input chooses, with a
//! sink that checks the header it is handed against the body and decodes the frame's
//! destination and term with `value::decode_value`, on a lane whose `Progress` may have delivered some frames
//! already, and with the acks the reader writes back parsed with `acks::AckReader`.
//!
//! The input is a 24-byte header, then the stream:
//!
//! ```text
//! 0       mode: bits 0-2 how many read sizes follow (0: every read fills the buffer),
//!         bit 3 the sink's `alloc` fails (NoMemory), bit 4 strict: a term that does not
//!         decode closes the connection as in the NIF (otherwise the reader goes on),
//!         bit 5 the listener closes (`stop` is set) once the socket gave STOP_AT bytes (the
//!         reader's next read finds it set)
//! 1..15   7 read sizes, u16 big-endian, used in turn; 0 is an `Interrupted` error, 0xFFFF
//!         a `WouldBlock` (a read timeout) if the reader set a timeout, else a plain read
//! 15..17  pad_at: u16, where padding goes in the stream (clamped to its length)
//! 17..19  pad_len: u16, padding length in units of 16 bytes (up to about 1 MB)
//! 19      fill: the padding byte
//! 20      delivered: the lane delivered frames 1..=this before the connection (admitted
//!         through `Progress::admit`, as an earlier connection of the lane would have)
//! 21      acks: bits 0-3 the most bytes one `try_write` takes (0: no limit), bit 4 every
//!         other `try_write` takes nothing (a full socket), bits 5-7 from this `try_write`
//!         on (counted from 1; 0: never) every one fails (a broken connection)
//! 22..24  STOP_AT: u16, in units of 16 bytes (bit 5 of the mode)
//! 24..    the stream
//! ```
//!
//! The padding lets a few kilobytes of input describe a frame of up to `MAX_FRAME` bytes, so the
//! large-frame path (`OWNED_FRAME_MIN` and up: `Sink::alloc`, `frame_owned`) is reached, e.g.
//! `BINARY_EXT` with a length of 100,000 followed by 100,000 bytes of padding.
//!
//! Checks, for every input:
//! - no panic, no hang; the live heap grows by at most `MAX_FRAME` (the one large-frame
//!   buffer), plus 256 KiB (the reader's buffer), plus 1 MiB and 512 bytes per stream byte
//!   (the decoded values, the model's and the sink's records); the acks are parsed as they
//!   are written, not kept;
//! - `alloc` is asked only for `OWNED_FRAME_MIN..=MAX_FRAME` bytes, small frames arrive through
//!   `frame` and large ones through `frame_owned`;
//! - however the stream is cut, the frames that arrive and the way the reader stops are those
//!   of a plain reading of the whole stream (a model; up to where the socket was when the
//!   listener closed, if it did): every frame is read and counted; one whose sequence number
//!   is at most the lane's `delivered` is dropped (delivered already), the next one arrives
//!   (and is counted as delivered before the sink sees it), any other ends the reading with
//!   `Gap { expected, got }`; the next one whose header is malformed (an unknown kind, a
//!   flag, a destination past the end or not of its kind) counts as delivered and ends the
//!   reading with that error, without arriving (a duplicate is dropped unread); the same
//!   bodies arrive, in order, then a clean end,
//!   `UnexpectedEof`, `BadLength(n)`, `NoMemory(n)`, `Gap`, the header's error or the sink's
//!   own (a term that does not decode, in strict mode);
//! - the peer's and the connection's counters say as many messages and bytes as were read
//!   (duplicates and the frame of a gap included), and the lane's `delivered()` moved by
//!   exactly the frames that arrived (and the malformed one, if it ended the reading);
//! - the acks written are a stream of ACKs (and, once the listener closed, a LAST ending it);
//!   each acknowledges something delivered on this connection (a LAST may say only what the
//!   lane had) and nothing more than the lane delivered when it was written, and they never
//!   go back; when every write goes through, the reader's read timeout is `ACK_DELAY` exactly
//!   while something delivered is not acknowledged yet (`IDLE_WAKE` otherwise), and the last
//!   ack is the lane's `delivered()` if anything arrived (no ack at all otherwise, but for
//!   the LAST of a closing listener);
//! - once the listener closed, the reader reads nothing more and delivers nothing more, and
//!   ends cleanly: the frames that arrive are those wholly read before;
//! - the header handed to the sink is the body's own: its kind and sequence number are its
//!   header bytes, its destination and term are the body after its header, split where the
//!   header says, the destination is of its kind and the term is not empty.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use teleport_core::acks::{AckOut, AckReader, ACK_DELAY, ACK_LEN};
use teleport_core::frame::{self, FrameError, Header, Kind, FIXED_BYTES, LEN_BYTES};
use teleport_core::lanes::{Admit, Lanes, Progress};
use teleport_core::pump::{
    read_frames, Counters, ReadError, Sink, Wire, IDLE_WAKE, OWNED_FRAME_MIN,
};
use teleport_core::stats::{ConnStats, PeerStats};
use teleport_core::value::decode_value;
use teleport_fuzz::{dispose, run_check_with_budget, BUDGET_BASE, BUDGET_PER_INPUT_BYTE};

/// The receiver's `max_frame_bytes`.
const MAX_FRAME: usize = 1 << 20;
/// The reader's own buffer (`READ_BUF` in pump.rs).
const READER_BUFFER: usize = 256 * 1024;
const HEADER: usize = 24;
const CUTS: usize = 7;
/// The read size that stands for a read timeout.
const WOULD_BLOCK: usize = 0xFFFF;

fuzz_target!(|data: &[u8]| {
    let budget = Stream::parse(data).map_or(BUDGET_BASE, |(s, _)| {
        let stream_len = s.len();
        BUDGET_BASE
            .saturating_add(MAX_FRAME + READER_BUFFER)
            .saturating_add(stream_len.saturating_mul(BUDGET_PER_INPUT_BYTE))
    });
    run_check_with_budget(data, budget, check)
});

/// The stream the input describes: `bytes` with `pad_len` copies of `fill` inserted at
/// `pad_at`, never materialised.
#[derive(Clone, Copy)]
struct Stream<'a> {
    bytes: &'a [u8],
    pad_at: usize,
    pad_len: usize,
    fill: u8,
}

impl<'a> Stream<'a> {
    fn parse(data: &'a [u8]) -> Option<(Stream<'a>, Script)> {
        let (head, bytes) = (data.get(..HEADER)?, &data[HEADER..]);
        let u16_at = |i: usize| usize::from(u16::from_be_bytes([head[i], head[i + 1]]));
        let mut cuts = [0usize; CUTS];
        for (i, cut) in cuts.iter_mut().enumerate() {
            *cut = u16_at(1 + 2 * i);
        }
        let stream = Stream {
            bytes,
            pad_at: u16_at(15).min(bytes.len()),
            pad_len: u16_at(17) * 16,
            fill: head[19],
        };
        let acks = head[21];
        let script = Script {
            cuts,
            ncuts: usize::from(head[0] & 7),
            fail_alloc: head[0] & 8 != 0,
            strict: head[0] & 16 != 0,
            stop_at: (head[0] & 32 != 0).then(|| u16_at(22) * 16),
            start: u64::from(head[20]),
            ack_room: match usize::from(acks & 15) {
                0 => usize::MAX,
                n => n,
            },
            ack_stalls: acks & 16 != 0,
            ack_fails_from: usize::from(acks >> 5),
        };
        Some((stream, script))
    }

    fn len(&self) -> usize {
        self.bytes.len() + self.pad_len
    }

    /// Copies the stream's bytes from `at` into `out` (which must fit in the stream).
    fn copy(&self, at: usize, out: &mut [u8]) {
        let mut done = 0;
        while done < out.len() {
            let (p, rest) = (at + done, &mut out[done..]);
            let padded = self.pad_at + self.pad_len;
            let n = if p < self.pad_at {
                let n = rest.len().min(self.pad_at - p);
                rest[..n].copy_from_slice(&self.bytes[p..p + n]);
                n
            } else if p < padded {
                let n = rest.len().min(padded - p);
                rest[..n].fill(self.fill);
                n
            } else {
                let q = p - self.pad_len;
                let n = rest.len().min(self.bytes.len() - q);
                rest[..n].copy_from_slice(&self.bytes[q..q + n]);
                n
            };
            assert!(n > 0, "read past the end of the stream");
            done += n;
        }
    }
}

#[derive(Clone, Copy)]
struct Script {
    cuts: [usize; CUTS],
    ncuts: usize,
    fail_alloc: bool,
    strict: bool,
    /// The listener closes once the socket gave this many bytes.
    stop_at: Option<usize>,
    /// What the lane delivered before this connection.
    start: u64,
    /// The most bytes one `try_write` takes.
    ack_room: usize,
    /// Every other `try_write` takes nothing.
    ack_stalls: bool,
    /// From this `try_write` on (counted from 1), every one fails; 0: never.
    ack_fails_from: usize,
}

impl Script {
    /// Whether every ack write goes through whole.
    fn acks_flow(&self) -> bool {
        self.ack_room >= ACK_LEN && !self.ack_stalls && self.ack_fails_from == 0
    }
}

/// The stream as a socket: each read returns at most the next size of the script; acks
/// written to it are parsed and checked as they come.
struct Socket<'a> {
    stream: Stream<'a>,
    pos: usize,
    script: Script,
    turn: usize,
    /// The last read failed (`Interrupted`, `WouldBlock`): the next one makes progress, so a
    /// script of failures ends.
    hiccup: bool,
    /// The read timeout the reader set.
    timeout: Option<Duration>,
    stop: &'a AtomicBool,
    progress: &'a Progress,
    acks: AckReader,
    /// `try_write` calls so far.
    writes: usize,
    /// Ack bytes taken.
    written: usize,
    /// The highest ack so far.
    last_ack: Option<u64>,
}

impl Socket<'_> {
    /// What the lane delivered and this connection acknowledged (or had delivered already).
    fn acknowledged(&self) -> u64 {
        self.last_ack.unwrap_or(self.script.start)
    }
}

impl Read for Socket<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        assert!(
            !self.stop.load(Ordering::Relaxed),
            "the reader read on after the listener closed"
        );
        // The listener closes once the reader has had STOP_AT bytes: its next read finds the
        // flag set (the reader looks at it whenever a read comes back empty-handed).
        if self.script.stop_at.is_some_and(|at| self.pos >= at) {
            self.stop.store(true, Ordering::Relaxed);
            return Err(io::ErrorKind::Interrupted.into());
        }
        let mut limit = usize::MAX;
        if self.script.ncuts > 0 {
            limit = self.script.cuts[self.turn % self.script.ncuts];
            self.turn += 1;
            if !self.hiccup && !out.is_empty() {
                if limit == 0 {
                    self.hiccup = true;
                    return Err(io::ErrorKind::Interrupted.into());
                }
                // Only a socket with a timeout times out; a blocking one would just wait.
                if limit == WOULD_BLOCK && self.timeout.is_some() {
                    self.hiccup = true;
                    return Err(io::ErrorKind::WouldBlock.into());
                }
            }
        }
        self.hiccup = false;
        let end = self
            .script
            .stop_at
            .map_or(self.stream.len(), |at| at.min(self.stream.len()));
        let n = out.len().min(limit.max(1)).min(end - self.pos);
        self.stream.copy(self.pos, &mut out[..n]);
        self.pos += n;
        Ok(n)
    }
}

impl AckOut for Socket<'_> {
    fn try_write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        assert!(
            (1..=ACK_LEN).contains(&bytes.len()),
            "an ack write of {} bytes",
            bytes.len()
        );
        self.writes += 1;
        let fails_from = self.script.ack_fails_from;
        if fails_from != 0 && self.writes >= fails_from {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        if self.script.ack_stalls && self.writes.is_multiple_of(2) {
            return Ok(0);
        }
        let n = bytes.len().min(self.script.ack_room);
        // At most one ack ends in one write: an ack's tail, or an ack.
        match self.acks.feed(&bytes[..n]) {
            Err(e) => panic!("the reader wrote what is not an ack: {e}"),
            Ok(None) => {}
            Ok(Some(seq)) => {
                let delivered = self.progress.delivered();
                assert!(
                    seq <= delivered,
                    "an ack of {seq} when the lane delivered {delivered}"
                );
                // Only a LAST (a closing listener's) may say what the lane had already.
                assert!(
                    seq > self.script.start || self.acks.is_last(),
                    "an ack of {seq}, nothing delivered on this connection (it started at {})",
                    self.script.start
                );
                if let Some(last) = self.last_ack {
                    assert!(seq >= last, "the acks went back from {last} to {seq}");
                }
                self.last_ack = Some(seq);
            }
        }
        self.written += n;
        Ok(n)
    }
}

impl Wire for Socket<'_> {
    fn read_timeout(&mut self, after: Option<Duration>) -> io::Result<()> {
        assert!(
            after == Some(IDLE_WAKE) || after == Some(ACK_DELAY),
            "a read timeout of {after:?}"
        );
        if self.script.acks_flow() {
            let owed = self.progress.delivered() > self.acknowledged();
            assert_eq!(
                after,
                Some(if owed { ACK_DELAY } else { IDLE_WAKE }),
                "the read timeout, with {} delivered and {} acknowledged",
                self.progress.delivered(),
                self.acknowledged()
            );
        }
        self.timeout = after;
        Ok(())
    }
}

/// What arrived at the sink: a frame's length, a hash of its body, whether it came owned, its
/// sequence number.
type Arrival = (usize, u64, bool, u64);

struct Check {
    script: Script,
    progress: Arc<Progress>,
    arrived: Vec<Arrival>,
    /// The index of the frame the sink refused, if it refused one.
    refused: Option<usize>,
}

impl Check {
    fn deliver(&mut self, header: Header, body: &[u8], owned: bool) -> Result<(), String> {
        assert!(self.refused.is_none(), "a frame after the sink refused one");
        assert!(body.len() > FIXED_BYTES, "a frame of {} bytes", body.len());
        assert_eq!(
            Header::parse(body),
            Ok(header),
            "the header is not the body's"
        );
        let seq = header.seq;
        assert_eq!(seq, u64::from_be_bytes(body[4..12].try_into().unwrap()));
        // Counted as delivered before it is given to the sink.
        assert_eq!(
            self.progress.delivered(),
            seq,
            "frame {seq} given to the sink before it was admitted"
        );
        self.arrived.push((body.len(), hash(body), owned, seq));
        let result = self.decode(header, body);
        if result.is_err() {
            self.refused = Some(self.arrived.len() - 1);
        }
        result
    }

    fn decode(&self, header: Header, body: &[u8]) -> Result<(), String> {
        let dest_len = usize::from(u16::from_be_bytes([body[2], body[3]]));
        let f = header.frame(body);
        assert_eq!(f.kind as u8, body[0]);
        assert_eq!(body[1], 0, "a frame with flags handed on");
        assert_eq!(f.dest, &body[FIXED_BYTES..FIXED_BYTES + dest_len]);
        assert_eq!(f.term, &body[FIXED_BYTES + dest_len..]);
        assert_eq!(frame::check_dest(f.kind, f.dest), Ok(()));
        assert!(!f.term.is_empty(), "a frame without a term");
        // The destination: a pid, or an atom decoded in safe mode; one that does not decode
        // is only dropped.
        if let Ok(v) = decode_value(f.dest) {
            dispose(v);
        }
        match decode_value(f.term) {
            Ok(v) => dispose(v),
            Err(e) if self.script.strict => return Err(format!("bad term: {e}")),
            Err(_) => {}
        }
        Ok(())
    }
}

impl Sink for Check {
    type Buf = Vec<u8>;

    fn alloc(&mut self, len: usize) -> Option<Vec<u8>> {
        assert!(
            (OWNED_FRAME_MIN..=MAX_FRAME).contains(&len),
            "a buffer of {len} bytes asked for"
        );
        (!self.script.fail_alloc).then(|| vec![0; len])
    }

    fn frame(&mut self, header: Header, body: &[u8]) -> Result<(), String> {
        assert!(body.len() < OWNED_FRAME_MIN, "a large frame given in place");
        self.deliver(header, body, false)
    }

    fn frame_owned(&mut self, header: Header, body: Vec<u8>) -> Result<(), String> {
        assert!(body.len() >= OWNED_FRAME_MIN, "a small frame given owned");
        self.deliver(header, &body, true)
    }
}

/// What the header of a `len`-byte body whose first bytes are `head` (at least the fixed
/// part and two bytes of destination, or all of the body) says is wrong with it, from the
/// rules of `frame.rs`'s documentation.
fn header_error(head: &[u8], len: usize) -> Option<FrameError> {
    let kind = match head[0] {
        1 => Kind::ToPid,
        2 => Kind::ToName,
        k => return Some(FrameError::BadKind(k)),
    };
    if head[1] != 0 {
        return Some(FrameError::BadFlags(head[1]));
    }
    let dest_len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    if dest_len >= len - FIXED_BYTES {
        return Some(FrameError::Truncated);
    }
    // Its kind shows in its first two bytes: the version and the outer tag.
    let dest = &head[FIXED_BYTES..FIXED_BYTES + dest_len.min(2)];
    frame::check_dest(kind, dest).err()
}

/// FNV-1a, continued from `h` over `bytes`.
fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

fn hash(bytes: &[u8]) -> u64 {
    fnv(FNV_START, bytes)
}

/// How a reading ends, comparably.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Clean,
    Eof,
    BadLength(usize),
    NoMemory(usize),
    Gap { expected: u64, got: u64 },
    Header(FrameError),
    Sink,
}

/// A frame the model read: what would arrive of it, whether it does, and whether the lane
/// counts it delivered.
struct Read1 {
    arrival: Arrival,
    delivered: bool,
    admitted: bool,
}

/// The frames of the first `total` bytes of the stream, read in one go, and how the reading
/// ends (ignoring the sink's verdicts), for a lane that delivered `start` frames before.
fn model(stream: &Stream<'_>, total: usize, script: &Script) -> (Vec<Read1>, End) {
    let mut frames = Vec::new();
    let mut delivered = script.start;
    let mut pos = 0;
    let mut prefix = [0u8; LEN_BYTES];
    loop {
        let left = total - pos;
        if left == 0 {
            return (frames, End::Clean);
        }
        if left < LEN_BYTES {
            return (frames, End::Eof);
        }
        stream.copy(pos, &mut prefix);
        let len = match frame::check_len(prefix, MAX_FRAME) {
            Ok(len) => len,
            Err(FrameError::BadLength(n)) => return (frames, End::BadLength(n)),
            Err(e) => panic!("check_len failed with {e:?}"),
        };
        assert!(
            len > FIXED_BYTES,
            "check_len let a {len}-byte frame through"
        );
        let owned = len >= OWNED_FRAME_MIN;
        if owned && script.fail_alloc {
            return (frames, End::NoMemory(len));
        }
        if left - LEN_BYTES < len {
            return (frames, End::Eof);
        }
        let body_at = pos + LEN_BYTES;
        let mut head = [0u8; FIXED_BYTES + 2];
        let head = &mut head[..len.min(FIXED_BYTES + 2)];
        stream.copy(body_at, head);
        let seq = u64::from_be_bytes(head[4..12].try_into().unwrap());
        // Hashed piece by piece: the model allocates no frame buffer of its own.
        let (mut h, mut chunk) = (FNV_START, [0u8; 4096]);
        let mut at = body_at;
        while at < body_at + len {
            let n = chunk.len().min(body_at + len - at);
            stream.copy(at, &mut chunk[..n]);
            h = fnv(h, &chunk[..n]);
            at += n;
        }
        let arrival = (len, h, owned, seq);
        // The frame is read (and counted) whatever its number says.
        if seq <= delivered {
            frames.push(Read1 {
                arrival,
                delivered: false,
                admitted: false,
            });
        } else if seq == delivered + 1 {
            delivered = seq;
            // Its number counts before its header is looked at: a malformed one ends the
            // reading, delivered as far as the lane knows, but not arriving.
            if let Some(e) = header_error(head, len) {
                frames.push(Read1 {
                    arrival,
                    delivered: false,
                    admitted: true,
                });
                return (frames, End::Header(e));
            }
            frames.push(Read1 {
                arrival,
                delivered: true,
                admitted: true,
            });
        } else {
            frames.push(Read1 {
                arrival,
                delivered: false,
                admitted: false,
            });
            let expected = delivered + 1;
            return (frames, End::Gap { expected, got: seq });
        }
        pos = body_at + len;
    }
}

fn check(data: &[u8]) {
    let Some((stream, script)) = Stream::parse(data) else {
        return;
    };
    // The lane, as an earlier connection left it: frames 1..=start delivered.
    let lanes = Lanes::default();
    let progress = lanes.progress(b"a@host", 0, 1);
    for seq in 1..=script.start {
        assert_eq!(progress.admit(seq), Ok(Admit::Next));
    }
    assert_eq!(progress.delivered(), script.start);

    let mut sink = Check {
        script,
        progress: progress.clone(),
        arrived: Vec::new(),
        refused: None,
    };
    let stats = PeerStats::default();
    let conn = ConnStats::default();
    let stop = AtomicBool::new(script.stop_at == Some(0));
    let mut socket = Socket {
        stream,
        pos: 0,
        script,
        turn: 0,
        hiccup: false,
        timeout: None,
        stop: &stop,
        progress: &progress,
        acks: AckReader::default(),
        writes: 0,
        written: 0,
        last_ack: None,
    };
    let counters = Counters {
        peer: &stats,
        conn: &conn,
        stop: &stop,
    };
    let result = read_frames(&mut socket, MAX_FRAME, &mut sink, &progress, &counters);
    let end = match &result {
        Ok(()) => End::Clean,
        Err(ReadError::Io(e)) => {
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
            End::Eof
        }
        Err(ReadError::Frame(FrameError::BadLength(n))) => End::BadLength(*n),
        Err(ReadError::Frame(FrameError::Gap { expected, got })) => End::Gap {
            expected: *expected,
            got: *got,
        },
        Err(ReadError::Frame(e)) => End::Header(e.clone()),
        Err(ReadError::NoMemory(n)) => End::NoMemory(*n),
        Err(ReadError::Sink(_)) => End::Sink,
    };
    assert_eq!(
        end == End::Sink,
        sink.refused.is_some(),
        "the sink's refusal and the reader's end disagree: {end:?}"
    );

    // Once the listener closed, the reader read nothing more: the stream ended there, and
    // that is a clean end whatever frame it was in.
    let stopped = stop.load(Ordering::Relaxed);
    let total = if stopped { socket.pos } else { stream.len() };
    let (mut expected, expected_end) = model(&stream, total, &script);
    let expected_end = match expected_end {
        End::Eof if stopped => End::Clean,
        other => other,
    };
    let expected_end = match sink.refused {
        Some(i) => {
            // The frame refused is the i-th that arrived; nothing is read after it.
            let at = expected
                .iter()
                .enumerate()
                .filter(|(_, f)| f.delivered)
                .nth(i)
                .map(|(at, _)| at)
                .expect("the sink refused a frame that the model does not deliver");
            expected.truncate(at + 1);
            End::Sink
        }
        None => expected_end,
    };
    assert_eq!(
        end, expected_end,
        "the reader ends otherwise than the model"
    );
    let arrivals = expected.iter().filter(|f| f.delivered).map(|f| f.arrival);
    assert!(
        sink.arrived.iter().copied().eq(arrivals),
        "{} frames arrived, the model has {}",
        sink.arrived.len(),
        expected.iter().filter(|f| f.delivered).count()
    );

    // Every frame read is counted, delivered or not.
    let snap = stats.snapshot();
    let bytes: usize = expected.iter().map(|f| f.arrival.0 + LEN_BYTES).sum();
    assert_eq!(snap.msgs_in, expected.len() as u64);
    assert_eq!(snap.bytes_in, bytes as u64);
    assert_eq!(conn.get(), (snap.msgs_in, snap.bytes_in));

    // The lane moved by what it admitted: what arrived, the lane's next ones, in order (and
    // a malformed frame after them).
    let admitted = expected.iter().filter(|f| f.admitted).count() as u64;
    let delivered = script.start + admitted;
    assert_eq!(progress.delivered(), delivered);
    assert!(
        (sink.arrived.iter().enumerate()).all(|(i, a)| a.3 == script.start + 1 + i as u64),
        "the frames that arrived are not the lane's next ones"
    );

    // Acknowledged: the last ack is all that arrived, once the writes go through.
    if script.acks_flow() {
        assert_eq!(socket.written % ACK_LEN, 0, "an ack cut short");
        if stopped {
            // A closing listener says LAST, with what the lane delivered, whatever it was.
            assert!(socket.acks.is_last(), "no LAST from a closing listener");
            assert_eq!(socket.last_ack.unwrap_or(script.start), delivered);
        } else if admitted == 0 {
            assert_eq!(socket.written, 0, "acks with nothing delivered");
        } else {
            assert_eq!(
                socket.last_ack,
                Some(delivered),
                "the last ack is not what the lane delivered"
            );
        }
    }
}
