//! `record`: a TLS 1.3 connection's records after its handshake, sealed and opened here
//! (RFC 8446 §5.2-5.3) with the keys rustls extracts for that (`dangerous_extract_secrets`,
//! what kernel TLS is given), so that a connection's bytes cost the AEAD and no copy the
//! buffered rustls API makes: it copies every record's plaintext into a buffer it allocates
//! and then again into the reader's, and the ciphertext into its own buffer first (three
//! copies in user space; perf put three quarters of the receiving thread's copying in the
//! first). Here a sender's plaintext is copied once, into the record it is sealed in, and a
//! receiver's is opened in place in the buffer the socket was read into and copied once,
//! into the pump's buffer (a large frame's: the VM binary).
//!
//! rustls still does everything else: the handshake, both certificates, the exporter that
//! binds the cookie handshake, and the cookie handshake's own records; the switch is made
//! once the cookie handshake is over, when neither end has anything in flight (the
//! acceptor's OK is the last message, and the dialer sends nothing before reading it).
//!
//! What a teleport peer never sends after the handshake (it runs this same code) is
//! refused: a handshake message (key update, session ticket) or an alert other than
//! `close_notify` closes the connection. The keys cannot be updated (rustls' buffered
//! connections extract no key schedule), so an AES-GCM connection closes itself once its key
//! has sealed or opened [`AES_GCM_BLOCKS`] 16-byte blocks, under the confidentiality limit
//! of RFC 8446 §5.5 (2^24.5 full-size records, about 2^34.5 blocks: the bound is on blocks,
//! so that a connection of small records is not cut after as many records as one of full
//! ones); the pool opens another and resends what was not acknowledged. Plaintext rustls
//! had already opened when the opening ended (a closing listener's LAST can come right
//! behind its OK) is carried over, read first.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;
use std::fmt;
use std::io::{self, IoSlice, Read, Write};

/// Most plaintext bytes in one record (RFC 8446 §5.1).
pub const PLAINTEXT_MAX: usize = 1 << 14;

/// The record header: type, legacy version, length.
const HEADER: usize = 5;

/// The AEAD tag of every suite teleport offers.
const TAG: usize = 16;

/// Most bytes after the header a peer's record may have (RFC 8446 §5.2: 2^14 + 256).
const CIPHERTEXT_MAX: usize = PLAINTEXT_MAX + 256;

/// The outer type of every protected record (`application_data`).
const APPLICATION_DATA: u8 = 0x17;
/// Inner types.
const ALERT: u8 = 0x15;
const HANDSHAKE: u8 = 0x16;

/// 16-byte blocks (a record's inner plaintext, rounded up, and one more) an AES-GCM key seals
/// or opens before its connection closes itself: 256 GB, where RFC 8446 §5.5's 2^24.5
/// full-size records are about 2^34.5 blocks.
pub const AES_GCM_BLOCKS: u64 = 1 << 34;

/// How much ciphertext a receiver reads from its source at a time, at first and at most:
/// the buffer doubles while reads fill it (a connection that only ever gets acks keeps the
/// first size; one that carried bulk keeps the last, as its socket's buffers grow in the
/// kernel). What is left of a record at the end of a read moves to the front before the
/// next (at most one record).
const READ_AHEAD_MIN: usize = 32 * 1024;
const _: () = assert!(READ_AHEAD_MIN > HEADER + CIPHERTEXT_MAX);
const READ_AHEAD_MAX: usize = 256 * 1024;

/// Sealed ciphertext a sender keeps room for once it is all written, unless its last seal
/// was bounded by the room it was given (a stream, which reuses it at once).
const OUT_KEEP: usize = 64 * 1024;

/// One direction's key, nonce base, record count and blocks done.
struct Direction {
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
    blocks: u64,
    limit: u64,
}

