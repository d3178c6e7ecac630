//! `threads`: how teleport starts its OS threads (the acceptor, a reader per incoming
//! connection, a writer per outgoing one).
//!
//! They can run at a lower OS priority than the VM's schedulers: with many nodes on few
//! cores, bulk moved by teleport's threads must not starve the schedulers that serve
//! everything else (disterl's heartbeats and small calls included). When the CPU is not
//! short, a lower priority costs nothing: the threads still get every idle cycle.

use std::io;
use std::thread::JoinHandle;

/// Starts `f` on a thread named `name` whose nice value is `nice` above the calling
/// process's (0: the same priority as the VM; 19 at most, as Linux allows). Lowering a
/// thread's priority needs no privilege; where it is refused anyway, or the platform has no
/// per-thread priority, the thread runs at the normal priority and a warning is logged.
pub fn spawn<F>(name: String, nice: u8, f: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    std::thread::Builder::new().name(name).spawn(move || {
        if nice > 0 {
            if let Err(e) = lower_priority(nice) {
                tracing::warn!(nice, reason = %e, "thread_nice_refused");
            }
        }
        f()
    })
}

/// Sets the calling thread's nice value to the process's plus `by` (capped at 19). The
/// process's, not the calling thread's: a reader is started by the acceptor, which already
/// runs lower.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn lower_priority(by: u8) -> io::Result<()> {
    // On Linux a nice value belongs to a thread: `setpriority` on a thread id sets it for
    // that thread alone, and the process id is the id of its main thread. SAFETY: plain
    // syscalls on ids of our own process, no memory passed.
    let pid = unsafe { libc::getpid() } as libc::id_t;
    let base = thread_nice_of(pid)?;
    let target = (base + by as i32).min(19);
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, own_tid(), target) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn lower_priority(_by: u8) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "no per-thread priority here",
    ))
}

/// The nice value of thread `tid` (`getpriority` may return -1 as a value: errno tells).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn thread_nice_of(tid: libc::id_t) -> io::Result<i32> {
    // SAFETY: errno is thread-local; resetting it and reading it back is the documented way
    // to tell a nice of -1 from an error.
    unsafe {
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, tid);
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(0) | None => Ok(nice),
            Some(_) => Err(err),
        }
    }
}

/// The calling thread's id.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn own_tid() -> libc::id_t {
    // SAFETY: a plain syscall, no memory passed.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::id_t }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The calling thread's nice value.
    fn current_nice() -> io::Result<i32> {
        thread_nice_of(own_tid())
    }

    #[test]
    fn a_thread_runs_as_much_lower_as_asked_and_others_are_untouched() {
        let base = current_nice().unwrap();
        let seen = |nice, inner: Option<u8>| {
            let (tx, rx) = std::sync::mpsc::channel();
            spawn("teleport_test".into(), nice, move || match inner {
                None => tx.send(current_nice().unwrap()).unwrap(),
                // A thread started by a lowered one (a reader by the acceptor).
                Some(n) => spawn("teleport_test".into(), n, move || {
                    tx.send(current_nice().unwrap()).unwrap()
                })
                .unwrap()
                .join()
                .unwrap(),
            })
            .unwrap()
            .join()
            .unwrap();
            rx.recv().unwrap()
        };
        assert_eq!(seen(0, None), base);
        assert_eq!(seen(5, None), (base + 5).min(19));
        assert_eq!(seen(200, None), 19);
        assert_eq!(seen(7, Some(7)), (base + 7).min(19));
        // The spawning thread kept its priority.
        assert_eq!(current_nice().unwrap(), base);
    }
}
