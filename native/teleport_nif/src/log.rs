//! # The `tracing` to Erlang `logger` bridge: the VM's half
//!
//! `teleport_core::log` collects every `tracing` event into a bounded [`Record`] and queues
//! it, on whatever thread logged, without blocking. This module is the rest: the forwarding
//! thread's work, which makes each record a message for the Erlang process registered as
//! `teleport_log` (`lib/teleport_log.erl`, which hands it to `logger` with domain
//! `[teleport]`), and the NIFs that set the level and test the path.
//!
//! ## The message
//!
//! `{teleport_log, Level, Event, Fields}` where
//!
//! * `Level` is `error | warning | info | debug` (tracing's TRACE is sent as `debug`);
//! * `Event` is the message as an atom — only when it is 1 to 255 characters of `[a-z0-9_]`
//!   ([`is_atom_safe`]), which keeps the atom table safe; any other message becomes
//!   `invalid_event`, and the fields then carry `callsite => <<"file.rs:line">>` to find the
//!   culprit (the text itself is not sent: it could hold data);
//! * `Fields` is a map with atom keys (field names pass the same check, else the key is
//!   `invalid_field`); integers stay integers, booleans become `true | false`, everything else
//!   (`%display`, `?debug`, strings, floats, errors) becomes a UTF-8 binary of at most
//!   `MAX_VALUE_BYTES` bytes.
//!
//! When records were dropped since the last delivered one, that one carries `dropped => N` in
//! its fields, so `dropped` is a reserved field name (an event's own `dropped` field defers the
//! count to the next record). Only the forwarding thread ever touches an `OwnedEnv` (sending
//! from one is forbidden on a scheduler thread); when no process is registered as
//! `teleport_log`, or over the rate limit, the record is dropped and counted.
//!
//! ## Diagnostics
//!
//! `log_emit_test/2` emits a `test_event` on demand, to check the whole path from a NIF.

use crate::atoms;
use rustler::{Atom, Binary, Encoder, Env, LocalPid, NifResult, OwnedEnv, Term};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::Receiver;
use std::time::Instant;
use teleport_core::log::{count_drops, is_atom_safe, take_drops, Rank, RateLimit, Record, Value};

/// Installs the bridge (see `teleport_core::log::install`), with [`forward`] as its thread.
pub fn install() {
    teleport_core::log::install(forward);
}

/// The forwarding thread: sends each record to `teleport_log`, forever.
fn forward(rx: Receiver<Record>) {
    let mut env = OwnedEnv::new();
    let mut limit = RateLimit::new(Instant::now());
    for record in rx.iter() {
        if !limit.allow(Instant::now()) {
            count_drops(1);
            continue;
        }
        // A panic here loses this record only; the thread lives on. The env is cleared
        // before reuse, since a panic may have left terms in it.
        let delivered = catch_unwind(AssertUnwindSafe(|| deliver(&mut env, &record)));
        if delivered.is_err() {
            count_drops(1);
            env.clear();
        }
    }
}

/// Sends one record, with the drop count if there is one; counts it as dropped if there is
/// no `teleport_log` process.
fn deliver(env: &mut OwnedEnv, record: &Record) {
    let Some(pid): Option<LocalPid> = env.run(|env| env.whereis_pid(atoms::teleport_log())) else {
        env.clear();
        count_drops(1);
        return;
    };
    let owns_dropped = record.fields.iter().any(|(name, _)| *name == "dropped");
    let dropped = if owns_dropped { 0 } else { take_drops() };
    let sent = env.send_and_clear(&pid, |env| message(env, record, dropped));
    if sent.is_err() {
        // The process died between `whereis` and `send`: this record and the count are lost.
        count_drops(dropped + 1);
    }
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
    let level = match Rank::of(record.meta.level()) {
        Rank::Error => atoms::error(),
        Rank::Warn => atoms::warning(),
        Rank::Info => atoms::info(),
        Rank::Debug => atoms::debug(),
    };
    let event = name_atom(env, &record.event, atoms::invalid_event());
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
        put(name_atom(env, name, atoms::invalid_field()), value);
    }
    if event == atoms::invalid_event() {
        let at = format!(
            "{}:{}",
            record.meta.file().unwrap_or(record.meta.target()),
            record.meta.line().unwrap_or(0)
        );
        put(atoms::callsite(), at.encode(env));
    }
    if dropped > 0 {
        put(atoms::dropped(), dropped.encode(env));
    }
    (atoms::teleport_log(), level, event, fields).encode(env)
}

/// Sets the least severe level that reaches Erlang: `error | warning | info | debug` (debug
/// includes tracing's TRACE). Takes effect at once for every thread.
#[rustler::nif]
fn log_set_level(level: Atom) -> NifResult<Atom> {
    let rank = if level == atoms::error() {
        Rank::Error
    } else if level == atoms::warning() {
        Rank::Warn
    } else if level == atoms::info() {
        Rank::Info
    } else if level == atoms::debug() {
        Rank::Debug
    } else {
        return Err(rustler::Error::BadArg);
    };
    teleport_core::log::set_level(rank);
    Ok(atoms::ok())
}

/// Diagnostic: emits a `tracing` event named `test_event` at `Level` with the field
/// `text = Text` (invalid UTF-8 replaced), to check the path to `logger` end to end.
#[rustler::nif]
fn log_emit_test(level: Atom, text: Binary) -> NifResult<Atom> {
    let text = String::from_utf8_lossy(text.as_slice());
    if level == atoms::error() {
        tracing::error!(text = %text, "test_event");
    } else if level == atoms::warning() {
        tracing::warn!(text = %text, "test_event");
    } else if level == atoms::info() {
        tracing::info!(text = %text, "test_event");
    } else if level == atoms::debug() {
        tracing::debug!(text = %text, "test_event");
    } else {
        return Err(rustler::Error::BadArg);
    }
    Ok(atoms::ok())
}
