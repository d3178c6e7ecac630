//! `pump`: one incoming connection's frames, read as they come and handed to a [`Sink`],
//! each once and in lane order, acknowledged as they go (see [`crate::acks`]).
//!
//! A [`Pump`] never waits: [`Pump::pump`] reads what the socket has, delivers every frame
//! that is whole, keeps the rest (a partial small frame in its buffer, a partial large one in
//! the buffer it will be handed over in) and returns when the socket is drained or its budget
//! is spent. So one thread drives the pumps of many connections (see [`crate::poller`]), and
//! a connection costs no thread, and no wake-up while it is idle.
//!
//! [`read_frames`] drives one pump on a blocking [`Wire`] to its end: the tests and the fuzz
//! target read streams through it, with the same parsing, admission and acks.
//!
//! Frame lengths are checked against `max_frame_bytes` before any buffer is allocated, and a
//! malformed frame ends the connection (its number counted first, see `admit`).

use crate::acks::{AckOut, Acker, ACK_DELAY};
use crate::frame::{self, FrameError, Header, LEN_BYTES};
use crate::lanes::{Admit, Progress};
use crate::stats::{ConnStats, PeerStats};
use socket2::Socket;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Size of a pump's buffer: small frames are parsed in place, many per `read`. Its pages are
/// touched only as far as reads fill it.
const READ_BUF: usize = 256 * 1024;

/// Frames at least this long are read into a buffer of their own (see [`Sink::alloc`]).
pub const OWNED_FRAME_MIN: usize = 64 * 1024;

/// The most one read takes after a large frame: the next frame's header, and not much of a
/// large body (which would be copied from the pump's buffer into the frame's own).
const AFTER_LARGE_READ: usize = 4 * 1024;

/// [`read_frames`] with nothing to acknowledge still wakes this often from a read that
/// waits, to see whether its listener is closing.
pub const IDLE_WAKE: Duration = Duration::from_secs(1);

/// Where one incoming connection's frames go: each once, in lane order, its header parsed
/// and checked (a malformed frame never reaches the sink).
///
/// It is called from a thread that serves many connections: it must not block.
pub trait Sink {
    /// A buffer for one large frame (the NIF allocates a VM binary, so the frame can be
    /// decoded without a copy).
    type Buf: AsMut<[u8]> + Send;
    /// A buffer of exactly `len` bytes, or `None` if it cannot be had.
    fn alloc(&mut self, len: usize) -> Option<Self::Buf>;
    /// A frame: its header, and its body, valid for this call only. An error closes the
    /// connection.
    fn frame(&mut self, header: Header, body: &[u8]) -> Result<(), String>;
    /// A frame read into a buffer from [`Sink::alloc`]: its header, and the buffer, which
    /// holds its body. An error closes the connection.
    fn frame_owned(&mut self, header: Header, body: Self::Buf) -> Result<(), String>;
}

impl<S: Sink> Sink for &mut S {
    type Buf = S::Buf;
    fn alloc(&mut self, len: usize) -> Option<Self::Buf> {
        (**self).alloc(len)
    }
    fn frame(&mut self, header: Header, body: &[u8]) -> Result<(), String> {
        (**self).frame(header, body)
    }
    fn frame_owned(&mut self, header: Header, body: Self::Buf) -> Result<(), String> {
        (**self).frame_owned(header, body)
    }
}

/// Why a pump stopped, beyond a clean end of stream.
#[derive(Debug)]
pub enum ReadError {
    /// The socket failed.
    Io(io::Error),
    /// The peer sent a frame that is not one.
    Frame(FrameError),
    /// The sink refused a frame.
    Sink(String),
    /// A buffer for a large frame could not be had.
    NoMemory(usize),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "socket error: {e}"),
            ReadError::Frame(e) => write!(f, "malformed frame: {e}"),
            ReadError::Sink(e) => write!(f, "undeliverable frame: {e}"),
            ReadError::NoMemory(n) => write!(f, "no memory for a frame of {n} bytes"),
        }
    }
}

/// The connection a pump reads frames from and writes its acks to. A read with nothing to
/// read fails with `WouldBlock` (or `TimedOut`), at once on a non-blocking socket, after the
/// timeout on a blocking one.
pub trait Wire: Read + AckOut {
    /// From now on a read with nothing to read for `after` fails with `WouldBlock` (or
    /// `TimedOut`); `None`: it waits as long as it takes. (Only [`read_frames`] sets it.)
    fn read_timeout(&mut self, after: Option<Duration>) -> io::Result<()>;
}

/// An accepted socket as a [`Wire`].
#[derive(Debug)]
pub struct SocketWire<'a> {
    sock: &'a Socket,
    timeout: Option<Duration>,
}

