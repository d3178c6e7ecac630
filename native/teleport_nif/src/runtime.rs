//! `runtime_*`: this node's teleport runtime, a resource held by `teleport_server`: the
//! listener that receives from peers, the peers allowed to connect in, and the counters.

use crate::deliver::Deliver;
use parking_lot::Mutex;
use rustler::{Binary, Encoder, Env, NifResult, ResourceArc, Term};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use teleport_core::listener::{Acceptor, ListenConfig, Listener};
use teleport_core::peers::Peers;
use teleport_core::stats::PeerStats;

/// The runtime of this node.
pub struct Runtime {
    /// This node's name; set again by `runtime_set_name` when the node becomes distributed.
    pub me: Arc<Mutex<Vec<u8>>>,
    pub peers: Arc<Peers>,
    listener: Arc<Listener>,
}

#[rustler::resource_impl]
impl rustler::Resource for Runtime {}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.listener.close();
    }
}

struct NifAcceptor {
    peers: Arc<Peers>,
    me: Arc<Mutex<Vec<u8>>>,
}

impl Acceptor for NifAcceptor {
    type Sink = Deliver;
    fn me(&self) -> Vec<u8> {
        self.me.lock().clone()
    }
    fn cookie_for(&self, peer: &[u8]) -> Option<Vec<u8>> {
        self.peers.cookie_for(peer)
    }
    fn stats(&self, peer: &[u8]) -> Arc<PeerStats> {
        self.peers.stats(peer)
    }
    fn sink(&self, _peer: &[u8]) -> Deliver {
        Deliver::new()
    }
}

mod atoms {
    rustler::atoms! { ok, error, listen, bad_ip }
}

/// Starts listening on `Ip:Port` (port 0: any) for node `Me`.
/// `{ok, Runtime} | {error, {bad_ip, Ip} | {listen, Reason}}`.
#[rustler::nif]
fn runtime_start<'a>(
    env: Env<'a>,
    me: Binary<'a>,
    ip: String,
    port: u16,
    max_frame_bytes: usize,
    handshake_timeout_ms: u64,
) -> NifResult<Term<'a>> {
    let Ok(ip_addr) = ip.parse::<IpAddr>() else {
        return Ok((atoms::error(), (atoms::bad_ip(), ip)).encode(env));
    };
    let peers = Arc::new(Peers::default());
    let me = Arc::new(Mutex::new(me.as_slice().to_vec()));
    let cfg = ListenConfig {
        max_frame_bytes,
        handshake_timeout: Duration::from_millis(handshake_timeout_ms),
    };
    let acceptor = Arc::new(NifAcceptor {
        peers: peers.clone(),
        me: me.clone(),
    });
    match Listener::start(SocketAddr::new(ip_addr, port), cfg, acceptor) {
        Ok(listener) => {
            let rt = ResourceArc::new(Runtime {
                me,
                peers,
                listener,
            });
            Ok((atoms::ok(), rt).encode(env))
        }
        Err(e) => Ok((atoms::error(), (atoms::listen(), e.to_string())).encode(env)),
    }
}

/// Sets this node's name (`atom_to_binary(node())`), as handshakes state it from now on.
#[rustler::nif]
fn runtime_set_name(rt: ResourceArc<Runtime>, me: Binary) {
    *rt.me.lock() = me.as_slice().to_vec();
}

/// Stops listening and closes every incoming connection.
#[rustler::nif]
fn runtime_stop(rt: ResourceArc<Runtime>) {
    rt.listener.close();
}

/// The port the listener is bound to.
#[rustler::nif]
fn runtime_port(rt: ResourceArc<Runtime>) -> u16 {
    rt.listener.local_addr().port()
}

/// Lets node `Node` connect in, proving it knows `Cookie`.
#[rustler::nif]
fn runtime_allow(rt: ResourceArc<Runtime>, node: Binary, cookie: Binary) {
    rt.peers.allow(node.as_slice(), cookie.as_slice());
}

/// Stops node `Node` from connecting in.
#[rustler::nif]
fn runtime_forbid(rt: ResourceArc<Runtime>, node: Binary) {
    rt.peers.forbid(node.as_slice());
}

/// `[{NodeName :: binary(), #{Counter => integer()}}]` for every peer seen.
#[rustler::nif]
fn runtime_stats<'a>(env: Env<'a>, rt: ResourceArc<Runtime>) -> NifResult<Term<'a>> {
    let mut out = Vec::new();
    for (node, stats) in rt.peers.all_stats() {
        let s = stats.snapshot();
        let pairs: [(&str, u64); 9] = [
            ("msgs_out", s.msgs_out),
            ("bytes_out", s.bytes_out),
            ("msgs_in", s.msgs_in),
            ("bytes_in", s.bytes_in),
            ("queued_bytes", s.queued_bytes),
            ("dropped", s.dropped),
            ("reconnects", s.reconnects),
            ("connections", s.connections),
            ("connections_in", s.connections_in),
        ];
        let mut map = Term::map_new(env);
        for (k, v) in pairs {
            map = map.map_put(rustler::Atom::from_str(env, k)?, v)?;
        }
        let mut name = rustler::OwnedBinary::new(node.len());
        name.as_mut_slice().copy_from_slice(&node);
        out.push((Binary::from_owned(name, env), map));
    }
    Ok(out.encode(env))
}
