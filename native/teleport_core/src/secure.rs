//! A connection's bytes through its TLS session, when the node runs TLS (see [`crate::tls`]):
//! a node's TLS as it runs it ([`load`]), the TLS part of both ends' opening ([`open`],
//! [`sniff`] for the listener),
//! the cookie handshake's stream ([`Opening`]), the sending side's socket ([`Link`]) and the
//! receiving side's [`Wire`] ([`Secured`], over a [`Session`]).
//!
//! Frames go in as plaintext and out as TLS records. Once the cookie handshake is over, a
//! TLS 1.3 session's records are teleport's own ([`crate::record`], with the keys rustls
//! hands over; TLS 1.2's stay rustls'): the sender's slices (headers, and large binaries by
//! reference) are copied once, into the record they are sealed in, many frames to a record
//! and many records to a `send`; what the socket does not take at once waits (up to
//! [`PENDING_MAX`], encrypted while the socket drains) and goes first at the next write
//! (the connection counts as having something to write until it is out). The receiving
//! side opens records in place in the buffer the socket, or the reader's port, read them
//! into, and copies the plaintext once, into the pump's buffers: a large frame's into the
//! VM binary it is decoded from.
//!
//! Both ends' handshakes run on the short-lived threads that shake hands today, before the
//! cookie handshake, which then runs inside TLS and bound to the session: a scheduler never
//! does the handshake's public-key work.

use crate::acks::AckOut;
use crate::deadline::Deadline;
use crate::pump::Wire;
use crate::record::Records;
use crate::tls::{Tls, TlsError, TlsFiles, Verify, BINDING_LEN, EXPIRY_WARNING};
use parking_lot::Mutex;
use rustls::Connection;
use socket2::Socket;
use std::io::{self, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How much ciphertext a session keeps waiting for the socket before it takes no more
/// plaintext. One 10 MB stream measured 1.15-1.21 GB/s with 512 KB (medians of 20 messages)
/// and 1.02-1.10 with 2 MB.
pub const PENDING_MAX: usize = 512 * 1024;

/// A node's TLS as it runs it: the files loaded and checked ([`Tls::load_with`], the key
/// given as `key_pem` if its caller decrypted it), a warning logged for a certificate that
/// expires within [`EXPIRY_WARNING`] and for `verify_none`, and the allocator told to keep
/// what the sessions free ([`keep_freed_records`]).
pub fn load(files: &TlsFiles, key_pem: Option<&[u8]>) -> Result<Tls, TlsError> {
    let loaded = Tls::load_with(files, key_pem)?;
    if loaded.expires_within(EXPIRY_WARNING) {
        tracing::warn!(
            certfile = %files.certfile.display(),
            reason = "this node's certificate expires within 7 days",
            "tls_certificate_expiring"
        );
    }
    if files.verify == Verify::None {
        tracing::warn!(
            reason = "verify_none: peers' certificates are not checked (for tests only)",
            "tls_verify_none"
        );
    }
    keep_freed_records();
    Ok(loaded)
}

/// How much freed memory glibc keeps at the top of an arena instead of returning it to the
/// system (its default: 128 KB, raised as large blocks are freed). See
/// [`keep_freed_records`].
const TRIM_THRESHOLD: usize = 8 * 1024 * 1024;

/// Blocks smaller than this come from an arena, not a mapping of their own (glibc's
/// default: 128 KB, fixed once the trim threshold is set): a session's buffer of sealed
/// records (up to [`PENDING_MAX`] and a record) is let go between bursts and taken again at
/// the next, from memory already faulted in.
const MMAP_THRESHOLD: usize = 1024 * 1024;

/// Makes the C allocator keep what rustls frees: rustls allocates every record it encrypts
/// (16 KB each; TLS 1.2's, where its records are rustls'), and with glibc's default the
/// records freed after each write were returned to the system and faulted in again at the
/// next, page by page. One 10 MB stream spent 12-15% of its CPU in those page faults and ran
/// at 0.9-1.2 GB/s; with this, 1.6-2.9 (median 2.3; 12 runs of 20 messages, nodes of one
/// machine). Process-wide (the thresholds are glibc's), so called once a node runs TLS;
/// elsewhere a no-op.
fn keep_freed_records() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: `mallopt` only sets tuning parameters of glibc's allocator; any value is
    // valid for M_TRIM_THRESHOLD, and one up to 32 MB for M_MMAP_THRESHOLD.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
    }
}

