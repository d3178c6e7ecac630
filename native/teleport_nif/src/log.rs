//! # The `tracing` to Erlang `logger` bridge
//!
//! Rust code all over teleport logs with the `tracing` macros, by convention with a snake_case
//! event name as the message and context as fields (payloads are never logged):
//!
//! ```ignore
//! tracing::warn!(peer = %name, index = 3, reason = %e, "connection_lost");
//! ```
//!
//! This module is the process-wide `tracing` subscriber that carries those events to the
//! Erlang process registered as `teleport_log` (`lib/teleport_log.erl`), which hands them to
//! `logger` with domain `[teleport]`. `tracing-subscriber` is not a dependency, so the
//! subscriber is written by hand; it only knows events (spans are disabled).
//!
//! ## Path of an event
//!
//! 1. [`Bridge::enabled`] lets through events at the current level (INFO and above unless
//!    `log_set_level/1` said otherwise) — an atomic load.
//! 2. [`Bridge::event`], on whatever thread logged (a teleport thread, or a scheduler thread
//!    inside a NIF), copies the event name and fields into a compact [`Record`] (every string
//!    bounded) and `try_send`s it into a bounded queue of [`QUEUE_LEN`] records. A full queue
//!    drops the record and counts it: logging never blocks the thread that logs.
//! 3. One forwarding thread, `teleport_log`, takes records off the queue, builds the message
//!    in an [`OwnedEnv`] and sends it. Only this thread ever touches an `OwnedEnv` (sending from
//!    one is forbidden on a scheduler thread). When no process is registered as
//!    `teleport_log`, or the thread is over its budget of [`MAX_PER_SECOND`] messages, the record
//!    is dropped and counted.
//!
//! ## The message
//!
//! `{teleport_log, Level, Event, Fields}` where
//!
//! * `Level` is `error | warning | info | debug` (tracing's TRACE is sent as `debug`);
//! * `Event` is the message as an atom — only when it is 1 to 255 characters of `[a-z0-9_]`,
//!   which keeps the atom table safe; any other message becomes `invalid_event`, and the
//!   fields then carry `callsite => <<"file.rs:line">>` to find the culprit (the text itself is
//!   not sent: it could hold data);
//! * `Fields` is a map with atom keys (field names pass the same check, else the key is
//!   `invalid_field`); integers stay integers, booleans become `true | false`, everything else
//!   (`%display`, `?debug`, strings, floats, errors) becomes a UTF-8 binary of at most
//!   [`MAX_VALUE_BYTES`] bytes.
//!
//! When records were dropped since the last delivered one, that one carries `dropped => N` in
//! its fields, so `dropped` is a reserved field name (an event's own `dropped` field defers the
//! count to the next record).
//!
//! ## Diagnostics
//!
//! `log_emit_test/2` emits a `test_event` on demand, to check the whole path from a NIF.

use rustler::{Atom, Binary, Encoder, Env, LocalPid, NifResult, OwnedEnv, Term};
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

rustler::atoms! {
    teleport_log,
    error,
    warning,
    info,
    debug,
    ok,
    invalid_event,
    invalid_field,
    dropped,
    callsite,
}

/// Records waiting for the forwarding thread; beyond this, events are dropped and counted.
pub const QUEUE_LEN: usize = 4096;
/// Bytes kept of each string field value (cut at a character boundary).
pub const MAX_VALUE_BYTES: usize = 1024;
/// The longest event or field name made into an atom (the VM's limit for atoms).
pub const MAX_NAME_LEN: usize = 255;
/// Messages the forwarding thread sends per second at most, so that a flood of events cannot
/// grow `teleport_log`'s mailbox faster than it drains; the rest are dropped and counted.
pub const MAX_PER_SECOND: u32 = 10_000;

/// Verbosity ranks: an event passes when its rank is at most [`MAX_RANK`].
const RANK_ERROR: u8 = 0;
const RANK_WARN: u8 = 1;
const RANK_INFO: u8 = 2;
/// DEBUG and TRACE share a rank: Erlang has one `debug` level for both.
const RANK_DEBUG: u8 = 3;

/// The current level, as a rank; set by `log_set_level/1`.
static MAX_RANK: AtomicU8 = AtomicU8::new(RANK_INFO);
/// Records dropped (queue full, no `teleport_log` process, over budget) and not yet reported.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// The producer side of the queue; set once by [`install`].
static QUEUE: OnceLock<SyncSender<Record>> = OnceLock::new();

