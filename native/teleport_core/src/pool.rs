//! A pool: `size` outgoing connections to one peer node. A message's connection is chosen
//! by hashing its (sender, destination) pair, so one pair always uses one connection (order
//! kept) while different pairs spread over the pool.

use crate::conn::{Conn, ConnInfo, PeerConfig, SendError};
use crate::out_frame::OutFrame;
use crate::stats::PeerStats;
use parking_lot::Mutex;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

/// Where a pool's connections go and the cookie they prove, shared by them: the peer's
/// listener can move (its teleport application restarted on another port) while the node
/// stays up, and an operator can fix a wrong cookie at runtime (`erlang:set_cookie/2`);
/// then the owner points the pool at the new place, with the cookie of the moment, and its
/// queues intact.
pub struct Target {
    addr: Mutex<SocketAddr>,
    cookie: Mutex<Vec<u8>>,
    stale: AtomicBool,
    /// Called when the pool becomes stale, so that its owner finds the listener again even
    /// if no one sends (the writers' queues would otherwise wait for ever).
    on_stale: OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// The largest frame body the peer reads, as its last handshake said (`usize::MAX`
    /// until one did).
    max_frame: AtomicUsize,
}

impl Target {
    /// A target at `addr`, to be proven with `cookie`.
    pub fn new(addr: SocketAddr, cookie: Vec<u8>) -> Target {
        Target {
            addr: Mutex::new(addr),
            cookie: Mutex::new(cookie),
            stale: AtomicBool::new(false),
            on_stale: OnceLock::new(),
            max_frame: AtomicUsize::new(usize::MAX),
        }
    }

    /// The largest frame body the peer reads, once a handshake said; `usize::MAX` before.
    pub fn max_frame(&self) -> usize {
        self.max_frame.load(Relaxed)
    }

    /// The current address.
    pub fn addr(&self) -> SocketAddr {
        *self.addr.lock()
    }

    /// The cookie to prove now.
    pub fn cookie(&self) -> Vec<u8> {
        self.cookie.lock().clone()
    }

    /// Whether the peer refused a connection: the owner should find its listener again.
    pub fn is_stale(&self) -> bool {
        self.stale.load(Relaxed)
    }

    /// Records the largest frame body the peer reads, as it told some other way than a
    /// handshake (which says it again on every connection).
    pub fn limit_frames(&self, max: usize) {
        self.max_frame.store(max, Relaxed);
    }

    /// Sets what to call when the pool becomes stale; only the first call counts.
    pub fn on_stale(&self, f: impl Fn() + Send + Sync + 'static) {
        let _ = self.on_stale.set(Box::new(f));
    }

    /// Marks the target stale: the peer refused us where we thought it listens. The owner is
    /// told once per stale spell (a retarget ends it), not on every refused attempt. Call it
    /// with no lock held: the owner may retarget the pool from the callback.
    pub(crate) fn mark_stale(&self) {
        if !self.stale.swap(true, Relaxed) {
            if let Some(f) = self.on_stale.get() {
                f();
            }
        }
    }

    /// Points at `addr` with `cookie` and clears the stale mark.
    ///
    /// Returns whether the address or the cookie changed.
    pub fn set(&self, addr: SocketAddr, cookie: &[u8]) -> bool {
        let moved = std::mem::replace(&mut *self.addr.lock(), addr) != addr;
        let rekeyed = {
            let mut c = self.cookie.lock();
            let rekeyed = *c != cookie;
            if rekeyed {
                *c = cookie.to_vec();
            }
            rekeyed
        };
        self.stale.store(false, Relaxed);
        moved || rekeyed
    }
}

/// The outgoing connections to one peer.
pub struct Pool {
    conns: Vec<Arc<Conn>>,
    stats: Arc<PeerStats>,
    target: Arc<Target>,
}

/// The most connections a pool has: each names its slot in the handshake as a 16-bit lane,
/// and far fewer already saturate any link.
pub const MAX_SIZE: usize = 1024;