/// The first bytes of a TLS handshake record (`ContentType::Handshake`, version 3.x).
const TLS_RECORD: [u8; 2] = [0x16, 0x03];

/// What the first bytes a dialer sent say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaks {
    /// A TLS handshake.
    Tls,
    /// Anything else: teleport's plain handshake, or not teleport at all.
    Plain,
}

/// Looks at the first two bytes the dialer sent, leaving them to be read, within the
/// handshake's deadline: whether it opens with TLS.
pub fn sniff(stream: &Deadline<'_>) -> io::Result<Speaks> {
    let sock = stream.socket();
    let mut first = [0u8; 2];
    loop {
        sock.set_read_timeout(Some(stream.remaining()?))?;
        let n = match recv_flags(sock, &mut first, libc::MSG_PEEK) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))
            }
            Err(e) => return Err(e),
        };
        if n == first.len() {
            break;
        }
        // One byte so far: the next comes with the rest of its segment, or never (the
        // deadline ends that).
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(if first == TLS_RECORD {
        Speaks::Tls
    } else {
        Speaks::Plain
    })
}

/// Runs a TLS handshake to its end over the blocking `stream`; the session, ready for the
/// cookie handshake inside it. A failure says what the other end did when it is telling (it
/// did not answer in TLS, it refused our certificate).
fn handshake(mut conn: Connection, stream: &mut Deadline<'_>) -> io::Result<Connection> {
    conn.set_buffer_limit(Some(PENDING_MAX));
    while conn.is_handshaking() {
        match conn.complete_io(stream) {
            Ok((0, 0)) if conn.is_handshaking() => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection in the TLS handshake",
                ))
            }
            Ok(_) => {}
            Err(e) => return Err(tls_failure(e)),
        }
    }
    Ok(conn)
}

/// A handshake failure, said in a peer operator's terms where rustls' are cryptic.
fn tls_failure(e: io::Error) -> io::Error {
    let text = e.to_string();
    let why = if text.contains("InvalidContentType") || text.contains("corrupt message") {
        format!("TLS handshake: the peer did not answer in TLS (its teleport may run plain, tls => false): {text}")
    } else if e.kind() == io::ErrorKind::UnexpectedEof {
        format!("TLS handshake: the peer closed the connection (its teleport may run plain, or it refused this node's certificate): {text}")
    } else {
        format!("TLS handshake: {text}")
    };
    io::Error::new(e.kind(), why)
}

/// Either end's TLS: the handshake of `conn` (the dialer's client, made for the host dialed,
/// or the acceptor's server) over the blocking socket of `stream`. The session, for
/// [`Link::tls`] or a [`Session`], and its binding.
pub fn open(
    conn: Connection,
    stream: &mut Deadline<'_>,
) -> io::Result<(Connection, [u8; BINDING_LEN])> {
    let conn = handshake(conn, stream)?;
    let export = match &conn {
        Connection::Client(c) => crate::tls::binding(c),
        Connection::Server(s) => crate::tls::binding(s),
    };
    let bound = export.ok_or_else(|| io::Error::other("TLS handshake: no exporter value"))?;
    Ok((conn, bound))
}

/// The cookie handshake's stream: the blocking `stream`, through the session `conn` if
/// there is one (what the handshake writes goes out at once; reads wait for plaintext).
pub struct Opening<'a, 'b> {
    conn: Option<&'a mut Connection>,
    stream: &'a mut Deadline<'b>,
}

impl<'a, 'b> Opening<'a, 'b> {
    /// `stream`, through `conn` if there is one.
    pub fn new(conn: Option<&'a mut Connection>, stream: &'a mut Deadline<'b>) -> Self {
        Opening { conn, stream }
    }
}

impl Read for Opening<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(conn) = self.conn.as_deref_mut() else {
            return self.stream.read(buf);
        };
        loop {
            match conn.reader().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
            }
            if conn.complete_io(self.stream)? == (0, 0) {
                return Ok(0);
            }
        }
    }
}

