//! Socket options under the user's control (the `socket_opts` key of teleport's application
//! environment), applied to every teleport socket: each outgoing connection before it
//! connects, the listening socket before it listens (accepted sockets inherit from it what is
//! fixed at the TCP handshake, such as the window scale that follows from the receive
//! buffer), and each accepted socket again.
//!
//! Every option but `nodelay` is left to the kernel unless set: setting `SO_SNDBUF` or
//! `SO_RCVBUF` turns Linux's buffer autotuning off for that socket, and the README says why
//! the defaults are what they are (they were measured).

use socket2::{Domain, SockAddr, Socket, TcpKeepalive};
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// TCP keepalive: probes start after `time` idle, every `interval`, and the connection is
/// dropped after `retries` unanswered ones. `None` keeps the kernel's value
/// (`net.ipv4.tcp_keepalive_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe (`TCP_KEEPIDLE`, whole seconds).
    pub time: Option<Duration>,
    /// Time between probes (`TCP_KEEPINTVL`, whole seconds).
    pub interval: Option<Duration>,
    /// Unanswered probes before the connection is dropped (`TCP_KEEPCNT`).
    pub retries: Option<u32>,
}

/// The options applied to every teleport socket. `None` leaves the kernel's default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketOpts {
    /// `SO_SNDBUF`, bytes (the kernel doubles it for its bookkeeping and caps it at
    /// `net.core.wmem_max`). Unset: autotuned by the kernel (`net.ipv4.tcp_wmem`).
    pub sndbuf: Option<usize>,
    /// `SO_RCVBUF`, bytes (doubled, capped at `net.core.rmem_max`). Unset: autotuned
    /// (`net.ipv4.tcp_rmem`).
    pub recbuf: Option<usize>,
    /// `TCP_NODELAY`: small frames leave at once instead of waiting for the previous
    /// segment's acknowledgement (Nagle's algorithm off).
    pub nodelay: bool,
    /// `SO_KEEPALIVE` and its timings; `None`: off.
    pub keepalive: Option<Keepalive>,
    /// `SO_PRIORITY` (Linux: 0..6 without `CAP_NET_ADMIN`).
    pub priority: Option<u32>,
    /// `IP_TOS` (IPv4) or `IPV6_TCLASS` (IPv6): the DSCP and ECN bits, 0..255.
    pub tos: Option<u32>,
    /// `TCP_USER_TIMEOUT`: how long written data may stay unacknowledged before the
    /// connection is dropped. `Some(0)` is the kernel's default.
    pub user_timeout: Option<Duration>,
    /// The local address outgoing connections are bound to (any port); `None`: chosen by the
    /// kernel's routing.
    pub bind_ip: Option<IpAddr>,
}

impl Default for SocketOpts {
    fn default() -> Self {
        SocketOpts {
            sndbuf: None,
            recbuf: None,
            nodelay: true,
            keepalive: None,
            priority: None,
            tos: None,
            user_timeout: None,
            bind_ip: None,
        }
    }
}

/// An option the kernel refused: which one, the value, and the OS error.
#[derive(Debug)]
pub struct SockOptError {
    /// The option as the user names it in `socket_opts` (`sndbuf`, `priority`...).
    pub option: &'static str,
    /// The value that was refused, as text.
    pub value: String,
    /// What the kernel said.
    pub source: io::Error,
}

impl fmt::Display for SockOptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot set socket option {} to {}: {}",
            self.option, self.value, self.source
        )
    }
}

impl std::error::Error for SockOptError {}

impl From<SockOptError> for io::Error {
    /// An `io::Error` of the kernel's kind whose text names the option (and that
    /// `get_ref().downcast_ref::<SockOptError>()` gives back).
    fn from(e: SockOptError) -> io::Error {
        io::Error::new(e.source.kind(), e)
    }
}

fn check<T: fmt::Debug>(
    option: &'static str,
    value: T,
    result: io::Result<()>,
) -> Result<(), SockOptError> {
    result.map_err(|source| SockOptError {
        option,
        value: format!("{value:?}"),
        source,
    })
}

