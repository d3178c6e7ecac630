//! `runtime_*`: this node's teleport runtime, a resource held by `teleport_server`: the
//! listener that receives from peers, the peers allowed to connect in, the counters, and
//! the socket options every connection gets.

use crate::atoms;
use crate::deliver::Deliver;
use crate::reader::Readers;
use parking_lot::Mutex;
use rustler::types::tuple::make_tuple;
use rustler::{Atom, Binary, Encoder, Env, NifResult, ResourceArc, Term};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use teleport_core::listener::{Acceptor, ListenConfig, Listener};
use teleport_core::peers::Peers;
use teleport_core::secure;
use teleport_core::sockopts::{Keepalive, SockOptError, SocketOpts};
use teleport_core::stats::PeerStats;
use teleport_core::tls::{Tls, TlsFiles, Verify, Versions};

/// The runtime of this node.
pub struct Runtime {
    /// This node's name; set again by `runtime_set_name` when the node becomes distributed.
    pub me: Arc<Mutex<Vec<u8>>>,
    pub peers: Arc<Peers>,
    /// The options of every socket: the listener's, and the pools' (`pool_start`).
    pub sock_opts: SocketOpts,
    /// The nice value of teleport's threads above the VM's: the listener's, and the pools'.
    pub thread_nice: u8,
    /// The node's TLS, for the listener and every pool; `None`: plain.
    pub tls: Option<Arc<Tls>>,
    listener: Arc<Listener>,
    /// The processes reading the incoming connections.
    readers: Arc<Readers>,
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

/// The value of `key` in the map `opts`, if there.
fn opt<'a, T: rustler::Decoder<'a>>(opts: Term<'a>, key: Atom) -> NifResult<Option<T>> {
    match opts.map_get(key) {
        Ok(v) => Ok(Some(v.decode()?)),
        Err(_) => Ok(None),
    }
}

/// The socket options from the map `teleport_config` checked (absent keys: the kernel's
/// default; `nodelay` absent is true).
fn decode_sock_opts(opts: Term) -> NifResult<SocketOpts> {
    let secs = |key| -> NifResult<Option<Duration>> {
        Ok(opt::<u64>(opts, key)?.map(Duration::from_secs))
    };
    let keepalive = match opt::<bool>(opts, atoms::keepalive())? {
        Some(true) => Some(Keepalive {
            time: secs(atoms::keepalive_time())?,
            interval: secs(atoms::keepalive_interval())?,
            retries: opt(opts, atoms::keepalive_retries())?,
        }),
        _ => None,
    };
    let bind_ip = match opt::<String>(opts, atoms::bind_ip())? {
        Some(text) => Some(text.parse::<IpAddr>().map_err(|_| rustler::Error::BadArg)?),
        None => None,
    };
    Ok(SocketOpts {
        sndbuf: opt(opts, atoms::sndbuf())?,
        recbuf: opt(opts, atoms::recbuf())?,
        nodelay: opt(opts, atoms::nodelay())?.unwrap_or(true),
        keepalive,
        priority: opt(opts, atoms::priority())?,
        tos: opt(opts, atoms::tos())?,
        user_timeout: opt::<u64>(opts, atoms::user_timeout())?.map(Duration::from_millis),
        bind_ip,
    })
}

/// The TLS of `runtime_start`: `false`, or the map `teleport_tls` makes (`certfile`,
/// `keyfile`, `cacertfile` as text, `verify`, `server_name_check`, `versions` (a list of
/// `'tlsv1.3'` and `'tlsv1.2'`), and `key`, the key's PEM, when a password opened it),
/// loaded by [`secure::load`]: `Err` says what is wrong, naming the file.
fn load_tls(tls: Term) -> NifResult<Result<Option<Arc<Tls>>, String>> {
    if matches!(tls.decode::<bool>(), Ok(false)) {
        return Ok(Ok(None));
    }
    let path =
        |key| -> NifResult<std::path::PathBuf> { Ok(tls.map_get(key)?.decode::<String>()?.into()) };
    let verify = match tls.map_get(atoms::verify())?.decode::<Atom>()? {
        v if v == atoms::verify_none() => Verify::None,
        v if v == atoms::verify_peer() => Verify::Peer,
        _ => return Err(rustler::Error::BadArg),
    };
    let listed: Vec<Atom> = tls.map_get(atoms::versions())?.decode()?;
    let versions = match (
        listed.contains(&atoms::tlsv1_3()),
        listed.contains(&atoms::tlsv1_2()),
    ) {
        (true, true) => Versions::Tls13And12,
        (true, false) => Versions::Tls13,
        (false, true) => Versions::Tls12,
        (false, false) => return Err(rustler::Error::BadArg),
    };
    let files = TlsFiles {
        certfile: path(atoms::certfile())?,
        keyfile: path(atoms::keyfile())?,
        cacertfile: path(atoms::cacertfile())?,
        verify,
        server_name_check: tls.map_get(atoms::server_name_check())?.decode()?,
        versions,
    };
    let key = opt::<Binary>(tls, atoms::key())?;
    Ok(secure::load(&files, key.as_ref().map(|k| k.as_slice()))
        .map(|loaded| Some(Arc::new(loaded)))
        .map_err(|e| e.to_string()))
}

/// The limits of `runtime_start`, a map from `teleport_server`.
#[derive(rustler::NifMap)]
struct RuntimeLimits {
    /// Frames longer than this close their connection.
    max_frame_bytes: usize,
    /// Bound on an incoming connection's handshake, milliseconds.
    handshake_timeout: u64,
    /// How much lower than the VM's the priority of teleport's threads is.
    thread_nice: u8,
}

/// Starts listening on `Ip:Port` (port 0: any) for node `Me`, with the socket options
/// `SockOpts` (a map, see `teleport_config`) for the listener and every connection, and the
/// `Limits` (`max_frame_bytes`, `handshake_timeout` in ms, `thread_nice`) and the `Tls` of
/// every connection (see [`load_tls`]). Each authenticated connection is announced to the
/// calling process as `{teleport_accepted, Reader}` (see `reader`). `{ok, Runtime} | {error,
/// {bad_ip, Ip} | {listen, Reason} | {socket_opt, Option, Reason} | {tls, Reason}}`.
///
/// On a dirty CPU scheduler: loading TLS parses keys and certificates.
#[rustler::nif(schedule = "DirtyCpu")]
fn runtime_start<'a>(
    env: Env<'a>,
    me: Binary<'a>,
    ip: String,
    port: u16,
    sock_opts: Term<'a>,
    limits: RuntimeLimits,
    tls: Term<'a>,
) -> NifResult<Term<'a>> {
    let RuntimeLimits {
        max_frame_bytes,
        handshake_timeout,
        thread_nice,
    } = limits;
    let Ok(ip_addr) = ip.parse::<IpAddr>() else {
        return Ok((atoms::error(), (atoms::bad_ip(), ip)).encode(env));
    };
    let sock_opts = decode_sock_opts(sock_opts)?;
    let tls = match load_tls(tls)? {
        Ok(tls) => tls,
        Err(why) => return Ok((atoms::error(), (atoms::tls(), why)).encode(env)),
    };
    let peers = Arc::new(Peers::default());
    let me = Arc::new(Mutex::new(me.as_slice().to_vec()));
    let cfg = ListenConfig {
        max_frame_bytes,
        handshake_timeout: Duration::from_millis(handshake_timeout),
        sock_opts: sock_opts.clone(),
        thread_nice,
        // The readers' schedulers read the connections, not poll threads.
        poll_threads: 0,
        tls: tls.clone(),
    };
    let readers = Arc::new(Readers::new(*env.pid().as_c_arg()));
    let acceptor = Arc::new(NifAcceptor {
        peers: peers.clone(),
        me: me.clone(),
    });
    let addr = SocketAddr::new(ip_addr, port);
    match Listener::start_driven(addr, cfg, acceptor, readers.clone()) {
        Ok(listener) => {
            let rt = ResourceArc::new(Runtime {
                me,
                peers,
                sock_opts,
                thread_nice,
                tls,
                listener,
                readers,
            });
            Ok((atoms::ok(), rt).encode(env))
        }
        Err(e) => match e.get_ref().and_then(|r| r.downcast_ref::<SockOptError>()) {
            Some(refused) => {
                let option = Atom::from_str(env, refused.option)?;
                let why = (atoms::socket_opt(), option, refused.to_string());
                Ok((atoms::error(), why).encode(env))
            }
            None => Ok((atoms::error(), (atoms::listen(), e.to_string())).encode(env)),
        },
    }
}

