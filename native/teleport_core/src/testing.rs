//! Helpers shared by the core's tests: a listener that collects what arrives, pools and
//! connections to it, frames to send, and a patient wait.

use crate::conn::PeerConfig;
use crate::etf;
use crate::frame::{self, Draft, Header, Kind};
use crate::listener::{Acceptor, ListenConfig, Listener};
use crate::out_frame::OutFrame;
use crate::peers::Peers;
use crate::pool::Pool;
use crate::pump::Sink;
use crate::sockopts::SocketOpts;
use crate::stats::PeerStats;
use crate::tls::{Tls, TlsFiles, Verify, Versions};
use parking_lot::{Condvar, Mutex};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

/// The destination of every test frame: the name `t`, as [`frame`] writes it.
const DEST: [u8; 3] = [etf::SMALL_ATOM_UTF8_EXT, 1, b't'];

/// The bytes a test frame has beyond its payload: the length prefix, the fixed header, the
/// destination and the term's version byte.
pub const OVERHEAD: usize = frame::LEN_BYTES + frame::FIXED_BYTES + 1 + DEST.len() + 1;

/// A real frame to `t` whose term is the version byte followed by `payload` (not a valid
/// term: the test sinks do not decode it).
pub fn frame(payload: &[u8]) -> OutFrame {
    let mut d = Draft::new(Kind::ToName, &DEST);
    d.term().raw(payload);
    d.finish(None).unwrap()
}

/// The sequence number of a frame written by [`frame`], and its payload.
pub fn payload(header: Header, body: &[u8]) -> (u64, Vec<u8>) {
    (header.seq, header.term(body)[1..].to_vec())
}

/// Holds deliveries back while shut: a reader stuck delivering.
#[derive(Default)]
pub struct Gate {
    shut: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    /// From now on, deliveries wait.
    pub fn shut(&self) {
        *self.shut.lock() = true;
    }

    /// Lets them go.
    pub fn open(&self) {
        *self.shut.lock() = false;
        self.opened.notify_all();
    }

    fn pass(&self) {
        let mut shut = self.shut.lock();
        while *shut {
            self.opened.wait(&mut shut);
        }
    }
}

/// The threads frames were delivered on.
pub type Threads = Arc<Mutex<HashSet<ThreadId>>>;

/// Frames arrive here, as (peer, payload); a payload `poison` is refused.
pub struct ToChannel(Vec<u8>, Sender<(Vec<u8>, Vec<u8>)>, Arc<Gate>, Threads);

impl Sink for ToChannel {
    type Buf = Vec<u8>;
    fn alloc(&mut self, len: usize) -> Option<Vec<u8>> {
        Some(vec![0; len])
    }
    fn frame(&mut self, header: Header, body: &[u8]) -> Result<(), String> {
        self.2.pass();
        self.3.lock().insert(std::thread::current().id());
        let (_, body) = payload(header, body);
        if body == b"poison" {
            return Err("poisoned".into());
        }
        let _ = self.1.send((self.0.clone(), body));
        Ok(())
    }
    fn frame_owned(&mut self, header: Header, body: Vec<u8>) -> Result<(), String> {
        self.frame(header, &body)
    }
}

/// A listener's owner for node `b@h`.
pub struct TestAcceptor {
    /// Its node name.
    pub me: Vec<u8>,
    /// Who may connect in.
    pub peers: Peers,
    /// Where its sinks send.
    pub tx: Mutex<Sender<(Vec<u8>, Vec<u8>)>>,
    /// What its sinks pass before delivering.
    pub gate: Arc<Gate>,
    /// The threads its sinks delivered on.
    pub threads: Threads,
}

impl Acceptor for TestAcceptor {
    type Sink = ToChannel;
    fn me(&self) -> Vec<u8> {
        self.me.clone()
    }
    fn cookie_for(&self, peer: &[u8]) -> Option<Vec<u8>> {
        self.peers.cookie_for(peer)
    }
    fn stats(&self, peer: &[u8]) -> Arc<PeerStats> {
        self.peers.stats(peer)
    }
    fn sink(&self, peer: &[u8]) -> ToChannel {
        ToChannel(
            peer.to_vec(),
            self.tx.lock().clone(),
            self.gate.clone(),
            self.threads.clone(),
        )
    }
}

/// Frames as they arrive: (peer, payload).
pub type Arrivals = Receiver<(Vec<u8>, Vec<u8>)>;

/// A listener for node `b@h` that lets `a@h` in with cookie `c`.
pub fn listener(opts: SocketOpts) -> (Arc<Listener>, Arc<TestAcceptor>, Arrivals) {
    listener_tls(opts, None)
}

/// [`listener`], running `tls` (`None`: plain).
pub fn listener_tls(
    opts: SocketOpts,
    tls: Option<Arc<Tls>>,
) -> (Arc<Listener>, Arc<TestAcceptor>, Arrivals) {
    let (tx, rx) = channel();
    let acceptor = Arc::new(TestAcceptor {
        me: b"b@h".to_vec(),
        peers: Peers::default(),
        tx: Mutex::new(tx),
        gate: Arc::default(),
        threads: Arc::default(),
    });
    acceptor.peers.allow(b"a@h", b"c");
    let cfg = ListenConfig {
        max_frame_bytes: 1 << 20,
        handshake_timeout: Duration::from_secs(2),
        sock_opts: opts,
        thread_nice: TEST_NICE,
        poll_threads: crate::poller::default_threads(),
        tls,
    };
    let l = Listener::start((Ipv4Addr::LOCALHOST, 0).into(), cfg, acceptor.clone()).unwrap();
    (l, acceptor, rx)
}

