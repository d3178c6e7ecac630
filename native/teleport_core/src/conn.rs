//! One outgoing connection of a pool (one *lane*): a bounded queue, a fast path that writes
//! straight from the sender's thread when the connection is idle, a task on one of the
//! writer threads shared by every pool (see [`crate::poller`]) that writes the rest as the
//! socket takes it and reads the acks as they come, and the frames written but not yet
//! acknowledged, kept to be sent again if the connection dies.
//!
//! A frame's life on its lane:
//! 1. [`Conn::send`] accepts it: its bytes are *held* (counted against `max_queue_bytes`)
//!    until the peer acknowledges it or it is dropped. Frames are only refused, never lost
//!    here: `Busy` when the lane holds too much, `Closed` after nodedown.
//! 2. It is written, in lane order, by one party at a time: the sender itself when the
//!    connection is idle (queue empty, nobody writing), else the connection's writer task,
//!    without blocking, whenever the socket has room. A sender
//!    writing directly also takes, for a few rounds, the small frames others queued
//!    meanwhile and writes them with one `writev` each round: concurrent small sends cost one
//!    syscall per batch, not per frame. When it first goes out on a connection it is
//!    stamped with the lane's next sequence number (see [`crate::frame`]).
//! 3. Written whole, it waits in `unacked` for the peer's cumulative ack (see
//!    [`crate::acks`]), which the writer task reads when they arrive (and senders now and
//!    then), without blocking.
//! 4. If the connection dies first, every unacknowledged frame goes back to the front of the
//!    queue, in order. The next connection's handshake says what the peer delivered: those
//!    frames are released, the rest are written again (and the peer drops any it had
//!    already). Only a new incarnation of the peer's teleport, which cannot know what the
//!    old one delivered, makes the lane drop (and count) what it had written.
//!
//! A lane connects when it has frames and no connection: a short-lived thread of its own
//! connects and shakes hands (waiting out a growing backoff between failed attempts), then
//! hands the socket to a writer thread and ends. So a pool is usable (frames queue) the
//! moment it exists, nothing is lost while connections come up, and an idle lane, connected
//! or not, costs no thread and no wake-up: a peer that hangs up is seen when its socket
//! says so.

use crate::acks::AckReader;
use crate::deadline::Deadline;
use crate::frame::LEN_BYTES;
use crate::handshake::{self, HandshakeError, Welcome};
use crate::out_frame::OutFrame;
use crate::poller::{self, Handle, Next, Poller, Task};
use crate::pool::Target;
use crate::secure::{self, Link, Opening};
use crate::sockopts::{self, SocketOpts};
use crate::stats::{unix_millis, ConnStats, PeerStats};
use crate::tls::Tls;
use parking_lot::{Condvar, Mutex, MutexGuard};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Frames up to this size may be written from the sender's thread (a normal scheduler):
/// a non-blocking write of this much is a memcpy of microseconds. Larger ones always go to
/// the writer task.
pub const DIRECT_MAX: usize = 64 * 1024;

/// A sender writing directly takes frames others queued meanwhile for at most this many
/// more rounds (one non-blocking `writev` each): a normal scheduler is not held long.
const COMBINE_ROUNDS: usize = 8;

/// ... and only while the queue holds at most this many bytes; more is the writer's job.
const COMBINE_MAX: usize = 256 * 1024;

/// How many iovecs one `writev` gets (Linux's `IOV_MAX` is 1024).
const MAX_IOVECS: usize = 1024;

/// What a writer task writes per turn before its thread serves the other lanes (the rest
/// goes at its next turn, straight after).
const TURN_BYTES: usize = 4 * 1024 * 1024;

/// How many frames a writer task takes from the lane's queue at a time (as many as one
/// `writev` can write), within what is left of its turn: what the socket does not take goes
/// back to the queue's front. Taking the whole queue moved every frame of a long queue out
/// and most of them back at each write: 10% of a flooded sender node's CPU with 8 senders
/// of 100-byte messages. (A cap in bytes, 256 KB, was tried: it made large frames' writes
/// smaller, and one sender of 256 KB messages ran at half the rate.)
const TAKE_FRAMES: usize = MAX_IOVECS;

/// A sender writing directly reads acks after this many frames written since they were last
/// read: about one `recv` per ack the peer sends ([`crate::acks::ACK_FRAMES`]).
const ACK_READ_EVERY: u32 = 32;

/// Frames that come less than this after the lane's last write, more than [`FLOOD_AFTER`]
/// times in a row, are queued for the writer task instead of written from the sender's
/// thread. One sender of small messages would otherwise make one `writev` per message
/// (measured: a third of the schedulers' time in `sendmsg`, 0.3x disterl's rate); queued,
/// they go out dozens per `writev` while the writer thread wakes.
const COALESCE: Duration = Duration::from_micros(30);

/// ... and so a few frames at once (the replies to a handful of callers, a ping) still go
/// straight out, without waiting for the writer thread to wake: a caller waits a round
/// trip between calls, so replies to fewer callers than this never flood a lane.
const FLOOD_AFTER: u32 = 8;

/// A connection idle for this long is checked (one non-blocking read) before a frame is
/// written on it: a peer that closed it meanwhile (its teleport restarted) is found out
/// before the frame goes into a socket nobody reads.
const PROBE_AFTER_IDLE: Duration = Duration::from_millis(100);

/// The first wait after a failed connection attempt; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest wait between connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How to reach and authenticate with a peer, and the queue limit. Where the peer listens,
/// and the cookie, are the pool's [`Target`]: they can change while the pool lives.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// This node's name.
    pub me: Vec<u8>,
    /// The peer's node name; the handshake checks the peer claims it.
    pub peer: Vec<u8>,
    /// Bytes held (queued or waiting for their ack) above which senders are told the
    /// connection is busy.
    pub max_queue_bytes: usize,
    /// Bound on TCP connect.
    pub connect_timeout: Duration,
    /// Bound on the whole handshake.
    pub handshake_timeout: Duration,
    /// Options set on every socket before it connects.
    pub sock_opts: SocketOpts,
    /// How much lower than the VM's the priority of the writer and connecting threads is (a
    /// nice value, see [`crate::threads::spawn`]; the writer threads, shared by every pool,
    /// take the first pool's).
    pub thread_nice: u8,
    /// The node's TLS: every connection runs inside a session, the acceptor's certificate
    /// checked against the host of `peer` ([`crate::tls`]); `None`: plain.
    pub tls: Option<Arc<Tls>>,
}

/// Why a frame was not accepted; the frame is handed back.
#[derive(Debug)]
pub enum SendError {
    /// The lane holds more than `max_queue_bytes`: retry later (or give up for `nosuspend`).
    Busy(OutFrame),
    /// The pool was torn down.
    Closed(OutFrame),
    /// The frame is larger than the peer reads (its `max_frame_bytes`): it would only close
    /// the connection.
    TooLarge(OutFrame),
    /// The pool is stale: the peer refused it where it thought the peer listens. Its owner
    /// must find the listener again (see [`crate::pool::Pool::send`]).
    Stale(OutFrame),
}

/// What the connection is doing, for `teleport:info/0` and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// No socket yet, or the last one failed; the next frame makes the lane connect.
    Down,
    /// The lane is connecting or shaking hands.
    Connecting,
    /// Authenticated and writable.
    Up,
    /// Torn down for good.
    Closed,
}

