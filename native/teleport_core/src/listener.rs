//! The receiving side: a listening socket, one thread that accepts, and one reader thread per
//! incoming connection that authenticates the peer and then hands every frame to a [`Sink`],
//! once, in lane order, acknowledging them as it goes (see [`crate::acks`]).
//!
//! Nothing a peer sends before the handshake succeeds reaches the sink. Frame lengths are
//! checked against `max_frame_bytes` before any buffer is allocated, and a malformed frame
//! closes the connection it came on (logged once), nothing else.

use crate::acks::{AckOut, Acker, ACK_DELAY};
use crate::conn::handshake_io;
use crate::deadline::Deadline;
use crate::frame::{self, FrameError, Header, LEN_BYTES};
use crate::handshake::{self, Welcome};
use crate::lanes::{Admit, Lanes, Progress, Waited};
use crate::sockopts::{self, SocketOpts};
use crate::stats::{unix_millis, ConnStats, PeerStats};
use parking_lot::Mutex;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Size of a reader's buffer: small frames are parsed in place, many per `read`.
const READ_BUF: usize = 256 * 1024;

/// Frames at least this long are read into a buffer of their own (see [`Sink::alloc`]).
pub const OWNED_FRAME_MIN: usize = 64 * 1024;

/// The most one read takes after a large frame: the next frame's header, and not much of a
/// large body (which would be copied from the reader's buffer into the frame's own).
const AFTER_LARGE_READ: usize = 4 * 1024;

/// At most this many connections may be in their handshake at once; more are closed at
/// once, so a flood of idle sockets cannot pin a thread each.
const MAX_HANDSHAKES: usize = 64;

/// A reader with nothing to acknowledge still wakes this often from a read that waits, to see
/// whether its listener is closing (a sender's idle writer checks its connection as often).
pub const IDLE_WAKE: Duration = Duration::from_secs(1);

/// How long a new connection waits for the reader of its lane's previous connection to
/// finish by itself before stopping it (see [`crate::lanes`]). Draining even full socket
/// buffers takes milliseconds; a reader still going after this is on a half-open connection.
const LANE_PATIENCE: Duration = Duration::from_secs(5);

/// Where one incoming connection's frames go: each once, in lane order, its header parsed
/// and checked (a malformed frame never reaches the sink).
pub trait Sink: Send + 'static {
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

/// What the listener asks of its owner.
pub trait Acceptor: Send + Sync + 'static {
    /// The per-connection sink.
    type Sink: Sink;
    /// This node's name as the handshake states it, now (a node may become distributed,
    /// and so get its name, after the listener started).
    fn me(&self) -> Vec<u8>;
    /// The cookie `peer` must prove, or `None` if `peer` may not connect.
    fn cookie_for(&self, peer: &[u8]) -> Option<Vec<u8>>;
    /// The counters for `peer`.
    fn stats(&self, peer: &[u8]) -> Arc<PeerStats>;
    /// A sink for a connection from `peer`, which just authenticated.
    fn sink(&self, peer: &[u8]) -> Self::Sink;
}

/// Limits of the receiving side.
#[derive(Debug, Clone)]
pub struct ListenConfig {
    /// Frames longer than this close their connection.
    pub max_frame_bytes: usize,
    /// Bound on the whole handshake of an incoming connection.
    pub handshake_timeout: Duration,
    /// Options set on the listening socket and on every accepted one.
    pub sock_opts: SocketOpts,
    /// How much lower than the VM's the priority of the acceptor and reader threads is (a
    /// nice value, see [`crate::threads::spawn`]).
    pub thread_nice: u8,
}

/// One incoming connection, as the listener tracks it.
struct Incoming {
    id: u64,
    sock: Socket,
    /// Where it comes from, as a string for logs (empty if unknown).
    from: String,
    peer_addr: Option<SocketAddr>,
    local_addr: Option<SocketAddr>,
    since: SystemTime,
    /// The peer's node name, once it authenticated.
    peer: Mutex<Option<Vec<u8>>>,
    counters: ConnStats,
}