impl SocketOpts {
    /// Sets every option on `sock` (all but `bind_ip`, see [`SocketOpts::bind`]). The first
    /// one the kernel refuses is named in the error.
    pub fn apply(&self, sock: &Socket) -> Result<(), SockOptError> {
        if let Some(n) = self.sndbuf {
            check("sndbuf", n, sock.set_send_buffer_size(n))?;
        }
        if let Some(n) = self.recbuf {
            check("recbuf", n, sock.set_recv_buffer_size(n))?;
        }
        check("nodelay", self.nodelay, sock.set_nodelay(self.nodelay))?;
        match &self.keepalive {
            None => check("keepalive", false, sock.set_keepalive(false))?,
            Some(k) => {
                let mut params = TcpKeepalive::new();
                if let Some(t) = k.time {
                    params = params.with_time(t);
                }
                if let Some(i) = k.interval {
                    params = params.with_interval(i);
                }
                if let Some(r) = k.retries {
                    params = params.with_retries(r);
                }
                check("keepalive", k, sock.set_tcp_keepalive(&params))?;
            }
        }
        if let Some(t) = self.tos {
            let set = match sock.domain() {
                Ok(Domain::IPV6) => sock.set_tclass_v6(t),
                Ok(_) => sock.set_tos(t),
                Err(e) => Err(e),
            };
            check("tos", t, set)?;
        }
        // After the type of service: Linux derives SO_PRIORITY from IP_TOS when that is set.
        if let Some(p) = self.priority {
            check("priority", p, set_priority(sock, p))?;
        }
        if let Some(t) = self.user_timeout {
            check(
                "user_timeout",
                t.as_millis(),
                sock.set_tcp_user_timeout(Some(t)),
            )?;
        }
        Ok(())
    }

    /// Binds an outgoing socket to `bind_ip` (any port) if it is set; to be called before
    /// connecting. A `bind_ip` of the other address family than `peer` is an error.
    pub fn bind(&self, sock: &Socket, peer: SocketAddr) -> Result<(), SockOptError> {
        let Some(ip) = self.bind_ip else {
            return Ok(());
        };
        let result = if ip.is_ipv4() != peer.is_ipv4() {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the peer's address {peer} is of another address family"),
            ))
        } else {
            sock.bind(&SockAddr::from(SocketAddr::new(ip, 0)))
        };
        result.map_err(|source| SockOptError {
            option: "bind_ip",
            value: ip.to_string(),
            source,
        })
    }
}

/// The buffer sizes the kernel gives `sock` now: `(send, receive)` in bytes, as
/// `getsockopt` reports them (twice what was set, on Linux).
pub fn buffer_sizes(sock: &Socket) -> (usize, usize) {
    (
        sock.send_buffer_size().unwrap_or(0),
        sock.recv_buffer_size().unwrap_or(0),
    )
}

/// `SO_PRIORITY`, which socket2 0.5 does not wrap.
#[cfg(any(target_os = "linux", target_os = "android"))]
#[allow(unsafe_code)]
fn set_priority(sock: &Socket, priority: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(priority)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the descriptor is `sock`'s and open for the duration of the call; the option
    // value is a live c_int and the length given is its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PRIORITY,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn set_priority(_sock: &Socket, _priority: u32) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "SO_PRIORITY exists on Linux only",
    ))
}

