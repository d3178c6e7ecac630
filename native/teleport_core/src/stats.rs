//! Counters per peer node, kept with relaxed atomics on the hot paths and read by
//! `teleport:stats/0`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Traffic and trouble with one peer node, in both directions.
#[derive(Debug, Default)]
pub struct PeerStats {
    /// Messages written to the peer's sockets.
    pub msgs_out: AtomicU64,
    /// Bytes written to the peer's sockets, frame headers included.
    pub bytes_out: AtomicU64,
    /// Messages received from the peer (including those whose destination did not exist,
    /// which are dropped silently as disterl drops them).
    pub msgs_in: AtomicU64,
    /// Bytes received from the peer, frame headers included.
    pub bytes_in: AtomicU64,
    /// Bytes queued for the peer and not yet written.
    pub queued_bytes: AtomicU64,
    /// Messages dropped: queued when their connection failed or the pool was torn down.
    pub dropped: AtomicU64,
    /// Outgoing connections established after the first one of each pool slot.
    pub reconnects: AtomicU64,
    /// Outgoing connections up now.
    pub connections: AtomicU64,
    /// Incoming connections up now.
    pub connections_in: AtomicU64,
}

/// A point-in-time copy of [`PeerStats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// See [`PeerStats::msgs_out`].
    pub msgs_out: u64,
    /// See [`PeerStats::bytes_out`].
    pub bytes_out: u64,
    /// See [`PeerStats::msgs_in`].
    pub msgs_in: u64,
    /// See [`PeerStats::bytes_in`].
    pub bytes_in: u64,
    /// See [`PeerStats::queued_bytes`].
    pub queued_bytes: u64,
    /// See [`PeerStats::dropped`].
    pub dropped: u64,
    /// See [`PeerStats::reconnects`].
    pub reconnects: u64,
    /// See [`PeerStats::connections`].
    pub connections: u64,
    /// See [`PeerStats::connections_in`].
    pub connections_in: u64,
}

impl PeerStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            msgs_out: self.msgs_out.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            msgs_in: self.msgs_in.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            queued_bytes: self.queued_bytes.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
            connections: self.connections.load(Relaxed),
            connections_in: self.connections_in.load(Relaxed),
        }
    }

    /// Counts one message of `bytes` written.
    #[inline]
    pub fn sent(&self, bytes: usize) {
        self.msgs_out.fetch_add(1, Relaxed);
        self.bytes_out.fetch_add(bytes as u64, Relaxed);
    }

    /// Counts one message of `bytes` received.
    #[inline]
    pub fn received(&self, bytes: usize) {
        self.msgs_in.fetch_add(1, Relaxed);
        self.bytes_in.fetch_add(bytes as u64, Relaxed);
    }
}