impl Write for Opening<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(conn) = self.conn.as_deref_mut() else {
            return self.stream.write(buf);
        };
        let took = conn.writer().write(buf)?;
        self.flush()?;
        Ok(took)
    }

    fn flush(&mut self) -> io::Result<()> {
        let Some(conn) = self.conn.as_deref_mut() else {
            return self.stream.flush();
        };
        while conn.wants_write() {
            conn.write_tls(self.stream)?;
        }
        Ok(())
    }
}

/// A session's records once the opening is over: teleport's own for TLS 1.3
/// ([`Records`]: sealed and opened in place, with the keys rustls hands over), rustls' for
/// TLS 1.2 (with the ciphertext read ahead of it: `ahead`, of which it took `taken`).
enum Protected {
    Own(Records),
    Rustls {
        conn: Connection,
        ahead: Vec<u8>,
        taken: usize,
    },
}

impl Protected {
    /// The records of `conn`, whose opening is over (nothing in flight either way).
    fn after_opening(mut conn: Connection) -> io::Result<Protected> {
        if conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
            return Ok(Protected::Rustls {
                conn,
                ahead: Vec::new(),
                taken: 0,
            });
        }
        // What the peer sent right behind the opening's last message and rustls already
        // opened (a closing listener's LAST behind its OK) is read first. Nothing else of
        // the peer's can be in rustls' buffer: each end waits for the other's last message
        // before it sends more.
        let mut opened = Vec::new();
        match conn.reader().read_to_end(&mut opened) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
            // close_notify: the peer ended the session already.
            Ok(_) => return Err(io::ErrorKind::UnexpectedEof.into()),
        }
        let secrets = conn
            .dangerous_extract_secrets()
            .map_err(|e| io::Error::other(format!("TLS: {e}")))?;
        Ok(Protected::Own(Records::new(
            secrets.tx, secrets.rx, opened,
        )?))
    }

    /// Encrypts what it can of `slices` while at most [`PENDING_MAX`] bytes of ciphertext
    /// wait (for [`Protected::flush_to`]); how much it took.
    fn take(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Protected::Own(records) => records.seal(slices, PENDING_MAX),
            Protected::Rustls { conn, .. } => conn.writer().write_vectored(slices),
        }
    }

    /// Writes what waits to `out` until nothing does (true) or `out` is full (false).
    fn flush_to(&mut self, out: &mut dyn Write) -> io::Result<bool> {
        match self {
            Protected::Own(records) => records.write_to(out),
            Protected::Rustls { conn, .. } => flush(conn, out),
        }
    }

    /// Reads plaintext into `buf`, reading more of `src` while none is there: `WouldBlock`
    /// once `src` has nothing more now, 0 at the end of the stream.
    fn read_plain(&mut self, src: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Protected::Own(records) => records.read_plain(src, buf),
            Protected::Rustls { conn, ahead, taken } => {
                let mut ahead = Ahead {
                    src,
                    buf: ahead,
                    taken,
                };
                read_rustls(conn, &mut ahead, buf)
            }
        }
    }
}

/// An outgoing connection's socket, plain or inside its TLS session. Writes and reads never
/// block (the socket is non-blocking once the opening is done).
pub struct Link {
    sock: Socket,
    tls: Option<Mutex<Protected>>,
    /// Whether the session holds records the socket did not take yet, as of the last write:
    /// read without the session's lock (a sender asks at every send).
    pending: AtomicBool,
}

impl Link {
    /// A plain connection.
    pub fn plain(sock: Socket) -> Link {
        Link {
            sock,
            tls: None,
            pending: AtomicBool::new(false),
        }
    }

    /// A connection whose bytes go through `conn`, a session opened on `sock` ([`open`])
    /// whose cookie handshake is over.
    pub fn tls(sock: Socket, conn: Connection) -> io::Result<Link> {
        Ok(Link {
            sock,
            tls: Some(Mutex::new(Protected::after_opening(conn)?)),
            pending: AtomicBool::new(false),
        })
    }

    /// The socket.
    pub fn sock(&self) -> &Socket {
        &self.sock
    }

