//! The receiving side: a listening socket, one thread that accepts, a short-lived thread per
//! connection in its handshake, and a [`Driver`] that reads every authenticated connection
//! (a [`Served`]) and hands each frame to a [`Sink`], once, in lane order, acknowledging
//! them as they go (see [`crate::pump`], [`crate::acks`]). The driver is a fixed set of poll
//! threads (see [`crate::poller`]) for [`Listener::start`]; the NIF drives its connections
//! from the VM's schedulers instead, through [`Listener::start_driven`].
//!
//! Nothing a peer sends before the handshake succeeds reaches the sink. Frame lengths are
//! checked against `max_frame_bytes` before any buffer is allocated, and a malformed frame
//! closes the connection it came on (logged once), nothing else.

use crate::conn::handshake_io;
use crate::deadline::Deadline;
use crate::handshake::{self, Welcome};
use crate::lanes::{Lanes, Place, Waited};
use crate::poller::{Next, Poller, Task};
use crate::pump::{Counters, Pump, Pumped, ReadError, Sink, SocketWire, Wire};
use crate::secure::{self, Opening, Secured, Session, Speaks};
use crate::sockopts::{self, SocketOpts};
use crate::stats::{unix_millis, ConnStats, PeerStats};
use crate::tls::Tls;
use parking_lot::Mutex;
use rustls::Connection;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// What one connection reads per turn of its poll thread before the thread serves the
/// others (the rest is read at its next turn, straight after).
const TURN_BYTES: usize = 1024 * 1024;

/// At most this many connections may be in their handshake at once; more are closed at
/// once, so a flood of idle sockets cannot pin a thread each.
pub(crate) const MAX_HANDSHAKES: usize = 64;

/// How long a new connection waits for the reader of its lane's previous connection to
/// finish by itself before stopping it (see [`crate::lanes`]). Draining even full socket
/// buffers takes milliseconds; a reader still going after this is on a half-open connection.
const LANE_PATIENCE: Duration = Duration::from_secs(5);

/// What the listener asks of its owner.
pub trait Acceptor: Send + Sync + 'static {
    /// The per-connection sink.
    type Sink: Sink + Send + 'static;
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
    /// How much lower than the VM's the priority of the listener's threads is (a nice
    /// value, see [`crate::threads::spawn`]).
    pub thread_nice: u8,
    /// How many poll threads read the incoming connections (see
    /// [`crate::poller::default_threads`]).
    pub poll_threads: usize,
    /// The node's TLS: every dialer must open a session and present a certificate of the
    /// CA ([`crate::tls`]); `None`: plain, and a dialer that opens with TLS is refused.
    pub tls: Option<Arc<Tls>>,
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
    /// When a TLS mismatch from each address was last logged: a dialer that keeps trying
    /// (every 2 s at most) is logged once a minute.
    mismatches: Mutex<std::collections::HashMap<std::net::IpAddr, Instant>>,
    /// Tells the connections' driver that the listener closed.
    closing: Box<dyn Fn() + Send + Sync>,
}

/// Who drives the authenticated connections once their handshake is done: the poll threads
/// of [`Listener::start`] (see [`crate::poller`]), or whatever [`Listener::start_driven`] is
/// given (the NIF drives them from the VM's schedulers).
pub trait Driver<S: Sink>: Send + Sync + 'static {
    /// Takes `conn` and drives it from now on, ticking it first ([`Served::tick`]), then
    /// reading it ([`Served::read`]) whenever its socket is readable and ticking it at the
    /// deadlines it asks for; hands it back if it cannot.
    // Handed back whole, at most once per connection: boxing it would buy nothing.
    #[allow(clippy::result_large_err)]
    fn drive(&self, conn: Served<S>) -> Result<(), Served<S>>;
    /// The listener closed: every connection it drives is to be ticked soon, and no more
    /// come.
    fn closing(&self);
}

impl<S: Sink + Send + 'static> Driver<S> for Poller<Served<S>> {
    fn drive(&self, conn: Served<S>) -> Result<(), Served<S>> {
        self.add(conn).map(drop)
    }

    fn closing(&self) {
        self.tick_all(true);
    }
}