impl<'a> SocketWire<'a> {
    /// `sock`, with no read timeout set.
    pub fn new(sock: &'a Socket) -> Self {
        SocketWire {
            sock,
            timeout: None,
        }
    }
}

impl Read for SocketWire<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self.sock).read(buf)
    }
}

impl AckOut for SocketWire<'_> {
    fn try_write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        match self.sock.send_with_flags(bytes, flags) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(0)
            }
            other => other,
        }
    }
}

impl Wire for SocketWire<'_> {
    fn read_timeout(&mut self, after: Option<Duration>) -> io::Result<()> {
        if self.timeout != after {
            self.sock.set_read_timeout(after)?;
            self.timeout = after;
        }
        Ok(())
    }
}

/// Where a pump counts what it reads, and what tells it to stop.
#[derive(Debug, Clone, Copy)]
pub struct Counters<'a> {
    /// The peer's counters.
    pub peer: &'a PeerStats,
    /// The connection's.
    pub conn: &'a ConnStats,
    /// Set when the listener closes: the pump delivers and reads nothing more.
    pub stop: &'a AtomicBool,
}

/// How a call to [`Pump::pump`] ended, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pumped {
    /// The socket has nothing more now.
    Drained,
    /// The budget is spent; the socket may have more.
    Yielded,
    /// The peer closed the connection between two frames, or the listener is closing.
    Ended,
    /// The next frame is longer than this call may read (its `large_max`): call again with
    /// a larger one, where long work may run (the NIF's dirty scheduler).
    Large,
}

/// A large frame being read into the buffer it is handed over in.
struct Large<B> {
    buf: B,
    /// The frame's length (the buffer's).
    len: usize,
    filled: usize,
}

/// One connection's reading state: what it has read of the frame it is in, what its lane
/// delivered, what it owes in acks.
pub struct Pump<S: Sink> {
    sink: S,
    progress: Arc<Progress>,
    max_frame_bytes: usize,
    acker: Acker,
    /// `buf[start..end]`: read and not yet handed over (the start of one small frame, at most,
    /// between calls). Allocated at the first read.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    large: Option<Large<S::Buf>>,
    /// Whether the last frame was a large one: large frames tend to follow each other, and
    /// the next read then takes only a little, so that the next large frame's body is read
    /// into its own buffer rather than into this one and copied over.
    after_large: bool,
}

impl<S: Sink> Pump<S> {
    /// A pump handing frames of the lane whose progress is `progress` to `sink`; longer
    /// frames than `max_frame_bytes` end the connection.
    pub fn new(sink: S, progress: Arc<Progress>, max_frame_bytes: usize) -> Self {
        Pump {
            sink,
            progress,
            max_frame_bytes,
            acker: Acker::new(),
            buf: Vec::new(),
            start: 0,
            end: 0,
            large: None,
            after_large: false,
        }
    }

