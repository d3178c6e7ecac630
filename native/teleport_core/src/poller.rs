//! `poller`: a fixed set of threads that drive many connections each, so that the threads
//! teleport runs do not grow with connections and an idle connection costs no wake-up. The
//! listener's incoming connections run on one set, every pool's outgoing ones on another.
//!
//! A connection is a [`Task`]: its thread calls it when its socket is readable, when it is
//! writable and the task asked for that, when it is poked (see [`Poller::poke`]: a sender
//! queued frames), and at the deadline it asked for. Tasks go to the threads in turn. Every
//! call is caught if it panics: that task alone is dropped (its `Drop` closes and logs it),
//! and the thread goes on with the others.

use crate::epoll::{self, Epoll, Event, WAKE};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Events one wait takes at most.
const EVENTS: usize = 64;

/// What a task wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// To be called when its socket is ready, or at this deadline if one.
    Wait(Option<Instant>),
    /// Nothing more: it is dropped.
    Done,
}

/// One connection as its poll thread drives it. No call may block.
pub trait Task: Send + 'static {
    /// The socket whose readiness wakes it.
    fn fd(&self) -> RawFd;
    /// Its socket is readable (or hung up, or failed).
    fn readable(&mut self, now: Instant) -> Next;
    /// Its deadline passed, or every task is asked to look (see [`Poller::tick_all`]), or it
    /// just joined its thread.
    fn tick(&mut self, now: Instant) -> Next;
    /// Its socket is writable and it asked for that ([`Task::wants_write`]), or it was
    /// poked.
    fn writable(&mut self, now: Instant) -> Next {
        self.tick(now)
    }
    /// Whether it waits for its socket to be writable (asked after every call).
    fn wants_write(&self) -> bool {
        false
    }
}

/// The default number of threads of a poller: one per core, at most 4 (each can move more
/// than a gigabyte a second; more threads would only be more wake-ups).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// A task, to [`Poller::poke`] it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handle {
    shard: usize,
    id: u64,
}

/// A running set of poll threads.
pub struct Poller<T: Task> {
    shards: Vec<Arc<Shard<T>>>,
    next: AtomicUsize,
    ids: AtomicU64,
}

struct Shard<T> {
    ep: Epoll,
    inbox: Mutex<Inbox<T>>,
    /// The bell rang and the thread has not answered yet: ringing again is a wasted syscall.
    rung: AtomicBool,
    /// Set by [`Poller::tick_all`]: every task is ticked at the next wake-up.
    tick_all: AtomicBool,
    /// Set once no task will come any more: the thread ends when it has none left.
    finish: AtomicBool,
}

struct Inbox<T> {
    tasks: Vec<(u64, T)>,
    pokes: Vec<u64>,
    /// The thread ended: it takes no task any more.
    shut: bool,
}

impl<T: Task> Poller<T> {
    /// Starts `threads` poll threads named `name`, `nice` below the VM's priority (see
    /// [`crate::threads::spawn`]).
    pub fn start(threads: usize, name: &str, nice: u8) -> io::Result<Arc<Poller<T>>> {
        let mut shards = Vec::new();
        for _ in 0..threads.max(1) {
            let shard = Arc::new(Shard {
                ep: Epoll::new()?,
                inbox: Mutex::new(Inbox {
                    tasks: Vec::new(),
                    pokes: Vec::new(),
                    shut: false,
                }),
                rung: AtomicBool::new(false),
                tick_all: AtomicBool::new(false),
                finish: AtomicBool::new(false),
            });
            let s = shard.clone();
            crate::threads::spawn(name.into(), nice, move || s.run())?;
            shards.push(shard);
        }
        Ok(Arc::new(Poller {
            shards,
            next: AtomicUsize::new(0),
            ids: AtomicU64::new(0),
        }))
    }

    /// Hands `task` to the next thread in turn, which ticks it at once; `Err(task)` if the
    /// poller finished.
    pub fn add(&self, task: T) -> Result<Handle, T> {
        let at = self.next.fetch_add(1, Ordering::Relaxed) % self.shards.len();
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let shard = &self.shards[at];
        let mut inbox = shard.inbox.lock();
        if inbox.shut {
            return Err(task);
        }
        inbox.tasks.push((id, task));
        drop(inbox);
        shard.ring();
        Ok(Handle { shard: at, id })
    }

