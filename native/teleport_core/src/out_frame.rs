//! A frame on its way out: the writer's bytes plus the binaries it references, written from
//! wherever the last partial write stopped, and kept (by reference, never copied) until the
//! peer acknowledges it.

use crate::encode::Chunk;
use crate::frame::SEQ_AT;
use std::io::IoSlice;
use std::sync::Arc;

/// Binaries a frame references without copying them, kept alive for as long as the frame.
/// The NIF implements it over a process-independent env that holds the VM's binaries.
/// Several frames may share one (a message encoded once for many nodes).
pub trait Shared: Send + Sync {
    /// The bytes of shared binary number `index`.
    fn bytes(&self, index: u32) -> &[u8];
}

/// A frame queued or being written.
pub struct OutFrame {
    buf: Vec<u8>,
    chunks: Vec<Chunk>,
    shared: Option<Arc<dyn Shared>>,
    len: usize,
    /// Bytes already written on the current connection.
    done: usize,
    /// Its number on its lane, once stamped (0 before).
    seq: u64,
    /// Some of it went out on some connection of the lane's session: the peer may have it.
    written: bool,
    /// It was written whole once (counted as sent then, and not again when resent).
    counted: bool,
}

impl std::fmt::Debug for OutFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutFrame")
            .field("len", &self.len)
            .field("done", &self.done)
            .field("seq", &self.seq)
            .finish()
    }
}

impl Drop for OutFrame {
    /// Its buffers go back to [`crate::recycle::SPARES`] for the next frame.
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let chunks = std::mem::take(&mut self.chunks);
        crate::recycle::SPARES.give(buf, chunks);
    }
}

impl OutFrame {
    /// A frame made of a writer's output, which must start with a frame header (as
    /// [`crate::frame::Draft`] makes it); `shared` supplies the [`Chunk::Shared`] parts. No
    /// chunks at all means that `buf` is the whole frame ([`crate::encode::Writer::finish_compact`]).
    pub fn new(buf: Vec<u8>, chunks: Vec<Chunk>, shared: Option<Arc<dyn Shared>>) -> Self {
        let len = if chunks.is_empty() {
            buf.len()
        } else {
            chunks
                .iter()
                .map(|c| match *c {
                    Chunk::Bytes { start, end } => end - start,
                    Chunk::Shared { len, .. } => len,
                })
                .sum()
        };
        OutFrame {
            buf,
            chunks,
            shared,
            len,
            done: 0,
            seq: 0,
            written: false,
            counted: false,
        }
    }

    /// A copy not yet written, for another connection: the small bytes are copied, the
    /// shared binaries are not.
    pub fn duplicate(&self) -> Self {
        OutFrame {
            buf: self.buf.clone(),
            chunks: self.chunks.clone(),
            shared: self.shared.clone(),
            len: self.len,
            done: 0,
            seq: 0,
            written: false,
            counted: false,
        }
    }

    /// Writes `seq`, its number on its lane, into the frame's header. Only a frame none of
    /// whose bytes are on the current connection may be stamped (or stamped anew).
    pub fn stamp(&mut self, seq: u64) {
        debug_assert_eq!(self.done, 0, "a frame is stamped before it is written");
        self.seq = seq;
        self.buf[SEQ_AT..SEQ_AT + 8].copy_from_slice(&seq.to_be_bytes());
    }

    /// Its number on its lane; 0 if not stamped since it was queued or last [`Self::unstamp`]ed.
    #[inline]
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Forgets the stamp: the frame gets the next number when it goes out again.
    #[inline]
    pub fn unstamp(&mut self) {
        self.seq = 0;
    }

    /// Whether any byte of it went out on some connection (the peer may have had it).
    #[inline]
    pub fn was_written(&self) -> bool {
        self.written
    }

    /// Records that the peer did not get it after all (its connection said so as it closed):
    /// it may go to the peer's next incarnation like a frame never written.
    #[inline]
    pub fn not_delivered(&mut self) {
        self.written = false;
    }

    /// Starts the frame over, for a new connection: the old one may have cut it anywhere.
    #[inline]
    pub fn rewind(&mut self) {
        self.done = 0;
    }

    /// Total size in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the frame has no bytes at all.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes still to write.
    #[inline]
    pub fn remaining(&self) -> usize {
        self.len - self.done
    }

    /// Whether any byte was written (a frame cut in the middle cannot be resent alone).
    #[inline]
    pub fn started(&self) -> bool {
        self.done > 0
    }

