//! `recycle`: the buffers of small frames, handed back when a frame is dropped (once the
//! peer acknowledged it) and taken by the next frame encoded.
//!
//! A frame is encoded on the sending scheduler and dropped on a writer thread, so a
//! general-purpose allocator frees every buffer into another thread's cache: with glibc that
//! pair (`_int_malloc` on the schedulers, `_int_free` on the writer) was a quarter of the
//! sending node's CPU while 8 senders flooded their lanes with 100-byte messages. A shared
//! stack of spare buffers, behind one short lock, costs a fraction of that.

use crate::encode::Chunk;
use parking_lot::Mutex;

/// Buffers up to this capacity are kept: small frames' (a larger one is freed as usual).
/// Kept buffers never shrink, so this also bounds what a 100-byte frame may hold.
pub const KEEP_CAPACITY: usize = 1024;

/// Chunk lists up to this capacity are kept (a small frame has one or two chunks).
pub const KEEP_CHUNKS: usize = 8;

/// At most this many spares are kept: about as many frames as a flooded node has in flight
/// between two acks (with 1024, most came back to a full stack and were freed all the same).
/// A pair holds at most 1024 + 8 x 24 bytes (usually 256 + 96): at most 20 MB, usually 5 MB,
/// kept once a flood has passed, as an allocator would keep them.
pub const KEEP_COUNT: usize = 16384;

/// A stack of spare buffers.
#[derive(Debug, Default)]
pub struct Spares {
    stack: Mutex<Vec<(Vec<u8>, Vec<Chunk>)>>,
}

impl Spares {
    /// An empty stack.
    pub const fn new() -> Spares {
        Spares {
            stack: Mutex::new(Vec::new()),
        }
    }

    /// A spare pair of buffers, emptied, if there is one.
    pub fn take(&self) -> Option<(Vec<u8>, Vec<Chunk>)> {
        let (mut buf, mut chunks) = self.stack.lock().pop()?;
        buf.clear();
        chunks.clear();
        Some((buf, chunks))
    }

    /// Keeps `buf` and `chunks` for a later frame, unless they are large or enough are kept
    /// already (then they are freed).
    pub fn give(&self, buf: Vec<u8>, chunks: Vec<Chunk>) {
        if buf.capacity() == 0 || buf.capacity() > KEEP_CAPACITY || chunks.capacity() > KEEP_CHUNKS
        {
            return;
        }
        let mut stack = self.stack.lock();
        if stack.len() < KEEP_COUNT {
            stack.push((buf, chunks));
        }
    }

    /// How many spares are kept now.
    pub fn len(&self) -> usize {
        self.stack.lock().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The spares of every frame of the process.
pub static SPARES: Spares = Spares::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_buffer_comes_back_empty_with_its_capacity() {
        let spares = Spares::new();
        assert!(spares.take().is_none());
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(b"frame bytes");
        spares.give(buf, vec![Chunk::Bytes { start: 0, end: 11 }]);
        assert_eq!(spares.len(), 1);
        let (buf, chunks) = spares.take().expect("a spare");
        assert!(buf.is_empty() && buf.capacity() >= 256);
        assert!(chunks.is_empty() && chunks.capacity() >= 1);
        assert!(spares.is_empty());
    }

    #[test]
    fn large_or_surplus_buffers_are_freed() {
        let spares = Spares::new();
        spares.give(Vec::with_capacity(KEEP_CAPACITY + 1), Vec::new());
        spares.give(Vec::new(), Vec::new());
        assert!(spares.is_empty());
        for _ in 0..KEEP_COUNT + 10 {
            spares.give(Vec::with_capacity(16), Vec::new());
        }
        assert_eq!(spares.len(), KEEP_COUNT);
    }
}
