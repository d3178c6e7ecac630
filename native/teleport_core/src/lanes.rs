//! Successive connections of one pool slot deliver in turn, never side by side.
//!
//! A sender's messages from one process to one destination all travel through one slot (a
//! *lane*) of its pool. When that slot's connection dies the sender opens a new one, yet the
//! acceptor's reader of the old connection may still hold frames to deliver: whatever the
//! kernel had received before the end (megabytes, with full buffers). Were the new
//! connection's reader to start at once, its newer frames would overtake those. So the
//! handshake names the lane, and the reader of a new connection waits its turn: until the
//! reader of the lane's previous connection is done.
//!
//! From the sender's side the previous connection is dead (it only reconnects after losing
//! it), so its reader normally ends within moments, at the end of what was in flight. A
//! connection that went half-open (no FIN or RST ever arrives) would never end: after a
//! bounded wait the new reader stops the old one. Its unread frames are not lost: each lane
//! also keeps its [`Progress`], the number of the last frame it delivered, which the new
//! connection's handshake tells the sender once the old reader is done (the sender sends
//! again from the next one), and which drops any frame delivered already.

use crate::frame::FrameError;
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A lane: the peer's node name and its pool slot.
type Key = (Vec<u8>, u16);

/// The connections of every lane, as their readers take turns.
#[derive(Default)]
pub struct Lanes {
    /// The newest connection of each lane with a reader still running (or waiting).
    /// (Shared with each connection's [`Place`], which outlives any borrow of the lanes.)
    newest: Arc<Mutex<HashMap<Key, Arc<Turn>>>>,
    /// What each lane delivered, in the sender's session it last heard from.
    progress: Mutex<HashMap<Key, Arc<Progress>>>,
}

impl std::fmt::Debug for Lanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lanes")
            .field("busy", &self.busy())
            .field("known", &self.progress.lock().len())
            .finish()
    }
}

/// What one lane delivered in one session of its sender: frames are numbered from 1 in
/// each session (a new pool on the sending node starts a new one).
#[derive(Debug)]
pub struct Progress {
    session: u64,
    delivered: AtomicU64,
}

/// What to do with a frame that arrived, by its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// The next one: deliver it.
    Next,
    /// Delivered already (sent again after a reconnection): drop it.
    Again,
}

impl Progress {
    /// The number of the last frame delivered.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Acquire)
    }

    /// Takes frame `seq` as delivered if it is the next one. It is counted before it is
    /// delivered: a frame that then turns out undeliverable is dropped, not asked for again
    /// (it would fail again). A gap means frames were lost: the connection must close.
    pub fn admit(&self, seq: u64) -> Result<Admit, FrameError> {
        let last = self.delivered();
        if seq <= last {
            return Ok(Admit::Again);
        }
        // Only the lane's current reader moves it (readers take turns); a reader left behind
        // by `Waited::GaveUp` loses the race here and drops the frame as seen.
        match self
            .delivered
            .compare_exchange(last, seq, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) if seq == last + 1 => Ok(Admit::Next),
            Ok(_) => {
                // Put it back: nothing past the gap counts as delivered.
                let _ =
                    self.delivered
                        .compare_exchange(seq, last, Ordering::AcqRel, Ordering::Acquire);
                Err(FrameError::Gap {
                    expected: last + 1,
                    got: seq,
                })
            }
            Err(_) => Ok(Admit::Again),
        }
    }
}

/// One connection's turn on its lane.
struct Turn {
    done: Mutex<bool>,
    ended: Condvar,
    /// Stops the connection's reader (shuts its socket).
    stop: Box<dyn Fn() + Send + Sync>,
}

impl Turn {
    /// Waits up to `patience` for the reader to be done; whether it is.
    fn wait(&self, patience: Duration) -> bool {
        let deadline = Instant::now() + patience;
        let mut done = self.done.lock();
        while !*done {
            if self.ended.wait_until(&mut done, deadline).timed_out() {
                return *done;
            }
        }
        true
    }
}

/// How a new connection's wait for its lane's previous one ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// The lane had no other connection with a reader running.
    Alone,
    /// The previous connection's reader finished by itself.
    Finished,
    /// The previous connection's reader was still going after `patience` and was stopped.
    Stopped,
    /// Stopped, and still not done after another `patience`: this reader goes ahead.
    GaveUp,
}