    /// Writes what it can of `slices` without blocking; how much of them it took (the TLS
    /// session takes bytes it may not have written yet: see [`Link::pending`]). `WouldBlock`
    /// if it took nothing.
    pub fn send_vectored(&self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        let Some(tls) = &self.tls else {
            return self.sock.send_vectored_with_flags(slices, flags);
        };
        let mut protected = tls.lock();
        // Records waiting from before go first; the session then takes what its limit
        // leaves room for, encrypting while the socket drains (encryption is the work).
        self.flushed(&mut protected)?;
        let took = protected.take(slices)?;
        self.flushed(&mut protected)?;
        if took == 0 && !slices.iter().all(|s| s.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(took)
    }

    /// Whether bytes it took are still waiting for room in the socket.
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Writes what waits for the socket, without blocking; whether all of it is out.
    pub fn flush(&self) -> io::Result<bool> {
        match &self.tls {
            None => Ok(true),
            Some(tls) => self.flushed(&mut tls.lock()),
        }
    }

    /// Writes the records the session (locked) holds; whether all are out, as
    /// [`Link::pending`] says from then on.
    fn flushed(&self, protected: &mut Protected) -> io::Result<bool> {
        let out = protected.flush_to(&mut SockOut(&self.sock));
        self.pending
            .store(!matches!(out, Ok(true)), Ordering::Release);
        out
    }

    /// Reads what the peer sent (plaintext), without blocking: `WouldBlock` when nothing
    /// is there, 0 when the peer closed the connection.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return recv_dontwait(&self.sock, buf);
        };
        tls.lock().read_plain(&mut SockIn(&self.sock), buf)
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("sock", &self.sock)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// How much ciphertext a TLS 1.2 connection reads from its socket at a time: rustls takes
/// at most 4 KB per read, a `recv` each without this.
const AHEAD: usize = 64 * 1024;

/// An incoming connection's TLS session ([`open`]) once its opening is over.
pub struct Session {
    protected: Protected,
}

impl Session {
    /// The session `conn`, whose cookie handshake is over.
    pub fn new(conn: Connection) -> io::Result<Session> {
        Ok(Session {
            protected: Protected::after_opening(conn)?,
        })
    }
}

/// An incoming connection's [`Wire`] (`inner`: the socket, or what the reader's port read),
/// through its TLS session when it has one.
pub struct Secured<'a, W> {
    tls: Option<&'a mut Session>,
    inner: &'a mut W,
}

impl<'a, W: Wire> Secured<'a, W> {
    /// `inner`, through `tls` if there is one.
    pub fn new(tls: Option<&'a mut Session>, inner: &'a mut W) -> Self {
        Secured { tls, inner }
    }

    /// Writes what the session holds for the socket (an ack the socket had no room for);
    /// whether all of it is out.
    pub fn flush(&mut self) -> io::Result<bool> {
        match self.tls.as_deref_mut() {
            None => Ok(true),
            Some(tls) => tls.protected.flush_to(&mut AckWriter(&mut *self.inner)),
        }
    }
}

impl<W: Wire> Read for Secured<'_, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_deref_mut() else {
            return self.inner.read(buf);
        };
        tls.protected.read_plain(&mut *self.inner, buf)
    }
}

/// `src` read [`AHEAD`] bytes at a time into `buf`, of which `taken` were read from here.
struct Ahead<'a, R: ?Sized> {
    src: &'a mut R,
    buf: &'a mut Vec<u8>,
    taken: &'a mut usize,
}

impl<R: Read + ?Sized> Read for Ahead<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if *self.taken == self.buf.len() {
            self.buf.resize(AHEAD, 0);
            let n = match self.src.read(&mut self.buf[..]) {
                Ok(n) => n,
                Err(e) => {
                    self.buf.clear();
                    *self.taken = 0;
                    return Err(e);
                }
            };
            self.buf.truncate(n);
            *self.taken = 0;
        }
        let n = out.len().min(self.buf.len() - *self.taken);
        out[..n].copy_from_slice(&self.buf[*self.taken..*self.taken + n]);
        *self.taken += n;
        Ok(n)
    }
}

impl<W: Wire> AckOut for Secured<'_, W> {
    fn try_write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_deref_mut() else {
            return self.inner.try_write(bytes);
        };
        let out = &mut AckWriter(&mut *self.inner);
        if !tls.protected.flush_to(out)? {
            return Ok(0);
        }
        let took = tls.protected.take(&[IoSlice::new(bytes)])?;
        tls.protected.flush_to(out)?;
        Ok(took)
    }
}