/// `SO_PRIORITY` as the kernel has it for `sock`.
#[cfg(any(target_os = "linux", target_os = "android"))]
#[allow(unsafe_code)]
pub fn priority(sock: &Socket) -> io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the descriptor is open; `value` and `len` are live and `len` is `value`'s size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PRIORITY,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value as u32)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Protocol, Type};
    use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};

    fn sysctl(name: &str) -> usize {
        std::fs::read_to_string(format!("/proc/sys/{name}"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn tcp(domain: Domain) -> Socket {
        Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).unwrap()
    }

    #[test]
    fn defaults_turn_nagle_off_and_leave_the_rest_to_the_kernel() {
        let sock = tcp(Domain::IPV4);
        let before = buffer_sizes(&sock);
        SocketOpts::default().apply(&sock).unwrap();
        assert!(sock.nodelay().unwrap());
        assert!(!sock.keepalive().unwrap());
        assert_eq!(buffer_sizes(&sock), before);
    }

    #[test]
    fn every_option_reads_back_from_a_real_socket() {
        let opts = SocketOpts {
            sndbuf: Some(256 * 1024),
            recbuf: Some(128 * 1024),
            nodelay: false,
            keepalive: Some(Keepalive {
                time: Some(Duration::from_secs(30)),
                interval: Some(Duration::from_secs(5)),
                retries: Some(4),
            }),
            priority: Some(3),
            tos: Some(0x10),
            user_timeout: Some(Duration::from_millis(12_000)),
            bind_ip: None,
        };
        let sock = tcp(Domain::IPV4);
        opts.apply(&sock).unwrap();
        // Linux doubles what was asked for, capped at net.core.{w,r}mem_max.
        let (snd, rcv) = buffer_sizes(&sock);
        assert_eq!(snd, 2 * (256 * 1024).min(sysctl("net/core/wmem_max")));
        assert_eq!(rcv, 2 * (128 * 1024).min(sysctl("net/core/rmem_max")));
        assert!(!sock.nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.keepalive_time().unwrap(), Duration::from_secs(30));
        assert_eq!(sock.keepalive_interval().unwrap(), Duration::from_secs(5));
        assert_eq!(sock.keepalive_retries().unwrap(), 4);
        assert_eq!(priority(&sock).unwrap(), 3);
        assert_eq!(sock.tos().unwrap(), 0x10);
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(12_000))
        );
    }

    #[test]
    fn buffer_sizes_change_only_when_asked() {
        let sock = tcp(Domain::IPV4);
        let opts = SocketOpts {
            sndbuf: Some(64 * 1024),
            ..SocketOpts::default()
        };
        let (_, rcv0) = buffer_sizes(&sock);
        opts.apply(&sock).unwrap();
        let (snd, rcv) = buffer_sizes(&sock);
        assert_eq!(snd, 2 * (64 * 1024).min(sysctl("net/core/wmem_max")));
        assert_eq!(rcv, rcv0);
    }

    #[test]
    fn keepalive_without_timings_keeps_the_kernels() {
        let sock = tcp(Domain::IPV4);
        let t0 = sock.keepalive_time().unwrap();
        let opts = SocketOpts {
            keepalive: Some(Keepalive::default()),
            ..SocketOpts::default()
        };
        opts.apply(&sock).unwrap();
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.keepalive_time().unwrap(), t0);
    }

    #[test]
    fn tos_on_ipv6_is_the_traffic_class() {
        let Ok(sock) = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)) else {
            return; // no IPv6 here
        };
        let opts = SocketOpts {
            tos: Some(0x20),
            ..SocketOpts::default()
        };
        opts.apply(&sock).unwrap();
        assert_eq!(sock.tclass_v6().unwrap(), 0x20);
    }

    #[test]
    fn a_refused_option_is_named() {
        // The kernel accepts 0..6 from anyone and more with CAP_NET_ADMIN; no one can set a
        // value that is not a C int.
        let sock = tcp(Domain::IPV4);
        let opts = SocketOpts {
            priority: Some(u32::MAX),
            ..SocketOpts::default()
        };
        let err = opts.apply(&sock).unwrap_err();
        assert_eq!(err.option, "priority");
        assert!(err
            .to_string()
            .starts_with("cannot set socket option priority to 4294967295: "));
        let as_io = io::Error::from(err);
        assert_eq!(as_io.kind(), io::ErrorKind::InvalidInput);
        assert!(as_io.to_string().contains("priority"), "{as_io}");
    }

    #[test]
    fn outgoing_connections_bind_where_told() {
        let server = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let to = server.local_addr().unwrap();
        let sock = tcp(Domain::IPV4);
        let opts = SocketOpts {
            bind_ip: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))),
            ..SocketOpts::default()
        };
        opts.bind(&sock, to).unwrap();
        sock.connect(&SockAddr::from(to)).unwrap();
        let local = sock.local_addr().unwrap().as_socket().unwrap();
        assert_eq!(local.ip(), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
        let (_, from) = server.accept().unwrap();
        assert_eq!(from.ip(), local.ip());
        // Nothing to bind: a no-op.
        SocketOpts::default().bind(&tcp(Domain::IPV4), to).unwrap();
    }

    #[test]
    fn binding_to_the_other_family_is_an_error() {
        let sock = tcp(Domain::IPV4);
        let opts = SocketOpts {
            bind_ip: Some(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            ..SocketOpts::default()
        };
        let err = opts
            .bind(&sock, SocketAddr::from((Ipv4Addr::LOCALHOST, 1)))
            .unwrap_err();
        assert_eq!(err.option, "bind_ip");
        assert_eq!(err.source.kind(), io::ErrorKind::InvalidInput);
        // An address this host does not have.
        let opts = SocketOpts {
            bind_ip: Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))),
            ..SocketOpts::default()
        };
        let err = opts
            .bind(&sock, SocketAddr::from((Ipv4Addr::LOCALHOST, 1)))
            .unwrap_err();
        assert!(err.to_string().contains("bind_ip to 192.0.2.1"), "{err}");
    }
}
