//! `reader_*`: incoming connections read on the VM's schedulers, as disterl reads its own.
//!
//! Once a connection's handshake is done, the listener hands it to [`Readers`] (its
//! [`Driver`]), which wraps it in a reader resource and sends `{teleport_accepted, Reader}` to
//! the runtime's owner (`teleport_server`). The owner starts a `teleport_reader` process for
//! it under `teleport_reader_sup`; that process calls [`reader_attach`] once, opens a port on
//! the duplicate of the socket [`reader_fd`] gives (`gen_tcp:fdopen/2`, `{active, true}`: the
//! schedulers poll a busy port's socket themselves, where an `enif_select` readiness always
//! passes through the VM's poll thread), and feeds what the port reads to [`reader_feed`]:
//!
//! - a feed on a normal scheduler takes at most [`NORMAL_TURN`] bytes, delivers the frames
//!   with `enif_send` from that scheduler (no thread to wake), charges the work to the
//!   process by the clock, and stops before a frame longer than [`NORMAL_FRAME_MAX`];
//! - that frame is read otherwise: the process stops its port, feeds what the port had sent
//!   with [`reader_feed_dirty`], and reads the rest from the socket itself with
//!   [`reader_run_dirty`] on a dirty I/O scheduler, straight into the VM binary it is decoded
//!   from, waiting on `enif_select` between reads; once the frames are small again, the
//!   answer says `port` and the port reads on. [`reader_run`] also serves the deadlines.
//!
//! The socket is closed only once the VM's pollset let go of it: a reader that ends (or
//! whose process dies: the resource monitors it) deselects it with `ERL_NIF_SELECT_STOP` if
//! it was ever selected, and the `stop` callback drops the connection. A connection whose
//! listener is closing goes on alone on a thread of its own for its LAST and linger (see
//! [`Served::run_alone`]).

use crate::atoms;
use crate::deliver::Deliver;
use parking_lot::Mutex;
use rustler::sys::{
    enif_alloc_env, enif_alloc_resource, enif_free_env, enif_get_resource, enif_init_resource_type,
    enif_make_resource, enif_make_tuple_from_array, enif_monitor_process, enif_release_resource,
    enif_select, enif_self, enif_send, ErlNifEnv, ErlNifEvent, ErlNifMonitor, ErlNifPid,
    ErlNifResourceDown, ErlNifResourceDtor, ErlNifResourceFlags, ErlNifResourceStop,
    ErlNifResourceType, ErlNifResourceTypeInit, ERL_NIF_SELECT_READ, ERL_NIF_SELECT_STOP,
};
use rustler::{Atom, Encoder, Env, NifResult, Term};
use std::collections::HashMap;
use std::ffi::c_void;
use std::os::fd::RawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use teleport_core::listener::{Driver, Fed, Served, Turn};

/// What a run on a normal scheduler reads at most (one read may take a little more): the
/// frames in it are decoded and sent within a millisecond or two, even when they are
/// thousands of tiny ones; the run is charged by the clock (see `crate::consume_time`).
pub const NORMAL_TURN: usize = 64 * 1024;

/// Frames longer than this are read and decoded on a dirty I/O scheduler: decoding one dense
/// with small terms could hold a normal scheduler for more than a millisecond.
pub const NORMAL_FRAME_MAX: usize = 256 * 1024;

/// What a run on a dirty scheduler reads at most before it answers.
const DIRTY_TURN: usize = 8 * 1024 * 1024;

/// How long a run on a dirty scheduler waits for the rest of a large frame, in all
/// ([`finish_large`]), and at most at a time (ms).
const DIRTY_HOLD: Duration = Duration::from_millis(20);
const DIRTY_POLL: Duration = Duration::from_millis(2);

/// The reader resource type, opened when the library loads.
static READER_TYPE: AtomicPtr<ErlNifResourceType> = AtomicPtr::new(std::ptr::null_mut());