thread_local! {
    /// True on the forwarding thread, whose own events (if any code it calls ever logged) would
    /// otherwise feed back into the queue it drains.
    static ON_FORWARDER: Cell<bool> = const { Cell::new(false) };
}

fn rank(level: &Level) -> u8 {
    match *level {
        Level::ERROR => RANK_ERROR,
        Level::WARN => RANK_WARN,
        Level::INFO => RANK_INFO,
        _ => RANK_DEBUG,
    }
}

/// Installs the bridge: starts the forwarding thread and makes [`Bridge`] the global `tracing`
/// subscriber. Idempotent and cheap after the first call; never panics (it runs in the NIF
/// `load` callback, on a scheduler thread). If the thread cannot be started, events are
/// dropped and counted; if another global subscriber was set first, it stays.
pub fn install() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // Caught so that a panic cannot unwind into the VM nor poison anything.
        let _ = catch_unwind(|| {
            let (tx, rx) = sync_channel(QUEUE_LEN);
            let spawned = std::thread::Builder::new()
                .name("teleport_log".into())
                .spawn(move || forward(rx));
            if spawned.is_ok() {
                let _ = QUEUE.set(tx);
            }
            // Err means a subscriber is already set (e.g. by a test harness): keep it.
            let _ = tracing::dispatcher::set_global_default(tracing::Dispatch::new(Bridge));
        });
    });
}

/// Counts one dropped record.
fn count_drop() {
    DROPPED.fetch_add(1, Ordering::Relaxed);
}

/// One value of a field, already bounded.
enum Value {
    I64(i64),
    U64(u64),
    Bool(bool),
    Str(String),
}

/// An event as it waits in the queue: everything owned or `'static`, strings bounded.
struct Record {
    meta: &'static Metadata<'static>,
    /// The message, at most `MAX_NAME_LEN + 1` bytes (longer is invalid anyway).
    event: String,
    fields: Vec<(&'static str, Value)>,
}

/// A `fmt::Write` that keeps at most `limit` bytes, cut at a character boundary, and then
/// refuses more so that formatting a huge value stops early.
struct Bounded {
    buf: String,
    limit: usize,
}

impl Bounded {
    fn new(limit: usize) -> Self {
        Bounded {
            buf: String::new(),
            limit,
        }
    }

    /// Formats `value` with `Debug` (which `%x` Display values also go through).
    fn debug(limit: usize, value: &dyn fmt::Debug) -> String {
        let mut out = Bounded::new(limit);
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

fn bounded_str(s: &str) -> String {
    s[..floor_char_boundary(s, s.len().min(MAX_VALUE_BYTES))].to_owned()
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
            self.0.event =
                value[..floor_char_boundary(value, value.len().min(MAX_NAME_LEN + 1))].to_owned();
        } else {
            self.push(field, Value::Str(bounded_str(value)));
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
struct Bridge;

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
        // current by `log_set_level`, which rebuilds the interest cache.
        Some(match MAX_RANK.load(Ordering::Relaxed) {
            RANK_ERROR => LevelFilter::ERROR,
            RANK_WARN => LevelFilter::WARN,
            RANK_INFO => LevelFilter::INFO,
            _ => LevelFilter::TRACE,
        })
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        meta.is_event() && rank(meta.level()) <= MAX_RANK.load(Ordering::Relaxed)
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
                count_drop();
                return;
            };
            let meta = event.metadata();
            let mut record = Record {
                meta,
                event: String::new(),
                fields: Vec::with_capacity(meta.fields().len()),
            };
            event.record(&mut Collect(&mut record));
            match queue.try_send(record) {
                Ok(()) => {}
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => count_drop(),
            }
        }));
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

/// The forwarding thread: sends each record to `teleport_log`, forever.
fn forward(rx: Receiver<Record>) {
    let _ = ON_FORWARDER.try_with(|on| on.set(true));
    let mut env = OwnedEnv::new();
    let mut window = Instant::now();
    let mut sent_in_window = 0u32;
    for record in rx.iter() {
        let now = Instant::now();
        if now.duration_since(window) >= Duration::from_secs(1) {
            window = now;
            sent_in_window = 0;
        }
        if sent_in_window >= MAX_PER_SECOND {
            count_drop();
            continue;
        }
        sent_in_window += 1;
        // A panic here loses this record only; the thread lives on. The env is cleared
        // before reuse, since a panic may have left terms in it.
        let delivered = catch_unwind(AssertUnwindSafe(|| deliver(&mut env, &record)));
        if delivered.is_err() {
            count_drop();
            env.clear();
        }
    }
}