/// A connection's place on its lane; dropping it (when the reader ends, or unwinds) lets the
/// next connection of the lane go.
pub struct Place {
    newest: Arc<Mutex<HashMap<Key, Arc<Turn>>>>,
    key: Key,
    turn: Arc<Turn>,
    previous: Option<Arc<Turn>>,
}

impl Lanes {
    /// Puts a new connection of `peer`'s slot `lane` at the back of the lane. `stop` must make
    /// its reader end soon (shut its socket); a newer connection calls it if this one's reader
    /// is still going after its patience ran out.
    pub fn join(&self, peer: &[u8], lane: u16, stop: impl Fn() + Send + Sync + 'static) -> Place {
        let turn = Arc::new(Turn {
            done: Mutex::new(false),
            ended: Condvar::new(),
            stop: Box::new(stop),
        });
        let key = (peer.to_vec(), lane);
        let previous = self.newest.lock().insert(key.clone(), turn.clone());
        Place {
            newest: self.newest.clone(),
            key,
            turn,
            previous,
        }
    }

    /// Lanes with a connection whose reader is running or waiting.
    pub fn busy(&self) -> usize {
        self.newest.lock().len()
    }

    /// The progress of `peer`'s lane `lane` in the sender's session `session`: what the lane
    /// delivered if that session is the one it knows, else a fresh start (the sender's pool
    /// is new). Call it once the connection's turn came, so that no earlier reader of the
    /// lane still delivers.
    pub fn progress(&self, peer: &[u8], lane: u16, session: u64) -> Arc<Progress> {
        let mut all = self.progress.lock();
        let p = all
            .entry((peer.to_vec(), lane))
            .or_insert_with(|| Arc::new(Progress::fresh(session)));
        if p.session != session {
            *p = Arc::new(Progress::fresh(session));
        }
        p.clone()
    }

    /// Forgets what `peer`'s lanes delivered: it went down, and a pool it makes later is a
    /// new session anyway.
    pub fn forget(&self, peer: &[u8]) {
        self.progress.lock().retain(|(p, _), _| p != peer);
    }
}

impl Progress {
    fn fresh(session: u64) -> Progress {
        Progress {
            session,
            delivered: AtomicU64::new(0),
        }
    }
}