impl<W: Wire> Wire for Secured<'_, W> {
    fn read_timeout(&mut self, after: Option<Duration>) -> io::Result<()> {
        self.inner.read_timeout(after)
    }
}

/// Reads plaintext from `conn` into `buf`, handing it more of what `src` holds while it
/// has none: `WouldBlock` once `src` has nothing more now, 0 at the end of the stream.
fn read_rustls(conn: &mut Connection, src: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match conn.reader().read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // The TCP stream ended without TLS's close_notify: as a plain connection's end
            // (the pump tells a close between frames from one inside a frame).
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
            Err(e) => return Err(e),
        }
        match conn.read_tls(src) {
            Ok(_) => {
                if let Err(e) = conn.process_new_packets() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("TLS: {e}"),
                    ));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes the records `conn` holds to `out` until none is left (true) or `out` is full
/// (false).
fn flush(conn: &mut Connection, out: &mut dyn Write) -> io::Result<bool> {
    while conn.wants_write() {
        match conn.write_tls(out) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// A non-blocking socket as rustls writes records to it.
struct SockOut<'a>(&'a Socket);

impl Write for SockOut<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .send_with_flags(buf, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0
            .send_vectored_with_flags(bufs, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A non-blocking socket as rustls reads records from it.
struct SockIn<'a>(&'a Socket);

impl Read for SockIn<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        recv_dontwait(self.0, buf)
    }
}

/// A receiving wire's ack path as rustls writes records to it: full is `WouldBlock`.
struct AckWriter<'a, W>(&'a mut W);

