//! `pool_*`: a pool of outgoing connections to one peer node, a resource kept in the
//! `teleport_pools` ETS table, and the send path that encodes straight into a frame.

use crate::codec_encode::{fallback, write_atom, write_term, OverBudget, NORMAL_BUDGET};
use crate::local_id::write_remote;
use crate::runtime::{maybe_addr, Runtime};
use crate::term_word;
use rustler::sys::{
    enif_alloc_env, enif_free_env, enif_hash, enif_inspect_binary, enif_is_atom, enif_is_pid,
    enif_make_copy, enif_self, ErlNifBinary, ErlNifEnv, ErlNifHash, ErlNifPid, ErlNifTerm,
};
use rustler::types::binary::NewBinary;
use rustler::{Atom, Binary, Encoder, Env, NifResult, OwnedEnv, ResourceArc, Term};
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use teleport_core::conn::{PeerConfig, SendError, Status};
use teleport_core::frame::{Draft, Kind};
use teleport_core::out_frame::{OutFrame, Shared};
use teleport_core::pool::Pool;

use crate::atoms;

/// A pool, as Erlang holds it.
pub struct PoolRes {
    pool: Pool,
}

#[rustler::resource_impl]
impl rustler::Resource for PoolRes {}

/// The VM binaries a queued frame references, kept alive by a private env until written.
struct Kept {
    env: *mut ErlNifEnv,
    parts: Vec<(*const u8, usize)>,
}

// SAFETY: the env is process-independent; the binaries it holds never move or change, and
// they are only read, by whichever threads write the frames that share them.
unsafe impl Send for Kept {}
unsafe impl Sync for Kept {}

impl Kept {
    /// Copies the (refc) binary terms into a private env: a reference count each, no data.
    ///
    /// # Safety
    /// Every term of `shared` must be a live binary term of the calling NIF's env.
    unsafe fn new(shared: &[ErlNifTerm]) -> Kept {
        let env = enif_alloc_env();
        let parts = shared
            .iter()
            .map(|&t| {
                let copy = enif_make_copy(env, t);
                let mut bin = MaybeUninit::<ErlNifBinary>::uninit();
                if enif_inspect_binary(env, copy, bin.as_mut_ptr()) == 0 {
                    return (std::ptr::null(), 0);
                }
                let bin = bin.assume_init();
                (bin.data as *const u8, bin.size)
            })
            .collect();
        Kept { env, parts }
    }
}

impl Shared for Kept {
    fn bytes(&self, index: u32) -> &[u8] {
        match self.parts.get(index as usize) {
            Some(&(ptr, len)) if !ptr.is_null() => unsafe { std::slice::from_raw_parts(ptr, len) },
            _ => &[],
        }
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        unsafe { enif_free_env(self.env) };
    }
}

/// Starts a pool of `Size` connections to node `Peer` at `Ip:Port`. When the peer refuses its
/// connections (its listener moved or forgot us), the calling process (the pool's owner) gets
/// `{teleport_pool_stale, Peer}` and should find the listener again and retarget the pool.
#[rustler::nif]
#[allow(clippy::too_many_arguments)]
fn pool_start<'a>(
    env: Env<'a>,
    rt: ResourceArc<Runtime>,
    peer: Binary<'a>,
    ip: String,
    port: u16,
    cookie: Binary<'a>,
    size: usize,
    max_queue_bytes: usize,
    timeouts_ms: (u64, u64),
) -> NifResult<Term<'a>> {
    let Ok(ip_addr) = ip.parse::<IpAddr>() else {
        return Ok((atoms::error(), (atoms::bad_ip(), ip)).encode(env));
    };
    let cfg = PeerConfig {
        me: rt.me.lock().clone(),
        peer: peer.as_slice().to_vec(),
        max_queue_bytes,
        connect_timeout: Duration::from_millis(timeouts_ms.0),
        handshake_timeout: Duration::from_millis(timeouts_ms.1),
        sock_opts: rt.sock_opts.clone(),
        thread_nice: rt.thread_nice,
        tls: rt.tls.clone(),
    };
    let stats = rt.peers.stats(peer.as_slice());
    let addr = SocketAddr::new(ip_addr, port);
    match Pool::start(cfg, addr, cookie.as_slice(), size, stats) {
        Ok(pool) => {
            let (owner, name) = (env.pid(), peer.as_slice().to_vec());
            // Runs on a writer thread, never a scheduler: an OwnedEnv may send from there.
            pool.on_stale(move || {
                let mut msg = OwnedEnv::new();
                // An owner that is gone (teleport stopping) has nothing left to do about it.
                let _ = msg.send_and_clear(&owner, |env| {
                    let mut bin = NewBinary::new(env, name.len());
                    bin.as_mut_slice().copy_from_slice(&name);
                    (atoms::teleport_pool_stale(), Binary::from(bin)).encode(env)
                });
            });
            Ok((atoms::ok(), ResourceArc::new(PoolRes { pool })).encode(env))
        }
        Err(e) => Ok((atoms::error(), e.to_string()).encode(env)),
    }
}