impl Place {
    /// Blocks until the lane's previous connection's reader is done. After `patience` it
    /// stops that reader, and after `patience` more it goes ahead anyway (the old reader is
    /// then stuck delivering, which a stopped socket cannot make last).
    pub fn wait_turn(&mut self, patience: Duration) -> Waited {
        let Some(previous) = self.previous.take() else {
            return Waited::Alone;
        };
        if previous.wait(patience) {
            return Waited::Finished;
        }
        (previous.stop)();
        if previous.wait(patience) {
            Waited::Stopped
        } else {
            Waited::GaveUp
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        *self.turn.done.lock() = true;
        self.turn.ended.notify_all();
        let mut newest = self.newest.lock();
        if newest
            .get(&self.key)
            .is_some_and(|t| Arc::ptr_eq(t, &self.turn))
        {
            newest.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::thread;

    const LONG: Duration = Duration::from_secs(10);

    #[test]
    fn the_first_connection_of_a_lane_goes_at_once() {
        let lanes = Lanes::default();
        let mut place = lanes.join(b"a@h", 0, || {});
        assert_eq!(place.wait_turn(LONG), Waited::Alone);
        assert_eq!(lanes.busy(), 1);
        drop(place);
        assert_eq!(lanes.busy(), 0);
    }

    #[test]
    fn other_lanes_and_other_peers_do_not_wait() {
        let lanes = Lanes::default();
        let _a0 = lanes.join(b"a@h", 0, || {});
        assert_eq!(lanes.join(b"a@h", 1, || {}).wait_turn(LONG), Waited::Alone);
        assert_eq!(lanes.join(b"b@h", 0, || {}).wait_turn(LONG), Waited::Alone);
    }

    #[test]
    fn a_new_connection_waits_until_the_old_reader_is_done() {
        let lanes = Arc::new(Lanes::default());
        let old = lanes.join(b"a@h", 3, || panic!("a reader that ends is never stopped"));
        let (tx, rx) = mpsc::channel();
        let l = lanes.clone();
        let new = thread::spawn(move || {
            let mut place = l.join(b"a@h", 3, || {});
            tx.send("joined").unwrap();
            let waited = place.wait_turn(LONG);
            tx.send("going").unwrap();
            waited
        });
        assert_eq!(rx.recv().unwrap(), "joined");
        // The old reader is still delivering: the new one must not start.
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(old);
        assert_eq!(rx.recv().unwrap(), "going");
        assert_eq!(new.join().unwrap(), Waited::Finished);
        assert_eq!(lanes.busy(), 0);
    }

    #[test]
    fn connections_take_turns_in_the_order_they_joined() {
        let lanes = Arc::new(Lanes::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = lanes.join(b"a@h", 0, || {});
        let mut readers = Vec::new();
        for i in 1..=3 {
            let (l, o) = (lanes.clone(), order.clone());
            let (tx, rx) = mpsc::channel();
            readers.push(thread::spawn(move || {
                let mut place = l.join(b"a@h", 0, || {});
                tx.send(()).unwrap();
                place.wait_turn(LONG);
                thread::sleep(Duration::from_millis(20));
                o.lock().push(i);
            }));
            // Join in a known order before the next one does.
            rx.recv().unwrap();
        }
        drop(first);
        for r in readers {
            r.join().unwrap();
        }
        assert_eq!(*order.lock(), vec![1, 2, 3]);
    }

    #[test]
    fn a_stuck_old_reader_is_stopped_after_the_patience() {
        let lanes = Lanes::default();
        let stopped = Arc::new(AtomicBool::new(false));
        let s = stopped.clone();
        // The old reader ends as soon as it is stopped, as one whose socket is shut does.
        let old_place = Mutex::new(Some(
            lanes.join(b"a@h", 0, move || s.store(true, Ordering::SeqCst)),
        ));
        thread::scope(|scope| {
            scope.spawn(|| {
                while !stopped.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(5));
                }
                old_place.lock().take();
            });
            let mut new = lanes.join(b"a@h", 0, || {});
            assert_eq!(new.wait_turn(Duration::from_millis(100)), Waited::Stopped);
        });
    }

    #[test]
    fn a_reader_that_will_not_end_is_given_up_on() {
        let lanes = Lanes::default();
        let stops = Arc::new(AtomicUsize::new(0));
        let s = stops.clone();
        let _stuck = lanes.join(b"a@h", 0, move || {
            s.fetch_add(1, Ordering::SeqCst);
        });
        let mut new = lanes.join(b"a@h", 0, || {});
        assert_eq!(new.wait_turn(Duration::from_millis(50)), Waited::GaveUp);
        assert_eq!(stops.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_lane_delivers_each_frame_once_in_order_and_refuses_gaps() {
        let lanes = Lanes::default();
        let p = lanes.progress(b"a@h", 0, 77);
        assert_eq!(p.admit(1), Ok(Admit::Next));
        assert_eq!(p.admit(2), Ok(Admit::Next));
        assert_eq!(p.admit(2), Ok(Admit::Again));
        assert_eq!(p.admit(1), Ok(Admit::Again));
        assert_eq!(
            p.admit(4),
            Err(FrameError::Gap {
                expected: 3,
                got: 4
            })
        );
        assert_eq!(p.delivered(), 2);
        // The same session on a later connection goes on where it was...
        assert_eq!(lanes.progress(b"a@h", 0, 77).delivered(), 2);
        // ...another lane or peer has its own count, and a new session starts again.
        assert_eq!(lanes.progress(b"a@h", 1, 77).delivered(), 0);
        assert_eq!(lanes.progress(b"b@h", 0, 77).delivered(), 0);
        assert_eq!(lanes.progress(b"a@h", 0, 78).delivered(), 0);
        lanes.forget(b"a@h");
        assert_eq!(lanes.progress.lock().len(), 1);
    }

    #[test]
    fn a_reader_that_unwinds_still_lets_the_next_one_go() {
        let lanes = Arc::new(Lanes::default());
        let l = lanes.clone();
        let panicked = thread::spawn(move || {
            let _place = l.join(b"a@h", 0, || {});
            panic!("the reader panicked");
        })
        .join();
        assert!(panicked.is_err());
        assert_eq!(lanes.join(b"a@h", 0, || {}).wait_turn(LONG), Waited::Alone);
    }
}
