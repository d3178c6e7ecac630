//! `log`: the VM-free half of the bridge that carries teleport's `tracing` events to
//! Erlang's `logger` (the other half, which makes terms and sends them, is the NIF crate's
//! `log.rs`).
//!
//! Rust code all over teleport logs with the `tracing` macros, by convention with a snake_case
//! event name as the message and context as fields (payloads are never logged):
//!
//! ```ignore
//! tracing::warn!(peer = %name, index = 3, reason = %e, "connection_lost");
//! ```
//!
//! ## Path of an event
//!
//! 1. [`Bridge::enabled`] lets through events at the current level (INFO and above unless
//!    [`set_level`] said otherwise): an atomic load.
//! 2. [`Bridge::event`], on whatever thread logged (a teleport thread, or a scheduler thread
//!    inside a NIF), copies the event name and fields into a compact [`Record`] (every string
//!    bounded, see [`record_of`]) and `try_send`s it into a bounded queue of [`QUEUE_LEN`]
//!    records. A full queue drops the record and counts it: logging never blocks the thread
//!    that logs.
//! 3. One forwarding thread, `teleport_log`, started by [`install`], runs the forwarder it
//!    was given on the queue's records (the NIF's sends each to the Erlang process
//!    `teleport_log`, at most [`MAX_PER_SECOND`] a second: see [`RateLimit`]).
//!
//! `tracing-subscriber` is not a dependency: this subscriber only knows events (spans are
//! disabled), and the whole of it is the few lines of [`Bridge`].

use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record as SpanRecord};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};

/// Records waiting for the forwarding thread; beyond this, events are dropped and counted.
pub const QUEUE_LEN: usize = 4096;
/// Bytes kept of each string field value (cut at a character boundary).
pub const MAX_VALUE_BYTES: usize = 1024;
/// The longest event or field name made into an atom (the VM's limit for atoms).
pub const MAX_NAME_LEN: usize = 255;
/// Messages the forwarding thread sends per second at most, so that a flood of events cannot
/// grow `teleport_log`'s mailbox faster than it drains; the rest are dropped and counted.
pub const MAX_PER_SECOND: u32 = 10_000;

/// The least severe level that is forwarded: Erlang's levels, DEBUG and TRACE sharing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Rank {
    /// `error`.
    Error = 0,
    /// `warning`.
    Warn = 1,
    /// `info`.
    Info = 2,
    /// `debug` (tracing's DEBUG and TRACE).
    Debug = 3,
}

impl Rank {
    /// The rank of a `tracing` level.
    pub fn of(level: &Level) -> Rank {
        match *level {
            Level::ERROR => Rank::Error,
            Level::WARN => Rank::Warn,
            Level::INFO => Rank::Info,
            _ => Rank::Debug,
        }
    }
}

/// The current level, as a rank.
static MAX_RANK: AtomicU8 = AtomicU8::new(Rank::Info as u8);
/// Records dropped (queue full, no receiver, over budget) and not yet reported.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// The producer side of the queue; set once by [`install`].
static QUEUE: OnceLock<SyncSender<Record>> = OnceLock::new();

thread_local! {
    /// True on the forwarding thread, whose own events (if any code it calls ever logged) would
    /// otherwise feed back into the queue it drains.
    static ON_FORWARDER: Cell<bool> = const { Cell::new(false) };
}

/// Installs the bridge: starts the thread `teleport_log`, which runs `forward` on the queue,
/// and makes [`Bridge`] the global `tracing` subscriber. Idempotent and cheap after the first
/// call; never panics (the NIF calls it in its `load` callback, on a scheduler thread). If the
/// thread cannot be started, events are dropped and counted; if another global subscriber was
/// set first, it stays.
pub fn install(forward: fn(Receiver<Record>)) {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // Caught so that a panic cannot unwind into the VM nor poison anything.
        let _ = catch_unwind(|| {
            let (tx, rx) = sync_channel(QUEUE_LEN);
            let spawned = std::thread::Builder::new()
                .name("teleport_log".into())
                .spawn(move || {
                    let _ = ON_FORWARDER.try_with(|on| on.set(true));
                    forward(rx)
                });
            if spawned.is_ok() {
                let _ = QUEUE.set(tx);
            }
            // Err means a subscriber is already set (e.g. by a test harness): keep it.
            let _ = tracing::dispatcher::set_global_default(tracing::Dispatch::new(Bridge));
        });
    });
}

/// Sets the least severe level forwarded, at once for every thread.
pub fn set_level(rank: Rank) {
    MAX_RANK.store(rank as u8, Ordering::Relaxed);
    // Recomputes the global max level from `max_level_hint`, which the macros check first.
    tracing::callsite::rebuild_interest_cache();
}