/// Opens the reader resource type, with the `stop` callback `enif_select` needs and the
/// `down` callback that ends a reader whose process died. Call from the library's `load`.
pub fn open_type(env: Env) -> bool {
    let init = ErlNifResourceTypeInit {
        dtor: reader_dtor as *const ErlNifResourceDtor,
        stop: reader_stop as *const ErlNifResourceStop,
        down: reader_down as *const ErlNifResourceDown,
        members: 3,
        dyncall: std::ptr::null(),
    };
    let mut tried = ErlNifResourceFlags::ERL_NIF_RT_CREATE;
    // SAFETY: called from `load` with its env; the name is NUL-terminated and static.
    let rt = unsafe {
        enif_init_resource_type(
            env.as_c_arg(),
            c"teleport_reader".as_ptr(),
            &init,
            ErlNifResourceFlags::ERL_NIF_RT_CREATE,
            &mut tried,
        )
    };
    READER_TYPE.store(rt as *mut ErlNifResourceType, Ordering::Release);
    !rt.is_null()
}

/// Connection id to its reader process and its turns' lengths, while it reads.
type Live = Mutex<HashMap<u64, (Pid, Arc<Turns>)>>;

/// The longest turn a reader ran on a normal scheduler, in the CPU time of its thread and in
/// wall-clock time (which the OS's preemption of a scheduler thread stretches too), in
/// microseconds. A dirty turn may be long, and is not counted.
#[derive(Debug, Default)]
pub struct Turns {
    cpu_us: AtomicU64,
    wall_us: AtomicU64,
}

impl Turns {
    fn note(&self, cpu: Duration, wall: Duration) {
        self.cpu_us
            .fetch_max(cpu.as_micros() as u64, Ordering::Relaxed);
        self.wall_us
            .fetch_max(wall.as_micros() as u64, Ordering::Relaxed);
    }

    /// `(cpu_us, wall_us)` of the longest turn so far.
    pub fn longest(&self) -> (u64, u64) {
        (
            self.cpu_us.load(Ordering::Relaxed),
            self.wall_us.load(Ordering::Relaxed),
        )
    }
}

/// The CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill; the clock always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A process id, as the VM gives it.
#[derive(Clone, Copy)]
pub struct Pid(pub ErlNifPid);

// SAFETY: an `ErlNifPid` is a plain term value, meaningful on any thread.
unsafe impl Send for Pid {}

/// The readers of one runtime: where new connections are announced, and which process reads
/// which connection.
pub struct Readers {
    /// The runtime's owner, told of each new connection.
    owner: Pid,
    live: Arc<Live>,
}

impl Readers {
    /// Readers whose connections are announced to `owner`.
    pub fn new(owner: ErlNifPid) -> Readers {
        Readers {
            owner: Pid(owner),
            live: Arc::default(),
        }
    }

    /// The reader process of connection `id`, if it has one now, and its longest turn.
    pub fn reader_of(&self, id: u64) -> Option<(ErlNifPid, (u64, u64))> {
        self.live
            .lock()
            .get(&id)
            .map(|(pid, turns)| (pid.0, turns.longest()))
    }
}

impl Driver<Deliver> for Readers {
    fn drive(&self, served: Served<Deliver>) -> Result<(), Served<Deliver>> {
        let reader = Arc::new(Reader {
            fd: served.fd(),
            id: served.id(),
            served: Mutex::new(Some(served)),
            selected: AtomicBool::new(false),
            ending: AtomicBool::new(false),
            live: self.live.clone(),
            turns: Arc::default(),
        });
        // SAFETY: the resource holds one `Arc<Reader>` (see `Reader::from_obj`); the message
        // term holds the resource, and our own reference is released once it does. This runs
        // on the handshake thread, which the VM did not make: `enif_send` takes a null env.
        unsafe {
            let rt = READER_TYPE.load(Ordering::Acquire);
            let obj = enif_alloc_resource(rt, std::mem::size_of::<*const Reader>());
            (obj as *mut *const Reader).write(Arc::into_raw(reader.clone()));
            let env = enif_alloc_env();
            let mut parts = [
                atoms::teleport_accepted().as_c_arg(),
                enif_make_resource(env, obj),
            ];
            enif_release_resource(obj);
            let msg = enif_make_tuple_from_array(env, parts.as_mut_ptr(), 2);
            let sent = enif_send(std::ptr::null_mut(), &self.owner.0, env, msg) != 0;
            // No owner: the connection comes back, taken before the env (and with it the
            // resource) is freed.
            let back = if sent {
                None
            } else {
                reader.served.lock().take()
            };
            enif_free_env(env);
            back.map_or(Ok(()), Err)
        }
    }

