//! The receiving side: a listening socket, one thread that accepts, and one reader thread per
//! incoming connection that authenticates the peer and then hands every frame to a [`Sink`].
//!
//! Nothing a peer sends before the handshake succeeds reaches the sink. Frame lengths are
//! checked against `max_frame_bytes` before any buffer is allocated, and a malformed frame
//! closes the connection it came on (logged once), nothing else.

use crate::conn::handshake_io;
use crate::deadline::Deadline;
use crate::frame::{self, FrameError, LEN_BYTES};
use crate::handshake;
use crate::lanes::{Lanes, Waited};
use crate::sockopts::{self, SocketOpts};
use crate::stats::{unix_millis, ConnStats, PeerStats};
use parking_lot::Mutex;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Size of a reader's buffer: small frames are parsed in place, many per `read`.
const READ_BUF: usize = 256 * 1024;

/// Frames at least this long are read into a buffer of their own (see [`Sink::alloc`]).
pub const OWNED_FRAME_MIN: usize = 64 * 1024;

/// At most this many connections may be in their handshake at once; more are closed at
/// once, so a flood of idle sockets cannot pin a thread each.
const MAX_HANDSHAKES: usize = 64;

/// How long a new connection waits for the reader of its lane's previous connection to
/// finish by itself before stopping it (see [`crate::lanes`]). Draining even full socket
/// buffers takes milliseconds; a reader still going after this is on a half-open connection.
const LANE_PATIENCE: Duration = Duration::from_secs(5);

