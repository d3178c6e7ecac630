//! `frame_stream`: arbitrary bytes as the TCP stream of an authenticated connection, through
//! `teleport_core::listener::read_frames`, cut into reads at points the input chooses, with a
//! sink that parses every frame with `frame::parse` and decodes its destination and its term
//! with `value::decode_value`.
//!
//! The input is a 20-byte header, then the stream:
//!
//! ```text
//! 0       mode: bits 0-2 how many read sizes follow (0: every read fills the buffer),
//!         bit 3 the sink's `alloc` fails (NoMemory), bit 4 strict: a term that does not
//!         decode closes the connection as in the NIF (otherwise the reader goes on)
//! 1..15   7 read sizes, u16 big-endian, used in turn; 0 is an `Interrupted` error
//! 15..17  pad_at: u16, where padding goes in the stream (clamped to its length)
//! 17..19  pad_len: u16, padding length in units of 16 bytes (up to about 1 MB)
//! 19      fill: the padding byte
//! 20..    the stream
//! ```
//!
//! The padding lets a few kilobytes of input describe a frame of up to `MAX_FRAME` bytes, so the
//! large-frame path (`OWNED_FRAME_MIN` and up: `Sink::alloc`, `frame_owned`) is reached, e.g.
//! `BINARY_EXT` with a length of 100,000 followed by 100,000 bytes of padding.
//!
//! Checks, for every input:
//! - no panic, no hang; the live heap grows by at most `MAX_FRAME` (the one large-frame buffer)
//!   + 256 KiB (the reader's buffer) + 1 MiB + 512 bytes per stream byte (the decoded values);
//! - `alloc` is asked only for `OWNED_FRAME_MIN..=MAX_FRAME` bytes, small frames arrive through
//!   `frame` and large ones through `frame_owned`;
//! - however the stream is cut, the frames that arrive and the way the reader stops are those
//!   of a plain reading of the whole stream (a model): the same bodies, in order, then a clean
//!   end, `UnexpectedEof`, `BadLength(n)`, `NoMemory(n)` or the sink's own error;
//! - the peer's and the connection's counters say as many messages and bytes as arrived;
//! - a parsed frame's destination and term are the body after its header, split where the
//!   header says, and the term is not empty.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::{self, Read};
use teleport_core::frame::{self, FrameError, FIXED_BYTES, LEN_BYTES};
use teleport_core::listener::{read_frames, ReadError, Sink, OWNED_FRAME_MIN};
use teleport_core::stats::{ConnStats, PeerStats};
use teleport_core::value::decode_value;
use teleport_fuzz::{dispose, run_check_with_budget, BUDGET_BASE, BUDGET_PER_INPUT_BYTE};

/// The receiver's `max_frame_bytes`.
const MAX_FRAME: usize = 1 << 20;
/// The reader's own buffer (`READ_BUF` in listener.rs).
const READER_BUFFER: usize = 256 * 1024;
const HEADER: usize = 20;
const CUTS: usize = 7;

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
        let script = Script {
            cuts,
            ncuts: usize::from(head[0] & 7),
            fail_alloc: head[0] & 8 != 0,
            strict: head[0] & 16 != 0,
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
}

/// The stream as a socket: each read returns at most the next size of the script.
struct Socket<'a> {
    stream: Stream<'a>,
    pos: usize,
    script: Script,
    turn: usize,
    interrupted: bool,
}

impl Read for Socket<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let mut limit = usize::MAX;
        if self.script.ncuts > 0 {
            limit = self.script.cuts[self.turn % self.script.ncuts];
            self.turn += 1;
            // An interruption is always followed by progress, so a script of zeros ends.
            if limit == 0 && !self.interrupted && !out.is_empty() {
                self.interrupted = true;
                return Err(io::ErrorKind::Interrupted.into());
            }
        }
        self.interrupted = false;
        let n = out
            .len()
            .min(limit.max(1))
            .min(self.stream.len() - self.pos);
        self.stream.copy(self.pos, &mut out[..n]);
        self.pos += n;
        Ok(n)
    }
}

/// What arrived at the sink: a frame's length, a hash of its body, whether it came owned.
type Arrival = (usize, u64, bool);

struct Check {
    script: Script,
    arrived: Vec<Arrival>,
    /// The index of the frame the sink refused, if it refused one.
    refused: Option<usize>,
}

