//! `poller`: a fixed set of threads that drive the incoming connections of a listener, each
//! thread many connections, so that the threads teleport runs do not grow with connections
//! and an idle connection costs no wake-up.
//!
//! A connection is a [`Task`]: its thread calls it when its socket is readable, and at the
//! deadline it asked for (its ack delay, say). Tasks go to the threads in turn. Every call is
//! caught if it panics: that task alone is dropped (its `Drop` closes and logs it), and the
//! thread goes on with the others.

use crate::epoll::{Epoll, Event, WAKE};
use parking_lot::Mutex;
use std::io;
use std::os::fd::RawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Events one wait takes at most.
const EVENTS: usize = 64;

/// What a task wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// To be called when its socket is readable, or at this deadline if one.
    Wait(Option<Instant>),
    /// Nothing more: it is dropped.
    Done,
}

/// One connection as its poll thread drives it. Neither call may block.
pub trait Task: Send + 'static {
    /// The socket whose readability wakes it.
    fn fd(&self) -> RawFd;
    /// Its socket is readable (or hung up).
    fn readable(&mut self, now: Instant) -> Next;
    /// Its deadline passed, or every task is asked to look (see [`Poller::tick_all`]).
    fn tick(&mut self, now: Instant) -> Next;
}

/// The default number of poll threads: one per core, at most 4 (each can move more than a
/// gigabyte a second; more threads would only be more wake-ups).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// A running set of poll threads.
pub struct Poller<T: Task> {
    shards: Vec<Arc<Shard<T>>>,
    next: AtomicUsize,
}

/// What [`Poller::tick_all`] needs, without the task type.
pub trait TickAll: Send + Sync {
    /// See [`Poller::tick_all`].
    fn tick_all(&self, finish: bool);
}

struct Shard<T> {
    ep: Epoll,
    inbox: Mutex<Inbox<T>>,
    /// Set by [`Poller::tick_all`]: every task is ticked at the next wake-up.
    tick_all: AtomicBool,
    /// Set once no task will come any more: the thread ends when it has none left.
    finish: AtomicBool,
}

struct Inbox<T> {
    tasks: Vec<T>,
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
                    shut: false,
                }),
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
        }))
    }

    /// Hands `task` to the next thread in turn; `Err(task)` if the poller finished.
    pub fn add(&self, task: T) -> Result<(), T> {
        let at = self.next.fetch_add(1, Ordering::Relaxed) % self.shards.len();
        let shard = &self.shards[at];
        let mut inbox = shard.inbox.lock();
        if inbox.shut {
            return Err(task);
        }
        inbox.tasks.push(task);
        drop(inbox);
        shard.ep.ring();
        Ok(())
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

impl<T: Task> TickAll for Poller<T> {
    fn tick_all(&self, finish: bool) {
        Poller::tick_all(self, finish)
    }
}

/// A thread's tasks, by slot (the slot is the task's epoll token).
struct Tasks<T> {
    slots: Vec<Option<(T, Option<Instant>)>>,
    free: Vec<usize>,
    live: usize,
}

impl<T: Task> Shard<T> {
    fn run(&self) {
        let mut tasks = Tasks {
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
        };
        let mut events: Vec<Event> = Vec::with_capacity(EVENTS);
        loop {
            let now = Instant::now();
            let timeout = tasks
                .slots
                .iter()
                .filter_map(|s| s.as_ref().and_then(|(_, d)| *d))
                .min()
                .map(|d| d.saturating_duration_since(now));
            if let Err(e) = self.ep.wait(&mut events, timeout) {
                tracing::error!(reason = %e, "poll_failed");
                std::thread::sleep(Duration::from_millis(10));
            }
            let now = Instant::now();
            let mut rang = false;
            for ev in events.iter() {
                let token = ev.u64;
                if token == WAKE {
                    rang = true;
                } else {
                    self.call(&mut tasks, token as usize, |t| t.readable(now));
                }
            }
            if rang {
                self.ep.hush();
                let arrived = std::mem::take(&mut self.inbox.lock().tasks);
                for t in arrived {
                    self.insert(&mut tasks, t, now);
                }
            }
            let all = self.tick_all.swap(false, Ordering::SeqCst);
            for slot in 0..tasks.slots.len() {
                let due = match &tasks.slots[slot] {
                    Some((_, d)) => all || d.is_some_and(|d| d <= now),
                    None => false,
                };
                if due {
                    self.call(&mut tasks, slot, |t| t.tick(now));
                }
            }
            if tasks.live == 0 && self.finish.load(Ordering::SeqCst) {
                let mut inbox = self.inbox.lock();
                if inbox.tasks.is_empty() {
                    inbox.shut = true;
                    return;
                }
            }
        }
    }

    fn insert(&self, tasks: &mut Tasks<T>, task: T, now: Instant) {
        let slot = tasks.free.pop().unwrap_or_else(|| {
            tasks.slots.push(None);
            tasks.slots.len() - 1
        });
        if let Err(e) = self.ep.add(task.fd(), slot as u64) {
            tracing::error!(reason = %e, "poll_add_failed");
            tasks.free.push(slot);
            return; // dropping the task closes it
        }
        // Ticked at once: it may have been handed over with data read already, or with the
        // listener closing.
        tasks.slots[slot] = Some((task, Some(now)));
        tasks.live += 1;
    }

    /// Calls the task in `slot` (if any: an event may name a task that just ended), and
    /// drops it if it is done or panicked.
    fn call(&self, tasks: &mut Tasks<T>, slot: usize, f: impl FnOnce(&mut T) -> Next) {
        let Some(Some((task, deadline))) = tasks.slots.get_mut(slot) else {
            return;
        };
        match catch_unwind(AssertUnwindSafe(|| f(task))) {
            Ok(Next::Wait(d)) => *deadline = d,
            Ok(Next::Done) | Err(_) => {
                let (task, _) = tasks.slots[slot].take().expect("a task");
                let _ = self.ep.remove(task.fd());
                // Its `Drop` closes and logs it; a panic there must not end the thread.
                let _ = catch_unwind(AssertUnwindSafe(|| drop(task)));
                tasks.free.push(slot);
                tasks.live -= 1;
            }
        }
    }
}