    fn closing(&self) {
        let pids: Vec<Pid> = self.live.lock().values().map(|(pid, _)| *pid).collect();
        // Called where the listener closes: a NIF (a scheduler) or the runtime's destructor.
        // A thread of its own can send from anywhere.
        let _ = std::thread::Builder::new()
            .name("teleport_close".into())
            .spawn(move || {
                // SAFETY: a process-independent env, on a thread the VM did not make.
                unsafe {
                    let env = enif_alloc_env();
                    for pid in &pids {
                        enif_send(
                            std::ptr::null_mut(),
                            &pid.0,
                            env,
                            atoms::teleport_tick().as_c_arg(),
                        );
                    }
                    enif_free_env(env);
                }
            });
    }
}

/// One connection as its reader process holds it.
struct Reader {
    fd: RawFd,
    id: u64,
    /// The connection, until it ends.
    served: Mutex<Option<Served<Deliver>>>,
    /// Its socket went into the VM's pollset: it may be closed only once `stop` was called.
    selected: AtomicBool,
    /// Set by whoever ends it first (its process, the `down` callback).
    ending: AtomicBool,
    /// Its runtime's readers, which it leaves as it ends.
    live: Arc<Live>,
    /// Its longest turn.
    turns: Arc<Turns>,
}

impl Reader {
    /// The reader a resource object holds.
    ///
    /// # Safety
    /// `obj` must be a live object of [`READER_TYPE`], written by [`Readers::drive`].
    unsafe fn from_obj<'a>(obj: *const c_void) -> &'a Reader {
        &**(obj as *const *const Reader)
    }

    /// Ends the reading: deselects the socket (its `stop` callback then drops the
    /// connection), or drops it here if the VM never watched it. Once only.
    ///
    /// # Safety
    /// `env` must be the env of the running NIF or callback, and `obj` this reader's object.
    unsafe fn end(&self, env: *mut ErlNifEnv, obj: *const c_void) {
        if self.ending.swap(true, Ordering::SeqCst) {
            return;
        }
        self.live.lock().remove(&self.id);
        let undefined = atoms::undefined().as_c_arg();
        if self.selected.load(Ordering::SeqCst)
            && enif_select(
                env,
                self.fd as ErlNifEvent,
                ERL_NIF_SELECT_STOP,
                obj as *mut c_void,
                std::ptr::null(),
                undefined,
            ) >= 0
        {
            return; // `stop` drops it, now or once the VM let go of the socket
        }
        self.let_go();
    }

    /// Drops the connection, or, if its listener is closing, lets it say LAST and linger on a
    /// thread of its own.
    fn let_go(&self) {
        let Some(mut served) = self.served.lock().take() else {
            return;
        };
        if served.closing() {
            // Without a thread it ends here, dropped with the closure, without its linger.
            let _ = std::thread::Builder::new()
                .name("teleport_linger".into())
                .spawn(move || served.run_alone());
        } else {
            served.abandon("its reader process ended");
        }
    }
}

/// The resource's destructor: the last reference is gone.
unsafe extern "C" fn reader_dtor(_env: *mut ErlNifEnv, obj: *mut c_void) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let reader = Arc::from_raw(*(obj as *const *const Reader));
        reader.let_go();
    }));
}

/// The VM let go of the socket after `ERL_NIF_SELECT_STOP`: it may be closed now.
unsafe extern "C" fn reader_stop(
    _env: *mut ErlNifEnv,
    obj: *mut c_void,
    _event: ErlNifEvent,
    _is_direct_call: i32,
) {
    let _ = catch_unwind(AssertUnwindSafe(|| Reader::from_obj(obj).let_go()));
}

/// The reader's process died without ending it (killed, or crashed).
unsafe extern "C" fn reader_down(
    env: *mut ErlNifEnv,
    obj: *mut c_void,
    _pid: *const ErlNifPid,
    _mon: *const ErlNifMonitor,
) {
    let _ = catch_unwind(AssertUnwindSafe(|| Reader::from_obj(obj).end(env, obj)));
}

/// The reader object in `term`, or `badarg`.
fn object(env: Env, term: Term) -> NifResult<*const c_void> {
    let mut obj = std::ptr::null();
    let rt = READER_TYPE.load(Ordering::Acquire);
    // SAFETY: a plain lookup; the object lives as long as `term` does (this call).
    if unsafe { enif_get_resource(env.as_c_arg(), term.as_c_arg(), rt, &mut obj) } == 0 {
        return Err(rustler::Error::BadArg);
    }
    Ok(obj)
}