/// `{Ip, Port}` as `inet:peername/1` gives it.
pub fn addr_term<'a>(env: Env<'a>, addr: SocketAddr) -> Term<'a> {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            let parts: Vec<Term> = o.iter().map(|b| b.encode(env)).collect();
            make_tuple(env, &parts)
        }
        IpAddr::V6(v6) => {
            let parts: Vec<Term> = v6.segments().iter().map(|s| s.encode(env)).collect();
            make_tuple(env, &parts)
        }
    };
    make_tuple(env, &[ip, addr.port().encode(env)])
}

/// `addr_term` of an address that may be unknown (`undefined`).
pub fn maybe_addr<'a>(env: Env<'a>, addr: Option<SocketAddr>) -> Term<'a> {
    match addr {
        Some(a) => addr_term(env, a),
        None => atoms::undefined().encode(env),
    }
}

/// The listener and its incoming connections: `#{ip, port, handshaking, incoming =>
/// [#{id, peer, state, peer_addr, local_addr, msgs_in, bytes_in, connected_since, sndbuf,
/// recbuf, reader, longest_turn_cpu_us, longest_turn_wall_us}]}`, `peer` the node name as a
/// binary (`undefined` while it shakes hands).
#[rustler::nif]
fn runtime_info<'a>(env: Env<'a>, rt: ResourceArc<Runtime>) -> NifResult<Term<'a>> {
    let l = &rt.listener;
    let mut incoming = Vec::new();
    for c in l.incoming() {
        let (peer, state) = match &c.peer {
            Some(name) => {
                let mut bin = rustler::OwnedBinary::new(name.len());
                bin.as_mut_slice().copy_from_slice(name);
                (Binary::from_owned(bin, env).encode(env), atoms::up())
            }
            None => (atoms::undefined().encode(env), atoms::handshaking()),
        };
        let reader = rt.readers.reader_of(c.id);
        let longest = reader.map_or((0, 0), |(_, turns)| turns);
        let map = Term::map_new(env)
            .map_put(atoms::id(), c.id)?
            .map_put(atoms::peer(), peer)?
            .map_put(atoms::state(), state)?
            .map_put(atoms::peer_addr(), maybe_addr(env, c.peer_addr))?
            .map_put(atoms::local_addr(), maybe_addr(env, c.local_addr))?
            .map_put(atoms::msgs_in(), c.msgs_in)?
            .map_put(atoms::bytes_in(), c.bytes_in)?
            .map_put(atoms::connected_since(), c.connected_since)?
            .map_put(atoms::sndbuf(), c.buffers.0)?
            .map_put(atoms::recbuf(), c.buffers.1)?
            .map_put(
                atoms::reader(),
                reader_term(env, reader.map(|(pid, _)| pid)),
            )?
            .map_put(atoms::longest_turn_cpu_us(), longest.0)?
            .map_put(atoms::longest_turn_wall_us(), longest.1)?;
        incoming.push(map);
    }
    let local = l.local_addr();
    let addr = addr_term(env, local);
    let ip = addr.decode::<(Term, u16)>()?.0;
    Term::map_new(env)
        .map_put(atoms::ip(), ip)?
        .map_put(atoms::port(), local.port())?
        .map_put(atoms::handshaking(), l.handshaking())?
        .map_put(atoms::incoming(), incoming)
}

