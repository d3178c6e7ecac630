//! `epoll`: the few Linux calls a poll thread makes (an epoll set, and an eventfd to wake it),
//! wrapped so that nothing else needs `unsafe`.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// The token of the waker's events: a task's token is its slot, never this.
pub const WAKE: u64 = u64::MAX;

/// An epoll set with an eventfd in it that any thread can ring.
#[derive(Debug)]
pub struct Epoll {
    ep: OwnedFd,
    bell: OwnedFd,
}

/// One readiness event: the token it was registered with, and what is ready.
pub type Event = libc::epoll_event;

/// Whether `ev` says its socket is writable.
pub fn writable(ev: &Event) -> bool {
    ev.events & libc::EPOLLOUT as u32 != 0
}

/// Whether `ev` says its socket is readable, hung up or failed (a read tells which).
pub fn readable(ev: &Event) -> bool {
    ev.events & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
}

impl Epoll {
    /// A new set, holding its waker (token [`WAKE`]).
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscalls; each fd returned is checked, then owned once.
        let ep = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        let bell = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        let bell = unsafe { OwnedFd::from_raw_fd(bell) };
        let e = Epoll { ep, bell };
        e.add(e.bell.as_raw_fd(), WAKE)?;
        Ok(e)
    }

    /// Watches `fd` for reading (and hang-ups, which read as the end of the stream), level
    /// triggered: a task that leaves data unread is told again.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: token,
        };
        // SAFETY: `ev` is a valid event for the duration of the call.
        cvt(unsafe { libc::epoll_ctl(self.ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) })
            .map(drop)
    }

    /// Watches `fd` for reading, and for writing too if `write` (level triggered).
    pub fn modify(&self, fd: RawFd, token: u64, write: bool) -> io::Result<()> {
        let mut events = libc::EPOLLIN | libc::EPOLLRDHUP;
        if write {
            events |= libc::EPOLLOUT;
        }
        let mut ev = libc::epoll_event {
            events: events as u32,
            u64: token,
        };
        // SAFETY: as in `add`.
        cvt(unsafe { libc::epoll_ctl(self.ep.as_raw_fd(), libc::EPOLL_CTL_MOD, fd, &mut ev) })
            .map(drop)
    }

    /// Stops watching `fd` (before it is closed: a closed fd leaves the set by itself only
    /// once no duplicate of it is open).
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: as in `add` (kernels before 2.6.9 wanted a non-null event here).
        cvt(unsafe { libc::epoll_ctl(self.ep.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, &mut ev) })
            .map(drop)
    }

    /// Waits for events, at most `timeout` (`None`: as long as it takes), into `events`
    /// (whose capacity is how many one call takes). An interrupted wait returns no event.
    pub fn wait(&self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        events.clear();
        // Rounded up: a timer due in 0.3 ms must not spin through zero-timeout waits.
        let ms = timeout.map_or(-1, |t| {
            t.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int
        });
        let cap = events.capacity().clamp(1, i32::MAX as usize);
        // SAFETY: the kernel writes at most `cap` events into the vector's spare capacity,
        // and says how many; only those are then taken as initialised.
        let n = unsafe {
            libc::epoll_wait(
                self.ep.as_raw_fd(),
                events.as_mut_ptr(),
                cap as libc::c_int,
                ms,
            )
        };
        match cvt(n) {
            Ok(n) => {
                unsafe { events.set_len(n as usize) };
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Wakes the thread in [`Epoll::wait`] (or its next wait).
    pub fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64. A full counter (2^64 - 2 rings unread)
        // fails with EAGAIN, and then the bell is ringing anyway.
        unsafe { libc::write(self.bell.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Silences the bell after it rang.
    pub fn hush(&self) {
        let mut n: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; a bell that did not ring fails with EAGAIN.
        unsafe { libc::read(self.bell.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
    }
}

/// Waits at most `timeout` for `fd` to be readable (or hung up); whether it is.
pub fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one live pollfd for the duration of the call.
    (unsafe { libc::poll(&mut pfd, 1, ms) }) > 0
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::time::Instant;

    #[test]
    fn a_readable_socket_and_the_bell_are_reported_with_their_tokens() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let ep = Epoll::new().unwrap();
        ep.add(b.as_raw_fd(), 7).unwrap();
        let mut events = Vec::with_capacity(8);
        ep.wait(&mut events, Some(Duration::from_millis(10)))
            .unwrap();
        assert!(events.is_empty());
        a.write_all(b"x").unwrap();
        ep.wait(&mut events, Some(Duration::from_secs(5))).unwrap();
        assert_eq!(events.iter().map(|e| e.u64).collect::<Vec<_>>(), [7]);
        ep.remove(b.as_raw_fd()).unwrap();
        ep.ring();
        let t = Instant::now();
        ep.wait(&mut events, None).unwrap();
        assert_eq!(events.iter().map(|e| e.u64).collect::<Vec<_>>(), [WAKE]);
        assert!(t.elapsed() < Duration::from_secs(5));
        ep.hush();
        ep.wait(&mut events, Some(Duration::from_millis(10)))
            .unwrap();
        assert!(events.is_empty(), "the bell was hushed");
    }
}