impl Direction {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> io::Result<Direction> {
        let (alg, key, iv, limit) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (&aead::AES_128_GCM, key, iv, AES_GCM_BLOCKS)
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                (&aead::AES_256_GCM, key, iv, AES_GCM_BLOCKS)
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv, u64::MAX)
            }
            _ => {
                return Err(io::Error::other(
                    "TLS: a cipher suite teleport does not offer",
                ))
            }
        };
        let key = UnboundKey::new(alg, key.as_ref())
            .map_err(|_| io::Error::other("TLS: a key of the wrong length"))?;
        let iv = iv
            .as_ref()
            .try_into()
            .map_err(|_| io::Error::other("TLS: a nonce of the wrong length"))?;
        Ok(Direction {
            key: LessSafeKey::new(key),
            iv,
            seq,
            blocks: 0,
            limit,
        })
    }

    /// The nonce of the next record, of `inner` bytes of inner plaintext (the IV with the
    /// sequence number xored into its end), counting it; an error, counting nothing, once
    /// the key would pass its share.
    fn next_nonce(&mut self, inner: usize) -> io::Result<Nonce> {
        let blocks = self.blocks.saturating_add(inner.div_ceil(16) as u64 + 1);
        if blocks > self.limit || self.seq == u64::MAX {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "TLS: this connection's key reached its limit (the pool opens another)",
            ));
        }
        self.blocks = blocks;
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// A TLS 1.3 connection's records in both directions, from its extracted secrets: the
/// ciphertext sealed and not yet written, and the ciphertext read and not yet opened.
pub struct Records {
    tx: Direction,
    rx: Direction,
    /// Sealed records; `out[sent..]` waits for the socket.
    out: Vec<u8>,
    sent: usize,
    /// The last seal stopped at its room: more is coming.
    full: bool,
    /// Ciphertext read (`inbox[..filled]`, allocated at the first read); `inbox[opened..
    /// filled]` is not opened yet, and `inbox[plain.0..plain.1]` is the plaintext of the
    /// last record opened, not yet read.
    inbox: Vec<u8>,
    filled: usize,
    opened: usize,
    plain: (usize, usize),
    /// The peer sent `close_notify`.
    closed: bool,
}

impl fmt::Debug for Records {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Records")
            .field("sealed", &self.tx.seq)
            .field("opened", &self.rx.seq)
            .field("waiting", &self.waiting())
            .finish_non_exhaustive()
    }
}

impl Records {
    /// The records of a connection whose secrets (and sequence numbers) are `tx` and `rx`,
    /// `opened` the plaintext already opened (read before any more).
    pub fn new(
        tx: (u64, ConnectionTrafficSecrets),
        rx: (u64, ConnectionTrafficSecrets),
        opened: Vec<u8>,
    ) -> io::Result<Records> {
        let len = opened.len();
        Ok(Records {
            tx: Direction::new(tx)?,
            rx: Direction::new(rx)?,
            out: Vec::new(),
            sent: 0,
            full: false,
            inbox: opened,
            filled: len,
            opened: len,
            plain: (0, len),
            closed: false,
        })
    }

    /// Ciphertext bytes sealed and not yet written.
    pub fn waiting(&self) -> usize {
        self.out.len() - self.sent
    }

    /// Seals the bytes of `slices`, in order, into records, as many as fit while at most
    /// `room` bytes of ciphertext wait; how many plaintext bytes it took.
    pub fn seal(&mut self, slices: &[IoSlice<'_>], room: usize) -> io::Result<usize> {
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
        } else if self.sent >= room {
            // What the socket took is kept until it is as much as what may wait: one move
            // of what is left, now and then, instead of one per write.
            self.out.drain(..self.sent);
            self.sent = 0;
        }
        let total: usize = slices.iter().map(|s| s.len()).sum();
        let fits = total.min(room.saturating_sub(self.waiting()));
        self.out
            .reserve(fits + (fits / PLAINTEXT_MAX + 1) * (HEADER + 1 + TAG));
        let (mut slice, mut at, mut took) = (0, 0, 0);
        while took < total && self.waiting() + HEADER + 1 + TAG < room {
            let space = room - self.waiting() - HEADER - 1 - TAG;
            let len = (total - took).min(PLAINTEXT_MAX).min(space);
            // The nonce first: at the key's limit nothing of the record is written (what
            // this took is reported; the next call fails).
            let nonce = match self.tx.next_nonce(len + 1) {
                Ok(nonce) => nonce,
                Err(_) if took > 0 => break,
                Err(e) => return Err(e),
            };
            let start = self.out.len();
            let body = len + 1 + TAG;
            self.out.extend_from_slice(&[
                APPLICATION_DATA,
                0x03,
                0x03,
                (body >> 8) as u8,
                body as u8,
            ]);
            // The plaintext, gathered from the slices.
            let mut left = len;
            while left > 0 {
                let s = &slices[slice][at..];
                let n = s.len().min(left);
                self.out.extend_from_slice(&s[..n]);
                left -= n;
                at += n;
                if at == slices[slice].len() {
                    slice += 1;
                    at = 0;
                }
            }
            while slice < slices.len() && at == slices[slice].len() {
                slice += 1;
                at = 0;
            }
            self.out.push(APPLICATION_DATA);
            let (header, inner) = self.out[start..].split_at_mut(HEADER);
            let Ok(tag) = self
                .tx
                .key
                .seal_in_place_separate_tag(nonce, Aad::from(&*header), inner)
            else {
                // Never in clear: the record goes, and the connection with it.
                self.out.truncate(start);
                return Err(io::Error::other("TLS: sealing a record failed"));
            };
            self.out.extend_from_slice(tag.as_ref());
            took += len;
        }
        self.full = took < total;
        Ok(took)
    }