    /// Appends the unwritten parts to `out`, at most `max` slices in all.
    pub fn slices<'a>(&'a self, out: &mut Vec<IoSlice<'a>>, max: usize) {
        if self.chunks.is_empty() {
            // The buffer is the whole frame.
            if out.len() < max && self.done < self.buf.len() {
                out.push(IoSlice::new(&self.buf[self.done..]));
            }
            return;
        }
        let mut skip = self.done;
        for c in &self.chunks {
            if out.len() >= max {
                return;
            }
            let part: &[u8] = match *c {
                Chunk::Bytes { start, end } => &self.buf[start..end],
                Chunk::Shared { index, .. } => match &self.shared {
                    Some(s) => s.bytes(index),
                    None => &[],
                },
            };
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            out.push(IoSlice::new(&part[skip..]));
            skip = 0;
        }
    }

    /// Whether it is written whole for the first time: true once, when it first is.
    #[inline]
    pub fn first_completion(&mut self) -> bool {
        let first = self.remaining() == 0 && !self.counted;
        self.counted |= first;
        first
    }

    /// Records `n` more bytes written; returns how many of them went past this frame's end.
    #[inline]
    pub fn advance(&mut self, n: usize) -> usize {
        let here = n.min(self.remaining());
        self.done += here;
        self.written |= here > 0;
        n - here
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Vec<u8>);
    impl Shared for Fixed {
        fn bytes(&self, _: u32) -> &[u8] {
            &self.0
        }
    }

    fn flat(f: &OutFrame) -> Vec<u8> {
        let mut v = Vec::new();
        f.slices(&mut v, usize::MAX);
        v.iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn partial_writes_resume_in_the_middle_of_a_chunk() {
        let chunks = vec![
            Chunk::Bytes { start: 0, end: 3 },
            Chunk::Shared { index: 0, len: 4 },
            Chunk::Bytes { start: 3, end: 5 },
        ];
        let mut f = OutFrame::new(
            b"abcde".to_vec(),
            chunks,
            Some(Arc::new(Fixed(b"WXYZ".to_vec()))),
        );
        assert_eq!(f.len(), 9);
        assert_eq!(flat(&f), b"abcWXYZde");
        assert_eq!(f.advance(4), 0);
        assert!(f.started());
        let copy = f.duplicate();
        assert!(!copy.started());
        assert_eq!(flat(&copy), b"abcWXYZde");
        assert_eq!(flat(&f), b"XYZde");
        assert_eq!(f.advance(10), 5);
        assert_eq!(f.remaining(), 0);
        assert!(flat(&f).is_empty());
    }

    /// A frame without chunks is its buffer, written and resumed as one slice.
    #[test]
    fn a_frame_without_chunks_is_its_buffer() {
        let mut f = OutFrame::new(b"header+term".to_vec(), Vec::new(), None);
        assert_eq!(f.len(), 11);
        assert_eq!(flat(&f), b"header+term");
        assert_eq!(f.advance(7), 0);
        assert_eq!(flat(&f), b"term");
        let mut none = Vec::new();
        f.slices(&mut none, 0);
        assert!(none.is_empty());
        assert_eq!(f.advance(9), 5);
        assert!(flat(&f).is_empty());
        assert_eq!(flat(&f.duplicate()), b"header+term");
    }

    /// A draft of bytes only finishes without a chunk list; one with a shared binary keeps
    /// its chunks; both write the same bytes as their parts say.
    #[test]
    fn only_frames_with_shared_parts_carry_chunks() {
        use crate::frame::{Draft, Kind};
        let mut d = Draft::new(Kind::ToName, &[119, 1, b't']);
        d.term().raw(b"small");
        let f = d.finish(None).unwrap();
        assert!(f.chunks.is_empty());
        assert_eq!(flat(&f).len(), f.len());
        assert!(flat(&f).ends_with(b"small"));
        let mut d = Draft::new(Kind::ToName, &[119, 1, b't']);
        d.term().raw(b"a");
        assert_eq!(d.term().binary_ref(4), 0);
        d.term().raw(b"z");
        let f = d.finish(Some(Arc::new(Fixed(b"WXYZ".to_vec())))).unwrap();
        assert_eq!(f.chunks.len(), 3);
        assert!(flat(&f).ends_with(b"WXYZz"));
        assert_eq!(flat(&f).len(), f.len());
    }

    #[test]
    fn slices_respect_the_limit() {
        let f = OutFrame::new(
            b"abcdef".to_vec(),
            vec![
                Chunk::Bytes { start: 0, end: 2 },
                Chunk::Bytes { start: 2, end: 4 },
                Chunk::Bytes { start: 4, end: 6 },
            ],
            None,
        );
        let mut v = Vec::new();
        f.slices(&mut v, 2);
        assert_eq!(v.len(), 2);
    }
}