    /// Reads from `wire` until it has nothing more (`Drained`), `budget` bytes are read
    /// (`Yielded`), the stream ends between frames or `stop` is set (`Ended`), or the next
    /// frame is longer than `large_max` (`Large`: it is neither read nor delivered by this
    /// call), delivering every whole frame as it is read. A stream that ends inside a frame
    /// is an error.
    pub fn pump<W: Wire>(
        &mut self,
        wire: &mut W,
        budget: usize,
        large_max: usize,
        counters: &Counters<'_>,
    ) -> Result<Pumped, ReadError> {
        let mut spent = 0;
        if self.large.is_none() && !counters.stop.load(Ordering::SeqCst) {
            // A frame an earlier call left for a larger `large_max` may fill the buffer:
            // handed over (or moved to its own) before anything is read behind it.
            self.deliver_buffered(wire, large_max, counters)?;
        }
        loop {
            if counters.stop.load(Ordering::SeqCst) {
                return Ok(Pumped::Ended);
            }
            if self.next_len().is_some_and(|len| len > large_max) {
                return Ok(Pumped::Large);
            }
            if let Some(large) = &mut self.large {
                let dst = &mut large.buf.as_mut()[large.filled..];
                match read_some(wire, dst, counters.stop)? {
                    Got::Nothing => return Ok(Pumped::Drained),
                    Got::Stopped => return Ok(Pumped::Ended),
                    Got::Bytes(0) => {
                        return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()))
                    }
                    Got::Bytes(n) => {
                        large.filled += n;
                        spent += n;
                    }
                }
                if large.filled == large.buf.as_mut().len() {
                    let Large { buf, .. } = self.large.take().expect("a large frame");
                    self.deliver_owned(wire, buf, counters)?;
                }
            } else {
                if self.buf.is_empty() {
                    self.buf = vec![0; READ_BUF];
                }
                // Keep the partial frame at the front, then read more behind it.
                if self.start == self.end {
                    (self.start, self.end) = (0, 0);
                } else if self.start > 0 {
                    self.buf.copy_within(self.start..self.end, 0);
                    (self.end, self.start) = (self.end - self.start, 0);
                }
                // No more than the budget has left (at least a header's worth): every whole
                // frame read is decoded in this call, and a full buffer of small frames
                // (thousands) held a normal scheduler for 6-10 ms.
                let room = if self.after_large {
                    AFTER_LARGE_READ
                } else {
                    READ_BUF.min(budget.saturating_sub(spent).max(AFTER_LARGE_READ))
                };
                let dst = &mut self.buf[self.end..(self.end + room).min(READ_BUF)];
                match read_some(wire, dst, counters.stop)? {
                    Got::Nothing => return Ok(Pumped::Drained),
                    Got::Stopped => return Ok(Pumped::Ended),
                    Got::Bytes(0) if self.end == 0 => return Ok(Pumped::Ended),
                    Got::Bytes(0) => {
                        return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()))
                    }
                    Got::Bytes(n) => {
                        self.end += n;
                        spent += n;
                    }
                }
                self.deliver_buffered(wire, large_max, counters)?;
            }
            if spent >= budget {
                return Ok(Pumped::Yielded);
            }
        }
    }

    /// Hands over every whole frame in `buf[start..end]`, up to one longer than `large_max`;
    /// a large frame's start moves to a buffer of its own, and the rest of it is read there.
    fn deliver_buffered<W: Wire>(
        &mut self,
        wire: &mut W,
        large_max: usize,
        counters: &Counters<'_>,
    ) -> Result<(), ReadError> {
        while self.end - self.start >= LEN_BYTES {
            let at = self.start;
            let prefix = self.buf[at..at + LEN_BYTES].try_into().unwrap();
            let len = frame::check_len(prefix, self.max_frame_bytes).map_err(ReadError::Frame)?;
            let body_at = at + LEN_BYTES;
            let have = (self.end - body_at).min(len);
            if len > large_max {
                break;
            }
            if len >= OWNED_FRAME_MIN {
                let mut owned = self.sink.alloc(len).ok_or(ReadError::NoMemory(len))?;
                owned.as_mut()[..have].copy_from_slice(&self.buf[body_at..body_at + have]);
                self.start = body_at + have;
                if have < len {
                    self.large = Some(Large {
                        buf: owned,
                        len,
                        filled: have,
                    });
                    return Ok(());
                }
                self.deliver_owned(wire, owned, counters)?;
                continue;
            }
            if have < len {
                break;
            }
            count(counters, len);
            self.start = body_at + len;
            let body = &self.buf[body_at..body_at + len];
            // Its number counts before its header is looked at: a malformed frame closes the
            // connection, and the sender's resend of it is then dropped as delivered rather
            // than closing every connection of the lane in turn.
            if admit(
                &self.progress,
                &mut self.acker,
                wire,
                counters,
                frame::seq(body),
                len,
            )? {
                let header = Header::parse(body).map_err(ReadError::Frame)?;
                self.sink.frame(header, body).map_err(ReadError::Sink)?;
            }
            self.after_large = false;
        }
        Ok(())
    }

    /// The length of the frame being read, or of the next one if its length is read already.
    pub fn next_len(&self) -> Option<usize> {
        if let Some(large) = &self.large {
            return Some(large.len);
        }
        if self.end - self.start < LEN_BYTES {
            return None;
        }
        let prefix = self.buf[self.start..self.start + LEN_BYTES]
            .try_into()
            .ok()?;
        // A bad length is not large: the next read finds it bad.
        frame::check_len(prefix, self.max_frame_bytes).ok()
    }

    /// The sink, to tell it where it runs now.
    pub fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }

    fn deliver_owned<W: Wire>(
        &mut self,
        wire: &mut W,
        mut owned: S::Buf,
        counters: &Counters<'_>,
    ) -> Result<(), ReadError> {
        let len = owned.as_mut().len();
        count(counters, len);
        self.after_large = true;
        let seq = frame::seq(owned.as_mut());
        if admit(&self.progress, &mut self.acker, wire, counters, seq, len)? {
            let header = Header::parse(owned.as_mut()).map_err(ReadError::Frame)?;
            self.sink
                .frame_owned(header, owned)
                .map_err(ReadError::Sink)?;
        }
        Ok(())
    }

    /// Whether an ack is owed or only partly out.
    pub fn owes_ack(&self) -> bool {
        self.acker.owed()
    }

    /// When the ack owed is due by its delay (see [`Acker::due_at`]); `None` if none is.
    pub fn ack_due(&self) -> Option<Instant> {
        self.acker.due_at()
    }

    /// Sends the ack owed if it is due at `now` (see [`crate::acks`]), or `force`d, without
    /// blocking. Only a socket error is an error.
    pub fn ack<W: AckOut>(&mut self, wire: &mut W, now: Instant, force: bool) -> io::Result<()> {
        if self.acker.owed() && (force || self.acker.due(now)) {
            self.acker.flush(wire, self.progress.delivered())?;
        }
        Ok(())
    }

    /// Says LAST with what the lane delivered: this connection delivers no more. Returns
    /// whether all of it is out; if not (a full socket), call it again.
    pub fn last<W: AckOut>(&mut self, wire: &mut W) -> io::Result<bool> {
        self.acker.finish(wire, self.progress.delivered())
    }
}