/// Where one incoming connection's frames go.
pub trait Sink: Send + 'static {
    /// A buffer for one large frame (the NIF allocates a VM binary, so the frame can be
    /// decoded without a copy).
    type Buf: AsMut<[u8]> + Send;
    /// A buffer of exactly `len` bytes, or `None` if it cannot be had.
    fn alloc(&mut self, len: usize) -> Option<Self::Buf>;
    /// A frame body, valid for this call only. An error closes the connection.
    fn frame(&mut self, body: &[u8]) -> Result<(), String>;
    /// A frame body read into a buffer from [`Sink::alloc`]. An error closes the connection.
    fn frame_owned(&mut self, body: Self::Buf) -> Result<(), String>;
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
    /// Successive connections of one peer's pool slot read in turn.
    lanes: Lanes,
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
        });
        let l = listener.clone();
        let cfg = Arc::new(cfg);
        std::thread::Builder::new()
            .name("teleport_acceptor".into())
            .spawn(move || loop {
                // A listener that stopped accepting would leave the node unreachable while
                // looking alive: after a panic, log it and accept again.
                let run = std::panic::AssertUnwindSafe(|| l.accept_loop(&cfg, &acceptor));
                if std::panic::catch_unwind(run).is_ok() || l.closed.load(Ordering::SeqCst) {
                    return;
                }
                tracing::error!(addr = %l.local, reason = "the accept loop panicked; it goes on", "acceptor_panicked");
                std::thread::sleep(Duration::from_millis(100));
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

    /// Stops accepting and closes every incoming connection; their threads then end.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        // Shutting a listening socket wakes a blocked accept() with an error on Linux.
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        for c in self.conns.lock().drain(..) {
            let _ = c.sock.shutdown(std::net::Shutdown::Both);
        }
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
            let spawned = std::thread::Builder::new()
                .name("teleport_reader".into())
                .spawn(move || {
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

    /// One incoming connection: handshake, its turn on its lane, then frames until it closes.
    fn serve<A: Acceptor>(&self, conn: &Arc<Incoming>, cfg: &ListenConfig, acceptor: &A) {
        let (sock, from, id) = (&conn.sock, conn.from.as_str(), conn.id);
        // What a peer may send is what the handshake announces (a 32-bit length at most).
        let max_frame = u32::try_from(cfg.max_frame_bytes).unwrap_or(u32::MAX);
        // Counted down however the handshake ends, unwinding included: a leaked count would
        // end up refusing every connection (MAX_HANDSHAKES).
        let handshaking = OnDrop(|| {
            self.handshaking.fetch_sub(1, Ordering::SeqCst);
        });
        let shaken = (|| {
            // One deadline for the whole handshake: a per-read timeout would let the peer trickle.
            let mut stream = Deadline::after(sock, cfg.handshake_timeout);
            let me = acceptor.me();
            let dialer = handshake::accept(&mut stream, &me, max_frame, |p| acceptor.cookie_for(p))
                .map_err(handshake_io)?;
            sock.set_read_timeout(None)?;
            sock.set_write_timeout(None)?;
            Ok::<_, io::Error>(dialer)
        })();
        drop(handshaking);
        let (peer, lane) = match shaken {
            Ok(dialer) => (dialer.name, dialer.lane),
            Err(e) => {
                tracing::warn!(addr = %from, id, reason = %e, "handshake_failed");
                return;
            }
        };
        let name = String::from_utf8_lossy(&peer).into_owned();
        *conn.peer.lock() = Some(peer.clone());
        let stats = acceptor.stats(&peer);
        stats.connections_in.fetch_add(1, Ordering::Relaxed);
        let connected = OnDrop(|| {
            stats.connections_in.fetch_sub(1, Ordering::Relaxed);
        });
        tracing::info!(peer = %name, addr = %from, id, lane, "connection_accepted");
        // A newer connection of the lane stops this one's reader, if it must, by shutting
        // this socket.
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
        let mut sink = acceptor.sink(&peer);
        let result = read_frames(sock, cfg.max_frame_bytes, &mut sink, &stats, &conn.counters);
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

/// Reads frames from `src` until it ends cleanly (`Ok`) or fails, counting each in the
/// peer's `stats` and the connection's `conn`.
pub fn read_frames<R: Read, S: Sink>(
    mut src: R,
    max_frame_bytes: usize,
    sink: &mut S,
    stats: &PeerStats,
    conn: &ConnStats,
) -> Result<(), ReadError> {
    let mut buf = vec![0u8; READ_BUF];
    let (mut start, mut end) = (0usize, 0usize);
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
                read_exact(&mut src, &mut dst[have..])?;
                start = body_at + have;
                stats.received(len + LEN_BYTES);
                conn.add(1, (len + LEN_BYTES) as u64);
                sink.frame_owned(owned).map_err(ReadError::Sink)?;
                continue;
            }
            if end - body_at < len {
                break;
            }
            stats.received(len + LEN_BYTES);
            conn.add(1, (len + LEN_BYTES) as u64);
            sink.frame(&buf[body_at..body_at + len])
                .map_err(ReadError::Sink)?;
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
        match src.read(&mut buf[end..]) {
            Ok(0) if end == 0 => return Ok(()),
            Ok(0) => return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => end += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

fn read_exact<R: Read>(src: &mut R, dst: &mut [u8]) -> Result<(), ReadError> {
    src.read_exact(dst).map_err(ReadError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::Writer;
    use crate::frame::{Kind, FLAG_SHARED};

    #[derive(Default)]
    struct Collect {
        frames: Vec<(u8, Vec<u8>, Vec<u8>)>,
        owned: usize,
    }

    impl Sink for Collect {
        type Buf = Vec<u8>;
        fn alloc(&mut self, len: usize) -> Option<Vec<u8>> {
            Some(vec![0; len])
        }
        fn frame(&mut self, body: &[u8]) -> Result<(), String> {
            let f = frame::parse(body).map_err(|e| e.to_string())?;
            self.frames
                .push((f.flags, f.dest.to_vec(), f.term.to_vec()));
            Ok(())
        }
        fn frame_owned(&mut self, body: Vec<u8>) -> Result<(), String> {
            self.owned += 1;
            self.frame(&body)
        }
    }

    fn frame_bytes(dest: &[u8], payload_len: usize) -> Vec<u8> {
        let mut w = Writer::default();
        let s = frame::start(&mut w, Kind::ToName, dest);
        w.version();
        w.binary(&vec![7u8; payload_len]);
        frame::finish(&mut w, s, if payload_len > 1000 { FLAG_SHARED } else { 0 }).unwrap();
        w.finish().0
    }

    /// A reader that returns at most `step` bytes per call, to cut frames anywhere.
    struct Trickle<'a>(&'a [u8], usize);
    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.0.len().min(out.len()).min(self.1);
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn frames_of_every_size_arrive_whole_however_the_stream_is_cut() {
        let mut stream = Vec::new();
        let sizes = [0, 1, 100, 70_000, 5, 300_000, 3];
        for (i, &n) in sizes.iter().enumerate() {
            stream.extend(frame_bytes(format!("p{i}").as_bytes(), n));
        }
        for step in [1, 7, 4096, 1 << 20] {
            let mut sink = Collect::default();
            let stats = PeerStats::default();
            let conn = ConnStats::default();
            read_frames(Trickle(&stream, step), 1 << 20, &mut sink, &stats, &conn).unwrap();
            assert_eq!(conn.get(), (sizes.len() as u64, stream.len() as u64));
            assert_eq!(sink.frames.len(), sizes.len(), "step {step}");
            assert_eq!(sink.owned, 2);
            for (i, (_, dest, term)) in sink.frames.iter().enumerate() {
                assert_eq!(dest, format!("p{i}").as_bytes());
                assert_eq!(term.len(), 1 + 5 + sizes[i]);
            }
            assert_eq!(stats.snapshot().msgs_in, sizes.len() as u64);
            assert_eq!(stats.snapshot().bytes_in, stream.len() as u64);
        }
    }

    #[test]
    fn an_oversized_frame_is_refused_before_allocating() {
        let stream = [255u8, 255, 255, 255, 1, 2, 3];
        let mut sink = Collect::default();
        let err = read_frames(
            &stream[..],
            1 << 20,
            &mut sink,
            &PeerStats::default(),
            &ConnStats::default(),
        )
        .unwrap_err();
        assert!(matches!(err, ReadError::Frame(FrameError::BadLength(_))));
        assert!(sink.frames.is_empty());
    }

    #[test]
    fn a_stream_cut_inside_a_frame_is_an_error() {
        let stream = frame_bytes(b"x", 10);
        let mut sink = Collect::default();
        let err = read_frames(
            &stream[..stream.len() - 1],
            1 << 20,
            &mut sink,
            &PeerStats::default(),
            &ConnStats::default(),
        );
        assert!(matches!(err, Err(ReadError::Io(_))));
    }

    #[test]
    fn a_malformed_body_stops_the_reader() {
        let stream = [0u8, 0, 0, 5, 9, 0, 0, 0, 131];
        let mut sink = Collect::default();
        let err = read_frames(
            &stream[..],
            1 << 20,
            &mut sink,
            &PeerStats::default(),
            &ConnStats::default(),
        )
        .unwrap_err();
        assert!(matches!(err, ReadError::Sink(_)));
    }
}