/// The nice value every test listener and pool gives its threads: not 0, so that every
/// test runs them the way a node does by default.
pub const TEST_NICE: u8 = 3;

/// How `a@h` reaches `b@h`, and the cookie it proves.
pub fn config(cookie: &[u8], opts: SocketOpts) -> (PeerConfig, Vec<u8>) {
    let cfg = PeerConfig {
        me: b"a@h".to_vec(),
        peer: b"b@h".to_vec(),
        max_queue_bytes: 1 << 20,
        connect_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_millis(500),
        sock_opts: opts,
        thread_nice: TEST_NICE,
        tls: None,
    };
    (cfg, cookie.to_vec())
}

/// A pool of `size` slots to `addr`.
pub fn start(
    (cfg, cookie): (PeerConfig, Vec<u8>),
    addr: SocketAddr,
    size: usize,
    stats: Arc<PeerStats>,
) -> io::Result<Pool> {
    Pool::start(cfg, addr, &cookie, size, stats)
}

/// A pool of one connection slot, and its counters.
pub fn one_slot(cfg: (PeerConfig, Vec<u8>), addr: SocketAddr) -> (Pool, Arc<PeerStats>) {
    let stats = Arc::new(PeerStats::default());
    (start(cfg, addr, 1, stats.clone()).unwrap(), stats)
}

/// Waits up to 10 s for `f` to hold.
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends a frame of `payload` through the pool, for `hash`; it must be taken.
pub fn send(pool: &Pool, hash: u64, payload: &[u8]) {
    if let Err(e) = pool.send(hash, frame(payload)) {
        panic!("not taken: {e:?}")
    }
}

/// A CA of its own, which signs node certificates.
pub struct Ca {
    /// Its certificate.
    pub cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    /// A CA named `name`.
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A node certificate for `hosts` and its key, as PEM; `expired`: it ended in 2020.
    pub fn issue(&self, hosts: &[&str], expired: bool) -> (String, String) {
        self.issue_until(hosts, expired.then_some((2020, 1, 1)))
    }

    /// The same, valid until the date given (year, month, day), if one is.
    pub fn issue_until(&self, hosts: &[&str], until: Option<(i32, u8, u8)>) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())
                .unwrap();
        if let Some((y, m, d)) = until {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(y, m, d);
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A directory of its own under the system's temporary one, removed when dropped.
pub struct Dir(pub PathBuf);

impl Dir {
    /// A new one, `tag` in its name.
    pub fn new(tag: &str) -> Dir {
        let n = std::sync::atomic::AtomicU64::new(0);
        let unique = format!(
            "teleport-tls-{tag}-{}-{:?}-{}",
            std::process::id(),
            std::thread::current().id(),
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(unique.replace(['(', ')'], ""));
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    /// Writes `text` to the file `name` in it: its path.
    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The records a rustls connection holds for its peer, taken out of it.
pub fn records_of<D>(conn: &mut rustls::ConnectionCommon<D>) -> Vec<u8> {
    let mut wire = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut wire).unwrap();
    }
    wire
}

/// Runs the two ends' TLS handshake over memory; the first error of either.
pub fn memory_handshake(
    c: &mut rustls::ClientConnection,
    s: &mut rustls::ServerConnection,
) -> Result<(), rustls::Error> {
    for _ in 0..16 {
        pass(c, s)?;
        pass(s, c)?;
        if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() {
            return Ok(());
        }
    }
    panic!("the handshake did not end");
}

/// Hands `to` the records `from` holds for it.
fn pass<A, B>(
    from: &mut rustls::ConnectionCommon<A>,
    to: &mut rustls::ConnectionCommon<B>,
) -> Result<(), rustls::Error> {
    let wire = records_of(from);
    if !wire.is_empty() {
        to.read_tls(&mut &wire[..]).unwrap();
        to.process_new_packets()?;
    }
    Ok(())
}

/// The files of a node whose certificate `ca` issued for `hosts`, trusting `trusted`.
pub fn node(dir: &Dir, name: &str, ca: &Ca, hosts: &[&str], trusted: &Ca) -> TlsFiles {
    let (cert, key) = ca.issue(hosts, false);
    TlsFiles {
        certfile: dir.file(&format!("{name}.crt"), &cert),
        keyfile: dir.file(&format!("{name}.key"), &key),
        cacertfile: dir.file(&format!("{name}-ca.crt"), &trusted.cert.pem()),
        verify: Verify::Peer,
        server_name_check: true,
        versions: Versions::Tls13And12,
    }
}

/// The TLS of `a@h` and `b@h` (certificates for the host `h`), both trusting `ca`; `a@h`'s
/// issued by `a_issuer`.
pub fn tls_pair(dir: &Dir, ca: &Ca, a_issuer: &Ca) -> (Arc<Tls>, Arc<Tls>) {
    let a = Tls::load(&node(dir, "a", a_issuer, &["h"], ca)).unwrap();
    let b = Tls::load(&node(dir, "b", ca, &["h"], ca)).unwrap();
    (Arc::new(a), Arc::new(b))
}