impl Check {
    fn deliver(&mut self, body: &[u8], owned: bool) -> Result<(), String> {
        assert!(self.refused.is_none(), "a frame after the sink refused one");
        self.arrived.push((body.len(), hash(body), owned));
        let result = self.parse(body);
        if result.is_err() {
            self.refused = Some(self.arrived.len() - 1);
        }
        result
    }

    fn parse(&self, body: &[u8]) -> Result<(), String> {
        let f = frame::parse(body).map_err(|e| e.to_string())?;
        let dest_len = usize::from(u16::from_be_bytes([body[2], body[3]]));
        assert_eq!(f.flags, body[1]);
        assert_eq!(f.kind as u8, body[0]);
        assert_eq!(f.dest, &body[FIXED_BYTES..FIXED_BYTES + dest_len]);
        assert_eq!(f.term, &body[FIXED_BYTES + dest_len..]);
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

    fn frame(&mut self, body: &[u8]) -> Result<(), String> {
        assert!(body.len() < OWNED_FRAME_MIN, "a large frame given in place");
        self.deliver(body, false)
    }

    fn frame_owned(&mut self, body: Vec<u8>) -> Result<(), String> {
        assert!(body.len() >= OWNED_FRAME_MIN, "a small frame given owned");
        self.deliver(&body, true)
    }
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
    Sink,
}

/// The frames of the whole stream, read in one go, and how the reading ends (ignoring the
/// sink's verdicts).
fn model(stream: &Stream<'_>, script: &Script) -> (Vec<Arrival>, End) {
    let mut frames = Vec::new();
    let total = stream.len();
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
        let owned = len >= OWNED_FRAME_MIN;
        if owned && script.fail_alloc {
            return (frames, End::NoMemory(len));
        }
        if left - LEN_BYTES < len {
            return (frames, End::Eof);
        }
        // Hashed piece by piece: the model allocates no frame buffer of its own.
        let (mut h, mut chunk) = (FNV_START, [0u8; 4096]);
        let mut at = pos + LEN_BYTES;
        while at < pos + LEN_BYTES + len {
            let n = chunk.len().min(pos + LEN_BYTES + len - at);
            stream.copy(at, &mut chunk[..n]);
            h = fnv(h, &chunk[..n]);
            at += n;
        }
        frames.push((len, h, owned));
        pos += LEN_BYTES + len;
    }
}

fn check(data: &[u8]) {
    let Some((stream, script)) = Stream::parse(data) else {
        return;
    };
    let mut sink = Check {
        script,
        arrived: Vec::new(),
        refused: None,
    };
    let stats = PeerStats::default();
    let counters = ConnStats::default();
    let socket = Socket {
        stream,
        pos: 0,
        script,
        turn: 0,
        interrupted: false,
    };
    let result = read_frames(socket, MAX_FRAME, &mut sink, &stats, &counters);
    let end = match &result {
        Ok(()) => End::Clean,
        Err(ReadError::Io(e)) => {
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
            End::Eof
        }
        Err(ReadError::Frame(FrameError::BadLength(n))) => End::BadLength(*n),
        Err(ReadError::Frame(e)) => panic!("the reader refused a frame itself: {e:?}"),
        Err(ReadError::NoMemory(n)) => End::NoMemory(*n),
        Err(ReadError::Sink(_)) => End::Sink,
    };
    assert_eq!(
        end == End::Sink,
        sink.refused.is_some(),
        "the sink's refusal and the reader's end disagree: {end:?}"
    );

    let (mut expected, expected_end) = model(&stream, &script);
    let expected_end = match sink.refused {
        Some(i) => {
            expected.truncate(i + 1);
            End::Sink
        }
        None => expected_end,
    };
    assert_eq!(
        end, expected_end,
        "the reader ends otherwise than the model"
    );
    assert!(
        sink.arrived == expected,
        "{} frames arrived, the model has {}",
        sink.arrived.len(),
        expected.len()
    );

    let snap = stats.snapshot();
    let bytes: usize = sink.arrived.iter().map(|(len, _, _)| len + LEN_BYTES).sum();
    assert_eq!(snap.msgs_in, sink.arrived.len() as u64);
    assert_eq!(snap.bytes_in, bytes as u64);
    assert_eq!(counters.get(), (snap.msgs_in, snap.bytes_in));
}