/// Makes the calling process the reader of the connection `Reader` (it is monitored: if it
/// dies, the connection ends) and returns the connection's id. Call once, then
/// [`reader_fd`] for its port, and `reader_run(Reader, tick)`.
#[rustler::nif]
fn reader_attach(env: Env, reader: Term) -> NifResult<u64> {
    let obj = object(env, reader)?;
    // SAFETY: `obj` is a live reader object; the pid and monitor are written by the VM.
    unsafe {
        let r = Reader::from_obj(obj);
        let mut pid = std::mem::MaybeUninit::<ErlNifPid>::uninit();
        enif_self(env.as_c_arg(), pid.as_mut_ptr());
        let pid = pid.assume_init();
        let mut mon = std::mem::MaybeUninit::<ErlNifMonitor>::uninit();
        enif_monitor_process(env.as_c_arg(), obj, &pid, mon.as_mut_ptr());
        if !r.ending.load(Ordering::SeqCst) {
            r.live.lock().insert(r.id, (Pid(pid), r.turns.clone()));
        }
        Ok(r.id)
    }
}

/// A turn of the connection `Reader` on a normal scheduler; `Event` is `read` (the socket is
/// readable: while a large frame is read from it) or `tick` (a deadline passed, the listener
/// closed, or the first turn). Answers `{wait, Timeout, port | dirty}` (`port`: the port
/// reads what comes; `dirty`: the socket is watched, call `reader_run_dirty` on its `select`
/// message; either way again after `Timeout` ms or on `teleport_tick`), `more` (call again
/// soon), `dirty` (call `reader_run_dirty` next) or `done` (it ended).
#[rustler::nif]
fn reader_run<'a>(env: Env<'a>, reader: Term<'a>, event: Atom) -> NifResult<Term<'a>> {
    run(env, reader, event, false)
}

/// [`reader_run`] on a dirty I/O scheduler: reads frames of any length.
#[rustler::nif(schedule = "DirtyIo")]
fn reader_run_dirty<'a>(env: Env<'a>, reader: Term<'a>, event: Atom) -> NifResult<Term<'a>> {
    run(env, reader, event, true)
}

/// The gen_server timeout until `deadline` (ms, rounded up), or `infinity`.
fn timeout_term(env: Env<'_>, deadline: Option<Instant>) -> Term<'_> {
    match deadline {
        Some(d) => {
            let ms = d
                .saturating_duration_since(Instant::now())
                .as_micros()
                .div_ceil(1000);
            (ms as u64).encode(env)
        }
        None => atoms::infinity().encode(env),
    }
}

/// A duplicate of the connection's socket, for the reader's port to read (`gen_tcp:fdopen/2`):
/// the port's reads are served by the schedulers' own polling, where an `enif_select`'s
/// readiness always passes through the VM's poll thread, which then wakes a scheduler. The
/// port owns (and closes) the duplicate; large frames are still read from the socket itself.
/// Answers the descriptor, or `closed` if the connection ended already.
#[rustler::nif]
fn reader_fd<'a>(env: Env<'a>, reader: Term<'a>) -> NifResult<Term<'a>> {
    let obj = object(env, reader)?;
    // SAFETY: `obj` is a live reader object for this call.
    let r = unsafe { Reader::from_obj(obj) };
    // Under the lock, and only while the connection lives: its socket is open then.
    let guard = r.served.lock();
    let Some(served) = guard.as_ref().filter(|_| !r.ending.load(Ordering::SeqCst)) else {
        return Ok(atoms::closed().encode(env));
    };
    // SAFETY: a plain syscall on an open socket.
    let fd = unsafe { libc::fcntl(served.fd(), libc::F_DUPFD_CLOEXEC, 0) };
    Ok(if fd < 0 {
        atoms::closed().encode(env)
    } else {
        fd.encode(env)
    })
}

/// What the reader's port read from the socket (`Data`: a binary; `eof` once the port saw
/// the stream end; `{error, Reason}` once it failed), fed to the connection on a normal
/// scheduler. Answers `{wait, Timeout, port}` (all taken), `{more, Rest}` (the turn's budget
/// is spent: feed `Rest` next), `{dirty, Rest}` (a large frame comes: stop the port, feed
/// `Rest` and what the port still sent with `reader_feed_dirty/2`, then read with
/// `reader_run_dirty/2`) or `done`.
#[rustler::nif]
fn reader_feed<'a>(env: Env<'a>, reader: Term<'a>, data: Term<'a>) -> NifResult<Term<'a>> {
    feed(env, reader, data, false)
}