/// Sends one record, with the drop count if there is one; counts it as dropped if there is
/// no `teleport_log` process.
fn deliver(env: &mut OwnedEnv, record: &Record) {
    let Some(pid): Option<LocalPid> = env.run(|env| env.whereis_pid(teleport_log())) else {
        env.clear();
        count_drop();
        return;
    };
    let owns_dropped = record.fields.iter().any(|(name, _)| *name == "dropped");
    let dropped = if owns_dropped {
        0
    } else {
        DROPPED.swap(0, Ordering::Relaxed)
    };
    let sent = env.send_and_clear(&pid, |env| message(env, record, dropped));
    if sent.is_err() {
        // The process died between `whereis` and `send`: this record and the count are lost.
        DROPPED.fetch_add(dropped + 1, Ordering::Relaxed);
    }
}

/// True for names that may become atoms: 1 to 255 characters of `[a-z0-9_]`.
fn is_atom_safe(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn name_atom(env: Env<'_>, name: &str, fallback: Atom) -> Atom {
    if is_atom_safe(name) {
        Atom::from_str(env, name).unwrap_or(fallback)
    } else {
        fallback
    }
}

/// Builds `{teleport_log, Level, Event, Fields}`.
fn message<'a>(env: Env<'a>, record: &Record, dropped: u64) -> Term<'a> {
    let level = match *record.meta.level() {
        Level::ERROR => error(),
        Level::WARN => warning(),
        Level::INFO => info(),
        _ => debug(),
    };
    let event = name_atom(env, &record.event, invalid_event());
    let mut fields = Term::map_new(env);
    let mut put = |key: Atom, value: Term<'a>| {
        // map_put fails only on a non-map; later duplicates win.
        if let Ok(map) = fields.map_put(key, value) {
            fields = map;
        }
    };
    for (name, value) in &record.fields {
        let value = match value {
            Value::I64(v) => v.encode(env),
            Value::U64(v) => v.encode(env),
            Value::Bool(v) => v.encode(env),
            Value::Str(v) => v.encode(env),
        };
        put(name_atom(env, name, invalid_field()), value);
    }
    if event == invalid_event() {
        let at = format!(
            "{}:{}",
            record.meta.file().unwrap_or(record.meta.target()),
            record.meta.line().unwrap_or(0)
        );
        put(callsite(), at.encode(env));
    }
    if dropped > 0 {
        put(self::dropped(), dropped.encode(env));
    }
    (teleport_log(), level, event, fields).encode(env)
}

/// Sets the least severe level that reaches Erlang: `error | warning | info | debug` (debug
/// includes tracing's TRACE). Takes effect at once for every thread.
#[rustler::nif]
fn log_set_level(level: Atom) -> NifResult<Atom> {
    let rank = if level == error() {
        RANK_ERROR
    } else if level == warning() {
        RANK_WARN
    } else if level == info() {
        RANK_INFO
    } else if level == debug() {
        RANK_DEBUG
    } else {
        return Err(rustler::Error::BadArg);
    };
    MAX_RANK.store(rank, Ordering::Relaxed);
    // Recomputes the global max level from `max_level_hint`, which the macros check first.
    tracing::callsite::rebuild_interest_cache();
    Ok(ok())
}

/// Diagnostic: emits a `tracing` event named `test_event` at `Level` with the field
/// `text = Text` (invalid UTF-8 replaced), to check the path to `logger` end to end.
#[rustler::nif]
fn log_emit_test(level: Atom, text: Binary) -> NifResult<Atom> {
    let text = String::from_utf8_lossy(text.as_slice());
    if level == error() {
        tracing::error!(text = %text, "test_event");
    } else if level == warning() {
        tracing::warn!(text = %text, "test_event");
    } else if level == info() {
        tracing::info!(text = %text, "test_event");
    } else if level == debug() {
        tracing::debug!(text = %text, "test_event");
    } else {
        return Err(rustler::Error::BadArg);
    }
    Ok(ok())
}