struct State {
    /// Accepted and not yet written whole on the current connection, in lane order. Those
    /// at the front may have gone out on a lost connection: they go out again.
    queue: VecDeque<OutFrame>,
    /// Written whole on the current connection, waiting for the peer's ack, in lane order.
    unacked: VecDeque<OutFrame>,
    /// Bytes of every frame the lane holds: queued, being written, or in `unacked`. Changed
    /// only by [`Conn::hold`] and [`Conn::release`].
    held: usize,
    /// Bytes of the frames in `unacked`.
    unacked_bytes: usize,
    /// Frames the writer task took from the queue and is writing (counted if it panics).
    in_batch: usize,
    /// The number the next frame to go out gets.
    next_seq: u64,
    /// The highest number the peer acknowledged on this lane (or said it delivered, at the
    /// last handshake).
    acked: u64,
    /// The peer's listener, as the last handshake named it.
    incarnation: Option<u64>,
    /// The acks coming back on the current connection, as they are read.
    acks: AckReader,
    /// Frames written since acks were last read.
    since_ack_read: u32,
    /// The current connection, plain or through its TLS session.
    sock: Option<Arc<Link>>,
    /// The writer task of `sock`, once a writer thread has it.
    task: Option<Handle>,
    /// The writer task was poked and has not run since.
    poked: bool,
    /// A thread is connecting (or waiting out its backoff to).
    connecting: bool,
    /// The writer task holds frames taken from the queue.
    writer_busy: bool,
    /// A sender is writing directly (its frame, then frames it took from the queue).
    direct_busy: bool,
    /// The direct writer's batch, kept between sends so that it is allocated once.
    spare: Vec<OutFrame>,
    /// Times a writer task ran (an idle lane's cost; read by tests).
    wakeups: u64,
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
    /// Frames in a row that came less than [`COALESCE`] after the last write.
    close_behind: u32,
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
    /// Bytes queued and not yet written whole on the current connection.
    pub queued_bytes: usize,
    /// Frames waiting in the queue (not counting those the writer is writing).
    pub frames_in_queue: usize,
    /// Frames written whole and not yet acknowledged.
    pub unacked_frames: usize,
    /// Their bytes.
    pub unacked_bytes: usize,
    /// The sequence number of the last frame the peer acknowledged (0: none yet).
    pub last_acked: u64,
    /// Messages written on this slot, over all its connections (a resent one once).
    pub msgs_out: u64,
    /// Bytes written on this slot, frame headers included.
    pub bytes_out: u64,
    /// `writev` calls made on this slot (`msgs_out / writes`: messages per system call).
    pub writes: u64,
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
    /// The pool's session: the peer numbers what each of the pool's lanes delivered in it.
    session: u64,
    cfg: Arc<PeerConfig>,
    stats: Arc<PeerStats>,
    /// Shared by the pool: where to connect, and with which cookie.
    target: Arc<Target>,
    state: Mutex<State>,
    /// Cuts a connecting thread's backoff short (the pool was pointed elsewhere, or closed).
    wake: Condvar,
    /// What this slot wrote.
    counters: ConnStats,
    /// The writer threads, shared by every pool.
    writers: Arc<Poller<Writer>>,
}