/// Refuses messages whose frame body is over `MaxFrameBytes` (the peer's `max_frame_bytes`,
/// learnt at discovery) with `too_large`, before a handshake says the limit again.
#[rustler::nif]
fn pool_limit_frames(pool: ResourceArc<PoolRes>, max_frame_bytes: u64) -> Atom {
    pool.pool
        .limit_frames(usize::try_from(max_frame_bytes).unwrap_or(usize::MAX));
    atoms::ok()
}

/// Points the pool at `Ip:Port`, where its peer listens now, proving `Cookie` (the one
/// shared with the peer now); what the pool holds goes there.
#[rustler::nif]
fn pool_retarget<'a>(
    env: Env<'a>,
    pool: ResourceArc<PoolRes>,
    ip: String,
    port: u16,
    cookie: Binary<'a>,
) -> NifResult<Term<'a>> {
    let Ok(ip_addr) = ip.parse::<IpAddr>() else {
        return Ok((atoms::error(), (atoms::bad_ip(), ip)).encode(env));
    };
    pool.pool
        .retarget(SocketAddr::new(ip_addr, port), cookie.as_slice());
    Ok(atoms::ok().encode(env))
}

/// Tears the pool down; queued messages are dropped and counted.
#[rustler::nif]
fn pool_close(pool: ResourceArc<PoolRes>) -> Atom {
    pool.pool.close();
    atoms::ok()
}

/// Per connection: `#{index, state, peer_addr, local_addr, queued_bytes, frames_in_queue,
/// unacked_frames, unacked_bytes, last_acked, msgs_out, bytes_out, writes, last_error,
/// connected_since, reconnects, sndbuf, recbuf}`
/// (`teleport:info/0` documents them).
#[rustler::nif]
fn pool_info<'a>(env: Env<'a>, pool: ResourceArc<PoolRes>) -> NifResult<Term<'a>> {
    let undefined = || atoms::undefined().encode(env);
    let mut out = Vec::new();
    for c in pool.pool.info() {
        let state = match c.status {
            Status::Down => atoms::down(),
            Status::Connecting => atoms::connecting(),
            Status::Up => atoms::up(),
            Status::Closed => atoms::closed(),
        };
        let last_error = c.last_error.map_or_else(undefined, |e| e.encode(env));
        let since = c.connected_since.map_or_else(undefined, |t| t.encode(env));
        let (sndbuf, recbuf) = match c.buffers {
            Some((s, r)) => (s.encode(env), r.encode(env)),
            None => (undefined(), undefined()),
        };
        let map = Term::map_new(env)
            .map_put(atoms::index(), c.index)?
            .map_put(atoms::state(), state)?
            .map_put(atoms::peer_addr(), maybe_addr(env, Some(c.peer_addr)))?
            .map_put(atoms::local_addr(), maybe_addr(env, c.local_addr))?
            .map_put(atoms::queued_bytes(), c.queued_bytes)?
            .map_put(atoms::frames_in_queue(), c.frames_in_queue)?
            .map_put(atoms::unacked_frames(), c.unacked_frames)?
            .map_put(atoms::unacked_bytes(), c.unacked_bytes)?
            .map_put(atoms::last_acked(), c.last_acked)?
            .map_put(atoms::msgs_out(), c.msgs_out)?
            .map_put(atoms::bytes_out(), c.bytes_out)?
            .map_put(atoms::writes(), c.writes)?
            .map_put(atoms::last_error(), last_error)?
            .map_put(atoms::connected_since(), since)?
            .map_put(atoms::reconnects(), c.reconnects)?
            .map_put(atoms::sndbuf(), sndbuf)?
            .map_put(atoms::recbuf(), recbuf)?;
        out.push(map);
    }
    Ok(out.encode(env))
}