/// The reader process of an incoming connection, or `undefined`.
fn reader_term(env: Env<'_>, pid: Option<rustler::sys::ErlNifPid>) -> Term<'_> {
    match pid {
        Some(pid) => rustler::LocalPid::from_c_arg(pid).encode(env),
        None => atoms::undefined().encode(env),
    }
}

/// Sets this node's name (`atom_to_binary(node())`), as handshakes state it from now on.
#[rustler::nif]
fn runtime_set_name(rt: ResourceArc<Runtime>, me: Binary) -> Atom {
    *rt.me.lock() = me.as_slice().to_vec();
    atoms::ok()
}

/// Stops listening and closes every incoming connection.
#[rustler::nif]
fn runtime_stop(rt: ResourceArc<Runtime>) -> Atom {
    rt.listener.close();
    atoms::ok()
}

/// The port the listener is bound to.
#[rustler::nif]
fn runtime_port(rt: ResourceArc<Runtime>) -> u16 {
    rt.listener.local_addr().port()
}

/// Lets node `Node` connect in, proving it knows `Cookie`.
#[rustler::nif]
fn runtime_allow(rt: ResourceArc<Runtime>, node: Binary, cookie: Binary) -> Atom {
    rt.peers.allow(node.as_slice(), cookie.as_slice());
    atoms::ok()
}

/// Stops node `Node` from connecting in.
#[rustler::nif]
fn runtime_forbid(rt: ResourceArc<Runtime>, node: Binary) -> Atom {
    rt.peers.forbid(node.as_slice());
    // It went down: a pool it makes later is a new session, and its lanes start afresh.
    rt.listener.forget(node.as_slice());
    atoms::ok()
}

/// `[{NodeName :: binary(), #{Counter => integer()}}]` for every peer seen.
#[rustler::nif]
fn runtime_stats<'a>(env: Env<'a>, rt: ResourceArc<Runtime>) -> NifResult<Term<'a>> {
    let mut out = Vec::new();
    for (node, stats) in rt.peers.all_stats() {
        let s = stats.snapshot();
        let pairs: [(&str, u64); 11] = [
            ("msgs_out", s.msgs_out),
            ("bytes_out", s.bytes_out),
            ("msgs_in", s.msgs_in),
            ("bytes_in", s.bytes_in),
            ("queued_bytes", s.queued_bytes),
            ("dropped", s.dropped),
            ("acked", s.acked),
            ("resent", s.resent),
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