/// Counts `n` records dropped.
pub fn count_drops(n: u64) {
    DROPPED.fetch_add(n, Ordering::Relaxed);
}

/// The records dropped since this was last called, for the next record to report.
pub fn take_drops() -> u64 {
    DROPPED.swap(0, Ordering::Relaxed)
}

/// One value of a field, already bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A signed integer.
    I64(i64),
    /// An unsigned integer.
    U64(u64),
    /// A boolean.
    Bool(bool),
    /// Anything else, as text of at most [`MAX_VALUE_BYTES`] bytes.
    Str(String),
}

/// An event as it waits in the queue: everything owned or `'static`, strings bounded.
#[derive(Debug)]
pub struct Record {
    /// Where the event comes from and its level.
    pub meta: &'static Metadata<'static>,
    /// The message, at most `MAX_NAME_LEN + 1` bytes (longer is invalid as a name anyway).
    pub event: String,
    /// The fields, by name, in the order logged.
    pub fields: Vec<(&'static str, Value)>,
}

/// The [`Record`] of `event`: its message and fields, every string bounded.
pub fn record_of(event: &Event<'_>) -> Record {
    let meta = event.metadata();
    let mut record = Record {
        meta,
        event: String::new(),
        fields: Vec::with_capacity(meta.fields().len()),
    };
    event.record(&mut Collect(&mut record));
    record
}

/// True for names that may become atoms: 1 to [`MAX_NAME_LEN`] characters of `[a-z0-9_]`.
pub fn is_atom_safe(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// At most [`MAX_PER_SECOND`] records a second, counted in windows of one second.
#[derive(Debug)]
pub struct RateLimit {
    window: Instant,
    sent: u32,
}

impl RateLimit {
    /// A limit whose first window starts at `now`.
    pub fn new(now: Instant) -> Self {
        RateLimit {
            window: now,
            sent: 0,
        }
    }

    /// Whether one more record may go at `now` (and counts it if so).
    pub fn allow(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.sent = 0;
        }
        if self.sent >= MAX_PER_SECOND {
            return false;
        }
        self.sent += 1;
        true
    }
}

/// A `fmt::Write` that keeps at most `limit` bytes, cut at a character boundary, and then
/// refuses more so that formatting a huge value stops early.
struct Bounded {
    buf: String,
    limit: usize,
}

impl Bounded {
    /// Formats `value` with `Debug` (which `%x` Display values also go through).
    fn debug(limit: usize, value: &dyn fmt::Debug) -> String {
        let mut out = Bounded {
            buf: String::new(),
            limit,
        };
        // An error only means the value was cut.
        let _ = write!(out, "{value:?}");
        out.buf
    }
}

impl fmt::Write for Bounded {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.limit - self.buf.len();
        if s.len() <= room {
            self.buf.push_str(s);
            Ok(())
        } else {
            self.buf.push_str(&s[..floor_char_boundary(s, room)]);
            Err(fmt::Error)
        }
    }
}

fn floor_char_boundary(s: &str, mut at: usize) -> usize {
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn bounded(s: &str, limit: usize) -> String {
    s[..floor_char_boundary(s, s.len().min(limit))].to_owned()
}

/// Collects an event's fields into a [`Record`].
struct Collect<'r>(&'r mut Record);

impl Collect<'_> {
    fn push(&mut self, field: &Field, value: Value) {
        self.0.fields.push((field.name(), value));
    }
}

impl Visit for Collect<'_> {
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, Value::I64(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field, Value::U64(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, Value::Bool(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.event = bounded(value, MAX_NAME_LEN + 1);
        } else {
            self.push(field, Value::Str(bounded(value, MAX_VALUE_BYTES)));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            // The message arrives as `fmt::Arguments`, whose Debug is its text.
            self.0.event = Bounded::debug(MAX_NAME_LEN + 1, value);
        } else {
            self.push(field, Value::Str(Bounded::debug(MAX_VALUE_BYTES, value)));
        }
    }
}

/// The subscriber: see the module documentation.
pub struct Bridge;