/// Counts a frame of `len` bytes read, header included.
fn count(counters: &Counters<'_>, len: usize) {
    counters.peer.received(len + LEN_BYTES);
    counters.conn.add(1, (len + LEN_BYTES) as u64);
}

/// Whether frame `seq` (of `len` bytes) is to be delivered: the lane's next one is; one it
/// delivered already is not, nor any once the listener is closing; a gap ends the
/// connection. Acks when one is due. (A function of the fields it needs, not a method: the
/// body it reads is borrowed from the pump's buffer meanwhile.)
fn admit<W: AckOut>(
    progress: &Progress,
    acker: &mut Acker,
    wire: &mut W,
    counters: &Counters<'_>,
    seq: u64,
    len: usize,
) -> Result<bool, ReadError> {
    if counters.stop.load(Ordering::SeqCst) {
        return Ok(false);
    }
    let next = progress.admit(seq).map_err(ReadError::Frame)? == Admit::Next;
    if next {
        let now = Instant::now();
        acker.delivered(len, now);
        if acker.due(now) {
            // A socket that fails here fails the next read too: the frame just admitted must
            // still be delivered first, so the error waits.
            let _ = acker.flush(wire, progress.delivered());
        }
    }
    Ok(next)
}

/// What one read got.
enum Got {
    /// So many bytes (0: the end of the stream).
    Bytes(usize),
    /// Nothing now.
    Nothing,
    /// Nothing, and the listener is closing (a read interrupted by it, say).
    Stopped,
}

/// One read. An interrupted read is tried again, unless the listener is closing.
fn read_some<W: Wire>(wire: &mut W, dst: &mut [u8], stop: &AtomicBool) -> Result<Got, ReadError> {
    loop {
        match wire.read(dst) {
            Ok(n) => return Ok(Got::Bytes(n)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Got::Nothing)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                if stop.load(Ordering::SeqCst) {
                    return Ok(Got::Stopped);
                }
            }
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

/// Drives a pump on a blocking `wire` until the stream ends cleanly (`Ok`: the peer closed
/// it, or `stop` was set) or fails, acknowledging (a last time as it ends, if it can; LAST if
/// `stop` was set). Each read waits at most [`ACK_DELAY`] while an ack is owed, so that it
/// goes out, and [`IDLE_WAKE`] otherwise, to look at `stop`.
pub fn read_frames<W: Wire, S: Sink>(
    wire: &mut W,
    max_frame_bytes: usize,
    sink: &mut S,
    progress: &Arc<Progress>,
    counters: &Counters<'_>,
) -> Result<(), ReadError> {
    let mut pump = Pump::new(sink, progress.clone(), max_frame_bytes);
    let result = loop {
        let timer = if pump.owes_ack() {
            ACK_DELAY
        } else {
            IDLE_WAKE
        };
        if let Err(e) = wire.read_timeout(Some(timer)) {
            break Err(ReadError::Io(e));
        }
        // A budget of one byte: one read per call, so that the timeout fits each read.
        match pump.pump(wire, 1, usize::MAX, counters) {
            Ok(Pumped::Drained) => {
                let _ = pump.ack(wire, Instant::now(), true);
            }
            // No frame is too large for this pump.
            Ok(Pumped::Yielded | Pumped::Large) => {}
            Ok(Pumped::Ended) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    if counters.stop.load(Ordering::SeqCst) {
        // The listener is closing: what stopped the reading is no fault of the connection.
        // The sender reads its acks at least every ACK_DELAY or so: try for a moment.
        for _ in 0..100 {
            match pump.last(wire) {
                Ok(false) => std::thread::sleep(Duration::from_millis(2)),
                Ok(true) | Err(_) => break,
            }
        }
        return Ok(());
    }
    // Best effort: the connection may be gone already.
    let _ = pump.ack(wire, Instant::now(), true);
    result
}
