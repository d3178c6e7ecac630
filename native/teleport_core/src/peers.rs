//! What a node knows of its peers: which may connect in (and their cookie), and the
//! counters of each. Names are node names as bytes: no atom exists for a peer on the Rust
//! side, and the Erlang side only names a peer after it authenticated.

use crate::stats::PeerStats;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

/// The peers of this node.
#[derive(Default)]
pub struct Peers {
    allowed: Mutex<HashMap<Vec<u8>, Vec<u8>>>,
    stats: Mutex<HashMap<Vec<u8>, Arc<PeerStats>>>,
}

impl Peers {
    /// Lets `node` connect in, proving it knows `cookie`.
    pub fn allow(&self, node: &[u8], cookie: &[u8]) {
        self.allowed.lock().insert(node.to_vec(), cookie.to_vec());
    }

    /// Stops `node` from connecting in (it went down).
    pub fn forbid(&self, node: &[u8]) {
        self.allowed.lock().remove(node);
    }

    /// The cookie `node` must prove, if it may connect in.
    pub fn cookie_for(&self, node: &[u8]) -> Option<Vec<u8>> {
        self.allowed.lock().get(node).cloned()
    }

    /// The counters for `node`, made on first use.
    pub fn stats(&self, node: &[u8]) -> Arc<PeerStats> {
        self.stats.lock().entry(node.to_vec()).or_default().clone()
    }

    /// Every peer's counters.
    pub fn all_stats(&self) -> Vec<(Vec<u8>, Arc<PeerStats>)> {
        let map = self.stats.lock();
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_then_forbid() {
        let p = Peers::default();
        assert_eq!(p.cookie_for(b"a@h"), None);
        p.allow(b"a@h", b"secret");
        assert_eq!(p.cookie_for(b"a@h").as_deref(), Some(&b"secret"[..]));
        p.forbid(b"a@h");
        assert_eq!(p.cookie_for(b"a@h"), None);
    }

    #[test]
    fn stats_are_shared_per_node() {
        let p = Peers::default();
        p.stats(b"a@h").sent(10);
        assert_eq!(p.stats(b"a@h").snapshot().bytes_out, 10);
        assert_eq!(p.all_stats().len(), 1);
    }
}
