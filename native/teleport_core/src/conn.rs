//! One outgoing connection of a pool: a bounded queue, a writer thread, and a fast path that
//! writes straight from the sender's thread when the connection is idle.
//!
//! Order is kept because every frame of a connection is written by one party at a time, in
//! queue order: the sender writes directly only while the queue is empty and nobody else is
//! writing; otherwise the frame joins the queue behind the others. A sender writing directly
//! also takes, for a few rounds, the small frames others queued meanwhile and writes them with
//! one `writev` each round: concurrent small sends cost one syscall per batch, not per frame.
//!
//! Only the writer thread connects, so a pool is usable (frames queue) the moment it exists:
//! nothing is lost while connections come up.

use crate::deadline::Deadline;
use crate::frame::LEN_BYTES;
use crate::handshake::{self, HandshakeError};
use crate::out_frame::OutFrame;
use crate::sockopts::{self, SocketOpts};
use crate::stats::{unix_millis, ConnStats, PeerStats};
use parking_lot::{Condvar, Mutex};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// Frames up to this size may be written from the sender's thread (a normal scheduler):
/// a non-blocking write of this much is a memcpy of microseconds. Larger ones always go to
/// the writer thread.
pub const DIRECT_MAX: usize = 64 * 1024;

/// A sender writing directly takes frames others queued meanwhile for at most this many
/// more rounds (one non-blocking `writev` each): a normal scheduler is not held long.
const COMBINE_ROUNDS: usize = 8;

/// ... and only while the queue holds at most this many bytes; more is the writer's job.
const COMBINE_MAX: usize = 256 * 1024;

/// How many iovecs one `writev` gets (Linux's `IOV_MAX` is 1024).
const MAX_IOVECS: usize = 1024;

/// How long an idle writer sleeps before checking that the peer did not hang up.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// A connection idle for this long is checked (one non-blocking peek) before a frame is
/// written on it: a peer that closed it meanwhile (its teleport restarted) would otherwise
/// take the frame into a socket it no longer reads, and it would be lost without a trace.
const PROBE_AFTER_IDLE: Duration = Duration::from_millis(100);

/// The first wait after a failed connection attempt; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest wait between connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Where a pool's connections go, shared by them: the peer's listener can move (its
/// teleport application restarted on another port) while the node stays up, and then the
/// pool is pointed at the new place with its queues intact.
pub struct Target {
    addr: Mutex<SocketAddr>,
    stale: AtomicBool,
    /// Called when the pool becomes stale, so that its owner finds the listener again even
    /// if no one sends (the writers' queues would otherwise wait for ever).
    on_stale: OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// The largest frame body the peer reads, as its last handshake said (`usize::MAX`
    /// until one did).
    max_frame: AtomicUsize,
}

impl Target {
    /// A target at `addr`.
    pub fn new(addr: SocketAddr) -> Target {
        Target {
            addr: Mutex::new(addr),
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
    fn mark_stale(&self) {
        if !self.stale.swap(true, Relaxed) {
            if let Some(f) = self.on_stale.get() {
                f();
            }
        }
    }

    /// Points at `addr` and clears the stale mark.
    ///
    /// Returns whether the address changed.
    pub fn set(&self, addr: SocketAddr) -> bool {
        let changed = std::mem::replace(&mut *self.addr.lock(), addr) != addr;
        self.stale.store(false, Relaxed);
        changed
    }
}

/// How to reach and authenticate with a peer, and the queue limit.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// This node's name.
    pub me: Vec<u8>,
    /// The peer's node name; the handshake checks the peer claims it.
    pub peer: Vec<u8>,
    /// The shared secret (the Erlang cookie for the peer).
    pub cookie: Vec<u8>,
    /// Queued bytes above which senders are told the connection is busy.
    pub max_queue_bytes: usize,
    /// Bound on TCP connect.
    pub connect_timeout: Duration,
    /// Bound on the whole handshake.
    pub handshake_timeout: Duration,
    /// Options set on every socket before it connects.
    pub sock_opts: SocketOpts,
}

/// Why a frame was not accepted; the frame is handed back.
#[derive(Debug)]
pub enum SendError {
    /// The queue is over `max_queue_bytes`: retry later (or give up for `nosuspend`).
    Busy(OutFrame),
    /// The pool was torn down.
    Closed(OutFrame),
    /// The frame is larger than the peer reads (its `max_frame_bytes`): it would only close
    /// the connection.
    TooLarge(OutFrame),
}

/// What the connection is doing, for `teleport:info/0` and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// No socket yet, or the last one failed; the next frame makes the writer connect.
    Down,
    /// The writer is connecting or shaking hands.
    Connecting,
    /// Authenticated and writable.
    Up,
    /// Torn down for good.
    Closed,
}