/// [`reader_feed`] on a dirty I/O scheduler: takes all of `Data`, frames of any length.
#[rustler::nif(schedule = "DirtyIo")]
fn reader_feed_dirty<'a>(env: Env<'a>, reader: Term<'a>, data: Term<'a>) -> NifResult<Term<'a>> {
    feed(env, reader, data, true)
}

fn feed<'a>(env: Env<'a>, reader: Term<'a>, data: Term<'a>, dirty: bool) -> NifResult<Term<'a>> {
    let obj = object(env, reader)?;
    // The port's end of the stream: `eof`, or `{error, Reason}` (a reset, a timeout).
    let why: String;
    let (bin, end) = match data.decode::<rustler::Binary>() {
        Ok(bin) => (Some(bin), Fed::Open),
        Err(_) if data.decode::<Atom>().is_ok_and(|a| a == atoms::eof()) => (None, Fed::Eof),
        Err(_) => match data.decode::<(Atom, Atom)>() {
            Ok((tag, reason)) if tag == atoms::error() => {
                why = reason.to_term(env).atom_to_string()?;
                (None, Fed::Failed(&why))
            }
            _ => return Err(rustler::Error::BadArg),
        },
    };
    let bytes = bin.as_ref().map_or(&[][..], |b| b.as_slice());
    // SAFETY: `obj` is a live reader object for this call.
    let r = unsafe { Reader::from_obj(obj) };
    let mut guard = r.served.lock();
    let served = match guard.as_mut() {
        Some(served) if !r.ending.load(Ordering::SeqCst) => served,
        _ => return Ok(atoms::done().encode(env)),
    };
    let (budget, large_max) = if dirty {
        (usize::MAX, usize::MAX)
    } else {
        (NORMAL_TURN, NORMAL_FRAME_MAX)
    };
    let (turn, took) = timed_turn(env, r, served, dirty, |served, now| {
        served.feed(now, bytes, end, budget, large_max)
    });
    // What the turn did not take: the rest of `Data` (or its end again).
    let rest = |env: Env<'a>| -> NifResult<Term<'a>> {
        match &bin {
            Some(b) => Ok(b.make_subbinary(took, b.len() - took)?.encode(env)),
            None => Ok(data),
        }
    };
    Ok(match turn {
        Turn::Done => {
            drop(guard);
            // SAFETY: `obj` is this reader's object, `env` this call's.
            unsafe { r.end(env.as_c_arg(), obj) };
            atoms::done().encode(env)
        }
        Turn::More => (atoms::more(), rest(env)?).encode(env),
        Turn::Large => (atoms::dirty(), rest(env)?).encode(env),
        Turn::Wait(deadline) => {
            (atoms::wait(), timeout_term(env, deadline), atoms::port()).encode(env)
        }
    })
}

/// Ends the reading of `Reader` now (its process is stopping): `ok`.
#[rustler::nif]
fn reader_detach(env: Env, reader: Term) -> NifResult<Atom> {
    let obj = object(env, reader)?;
    // SAFETY: `obj` is a live reader object, `env` this call's.
    unsafe { Reader::from_obj(obj).end(env.as_c_arg(), obj) };
    Ok(atoms::ok())
}

/// On a dirty I/O scheduler, a large frame that is not all there yet is waited for (a
/// little at a time, at most [`DIRTY_HOLD`] in all) rather than handed back to the reader
/// process: each hand-back is a `select` message, a turn of the process and two moves
/// between schedulers, per socket buffer of the frame.
fn finish_large(served: &mut Served<Deliver>, mut turn: Turn, start: Instant) -> Turn {
    while let Turn::Wait(deadline) = turn {
        let in_large = served
            .next_frame_len()
            .is_some_and(|n| n > NORMAL_FRAME_MAX);
        let now = Instant::now();
        if !in_large || now.saturating_duration_since(start) >= DIRTY_HOLD {
            break;
        }
        if deadline.is_some_and(|d| d <= now) {
            turn = Turn::from(served.tick(now));
            continue;
        }
        if !served.wait_readable(DIRTY_POLL) {
            break; // nothing came: the process waits instead
        }
        turn = served.read(Instant::now(), DIRTY_TURN, usize::MAX);
    }
    turn
}