impl<W: AckOut> Write for AckWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0.try_write(buf)? {
            0 if !buf.is_empty() => Err(io::ErrorKind::WouldBlock.into()),
            n => Ok(n),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One non-blocking `recv` into `buf`.
fn recv_dontwait(sock: &Socket, buf: &mut [u8]) -> io::Result<usize> {
    recv_flags(sock, buf, libc::MSG_DONTWAIT)
}

/// One `recv` into `buf` with `flags`, again if a signal interrupts it.
#[allow(unsafe_code)]
fn recv_flags(sock: &Socket, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `[u8]` and `[MaybeUninit<u8>]` have the same layout, and `recv` only writes
    // initialised bytes into the buffer (never uninitialised ones), so `buf` stays valid.
    let uninit = unsafe { &mut *(buf as *mut [u8] as *mut [std::mem::MaybeUninit<u8>]) };
    loop {
        match sock.recv_with_flags(uninit, flags) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::conn::SendError;
    use crate::pool::Pool;
    use crate::sockopts::SocketOpts;
    use crate::stats::PeerStats;
    use crate::testing::*;
    use crate::tls::{Tls, TlsFiles, Versions};
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};
    use std::thread;
    use std::time::{Duration, Instant};

    /// The TLS of `a@h` and `b@h`, one CA's, in a directory of their own (kept while the
    /// first value lives).
    fn nodes(tag: &str) -> (Dir, Arc<Tls>, Arc<Tls>) {
        let dir = Dir::new(tag);
        let ca = Ca::new("ca");
        let (a, b) = tls_pair(&dir, &ca, &ca);
        (dir, a, b)
    }

    /// A pool of one slot from `a@h` to `l`, running `tls`.
    fn pool_to(addr: SocketAddr, tls: Option<Arc<Tls>>) -> (Pool, Arc<PeerStats>) {
        let mut cfg = config(b"c", SocketOpts::default());
        cfg.0.tls = tls;
        one_slot(cfg, addr)
    }

    /// Sends `payload`, waiting out `Busy`.
    fn send_waiting(pool: &Pool, payload: &[u8]) {
        let mut f = frame(payload);
        loop {
            match pool.send(0, f) {
                Ok(()) => return,
                Err(SendError::Busy(back)) => {
                    f = back;
                    thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("{e:?}"),
            }
        }
    }

    /// The first connection error the pool's slot reports.
    fn error_of(pool: &Pool) -> String {
        wait_for("a connection error", || pool.info()[0].last_error.is_some());
        pool.info()[0].last_error.clone().unwrap_or_default()
    }

    /// Payloads of every size, from a byte to most of the frame limit, numbered.
    fn payloads() -> Vec<Vec<u8>> {
        let sizes = [1, 100, 4_000, 16_500, 70_000, 300_000, 900_000];
        (0..140u32)
            .map(|i| {
                let mut p = i.to_be_bytes().to_vec();
                p.resize(4 + sizes[i as usize % sizes.len()], (i * 7) as u8);
                p
            })
            .collect()
    }

    #[test]
    fn plaintext_rustls_opened_before_the_switch_is_not_lost() {
        let (_dir, a, b) = nodes("secure-switch");
        let mut c = a.dialer("h").unwrap();
        let mut s = b.acceptor().unwrap();
        memory_handshake(&mut c, &mut s).unwrap();
        c.writer().write_all(b"behind the OK").unwrap();
        let wire = records_of(&mut c);
        s.read_tls(&mut &wire[..]).unwrap();
        s.process_new_packets().unwrap();
        let mut protected = super::Protected::after_opening(rustls::Connection::Server(s)).unwrap();
        let super::Protected::Own(records) = &mut protected else {
            panic!("TLS 1.3 records are teleport's own after the opening");
        };
        c.writer().write_all(b", then more").unwrap();
        let wire = records_of(&mut c);
        let mut got = Vec::new();
        let mut src = &wire[..];
        let mut buf = [0u8; 64];
        while let Ok(n @ 1..) = records.read_plain(&mut src, &mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"behind the OK, then more");
    }

    #[test]
    fn frames_of_every_size_cross_a_tls_pool_whole_in_order_and_are_acknowledged() {
        // TLS 1.3 (records of teleport's own after the opening) and 1.2 (rustls').
        for versions in [Versions::Tls13And12, Versions::Tls12] {
            frames_cross_a_pool_speaking(versions);
        }
    }

    fn frames_cross_a_pool_speaking(versions: Versions) {
        let dir = Dir::new(&format!("secure-sizes-{versions:?}"));
        let ca = Ca::new("ca");
        let [a, b] = ["a", "b"].map(|name| {
            let files = TlsFiles {
                versions,
                ..node(&dir, name, &ca, &["h"], &ca)
            };
            Arc::new(Tls::load(&files).unwrap())
        });
        let (l, _acceptor, rx) = listener_tls(SocketOpts::default(), Some(b));
        let (pool, _stats) = pool_to(l.local_addr(), Some(a));
        let sent = payloads();
        for p in &sent {
            send_waiting(&pool, p);
        }
        for (i, want) in sent.iter().enumerate() {
            let (_, got) = rx
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| {
                    panic!("frame {i} did not arrive: {:?}", pool.info()[0].last_error)
                });
            assert!(
                got == *want,
                "frame {i}: {} bytes for {}",
                got.len(),
                want.len()
            );
        }
        // The acks came back through the session too.
        wait_for("every frame acknowledged", || {
            let info = &pool.info()[0];
            info.unacked_frames == 0 && info.frames_in_queue == 0
        });
        assert_eq!(pool.info()[0].reconnects, 0);
        pool.close();
        l.close();
    }

    #[test]
    fn records_a_full_socket_left_in_the_session_go_out_once_it_drains() {
        let (_dir, a, b) = nodes("secure-full");
        // Small socket buffers: most of a 300 KB frame stays in the session.
        let small = SocketOpts {
            sndbuf: Some(16 * 1024),
            recbuf: Some(16 * 1024),
            ..SocketOpts::default()
        };
        let (l, acceptor, rx) = listener_tls(small.clone(), Some(b));
        let mut cfg = config(b"c", small);
        cfg.0.tls = Some(a);
        let (pool, _stats) = one_slot(cfg, l.local_addr());
        // The reader stops at the first frame, so the second fills the socket and the rest
        // of it waits in the session after the lane has nothing more queued: it must go
        // out when the reader goes on, with nothing more sent.
        acceptor.gate.shut();
        send_waiting(&pool, b"first");
        let second = vec![7u8; 300_000];
        send_waiting(&pool, &second);
        thread::sleep(Duration::from_millis(300));
        acceptor.gate.open();
        for want in [&b"first"[..], &second] {
            let (_, got) = rx
                .recv_timeout(Duration::from_secs(5))
                .unwrap_or_else(|_| panic!("a frame did not arrive: {:?}", pool.info()[0]));
            assert!(got == want, "{} bytes for {}", got.len(), want.len());
        }
        pool.close();
        l.close();
    }

    #[test]
    fn plaintext_a_turn_leaves_in_the_session_is_read_without_more_bytes_coming() {
        // A poll thread's turn ends after TURN_BYTES (1 MB); what the session decrypted past
        // that is not in the socket any more, whose readiness would otherwise be waited for.
        // The stream ends a little past a turn, by a different amount each time, so that
        // some turn ends with the rest of the stream in the session.
        let (_dir, a, b) = nodes("secure-held");
        for extra in (0..16).map(|k| k * 1_100) {
            let (l, acceptor, rx) = listener_tls(SocketOpts::default(), Some(b.clone()));
            let mut cfg = config(b"c", SocketOpts::default());
            cfg.0.tls = Some(a.clone());
            cfg.0.max_queue_bytes = 8 << 20;
            let (pool, _stats) = one_slot(cfg, l.local_addr());
            // All of it waits in the socket while the reader is held at the first frame.
            acceptor.gate.shut();
            send_waiting(&pool, b"first");
            let body = 1_000 - OVERHEAD;
            let n = (1024 * 1024 + extra) / 1_000 + 1;
            for i in 0..n {
                send_waiting(&pool, &vec![(i % 251) as u8; body]);
            }
            thread::sleep(Duration::from_millis(100));
            acceptor.gate.open();
            for i in 0..=n {
                if rx.recv_timeout(Duration::from_secs(3)).is_err() {
                    panic!("{extra}: frame {i} of {} did not arrive", n + 1);
                }
            }
            pool.close();
            l.close();
        }
    }

    #[test]
    fn a_plain_dialer_is_told_the_listener_requires_tls_and_delivers_nothing() {
        let (_dir, _, b) = nodes("secure-plain-dialer");
        let (l, _acceptor, rx) = listener_tls(SocketOpts::default(), Some(b));
        let (pool, _stats) = pool_to(l.local_addr(), None);
        send_waiting(&pool, b"hello");
        let why = error_of(&pool);
        assert!(why.contains("requires TLS"), "{why}");
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        wait_for("no handshake left", || l.handshaking() == 0);
        assert_eq!(l.connections(), 0);
        pool.close();
        l.close();
    }

    #[test]
    fn a_tls_dialer_is_refused_by_a_plain_listener_and_delivers_nothing() {
        let (_dir, a, _) = nodes("secure-plain-listener");
        let (l, _acceptor, rx) = listener(SocketOpts::default());
        let (pool, _stats) = pool_to(l.local_addr(), Some(a));
        send_waiting(&pool, b"hello");
        let why = error_of(&pool);
        assert!(why.contains("TLS handshake"), "{why}");
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        wait_for("no handshake left", || l.handshaking() == 0);
        pool.close();
        l.close();
    }

    #[test]
    fn a_dialer_whose_certificate_another_ca_issued_delivers_nothing() {
        let dir = Dir::new("secure-other-ca");
        let (ca, other) = (Ca::new("ca"), Ca::new("other"));
        let (a, b) = tls_pair(&dir, &ca, &other);
        let (l, _acceptor, rx) = listener_tls(SocketOpts::default(), Some(b));
        let (pool, _stats) = pool_to(l.local_addr(), Some(a));
        send_waiting(&pool, b"hello");
        let why = error_of(&pool);
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "{why}"
        );
        assert_eq!(l.connections(), 0, "{why}");
        pool.close();
        l.close();
    }

