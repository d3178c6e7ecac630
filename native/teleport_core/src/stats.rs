//! Counters per peer node and per connection, kept with relaxed atomics on the hot paths
//! and read by `teleport:stats/0` and `teleport:info/0`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

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
    /// Bytes the peer's lanes hold: queued, being written, or written and waiting for the
    /// peer's acknowledgement.
    pub queued_bytes: AtomicU64,
    /// Messages accepted and then dropped: held when the pool was torn down, written to an
    /// earlier incarnation of the peer's teleport and never acknowledged, or over the
    /// peer's frame limit.
    pub dropped: AtomicU64,
    /// Messages the peer acknowledged: delivered there (or dropped there as undeliverable,
    /// as `!` drops a message to a dead process).
    pub acked: AtomicU64,
    /// Messages sent again on a new connection because the one that carried them died
    /// before the peer acknowledged them.
    pub resent: AtomicU64,
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
    /// See [`PeerStats::acked`].
    pub acked: u64,
    /// See [`PeerStats::resent`].
    pub resent: u64,
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
            acked: self.acked.load(Relaxed),
            resent: self.resent.load(Relaxed),
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

    /// Counts `msgs` messages of `bytes` in all written.
    #[inline]
    pub fn sent_many(&self, msgs: u64, bytes: u64) {
        if msgs > 0 {
            self.msgs_out.fetch_add(msgs, Relaxed);
            self.bytes_out.fetch_add(bytes, Relaxed);
        }
    }

    /// Counts one message of `bytes` received.
    #[inline]
    pub fn received(&self, bytes: usize) {
        self.msgs_in.fetch_add(1, Relaxed);
        self.bytes_in.fetch_add(bytes as u64, Relaxed);
    }
}

/// The traffic of one connection in its one direction (an outgoing connection writes, an
/// incoming one reads), for `teleport:info/0`. Only the connection's own thread (or the
/// sender writing on its behalf) adds; relaxed atomics on a line no other connection touches.
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Whole messages written or read.
    pub msgs: AtomicU64,
    /// Bytes written or read, frame headers included.
    pub bytes: AtomicU64,
    /// `writev` calls made (an outgoing connection's; `msgs / writes` is how well they
    /// were batched).
    pub writes: AtomicU64,
}

impl ConnStats {
    /// Counts `msgs` messages of `bytes` in all.
    #[inline]
    pub fn add(&self, msgs: u64, bytes: u64) {
        if msgs > 0 {
            self.msgs.fetch_add(msgs, Relaxed);
            self.bytes.fetch_add(bytes, Relaxed);
        }
    }

    /// Counts `writes` more `writev` calls.
    #[inline]
    pub fn wrote(&self, writes: u64) {
        if writes > 0 {
            self.writes.fetch_add(writes, Relaxed);
        }
    }

    /// `(msgs, bytes)` now.
    pub fn get(&self) -> (u64, u64) {
        (self.msgs.load(Relaxed), self.bytes.load(Relaxed))
    }
}

/// Milliseconds since the Unix epoch of `t`, the unit of `erlang:system_time(millisecond)`.
pub fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn counters_add_up() {
        let s = PeerStats::default();
        s.sent(10);
        s.sent_many(3, 30);
        s.sent_many(0, 99);
        s.received(7);
        let snap = s.snapshot();
        assert_eq!((snap.msgs_out, snap.bytes_out), (4, 40));
        assert_eq!((snap.msgs_in, snap.bytes_in), (1, 7));
        let c = ConnStats::default();
        c.add(2, 20);
        c.add(0, 5);
        assert_eq!(c.get(), (2, 20));
    }

    #[test]
    fn unix_millis_counts_from_the_epoch() {
        assert_eq!(unix_millis(UNIX_EPOCH + Duration::from_millis(1234)), 1234);
        assert_eq!(unix_millis(UNIX_EPOCH - Duration::from_secs(1)), 0);
    }
}