/// A picture of one incoming connection, for `teleport:info/0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingInfo {
    /// The listener's number for it, in the order accepted (logs name it `id` too).
    pub id: u64,
    /// The peer's node name once it authenticated; `None` while it shakes hands.
    pub peer: Option<Vec<u8>>,
    /// The address it comes from.
    pub peer_addr: Option<SocketAddr>,
    /// This end's address.
    pub local_addr: Option<SocketAddr>,
    /// Messages read from it.
    pub msgs_in: u64,
    /// Bytes read from it, frame headers included.
    pub bytes_in: u64,
    /// When it was accepted, in milliseconds since the Unix epoch.
    pub connected_since: u64,
    /// The socket's send and receive buffer sizes as the kernel reports them.
    pub buffers: (usize, usize),
}

/// A running listener.
pub struct Listener {
    sock: Socket,
    local: SocketAddr,
    closed: AtomicBool,
    handshaking: AtomicUsize,
    /// Live incoming connections: their sockets are shut at close.
    conns: Mutex<Vec<Arc<Incoming>>>,
    next_id: std::sync::atomic::AtomicU64,
    /// Successive connections of one peer's pool slot read in turn, and what each delivered.
    lanes: Lanes,
    /// This listener, to dialers: random at each start, so that a dialer can tell a new
    /// incarnation (which knows nothing of what an earlier one delivered).
    incarnation: u64,
}

impl Listener {
    /// Binds `addr` (port 0: any free port) and starts accepting.
    ///
    /// The socket options are set on the listening socket first, so that one the kernel
    /// refuses fails here (the error wraps a [`sockopts::SockOptError`] naming it) rather than
    /// on every connection later; accepted sockets also inherit from it what the TCP
    /// handshake fixes (the window scale follows from the receive buffer).
    pub fn start<A: Acceptor>(
        addr: SocketAddr,
        cfg: ListenConfig,
        acceptor: Arc<A>,
    ) -> io::Result<Arc<Listener>> {
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        cfg.sock_opts.apply(&sock)?;
        sock.set_reuse_address(true)?;
        sock.bind(&SockAddr::from(addr))?;
        sock.listen(1024)?;
        let local = sock
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("listener has no IP address"))?;
        let listener = Arc::new(Listener {
            sock,
            local,
            closed: AtomicBool::new(false),
            handshaking: AtomicUsize::new(0),
            conns: Mutex::new(Vec::new()),
            next_id: 0.into(),
            lanes: Lanes::default(),
            incarnation: handshake::random_id()?,
        });
        let l = listener.clone();
        let cfg = Arc::new(cfg);
        crate::threads::spawn("teleport_acceptor".into(), cfg.thread_nice, move || {
            loop {
                // A listener that stopped accepting would leave the node unreachable while
                // looking alive: after a panic, log it and accept again.
                let run = std::panic::AssertUnwindSafe(|| l.accept_loop(&cfg, &acceptor));
                if std::panic::catch_unwind(run).is_ok() || l.closed.load(Ordering::SeqCst) {
                    return;
                }
                tracing::error!(addr = %l.local, reason = "the accept loop panicked; it goes on", "acceptor_panicked");
                std::thread::sleep(Duration::from_millis(100));
            }
        })?;
        Ok(listener)
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Incoming connections now open (including those still shaking hands).
    pub fn connections(&self) -> usize {
        self.conns.lock().len()
    }

    /// Incoming connections now in their handshake.
    pub fn handshaking(&self) -> usize {
        self.handshaking.load(Ordering::Relaxed)
    }

    /// Every incoming connection now open, in the order accepted.
    pub fn incoming(&self) -> Vec<IncomingInfo> {
        let conns: Vec<Arc<Incoming>> = self.conns.lock().clone();
        conns
            .iter()
            .map(|c| {
                let (msgs_in, bytes_in) = c.counters.get();
                IncomingInfo {
                    id: c.id,
                    peer: c.peer.lock().clone(),
                    peer_addr: c.peer_addr,
                    local_addr: c.local_addr,
                    msgs_in,
                    bytes_in,
                    connected_since: unix_millis(c.since),
                    buffers: sockopts::buffer_sizes(&c.sock),
                }
            })
            .collect()
    }

