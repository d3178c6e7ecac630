//! The output side of the codec: a writer for the external term format.
//!
//! [`Writer`] appends encoded terms to ONE growing byte buffer and records the output as a list
//! of [`Chunk`]s: ranges of that buffer, and references to binaries that the caller keeps
//! (zero-copy: a large binary is never copied, the caller splices its own binary into the
//! iolist or `iovec` at that place). The writer knows nothing about the Erlang VM; the NIF glue
//! walks terms and calls it, and `cargo test` drives it directly.

use crate::etf::*;

/// One piece of the encoded output, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// A range of the writer's buffer.
    Bytes {
        /// Offset of the first byte.
        start: usize,
        /// Offset just past the last byte.
        end: usize,
    },
    /// One of the caller's binaries, kept by reference.
    Shared {
        /// Which one, as numbered by [`Writer::binary_ref`].
        index: u32,
        /// Its size in bytes.
        len: usize,
    },
}

/// A place in the buffer where a 32-bit length is written once it is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a reserved length must be patched"]
pub struct Patch(usize);

/// Appends encoded terms to a buffer. Methods write one tag each and never fail: limits that
/// depend on the VM (atom length, arity) are checked by the caller before calling.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
    chunks: Vec<Chunk>,
    /// Where the current (not yet recorded) bytes chunk starts.
    open: usize,
    shared: u32,
    shared_bytes: usize,
}

impl Writer {
    /// A writer whose buffer starts with `capacity` bytes reserved.
    pub fn with_capacity(capacity: usize) -> Self {
        Writer {
            buf: Vec::with_capacity(capacity),
            ..Writer::default()
        }
    }

    /// A writer that reuses the allocations of `buf` and `chunks` (both are cleared): a caller
    /// that encodes many terms hands back what [`Writer::finish`] returned.
    pub fn from_vecs(mut buf: Vec<u8>, mut chunks: Vec<Chunk>) -> Self {
        buf.clear();
        chunks.clear();
        Writer {
            buf,
            chunks,
            ..Writer::default()
        }
    }

    /// The bytes written to the buffer so far.
    #[inline]
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Writes the version byte that starts a whole encoded term.
    #[inline]
    pub fn version(&mut self) {
        self.buf.push(VERSION);
    }

    /// Bytes written to the buffer so far (shared binaries not counted).
    #[inline]
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Total encoded size so far, shared binaries included.
    #[inline]
    pub fn total_len(&self) -> usize {
        self.buf.len() + self.shared_bytes
    }

    /// An integer, in the smallest form `binary_to_term/1` reads back as the same integer.
    #[inline]
    pub fn int(&mut self, v: i64) {
        if (0..=255).contains(&v) {
            self.buf.extend_from_slice(&[SMALL_INTEGER_EXT, v as u8]);
        } else if let Ok(v) = i32::try_from(v) {
            self.buf.push(INTEGER_EXT);
            self.buf.extend_from_slice(&v.to_be_bytes());
        } else {
            self.big(v < 0, v.unsigned_abs());
        }
    }

    /// An unsigned integer (for values above `i64::MAX`).
    #[inline]
    pub fn uint(&mut self, v: u64) {
        match i64::try_from(v) {
            Ok(v) => self.int(v),
            Err(_) => self.big(false, v),
        }
    }

    fn big(&mut self, negative: bool, magnitude: u64) {
        let digits = magnitude.to_le_bytes();
        let n = 8 - (magnitude.leading_zeros() as usize / 8);
        self.buf
            .extend_from_slice(&[SMALL_BIG_EXT, n as u8, negative as u8]);
        self.buf.extend_from_slice(&digits[..n]);
    }