struct State {
    queue: VecDeque<OutFrame>,
    /// Bytes in `queue` plus bytes the writer took and has not finished writing.
    queued: usize,
    sock: Option<Arc<Socket>>,
    /// The writer holds frames taken from the queue, or is connecting.
    writer_busy: bool,
    /// A sender is writing directly (its frame, then frames it took from the queue).
    direct_busy: bool,
    /// The direct writer's batch, kept between sends so that it is allocated once.
    spare: Vec<OutFrame>,
    /// The writer sleeps on `wake`.
    writer_waiting: bool,
    status: Status,
    last_error: Option<String>,
    /// Whether this slot ever had a connection (the next one counts as a reconnect).
    was_up: bool,
    /// Connections of this slot after its first.
    reconnects: u64,
    /// When the current socket finished its handshake.
    connected_since: Option<SystemTime>,
    /// When a frame was last written (or the socket came up).
    last_write: Instant,
}

/// A picture of one outgoing connection, for `teleport:info/0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// The slot's index in its pool.
    pub index: usize,
    /// What it is doing.
    pub status: Status,
    /// The peer's address: of the socket when connected, else where it connects to.
    pub peer_addr: SocketAddr,
    /// This end's address, when connected.
    pub local_addr: Option<SocketAddr>,
    /// Bytes queued and not yet written.
    pub queued_bytes: usize,
    /// Frames waiting in the queue (not counting those the writer is writing).
    pub frames_in_queue: usize,
    /// Messages written on this slot, over all its connections.
    pub msgs_out: u64,
    /// Bytes written on this slot, frame headers included.
    pub bytes_out: u64,
    /// What went wrong last (connecting, shaking hands or writing), if anything did.
    pub last_error: Option<String>,
    /// When the current connection came up, in milliseconds since the Unix epoch.
    pub connected_since: Option<u64>,
    /// Connections of this slot after its first.
    pub reconnects: u64,
    /// The socket's send and receive buffer sizes as the kernel reports them, when connected.
    pub buffers: Option<(usize, usize)>,
}

/// Why a connection attempt failed.
#[derive(Debug)]
enum ConnectError {
    /// Making, configuring, binding or connecting the socket.
    Socket(io::Error),
    /// The handshake, after TCP connected.
    Handshake(io::Error),
}

impl ConnectError {
    fn io(&self) -> &io::Error {
        match self {
            ConnectError::Socket(e) | ConnectError::Handshake(e) => e,
        }
    }
}

/// One outgoing connection.
pub struct Conn {
    index: usize,
    cfg: Arc<PeerConfig>,
    stats: Arc<PeerStats>,
    /// Shared by the pool: where to connect.
    target: Arc<Target>,
    state: Mutex<State>,
    wake: Condvar,
    /// What this slot wrote.
    counters: ConnStats,
}