    /// Writes what waits to `out` until nothing does (true) or `out` is full (false).
    pub fn write_to(&mut self, out: &mut dyn Write) -> io::Result<bool> {
        while self.sent < self.out.len() {
            match out.write(&self.out[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if !self.full && self.out.capacity() > OUT_KEEP {
            self.out = Vec::new();
            self.sent = 0;
        }
        Ok(true)
    }

    /// Reads plaintext into `buf`, reading more of `src` while none is there: `WouldBlock`
    /// once `src` has nothing more now, 0 at the end of the stream (the TCP stream's, or
    /// the peer's `close_notify`).
    pub fn read_plain(&mut self, src: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.plain.0 < self.plain.1 {
                let n = buf.len().min(self.plain.1 - self.plain.0);
                buf[..n].copy_from_slice(&self.inbox[self.plain.0..self.plain.0 + n]);
                self.plain.0 += n;
                return Ok(n);
            }
            if self.closed || buf.is_empty() {
                return Ok(0);
            }
            if let Some(len) = self.whole_record() {
                self.open(len)?;
                continue;
            }
            // Not a whole record: what is left of one to the front, then more after it.
            if self.inbox.len() < READ_AHEAD_MIN {
                self.inbox.resize(READ_AHEAD_MIN, 0);
            }
            self.inbox.copy_within(self.opened..self.filled, 0);
            self.filled -= self.opened;
            self.opened = 0;
            self.plain = (0, 0);
            let free = self.inbox.len() - self.filled;
            match src.read(&mut self.inbox[self.filled..]) {
                // The TCP stream ended without close_notify: as a plain connection's end
                // (the pump tells a close between frames from one inside a frame).
                Ok(0) => return Ok(0),
                Ok(n) => {
                    self.filled += n;
                    let size = self.inbox.len();
                    if n == free && size < READ_AHEAD_MAX {
                        self.inbox.resize(size * 2, 0);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The length (header included) of the whole record at `inbox[opened..]`, if one is
    /// there, or of one longer than a record may be as soon as its header is (refused
    /// then, without waiting for it).
    fn whole_record(&self) -> Option<usize> {
        let rest = &self.inbox[self.opened..self.filled];
        let body = usize::from(u16::from_be_bytes([*rest.get(3)?, *rest.get(4)?]));
        (rest.len() >= HEADER + body || body > CIPHERTEXT_MAX).then_some(HEADER + body)
    }

    /// Opens the record of `len` bytes at `inbox[opened..]` in place.
    fn open(&mut self, len: usize) -> io::Result<()> {
        let start = self.opened;
        let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {why}"));
        // Checked first: a record too long is not all there.
        if len - HEADER > CIPHERTEXT_MAX || len - HEADER < 1 + TAG {
            return Err(bad("a record of an impossible length"));
        }
        if self.inbox[start] != APPLICATION_DATA {
            return Err(bad("a record that is not protected, after the handshake"));
        }
        let nonce = self.rx.next_nonce(len - HEADER - TAG)?;
        let (header, rest) = self.inbox[start..start + len].split_at_mut(HEADER);
        let inner = self
            .rx
            .key
            .open_in_place(nonce, Aad::from(&*header), rest)
            .map_err(|_| bad("a record that does not authenticate"))?;
        // The inner type is the last byte that is not padding.
        let Some(end) = inner.iter().rposition(|&b| b != 0) else {
            return Err(bad("a record without an inner type"));
        };
        if inner.len() > PLAINTEXT_MAX + 1 || end > PLAINTEXT_MAX {
            return Err(bad(
                "a record longer than a record may be (record_overflow)",
            ));
        }
        self.opened = start + len;
        match inner[end] {
            APPLICATION_DATA => {
                self.plain = (start + HEADER, start + HEADER + end);
                Ok(())
            }
            // close_notify (warning 1, description 0): the end of the stream.
            ALERT if inner[..end] == [1, 0] => {
                self.closed = true;
                Ok(())
            }
            ALERT => Err(bad("the peer sent an alert")),
            HANDSHAKE => Err(bad(
                "a handshake message after the handshake (key update or ticket: a teleport peer sends neither)",
            )),
            _ => Err(bad("a record of an unknown inner type")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{memory_handshake, records_of, tls_pair, Ca, Dir};
    use rustls::{ClientConnection, Connection};

    /// A client and a server after their handshake, and the server's records of the same
    /// session (the client stays rustls', the reference this is checked against).
    fn pair() -> (Dir, ClientConnection, Records) {
        pair_with(Vec::new())
    }

    /// [`pair`], the server's records given `opened` as plaintext opened before.
    fn pair_with(opened: Vec<u8>) -> (Dir, ClientConnection, Records) {
        let dir = Dir::new("records");
        let ca = Ca::new("ca");
        let (a, b) = tls_pair(&dir, &ca, &ca);
        let mut c = a.dialer("h").unwrap();
        let mut s = b.acceptor().unwrap();
        memory_handshake(&mut c, &mut s).unwrap();
        c.set_buffer_limit(None);
        let secrets = Connection::Server(s).dangerous_extract_secrets().unwrap();
        (
            dir,
            c,
            Records::new(secrets.tx, secrets.rx, opened).unwrap(),
        )
    }

    /// What the records of a fresh server say of `wire`, the first bytes from its peer.
    fn refusal_of(wire: &[u8]) -> io::Error {
        let (_dir, _c, mut records) = pair();
        records
            .read_plain(&mut &wire[..], &mut [0u8; 10])
            .unwrap_err()
    }

    fn read_all(records: &mut Records, mut wire: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 5000];
        loop {
            match records.read_plain(&mut wire, &mut buf) {
                Ok(0) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn records_sealed_here_read_in_rustls_and_rustls_records_open_here() {
        let (_dir, mut c, mut records) = pair();
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        // rustls -> here, in pieces of every size.
        c.writer().write_all(&payload).unwrap();
        let wire = records_of(&mut c);
        assert_eq!(read_all(&mut records, &wire), payload);
        // here -> rustls, gathered from slices that do not line up with records.
        let slices: Vec<IoSlice> = [&payload[..3], &payload[3..20_000], &payload[20_000..]]
            .iter()
            .map(|s| IoSlice::new(s))
            .collect();
        let mut taken = 0;
        let mut wire = Vec::new();
        while taken < payload.len() {
            let rest: Vec<IoSlice> = {
                let mut skip = taken;
                slices
                    .iter()
                    .filter_map(|s| {
                        if skip >= s.len() {
                            skip -= s.len();
                            None
                        } else {
                            let r = IoSlice::new(&s[skip..]);
                            skip = 0;
                            Some(r)
                        }
                    })
                    .collect()
            };
            taken += records.seal(&rest, 40_000).unwrap();
            assert!(records.write_to(&mut wire).unwrap());
        }
        assert!(
            !wire.windows(8).any(|w| w == &payload[1000..1008]),
            "sent in clear"
        );
        let (mut rd, mut got, mut buf) = (&wire[..], Vec::new(), [0u8; 4096]);
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
            c.process_new_packets().unwrap();
            while let Ok(n) = c.reader().read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
        }
        assert_eq!(got, payload);
        // close_notify from rustls ends the stream.
        c.send_close_notify();
        let wire = records_of(&mut c);
        assert_eq!(
            records.read_plain(&mut &wire[..], &mut [0u8; 10]).unwrap(),
            0
        );
    }

    #[test]
    fn a_tampered_record_or_one_out_of_order_is_refused() {
        let (_dir, mut c, mut records) = pair();
        for m in [&b"one"[..], b"two"] {
            c.writer().write_all(m).unwrap();
        }
        let wire = records_of(&mut c);
        // The second record first: its nonce is not the one expected.
        let first = HEADER + 3 + 1 + TAG;
        let e = records
            .read_plain(&mut &wire[first..], &mut [0u8; 10])
            .unwrap_err();
        assert!(e.to_string().contains("authenticate"), "{e}");
        // One bit of the ciphertext changed.
        let (_dir, mut c, mut records) = pair();
        c.writer().write_all(b"one").unwrap();
        let wire = records_of(&mut c);
        assert_eq!(read_all(&mut records, &wire), b"one");
        let (_dir, mut c, mut records) = pair();
        c.writer().write_all(b"one").unwrap();
        let mut wire = records_of(&mut c);
        wire[HEADER + 1] ^= 1;
        let e = records
            .read_plain(&mut &wire[..], &mut [0u8; 10])
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_record_too_long_is_refused_from_its_header_and_a_plain_one_at_once() {
        let e = refusal_of(&[0x17, 3, 3, 0xff, 0xff]);
        assert!(e.to_string().contains("impossible length"), "{e}");
        let mut plain = vec![0x16, 3, 3, 0, 20];
        plain.extend_from_slice(&[0; 20]);
        let e = refusal_of(&plain);
        assert!(e.to_string().contains("not protected"), "{e}");
    }

    #[test]
    fn buffers_grow_for_bulk_and_the_sealed_one_is_let_go_after_it() {
        let (_dir, mut c, mut records) = pair();
        let big = vec![5u8; 1_000_000];
        c.writer().write_all(&big).unwrap();
        let wire = records_of(&mut c);
        assert_eq!(read_all(&mut records, &wire).len(), big.len());
        assert_eq!(records.inbox.len(), READ_AHEAD_MAX);
        c.writer().write_all(b"small").unwrap();
        let wire = records_of(&mut c);
        assert_eq!(read_all(&mut records, &wire), b"small");
        // A stream keeps its sealed buffer; the end of it lets it go.
        let mut sink = Vec::new();
        assert!(records.seal(&[IoSlice::new(&big)], 300_000).unwrap() < big.len());
        records.write_to(&mut sink).unwrap();
        assert!(records.out.capacity() > OUT_KEEP);
        records
            .seal(&[IoSlice::new(&big[..200_000])], 300_000)
            .unwrap();
        records.write_to(&mut sink).unwrap();
        assert_eq!(records.out.capacity(), 0);
    }

    #[test]
    fn a_key_update_a_changed_header_and_a_short_record_are_refused() {
        let (_dir, mut c, mut records) = pair();
        c.refresh_traffic_keys().unwrap();
        let wire = records_of(&mut c);
        let e = records
            .read_plain(&mut &wire[..], &mut [0u8; 10])
            .unwrap_err();
        assert!(e.to_string().contains("handshake message"), "{e}");
        // The header is authenticated too.
        let (_dir, mut c, mut records) = pair();
        c.writer().write_all(b"one").unwrap();
        let mut wire = records_of(&mut c);
        wire[2] = 0x01;
        let e = records
            .read_plain(&mut &wire[..], &mut [0u8; 10])
            .unwrap_err();
        assert!(e.to_string().contains("authenticate"), "{e}");
        let short = [0x17, 3, 3, 0, 5, 1, 2, 3, 4, 5];
        let e = refusal_of(&short);
        assert!(e.to_string().contains("impossible length"), "{e}");
    }

    #[test]
    fn plaintext_opened_before_the_switch_is_read_first() {
        let (_dir, mut c, mut records) = pair_with(b"early".to_vec());
        c.writer().write_all(b" and late").unwrap();
        let wire = records_of(&mut c);
        assert_eq!(read_all(&mut records, &wire), b"early and late");
    }

    #[test]
    fn room_bounds_what_waits_and_a_key_stops_at_its_limit() {
        let (_dir, _c, mut records) = pair();
        let data = vec![7u8; 100_000];
        let took = records.seal(&[IoSlice::new(&data)], 20_000).unwrap();
        assert!(records.waiting() <= 20_000 && took > 0 && took < data.len());
        assert_eq!(records.seal(&[IoSlice::new(&data)], 20_000).unwrap(), 0);
        // At the key's limit: what fits under it is sealed and reported, the next call
        // fails, and nothing unsealed is ever left to be written.
        let mut sink = Vec::new();
        records.write_to(&mut sink).unwrap();
        records.tx.blocks = records.tx.limit - 2000;
        let took = records.seal(&[IoSlice::new(&data)], 200_000).unwrap();
        assert!(took > 0 && took < 2000 * 16, "{took}");
        let e = records.seal(&[IoSlice::new(&data)], 200_000).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        assert_eq!(
            records.waiting(),
            took.div_ceil(PLAINTEXT_MAX) * (HEADER + 1 + TAG) + took
        );
    }
}