/// Sends `Msg` to `Dest` (a pid, or the atom of a name registered on the peer) over the
/// pool: `ok | busy | closed | too_large`, or `dirty` when the message is too big to
/// encode on a normal scheduler. The connection is the one of (caller, `Key`): `Key` is
/// `Dest` itself, except for a call request, which is keyed by the server it calls so that
/// it stays behind the casts sent to that server.
#[rustler::nif]
fn pool_send<'a>(
    env: Env<'a>,
    pool: ResourceArc<PoolRes>,
    dest: Term<'a>,
    key: Term<'a>,
    msg: Term<'a>,
) -> NifResult<Term<'a>> {
    let done = unsafe { send(env, &pool, dest, key, msg, Some(NORMAL_BUDGET))? };
    Ok(crate::normal_answer(env, done))
}

/// [`pool_send`] on a dirty CPU scheduler: `{Result, Reductions}`.
#[rustler::nif(schedule = "DirtyCpu")]
fn pool_send_dirty<'a>(
    env: Env<'a>,
    pool: ResourceArc<PoolRes>,
    dest: Term<'a>,
    key: Term<'a>,
    msg: Term<'a>,
) -> NifResult<Term<'a>> {
    let done = unsafe { send(env, &pool, dest, key, msg, None)? };
    Ok(crate::dirty_answer(env, done))
}

/// Encodes the frame and hands it to the connection of this (sender, destination) pair.
///
/// # Safety
/// `env` must be the env of the calling NIF, and the terms its terms.
unsafe fn send(
    env: Env,
    pool: &PoolRes,
    dest: Term,
    key: Term,
    msg: Term,
    budget: Option<usize>,
) -> NifResult<Result<(Atom, usize), OverBudget>> {
    let (frame, work) = match encode_frame(env, dest, msg, budget)? {
        Ok(Some(done)) => done,
        Ok(None) => return Ok(Ok((atoms::too_large(), 0))),
        Err(over) => return Ok(Err(over)),
    };
    let hash = pair_hash(env.as_c_arg(), key.as_c_arg());
    Ok(Ok((enqueue(pool, hash, frame), work)))
}

/// Hands a frame to the pool, as `ok | busy | closed | too_large` (a stale pool is `closed`
/// to the caller, which has teleport_server repair it).
fn enqueue(pool: &PoolRes, hash: u64, frame: OutFrame) -> Atom {
    match pool.pool.send(hash, frame) {
        Ok(()) => atoms::ok(),
        Err(SendError::Busy(_)) => atoms::busy(),
        Err(SendError::Closed(_) | SendError::Stale(_)) => atoms::closed(),
        Err(SendError::TooLarge(_)) => atoms::too_large(),
    }
}

