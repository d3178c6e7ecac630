//! Diagnostics for tests: NIFs that misbehave on purpose, or tell what the codec found out.

use rustler::{Atom, Env, NifResult, Term};
use std::panic;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

/// How every message of a [`diag_panic`] starts.
const PREFIX: &str = "teleport diag_panic:";

/// Diagnostic, used by tests to show that a Rust panic never takes the VM down: panics with a
/// message. rustler's NIF wrapper catches the unwind and raises `error:nif_panicked` in the
/// calling process instead.
///
/// The panic goes through the panic hook as any other would, but only the first one is
/// printed: a test calls this a thousand times, and each report (with a backtrace when
/// `RUST_BACKTRACE` is set) would go to the VM's standard error. Other panics are untouched.
#[rustler::nif]
fn diag_panic() {
    static QUIET: Once = Once::new();
    QUIET.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            static SHOWN: AtomicBool = AtomicBool::new(false);
            let ours = info
                .payload()
                .downcast_ref::<&str>()
                .is_some_and(|s| s.starts_with(PREFIX));
            if !ours || !SHOWN.swap(true, Ordering::Relaxed) {
                previous(info);
            }
        }));
    });
    panic!("teleport diag_panic: a deliberate panic inside a NIF");
}

/// Diagnostic: what the codec's checks of identifiers found so far, `#{layout, bounds,
/// pid_refs, remote, remote_refs => unchecked | on | off}` (see `local_id`).
#[rustler::nif]
fn diag_local_ids(env: Env) -> NifResult<Term> {
    let mut map = Term::map_new(env);
    for (check, state) in crate::local_id::checks() {
        map = map.map_put(Atom::from_str(env, check)?, Atom::from_str(env, state)?)?;
    }
    Ok(map)
}
