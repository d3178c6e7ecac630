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
//! bounded wait the new reader stops the old one, whose unread frames are then lost, as
//! anything in flight on a dead connection can be.

use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A lane: the peer's node name and its pool slot.
type Key = (Vec<u8>, u16);

/// The connections of every lane, as their readers take turns.
#[derive(Default)]
pub struct Lanes {
    /// The newest connection of each lane with a reader still running (or waiting).
    newest: Mutex<HashMap<Key, Arc<Turn>>>,
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
pub struct Place<'a> {
    lanes: &'a Lanes,
    key: Key,
    turn: Arc<Turn>,
    previous: Option<Arc<Turn>>,
}

impl Lanes {
    /// Puts a new connection of `peer`'s slot `lane` at the back of the lane. `stop` must make
    /// its reader end soon (shut its socket); a newer connection calls it if this one's reader
    /// is still going after its patience ran out.
    pub fn join(
        &self,
        peer: &[u8],
        lane: u16,
        stop: impl Fn() + Send + Sync + 'static,
    ) -> Place<'_> {
        let turn = Arc::new(Turn {
            done: Mutex::new(false),
            ended: Condvar::new(),
            stop: Box::new(stop),
        });
        let key = (peer.to_vec(), lane);
        let previous = self.newest.lock().insert(key.clone(), turn.clone());
        Place {
            lanes: self,
            key,
            turn,
            previous,
        }
    }

    /// Lanes with a connection whose reader is running or waiting.
    pub fn busy(&self) -> usize {
        self.newest.lock().len()
    }
}

impl Place<'_> {
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

impl Drop for Place<'_> {
    fn drop(&mut self) {
        *self.turn.done.lock() = true;
        self.turn.ended.notify_all();
        let mut newest = self.lanes.newest.lock();
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