impl Conn {
    /// A connection slot and its writer thread. Nothing connects until the first frame.
    pub fn start(
        index: usize,
        cfg: Arc<PeerConfig>,
        stats: Arc<PeerStats>,
        target: Arc<Target>,
    ) -> io::Result<Arc<Conn>> {
        let conn = Arc::new(Conn {
            index,
            cfg,
            stats,
            target,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                queued: 0,
                sock: None,
                writer_busy: false,
                direct_busy: false,
                spare: Vec::new(),
                writer_waiting: false,
                status: Status::Down,
                last_error: None,
                was_up: false,
                reconnects: 0,
                connected_since: None,
                last_write: Instant::now(),
            }),
            wake: Condvar::new(),
            counters: ConnStats::default(),
        });
        let c = conn.clone();
        std::thread::Builder::new()
            .name(format!("teleport_writer_{index}"))
            .spawn(move || {
                // A panic here must not unwind into nothing: log it and close the slot, dropping
                // (and counting) what it had queued, as the writer would have.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.run())).is_err() {
                    tracing::error!(
                        peer = %String::from_utf8_lossy(&c.cfg.peer),
                        index = c.index,
                        addr = %c.target.addr(),
                        reason = "the writer thread panicked; the slot is closed",
                        "writer_panicked"
                    );
                    c.close();
                    let mut st = c.state.lock();
                    st.writer_busy = false;
                    c.drop_queue(&mut st);
                }
            })?;
        Ok(conn)
    }

    /// Queues `frame`, or writes it at once if the connection is idle.
    ///
    /// A frame is refused as [`SendError::Busy`] only when others are queued and it would
    /// take the queue past `max_queue_bytes`, so a frame larger than the limit still goes
    /// through on an empty queue.
    pub fn send(&self, frame: OutFrame) -> Result<(), SendError> {
        let mut st = self.state.lock();
        if st.status == Status::Closed {
            return Err(SendError::Closed(frame));
        }
        if body_len(&frame) > self.target.max_frame() {
            return Err(SendError::TooLarge(frame));
        }
        if st.queue.is_empty() && !st.writer_busy && !st.direct_busy && frame.len() <= DIRECT_MAX {
            // One clock read per send: the write takes microseconds, so `now` serves as its
            // time too.
            let now = Instant::now();
            self.probe_if_idle(&mut st, now);
            if let Some(sock) = st.sock.clone() {
                st.direct_busy = true;
                st.last_write = now;
                let mut batch = std::mem::take(&mut st.spare);
                drop(st);
                batch.push(frame);
                self.write_direct(&sock, batch);
                return Ok(());
            }
        }
        self.enqueue(st, frame)
    }

    /// Queues `frame` behind the others, unless that takes the queue over its limit.
    fn enqueue(
        &self,
        mut st: parking_lot::MutexGuard<'_, State>,
        frame: OutFrame,
    ) -> Result<(), SendError> {
        let len = frame.remaining();
        if st.queued > 0 && st.queued + len > self.cfg.max_queue_bytes {
            return Err(SendError::Busy(frame));
        }
        st.queued += len;
        self.stats.queued_bytes.fetch_add(len as u64, Relaxed);
        st.queue.push_back(frame);
        // The writer sleeps with an empty queue only when idle; with frames queued it is
        // waiting out a reconnection backoff, which more frames should not cut short. A
        // direct writer takes the frame, or wakes the writer when it is done.
        if st.writer_waiting && st.queue.len() == 1 && !st.direct_busy {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Writes `batch` (one frame, the sender's own) from the sender's thread with
    /// non-blocking `writev`s, then, for a few rounds, whatever small frames other senders
    /// queued meanwhile. What cannot be written at once goes back to the front of the queue
    /// for the writer thread. Called with `direct_busy` set, which keeps everyone else from
    /// writing; clears it.
    fn write_direct(&self, sock: &Arc<Socket>, mut batch: Vec<OutFrame>) {
        // The sender's own frame is not counted in `queued`; frames taken from the queue are.
        let mut uncounted = batch[0].remaining();
        let mut rounds = 0;
        let (mut st, failed) = loop {
            let (mut msgs, mut bytes) = (0u64, 0u64);
            let result = write_once(sock, &mut batch, libc::MSG_DONTWAIT, &mut msgs, &mut bytes);
            self.stats.sent_many(msgs, bytes);
            self.counters.add(msgs, bytes);
            let written = *result.as_ref().unwrap_or(&0);
            let counted = written.saturating_sub(uncounted);
            uncounted -= written - counted;
            batch.retain(|f| f.remaining() > 0);
            let mut st = self.state.lock();
            self.uncount(&mut st, counted);
            match result {
                Ok(_) if batch.is_empty() => {
                    rounds += 1;
                    let same_sock = st.sock.as_ref().is_some_and(|s| Arc::ptr_eq(s, sock));
                    if rounds > COMBINE_ROUNDS
                        || st.queue.is_empty()
                        || st.queued > COMBINE_MAX
                        || !same_sock
                        || st.status == Status::Closed
                    {
                        break (st, None);
                    }
                    batch.extend(st.queue.drain(..));
                }
                // The socket is full: the writer thread goes on from where this stopped.
                Ok(_) => break (st, None),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break (st, None),
                Err(e) => break (st, Some(e)),
            }
        };
        // What is left goes back to the front, in order (the queue only holds newer frames),
        // counted in `queued` like any queued frame.
        if uncounted > 0 {
            st.queued += uncounted;
            self.stats.queued_bytes.fetch_add(uncounted as u64, Relaxed);
        }
        for f in batch.drain(..).rev() {
            st.queue.push_front(f);
        }
        if let Some(e) = failed {
            // Drops the frame cut in the middle, if any; the untouched ones go out again
            // first on the next connection.
            self.lost_socket(&mut st, &e);
        }
        st.spare = batch;
        st.direct_busy = false;
        if st.status == Status::Closed {
            // The writer may be gone already: what is left is dropped here, and counted.
            self.drop_queue(&mut st);
        } else if !st.queue.is_empty() && st.writer_waiting {
            self.wake.notify_one();
        }
    }

    /// Takes `bytes` written off the queued counts.
    fn uncount(&self, st: &mut State, bytes: usize) {
        if bytes > 0 {
            st.queued -= bytes;
            self.stats.queued_bytes.fetch_sub(bytes as u64, Relaxed);
        }
    }

    /// Wakes the writer to try connecting at once (the pool was pointed elsewhere).
    pub fn poke(&self) {
        let _st = self.state.lock();
        self.wake.notify_one();
    }

    /// Tears the connection down for good: queued frames are dropped and counted.
    pub fn close(&self) {
        let mut st = self.state.lock();
        if st.status == Status::Closed {
            return;
        }
        st.status = Status::Closed;
        st.connected_since = None;
        if let Some(sock) = st.sock.take() {
            self.stats.connections.fetch_sub(1, Relaxed);
            let addr = peer_addr(&sock).unwrap_or_else(|| self.target.addr());
            let _ = sock.shutdown(std::net::Shutdown::Both);
            tracing::info!(
                peer = %String::from_utf8_lossy(&self.cfg.peer),
                index = self.index,
                addr = %addr,
                reason = "pool closed",
                queued = st.queue.len(),
                "connection_closed"
            );
        }
        self.wake.notify_one();
    }

    /// Everything `teleport:info/0` shows of this connection.
    pub fn info(&self) -> ConnInfo {
        let (status, queued_bytes, frames_in_queue, last_error, since, reconnects, sock) = {
            let st = self.state.lock();
            (
                st.status,
                st.queued,
                st.queue.len(),
                st.last_error.clone(),
                st.connected_since,
                st.reconnects,
                st.sock.clone(),
            )
        };
        let (msgs_out, bytes_out) = self.counters.get();
        let peer_addr = sock
            .as_deref()
            .and_then(peer_addr)
            .unwrap_or_else(|| self.target.addr());
        let local_addr = sock
            .as_deref()
            .and_then(|s| s.local_addr().ok())
            .and_then(|a| a.as_socket());
        ConnInfo {
            index: self.index,
            status,
            peer_addr,
            local_addr,
            queued_bytes,
            frames_in_queue,
            msgs_out,
            bytes_out,
            last_error,
            connected_since: since.map(unix_millis),
            reconnects,
            buffers: sock.as_deref().map(sockopts::buffer_sizes),
        }
    }

    fn lost_socket(&self, st: &mut State, err: &io::Error) {
        if let Some(sock) = st.sock.take() {
            self.stats.connections.fetch_sub(1, Relaxed);
            let addr = peer_addr(&sock).unwrap_or_else(|| self.target.addr());
            tracing::warn!(
                peer = %String::from_utf8_lossy(&self.cfg.peer),
                index = self.index,
                addr = %addr,
                reason = %err,
                queued = st.queue.len(),
                "connection_lost"
            );
            st.last_error = Some(format!("connection to {addr} lost: {err}"));
        } else {
            st.last_error = Some(err.to_string());
        }
        // A frame begun on the lost socket cannot be finished on the next one (its rest would
        // open that connection with garbage): it is lost, and counted. Whoever was writing
        // puts its unwritten frames back at the front before calling this.
        if st.queue.front().is_some_and(OutFrame::started) {
            if let Some(cut) = st.queue.pop_front() {
                self.uncount(st, cut.remaining());
                self.stats.dropped.fetch_add(1, Relaxed);
            }
        }
        if st.status != Status::Closed {
            st.status = Status::Down;
        }
        st.connected_since = None;
    }

    /// Drops (and counts) the queued frames larger than the peer reads: they were queued
    /// before a handshake told its limit, or it changed (the peer restarted with another).
    fn drop_too_large(&self, st: &mut State) {
        let max = self.target.max_frame();
        let (before, mut bytes) = (st.queue.len(), 0);
        st.queue.retain(|f| {
            let keep = body_len(f) <= max;
            if !keep {
                bytes += f.remaining();
            }
            keep
        });
        let n = before - st.queue.len();
        if n > 0 {
            st.queued -= bytes;
            self.stats.queued_bytes.fetch_sub(bytes as u64, Relaxed);
            self.stats.dropped.fetch_add(n as u64, Relaxed);
            tracing::warn!(
                peer = %String::from_utf8_lossy(&self.cfg.peer),
                index = self.index,
                max_frame_bytes = max,
                dropped = n,
                reason = "larger than the peer's max_frame_bytes",
                "frames_too_large"
            );
        }
    }

    /// Drops every queued frame, counting them.
    fn drop_queue(&self, st: &mut State) {
        let n = st.queue.len() as u64;
        let bytes: usize = st.queue.iter().map(OutFrame::remaining).sum();
        st.queue.clear();
        st.queued -= bytes;
        self.stats.queued_bytes.fetch_sub(bytes as u64, Relaxed);
        self.stats.dropped.fetch_add(n, Relaxed);
    }

    /// The writer thread.
    fn run(&self) {
        let mut batch: Vec<OutFrame> = Vec::new();
        let mut backoff = FIRST_BACKOFF;
        loop {
            let mut st = self.state.lock();
            // A sender writing directly owns the socket until it is done (it wakes us then).
            while (st.queue.is_empty() || st.direct_busy) && st.status != Status::Closed {
                st.writer_waiting = true;
                let timed_out = self.wake.wait_for(&mut st, IDLE_CHECK).timed_out();
                st.writer_waiting = false;
                if timed_out && st.queue.is_empty() {
                    self.check_alive(&mut st);
                }
            }
            if st.status == Status::Closed {
                self.drop_queue(&mut st);
                return;
            }
            self.probe_if_idle(&mut st, Instant::now());
            let sock = match st.sock.clone() {
                Some(sock) => sock,
                None => {
                    st.writer_busy = true;
                    st.status = Status::Connecting;
                    drop(st);
                    let result = self.connect();
                    let mut st = self.state.lock();
                    st.writer_busy = false;
                    match result {
                        Ok(sock) if st.status != Status::Closed => {
                            backoff = FIRST_BACKOFF;
                            self.stats.connections.fetch_add(1, Relaxed);
                            if st.was_up {
                                self.stats.reconnects.fetch_add(1, Relaxed);
                                st.reconnects += 1;
                            }
                            st.was_up = true;
                            st.status = Status::Up;
                            st.connected_since = Some(SystemTime::now());
                            st.last_write = Instant::now();
                            st.sock = Some(Arc::new(sock));
                            self.drop_too_large(&mut st);
                        }
                        Ok(_) => {}
                        Err(err) => {
                            let e = err.io();
                            let refused = matches!(
                                e.kind(),
                                io::ErrorKind::ConnectionRefused | io::ErrorKind::PermissionDenied
                            );
                            let addr = self.target.addr();
                            // Once per run of failures: the next attempts (with a growing
                            // pause) are only in `teleport:info/0`'s last_error.
                            if backoff == FIRST_BACKOFF {
                                let peer = String::from_utf8_lossy(&self.cfg.peer);
                                let queued = st.queue.len();
                                match &err {
                                    ConnectError::Socket(_) => tracing::warn!(
                                        peer = %peer,
                                        index = self.index,
                                        addr = %addr,
                                        reason = %e,
                                        queued,
                                        "connect_failed"
                                    ),
                                    ConnectError::Handshake(_) => tracing::warn!(
                                        peer = %peer,
                                        index = self.index,
                                        addr = %addr,
                                        reason = %e,
                                        queued,
                                        "handshake_failed"
                                    ),
                                }
                            }
                            if st.status != Status::Closed {
                                st.status = Status::Down;
                            }
                            st.last_error = Some(match &err {
                                ConnectError::Socket(e) => format!("connect to {addr}: {e}"),
                                ConnectError::Handshake(e) => {
                                    format!("handshake with {addr}: {e}")
                                }
                            });
                            if refused {
                                // The peer is there but not listening or not letting us in
                                // where we thought: its listener must be found again.
                                parking_lot::MutexGuard::unlocked(&mut st, || {
                                    self.target.mark_stale()
                                });
                            }
                            // Queued frames stay: they go out once a connection is up, or are
                            // dropped (and counted) when the pool is closed at nodedown.
                            st.writer_waiting = true;
                            self.wake.wait_for(&mut st, backoff);
                            st.writer_waiting = false;
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                        }
                    }
                    continue;
                }
            };
            // Take what is queued; the frames' bytes stay counted in `queued` until written.
            batch.extend(st.queue.drain(..));
            let taken: usize = batch.iter().map(OutFrame::remaining).sum();
            st.writer_busy = true;
            drop(st);

            let result = write_all_blocking(&sock, &mut batch, &self.stats, &self.counters);
            let mut st = self.state.lock();
            st.writer_busy = false;
            st.last_write = Instant::now();
            // What was not written goes back to the front (still counted in `queued`).
            let mut requeued = 0;
            for f in batch.drain(..).rev().filter(|f| f.remaining() > 0) {
                requeued += f.remaining();
                st.queue.push_front(f);
            }
            self.uncount(&mut st, taken - requeued);
            if let Err(e) = result {
                // Drops the frame cut in the middle, if any; the untouched ones go out again
                // first on the next connection.
                self.lost_socket(&mut st, &e);
            }
        }
    }

    /// Checks the connection before writing on it if it has been idle a while.
    fn probe_if_idle(&self, st: &mut State, now: Instant) {
        if st.sock.is_some() && now.saturating_duration_since(st.last_write) >= PROBE_AFTER_IDLE {
            self.check_alive(st);
            // Probed: the next frames of a burst need not be.
            st.last_write = now;
        }
    }

    /// An idle connection whose peer closed it is found out here, not by the next message.
    fn check_alive(&self, st: &mut State) {
        let Some(sock) = st.sock.clone() else { return };
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT;
        match sock.recv_with_flags(&mut probe, flags) {
            Ok(0) => self.lost_socket(
                st,
                &io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the peer closed the connection",
                ),
            ),
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => self.lost_socket(st, &e),
            _ => {}
        }
    }

    fn connect(&self) -> Result<Socket, ConnectError> {
        let cfg = &self.cfg;
        let addr = self.target.addr();
        let sock = (|| {
            let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            cfg.sock_opts.apply(&sock)?;
            cfg.sock_opts.bind(&sock, addr)?;
            sock.connect_timeout(&SockAddr::from(addr), cfg.connect_timeout)?;
            Ok::<_, io::Error>(sock)
        })()
        .map_err(ConnectError::Socket)?;
        let max_frame = (|| {
            // One deadline for the whole handshake: a per-read timeout would let the peer
            // trickle.
            let mut stream = Deadline::after(&sock, cfg.handshake_timeout);
            // The slot index is the lane: a pool has at most `pool::MAX_SIZE` (< 2^16) slots.
            let lane = u16::try_from(self.index).unwrap_or(u16::MAX);
            let max_frame = handshake::dial(&mut stream, &cfg.me, &cfg.peer, &cfg.cookie, lane)
                .map_err(handshake_io)?;
            sock.set_read_timeout(None)?;
            sock.set_write_timeout(None)?;
            Ok::<_, io::Error>(max_frame)
        })()
        .map_err(ConnectError::Handshake)?;
        self.target.max_frame.store(max_frame as usize, Relaxed);
        let local = sock.local_addr().ok().and_then(|a| a.as_socket());
        tracing::info!(
            peer = %String::from_utf8_lossy(&cfg.peer),
            index = self.index,
            addr = %addr,
            local = %local.map(|a| a.to_string()).unwrap_or_default(),
            "connection_up"
        );
        Ok(sock)
    }
}

/// The length of a frame's body, as the peer's `max_frame_bytes` limits it.
fn body_len(frame: &OutFrame) -> usize {
    frame.len().saturating_sub(LEN_BYTES)
}

/// The address of the other end of a connected socket.
fn peer_addr(sock: &Socket) -> Option<SocketAddr> {
    sock.peer_addr().ok().and_then(|a| a.as_socket())
}

/// A handshake failure as an I/O error: socket errors keep their kind, refusals are
/// `PermissionDenied`.
pub fn handshake_io(e: HandshakeError) -> io::Error {
    match e {
        HandshakeError::Io(e) => io::Error::new(e.kind(), format!("handshake: {e}")),
        e => io::Error::new(io::ErrorKind::PermissionDenied, e.to_string()),
    }
}

/// One `writev` (non-blocking with `MSG_DONTWAIT` in `flags`) of as much of `batch` as the
/// iovec limit allows, skipping finished frames. Frames keep their progress; `msgs` and
/// `bytes` count the frames it completed. Returns the bytes written, whether or not
/// everything fit (the caller looks at what remains); `WouldBlock` if nothing did.
fn write_once(
    sock: &Socket,
    batch: &mut [OutFrame],
    flags: libc::c_int,
    msgs: &mut u64,
    bytes: &mut u64,
) -> io::Result<usize> {
    let first = batch
        .iter()
        .position(|f| f.remaining() > 0)
        .unwrap_or(batch.len());
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(8);
    for f in &batch[first..] {
        f.slices(&mut slices, MAX_IOVECS);
        if slices.len() >= MAX_IOVECS {
            break;
        }
    }
    let n = loop {
        match sock.send_vectored_with_flags(&slices, flags | libc::MSG_NOSIGNAL) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            other => break other?,
        }
    };
    drop(slices);
    let mut left = n;
    for f in &mut batch[first..] {
        if left == 0 {
            break;
        }
        left = f.advance(left);
        if f.remaining() == 0 {
            *msgs += 1;
            *bytes += f.len() as u64;
        }
    }
    Ok(n)
}

/// Writes every frame of `batch`, coalescing them into as few `writev` calls as the iovec
/// limit allows. On error, frames keep their progress so the caller can tell which are done.
fn write_all_blocking(
    sock: &Socket,
    batch: &mut [OutFrame],
    stats: &PeerStats,
    conn: &ConnStats,
) -> io::Result<()> {
    // Counted once per batch: two atomic additions per batch rather than per frame.
    let (mut msgs, mut bytes) = (0u64, 0u64);
    let result = write_frames(sock, batch, &mut msgs, &mut bytes);
    stats.sent_many(msgs, bytes);
    conn.add(msgs, bytes);
    result
}

fn write_frames(
    sock: &Socket,
    batch: &mut [OutFrame],
    msgs: &mut u64,
    bytes: &mut u64,
) -> io::Result<()> {
    while batch.last().is_some_and(|f| f.remaining() > 0) {
        write_once(sock, batch, 0, msgs, bytes)?;
    }
    Ok(())
}