    /// A float (`NEW_FLOAT_EXT`). Erlang floats are always finite.
    #[inline]
    pub fn float(&mut self, v: f64) {
        self.buf.push(NEW_FLOAT_EXT);
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    /// An atom given as UTF-8 text of at most [`MAX_ATOM_CHARS`] characters.
    #[inline]
    pub fn atom_utf8(&mut self, text: &[u8]) {
        if let Ok(n) = u8::try_from(text.len()) {
            self.buf.extend_from_slice(&[SMALL_ATOM_UTF8_EXT, n]);
        } else {
            self.buf.push(ATOM_UTF8_EXT);
            self.buf
                .extend_from_slice(&(text.len() as u16).to_be_bytes());
        }
        self.put(text);
    }

    /// An atom given as Latin-1 text (as `enif_get_atom` returns it): re-encoded as UTF-8,
    /// the form OTP 26+ writes and every OTP since R16 reads.
    pub fn atom_latin1(&mut self, text: &[u8]) {
        if text.is_ascii() {
            return self.atom_utf8(text);
        }
        let utf8: String = text.iter().map(|&b| b as char).collect();
        self.atom_utf8(utf8.as_bytes());
    }

    /// A binary copied into the buffer.
    #[inline]
    pub fn binary(&mut self, data: &[u8]) {
        self.binary_header(data.len());
        self.put(data);
    }

    /// A binary that stays where it is: the header goes into the buffer and the data is the
    /// caller's binary number N, where N counts the calls to this method from 0.
    pub fn binary_ref(&mut self, len: usize) -> u32 {
        self.binary_header(len);
        self.close_bytes();
        let index = self.shared;
        self.chunks.push(Chunk::Shared { index, len });
        self.shared += 1;
        self.shared_bytes += len;
        index
    }

    #[inline]
    fn binary_header(&mut self, len: usize) {
        self.buf.push(BINARY_EXT);
        self.buf.extend_from_slice(&(len as u32).to_be_bytes());
    }

    /// The header of a tuple of `arity` elements; the elements follow.
    #[inline]
    pub fn tuple_header(&mut self, arity: usize) {
        if let Ok(n) = u8::try_from(arity) {
            self.buf.extend_from_slice(&[SMALL_TUPLE_EXT, n]);
        } else {
            self.buf.push(LARGE_TUPLE_EXT);
            self.buf.extend_from_slice(&(arity as u32).to_be_bytes());
        }
    }

    /// The header of a map of `arity` pairs; keys and values follow, alternating.
    #[inline]
    pub fn map_header(&mut self, arity: usize) {
        self.buf.push(MAP_EXT);
        self.buf.extend_from_slice(&(arity as u32).to_be_bytes());
    }

    /// The empty list.
    #[inline]
    pub fn nil(&mut self) {
        self.buf.push(NIL_EXT);
    }

    /// The header of a list whose length is not known yet; elements and then the tail follow,
    /// and [`Writer::patch`] fills in the length.
    #[inline]
    pub fn list_header(&mut self) -> Patch {
        self.buf.extend_from_slice(&[LIST_EXT, 0, 0, 0, 0]);
        Patch(self.buf.len() - 4)
    }

    /// Overwrites bytes written earlier at `at` (frame headers whose lengths and flags are
    /// known only once the term is written).
    #[inline]
    pub fn overwrite(&mut self, at: usize, bytes: &[u8]) {
        self.buf[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// Fills in a length reserved by [`Writer::list_header`].
    #[inline]
    pub fn patch(&mut self, at: Patch, len: u32) {
        self.buf[at.0..at.0 + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// A proper list of integers 0..=255 of at most 65535 elements (`STRING_EXT`).
    #[inline]
    pub fn string(&mut self, bytes: &[u8]) {
        debug_assert!(bytes.len() <= u16::MAX as usize);
        self.buf.push(STRING_EXT);
        self.buf
            .extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        self.put(bytes);
    }

    /// Writes again the `len` bytes written at `start`: a repeated atom costs one copy and no
    /// call into the VM.
    #[inline]
    pub fn repeat(&mut self, start: usize, len: usize) {
        if len <= 16 {
            let mut tmp = [0u8; 16];
            tmp[..len].copy_from_slice(&self.buf[start..start + len]);
            self.put(&tmp[..len]);
        } else {
            self.buf.extend_from_within(start..start + len);
        }
    }

    /// Bytes that are already an encoded term without its version byte (the fallback for the
    /// types the VM encodes itself: pids, ports, references, funs, bignums, bitstrings).
    #[inline]
    pub fn raw(&mut self, encoded: &[u8]) {
        self.put(encoded);
    }

    /// Appends `bytes`. Most are a few bytes long: those are copied with fixed-size moves
    /// (two that overlap in the middle) rather than a call to `memcpy`.
    #[inline(always)]
    fn put(&mut self, bytes: &[u8]) {
        let n = bytes.len();
        let at = self.buf.len();
        if (8..=16).contains(&n) {
            let head: [u8; 8] = bytes[..8].try_into().unwrap();
            let tail: [u8; 8] = bytes[n - 8..].try_into().unwrap();
            self.buf.reserve(16);
            self.buf.extend_from_slice(&head);
            self.buf.truncate(at + n - 8);
            self.buf.extend_from_slice(&tail);
        } else if (4..8).contains(&n) {
            let head: [u8; 4] = bytes[..4].try_into().unwrap();
            let tail: [u8; 4] = bytes[n - 4..].try_into().unwrap();
            self.buf.reserve(8);
            self.buf.extend_from_slice(&head);
            self.buf.truncate(at + n - 4);
            self.buf.extend_from_slice(&tail);
        } else if n < 4 {
            for &b in bytes {
                self.buf.push(b);
            }
        } else {
            self.buf.extend_from_slice(bytes);
        }
    }

    fn close_bytes(&mut self) {
        if self.buf.len() > self.open {
            self.chunks.push(Chunk::Bytes {
                start: self.open,
                end: self.buf.len(),
            });
            self.open = self.buf.len();
        }
    }

    /// Ends the output: the buffer and the chunks that make up the encoded term, in order.
    pub fn finish(mut self) -> (Vec<u8>, Vec<Chunk>) {
        self.close_bytes();
        (self.buf, self.chunks)
    }

    /// As [`Writer::finish`], except that output which is all bytes (no shared binary)
    /// comes with no chunks at all, the buffer being its one chunk: no chunk list to
    /// allocate for a small frame.
    pub fn finish_compact(self) -> (Vec<u8>, Vec<Chunk>) {
        if self.chunks.is_empty() && self.open == 0 {
            return (self.buf, self.chunks);
        }
        self.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(w: Writer) -> Vec<u8> {
        let (buf, chunks) = w.finish();
        assert_eq!(
            chunks,
            vec![Chunk::Bytes {
                start: 0,
                end: buf.len()
            }]
        );
        buf
    }

    #[test]
    fn integers_take_the_smallest_form() {
        let cases: &[(i64, &[u8])] = &[
            (0, &[97, 0]),
            (255, &[97, 255]),
            (256, &[98, 0, 0, 1, 0]),
            (-1, &[98, 255, 255, 255, 255]),
            (i32::MIN as i64, &[98, 128, 0, 0, 0]),
            (1 << 31, &[110, 4, 0, 0, 0, 0, 128]),
            (-(1 << 40), &[110, 6, 1, 0, 0, 0, 0, 0, 1]),
            (i64::MIN, &[110, 8, 1, 0, 0, 0, 0, 0, 0, 0, 128]),
        ];
        for (v, want) in cases {
            let mut w = Writer::default();
            w.int(*v);
            assert_eq!(bytes_of(w), *want, "{v}");
        }
        let mut w = Writer::default();
        w.uint(u64::MAX);
        assert_eq!(
            bytes_of(w),
            [110, 8, 0, 255, 255, 255, 255, 255, 255, 255, 255]
        );
    }

    #[test]
    fn atoms_are_utf8() {
        let mut w = Writer::default();
        w.atom_latin1(b"ok");
        w.atom_latin1(&[0xe9]); // 'é' in Latin-1
        w.atom_utf8(&[b'a'; 300]);
        let buf = bytes_of(w);
        assert_eq!(&buf[..7], &[119, 2, b'o', b'k', 119, 2, 0xc3][..]);
        assert_eq!(&buf[8..11], &[118, 1, 44]);
        assert_eq!(buf.len(), 11 + 300);
    }

    #[test]
    fn shared_binaries_split_the_output() {
        let mut w = Writer::default();
        w.version();
        w.tuple_header(2);
        w.atom_utf8(b"msg");
        assert_eq!(w.binary_ref(5000), 0);
        assert_eq!(w.binary_ref(7000), 1);
        w.nil();
        assert_eq!(w.total_len(), w.buffered() + 12000);
        let (buf, chunks) = w.finish();
        assert_eq!(
            chunks,
            vec![
                Chunk::Bytes { start: 0, end: 13 },
                Chunk::Shared {
                    index: 0,
                    len: 5000
                },
                Chunk::Bytes { start: 13, end: 18 },
                Chunk::Shared {
                    index: 1,
                    len: 7000
                },
                Chunk::Bytes { start: 18, end: 19 },
            ]
        );
        assert_eq!(&buf[8..13], &[109, 0, 0, 0x13, 0x88]);
    }

    #[test]
    fn repeat_copies_earlier_output() {
        let mut w = Writer::default();
        w.tuple_header(2);
        let at = w.buffered();
        w.atom_utf8(b"ok");
        w.repeat(at, w.buffered() - at);
        assert_eq!(
            bytes_of(w),
            [104, 2, 119, 2, b'o', b'k', 119, 2, b'o', b'k']
        );
    }

    #[test]
    fn raw_and_repeat_copy_every_length() {
        let src: Vec<u8> = (0..200u8).collect();
        for n in 0..=40 {
            let mut w = Writer::default();
            w.raw(&src[..n]);
            w.repeat(0, n);
            w.binary(&src[..n]);
            let buf = bytes_of(w);
            assert_eq!(&buf[..n], &src[..n]);
            assert_eq!(&buf[n..2 * n], &src[..n]);
            assert_eq!(&buf[2 * n + 5..], &src[..n]);
        }
    }

    #[test]
    fn list_length_is_patched() {
        let mut w = Writer::default();
        let p = w.list_header();
        w.int(1);
        w.nil();
        w.patch(p, 1);
        assert_eq!(bytes_of(w), [108, 0, 0, 0, 1, 97, 1, 106]);
    }

    #[test]
    fn large_arities_use_the_long_headers() {
        let mut w = Writer::default();
        w.tuple_header(256);
        w.map_header(3);
        w.string(b"hi");
        assert_eq!(
            bytes_of(w),
            [105, 0, 0, 1, 0, 116, 0, 0, 0, 3, 107, 0, 2, b'h', b'i']
        );
    }
}