    /// A relay between a dialer and `to` that records what the dialer sends; its address.
    fn recording_relay(to: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
        let relay = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = relay.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        thread::spawn(move || {
            let (from, _) = relay.accept().unwrap();
            let onward = TcpStream::connect(to).unwrap();
            let (mut back_from, mut back_to) =
                (onward.try_clone().unwrap(), from.try_clone().unwrap());
            thread::spawn(move || {
                let _ = std::io::copy(&mut back_from, &mut back_to);
                let _ = back_to.shutdown(std::net::Shutdown::Both);
            });
            let (mut from, mut onward) = (from, onward);
            let mut buf = [0u8; 64 * 1024];
            while let Ok(n) = from.read(&mut buf) {
                // Recorded before it goes on: what the listener got, the relay saw.
                record.lock().unwrap().extend_from_slice(&buf[..n]);
                if n == 0 || onward.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = onward.shutdown(std::net::Shutdown::Both);
        });
        (addr, seen)
    }

    /// Sends a known payload through a relay to a listener; whether it was seen in clear.
    fn payload_seen_in_clear(tls: bool) -> bool {
        let (_dir, a, b) = nodes("secure-clear");
        let (a, b) = if tls {
            (Some(a), Some(b))
        } else {
            (None, None)
        };
        let (l, _acceptor, rx) = listener_tls(SocketOpts::default(), b);
        let (relay, seen) = recording_relay(l.local_addr());
        let (pool, _stats) = pool_to(relay, a);
        let secret = b"teleport-known-payload-7f3a9c".repeat(40);
        send_waiting(&pool, &secret);
        let (_, got) = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(got, secret);
        pool.close();
        l.close();
        let seen = seen.lock().unwrap();
        seen.windows(29).any(|w| w == &secret[..29])
    }

    #[test]
    fn a_payload_never_crosses_a_tls_connection_in_clear() {
        // The control: the relay does see it on a plain connection.
        assert!(payload_seen_in_clear(false));
        assert!(!payload_seen_in_clear(true));
    }

    /// Connects to `addr`, sends `bytes`, and reads until the listener closes; how long that
    /// took, and what it answered.
    fn hostile(addr: SocketAddr, bytes: &[u8]) -> (Duration, Vec<u8>) {
        let started = Instant::now();
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(bytes).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        (started.elapsed(), answer)
    }

    #[test]
    fn tls_openings_that_stall_hold_no_more_than_the_handshake_slots() {
        let (_dir, a, b) = nodes("secure-slots");
        let (l, _acceptor, rx) = listener_tls(SocketOpts::default(), Some(b));
        // Every slot taken by a dialer that opens with TLS and says no more.
        let stalled: Vec<TcpStream> = (0..crate::listener::MAX_HANDSHAKES)
            .map(|_| {
                let mut s = TcpStream::connect(l.local_addr()).unwrap();
                s.write_all(&[0x16, 0x03, 0x01]).unwrap();
                s
            })
            .collect();
        wait_for("every slot taken", || {
            l.handshaking() == crate::listener::MAX_HANDSHAKES
        });
        // One more is closed at once, not left waiting.
        let (took, _) = hostile(l.local_addr(), &[0x16, 0x03]);
        assert!(took < Duration::from_millis(1500), "{took:?}");
        // The stalled ones end at the handshake deadline (2 s), and a real dialer gets in.
        wait_for("the stalled handshakes closed", || l.handshaking() == 0);
        drop(stalled);
        let (pool, _stats) = pool_to(l.local_addr(), Some(a));
        send_waiting(&pool, b"after the stalls");
        let (_, got) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(got, b"after the stalls");
        pool.close();
        l.close();
    }

    #[test]
    fn garbage_and_stalls_after_a_tls_opening_are_closed_within_the_deadline() {
        let (_dir, _, b) = nodes("secure-hostile");
        let (l, _acceptor, rx) = listener_tls(SocketOpts::default(), Some(b));
        // A record header and junk: an alert, then the close.
        let (took, _) = hostile(l.local_addr(), &[0x16, 0x03, 0x01, 0x00, 0x04, 9, 9, 9, 9]);
        assert!(took < Duration::from_secs(2), "{took:?}");
        // A TLS opening that stops: closed at the handshake deadline (2 s), not later.
        let (took, _) = hostile(l.local_addr(), &[0x16, 0x03]);
        assert!(took < Duration::from_secs(5), "{took:?}");
        // A record that claims to be huge: refused without waiting for it.
        let (took, _) = hostile(l.local_addr(), &[0x16, 0x03, 0x01, 0xff, 0xff, 1]);
        assert!(took < Duration::from_secs(5), "{took:?}");
        wait_for("no handshake left", || l.handshaking() == 0);
        assert!(rx.try_recv().is_err());
        assert_eq!(l.connections(), 0);
        l.close();
    }
}