impl Listener {
    /// Binds `addr` (port 0: any free port) and starts accepting; its own poll threads
    /// (`cfg.poll_threads`) read the connections.
    pub fn start<A: Acceptor>(
        addr: SocketAddr,
        cfg: ListenConfig,
        acceptor: Arc<A>,
    ) -> io::Result<Arc<Listener>> {
        let pollers: Arc<Poller<Served<A::Sink>>> =
            Poller::start(cfg.poll_threads, "teleport_poll", cfg.thread_nice)?;
        Listener::start_driven(addr, cfg, acceptor, pollers)
    }

    /// Binds `addr` (port 0: any free port) and starts accepting; `driver` reads the
    /// connections.
    ///
    /// The socket options are set on the listening socket first, so that one the kernel
    /// refuses fails here (the error wraps a [`sockopts::SockOptError`] naming it) rather than
    /// on every connection later; accepted sockets also inherit from it what the TCP
    /// handshake fixes (the window scale follows from the receive buffer).
    pub fn start_driven<A: Acceptor, D: Driver<A::Sink>>(
        addr: SocketAddr,
        cfg: ListenConfig,
        acceptor: Arc<A>,
        driver: Arc<D>,
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
        let incarnation = handshake::random_id()?;
        let listener = Arc::new(Listener {
            sock,
            local,
            closed: AtomicBool::new(false),
            handshaking: AtomicUsize::new(0),
            conns: Mutex::new(Vec::new()),
            next_id: 0.into(),
            lanes: Lanes::default(),
            incarnation,
            mismatches: Mutex::default(),
            closing: Box::new({
                let driver = driver.clone();
                move || driver.closing()
            }),
        });
        let l = listener.clone();
        let cfg = Arc::new(cfg);
        crate::threads::spawn("teleport_acceptor".into(), cfg.thread_nice, move || {
            loop {
                // A listener that stopped accepting would leave the node unreachable while
                // looking alive: after a panic, log it and accept again.
                let run = std::panic::AssertUnwindSafe(|| l.accept_loop(&cfg, &acceptor, &driver));
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

    /// Stops accepting and has every incoming connection end; the listener's threads then
    /// end.
    ///
    /// Each connection delivers no frame after the listener closed, says LAST with what its
    /// lane delivered (see [`crate::acks`]), and ends without a reset: its sender then knows
    /// exactly which frames did not arrive, and sends them wherever the peer listens next.
    /// (Shutting the sockets' reading side would make the kernel reset a connection that
    /// still receives, and a reset can overtake the LAST.)
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        // Shutting a listening socket wakes a blocked accept() with an error on Linux.
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        (self.closing)();
    }

    fn accept_loop<A: Acceptor>(
        self: &Arc<Self>,
        cfg: &Arc<ListenConfig>,
        acceptor: &Arc<A>,
        driver: &Arc<impl Driver<A::Sink>>,
    ) {
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
            let driver = driver.clone();
            let spawned =
                crate::threads::spawn("teleport_handshake".into(), cfg.thread_nice, move || {
                    let run = std::panic::AssertUnwindSafe(|| l.serve(&conn, &cfg, &*acceptor));
                    match std::panic::catch_unwind(run) {
                        Ok(Some(served)) => {
                            if let Err(served) = driver.drive(served) {
                                // The listener closed meanwhile (its poll threads ended), or
                                // its owner is gone.
                                served.run_alone();
                            }
                        }
                        Ok(None) => l.forget_conn(id),
                        Err(_) => {
                            tracing::error!(
                                addr = %conn.from,
                                id,
                                reason = "the handshake thread panicked; the connection is closed",
                                "reader_panicked"
                            );
                            let _ = conn.sock.shutdown(std::net::Shutdown::Both);
                            l.forget_conn(id);
                        }
                    }
                });
            if let Err(e) = spawned {
                self.handshaking.fetch_sub(1, Ordering::SeqCst);
                self.forget_conn(id);
                tracing::warn!(id, reason = %e, "handshake_spawn_failed");
            }
        }
    }

    fn forget_conn(&self, id: u64) {
        self.conns.lock().retain(|c| c.id != id);
    }

    /// One incoming connection's handshake: the dialer's proof, its turn on its lane, the OK
    /// telling it what the lane delivered. `None` if it failed (logged).
    fn serve<A: Acceptor>(
        self: &Arc<Self>,
        conn: &Arc<Incoming>,
        cfg: &ListenConfig,
        acceptor: &A,
    ) -> Option<Served<A::Sink>> {
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
        let (mut session, bound) = self.open_tls(cfg, &mut stream, conn)?;
        let me = acceptor.me();
        let proven = handshake::accept_bound(
            &mut Opening::new(session.as_mut(), &mut stream),
            &me,
            bound.as_ref().map(|b| &b[..]),
            |p| acceptor.cookie_for(p),
        );
        let proven = match proven {
            Ok(proven) => proven,
            Err(e) => {
                tracing::warn!(addr = %from, id, reason = %handshake_io(e), "handshake_failed");
                return None;
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
        let welcomed = proven
            .welcome(&mut Opening::new(session.as_mut(), &mut stream), &welcome)
            .map_err(handshake_io);
        // From here on the socket is read without blocking, by a poll thread, and a TLS
        // session's records are this end's own (`secure::Session`).
        let ready = welcomed
            .and_then(|_| sock.set_nonblocking(true))
            .and_then(|_| session.map(Session::new).transpose());
        drop(handshaking);
        let tls = match ready {
            Ok(tls) => tls,
            Err(e) => {
                tracing::warn!(peer = %name, addr = %from, id, reason = %e, "handshake_failed");
                return None;
            }
        };
        *conn.peer.lock() = Some(peer.clone());
        let stats = acceptor.stats(&peer);
        stats.connections_in.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            peer = %name,
            addr = %from,
            id,
            lane,
            delivered = welcome.delivered,
            "connection_accepted"
        );
        let pump = Pump::new(acceptor.sink(&peer), progress, cfg.max_frame_bytes);
        Some(Served {
            listener: self.clone(),
            conn: conn.clone(),
            pump,
            stats,
            name,
            _place: place,
            phase: Phase::Reading,
            ended: None,
            tls: tls.map(Box::new),
        })
    }

    /// The TLS part of an incoming connection's opening, before the cookie handshake: the
    /// session and its binding (both `None` on a plain node). A dialer that does not open
    /// as this node expects is refused and logged (`tls_mismatch`); `None` then, as for a
    /// failed TLS handshake (logged).
    #[allow(clippy::type_complexity)]
    fn open_tls(
        &self,
        cfg: &ListenConfig,
        stream: &mut Deadline<'_>,
        conn: &Incoming,
    ) -> Option<(Option<Connection>, Option<[u8; crate::tls::BINDING_LEN]>)> {
        let (from, id) = (conn.from.as_str(), conn.id);
        let speaks = match secure::sniff(stream) {
            Ok(speaks) => speaks,
            Err(e) => {
                tracing::warn!(addr = %from, id, reason = %format_args!("handshake: {e}"), "handshake_failed");
                return None;
            }
        };
        let refused = match (&cfg.tls, speaks) {
            (None, Speaks::Plain) => return Some((None, None)),
            (Some(tls), Speaks::Tls) => {
                let opened = tls
                    .acceptor()
                    .map_err(io::Error::other)
                    .and_then(|server| secure::open(Connection::Server(server), stream));
                return match opened {
                    Ok((session, bound)) => Some((Some(session), Some(bound))),
                    Err(e) => {
                        tracing::warn!(addr = %from, id, reason = %e, "tls_handshake_failed");
                        None
                    }
                };
            }
            (None, Speaks::Tls) => {
                "the dialer opened with TLS, this node's teleport runs plain (tls => false); refused"
            }
            (Some(_), Speaks::Plain) => {
                // Told in plain, after its HELLO (so that closing does not reset the
                // REJECT away): the dialer can say why it cannot connect.
                let _ = handshake::read_message(stream);
                let reject = handshake::encode_reject(handshake::REJECT_TLS_REQUIRED);
                let _ = handshake::write_message(stream, &reject);
                "the dialer opened in plain, this node's teleport requires TLS; refused"
            }
        };
        if self.first_mismatch(conn) {
            tracing::warn!(addr = %from, id, reason = refused, "tls_mismatch");
        }
        None
    }

    /// Whether a TLS mismatch from where `conn` comes is worth a log line: the first in a
    /// minute from its address.
    fn first_mismatch(&self, conn: &Incoming) -> bool {
        let Some(ip) = conn.peer_addr.map(|a| a.ip()) else {
            return true;
        };
        let now = Instant::now();
        let mut seen = self.mismatches.lock();
        seen.retain(|_, at| now.saturating_duration_since(*at) < MISMATCH_LOG_EVERY);
        if seen.contains_key(&ip) {
            return false;
        }
        seen.insert(ip, now);
        true
    }
}

/// How often a TLS mismatch from one address is logged at most.
const MISMATCH_LOG_EVERY: Duration = Duration::from_secs(60);

/// How long a closing listener's connection waits for its peer to see its end.
const LINGER: Duration = Duration::from_secs(2);

/// How long a closing listener's connection tries to get its LAST out through a full socket
/// (the sender reads its acks at least every [`crate::acks::ACK_DELAY`] or so).
const LAST_PATIENCE: Duration = Duration::from_millis(200);

/// Where an authenticated connection is in its life.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Frames are read and delivered.
    Reading,
    /// The listener closed: the LAST is going out (since then).
    Closing(Instant),
    /// The LAST is out and this end said FIN: what the peer still sends is read and thrown
    /// away until it closes too, or until then. Closing with unread data would send an RST,
    /// and an RST can discard the LAST before the peer reads it; the frames thrown away come
    /// after the LAST, so the peer sends them again wherever it connects next.
    Lingering(Instant),
}

/// An authenticated incoming connection, as its [`Driver`] drives it. Dropping it ends the
/// connection: its counts, its place on its lane, its log line.
pub struct Served<S: Sink> {
    listener: Arc<Listener>,
    conn: Arc<Incoming>,
    pump: Pump<S>,
    stats: Arc<PeerStats>,
    name: String,
    /// Held until the connection ends: the lane's next connection waits for that.
    _place: Place,
    phase: Phase,
    /// How it ended, once it did (`None` when dropped: it panicked).
    ended: Option<Result<(), ReadError>>,
    /// Its TLS session: what is read goes through it, and so do the acks.
    tls: Option<Box<Session>>,
}

impl<S: Sink + Send + 'static> Served<S> {
    fn closed(&self) -> bool {
        self.listener.closed.load(Ordering::SeqCst)
    }

    fn end(&mut self, result: Result<(), ReadError>) -> Next {
        self.ended = Some(result);
        Next::Done
    }

    /// The next deadline while reading: when the ack owed is due.
    fn reading(&self) -> Next {
        Next::Wait(self.pump.ack_due())
    }

    fn start_closing(&mut self, now: Instant) -> Next {
        self.phase = Phase::Closing(now);
        self.tick(now)
    }

    /// Reads and throws away what the peer still sends after the LAST.
    fn discard(&mut self) -> Next {
        let mut scratch = [0u8; 16 * 1024];
        loop {
            match (&self.conn.sock).read(&mut scratch) {
                Ok(0) => return self.end(Ok(())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.end(Ok(())),
            }
        }
        match self.phase {
            Phase::Lingering(until) => Next::Wait(Some(until)),
            Phase::Closing(since) => Next::Wait(Some(since)),
            Phase::Reading => self.reading(),
        }
    }

    /// Drives the connection to its end on the calling thread: a handshake that finished
    /// once its driver had ended, or a connection whose driver let go of it while the
    /// listener closes (the NIF's reader process ends at once; its connection still says
    /// LAST and lingers).
    pub fn run_alone(mut self) {
        loop {
            let now = Instant::now();
            if self.tick(now) == Next::Done {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
            if self.readable(Instant::now()) == Next::Done {
                return;
            }
        }
    }
}

impl<S: Sink + Send + 'static> Task for Served<S> {
    fn fd(&self) -> RawFd {
        Served::fd(self)
    }

    fn readable(&mut self, now: Instant) -> Next {
        // A poll thread reads any frame (it may take long), and its level-triggered wait
        // calls again at once when the budget ran out.
        match self.read(now, TURN_BYTES, usize::MAX) {
            Turn::Wait(deadline) => Next::Wait(deadline),
            // A TLS session may hold plaintext the turn left, which the socket does not
            // show: the next turn comes at once (see `tick`).
            Turn::More | Turn::Large if self.tls.is_some() => Next::Wait(Some(now)),
            Turn::More | Turn::Large => self.reading(),
            Turn::Done => Next::Done,
        }
    }

    fn tick(&mut self, now: Instant) -> Next {
        let next = Served::tick(self, now);
        if self.tls.is_some() && next != Next::Done && matches!(self.phase, Phase::Reading) {
            return self.readable(now);
        }
        next
    }
}

impl<S: Sink + Send + 'static> Served<S> {
    /// The connection's socket, whose readiness its driver waits for.
    pub fn fd(&self) -> RawFd {
        self.conn.sock.as_raw_fd()
    }

    /// The listener's number for the connection (as logs and `teleport:info/0` name it).
    pub fn id(&self) -> u64 {
        self.conn.id
    }

    /// The sink, to tell it where it runs now.
    pub fn sink_mut(&mut self) -> &mut S {
        self.pump.sink_mut()
    }

    /// Waits at most `timeout` for the socket to be readable (a driver that may block: the
    /// NIF on a dirty I/O scheduler, for the rest of a large frame); whether it is.
    pub fn wait_readable(&self, timeout: Duration) -> bool {
        crate::epoll::wait_readable(self.fd(), timeout)
    }

    /// The length of the frame being read, or of the next one if its length is read already
    /// (a driver that cannot read long frames everywhere picks where to read it by this).
    pub fn next_frame_len(&self) -> Option<usize> {
        self.pump.next_len()
    }

    /// Whether its listener closed while it still runs: it has a LAST to say and a linger to
    /// wait out before it ends (see [`Served::run_alone`]).
    pub fn closing(&self) -> bool {
        self.closed() && self.ended.is_none()
    }

    /// Ends it for `why` (logged when it is dropped), unless it ended already.
    pub fn abandon(&mut self, why: &str) {
        if self.ended.is_none() {
            self.ended = Some(Err(ReadError::Io(io::Error::other(why.to_string()))));
        }
    }

    /// A turn of reading, the socket being readable: delivers what it has, up to `budget`
    /// bytes and stopping before a frame longer than `large_max`.
    pub fn read(&mut self, now: Instant, budget: usize, large_max: usize) -> Turn {
        let conn = Arc::clone(&self.conn);
        self.turn(now, &mut SocketWire::new(&conn.sock), budget, large_max)
    }

    /// A turn of reading bytes its driver read from the socket (a port, in the NIF), as
    /// [`Served::read`] reads them from the socket itself: `data`, then, if the driver saw
    /// the stream end (`end`), its end. Returns the turn and how many bytes of `data` it
    /// took; the rest is for the next turn (`More`: the budget is spent; `Large`: the next
    /// frame is longer than `large_max`). Acks are written to the socket.
    pub fn feed(
        &mut self,
        now: Instant,
        data: &[u8],
        end: Fed<'_>,
        budget: usize,
        large_max: usize,
    ) -> (Turn, usize) {
        let conn = Arc::clone(&self.conn);
        let mut wire = FedWire {
            data,
            end,
            sock: SocketWire::new(&conn.sock),
        };
        let turn = self.turn(now, &mut wire, budget, large_max);
        (turn, data.len() - wire.data.len())
    }

    fn turn<W: Wire>(
        &mut self,
        now: Instant,
        wire: &mut W,
        budget: usize,
        large_max: usize,
    ) -> Turn {
        if !matches!(self.phase, Phase::Reading) {
            return Turn::from(self.discard());
        }
        let counters = Counters {
            peer: &self.stats,
            conn: &self.conn.counters,
            stop: &self.listener.closed,
        };
        let mut wire = Secured::new(self.tls.as_deref_mut(), wire);
        let pumped = self.pump.pump(&mut wire, budget, large_max, &counters);
        let next = match pumped {
            Ok(Pumped::Drained) => self.reading(),
            Ok(Pumped::Yielded) => return Turn::More,
            Ok(Pumped::Large) => return Turn::Large,
            // Whatever stopped the reading once the listener closed is no fault of the
            // connection.
            Ok(Pumped::Ended) | Err(_) if self.closed() => self.start_closing(now),
            Ok(Pumped::Ended) => self.end(Ok(())),
            Err(e) => self.end(Err(e)),
        };
        Turn::from(next)
    }

    /// A turn without reading: its deadline passed (an ack is due, or the next step of
    /// closing), or the listener closed. Also its first turn, when its driver takes it.
    pub fn tick(&mut self, now: Instant) -> Next {
        let conn = Arc::clone(&self.conn);
        let mut sock = SocketWire::new(&conn.sock);
        let mut wire = Secured::new(self.tls.as_deref_mut(), &mut sock);
        match self.phase {
            Phase::Reading if self.listener.closed.load(Ordering::SeqCst) => {
                self.start_closing(now)
            }
            Phase::Reading => {
                // An ack a full socket could not take before goes first.
                let acked = wire
                    .flush()
                    .and_then(|_| self.pump.ack(&mut wire, now, false));
                match acked {
                    Ok(()) => self.reading(),
                    Err(e) => self.end(Err(ReadError::Io(e))),
                }
            }
            Phase::Closing(since) => {
                let out = wire.flush().and_then(|_| self.pump.last(&mut wire));
                if matches!(out, Ok(false)) && now < since + LAST_PATIENCE {
                    return Next::Wait(Some(now + Duration::from_millis(2)));
                }
                let _ = self.conn.sock.shutdown(std::net::Shutdown::Write);
                self.phase = Phase::Lingering(now + LINGER);
                self.discard()
            }
            Phase::Lingering(until) if now >= until => self.end(Ok(())),
            Phase::Lingering(until) => Next::Wait(Some(until)),
        }
    }
}

/// What a turn of reading left (see [`Served::read`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Nothing more to read now: call again when the socket is readable, or at the deadline.
    Wait(Option<Instant>),
    /// The budget is spent and the socket may have more: call again soon.
    More,
    /// The next frame is longer than the turn could read: call again where long work may
    /// run.
    Large,
    /// The connection ended: drop it (which closes it).
    Done,
}