/// The writer threads of every pool, started with the first.
fn writers(nice: u8) -> io::Result<Arc<Poller<Writer>>> {
    // Behind a lock, not a `OnceLock`: two first pools at once must not start two sets.
    static WRITERS: Mutex<Option<Arc<Poller<Writer>>>> = Mutex::new(None);
    let mut writers = WRITERS.lock();
    if writers.is_none() {
        *writers = Some(Poller::start(
            poller::default_threads(),
            "teleport_writer",
            nice,
        )?);
    }
    Ok(writers.as_ref().expect("started").clone())
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("index", &self.index)
            .field("peer", &String::from_utf8_lossy(&self.cfg.peer))
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// A connection slot of the pool's `session`. Nothing connects until the first frame.
    pub fn start(
        index: usize,
        session: u64,
        cfg: Arc<PeerConfig>,
        stats: Arc<PeerStats>,
        target: Arc<Target>,
    ) -> io::Result<Arc<Conn>> {
        let writers = writers(cfg.thread_nice)?;
        Ok(Arc::new(Conn {
            index,
            session,
            cfg,
            stats,
            target,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                unacked: VecDeque::new(),
                held: 0,
                unacked_bytes: 0,
                in_batch: 0,
                next_seq: 1,
                acked: 0,
                incarnation: None,
                acks: AckReader::default(),
                since_ack_read: 0,
                sock: None,
                task: None,
                poked: false,
                connecting: false,
                writer_busy: false,
                direct_busy: false,
                spare: Vec::new(),
                wakeups: 0,
                status: Status::Down,
                last_error: None,
                was_up: false,
                reconnects: 0,
                connected_since: None,
                last_write: Instant::now(),
                close_behind: 0,
            }),
            wake: Condvar::new(),
            counters: ConnStats::default(),
            writers,
        }))
    }

    /// Takes `frame` for the lane: writes it at once if the connection is idle, else queues
    /// it behind the others.
    ///
    /// A frame is refused as [`SendError::Busy`] only when the lane already holds frames
    /// (queued or unacknowledged) and this one would take it past `max_queue_bytes`, so a
    /// frame larger than the limit still goes through on an empty lane.
    pub fn send(self: &Arc<Self>, mut frame: OutFrame) -> Result<(), SendError> {
        let mut st = self.state.lock();
        if st.status == Status::Closed {
            return Err(SendError::Closed(frame));
        }
        if body_len(&frame) > self.target.max_frame() {
            return Err(SendError::TooLarge(frame));
        }
        let len = frame.len();
        if self.over_limit(&st, len) {
            // Frames waiting for their ack hold the lane too, and the peer may have
            // acknowledged some already: read its acks before saying busy.
            if !st.writer_busy && !st.direct_busy {
                self.read_acks(&mut st);
            }
            if self.over_limit(&st, len) {
                return Err(SendError::Busy(frame));
            }
        }
        self.hold(&mut st, len);
        if st.queue.is_empty() && !st.writer_busy && !st.direct_busy && len <= DIRECT_MAX {
            // One clock read per send: the write takes microseconds, so `now` serves as its
            // time too.
            let now = Instant::now();
            // A lane flooded by frames close behind each other: this one joins the queue
            // and the writer task takes what gathers there in one `writev` (see COALESCE).
            // Measured before the probe, which counts as a write.
            st.close_behind = match now.saturating_duration_since(st.last_write) < COALESCE {
                true => st.close_behind.saturating_add(1),
                false => 0,
            };
            let flooded = st.close_behind >= FLOOD_AFTER;
            self.probe_if_idle(&mut st, now);
            if let Some(sock) = st.sock.as_ref().filter(|_| !flooded).cloned() {
                st.direct_busy = true;
                st.last_write = now;
                frame.stamp(st.next_seq);
                st.next_seq += 1;
                let mut batch = std::mem::take(&mut st.spare);
                drop(st);
                batch.push(frame);
                self.write_direct(&sock, batch);
                return Ok(());
            }
        }
        st.queue.push_back(frame);
        // A direct writer takes the frame, or kicks the lane when it is done.
        if !st.direct_busy {
            self.kick(&mut st);
        }
        Ok(())
    }

    /// Sees to it that the frames queued go out: pokes the writer task (once until it runs),
    /// or, with no connection, starts connecting (once: a thread that waits out its backoff
    /// takes the new frames along). Nothing to do if someone is writing already.
    fn kick(self: &Arc<Self>, st: &mut State) {
        // Records a TLS session could not write yet are the writer task's to finish.
        let pending = st.sock.as_ref().is_some_and(|l| l.pending());
        if (st.queue.is_empty() && !pending) || st.writer_busy || st.status == Status::Closed {
            return;
        }
        match (&st.sock, st.task) {
            (Some(_), Some(task)) => {
                if !st.poked {
                    st.poked = true;
                    self.writers.poke(task);
                }
            }
            // Being handed to a writer thread, which runs it at once.
            (Some(_), None) => {}
            (None, _) if st.connecting => {}
            (None, _) => {
                st.connecting = true;
                let c = self.clone();
                let spawned = crate::threads::spawn(
                    format!("teleport_connect_{}", self.index),
                    self.cfg.thread_nice,
                    move || c.connect_loop(),
                );
                if let Err(e) = spawned {
                    st.connecting = false;
                    st.last_error = Some(format!("no thread to connect with: {e}"));
                    tracing::warn!(
                        peer = %String::from_utf8_lossy(&self.cfg.peer),
                        index = self.index,
                        reason = %e,
                        "connect_spawn_failed"
                    );
                }
            }
        }
    }

    /// Whether taking `len` more bytes would put the lane over its limit.
    fn over_limit(&self, st: &State, len: usize) -> bool {
        st.held > 0 && st.held + len > self.cfg.max_queue_bytes
    }

    /// Counts `len` bytes the lane now holds.
    fn hold(&self, st: &mut State, len: usize) {
        st.held += len;
        self.stats.queued_bytes.fetch_add(len as u64, Relaxed);
    }

    /// Counts `len` bytes the lane no longer holds (acknowledged or dropped).
    fn release(&self, st: &mut State, len: usize) {
        st.held -= len;
        self.stats.queued_bytes.fetch_sub(len as u64, Relaxed);
    }

    /// Writes `batch` (one frame, the sender's own, stamped) from the sender's thread with
    /// non-blocking `writev`s, then, for a few rounds, whatever small frames other senders
    /// queued meanwhile. What cannot be written at once goes back to the front of the queue
    /// for the writer task. Called with `direct_busy` set, which keeps everyone else from
    /// writing; clears it.
    fn write_direct(self: &Arc<Self>, sock: &Arc<Link>, mut batch: Vec<OutFrame>) {
        let mut rounds = 0;
        let (mut st, failed) = loop {
            let result = self.write_counted(|tally| write_once(sock, &mut batch, &mut 0, tally));
            let mut st = self.state.lock();
            let all_written = self.settle(&mut st, sock, &mut batch);
            match result {
                Ok(_) if all_written => {
                    rounds += 1;
                    let same_sock = st.sock.as_ref().is_some_and(|s| Arc::ptr_eq(s, sock));
                    if rounds > COMBINE_ROUNDS
                        || st.queue.is_empty()
                        || st.held - st.unacked_bytes > COMBINE_MAX
                        || !same_sock
                        || st.status == Status::Closed
                    {
                        break (st, None);
                    }
                    batch.extend(st.queue.drain(..));
                    stamp(&mut st, &mut batch);
                }
                // The socket is full: the writer task goes on from where this stopped.
                Ok(_) => break (st, None),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break (st, None),
                Err(e) => break (st, Some(e)),
            }
        };
        // What is left goes back to the front, in order (the queue only holds newer frames).
        for f in batch.drain(..).rev() {
            st.queue.push_front(f);
        }
        match failed {
            Some(e) => self.lost_socket(&mut st, &e),
            None if st.since_ack_read >= ACK_READ_EVERY => self.read_acks(&mut st),
            None => {}
        }
        st.spare = batch;
        st.direct_busy = false;
        if st.status == Status::Closed {
            // Nobody else writes any more: what is left is dropped here, and counted.
            self.drop_all(&mut st);
        } else {
            self.kick(&mut st);
        }
    }

    /// Runs a write and counts the frames it completed for the first time, in the peer's and
    /// the connection's counters (two atomic additions per write, not per frame).
    fn write_counted<T>(&self, write: impl FnOnce(&mut Tally) -> T) -> T {
        let mut tally = Tally::default();
        let result = write(&mut tally);
        self.stats.sent_many(tally.msgs, tally.bytes);
        self.counters.add(tally.msgs, tally.bytes);
        self.counters.wrote(tally.writes);
        result
    }

    /// After a write of `batch` on `sock`: the frames written whole leave the batch and wait
    /// for their ack; those not written whole stay in it, in order. Returns whether the batch
    /// is now empty. Frames written on a socket that is no longer the connection's (it was
    /// lost meanwhile) all stay, from their start: they go out again on the next one.
    fn settle(&self, st: &mut State, sock: &Arc<Link>, batch: &mut Vec<OutFrame>) -> bool {
        if !st.sock.as_ref().is_some_and(|s| Arc::ptr_eq(s, sock)) {
            batch.iter_mut().for_each(OutFrame::rewind);
            return batch.is_empty();
        }
        let whole = batch.iter().take_while(|f| f.remaining() == 0).count();
        st.since_ack_read += whole as u32;
        for f in batch.drain(..whole) {
            if f.seq() <= st.acked {
                // Its ack came before it was even put here.
                self.release(st, f.len());
                self.stats.acked.fetch_add(1, Relaxed);
            } else {
                st.unacked_bytes += f.len();
                st.unacked.push_back(f);
            }
        }
        batch.is_empty()
    }

    /// Reads, without blocking, the acks the peer sent on the current connection, and
    /// releases the frames they cover. A peer that closed the connection, or sends anything
    /// but acks, loses it here.
    fn read_acks(self: &Arc<Self>, st: &mut State) {
        let Some(sock) = st.sock.clone() else { return };
        st.since_ack_read = 0;
        if let Err(e) = self.take_acks(st, &sock) {
            self.lost_socket(st, &e);
        }
    }

    /// Reads every ack `sock` holds now, without blocking. `Ok` once none is left; an error
    /// when the peer closed the connection or said LAST (after its last acks, which count),
    /// or sent something else.
    fn take_acks(&self, st: &mut State, sock: &Link) -> io::Result<()> {
        let mut buf = [0u8; 512];
        loop {
            let n = match sock.recv(&mut buf) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the peer closed the connection",
                    ))
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            match st.acks.feed(&buf[..n]) {
                Ok(Some(seq)) if seq >= st.next_seq => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the peer acknowledged frame {seq}, never sent"),
                    ))
                }
                Ok(Some(seq)) => self.on_ack(st, seq),
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
            if st.acks.is_last() {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the peer's teleport is closing",
                ));
            }
        }
    }

    /// The peer acknowledged every frame of the lane up to `seq`: they need no keeping.
    fn on_ack(&self, st: &mut State, seq: u64) {
        if seq <= st.acked {
            return;
        }
        st.acked = seq;
        let mut n = 0;
        while st.unacked.front().is_some_and(|f| f.seq() <= seq) {
            if let Some(f) = st.unacked.pop_front() {
                st.unacked_bytes -= f.len();
                self.release(st, f.len());
                n += 1;
            }
        }
        self.stats.acked.fetch_add(n, Relaxed);
    }

    /// How often a writer task of this lane ran.
    #[cfg(test)]
    pub(crate) fn wakeups(&self) -> u64 {
        self.state.lock().wakeups
    }

    /// Has a lane waiting out its backoff try connecting at once (the pool was pointed
    /// elsewhere).
    pub fn poke(self: &Arc<Self>) {
        let mut st = self.state.lock();
        self.wake.notify_all();
        self.kick(&mut st);
    }

    /// Tears the connection down for good: what the lane holds is dropped and counted.
    pub fn close(&self) {
        let mut st = self.state.lock();
        if st.status == Status::Closed {
            return;
        }
        st.status = Status::Closed;
        st.connected_since = None;
        if let Some(sock) = st.sock.take() {
            self.stats.connections.fetch_sub(1, Relaxed);
            let addr = peer_addr(sock.sock()).unwrap_or_else(|| self.target.addr());
            let _ = sock.sock().shutdown(std::net::Shutdown::Both);
            tracing::info!(
                peer = %String::from_utf8_lossy(&self.cfg.peer),
                index = self.index,
                addr = %addr,
                reason = "pool closed",
                queued = st.queue.len(),
                unacked = st.unacked.len(),
                "connection_closed"
            );
        }
        if !st.writer_busy && !st.direct_busy {
            // Whoever is writing drops what is left when done; else nobody will.
            self.drop_all(&mut st);
        }
        self.wake.notify_all();
    }

    /// Kills the current connection from this end, as a middlebox or `ss -K` would.
    #[cfg(test)]
    pub(crate) fn cut(&self) {
        if let Some(sock) = self.state.lock().sock.as_ref() {
            let _ = sock.sock().shutdown(std::net::Shutdown::Both);
        }
    }

    /// Everything `teleport:info/0` shows of this connection.
    pub fn info(&self) -> ConnInfo {
        let st = self.state.lock();
        let sock = st.sock.clone();
        let (msgs_out, bytes_out) = self.counters.get();
        let peer_addr = sock
            .as_deref()
            .and_then(|l| peer_addr(l.sock()))
            .unwrap_or_else(|| self.target.addr());
        let local_addr = sock
            .as_deref()
            .and_then(|l| l.sock().local_addr().ok())
            .and_then(|a| a.as_socket());
        ConnInfo {
            index: self.index,
            status: st.status,
            peer_addr,
            local_addr,
            queued_bytes: st.held - st.unacked_bytes,
            frames_in_queue: st.queue.len(),
            unacked_frames: st.unacked.len(),
            unacked_bytes: st.unacked_bytes,
            last_acked: st.acked,
            msgs_out,
            bytes_out,
            writes: self.counters.writes.load(Relaxed),
            last_error: st.last_error.clone(),
            connected_since: st.connected_since.map(unix_millis),
            reconnects: st.reconnects,
            buffers: sock.as_deref().map(|l| sockopts::buffer_sizes(l.sock())),
        }
    }

    /// The connection is gone: every frame it took and the peer did not acknowledge goes
    /// back to the front of the queue, in order, from its start (the one cut mid-write too),
    /// to go out again on the next connection. Whoever was writing puts its unwritten frames
    /// back at the front before calling this. With frames left, the lane connects again.
    fn lost_socket(self: &Arc<Self>, st: &mut State, err: &io::Error) {
        if let Some(sock) = st.sock.take() {
            // The peer's last acks may still be in the socket (a listener that closes
            // acknowledges what it delivered first): they spare frames a resend, or a drop.
            let _ = self.take_acks(st, &sock);
            self.stats.connections.fetch_sub(1, Relaxed);
            // Its writer task ends when the socket says so.
            st.task = None;
            st.poked = false;
            let _ = sock.sock().shutdown(std::net::Shutdown::Both);
            let addr = peer_addr(sock.sock()).unwrap_or_else(|| self.target.addr());
            tracing::warn!(
                peer = %String::from_utf8_lossy(&self.cfg.peer),
                index = self.index,
                addr = %addr,
                reason = %err,
                queued = st.queue.len(),
                unacked = st.unacked.len(),
                "connection_lost"
            );
            st.last_error = Some(format!("connection to {addr} lost: {err}"));
        } else {
            st.last_error = Some(err.to_string());
        }
        while let Some(f) = st.unacked.pop_back() {
            st.queue.push_front(f);
        }
        st.unacked_bytes = 0;
        st.queue.iter_mut().for_each(OutFrame::rewind);
        if st.acks.is_last() {
            // The peer said it delivered nothing after what it acknowledged: the frames left
            // are as good as never written, and may go to its next incarnation.
            st.queue.iter_mut().for_each(OutFrame::not_delivered);
        }
        st.acks = AckReader::default();
        if st.status != Status::Closed {
            st.status = Status::Down;
        }
        st.connected_since = None;
        // Whoever found the socket gone, frames it held go out on the next connection.
        self.kick(st);
    }

    /// A new connection is up and its handshake said what the peer delivered on this lane:
    /// those frames are released and the others numbered on from there. From another
    /// incarnation of the peer, which cannot know what the old one delivered, the frames
    /// written before are dropped and counted instead: sending them again could deliver
    /// them twice.
    fn resume(&self, st: &mut State, welcome: &Welcome) {
        let same_peer = st.incarnation.map_or(true, |i| i == welcome.incarnation);
        let (mut released, mut dropped) = (0u64, 0u64);
        while let Some(f) = st.queue.front() {
            let delivered = same_peer && f.seq() != 0 && f.seq() <= welcome.delivered;
            if !(delivered || (!same_peer && f.was_written())) {
                break;
            }
            if let Some(f) = st.queue.pop_front() {
                self.release(st, f.len());
                if delivered {
                    released += 1;
                } else {
                    dropped += 1;
                }
            }
        }
        self.stats.acked.fetch_add(released, Relaxed);
        if dropped > 0 {
            self.stats.dropped.fetch_add(dropped, Relaxed);
            tracing::warn!(
                peer = %String::from_utf8_lossy(&self.cfg.peer),
                index = self.index,
                dropped,
                reason = "the peer's teleport restarted: what it delivered before is unknown",
                "unacked_dropped"
            );
        }
        // Numbered on from what the peer has: nothing is ever numbered twice or skipped.
        st.queue.iter_mut().for_each(OutFrame::unstamp);
        let resent = st.queue.iter().filter(|f| f.was_written()).count() as u64;
        if resent > 0 {
            self.stats.resent.fetch_add(resent, Relaxed);
            tracing::info!(
                peer = %String::from_utf8_lossy(&self.cfg.peer),
                index = self.index,
                resent,
                delivered_before = released,
                "frames_resent"
            );
        }
        st.incarnation = Some(welcome.incarnation);
        st.acked = welcome.delivered;
        st.next_seq = welcome.delivered + 1;
    }

    /// Drops (and counts) the queued frames larger than the peer reads: they were queued
    /// before a handshake told its limit, or it changed (the peer restarted with another).
    fn drop_too_large(&self, st: &mut State) {
        let max = self.target.max_frame();
        let (before, mut bytes) = (st.queue.len(), 0);
        st.queue.retain(|f| {
            let keep = body_len(f) <= max;
            if !keep {
                bytes += f.len();
            }
            keep
        });
        let n = before - st.queue.len();
        if n > 0 {
            self.release(st, bytes);
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

    /// Drops every frame the lane holds, counting them: the queued ones, those waiting for
    /// their ack, and a batch a panicking writer took with it.
    fn drop_all(&self, st: &mut State) {
        let n = st.queue.len() + st.unacked.len() + std::mem::take(&mut st.in_batch);
        st.queue.clear();
        st.unacked.clear();
        st.unacked_bytes = 0;
        let held = st.held;
        self.release(st, held);
        self.stats.dropped.fetch_add(n as u64, Relaxed);
    }

    /// A connecting thread: connects and shakes hands (the lock released) while the lane has
    /// frames and no connection, waiting out a growing backoff after each failure; on
    /// success the lane resumes on the new connection, whose writer task a writer thread
    /// runs from then on, and the thread ends.
    fn connect_loop(self: Arc<Self>) {
        let mut backoff = FIRST_BACKOFF;
        let mut st = self.state.lock();
        loop {
            if st.status == Status::Closed || st.queue.is_empty() || st.sock.is_some() {
                // Closed: close() dropped what the lane held. Nothing to send: the next
                // frame connects.
                st.connecting = false;
                return;
            }
            st.status = Status::Connecting;
            drop(st);
            let result = self.connect();
            st = self.state.lock();
            match result {
                Ok((sock, welcome)) if st.status != Status::Closed => {
                    self.stats.connections.fetch_add(1, Relaxed);
                    if st.was_up {
                        self.stats.reconnects.fetch_add(1, Relaxed);
                        st.reconnects += 1;
                    }
                    st.was_up = true;
                    st.status = Status::Up;
                    st.connected_since = Some(SystemTime::now());
                    st.last_write = Instant::now();
                    let sock = Arc::new(sock);
                    st.sock = Some(sock.clone());
                    self.resume(&mut st, &welcome);
                    self.drop_too_large(&mut st);
                    st.connecting = false;
                    let writer = Writer {
                        conn: self.clone(),
                        sock,
                        batch: Vec::new(),
                        wants_write: false,
                        done: false,
                    };
                    // Its thread runs it at once (it waits for this lock), and writes what
                    // is queued.
                    st.poked = false;
                    match self.writers.add(writer) {
                        Ok(task) => st.task = Some(task),
                        Err(_) => {
                            let e = io::Error::other("no writer thread");
                            self.lost_socket(&mut st, &e);
                        }
                    }
                    return;
                }
                Ok(_) => {}
                Err(err) => {
                    self.note_connect_failure(&mut st, &err, backoff == FIRST_BACKOFF);
                    if matches!(
                        err.io().kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::PermissionDenied
                    ) {
                        // The peer is there but not listening or not letting us in where we
                        // thought: its listener (and the cookie) must be found again.
                        MutexGuard::unlocked(&mut st, || self.target.mark_stale());
                    }
                    // What the lane holds stays: it goes out once a connection is up, or is
                    // dropped (and counted) when the pool is closed at nodedown.
                    if st.status != Status::Closed {
                        self.wake.wait_for(&mut st, backoff);
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Records why a connection attempt failed; logs it on the first of a run of failures
    /// (the next attempts, with a growing pause, are only in `teleport:info/0`).
    fn note_connect_failure(&self, st: &mut State, err: &ConnectError, first: bool) {
        let (e, addr) = (err.io(), self.target.addr());
        if first {
            let peer = String::from_utf8_lossy(&self.cfg.peer);
            let held = st.queue.len();
            match err {
                ConnectError::Socket(_) => tracing::warn!(
                    peer = %peer, index = self.index, addr = %addr, reason = %e, queued = held,
                    "connect_failed"
                ),
                ConnectError::Handshake(_) => tracing::warn!(
                    peer = %peer, index = self.index, addr = %addr, reason = %e, queued = held,
                    "handshake_failed"
                ),
            }
        }
        if st.status != Status::Closed {
            st.status = Status::Down;
        }
        st.last_error = Some(match err {
            ConnectError::Socket(e) => format!("connect to {addr}: {e}"),
            ConnectError::Handshake(e) => format!("handshake with {addr}: {e}"),
        });
    }

    /// The writer task's turn: writes what is queued (the lock released, without blocking)
    /// until the queue is empty, the socket is full or [`TURN_BYTES`] went out, settling
    /// what was written. Returns whether it must go on when the socket has room, or
    /// `None` once its socket is no longer the connection's.
    fn drain(self: &Arc<Self>, sock: &Arc<Link>, batch: &mut Vec<OutFrame>) -> Option<bool> {
        let mut st = self.state.lock();
        st.poked = false;
        st.wakeups += 1;
        let mut turn = 0;
        loop {
            if !st.sock.as_ref().is_some_and(|s| Arc::ptr_eq(s, sock)) {
                return None;
            }
            // Records a TLS session took before go first (nothing waits on a plain socket).
            match sock.flush() {
                Ok(true) => {}
                Ok(false) => return Some(true),
                Err(e) => {
                    self.lost_socket(&mut st, &e);
                    return None;
                }
            }
            if st.queue.is_empty() || st.direct_busy {
                // A direct writer kicks the lane when it is done, if it leaves frames.
                return Some(false);
            }
            if turn >= TURN_BYTES {
                return Some(true);
            }
            self.probe_if_idle(&mut st, Instant::now());
            if st.sock.is_none() {
                continue; // the probe found it gone
            }
            let take = frames_within(&st.queue, TURN_BYTES - turn).min(TAKE_FRAMES);
            batch.extend(st.queue.drain(..take));
            stamp(&mut st, batch);
            st.in_batch = batch.len();
            st.writer_busy = true;
            drop(st);

            let result =
                self.write_counted(|tally| write_some(sock, batch, TURN_BYTES - turn, tally));
            st = self.state.lock();
            st.writer_busy = false;
            st.in_batch = 0;
            st.last_write = Instant::now();
            self.settle(&mut st, sock, batch);
            // What was not written goes back to the front, in order.
            for f in batch.drain(..).rev() {
                st.queue.push_front(f);
            }
            if st.status == Status::Closed {
                // Closed while this wrote: close() left what the lane holds to it.
                self.drop_all(&mut st);
                return None;
            }
            match result {
                Err(e) => {
                    self.lost_socket(&mut st, &e);
                    return None;
                }
                Ok((n, full)) => {
                    turn += n;
                    if st.since_ack_read >= ACK_READ_EVERY {
                        self.read_acks(&mut st);
                    }
                    if full {
                        return Some(true);
                    }
                }
            }
        }
    }

    /// The writer task's socket is readable: acks, or the end of the connection.
    fn on_readable(self: &Arc<Self>, sock: &Arc<Link>) -> bool {
        let mut st = self.state.lock();
        st.wakeups += 1;
        if !st.sock.as_ref().is_some_and(|s| Arc::ptr_eq(s, sock)) {
            return false;
        }
        if st.writer_busy || st.direct_busy {
            // Whoever writes reads the acks too; the socket says so again after.
            return true;
        }
        self.read_acks(&mut st);
        // Lost: what it held goes out on the next connection (see `lost_socket`).
        st.sock.is_some()
    }

    /// Checks the connection before writing on it if it has been idle a while.
    fn probe_if_idle(self: &Arc<Self>, st: &mut State, now: Instant) {
        if st.sock.is_some() && now.saturating_duration_since(st.last_write) >= PROBE_AFTER_IDLE {
            self.read_acks(st);
            // Probed: the next frames of a burst need not be.
            st.last_write = now;
        }
    }

    /// Connects to where the pool's target points now, with the cookie it holds now (the
    /// owner refreshes both when the peer refused us), and shakes hands.
    fn connect(&self) -> Result<(Link, Welcome), ConnectError> {
        let cfg = &self.cfg;
        let (addr, cookie) = (self.target.addr(), self.target.cookie());
        let sock = (|| {
            let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            cfg.sock_opts.apply(&sock)?;
            cfg.sock_opts.bind(&sock, addr)?;
            sock.connect_timeout(&SockAddr::from(addr), cfg.connect_timeout)?;
            Ok::<_, io::Error>(sock)
        })()
        .map_err(ConnectError::Socket)?;
        let (session, welcome) = (|| {
            // One deadline for the whole handshake, TLS's included: a per-read timeout
            // would let the peer trickle.
            let mut stream = Deadline::after(&sock, cfg.handshake_timeout);
            // The slot index is the lane: a pool has at most `pool::MAX_SIZE` (< 2^16) slots.
            let lane = u16::try_from(self.index).unwrap_or(u16::MAX);
            let (mut session, bound) = match &cfg.tls {
                None => (None, None),
                // TLS first, the acceptor's certificate checked against the host of the
                // node dialed; the cookie handshake then runs inside, bound to the session.
                Some(tls) => {
                    let client = tls
                        .dialer_for_node(&String::from_utf8_lossy(&cfg.peer))
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                    let (session, bound) =
                        secure::open(rustls::Connection::Client(client), &mut stream)?;
                    (Some(session), Some(bound))
                }
            };
            let welcome = handshake::dial_bound(
                &mut Opening::new(session.as_mut(), &mut stream),
                &cfg.me,
                &cfg.peer,
                &cookie,
                lane,
                self.session,
                bound.as_ref().map(|b| &b[..]),
            )
            .map_err(handshake_io)?;
            // From here on the socket is written and read without blocking.
            sock.set_nonblocking(true)?;
            Ok::<_, io::Error>((session, welcome))
        })()
        .map_err(ConnectError::Handshake)?;
        let local = sock.local_addr().ok().and_then(|a| a.as_socket());
        // A TLS session's records are this end's own from here (`secure::Link`).
        let link = match session {
            None => Link::plain(sock),
            Some(session) => Link::tls(sock, session).map_err(ConnectError::Handshake)?,
        };
        self.target.limit_frames(welcome.max_frame as usize);
        tracing::info!(
            peer = %String::from_utf8_lossy(&cfg.peer),
            index = self.index,
            addr = %addr,
            local = %local.map(|a| a.to_string()).unwrap_or_default(),
            delivered = welcome.delivered,
            "connection_up"
        );
        Ok((link, welcome))
    }
}

/// How many frames at the front of `queue` hold about `bytes` (one at least, when there is
/// one): those that start within the first `bytes`.
fn frames_within(queue: &VecDeque<OutFrame>, bytes: usize) -> usize {
    let mut total = 0;
    queue
        .iter()
        .take_while(|f| {
            let within = total < bytes;
            total += f.remaining();
            within
        })
        .count()
}

/// Stamps the frames of `batch` not stamped yet with the lane's next numbers, in order: a
/// frame is numbered when it first goes out on a connection.
fn stamp(st: &mut State, batch: &mut [OutFrame]) {
    for f in batch.iter_mut().filter(|f| f.seq() == 0) {
        f.stamp(st.next_seq);
        st.next_seq += 1;
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

/// What a run of writes did, added to the counters once per run (not per frame).
#[derive(Default)]
struct Tally {
    /// Frames completed for the first time.
    msgs: u64,
    /// Their bytes.
    bytes: u64,
    /// `writev` calls made.
    writes: u64,
}

/// One non-blocking `writev` (through the TLS session, if the connection has one) of as
/// much of `batch` as the iovec limit allows, from its first unfinished frame on. Frames
/// keep their progress; `tally` counts the write and the frames it completed for the first
/// time. Returns the bytes written, whether or not everything fit (the caller looks at what
/// remains); `WouldBlock` if nothing did.
///
/// `done` says how many frames at the front of `batch` are known finished; the next call
/// moves it past those this write finished: a batch of many small frames takes many writes, and
/// looking for the first unfinished one from the front each time made draining it quadratic
/// (most of a writer's time, with one sender of small messages).
fn write_once(
    sock: &Link,
    batch: &mut [OutFrame],
    done: &mut usize,
    tally: &mut Tally,
) -> io::Result<usize> {
    while batch.get(*done).is_some_and(|f| f.remaining() == 0) {
        *done += 1;
    }
    let first = *done;
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(8);
    for f in &batch[first..] {
        f.slices(&mut slices, MAX_IOVECS);
        if slices.len() >= MAX_IOVECS {
            break;
        }
    }
    tally.writes += 1;
    let n = loop {
        match sock.send_vectored(&slices) {
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
        if f.first_completion() {
            tally.msgs += 1;
            tally.bytes += f.len() as u64;
        }
    }
    Ok(n)
}

/// Writes frames of `batch` with non-blocking `writev`s, coalescing them into as few calls
/// as the iovec limit allows, until all are written, the socket is full or about `budget`
/// bytes went out. Returns the bytes written and whether the socket is full. On error,
/// frames keep their progress so the caller can tell which are done.
fn write_some(
    sock: &Link,
    batch: &mut [OutFrame],
    budget: usize,
    tally: &mut Tally,
) -> io::Result<(usize, bool)> {
    let (mut done, mut written) = (0, 0);
    while written < budget && batch.last().is_some_and(|f| f.remaining() > 0) {
        match write_once(sock, batch, &mut done, tally) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((written, true)),
            Err(e) => return Err(e),
        }
    }
    Ok((written, false))
}

/// The writer task of one connection: it writes what the lane queued as the socket takes
/// it, and reads the acks as they come.
struct Writer {
    conn: Arc<Conn>,
    sock: Arc<Link>,
    /// Its batch, kept between turns so that it is allocated once.
    batch: Vec<OutFrame>,
    wants_write: bool,
    /// Set when it ends by itself (not by a panic).
    done: bool,
}

impl Writer {
    fn end(&mut self) -> Next {
        self.done = true;
        Next::Done
    }
}

impl Task for Writer {
    fn fd(&self) -> RawFd {
        self.sock.sock().as_raw_fd()
    }

    fn readable(&mut self, _now: Instant) -> Next {
        if self.conn.on_readable(&self.sock) {
            Next::Wait(None)
        } else {
            self.end()
        }
    }

    fn tick(&mut self, _now: Instant) -> Next {
        match self.conn.drain(&self.sock, &mut self.batch) {
            Some(more) => {
                self.wants_write = more;
                Next::Wait(None)
            }
            None => self.end(),
        }
    }

    fn wants_write(&self) -> bool {
        self.wants_write
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // A panic must not unwind into nothing: log it and close the slot, dropping (and
        // counting) everything it held, the batch it was writing too.
        let c = &self.conn;
        tracing::error!(
            peer = %String::from_utf8_lossy(&c.cfg.peer),
            index = c.index,
            addr = %c.target.addr(),
            reason = "the writer panicked; the slot is closed",
            "writer_panicked"
        );
        c.state.lock().writer_busy = false;
        c.close();
        let mut st = c.state.lock();
        c.drop_all(&mut st);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::out_frame::Shared;
    use crate::testing::*;
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread;

    /// A writer takes the front of a long queue: what is left of its turn's bytes, at most
    /// TAKE_FRAMES frames, and always a frame when there is one, however large.
    #[test]
    fn a_writer_takes_the_front_of_a_long_queue() {
        let small: VecDeque<OutFrame> = (0..10_000).map(|_| frame(&[7; 100])).collect();
        let each = small[0].len();
        assert_eq!(frames_within(&small, 64 * each), 64);
        assert_eq!(frames_within(&small, 64 * each + 1), 65);
        assert_eq!(
            frames_within(&small, TURN_BYTES).min(TAKE_FRAMES),
            TAKE_FRAMES
        );
        assert_eq!(frames_within(&small, 1), 1);
        assert_eq!(frames_within(&VecDeque::new(), TURN_BYTES), 0);
        let large: VecDeque<OutFrame> = (0..8).map(|_| frame(&vec![7; 1 << 20])).collect();
        assert_eq!(frames_within(&large, TURN_BYTES), 4);
        assert_eq!(frames_within(&large, 1), 1);
    }

    /// A payload that names its number and has `pad` bytes more.
    fn numbered(id: u32, pad: usize) -> Vec<u8> {
        let mut p = id.to_be_bytes().to_vec();
        p.resize(4 + pad, id as u8);
        p
    }

    fn id_of(payload: &[u8]) -> u32 {
        u32::from_be_bytes(payload[..4].try_into().unwrap())
    }

    /// Sends `frame`, waiting out `Busy` (as `teleport:send/2` does).
    fn send_waiting(conn: &Arc<Conn>, mut frame: OutFrame) {
        loop {
            match conn.send(frame) {
                Ok(()) => return,
                Err(SendError::Busy(f)) => {
                    frame = f;
                    thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("{e:?}"),
            }
        }
    }

    /// Collects `n` payloads from `rx`, failing after 20 s.
    fn collect(rx: &Arrivals, n: usize, what: impl Fn() -> String) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        for i in 0..n {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok((_, p)) => got.push(p),
                Err(_) => {
                    let ids: Vec<u32> = got.iter().map(|p| id_of(p)).collect();
                    let gaps: Vec<(u32, u32)> = ids
                        .windows(2)
                        .filter(|w| w[1] != w[0] + 1)
                        .map(|w| (w[0], w[1]))
                        .collect();
                    panic!("got {i} of {n}, jumps {gaps:?}: {}", what())
                }
            }
        }
        got
    }

    #[test]
    fn frames_a_dying_connection_took_are_sent_again_once_and_in_order() {
        let (l, _acceptor, rx) = listener(SocketOpts::default());
        let mut cfg = config(b"c", SocketOpts::default());
        cfg.0.max_queue_bytes = 4 << 20;
        let (pool, stats) = one_slot(cfg, l.local_addr());
        let pool = Arc::new(pool);
        let n = 20_000u32;
        let done = Arc::new(AtomicBool::new(false));
        // Mostly small frames (written from the sender's thread), some large (the writer's).
        let sender = {
            let (pool, done) = (pool.clone(), done.clone());
            thread::spawn(move || {
                for id in 0..n {
                    let pad = if id % 97 == 0 {
                        200_000
                    } else {
                        (id % 300) as usize
                    };
                    send_waiting(pool.conn(0), frame(&numbered(id, pad)));
                }
                done.store(true, Ordering::SeqCst);
            })
        };
        // Connections die under it, from either end, while frames are in flight (the whole
        // stream takes some 20 ms: a cut after it, of an idle connection, resends nothing).
        // A cut resends only what the peer had not read yet (it says what it delivered when
        // the lane reconnects), and on loopback it often has read everything: it goes on
        // cutting, past eight cuts, until one made the lane resend.
        let in_flight = || pool.info()[0].unacked_frames > 0;
        for k in 0..200 {
            if k >= 8 && stats.snapshot().resent > 0 {
                break;
            }
            thread::sleep(Duration::from_millis(2));
            while !in_flight() && !done.load(Ordering::SeqCst) {
                thread::yield_now();
            }
            if !in_flight() {
                break;
            }
            if k % 2 == 0 {
                l.cut();
            } else {
                pool.conn(0).cut();
            }
        }
        let got = collect(&rx, n as usize, || {
            let got: Vec<u32> = rx.try_iter().map(|(_, p)| id_of(&p)).collect();
            format!("{:?} then {:?}", pool.info(), &got[..got.len().min(10)])
        });
        sender.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
        let ids: Vec<u32> = got.iter().map(|p| id_of(p)).collect();
        assert_eq!(ids, (0..n).collect::<Vec<_>>());
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "a duplicate arrived"
        );
        let s = stats.snapshot();
        assert_eq!(s.dropped, 0);
        assert!(s.reconnects >= 1 && s.resent >= 1, "{s:?}");
        assert_eq!(s.msgs_out, n as u64, "a resent frame is counted once");
        wait_for("every ack", || stats.snapshot().acked == n as u64);
        // Acknowledged in the end: the lane holds nothing.
        wait_for("the last acks", || pool.info()[0].unacked_frames == 0);
        let c = &pool.info()[0];
        assert_eq!((c.queued_bytes, c.unacked_bytes), (0, 0));
        // Every frame got one number in the end (the resent ones were numbered anew).
        assert_eq!(c.last_acked, n as u64);
        assert_eq!(stats.snapshot().queued_bytes, 0);
        pool.close();
        l.close();
    }

    #[test]
    fn concurrent_small_senders_share_writes_and_keep_their_order() {
        // Eight threads on one lane: whoever finds it idle writes, and takes what the others
        // queued meanwhile (combining); partial writes go on in the writer task.
        let (l, _acceptor, rx) = listener(SocketOpts::default());
        let (pool, stats) = one_slot(config(b"c", SocketOpts::default()), l.local_addr());
        let pool = Arc::new(pool);
        let (threads, each) = (8u32, 2_000u32);
        let senders: Vec<_> = (0..threads)
            .map(|t| {
                let pool = pool.clone();
                thread::spawn(move || {
                    for i in 0..each {
                        send_waiting(pool.conn(0), frame(&numbered(t << 16 | i, 50)));
                    }
                })
            })
            .collect();
        let got = collect(&rx, (threads * each) as usize, || {
            format!("{:?}", pool.info())
        });
        senders.into_iter().for_each(|s| s.join().unwrap());
        let mut next = vec![0u32; threads as usize];
        for p in &got {
            let id = id_of(p);
            let (t, i) = ((id >> 16) as usize, id & 0xFFFF);
            assert_eq!(i, next[t], "thread {t} out of order");
            next[t] += 1;
        }
        wait_for("every ack", || {
            stats.snapshot().acked == (threads * each) as u64
        });
        assert_eq!(stats.snapshot().queued_bytes, 0);
        pool.close();
        l.close();
    }

    #[test]
    fn a_lone_sender_flooding_small_frames_gets_them_batched() {
        // One thread, back to back: written from the sender's thread one `writev` each, they
        // cost a system call per message; queued behind the last writes, they share them.
        let (l, _acceptor, rx) = listener(SocketOpts::default());
        let (pool, _stats) = one_slot(config(b"c", SocketOpts::default()), l.local_addr());
        let n = 20_000u32;
        for id in 0..n {
            send_waiting(pool.conn(0), frame(&numbered(id, 100)));
        }
        let got = collect(&rx, n as usize, || format!("{:?}", pool.info()));
        let ids: Vec<u32> = got.iter().map(|p| id_of(p)).collect();
        assert_eq!(ids, (0..n).collect::<Vec<_>>());
        let c = &pool.info()[0];
        assert_eq!(c.msgs_out, n as u64);
        assert!(
            c.writes >= 1 && c.writes * 2 <= n as u64,
            "{} writes for {n} frames",
            c.writes
        );
        // Fixed bug: after an idle while, the probe before the write counted as a write just
        // before the frame, which then, the lane's count still that of the flood, waited for
        // the writer thread.
        thread::sleep(PROBE_AFTER_IDLE + Duration::from_millis(20));
        let before = pool.info()[0].writes;
        pool.conn(0).send(frame(&numbered(n, 100))).unwrap();
        assert_eq!(pool.info()[0].writes, before + 1, "written at once");
        assert_eq!(id_of(&collect(&rx, 1, String::new)[0]), n);
        let n = n + 1;
        // After a pause, a few frames at once (replies to a few callers) still go at once,
        // each from its sender's thread.
        thread::sleep(COALESCE * 10);
        let before = pool.info()[0].writes;
        for id in n..n + FLOOD_AFTER {
            pool.conn(0).send(frame(&numbered(id, 100))).unwrap();
        }
        let c = &pool.info()[0];
        let k = FLOOD_AFTER as u64;
        assert_eq!((c.writes, c.msgs_out), (before + k, n as u64 + k));
        let ids: Vec<u32> = collect(&rx, k as usize, String::new)
            .iter()
            .map(|p| id_of(p))
            .collect();
        assert_eq!(ids, (n..n + FLOOD_AFTER).collect::<Vec<_>>());
        pool.close();
        l.close();
    }

    /// Fixed bug: a sender told `Busy` that found the connection gone (reading acks) left
    /// the frames it had queued with no connection and nobody to make one.
    #[test]
    fn a_lane_that_loses_its_socket_with_frames_unacknowledged_connects_again() {
        let (l, acceptor, rx) = listener(SocketOpts::default());
        let (pool, _stats) = one_slot(config(b"c", SocketOpts::default()), l.local_addr());
        // The peer takes the frames but delivers (and so acknowledges) none yet.
        acceptor.gate.shut();
        for id in 0..10 {
            send_waiting(pool.conn(0), frame(&numbered(id, 10)));
        }
        wait_for("the writes", || pool.info()[0].unacked_frames == 10);
        // Whoever finds the socket gone (here: as a sender reading acks would).
        {
            let c = pool.conn(0);
            let mut st = c.state.lock();
            c.lost_socket(&mut st, &io::Error::other("found gone"));
        }
        acceptor.gate.open();
        let got = collect(&rx, 10, || format!("{:?}", pool.info()));
        let ids: Vec<u32> = got.iter().map(|p| id_of(p)).collect();
        assert_eq!(ids, (0..10).collect::<Vec<_>>());
        wait_for("the lane up again, all acknowledged", || {
            let c = &pool.info()[0];
            c.status == Status::Up && c.unacked_frames == 0 && c.frames_in_queue == 0
        });
        l.close();
    }

    #[test]
    fn a_peer_that_stops_acknowledging_makes_the_lane_busy() {
        // A peer that shakes hands, then reads everything and acknowledges nothing.
        let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = mute.local_addr().unwrap();
        let reader = thread::spawn(move || {
            let (mut s, _) = mute.accept().unwrap();
            let proven = handshake::accept(&mut s, b"b@h", |_| Some(b"c".to_vec())).unwrap();
            let welcome = Welcome {
                max_frame: 1 << 20,
                incarnation: 1,
                delivered: 0,
            };
            proven.welcome(&mut s, &welcome).unwrap();
            let mut sink = vec![0u8; 1 << 16];
            while io::Read::read(&mut s, &mut sink).is_ok_and(|n| n > 0) {}
        });
        let mut cfg = config(b"c", SocketOpts::default());
        cfg.0.max_queue_bytes = 64 * 1024;
        let (pool, stats) = one_slot(cfg, addr);
        let mut taken = 0;
        let busy = loop {
            match pool.conn(0).send(frame(&numbered(taken, 1000))) {
                Ok(()) => taken += 1,
                Err(SendError::Busy(_)) => break true,
                Err(e) => panic!("{e:?}"),
            }
            if taken == 1000 {
                break false;
            }
            if taken == 1 {
                wait_for("the connection", || pool.info()[0].status == Status::Up);
            }
        };
        // Every frame went out (the peer reads them all), yet the lane is full.
        assert!(
            busy,
            "64 KB of unacknowledged frames must make the lane busy"
        );
        // Out of the queue is not yet written whole: the writer may hold the last one.
        wait_for("the writes", || {
            let c = &pool.info()[0];
            c.frames_in_queue == 0 && c.unacked_frames == taken as usize
        });
        let c = &pool.info()[0];
        assert_eq!(c.unacked_frames, taken as usize);
        assert_eq!(c.queued_bytes, 0);
        assert_eq!(c.unacked_bytes, taken as usize * (1004 + OVERHEAD));
        assert_eq!(stats.snapshot().queued_bytes, c.unacked_bytes as u64);
        // Closed (nodedown), the lane drops what the peer never acknowledged, and counts it.
        pool.close();
        wait_for("the drop", || stats.snapshot().dropped == taken as u64);
        assert_eq!(stats.snapshot().queued_bytes, 0);
        reader.join().unwrap();
    }

    /// Streams 20,000 frames to a listener that goes away mid-stream (`abrupt`: its
    /// connections reset first, as a crash would; else it closes, as a teleport that stops
    /// does), a new one taking its place elsewhere. Returns (ids received by either, in
    /// order; missing; the counters).
    fn restart_mid_stream(abrupt: bool) -> (Vec<u32>, u64, crate::stats::Snapshot) {
        let (l1, _a1, rx1) = listener(SocketOpts::default());
        let (pool, stats) = one_slot(config(b"c", SocketOpts::default()), l1.local_addr());
        let pool = Arc::new(pool);
        let n = 20_000u32;
        let sender = {
            let pool = pool.clone();
            thread::spawn(move || {
                for id in 0..n {
                    send_waiting(pool.conn(0), frame(&numbered(id, (id % 200) as usize)));
                    if id == n / 2 {
                        thread::sleep(Duration::from_millis(50));
                    }
                }
            })
        };
        let first: Vec<u32> = (0..n / 4)
            .map(|_| id_of(&rx1.recv_timeout(Duration::from_secs(10)).unwrap().1))
            .collect();
        if abrupt {
            l1.cut();
        }
        l1.close();
        let (l2, _a2, rx2) = listener(SocketOpts::default());
        pool.retarget(l2.local_addr(), b"c");
        sender.join().unwrap();
        wait_for("the lane to settle", || {
            let c = &pool.info()[0];
            c.queued_bytes == 0 && c.unacked_frames == 0
        });
        let mut ids = first;
        ids.extend(rx1.try_iter().map(|(_, p)| id_of(&p)));
        ids.extend(rx2.try_iter().map(|(_, p)| id_of(&p)));
        let seen: HashSet<u32> = ids.iter().copied().collect();
        let missing = (0..n).filter(|i| !seen.contains(i)).count() as u64;
        pool.close();
        l2.close();
        (ids, missing, stats.snapshot())
    }

    #[test]
    fn a_peer_teleport_that_stops_and_starts_again_loses_nothing() {
        // Closing, the old listener says LAST: what it did not deliver goes to the new one.
        let (ids, missing, s) = restart_mid_stream(false);
        assert_eq!(ids, (0..20_000).collect::<Vec<_>>());
        assert_eq!((missing, s.dropped, s.acked), (0, 0, 20_000));
    }

    #[test]
    fn a_peer_teleport_that_dies_costs_only_frames_it_never_acknowledged_all_counted() {
        // No LAST: the written frames it did not acknowledge are dropped and counted, never
        // delivered twice; some of them may have arrived.
        let (ids, missing, s) = restart_mid_stream(true);
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "reordered or duplicated"
        );
        assert!(
            missing <= s.dropped,
            "lost {missing}, counted {}",
            s.dropped
        );
        assert_eq!(s.acked + s.dropped, 20_000);
    }

    /// Shared bytes that panic when the writer reads them.
    struct Explodes;
    impl Shared for Explodes {
        fn bytes(&self, _: u32) -> &[u8] {
            panic!("boom")
        }
    }

    #[test]
    fn a_writer_that_panics_releases_what_its_batch_held() {
        let (l, _acceptor, _rx) = listener(SocketOpts::default());
        let (pool, stats) = one_slot(config(b"c", SocketOpts::default()), l.local_addr());
        // Large, so the writer task (not this thread) writes it.
        let mut d = crate::frame::Draft::new(crate::frame::Kind::ToName, &[119, 1, b't']);
        d.term().binary_ref(100_000);
        let bomb = d.finish(Some(Arc::new(Explodes))).unwrap();
        pool.conn(0).send(bomb).unwrap();
        wait_for("the slot to close", || {
            pool.info()[0].status == Status::Closed
        });
        wait_for("the counts", || stats.snapshot().dropped == 1);
        assert_eq!(stats.snapshot().queued_bytes, 0);
        assert_eq!(pool.info()[0].queued_bytes, 0);
        l.close();
    }
}