    /// Has the task `h` called as writable soon (if it still runs).
    pub fn poke(&self, h: Handle) {
        let shard = &self.shards[h.shard];
        shard.inbox.lock().pokes.push(h.id);
        shard.ring();
    }

    /// Has every thread tick every task at once (a listener closing), and, if `finish`, end
    /// once it has no task left.
    pub fn tick_all(&self, finish: bool) {
        for s in &self.shards {
            if finish {
                s.finish.store(true, Ordering::SeqCst);
            }
            s.tick_all.store(true, Ordering::SeqCst);
            s.ep.ring();
        }
    }
}

/// A task as its thread keeps it.
struct Slot<T> {
    task: T,
    id: u64,
    deadline: Option<Instant>,
    /// Whether its socket is watched for writing.
    writing: bool,
}

/// A thread's tasks, by slot (the slot is the task's epoll token).
struct Tasks<T> {
    slots: Vec<Option<Slot<T>>>,
    free: Vec<usize>,
    by_id: HashMap<u64, usize>,
    /// Tasks with a deadline (only they are looked at after each wake-up).
    timed: usize,
}

impl<T: Task> Shard<T> {
    fn ring(&self) {
        if !self.rung.swap(true, Ordering::SeqCst) {
            self.ep.ring();
        }
    }

    fn run(&self) {
        let mut tasks = Tasks {
            slots: Vec::new(),
            free: Vec::new(),
            by_id: HashMap::new(),
            timed: 0,
        };
        let mut events: Vec<Event> = Vec::with_capacity(EVENTS);
        loop {
            let now = Instant::now();
            let timeout = (tasks.timed > 0)
                .then(|| {
                    tasks
                        .slots
                        .iter()
                        .filter_map(|s| s.as_ref().and_then(|s| s.deadline))
                        .min()
                })
                .flatten()
                .map(|d| d.saturating_duration_since(now));
            if let Err(e) = self.ep.wait(&mut events, timeout) {
                tracing::error!(reason = %e, "poll_failed");
                std::thread::sleep(Duration::from_millis(10));
            }
            let now = Instant::now();
            let mut rang = false;
            for ev in events.iter() {
                let slot = ev.u64;
                if slot == WAKE {
                    rang = true;
                    continue;
                }
                let slot = slot as usize;
                if epoll::readable(ev) {
                    self.call(&mut tasks, slot, |t| t.readable(now));
                }
                if epoll::writable(ev) {
                    self.call(&mut tasks, slot, |t| t.writable(now));
                }
            }
            if rang {
                // Hushed before the flag is cleared, and the inbox taken after: a ring that
                // comes once the flag is clear is heard at the next wait, and one that found
                // it still set pushed what it rang for before this takes the inbox. (The
                // other way round, a ring between the two was hushed unheard and left the
                // flag set: every later poke on this thread was lost.)
                self.ep.hush();
                self.rung.store(false, Ordering::SeqCst);
                let (arrived, pokes) = {
                    let mut inbox = self.inbox.lock();
                    (
                        std::mem::take(&mut inbox.tasks),
                        std::mem::take(&mut inbox.pokes),
                    )
                };
                for (id, t) in arrived {
                    self.insert(&mut tasks, id, t, now);
                }
                for id in pokes {
                    if let Some(&slot) = tasks.by_id.get(&id) {
                        self.call(&mut tasks, slot, |t| t.writable(now));
                    }
                }
            }
            let all = self.tick_all.swap(false, Ordering::SeqCst);
            if all || tasks.timed > 0 {
                for slot in 0..tasks.slots.len() {
                    let due = match &tasks.slots[slot] {
                        Some(s) => all || s.deadline.is_some_and(|d| d <= now),
                        None => false,
                    };
                    if due {
                        self.call(&mut tasks, slot, |t| t.tick(now));
                    }
                }
            }
            if tasks.by_id.is_empty() && self.finish.load(Ordering::SeqCst) {
                let mut inbox = self.inbox.lock();
                if inbox.tasks.is_empty() {
                    inbox.shut = true;
                    return;
                }
            }
        }
    }