/// Encodes a frame for `dest` (a pid or a name). `Ok(None)`: too large for a frame.
///
/// # Safety
/// `env` must be the env of the calling NIF, and the terms its terms.
unsafe fn encode_frame(
    env: Env,
    dest: Term,
    msg: Term,
    budget: Option<usize>,
) -> NifResult<Result<Option<(OutFrame, usize)>, OverBudget>> {
    let raw = env.as_c_arg();
    let kind = if enif_is_pid(raw, dest.as_c_arg()) != 0 {
        Kind::ToPid
    } else if enif_is_atom(raw, dest.as_c_arg()) != 0 {
        Kind::ToName
    } else {
        return Err(rustler::Error::BadArg);
    };
    let mut draft = Draft::writing_dest(kind, |d| match kind {
        // Most often a pid of the peer, which the node's kept encoding writes.
        Kind::ToPid => {
            let pid = dest.as_c_arg();
            if !(term_word::fast_ok(raw) && write_remote(raw, pid, d)) {
                fallback(raw, pid, d);
            }
        }
        Kind::ToName => write_atom(raw, dest.as_c_arg(), d),
    });
    let (shared, work) = match write_term(raw, msg.as_c_arg(), draft.term(), budget) {
        Ok(done) => done,
        Err(over) => return Ok(Err(over)),
    };
    let kept: Option<Arc<dyn Shared>> = if shared.is_empty() {
        None
    } else {
        Some(Arc::new(Kept::new(&shared)))
    };
    match draft.finish(kept) {
        Ok(frame) => Ok(Ok(Some((frame, work)))),
        Err(_) => Ok(Ok(None)),
    }
}

/// Sends `Msg` to the process registered as `Name` on each pool's node, encoding it once:
/// a list of results in the order of `Pools` (as for `pool_send`), or `dirty`.
#[rustler::nif]
fn pool_send_many<'a>(
    env: Env<'a>,
    pools: Vec<ResourceArc<PoolRes>>,
    name: Term<'a>,
    msg: Term<'a>,
) -> NifResult<Term<'a>> {
    let done = unsafe { send_many(env, &pools, name, msg, Some(NORMAL_BUDGET))? };
    Ok(crate::normal_answer(env, done))
}

/// [`pool_send_many`] on a dirty CPU scheduler: `{Results, Reductions}`.
#[rustler::nif(schedule = "DirtyCpu")]
fn pool_send_many_dirty<'a>(
    env: Env<'a>,
    pools: Vec<ResourceArc<PoolRes>>,
    name: Term<'a>,
    msg: Term<'a>,
) -> NifResult<Term<'a>> {
    let done = unsafe { send_many(env, &pools, name, msg, None)? };
    Ok(crate::dirty_answer(env, done))
}

/// # Safety
/// `env` must be the env of the calling NIF, and the terms its terms.
unsafe fn send_many(
    env: Env,
    pools: &[ResourceArc<PoolRes>],
    name: Term,
    msg: Term,
    budget: Option<usize>,
) -> NifResult<Result<(Vec<Atom>, usize), OverBudget>> {
    if enif_is_atom(env.as_c_arg(), name.as_c_arg()) == 0 {
        return Err(rustler::Error::BadArg);
    }
    let (frame, work) = match encode_frame(env, name, msg, budget)? {
        Ok(Some(done)) => done,
        Ok(None) => return Ok(Ok((vec![atoms::too_large(); pools.len()], 0))),
        Err(over) => return Ok(Err(over)),
    };
    let hash = pair_hash(env.as_c_arg(), name.as_c_arg());
    let results = pools
        .iter()
        .map(|pool| enqueue(pool, hash, frame.duplicate()))
        .collect();
    Ok(Ok((results, work)))
}

/// A hash of (calling process, ordering key): one pair, one connection.
///
/// # Safety
/// `env` must be the process-bound env of the calling NIF and `dest` a term of it.
unsafe fn pair_hash(env: *mut ErlNifEnv, dest: ErlNifTerm) -> u64 {
    let mut me = MaybeUninit::<ErlNifPid>::uninit();
    let salt = if enif_self(env, me.as_mut_ptr()).is_null() {
        0
    } else {
        let me = rustler::sys::enif_make_pid(env, me.assume_init());
        enif_hash(ErlNifHash::ERL_NIF_INTERNAL_HASH, me, 0)
    };
    enif_hash(ErlNifHash::ERL_NIF_INTERNAL_HASH, dest, salt)
}