/// Runs `work` on `served` as a turn of `r`: the sink delivers from this call's env, and a
/// turn on a normal scheduler is charged to the process by the clock and counted in its
/// longest turn (a dirty one may be long, and is neither). By the clock, because a turn's
/// cost is mostly per frame, not per byte: a turn of 64 KB of tiny frames, charged as its
/// bytes, let the process run six of them, 10 ms, before it was scheduled out.
fn timed_turn<T>(
    env: Env,
    r: &Reader,
    served: &mut Served<Deliver>,
    dirty: bool,
    work: impl FnOnce(&mut Served<Deliver>, Instant) -> T,
) -> T {
    let now = Instant::now();
    let cpu = if dirty { Duration::ZERO } else { thread_cpu() };
    // SAFETY: this call's env, set back to null below before the call returns.
    unsafe { served.sink_mut().caller(env.as_c_arg()) };
    let done = work(served, now);
    unsafe { served.sink_mut().caller(std::ptr::null_mut()) };
    if !dirty {
        let wall = now.elapsed();
        crate::consume_time(env, wall);
        r.turns.note(thread_cpu().saturating_sub(cpu), wall);
    }
    done
}

/// A turn of the reader in `reader`, on a dirty scheduler or not (see [`reader_run`]).
fn run<'a>(env: Env<'a>, reader: Term<'a>, event: Atom, dirty: bool) -> NifResult<Term<'a>> {
    let obj = object(env, reader)?;
    // SAFETY: `obj` is a live reader object for this call.
    let r = unsafe { Reader::from_obj(obj) };
    let mut guard = r.served.lock();
    // Once it is ending, nothing may watch the socket again (that would cancel the stop).
    let served = match guard.as_mut() {
        Some(served) if !r.ending.load(Ordering::SeqCst) => served,
        _ => return Ok(atoms::done().encode(env)),
    };
    let (budget, large_max) = if dirty {
        (DIRTY_TURN, usize::MAX)
    } else {
        (NORMAL_TURN, NORMAL_FRAME_MAX)
    };
    let turn = timed_turn(env, r, served, dirty, |served, now| {
        let turn = if event == atoms::read() {
            served.read(now, budget, large_max)
        } else {
            Turn::from(served.tick(now))
        };
        if dirty {
            finish_large(served, turn, now)
        } else {
            turn
        }
    });
    let answer = match turn {
        Turn::More => atoms::more().encode(env),
        Turn::Large => atoms::dirty().encode(env),
        Turn::Wait(deadline) => {
            let large = served
                .next_frame_len()
                .is_some_and(|n| n > NORMAL_FRAME_MAX);
            drop(guard);
            if !large {
                // Small frames next: the port reads them (see `reader_feed`).
                return Ok((atoms::wait(), timeout_term(env, deadline), atoms::port()).encode(env));
            }
            // SAFETY: `obj` is this reader's object and stays alive while selected (the VM
            // keeps a reference); the message goes to the calling process.
            let watched = unsafe {
                r.selected.store(true, Ordering::SeqCst);
                enif_select(
                    env.as_c_arg(),
                    r.fd as ErlNifEvent,
                    ERL_NIF_SELECT_READ,
                    obj as *mut c_void,
                    std::ptr::null(),
                    atoms::undefined().as_c_arg(),
                ) >= 0
            };
            if !watched {
                tracing::error!(
                    id = r.id,
                    reason = "enif_select failed",
                    "reader_select_failed"
                );
                unsafe { r.end(env.as_c_arg(), obj) };
                return Ok(atoms::done().encode(env));
            }
            (atoms::wait(), timeout_term(env, deadline), atoms::dirty()).encode(env)
        }
        Turn::Done => {
            drop(guard);
            // SAFETY: as above; ending drops the connection (now, or in `stop`).
            unsafe { r.end(env.as_c_arg(), obj) };
            atoms::done().encode(env)
        }
    };
    Ok(answer)
}