impl Subscriber for Bridge {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        if meta.is_span() {
            Interest::never()
        } else {
            // The level can change at run time: ask `enabled` each time (one atomic load).
            Interest::sometimes()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        // Lets the macros skip disabled levels before reaching the callsite at all; kept
        // current by `set_level`, which rebuilds the interest cache.
        Some(match MAX_RANK.load(Ordering::Relaxed) {
            0 => LevelFilter::ERROR,
            1 => LevelFilter::WARN,
            2 => LevelFilter::INFO,
            _ => LevelFilter::TRACE,
        })
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        meta.is_event() && Rank::of(meta.level()) as u8 <= MAX_RANK.load(Ordering::Relaxed)
    }

    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        // Never called: span callsites are disabled. Ids must be non-zero.
        Id::from_u64(1)
    }

    fn record(&self, _span: &Id, _values: &SpanRecord<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        if ON_FORWARDER.try_with(Cell::get).unwrap_or(true) {
            return;
        }
        // Whatever the values' formatting does, the thread that logs must not see a panic.
        let _ = catch_unwind(AssertUnwindSafe(|| {
            let Some(queue) = QUEUE.get() else {
                count_drops(1);
                return;
            };
            match queue.try_send(record_of(event)) {
                Ok(()) => {}
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => count_drops(1),
            }
        }));
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use std::sync::Arc;

    /// A subscriber that keeps the records of every event (as [`Bridge`] would queue them).
    struct Keep(Arc<Mutex<Vec<Record>>>);

    impl Subscriber for Keep {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &SpanRecord<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            self.0.lock().push(record_of(event));
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    fn records(f: impl FnOnce()) -> Vec<Record> {
        let kept = Arc::new(Mutex::new(Vec::new()));
        tracing::subscriber::with_default(Keep(kept.clone()), f);
        let mut kept = kept.lock();
        std::mem::take(&mut *kept)
    }

    #[test]
    fn a_record_holds_the_name_and_typed_bounded_fields() {
        let long = "é".repeat(MAX_VALUE_BYTES); // 2 bytes each
        let got = records(|| {
            tracing::warn!(
                index = 3,
                count = 7u64,
                up = true,
                reason = %"refused",
                what = ?Some(1),
                long = %long,
                "connection_lost"
            )
        });
        let [r] = &got[..] else { panic!("{got:?}") };
        assert_eq!(r.event, "connection_lost");
        assert_eq!(*r.meta.level(), Level::WARN);
        assert_eq!(r.fields[0], ("index", Value::I64(3)));
        assert_eq!(r.fields[1], ("count", Value::U64(7)));
        assert_eq!(r.fields[2], ("up", Value::Bool(true)));
        assert_eq!(r.fields[3], ("reason", Value::Str("refused".into())));
        assert_eq!(r.fields[4], ("what", Value::Str("Some(1)".into())));
        let Value::Str(cut) = &r.fields[5].1 else {
            panic!()
        };
        assert_eq!(cut.len(), MAX_VALUE_BYTES);
        assert!(cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn a_long_message_is_cut_past_the_longest_name_so_it_stays_invalid() {
        let name = "x".repeat(MAX_NAME_LEN + 50);
        let got = records(|| tracing::info!("{}", name));
        assert_eq!(got[0].event.len(), MAX_NAME_LEN + 1);
        assert!(!is_atom_safe(&got[0].event));
    }

    #[test]
    fn only_short_snake_case_names_may_become_atoms() {
        assert!(is_atom_safe("connection_lost"));
        assert!(is_atom_safe("a1_b2"));
        assert!(is_atom_safe(&"x".repeat(MAX_NAME_LEN)));
        for bad in ["", "Upper", "with space", "dash-ed", "ünï", "a.b"] {
            assert!(!is_atom_safe(bad), "{bad}");
        }
        assert!(!is_atom_safe(&"x".repeat(MAX_NAME_LEN + 1)));
    }

    #[test]
    fn the_rate_limit_allows_so_many_a_second() {
        let t0 = Instant::now();
        let mut limit = RateLimit::new(t0);
        let allowed = (0..MAX_PER_SECOND + 10)
            .filter(|_| limit.allow(t0 + Duration::from_millis(500)))
            .count();
        assert_eq!(allowed, MAX_PER_SECOND as usize);
        assert!(limit.allow(t0 + Duration::from_millis(1500)));
    }

    #[test]
    fn ranks_follow_erlangs_levels() {
        assert_eq!(Rank::of(&Level::ERROR), Rank::Error);
        assert_eq!(Rank::of(&Level::WARN), Rank::Warn);
        assert_eq!(Rank::of(&Level::INFO), Rank::Info);
        assert_eq!(Rank::of(&Level::DEBUG), Rank::Debug);
        assert_eq!(Rank::of(&Level::TRACE), Rank::Debug);
        assert!(Rank::Error < Rank::Debug);
    }

    #[test]
    fn drops_are_counted_until_taken() {
        let before = take_drops();
        count_drops(2);
        count_drops(1);
        // Other tests may count drops meanwhile (no bridge is installed in cargo tests, so
        // their events are not counted): at least ours are there, and then none.
        assert!(take_drops() >= 3, "{before}");
        assert_eq!(take_drops(), 0);
    }
}