impl From<Next> for Turn {
    fn from(next: Next) -> Turn {
        match next {
            Next::Wait(deadline) => Turn::Wait(deadline),
            Next::Done => Turn::Done,
        }
    }
}

impl<S: Sink> Drop for Served<S> {
    fn drop(&mut self) {
        let (name, from, id) = (&self.name, &self.conn.from, self.conn.id);
        if matches!(self.phase, Phase::Reading) && self.ended.is_some() {
            // Best effort: the connection may be gone already.
            let mut sock = SocketWire::new(&self.conn.sock);
            let mut wire = Secured::new(self.tls.as_deref_mut(), &mut sock);
            let _ = self.pump.ack(&mut wire, Instant::now(), true);
            let _ = wire.flush();
        }
        self.stats.connections_in.fetch_sub(1, Ordering::Relaxed);
        let (msgs, _) = self.conn.counters.get();
        match self.ended.take() {
            Some(Ok(())) => tracing::info!(
                peer = %name,
                addr = %from,
                id,
                reason = if matches!(self.phase, Phase::Reading) { "closed by the peer" } else { "the listener closed" },
                msgs,
                "connection_closed"
            ),
            Some(Err(e)) => tracing::warn!(
                peer = %name,
                addr = %from,
                id,
                reason = %e,
                msgs,
                "connection_closed"
            ),
            None => tracing::error!(
                peer = %name,
                addr = %from,
                id,
                reason = "its reader panicked; the connection is closed",
                msgs,
                "reader_panicked"
            ),
        }
        let _ = self.conn.sock.shutdown(std::net::Shutdown::Both);
        self.listener.forget_conn(id);
    }
}

