//! What the fuzz targets share: a heap budget per input, and depth-safe handling of
//! [`Value`]s (whose derived `PartialEq` and `Debug` recurse, unlike the parser).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Once;
use teleport_core::value::Value;

/// The heap one input may add: this much, plus [`BUDGET_PER_INPUT_BYTE`] per input byte.
/// A `Value` is 32 bytes and every input byte makes at most about one of them (twice over
/// while a container is being built), so an honest decode stays far below.
pub const BUDGET_BASE: usize = 1 << 20;
/// See [`BUDGET_BASE`].
pub const BUDGET_PER_INPUT_BYTE: usize = 512;

/// Decoded values nested deeper than this are not re-encoded and compared: `encode_value`
/// and `Value`'s `==` recurse. With the 4096-byte inputs that `run.sh` asks for, a value is
/// at most 2048 deep, so this only matters when replaying a larger file by hand.
pub const MAX_ROUNDTRIP_DEPTH: usize = 4096;

/// The system allocator, counting live bytes and aborting the process (a crash that libFuzzer
/// records) when one input makes them grow past its budget. libFuzzer's own
/// `-malloc_limit_mb` needs a sanitizer's allocator hooks, which `--sanitizer none` lacks.
pub struct Budgeted;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

#[global_allocator]
static GLOBAL: Budgeted = Budgeted;

fn reserve(n: usize) {
    let live = LIVE.fetch_add(n, Relaxed).saturating_add(n);
    let limit = LIMIT.load(Relaxed);
    if live > limit {
        // Lift the limit first, in case printing allocates.
        LIMIT.store(usize::MAX, Relaxed);
        eprintln!(
            "teleport_fuzz: an allocation of {n} bytes takes the live heap to {live} bytes, \
             over this input's budget ({limit} bytes)"
        );
        std::process::abort();
    }
}

fn release(n: usize) {
    LIVE.fetch_sub(n, Relaxed);
}

// SAFETY: every call is forwarded to `System` with the caller's arguments; the counting
// around it touches only atomics.
unsafe impl GlobalAlloc for Budgeted {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        reserve(layout.size());
        let p = System.alloc(layout);
        if p.is_null() {
            release(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        reserve(layout.size());
        let p = System.alloc_zeroed(layout);
        if p.is_null() {
            release(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        release(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = layout.size();
        if new_size > old {
            reserve(new_size - old);
        }
        let p = System.realloc(ptr, layout, new_size);
        if p.is_null() {
            if new_size > old {
                release(new_size - old);
            }
        } else if new_size < old {
            release(old - new_size);
        }
        p
    }
}

/// Runs `check(input)` under the input's heap budget: [`BUDGET_BASE`] plus
/// [`BUDGET_PER_INPUT_BYTE`] per input byte.
pub fn run_check(input: &[u8], check: fn(&[u8])) {
    let budget = BUDGET_BASE.saturating_add(input.len().saturating_mul(BUDGET_PER_INPUT_BYTE));
    run_check_with_budget(input, budget, check);
}

/// Runs `check(input)` while the live heap may grow by at most `budget` bytes, for targets
/// whose allowance is not the decoder's (a frame buffer, a handshake message).
pub fn run_check_with_budget(input: &[u8], budget: usize, check: fn(&[u8])) {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // A panic's report (and its backtrace) may allocate freely: lift the budget first,
        // then go on to the hook already there (libfuzzer-sys's: print, then abort).
        let next = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            LIMIT.store(usize::MAX, Relaxed);
            next(info)
        }));
    });
    LIMIT.store(LIVE.load(Relaxed).saturating_add(budget), Relaxed);
    check(input);
    LIMIT.store(usize::MAX, Relaxed);
}

/// How deeply `v` nests (a scalar is 1), found without recursion.
pub fn depth(v: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(v, 1usize)];
    while let Some((v, d)) = stack.pop() {
        deepest = deepest.max(d);
        match v {
            Value::Tuple(es) => stack.extend(es.iter().map(|e| (e, d + 1))),
            Value::List(es, tail) => {
                stack.extend(es.iter().map(|e| (e, d + 1)));
                stack.push((tail, d + 1));
            }
            Value::Map(kvs) => {
                for (k, v) in kvs {
                    stack.push((k, d + 1));
                    stack.push((v, d + 1));
                }
            }
            _ => {}
        }
    }
    deepest
}

/// Drops `v`. `Value`'s own `Drop` moves children onto a stack rather than recursing (since
/// the deep-drop finding in the README was fixed), so this is a plain drop now; the targets
/// keep calling it to say where a value ends.
pub fn dispose(v: Value) {
    drop(v);
}