impl Pool {
    /// Starts `size` connection slots (1 to [`MAX_SIZE`]) to the peer's listener at `addr`,
    /// proving `cookie`. They connect on first use. The pool is a new session for the peer:
    /// its lanes number their frames from 1.
    pub fn start(
        cfg: PeerConfig,
        addr: SocketAddr,
        cookie: &[u8],
        size: usize,
        stats: Arc<PeerStats>,
    ) -> io::Result<Pool> {
        let cfg = Arc::new(cfg);
        let target = Arc::new(Target::new(addr, cookie.to_vec()));
        let session = crate::handshake::random_id()?;
        let conns = (0..size.clamp(1, MAX_SIZE))
            .map(|i| Conn::start(i, session, cfg.clone(), stats.clone(), target.clone()))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Pool {
            conns,
            stats,
            target,
        })
    }

    /// Whether the peer refused a connection: the owner should find the peer's listener
    /// again and [`Pool::retarget`] the pool.
    pub fn is_stale(&self) -> bool {
        self.target.is_stale()
    }

    /// Refuses frames whose body is over `max` bytes from now on ([`SendError::TooLarge`]):
    /// the peer's `max_frame_bytes`, as its owner learnt before any handshake told it.
    ///
    /// [`SendError::TooLarge`]: crate::conn::SendError::TooLarge
    pub fn limit_frames(&self, max: usize) {
        self.target.limit_frames(max);
    }

    /// Sets what to call (from a connecting thread) when the pool becomes stale, so the owner can
    /// find the peer's listener again and [`Pool::retarget`] the pool without waiting for a
    /// send to notice. Only the first call counts.
    pub fn on_stale(&self, f: impl Fn() + Send + Sync + 'static) {
        self.target.on_stale(f);
    }

    /// Points every connection at `addr` (where the peer listens now), proving `cookie` (the
    /// one shared with the peer now), and has them try at once; what they hold goes out
    /// there, in order.
    ///
    /// At the same address with the same cookie, the connections keep waiting out their
    /// backoff: the owner re-discovers on every stale spell, and a peer that keeps refusing
    /// (another handshake version, say) must not make that a busy loop.
    pub fn retarget(&self, addr: SocketAddr, cookie: &[u8]) {
        if self.target.set(addr, cookie) {
            self.conns.iter().for_each(|c| c.poke());
        }
    }

    /// Hands `frame` to the connection of a (sender, destination) hash. A stale pool (its
    /// peer refused us where we thought it listens) takes nothing: [`SendError::Stale`],
    /// so that the caller has the owner find the listener again first.
    pub fn send(&self, pair_hash: u64, frame: OutFrame) -> Result<(), SendError> {
        if self.is_stale() {
            return Err(SendError::Stale(frame));
        }
        self.conn(pair_hash).send(frame)
    }

    /// The connection for a (sender, destination) hash.
    #[inline]
    pub fn conn(&self, pair_hash: u64) -> &Arc<Conn> {
        // Multiply-shift: the high bits of a product spread any hash evenly over the slots.
        let slot =
            ((pair_hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) * self.conns.len() as u64) >> 32;
        &self.conns[slot as usize]
    }

    /// Every connection, in index order.
    pub fn conns(&self) -> &[Arc<Conn>] {
        &self.conns
    }

    /// Where the pool connects to now.
    pub fn addr(&self) -> SocketAddr {
        self.target.addr()
    }

    /// A picture of every connection, in index order, for `teleport:info/0`.
    pub fn info(&self) -> Vec<ConnInfo> {
        self.conns.iter().map(|c| c.info()).collect()
    }

    /// The counters of this pool's peer.
    pub fn stats(&self) -> &Arc<PeerStats> {
        &self.stats
    }

    /// Tears every connection down; what was queued is dropped and counted.
    pub fn close(&self) {
        self.conns.iter().for_each(|c| c.close());
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::Status;
    use crate::listener::{ListenConfig, Listener};
    use crate::peers::Peers;
    use crate::sockopts::{Keepalive, SocketOpts};
    use crate::testing::*;
    use std::net::{Ipv4Addr, TcpListener};
    use std::sync::mpsc::channel;
    use std::time::Duration;

    #[test]
    fn idle_slots_never_wake_and_an_idle_connection_sees_its_peer_hang_up() {
        let (l, _acceptor, rx) = listener(SocketOpts::default());
        let stats = Arc::new(PeerStats::default());
        let pool = start(
            config(b"c", SocketOpts::default()),
            l.local_addr(),
            2,
            stats,
        )
        .unwrap();
        send(&pool, 0, b"x");
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        // Its ack read (not only no frame waiting for one: the writer that wrote it may not
        // have put it there yet, and its ack would then wake the slot while it idles).
        wait_for("the ack", || {
            pool.info()
                .iter()
                .all(|c| c.unacked_frames == 0 && c.last_acked == (c.msgs_out > 0) as u64)
        });
        let info = pool.info();
        let up: Vec<usize> = info
            .iter()
            .filter(|c| c.status == Status::Up)
            .map(|c| c.index)
            .collect();
        assert_eq!(up.len(), 1, "{info:?}");
        // Settled: the writer thread, which serves the other tests' lanes too, may run the
        // slot's first turn (it had nothing to write) only after the ack was read.
        let wakeups = || -> Vec<u64> { pool.conns().iter().map(|c| c.wakeups()).collect() };
        let mut before = wakeups();
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = wakeups();
            if now == before {
                break;
            }
            before = now;
        }
        // Idle for 1.5 s: neither slot wakes, connected or never used.
        std::thread::sleep(Duration::from_millis(1500));
        let after = wakeups();
        assert_eq!(before, after, "wake-ups of idle slots");
        assert_eq!(after[1 - up[0]], 0, "the slot never used ran");
        // The peer's teleport stops: the idle connection sees it at once, sending nothing.
        l.close();
        wait_for("the connection to go down", || {
            pool.info()[up[0]].status == Status::Down
        });
    }

    #[test]
    fn frames_go_through_and_every_counter_shows_them() {
        let opts = SocketOpts {
            sndbuf: Some(256 * 1024),
            recbuf: Some(256 * 1024),
            keepalive: Some(Keepalive {
                time: Some(Duration::from_secs(60)),
                ..Keepalive::default()
            }),
            ..SocketOpts::default()
        };
        let (l, acceptor, rx) = listener(opts.clone());
        let stats = Arc::new(PeerStats::default());
        let pool = start(config(b"c", opts), l.local_addr(), 2, stats.clone()).unwrap();
        assert_eq!(pool.addr(), l.local_addr());
        assert_eq!(pool.conns().len(), 2);
        assert!(Arc::ptr_eq(pool.stats(), &stats));
        assert!(pool
            .info()
            .iter()
            .all(|c| c.status == Status::Down && c.local_addr.is_none()));
        // Small frames (written from this thread once up), a large one (the writer's), and
        // many at once (a batch).
        send(&pool, 1, b"first");
        let big = vec![7u8; 300_000];
        send(&pool, 1, &big);
        for i in 0..100u32 {
            send(&pool, 1, &i.to_be_bytes());
        }
        let mut got = Vec::new();
        while got.len() < 102 {
            let (peer, body) = rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("{e}: {:?}", pool.info()));
            assert_eq!(peer, b"a@h");
            got.push(body);
        }
        assert_eq!(got[0], b"first");
        assert_eq!(got[1], big);
        assert_eq!(got[101], 99u32.to_be_bytes());
        let bytes: u64 = got.iter().map(|b| (b.len() + OVERHEAD) as u64).sum();
        wait_for("counters", || stats.snapshot().msgs_out == 102);
        assert_eq!(stats.snapshot().bytes_out, bytes);
        let info = pool.info();
        let used: Vec<_> = info.iter().filter(|c| c.msgs_out > 0).collect();
        assert_eq!(used.len(), 1);
        let c = used[0];
        assert_eq!(
            (c.status, c.msgs_out, c.bytes_out),
            (Status::Up, 102, bytes)
        );
        assert_eq!(c.peer_addr, l.local_addr());
        assert_eq!(c.local_addr.unwrap().ip(), Ipv4Addr::LOCALHOST);
        assert!(c.connected_since.unwrap() > 1_600_000_000_000);
        assert_eq!(c.buffers.unwrap().0, 2 * 256 * 1024);
        assert_eq!((c.queued_bytes, c.frames_in_queue, c.reconnects), (0, 0, 0));
        assert_eq!(c.last_error, None);
        // The listener's side of the same connection.
        wait_for("incoming counters", || {
            l.incoming().iter().map(|i| i.msgs_in).sum::<u64>() == 102
        });
        let incoming = l.incoming();
        assert_eq!(incoming.len(), 1);
        let i = &incoming[0];
        assert_eq!(i.peer.as_deref(), Some(&b"a@h"[..]));
        assert_eq!(i.peer_addr, c.local_addr);
        assert_eq!(i.local_addr, Some(l.local_addr()));
        assert_eq!(i.bytes_in, bytes);
        assert_eq!(i.buffers.1, 2 * 256 * 1024);
        assert_eq!(l.handshaking(), 0);
        assert_eq!(l.connections(), 1);
        let peer_stats = acceptor.peers.stats(b"a@h").snapshot();
        assert_eq!((peer_stats.msgs_in, peer_stats.connections_in), (102, 1));
        assert_eq!(stats.snapshot().connections, 1);
        // Closing: the connection goes, the counters stay.
        pool.close();
        let c = &pool.info()[c.index];
        assert_eq!((c.status, c.msgs_out), (Status::Closed, 102));
        assert!(matches!(
            pool.conn(1).send(frame(b"late")),
            Err(SendError::Closed(_))
        ));
        wait_for("the reader to end", || l.connections() == 0);
        l.close();
        l.close();
    }

    #[test]
    fn a_wrong_cookie_is_a_handshake_failure_and_marks_the_pool_stale() {
        let (l, _acceptor, rx) = listener(SocketOpts::default());
        let (pool, _) = one_slot(config(b"wrong", SocketOpts::default()), l.local_addr());
        send(&pool, 0, b"x");
        wait_for("the stale mark", || pool.is_stale());
        let c = &pool.info()[0];
        assert_eq!(c.status, Status::Down);
        let err = c.last_error.clone().unwrap();
        assert!(
            err.starts_with(&format!("handshake with {}: ", l.local_addr())),
            "{err}"
        );
        // The frame waits for a connection that works: at the same place, now allowed in.
        assert_eq!(c.frames_in_queue, 1);
        assert!(rx.try_recv().is_err());
        l.close();
        pool.close();
    }

    #[test]
    fn a_peer_that_keeps_refusing_is_retried_with_backoff_not_in_a_loop() {
        // The owner re-discovers on every stale notice and finds the same address (a peer
        // that keeps rejecting the handshake, e.g. one speaking another version).
        let (l, _acceptor, _rx) = listener(SocketOpts::default());
        let (pool, _) = one_slot(config(b"wrong", SocketOpts::default()), l.local_addr());
        let pool = Arc::new(pool);
        let told = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (p, t, addr) = (Arc::downgrade(&pool), told.clone(), l.local_addr());
        pool.on_stale(move || {
            t.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // As teleport_server does: a moment later, from another thread.
            let p = p.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(5));
                if let Some(p) = p.upgrade() {
                    p.retarget(addr, b"c");
                }
            });
        });
        send(&pool, 0, b"x");
        std::thread::sleep(Duration::from_millis(700));
        // Attempts at 0, 50, 150, 350 ms (the backoff doubles): a handful, not hundreds.
        let n = told.load(std::sync::atomic::Ordering::SeqCst);
        assert!((1..=6).contains(&n), "{n} stale notices in 700 ms");
        pool.close();
        l.close();
    }

    #[test]
    fn a_refused_connection_is_named_and_the_pool_follows_a_retarget() {
        // A port nobody listens on.
        let gone = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let nowhere = gone.local_addr().unwrap();
        drop(gone);
        let (pool, stats) = one_slot(config(b"c", SocketOpts::default()), nowhere);
        // The owner is told, without a send having to notice: once per stale spell however
        // many attempts are refused.
        let told = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let t = told.clone();
        pool.on_stale(move || {
            t.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        send(&pool, 0, b"queued while down");
        wait_for("the stale mark", || pool.is_stale());
        // Attempts at 0, 50 and 150 ms (the backoff doubles): three refusals, one call.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(told.load(std::sync::atomic::Ordering::SeqCst), 1);
        let err = pool.info()[0].last_error.clone().unwrap();
        assert!(err.starts_with(&format!("connect to {nowhere}: ")), "{err}");
        assert_eq!(pool.info()[0].peer_addr, nowhere);
        // The peer's listener is found elsewhere: what was queued goes there.
        let (l, _acceptor, rx) = listener(SocketOpts::default());
        pool.retarget(l.local_addr(), b"c");
        assert!(!pool.is_stale());
        let (_, body) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(body, b"queued while down");
        // The listener goes away with the connection: it is lost, and the next one counts as
        // a reconnection.
        l.close();
        wait_for("the connection to be lost", || {
            pool.info()[0].status != Status::Up
        });
        let (l2, _acceptor2, rx2) = listener(SocketOpts::default());
        pool.retarget(l2.local_addr(), b"c");
        send(&pool, 0, b"after");
        let (_, body) = rx2.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(body, b"after");
        wait_for("the reconnect count", || pool.info()[0].reconnects == 1);
        assert_eq!(stats.snapshot().reconnects, 1);
        pool.close();
        l2.close();
    }

    #[test]
    fn frames_over_the_peers_limit_are_refused_or_dropped_never_sent() {
        // The listener reads frames of up to 1 MiB, and its handshake says so.
        let (l, _acceptor, rx) = listener(SocketOpts::default());
        let mut cfg = config(b"c", SocketOpts::default());
        cfg.0.max_queue_bytes = 8 << 20;
        let (pool, stats) = one_slot(cfg, l.local_addr());
        let big = vec![1u8; 2 << 20];
        // Told by the owner (as discovery does), the limit holds before any handshake.
        pool.limit_frames(1 << 20);
        assert!(matches!(
            pool.conn(0).send(frame(&big)),
            Err(SendError::TooLarge(_))
        ));
        // Not told (usize::MAX: unknown): queued, then dropped and counted once the
        // connection's handshake says the limit, instead of closing the connection.
        pool.limit_frames(usize::MAX);
        send(&pool, 0, &big);
        send(&pool, 0, b"after");
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap().1,
            b"after"
        );
        assert_eq!(stats.snapshot().dropped, 1);
        // Now it is known: refused at once.
        assert!(matches!(
            pool.conn(0).send(frame(&big)),
            Err(SendError::TooLarge(_))
        ));
        // The limit counts the whole body (the header is part of it).
        let fits = vec![2u8; (1 << 20) - (OVERHEAD - 4)];
        send(&pool, 0, &fits);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap().1, fits);
        assert_eq!(pool.info()[0].reconnects, 0);
        pool.close();
        l.close();
    }

    #[test]
    fn a_frame_after_the_peer_closed_an_idle_connection_is_not_lost() {
        let (l, _acceptor, rx) = listener(SocketOpts::default());
        let (pool, _) = one_slot(config(b"c", SocketOpts::default()), l.local_addr());
        send(&pool, 0, b"first");
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap().1,
            b"first"
        );
        // The peer's teleport stops (its sockets are shut: a FIN arrives) and starts again
        // elsewhere at once.
        l.close();
        std::thread::sleep(Duration::from_millis(150));
        let (l2, _acceptor2, rx2) = listener(SocketOpts::default());
        pool.retarget(l2.local_addr(), b"c");
        // Written into the closed socket, this frame would be lost without a trace.
        send(&pool, 0, b"second");
        let (_, body) = rx2.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(body, b"second");
        pool.close();
        l2.close();
    }

    #[test]
    fn a_full_queue_is_busy_and_closing_drops_and_counts_it() {
        // Accepts but never answers the handshake: frames queue meanwhile.
        let mute = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let mut cfg = config(b"c", SocketOpts::default());
        cfg.0.max_queue_bytes = 1000;
        cfg.0.handshake_timeout = Duration::from_secs(5);
        let stats = Arc::new(PeerStats::default());
        let pool = start(cfg, mute.local_addr().unwrap(), 1, stats.clone()).unwrap();
        send(&pool, 0, &[1; 600]);
        wait_for("connecting", || pool.info()[0].status == Status::Connecting);
        // Over the limit with others queued: busy. On an empty queue a big frame goes in.
        assert!(matches!(
            pool.conn(0).send(frame(&[2; 600])),
            Err(SendError::Busy(_))
        ));
        send(&pool, 0, &[3; 10]);
        let c = &pool.info()[0];
        assert_eq!((c.queued_bytes, c.frames_in_queue), (610 + 2 * OVERHEAD, 2));
        assert_eq!(stats.snapshot().queued_bytes, (610 + 2 * OVERHEAD) as u64);
        pool.close();
        wait_for("the queue to be dropped", || stats.snapshot().dropped == 2);
        assert_eq!(stats.snapshot().queued_bytes, 0);
        drop(mute);
    }

    #[test]
    fn a_frame_the_sink_refuses_closes_only_its_connection() {
        let (l, _acceptor, rx) = listener(SocketOpts::default());
        let (pool, _) = one_slot(config(b"c", SocketOpts::default()), l.local_addr());
        send(&pool, 0, b"one");
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap().1, b"one");
        send(&pool, 0, b"poison");
        // The reader closed the connection; the writer finds out and connects again.
        wait_for("a reconnection", || {
            send(&pool, 0, b"probe");
            std::thread::sleep(Duration::from_millis(20));
            pool.info()[0].reconnects >= 1
        });
        pool.close();
        l.close();
    }

    #[test]
    fn a_socket_option_the_kernel_refuses_stops_the_listener_from_starting() {
        let (tx, _rx) = channel();
        let acceptor = Arc::new(TestAcceptor {
            me: b"b@h".to_vec(),
            peers: Peers::default(),
            tx: parking_lot::Mutex::new(tx),
            gate: Arc::default(),
            threads: Arc::default(),
        });
        let cfg = ListenConfig {
            max_frame_bytes: 1 << 20,
            handshake_timeout: Duration::from_secs(1),
            sock_opts: SocketOpts {
                priority: Some(u32::MAX),
                ..SocketOpts::default()
            },
            thread_nice: 0,
            poll_threads: crate::poller::default_threads(),
            tls: None,
        };
        let err = Listener::start((Ipv4Addr::LOCALHOST, 0).into(), cfg, acceptor)
            .err()
            .unwrap();
        let named = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<crate::sockopts::SockOptError>())
            .unwrap();
        assert_eq!(named.option, "priority");
    }

    #[test]
    fn an_outgoing_connection_binds_to_bind_ip() {
        let (l, _acceptor, rx) = listener(SocketOpts::default());
        let opts = SocketOpts {
            bind_ip: Some("127.0.0.3".parse().unwrap()),
            ..SocketOpts::default()
        };
        let pool = start(config(b"c", opts), l.local_addr(), 1, Default::default()).unwrap();
        send(&pool, 0, b"hi");
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let local = pool.info()[0].local_addr.unwrap();
        assert_eq!(local.ip().to_string(), "127.0.0.3");
        assert_eq!(l.incoming()[0].peer_addr.unwrap().ip(), local.ip());
        pool.close();
        l.close();
    }

    #[test]
    fn slots_spread_evenly() {
        let n = 4u64;
        let mut counts = [0u32; 4];
        for h in 0..10_000u64 {
            let slot = ((h.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) * n) >> 32;
            counts[slot as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (2200..2800).contains(&c)),
            "{counts:?}"
        );
    }
}