    /// Resets every incoming connection at once, as a middlebox or `ss -K` would.
    #[cfg(test)]
    pub(crate) fn cut(&self) {
        for c in self.conns.lock().iter() {
            let _ = c.sock.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Forgets what `peer`'s lanes delivered (it went down: a pool it makes later is a new
    /// session anyway).
    pub fn forget(&self, peer: &[u8]) {
        self.lanes.forget(peer);
    }

    /// Stops accepting and has every incoming connection end; their threads then end.
    ///
    /// Each reader delivers no frame after it sees the listener closing (within
    /// [`IDLE_WAKE`] when idle), says LAST with what its lane delivered (see
    /// [`crate::acks`]), and ends its connection without a reset: its sender then knows
    /// exactly which frames did not arrive, and sends them wherever the peer listens next.
    /// (Shutting the sockets' reading side to wake the readers at once would make the
    /// kernel reset a connection that still receives, and a reset can overtake the LAST.)
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        // Shutting a listening socket wakes a blocked accept() with an error on Linux.
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    fn accept_loop<A: Acceptor>(self: &Arc<Self>, cfg: &Arc<ListenConfig>, acceptor: &Arc<A>) {
        loop {
            let (sock, from) = match self.sock.accept() {
                Ok(s) => s,
                Err(_) if self.closed.load(Ordering::SeqCst) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(addr = %self.local, reason = %e, "accept_failed");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let peer_addr = from.as_socket();
            let from = peer_addr.map(|a| a.to_string()).unwrap_or_default();
            if self.handshaking.fetch_add(1, Ordering::SeqCst) >= MAX_HANDSHAKES {
                self.handshaking.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!(
                    addr = %from,
                    reason = %format_args!("{MAX_HANDSHAKES} handshakes already in progress"),
                    "too_many_handshakes"
                );
                continue; // dropping `sock` closes it
            }
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            // Inherited from the listening socket mostly; set again so that every option
            // holds on every connection.
            if let Err(e) = cfg.sock_opts.apply(&sock) {
                tracing::warn!(addr = %from, id, reason = %e, "socket_opts_failed");
            }
            let conn = Arc::new(Incoming {
                id,
                local_addr: sock.local_addr().ok().and_then(|a| a.as_socket()),
                sock,
                from,
                peer_addr,
                since: SystemTime::now(),
                peer: Mutex::new(None),
                counters: ConnStats::default(),
            });
            self.conns.lock().push(conn.clone());
            if self.closed.load(Ordering::SeqCst) {
                let _ = conn.sock.shutdown(std::net::Shutdown::Both);
            }
            let (l, cfg, acceptor) = (self.clone(), cfg.clone(), acceptor.clone());
            let spawned =
                crate::threads::spawn("teleport_reader".into(), cfg.thread_nice, move || {
                    let run = std::panic::AssertUnwindSafe(|| l.serve(&conn, &cfg, &*acceptor));
                    if std::panic::catch_unwind(run).is_err() {
                        tracing::error!(
                            addr = %conn.from,
                            id = conn.id,
                            reason = "the reader thread panicked; the connection is closed",
                            "reader_panicked"
                        );
                        let _ = conn.sock.shutdown(std::net::Shutdown::Both);
                    }
                    l.conns.lock().retain(|c| c.id != id);
                });
            if let Err(e) = spawned {
                self.handshaking.fetch_sub(1, Ordering::SeqCst);
                self.conns.lock().retain(|c| c.id != id);
                tracing::warn!(id, reason = %e, "reader_spawn_failed");
            }
        }
    }

    /// One incoming connection: the dialer's proof, its turn on its lane, the OK telling it
    /// what the lane delivered, then frames until it closes.
    fn serve<A: Acceptor>(&self, conn: &Arc<Incoming>, cfg: &ListenConfig, acceptor: &A) {
        let (sock, from, id) = (&conn.sock, conn.from.as_str(), conn.id);
        // What a peer may send is what the handshake announces (a 32-bit length at most).
        let max_frame = u32::try_from(cfg.max_frame_bytes).unwrap_or(u32::MAX);
        // Counted down however the handshake ends, unwinding included: a leaked count would
        // end up refusing every connection (MAX_HANDSHAKES).
        let handshaking = OnDrop(|| {
            self.handshaking.fetch_sub(1, Ordering::SeqCst);
        });
        // One deadline for the whole handshake, the wait for the lane included: a per-read
        // timeout would let the peer trickle.
        let mut stream = Deadline::after(sock, cfg.handshake_timeout);
        let me = acceptor.me();
        let proven = match handshake::accept(&mut stream, &me, |p| acceptor.cookie_for(p)) {
            Ok(proven) => proven,
            Err(e) => {
                tracing::warn!(addr = %from, id, reason = %handshake_io(e), "handshake_failed");
                return;
            }
        };
        let (peer, lane) = (proven.dialer.name.clone(), proven.dialer.lane);
        let name = String::from_utf8_lossy(&peer).into_owned();
        // The lane is joined before the OK: the dialer learns what the lane delivered only
        // once every earlier connection of the lane is done delivering, and a newer
        // connection, whenever it comes, waits behind this one.
        let this = conn.clone();
        let mut place = self.lanes.join(&peer, lane, move || {
            let _ = this.sock.shutdown(std::net::Shutdown::Both);
        });
        let waited = place.wait_turn(LANE_PATIENCE);
        if matches!(waited, Waited::Stopped | Waited::GaveUp) {
            tracing::warn!(
                peer = %name,
                addr = %from,
                id,
                lane,
                reason = %format_args!(
                    "the lane's previous connection still had a reader after {} s: {}",
                    LANE_PATIENCE.as_secs(),
                    if waited == Waited::Stopped { "it was stopped" } else { "going ahead of it" }
                ),
                "lane_previous_stopped"
            );
        }
        let progress = self.lanes.progress(&peer, lane, proven.dialer.session);
        let welcome = Welcome {
            max_frame,
            incarnation: self.incarnation,
            delivered: progress.delivered(),
        };
        let welcomed = proven.welcome(&mut stream, &welcome).map_err(handshake_io);
        let ready = welcomed.and_then(|_| {
            sock.set_read_timeout(None)?;
            sock.set_write_timeout(None)
        });
        drop(handshaking);
        if let Err(e) = ready {
            tracing::warn!(peer = %name, addr = %from, id, reason = %e, "handshake_failed");
            return;
        }
        *conn.peer.lock() = Some(peer.clone());
        let stats = acceptor.stats(&peer);
        stats.connections_in.fetch_add(1, Ordering::Relaxed);
        let connected = OnDrop(|| {
            stats.connections_in.fetch_sub(1, Ordering::Relaxed);
        });
        tracing::info!(
            peer = %name,
            addr = %from,
            id,
            lane,
            delivered = welcome.delivered,
            "connection_accepted"
        );
        let mut sink = acceptor.sink(&peer);
        let mut wire = SocketWire::new(sock);
        let result = read_frames(
            &mut wire,
            cfg.max_frame_bytes,
            &mut sink,
            &progress,
            &Counters {
                peer: &stats,
                conn: &conn.counters,
                stop: &self.closed,
            },
        );
        if self.closed.load(Ordering::SeqCst) {
            linger(sock);
        }
        drop(place);
        drop(connected);
        let (msgs, _) = conn.counters.get();
        match result {
            Ok(()) => tracing::info!(
                peer = %name,
                addr = %from,
                id,
                reason = "closed by the peer",
                msgs,
                "connection_closed"
            ),
            Err(e) => tracing::warn!(
                peer = %name,
                addr = %from,
                id,
                reason = %e,
                msgs,
                "connection_closed"
            ),
        }
        let _ = sock.shutdown(std::net::Shutdown::Both);
    }
}

/// How long a closing listener's reader waits for its peer to see the end of the connection.
const LINGER: Duration = Duration::from_secs(2);

/// Ends a connection of a closing listener without a reset: says FIN (the LAST is out),
/// then reads and discards what the peer still sends until it closes too, or [`LINGER`]
/// passes. Closing with unread data would send an RST, and an RST can discard the LAST
/// before the peer reads it; the frames thrown away here come after the LAST, so the peer
/// sends them again wherever it connects next.
fn linger(sock: &Socket) {
    let _ = sock.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut scratch = vec![0u8; 64 * 1024];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match (&*sock).read(&mut scratch) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Runs its closure when dropped, on unwinding too.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// Why a reader stopped, beyond a clean end of stream.
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

/// The connection a reader reads frames from and writes its acks to.
pub trait Wire: Read + AckOut {
    /// From now on a read with nothing to read for `after` fails with `WouldBlock` (or
    /// `TimedOut`); `None`: it waits as long as it takes.
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

/// Where a reader counts what it reads, and what tells it to stop.
#[derive(Debug)]
pub struct Counters<'a> {
    /// The peer's counters.
    pub peer: &'a PeerStats,
    /// The connection's.
    pub conn: &'a ConnStats,
    /// Set when the listener closes: the reader stops after the frame it is reading.
    pub stop: &'a AtomicBool,
}

/// Reads frames from `wire` until it ends cleanly (`Ok`: the peer closed it, or `stop` was
/// set) or fails, delivering each frame of the lane once and in order (`progress`),
/// acknowledging them (a last time as it ends, if it can), and counting each.
pub fn read_frames<W: Wire, S: Sink>(
    wire: &mut W,
    max_frame_bytes: usize,
    sink: &mut S,
    progress: &Progress,
    counters: &Counters<'_>,
) -> Result<(), ReadError> {
    let mut r = Reader {
        wire,
        progress,
        acker: Acker::new(),
        stop: counters.stop,
    };
    let result = read_all(&mut r, max_frame_bytes, sink, counters);
    if counters.stop.load(Ordering::SeqCst) {
        // The listener is closing: what stopped the reading is no fault of the connection.
        r.last();
        return Ok(());
    }
    if r.acker.owed() {
        // Best effort: the connection may be gone already.
        r.ack();
    }
    result
}

fn read_all<W: Wire, S: Sink>(
    r: &mut Reader<'_, W>,
    max_frame_bytes: usize,
    sink: &mut S,
    counters: &Counters<'_>,
) -> Result<(), ReadError> {
    let (stats, conn) = (counters.peer, counters.conn);
    let mut buf = vec![0u8; READ_BUF];
    let (mut start, mut end) = (0usize, 0usize);
    // Whether the last frame was a large one: large frames tend to follow each other, and
    // the next read then takes only a little, so that the next large frame's body is read
    // into its own buffer rather than into this one and copied over.
    let mut after_large = false;
    loop {
        // Every complete frame in buf[start..end].
        while end - start >= LEN_BYTES {
            let prefix = buf[start..start + LEN_BYTES].try_into().unwrap();
            let len = frame::check_len(prefix, max_frame_bytes).map_err(ReadError::Frame)?;
            let body_at = start + LEN_BYTES;
            if len >= OWNED_FRAME_MIN {
                let mut owned = sink.alloc(len).ok_or(ReadError::NoMemory(len))?;
                let dst = owned.as_mut();
                let have = (end - body_at).min(len);
                dst[..have].copy_from_slice(&buf[body_at..body_at + have]);
                r.read_exact(&mut dst[have..])?;
                start = body_at + have;
                stats.received(len + LEN_BYTES);
                conn.add(1, (len + LEN_BYTES) as u64);
                if r.admit(frame::seq(owned.as_mut()), len)? {
                    let header = Header::parse(owned.as_mut()).map_err(ReadError::Frame)?;
                    sink.frame_owned(header, owned).map_err(ReadError::Sink)?;
                }
                after_large = true;
                continue;
            }
            if end - body_at < len {
                break;
            }
            stats.received(len + LEN_BYTES);
            conn.add(1, (len + LEN_BYTES) as u64);
            let body = &buf[body_at..body_at + len];
            // Its number counts before its header is looked at: a malformed frame closes the
            // connection, and the sender's resend of it is then dropped as delivered rather
            // than closing every connection of the lane in turn.
            if r.admit(frame::seq(body), len)? {
                let header = Header::parse(body).map_err(ReadError::Frame)?;
                sink.frame(header, body).map_err(ReadError::Sink)?;
            }
            after_large = false;
            start = body_at + len;
        }
        // Keep the partial frame at the front, then read more behind it.
        if start == end {
            start = 0;
            end = 0;
        } else if start > 0 {
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        let room = if after_large {
            AFTER_LARGE_READ
        } else {
            READ_BUF
        };
        match r.read(&mut buf[end..(end + room).min(READ_BUF)])? {
            0 if end == 0 => return Ok(()),
            0 => return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into())),
            n => end += n,
        }
    }
}

/// A reader's connection, its lane's progress and its ack policy.
struct Reader<'a, W: Wire> {
    wire: &'a mut W,
    progress: &'a Progress,
    acker: Acker,
    stop: &'a AtomicBool,
}

impl<W: Wire> Reader<'_, W> {
    /// Whether frame `seq` (of `len` bytes) is to be delivered: the lane's next one is; one
    /// it delivered already is not, nor any once the listener is closing; a gap closes the
    /// connection. Acks when one is due.
    fn admit(&mut self, seq: u64, len: usize) -> Result<bool, ReadError> {
        if self.stop.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let next = self.progress.admit(seq).map_err(ReadError::Frame)? == Admit::Next;
        if next {
            let now = Instant::now();
            self.acker.delivered(len, now);
            if self.acker.due(now) {
                self.ack();
            }
        }
        Ok(next)
    }

    /// Acknowledges what the lane delivered. A socket that fails here fails the next read
    /// too: the frame just admitted must still be delivered first, so the error waits.
    fn ack(&mut self) {
        let _ = self.acker.flush(self.wire, self.progress.delivered());
    }

    /// Says LAST with what the lane delivered, trying for a moment if the socket is full
    /// (the sender reads its acks at least every [`crate::acks::ACK_DELAY`] or so).
    fn last(&mut self) {
        let delivered = self.progress.delivered();
        for _ in 0..100 {
            match self.acker.finish(self.wire, delivered) {
                Ok(false) => std::thread::sleep(Duration::from_millis(2)),
                Ok(true) | Err(_) => return,
            }
        }
    }

    /// Reads what is there, waiting as long as it takes. While an ack is owed the wait is cut
    /// at [`ACK_DELAY`] to send it; with nothing owed, at [`IDLE_WAKE`] to look at `stop`.
    /// Once `stop` is set it reads nothing more (0, as at the end of the stream).
    fn read(&mut self, dst: &mut [u8]) -> Result<usize, ReadError> {
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(0);
            }
            let timer = if self.acker.owed() {
                ACK_DELAY
            } else {
                IDLE_WAKE
            };
            self.wire.read_timeout(Some(timer)).map_err(ReadError::Io)?;
            match self.wire.read(dst) {
                Ok(n) => return Ok(n),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.acker.owed() {
                        self.ack();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }

    fn read_exact(&mut self, mut dst: &mut [u8]) -> Result<(), ReadError> {
        while !dst.is_empty() {
            match self.read(dst)? {
                0 => return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into())),
                n => dst = &mut dst[n..],
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acks::{AckReader, ACK_FRAMES};
    use crate::testing::{frame, payload};

    #[derive(Default)]
    struct Collect {
        frames: Vec<(u64, Vec<u8>)>,
        owned: usize,
    }

    impl Sink for Collect {
        type Buf = Vec<u8>;
        fn alloc(&mut self, len: usize) -> Option<Vec<u8>> {
            Some(vec![0; len])
        }
        fn frame(&mut self, header: Header, body: &[u8]) -> Result<(), String> {
            self.frames.push(payload(header, body));
            Ok(())
        }
        fn frame_owned(&mut self, header: Header, body: Vec<u8>) -> Result<(), String> {
            self.owned += 1;
            self.frame(header, &body)
        }
    }

    /// The wire bytes of frames numbered `seqs` with payloads of `sizes` bytes (`i`th byte
    /// value `i`).
    fn stream_of(seqs: &[u64], sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, (&seq, &n)) in seqs.iter().zip(sizes).enumerate() {
            let mut f = frame(&vec![i as u8; n]);
            f.stamp(seq);
            let mut v = Vec::new();
            f.slices(&mut v, usize::MAX);
            v.iter().for_each(|s| out.extend_from_slice(s));
        }
        out
    }

    /// A connection that returns at most `step` bytes per read, to cut frames anywhere, and
    /// collects the acks written to it.
    struct Trickle<'a> {
        input: &'a [u8],
        step: usize,
        acks: Vec<u8>,
    }

    impl<'a> Trickle<'a> {
        fn new(input: &'a [u8], step: usize) -> Self {
            Trickle {
                input,
                step,
                acks: Vec::new(),
            }
        }

        fn last_ack(&self) -> Option<u64> {
            AckReader::default().feed(&self.acks).unwrap()
        }
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.input.len().min(out.len()).min(self.step);
            out[..n].copy_from_slice(&self.input[..n]);
            self.input = &self.input[n..];
            Ok(n)
        }
    }

