//! One deadline over a whole exchange on a blocking socket, such as the handshake.
//!
//! A socket read timeout bounds each `read` call, not the exchange: a peer that sends one byte
//! just before every timeout keeps a `read_exact` going for as many timeouts as there are bytes
//! to read (a 1 KiB handshake message under a 5 s timeout: well over an hour). [`Deadline`]
//! instead sets the socket's timeout before every call to whatever is left of one fixed
//! instant, so the exchange as a whole ends by then, however the peer paces its bytes.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use socket2::Socket;

/// Less time than this left counts as none. A zero timeout means "wait forever" to the OS:
/// std refuses to set one, and socket2 passes it through (as it does anything under a
/// microsecond, which truncates to zero), so a deadline reached in the last instant must fail
/// here rather than turn into no deadline at all. The OS rounds timeouts to its clock tick
/// anyway, so a millisecond is no real loss.
const MIN_LEFT: Duration = Duration::from_millis(1);

/// A blocking socket whose reads and writes all fail with [`io::ErrorKind::TimedOut`] once a
/// fixed instant has passed.
///
/// Each `read` and `write` first sets the socket's read or write timeout to the time left, so
/// a call blocks at most until the deadline. The socket must be in blocking mode: a read or
/// write that ends in the OS timeout (`EAGAIN`) is reported as `TimedOut`.
///
/// The socket's timeouts are left set when the `Deadline` is done with; the caller resets them
/// (`set_read_timeout(None)`, `set_write_timeout(None)`) before using the socket without it.
///
/// ```no_run
/// # fn demo(sock: &socket2::Socket) -> std::io::Result<()> {
/// use std::io::Read;
/// use std::time::Duration;
/// use teleport_core::deadline::Deadline;
///
/// let mut stream = Deadline::after(sock, Duration::from_secs(5));
/// let mut header = [0u8; 2];
/// stream.read_exact(&mut header)?; // done within 5 s in total, or TimedOut
/// sock.set_read_timeout(None)?;
/// sock.set_write_timeout(None)?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Deadline<'a> {
    sock: &'a Socket,
    until: Instant,
}

impl<'a> Deadline<'a> {
    /// I/O on `sock` that must be over by the instant `until`.
    pub fn new(sock: &'a Socket, until: Instant) -> Self {
        Self { sock, until }
    }

    /// I/O on `sock` that must be over `timeout` from now.
    ///
    /// A `timeout` so large that the instant cannot be represented is clamped to about a
    /// century, which is to say no deadline.
    pub fn after(sock: &'a Socket, timeout: Duration) -> Self {
        let now = Instant::now();
        let until = now
            .checked_add(timeout)
            .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
            .unwrap_or(now);
        Self { sock, until }
    }

    /// The instant by which all I/O must be over.
    pub fn until(&self) -> Instant {
        self.until
    }

    /// The socket the I/O goes to.
    pub fn socket(&self) -> &'a Socket {
        self.sock
    }

    /// The time left, or a `TimedOut` error if there is less than a millisecond of it.
    pub fn remaining(&self) -> io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left < MIN_LEFT {
            Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))
        } else {
            Ok(left)
        }
    }
}