/// Runs its closure when dropped, on unwinding too.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// How the stream stands after the bytes a driver feeds ([`Served::feed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fed<'a> {
    /// More may come.
    Open,
    /// The peer ended the stream.
    Eof,
    /// The socket failed, for the reason the driver names (`econnreset`, `etimedout`): the
    /// connection ends with that error, not as a clean close.
    Failed(&'a str),
}

/// Bytes a driver read from the socket, as a [`Wire`] for [`Served::feed`]: reads take from
/// `data`, then end as `end` says (would block while it is open); acks go to the socket.
struct FedWire<'a> {
    data: &'a [u8],
    end: Fed<'a>,
    sock: SocketWire<'a>,
}

impl io::Read for FedWire<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.data.is_empty() {
            return match self.end {
                Fed::Open => Err(io::ErrorKind::WouldBlock.into()),
                Fed::Eof => Ok(0),
                Fed::Failed(why) => Err(io::Error::other(why.to_string())),
            };
        }
        let n = buf.len().min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

impl crate::acks::AckOut for FedWire<'_> {
    fn try_write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.sock.try_write(bytes)
    }
}

impl Wire for FedWire<'_> {
    fn read_timeout(&mut self, _after: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acks::{AckOut, AckReader, ACK_FRAMES};
    use crate::frame::{self, FrameError, Header};
    use crate::lanes::Progress;
    use crate::pump::{read_frames, Wire};
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
        progress: &Arc<Progress>,
    ) -> Result<(), ReadError> {
        let counters = Counters {
            peer: &PeerStats::default(),
            conn: &ConnStats::default(),
            stop: &AtomicBool::new(false),
        };
        read_frames(wire, 1 << 20, sink, progress, &counters)
    }

    // A driver that cannot read long frames everywhere (the NIF on a normal scheduler)
    // stops before one, and reads it in a later call with a larger limit. The frame's start
    // can fill the pump's buffer: that call once read into no room, saw "end of stream" and
    // closed a healthy connection.
    /// A fed stream ends as its driver says: it would block while open, ends cleanly at
    /// eof, and fails with the driver's reason once the socket failed (a reset is no clean
    /// close).
    #[test]
    fn fed_bytes_end_as_their_driver_says() {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let after_the_bytes = |end| {
            let mut wire = FedWire {
                data: b"abc",
                end,
                sock: SocketWire::new(&sock),
            };
            let mut buf = [0u8; 8];
            assert_eq!(wire.read(&mut buf).unwrap(), 3);
            assert_eq!(&buf[..3], b"abc");
            wire.read(&mut buf)
        };
        let open = after_the_bytes(Fed::Open).unwrap_err();
        assert_eq!(open.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(after_the_bytes(Fed::Eof).unwrap(), 0);
        let failed = after_the_bytes(Fed::Failed("econnreset")).unwrap_err();
        assert_eq!(failed.kind(), io::ErrorKind::Other);
        assert_eq!(failed.to_string(), "econnreset");
    }

    #[test]
    fn a_frame_left_for_a_larger_limit_is_read_by_the_next_call() {
        let sizes = [100, 1 << 20, 5, 300_000];
        let stream = stream_of(&[1, 2, 3, 4], &sizes);
        // The first frame's end at a read's end: the large one starts a read of its own.
        let first = stream_of(&[1], &sizes[..1]).len();
        let (head, tail) = stream.split_at(first);
        let stats = PeerStats::default();
        let conn = ConnStats::default();
        let counters = Counters {
            peer: &stats,
            conn: &conn,
            stop: &AtomicBool::new(false),
        };
        let progress = Lanes::default().progress(b"a@h", 0, 1);
        let mut pump = Pump::new(Collect::default(), progress, 2 << 20);
        let limit = 256 * 1024;
        assert_eq!(
            pump.pump(
                &mut Trickle::new(head, 1 << 20),
                usize::MAX,
                limit,
                &counters
            )
            .unwrap(),
            Pumped::Ended
        );
        let mut wire = Trickle::new(tail, 1 << 20);
        let pumped = pump.pump(&mut wire, usize::MAX, limit, &counters).unwrap();
        assert_eq!(pumped, Pumped::Large);
        assert!(pump.next_len().is_some_and(|len| len > limit));
        assert_eq!(pump.sink_mut().frames.len(), 1, "the large frame waits");
        let pumped = pump
            .pump(&mut wire, usize::MAX, usize::MAX, &counters)
            .unwrap();
        assert_eq!(pumped, Pumped::Ended);
        let got: Vec<(u64, usize)> = pump
            .sink_mut()
            .frames
            .iter()
            .map(|(seq, body)| (*seq, body.len()))
            .collect();
        assert_eq!(got, [(1, 100), (2, 1 << 20), (3, 5), (4, 300_000)]);
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

    /// A connection of lane `lane` from `a@h`, handshake done.
    fn dialed(addr: SocketAddr, lane: u16) -> std::net::TcpStream {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        crate::handshake::dial(&mut s, b"a@h", b"b@h", b"c", lane, 7).unwrap();
        s
    }

    #[test]
    fn many_connections_are_read_by_a_fixed_set_of_threads() {
        use std::io::Write;
        let (l, acceptor, rx) = crate::testing::listener(SocketOpts::default());
        let lanes = 40;
        let mut socks: Vec<_> = (0..lanes).map(|n| dialed(l.local_addr(), n)).collect();
        // Every connection sends two frames, the second one large, in small pieces.
        for (n, s) in socks.iter_mut().enumerate() {
            let stream = stream_of(&[1, 2], &[n, 70_000 + n]);
            for piece in stream.chunks(9_000) {
                s.write_all(piece).unwrap();
            }
        }
        let mut sizes: Vec<usize> = (0..2 * lanes as usize)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap().1.len())
            .collect();
        sizes.sort();
        let mut expected: Vec<usize> = (0..lanes as usize).flat_map(|n| [n, 70_000 + n]).collect();
        expected.sort();
        assert_eq!(sizes, expected);
        let threads = acceptor.threads.lock().len();
        assert!(
            (1..=crate::poller::default_threads()).contains(&threads),
            "{lanes} connections were read on {threads} threads"
        );
        assert_eq!(l.connections(), lanes as usize);
        l.close();
        crate::testing::wait_for("every connection to end", || l.connections() == 0);
    }

    #[test]
    fn a_connection_that_closes_inside_a_frame_ends_alone() {
        use std::io::Write;
        let (l, _acceptor, rx) = crate::testing::listener(SocketOpts::default());
        let mut cut = dialed(l.local_addr(), 0);
        let mut other = dialed(l.local_addr(), 1);
        // Half of a large frame, then the connection closes.
        let stream = stream_of(&[1], &[200_000]);
        cut.write_all(&stream[..100_000]).unwrap();
        crate::testing::wait_for("the half frame to be read", || {
            l.incoming()
                .iter()
                .any(|c| c.bytes_in == 0 && c.peer.is_some())
        });
        drop(cut);
        crate::testing::wait_for("the cut connection to end", || l.connections() == 1);
        assert!(
            rx.try_recv().is_err(),
            "nothing of the cut frame is delivered"
        );
        // The other connection, on the same threads, goes on.
        other.write_all(&stream_of(&[1], &[5])).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap().1.len(), 5);
        l.close();
    }
}