    impl AckOut for Trickle<'_> {
        fn try_write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.acks.extend_from_slice(bytes);
            Ok(bytes.len())
        }
    }

    impl Wire for Trickle<'_> {
        fn read_timeout(&mut self, _: Option<Duration>) -> io::Result<()> {
            Ok(())
        }
    }

    fn read_all(
        wire: &mut Trickle<'_>,
        sink: &mut Collect,
        progress: &Progress,
    ) -> Result<(), ReadError> {
        let counters = Counters {
            peer: &PeerStats::default(),
            conn: &ConnStats::default(),
            stop: &AtomicBool::new(false),
        };
        read_frames(wire, 1 << 20, sink, progress, &counters)
    }

    #[test]
    fn frames_of_every_size_arrive_whole_however_the_stream_is_cut() {
        let sizes = [0, 1, 100, 70_000, 5, 300_000, 3];
        let seqs: Vec<u64> = (1..=sizes.len() as u64).collect();
        let stream = stream_of(&seqs, &sizes);
        for step in [1, 7, 4096, 1 << 20] {
            let mut sink = Collect::default();
            let stats = PeerStats::default();
            let conn = ConnStats::default();
            let lanes = Lanes::default();
            let progress = lanes.progress(b"a@h", 0, 1);
            let mut wire = Trickle::new(&stream, step);
            let counters = Counters {
                peer: &stats,
                conn: &conn,
                stop: &AtomicBool::new(false),
            };
            read_frames(&mut wire, 1 << 20, &mut sink, &progress, &counters).unwrap();
            assert_eq!(conn.get(), (sizes.len() as u64, stream.len() as u64));
            assert_eq!(sink.frames.len(), sizes.len(), "step {step}");
            assert_eq!(sink.owned, 2);
            for (i, (seq, body)) in sink.frames.iter().enumerate() {
                assert_eq!((*seq, body.len()), (i as u64 + 1, sizes[i]));
                assert!(body.iter().all(|&b| b == i as u8));
            }
            assert_eq!(stats.snapshot().msgs_in, sizes.len() as u64);
            assert_eq!(stats.snapshot().bytes_in, stream.len() as u64);
            assert_eq!(progress.delivered(), sizes.len() as u64);
        }
    }

    #[test]
    fn frames_are_acknowledged_every_so_many() {
        let n = 3 * ACK_FRAMES as usize + 5;
        let seqs: Vec<u64> = (1..=n as u64).collect();
        let stream = stream_of(&seqs, &vec![10; n]);
        let lanes = Lanes::default();
        let progress = lanes.progress(b"a@h", 0, 1);
        let mut wire = Trickle::new(&stream, 1 << 20);
        read_all(&mut wire, &mut Collect::default(), &progress).unwrap();
        // Three full rounds acknowledged as they came, the last five as the stream ended.
        assert_eq!(wire.last_ack(), Some(n as u64));
        assert_eq!(wire.acks.len(), 4 * crate::acks::ACK_LEN);
        let first = AckReader::default().feed(&wire.acks[..crate::acks::ACK_LEN]);
        assert_eq!(first, Ok(Some(ACK_FRAMES as u64)));
    }

    #[test]
    fn a_frame_delivered_already_is_dropped_and_a_gap_closes_the_connection() {
        let lanes = Lanes::default();
        let progress = lanes.progress(b"a@h", 0, 1);
        // 1, 2, then 1 and 2 again (a resend after a reconnection), then 3.
        let stream = stream_of(&[1, 2, 1, 2, 3], &[1, 1, 1, 1, 1]);
        let mut sink = Collect::default();
        read_all(&mut Trickle::new(&stream, 5), &mut sink, &progress).unwrap();
        let seqs: Vec<u64> = sink.frames.iter().map(|f| f.0).collect();
        assert_eq!(seqs, [1, 2, 3]);
        // 5 after 3: 4 went missing.
        let stream = stream_of(&[5], &[1]);
        let err = read_all(&mut Trickle::new(&stream, 100), &mut sink, &progress).unwrap_err();
        assert!(
            matches!(
                err,
                ReadError::Frame(FrameError::Gap {
                    expected: 4,
                    got: 5
                })
            ),
            "{err}"
        );
        assert_eq!(progress.delivered(), 3);
    }

    #[test]
    fn an_oversized_frame_is_refused_before_allocating() {
        let stream = [255u8, 255, 255, 255, 1, 2, 3];
        let mut sink = Collect::default();
        let lanes = Lanes::default();
        let err = read_all(
            &mut Trickle::new(&stream, 100),
            &mut sink,
            &lanes.progress(b"a", 0, 1),
        )
        .unwrap_err();
        assert!(matches!(err, ReadError::Frame(FrameError::BadLength(_))));
        assert!(sink.frames.is_empty());
    }

    #[test]
    fn a_stream_cut_inside_a_frame_is_an_error() {
        let stream = stream_of(&[1], &[10]);
        let lanes = Lanes::default();
        let cut = &stream[..stream.len() - 1];
        let err = read_all(
            &mut Trickle::new(cut, 100),
            &mut Collect::default(),
            &lanes.progress(b"a", 0, 1),
        );
        assert!(matches!(err, Err(ReadError::Io(_))));
    }

    #[test]
    fn a_malformed_body_stops_the_reader() {
        let mut stream = stream_of(&[1], &[1]);
        stream[4] = 9; // the kind
        let lanes = Lanes::default();
        let progress = lanes.progress(b"a", 0, 1);
        let err = read_all(
            &mut Trickle::new(&stream, 100),
            &mut Collect::default(),
            &progress,
        )
        .unwrap_err();
        // The reader refuses it itself (the sink never sees it), once its number counted:
        // sent again, it is dropped as delivered instead of closing the next connection too.
        assert!(
            matches!(err, ReadError::Frame(FrameError::BadKind(9))),
            "{err}"
        );
        assert_eq!(progress.delivered(), 1);
        // Nor a destination of the wrong kind: a pid where a name is due.
        let mut stream = stream_of(&[2], &[1]);
        stream[4] = frame::Kind::ToPid as u8;
        let mut sink = Collect::default();
        let err = read_all(&mut Trickle::new(&stream, 100), &mut sink, &progress).unwrap_err();
        assert!(
            matches!(err, ReadError::Frame(FrameError::BadDest)),
            "{err}"
        );
        assert!(sink.frames.is_empty());
        assert_eq!(progress.delivered(), 2);
    }

    #[test]
    fn a_lanes_new_connection_is_answered_once_the_old_reader_is_done() {
        use crate::handshake::dial;
        use crate::testing::listener;
        use std::io::Write;
        use std::net::TcpStream;
        let (l, acceptor, rx) = listener(crate::sockopts::SocketOpts::default());
        let addr = l.local_addr();
        let connect = move |session| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let welcome = dial(&mut s, b"a@h", b"b@h", b"c", 0, session).map(|w| w.delivered);
            (s, welcome)
        };
        // The first connection of lane 0 delivers frame 1, and its reader is stuck there.
        let (mut first, welcome) = connect(7);
        assert_eq!(welcome.unwrap(), 0);
        acceptor.gate.shut();
        first.write_all(&stream_of(&[1], &[3])).unwrap();
        // The lane's next connection shakes hands meanwhile: it gets no OK while a reader of
        // the lane is still delivering (what the lane delivered is not known yet).
        let (tx, answered) = std::sync::mpsc::channel();
        let second = std::thread::spawn(move || {
            let (s, welcome) = connect(7);
            tx.send(welcome.unwrap()).unwrap();
            s
        });
        assert!(answered.recv_timeout(Duration::from_millis(300)).is_err());
        // The old reader delivers, its connection ends: the new one is told frame 1 arrived.
        acceptor.gate.open();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap().1.len(), 3);
        drop(first);
        assert_eq!(answered.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        drop(second.join().unwrap());
        l.close();
    }
}
