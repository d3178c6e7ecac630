//! The receiving end of an incoming connection: frames become terms in a private env and are
//! delivered with `enif_send`, from the scheduler of the connection's reader process (see
//! [`crate::reader`]), which hands its env over for the call.
//!
//! The peer has authenticated, so its frames are decoded in trusted mode (atoms are made as
//! disterl makes them). A destination that does not exist drops the message silently, as
//! disterl does; a frame that does not decode closes the connection.

use crate::codec_decode;
use rustler::sys::{
    enif_alloc_binary, enif_alloc_env, enif_binary_to_term, enif_clear_env, enif_free_env,
    enif_get_local_pid, enif_inspect_binary, enif_make_binary, enif_make_sub_binary,
    enif_release_binary, enif_send, enif_whereis_pid, ErlNifBinary, ErlNifEnv, ErlNifPid,
    ErlNifTerm, ERL_NIF_BIN2TERM_SAFE,
};
use std::mem::MaybeUninit;
use teleport_core::frame::{Header, Kind};
use teleport_core::pump::Sink;

/// A VM binary being filled by a reader, handed over whole to [`Deliver::frame_owned`].
pub struct BinBuf(Option<ErlNifBinary>);

// SAFETY: a binary from `enif_alloc_binary` is plain memory owned by whoever holds it.
unsafe impl Send for BinBuf {}

impl AsMut<[u8]> for BinBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        match &mut self.0 {
            Some(b) => unsafe { std::slice::from_raw_parts_mut(b.data, b.size) },
            None => &mut [],
        }
    }
}

impl Drop for BinBuf {
    fn drop(&mut self) {
        if let Some(mut b) = self.0.take() {
            unsafe { enif_release_binary(&mut b) };
        }
    }
}

/// Delivers one connection's frames.
pub struct Deliver {
    env: *mut ErlNifEnv,
    /// The env of the NIF call that reads the connection now (null between calls, and on a
    /// thread the VM did not make).
    caller: *mut ErlNifEnv,
}

// SAFETY: the env is process-independent and used only by whoever holds `Deliver` (behind
// its reader's lock); `caller` is set only for the length of a NIF call, on its thread.
unsafe impl Send for Deliver {}

impl Deliver {
    /// A deliverer with its own process-independent env.
    pub fn new() -> Deliver {
        Deliver {
            env: unsafe { enif_alloc_env() },
            caller: std::ptr::null_mut(),
        }
    }

    /// Where it is called from: the env of the NIF call reading the connection until
    /// `caller(null)` (`enif_send` needs it on a scheduler thread).
    ///
    /// # Safety
    /// `env` must be null, or the env of the NIF call now running on this thread, and be set
    /// back to null before that call returns.
    pub unsafe fn caller(&mut self, env: *mut ErlNifEnv) {
        self.caller = env;
    }

    /// The local pid a frame is for, or `None` if there is no such process. (The listener
    /// checked that `dest` is of its kind.)
    ///
    /// # Safety
    /// `self.env` must be live: it is, for the life of `self`.
    unsafe fn resolve(&self, kind: Kind, dest: &[u8]) -> Result<Option<ErlNifPid>, String> {
        let mut pid = MaybeUninit::<ErlNifPid>::uninit();
        let found = match kind {
            Kind::ToPid => {
                let mut t = ErlNifTerm::default();
                if enif_binary_to_term(self.env, dest.as_ptr(), dest.len(), &mut t, 0) != dest.len()
                {
                    return Err("destination is not a pid".into());
                }
                // A pid of another node (or of an earlier incarnation of this one) is no
                // local process: dropped, as disterl drops it.
                enif_get_local_pid(self.env, t, pid.as_mut_ptr())
            }
            Kind::ToName => {
                // Decoded in safe mode: a name that is no atom yet cannot be registered, and
                // no atom is made for it.
                let mut atom = ErlNifTerm::default();
                let flags = ERL_NIF_BIN2TERM_SAFE;
                if enif_binary_to_term(self.env, dest.as_ptr(), dest.len(), &mut atom, flags) == 0 {
                    return Ok(None);
                }
                // Its first argument is the calling thread's env (null off the VM's threads),
                // not the message's.
                enif_whereis_pid(self.caller, atom, pid.as_mut_ptr())
            }
        };
        Ok((found != 0).then(|| pid.assume_init()))
    }

    /// Decodes and sends the frame `header` heads in `body`; `whole` is the body's binary
    /// when it has one (its large binaries then become sub-binaries of it). The env is
    /// cleared after.
    ///
    /// # Safety
    /// `whole`, if given, must be a binary of `self.env` whose bytes are `body`.
    unsafe fn deliver(
        &mut self,
        header: Header,
        body: &[u8],
        whole: Option<ErlNifTerm>,
    ) -> Result<(), String> {
        let result = self.send(header, body, whole);
        enif_clear_env(self.env);
        result
    }

    /// # Safety
    /// As for [`Deliver::deliver`].
    unsafe fn send(
        &mut self,
        header: Header,
        body: &[u8],
        whole: Option<ErlNifTerm>,
    ) -> Result<(), String> {
        let Some(pid) = self.resolve(header.kind, header.dest(body))? else {
            return Ok(());
        };
        let term = header.term(body);
        let term_bin =
            whole.map(|bin| enif_make_sub_binary(self.env, bin, header.term_at(), term.len()));
        let (msg, _) = codec_decode::decode(self.env, term_bin, term, codec_decode::Source::Peer)
            .ok_or("message is not a valid external term")?;
        // A dead receiver is no error: the message is dropped, as disterl drops it.
        enif_send(self.caller, &pid, self.env, msg);
        Ok(())
    }
}

impl Drop for Deliver {
    fn drop(&mut self) {
        unsafe { enif_free_env(self.env) };
    }
}

impl Sink for Deliver {
    type Buf = BinBuf;

    fn alloc(&mut self, len: usize) -> Option<BinBuf> {
        let mut bin = MaybeUninit::<ErlNifBinary>::uninit();
        (unsafe { enif_alloc_binary(len, bin.as_mut_ptr()) } != 0)
            .then(|| BinBuf(Some(unsafe { bin.assume_init() })))
    }

    fn frame(&mut self, header: Header, body: &[u8]) -> Result<(), String> {
        unsafe { self.deliver(header, body, None) }
    }

    fn frame_owned(&mut self, header: Header, mut body: BinBuf) -> Result<(), String> {
        let Some(mut bin) = body.0.take() else {
            return Err("empty frame buffer".into());
        };
        unsafe {
            // The env owns the binary from here; its bytes stay put until the env clears.
            let whole = enif_make_binary(self.env, &mut bin);
            let mut view = MaybeUninit::<ErlNifBinary>::uninit();
            if enif_inspect_binary(self.env, whole, view.as_mut_ptr()) == 0 {
                enif_clear_env(self.env);
                return Err("frame buffer lost".into());
            }
            let view = view.assume_init();
            let slice = std::slice::from_raw_parts(view.data, view.size);
            self.deliver(header, slice, Some(whole))
        }
    }
}