    fn insert(&self, tasks: &mut Tasks<T>, id: u64, task: T, now: Instant) {
        let slot = tasks.free.pop().unwrap_or_else(|| {
            tasks.slots.push(None);
            tasks.slots.len() - 1
        });
        if let Err(e) = self.ep.add(task.fd(), slot as u64) {
            tracing::error!(reason = %e, "poll_add_failed");
            tasks.free.push(slot);
            return; // dropping the task closes it
        }
        tasks.slots[slot] = Some(Slot {
            task,
            id,
            deadline: None,
            writing: false,
        });
        tasks.by_id.insert(id, slot);
        // Ticked at once: it may have been handed over with data read already, frames to
        // write, or with the listener closing.
        self.call(tasks, slot, |t| t.tick(now));
    }

    /// Calls the task in `slot` (if any: an event may name a task that just ended), then
    /// drops it if it is done or panicked, or watches its socket as it now wants.
    fn call(&self, tasks: &mut Tasks<T>, slot: usize, f: impl FnOnce(&mut T) -> Next) {
        let Some(Some(s)) = tasks.slots.get_mut(slot) else {
            return;
        };
        let was_timed = s.deadline.is_some();
        let next = catch_unwind(AssertUnwindSafe(|| f(&mut s.task)));
        let deadline = match next {
            Ok(Next::Wait(d)) => d,
            Ok(Next::Done) | Err(_) => {
                let s = tasks.slots[slot].take().expect("a task");
                tasks.by_id.remove(&s.id);
                tasks.timed -= was_timed as usize;
                tasks.free.push(slot);
                let _ = self.ep.remove(s.task.fd());
                // Its `Drop` closes and logs it; a panic there must not end the thread.
                let _ = catch_unwind(AssertUnwindSafe(|| drop(s)));
                return;
            }
        };
        tasks.timed = tasks.timed + deadline.is_some() as usize - was_timed as usize;
        s.deadline = deadline;
        let want = s.task.wants_write();
        if want != s.writing {
            match self.ep.modify(s.task.fd(), slot as u64, want) {
                Ok(()) => s.writing = want,
                Err(e) => tracing::error!(reason = %e, "poll_modify_failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    /// A task that counts the pokes it was called for.
    struct Counting {
        sock: UnixStream,
        pokes: Arc<AtomicU64>,
    }

    impl Task for Counting {
        fn fd(&self) -> RawFd {
            self.sock.as_raw_fd()
        }
        fn readable(&mut self, _now: Instant) -> Next {
            Next::Wait(None)
        }
        fn tick(&mut self, _now: Instant) -> Next {
            Next::Wait(None)
        }
        fn writable(&mut self, _now: Instant) -> Next {
            self.pokes.fetch_add(1, Ordering::SeqCst);
            Next::Wait(None)
        }
    }

    // Pokes from many threads at once, each waiting for its own to be answered: the bell
    // is rung and answered concurrently. Once the thread hushed a ring that came after it
    // had cleared `rung`, every later poke was lost (the flag said a ring was pending).
    #[test]
    fn every_poke_is_answered_while_others_ring_at_once() {
        let poller = Poller::<Counting>::start(1, "teleport_test_poll", 0).unwrap();
        let mut keep = Vec::new();
        let pokers: Vec<_> = (0..4)
            .map(|_| {
                let (a, b) = UnixStream::pair().unwrap();
                keep.push(b);
                let pokes = Arc::new(AtomicU64::new(0));
                let task = Counting {
                    sock: a,
                    pokes: pokes.clone(),
                };
                let h = poller.add(task).ok().unwrap();
                let poller = poller.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        poller.poke(h);
                        let deadline = Instant::now() + Duration::from_secs(5);
                        while pokes.load(Ordering::SeqCst) <= i {
                            assert!(Instant::now() < deadline, "poke {i} never answered");
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        for p in pokers {
            p.join().unwrap();
        }
    }
}