/// The OS reports an expired `SO_RCVTIMEO`/`SO_SNDTIMEO` as `EAGAIN` (`WouldBlock`); on a
/// blocking socket that can only mean the deadline came.
fn timed_out<T>(result: io::Result<T>) -> io::Result<T> {
    result.map_err(|e| {
        if e.kind() == io::ErrorKind::WouldBlock {
            io::Error::new(io::ErrorKind::TimedOut, "deadline passed")
        } else {
            e
        }
    })
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.set_read_timeout(Some(self.remaining()?))?;
        timed_out((&*self.sock).read(buf))
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.set_write_timeout(Some(self.remaining()?))?;
        timed_out((&*self.sock).write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        // A TCP socket has no user-space buffer to flush.
        (&*self.sock).flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::{self, HandshakeError};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::thread;

    /// A connected loopback pair as socket2 sockets, with generous timeouts so that a broken
    /// test fails instead of hanging (a `Deadline` overrides them).
    fn pair() -> (Socket, Socket) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        let (a, b) = (Socket::from(a), Socket::from(b));
        for s in [&a, &b] {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        (a, b)
    }

    /// Sends `bytes` one byte every `every` on its own thread, until done, stopped, or the
    /// socket fails. Returns the stop flag and the thread.
    fn trickle(
        sock: Socket,
        bytes: Vec<u8>,
        every: Duration,
    ) -> (Arc<AtomicBool>, thread::JoinHandle<()>) {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let handle = thread::spawn(move || {
            for b in bytes {
                if stopped.load(Ordering::SeqCst) || (&sock).write_all(&[b]).is_err() {
                    return;
                }
                thread::sleep(every);
            }
        });
        (stop, handle)
    }

    #[test]
    fn trickling_peer_times_out_at_the_deadline() {
        let (mine, theirs) = pair();
        let (stop, peer) = trickle(theirs, vec![7; 100], Duration::from_millis(50));
        let start = Instant::now();
        let mut stream = Deadline::after(&mine, Duration::from_millis(300));
        let mut buf = [0u8; 100];
        let err = stream.read_exact(&mut buf).unwrap_err();
        let took = start.elapsed();
        stop.store(true, Ordering::SeqCst);
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err:?}");
        assert!(took >= Duration::from_millis(290), "{took:?}");
        assert!(took < Duration::from_secs(1), "{took:?}");
        // Bytes did arrive (each read well within its own timeout); only the total was too slow.
        assert!(buf[0] == 7);
        peer.join().unwrap();
    }

    #[test]
    fn trickled_handshake_times_out_at_the_deadline() {
        // A HELLO sent at one byte per 50 ms would take over 2 s; the acceptor gives up at 300 ms.
        let (dialer, acceptor) = pair();
        let hello = handshake::encode_hello(&handshake::Hello {
            name: b"a@host".to_vec(),
            nonce: [1; handshake::NONCE_LEN],
        })
        .unwrap();
        let mut framed = (hello.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&hello);
        let (stop, peer) = trickle(dialer, framed, Duration::from_millis(50));
        let start = Instant::now();
        let mut stream = Deadline::after(&acceptor, Duration::from_millis(300));
        let result = handshake::accept(&mut stream, b"b@host", |_| Some(b"cookie".to_vec()));
        let took = start.elapsed();
        stop.store(true, Ordering::SeqCst);
        match result {
            Err(HandshakeError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::TimedOut),
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(took < Duration::from_secs(1), "{took:?}");
        peer.join().unwrap();
    }

    #[test]
    fn silent_peer_times_out_at_the_deadline() {
        let (mine, _silent) = pair();
        let start = Instant::now();
        let mut stream = Deadline::after(&mine, Duration::from_millis(200));
        let err = stream.read(&mut [0u8; 8]).unwrap_err();
        let took = start.elapsed();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err:?}");
        assert!(took >= Duration::from_millis(190), "{took:?}");
        assert!(took < Duration::from_secs(1), "{took:?}");
    }

    #[test]
    fn writes_to_a_peer_that_never_reads_time_out() {
        let (mine, _deaf) = pair();
        mine.set_send_buffer_size(4096).unwrap();
        let start = Instant::now();
        let mut stream = Deadline::after(&mine, Duration::from_millis(300));
        let err = stream.write_all(&vec![0u8; 64 << 20]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err:?}");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn a_passed_deadline_fails_without_io() {
        let (mine, theirs) = pair();
        (&theirs).write_all(b"ready").unwrap();
        let mut stream = Deadline::new(&mine, Instant::now());
        assert_eq!(
            stream.remaining().unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );
        let err = stream.read(&mut [0u8; 5]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let err = stream.write(b"x").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // Under a millisecond left is as good as none (a zero timeout cannot even be set).
        let almost = Deadline::new(&mine, Instant::now() + Duration::from_micros(500));
        assert_eq!(
            almost.remaining().unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );
        // Nothing was consumed: the data is still there for the next reader.
        let mut buf = [0u8; 5];
        Deadline::after(&mine, Duration::from_secs(5))
            .read_exact(&mut buf)
            .unwrap();
        assert_eq!(&buf, b"ready");
    }

    #[test]
    fn a_normal_exchange_works() {
        let (mine, theirs) = pair();
        let peer = thread::spawn(move || {
            let mut stream = Deadline::after(&theirs, Duration::from_secs(5));
            let mut buf = [0u8; 4];
            stream.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"ping");
            stream.write_all(b"pong").unwrap();
            stream.flush().unwrap();
        });
        let mut stream = Deadline::after(&mine, Duration::from_secs(5));
        assert!(stream.remaining().unwrap() > Duration::from_secs(4));
        assert!(stream.until() > Instant::now());
        assert!(std::ptr::eq(stream.socket(), &mine));
        stream.write_all(b"ping").unwrap();
        stream.flush().unwrap();
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
        peer.join().unwrap();
    }

    #[test]
    fn a_handshake_works_through_deadlines() {
        let (dialer, acceptor) = pair();
        let acceptor = thread::spawn(move || {
            let mut stream = Deadline::after(&acceptor, Duration::from_secs(5));
            let proven = handshake::accept(&mut stream, b"b@host", |_| Some(b"cookie".to_vec()))?;
            let welcome = handshake::Welcome {
                max_frame: 1 << 20,
                incarnation: 1,
                delivered: 0,
            };
            proven.welcome(&mut stream, &welcome)
        });
        let mut stream = Deadline::after(&dialer, Duration::from_secs(5));
        let welcome = handshake::dial(&mut stream, b"a@host", b"b@host", b"cookie", 3, 9).unwrap();
        assert_eq!(welcome.max_frame, 1 << 20);
        let dialer = acceptor.join().unwrap().unwrap();
        assert_eq!(
            (dialer.name.as_slice(), dialer.lane, dialer.session),
            (&b"a@host"[..], 3, 9)
        );
    }

    #[test]
    fn a_huge_timeout_is_no_deadline() {
        let (mine, _theirs) = pair();
        let stream = Deadline::after(&mine, Duration::MAX);
        assert!(stream.remaining().unwrap() > Duration::from_secs(365 * 24 * 3600));
    }
}
