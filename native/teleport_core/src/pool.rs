//! A pool: `size` outgoing connections to one peer node. A message's connection is chosen
//! by hashing its (sender, destination) pair, so one pair always uses one connection (order
//! kept) while different pairs spread over the pool.

use crate::conn::{Conn, PeerConfig, Target};
use crate::stats::PeerStats;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

/// The outgoing connections to one peer.
pub struct Pool {
    conns: Vec<Arc<Conn>>,
    stats: Arc<PeerStats>,
    target: Arc<Target>,
}

impl Pool {
    /// Starts `size` connection slots (at least 1) to the peer's listener at `addr`. They
    /// connect on first use.
    pub fn start(
        cfg: PeerConfig,
        addr: SocketAddr,
        size: usize,
        stats: Arc<PeerStats>,
    ) -> io::Result<Pool> {
        let cfg = Arc::new(cfg);
        let target = Arc::new(Target::new(addr));
        let conns = (0..size.max(1))
            .map(|i| Conn::start(i, cfg.clone(), stats.clone(), target.clone()))
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

    /// Points every connection at `addr` (where the peer listens now) and has them try at
    /// once; what they queued goes out there, in order.
    pub fn retarget(&self, addr: SocketAddr) {
        self.target.set(addr);
        self.conns.iter().for_each(|c| c.poke());
    }

    /// The connection for a (sender, destination) hash.
    #[inline]
    pub fn conn(&self, pair_hash: u64) -> &Conn {
        // Multiply-shift: the high bits of a product spread any hash evenly over the slots.
        let slot =
            ((pair_hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) * self.conns.len() as u64) >> 32;
        &self.conns[slot as usize]
    }

    /// Every connection, in index order.
    pub fn conns(&self) -> &[Arc<Conn>] {
        &self.conns
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
