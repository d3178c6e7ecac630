//! Writes the seed corpora of the `frame_stream` and `handshake` targets (`seeds/frame_stream/`,
//! `seeds/handshake/`) with `teleport_core` itself: frames built by `frame::Draft` and stamped
//! with their sequence numbers, and handshakes recorded between `dial` and `accept` +
//! `Proven::welcome` (fresh nonces each time, so the recorded bytes differ from run to run).
//! The `frame_stream` seeds wrap each `seeds/decode_etf/` file in a frame.
//!
//!     cargo run --manifest-path native/fuzz/Cargo.toml --example gen_seeds
//!
//! It replaces the files of those two directories; see README.md for what each one is.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use teleport_core::frame::{Draft, Kind};
use teleport_core::handshake::{
    accept, dial, encode_challenge, encode_hello, encode_ok, encode_reject, encode_response,
    Accepted, Challenge, Hello, Response, Welcome, MAC_LEN, NONCE_LEN, REJECT_PROTOCOL,
};

const DIALER: &[u8] = b"a@host";
const ACCEPTOR: &[u8] = b"b@host";
const COOKIE: &[u8] = b"SECRETCOOKIEXYZ";

/// `echo`, a registered name (without its version byte, as `Draft::new` takes it).
const ECHO: &[u8] = &[119, 4, b'e', b'c', b'h', b'o'];
/// A pid on `nonode@nohost`.
const PID: &[u8] = &[
    88, 119, 13, b'n', b'o', b'n', b'o', b'd', b'e', b'@', b'n', b'o', b'h', b'o', b's', b't', 0,
    0, 0, 80, 0, 0, 0, 0, 0, 0, 0, 0,
];

fn main() -> io::Result<()> {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    frame_stream(&seeds)?;
    handshake(&seeds)?;
    Ok(())
}

/// Empties (or makes) `dir`.
fn fresh(dir: &Path) -> io::Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::create_dir_all(dir)
}

/// A frame to `dest` whose term is `term` (both without their version byte), numbered `seq`.
fn frame(kind: Kind, dest: &[u8], term: &[u8], seq: u64) -> Vec<u8> {
    let mut d = Draft::new(kind, dest);
    d.term().raw(term);
    let mut f = d.finish(None).expect("a small frame");
    f.stamp(seq);
    let mut slices = Vec::new();
    f.slices(&mut slices, usize::MAX);
    slices.iter().flat_map(|s| s.iter().copied()).collect()
}

/// The small terms of the `many_*` streams, in turn.
fn term(i: u64) -> Vec<u8> {
    match i % 5 {
        0 => vec![104, 2, 119, 5, b'h', b'e', b'l', b'l', b'o', 97, 42],
        1 => vec![
            108, 0, 0, 0, 3, 97, 1, 70, 64, 4, 0, 0, 0, 0, 0, 0, 106, 106,
        ],
        2 => vec![109, 0, 0, 0, 3, 1, 2, 3],
        // Not a term: the sink skips it, or refuses it when strict.
        3 => vec![255, 1],
        _ => vec![106],
    }
}

/// Frames numbered `seqs`, to `echo` and to a pid in turn.
fn frames(seqs: &[u64]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, &seq) in seqs.iter().enumerate() {
        let (kind, dest) = if i % 2 == 0 {
            (Kind::ToName, ECHO)
        } else {
            (Kind::ToPid, PID)
        };
        out.extend(frame(kind, dest, &term(i as u64), seq));
    }
    out
}

/// The target's 24-byte header (see fuzz_targets/frame_stream.rs).
#[derive(Default, Clone)]
struct Head {
    mode: u8,
    cuts: Vec<u16>,
    pad_at: u16,
    pad_len16: u16,
    fill: u8,
    start: u8,
    acks: u8,
    stop_at16: u16,
}

impl Head {
    fn cuts(cuts: &[u16]) -> Head {
        Head {
            mode: cuts.len() as u8,
            cuts: cuts.to_vec(),
            ..Head::default()
        }
    }

    fn bytes(&self) -> Vec<u8> {
        assert!(self.cuts.len() <= 7 && self.mode & 7 == self.cuts.len() as u8);
        let mut h = vec![self.mode];
        for i in 0..7 {
            h.extend(self.cuts.get(i).copied().unwrap_or(0).to_be_bytes());
        }
        h.extend(self.pad_at.to_be_bytes());
        h.extend(self.pad_len16.to_be_bytes());
        h.push(self.fill);
        h.push(self.start);
        h.push(self.acks);
        h.extend(self.stop_at16.to_be_bytes());
        assert_eq!(h.len(), 24);
        h
    }
}

fn write(dir: &Path, name: &str, head: &Head, stream: &[u8]) -> io::Result<()> {
    let mut bytes = head.bytes();
    bytes.extend_from_slice(stream);
    fs::write(dir.join(name), bytes)
}

/// A frame whose term is a 100,000-byte binary of padding (the padding itself is the header's
/// `pad_len`, inserted where the binary's header ends), numbered `seq`, then a small one
/// numbered `seq + 1`; with the header that inserts it.
fn large(seq: u64) -> (Head, Vec<u8>) {
    const N: usize = 100_000;
    let mut big = frame(Kind::ToName, ECHO, &[109, 0, 1, 0x86, 0xa0], seq);
    let len = u32::from_be_bytes(big[..4].try_into().unwrap()) as usize + N;
    big[..4].copy_from_slice(&(len as u32).to_be_bytes());
    let pad_at = big.len() as u16;
    big.extend(frame(
        Kind::ToName,
        ECHO,
        &[119, 5, b'a', b'f', b't', b'e', b'r'],
        seq + 1,
    ));
    let head = Head {
        pad_at,
        pad_len16: (N / 16) as u16,
        fill: 7,
        ..Head::default()
    };
    (head, big)
}

fn frame_stream(seeds: &Path) -> io::Result<()> {
    let dir = seeds.join("frame_stream");
    fresh(&dir)?;
    let none = Head::default();

    // Every decode_etf seed as the term of one frame.
    let mut etf: Vec<PathBuf> = fs::read_dir(seeds.join("decode_etf"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<_>>()?;
    etf.sort();
    for path in etf {
        let term = fs::read(&path)?;
        let name = path.file_name().unwrap().to_string_lossy();
        write(
            &dir,
            &format!("etf_{name}"),
            &none,
            &frame(Kind::ToName, ECHO, &term[1..], 1),
        )?;
    }

    // Several frames, read whole, cut, a byte at a time, strict.
    let many = frames(&[1, 2, 3, 4, 5, 6]);
    write(&dir, "many_whole", &none, &many)?;
    write(
        &dir,
        "many_cuts",
        &Head::cuts(&[7, 0, 1, 16, 0, 3, 300]),
        &many,
    )?;
    write(&dir, "many_bytewise", &Head::cuts(&[1]), &many)?;
    let strict = Head {
        mode: 16,
        ..Head::default()
    };
    write(&dir, "many_strict", &strict, &many)?;

    // Sequence numbers: a resend after a reconnection, duplicates, gaps.
    let resent = Head {
        start: 2,
        ..Head::default()
    };
    write(&dir, "seq_resent", &resent, &frames(&[1, 2, 3, 4]))?;
    write(
        &dir,
        "seq_duplicates",
        &none,
        &frames(&[1, 2, 1, 2, 3, 3, 4]),
    )?;
    write(&dir, "seq_gap", &none, &frames(&[1, 2, 4, 5]))?;
    let later = Head {
        start: 5,
        ..Head::default()
    };
    write(&dir, "seq_gap_after_start", &later, &frames(&[5, 6, 8]))?;
    write(&dir, "seq_first_is_not_1", &none, &frames(&[2]))?;

    // A reserved flag set: the reader refuses it (Header::parse).
    let mut flagged = frames(&[1, 2]);
    flagged[5] = 1;
    write(&dir, "bad_flags", &none, &flagged)?;

    // Large frames, read into a buffer of their own.
    let (head, big) = large(1);
    write(&dir, "large_whole", &head, &big)?;
    let cut = Head {
        mode: 3,
        cuts: vec![1000, 1, 65535],
        ..head.clone()
    };
    write(&dir, "large_cuts", &cut, &big)?;
    let no_memory = Head {
        mode: 8,
        ..head.clone()
    };
    write(&dir, "large_no_memory", &no_memory, &big)?;
    let dup = Head {
        start: 1,
        ..head.clone()
    };
    write(&dir, "large_duplicate", &dup, &big)?;

    // Enough frames for an ack on the way (every 64) and one at the end; the acks cut, held
    // up by a full socket, or failing; read timeouts (0xFFFF) that send an owed ack.
    let seventy: Vec<u64> = (1..=70).collect();
    let seventy = frames(&seventy);
    write(&dir, "acks_whole", &none, &seventy)?;
    let cut_acks = Head {
        acks: 4 | 16,
        ..Head::default()
    };
    write(&dir, "acks_cut", &cut_acks, &seventy)?;
    let broken = Head {
        acks: 2 << 5,
        ..Head::default()
    };
    write(&dir, "acks_broken", &broken, &seventy)?;
    write(
        &dir,
        "acks_timeouts",
        &Head::cuts(&[40, 65535]),
        &frames(&[1, 2, 3, 4, 5, 6]),
    )?;

    // The listener closes after 48 bytes: the reader stops inside the second frame.
    let stop = Head {
        mode: 32 | 1,
        cuts: vec![20],
        stop_at16: 3,
        ..Head::default()
    };
    write(&dir, "stop_midway", &stop, &many)?;

    // Broken streams.
    write(&dir, "truncated", &none, &many[..many.len() - 3])?;
    write(&dir, "too_long", &none, &[0, 0x10, 0, 1, 2, 0, 0, 0])?;
    let mut bad_kind = frames(&[1]);
    bad_kind[4] = 9;
    write(&dir, "bad_kind", &none, &bad_kind)?;
    write(
        &dir,
        "bad_length_12",
        &none,
        &[0, 0, 0, 12, 2, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1],
    )?;
    Ok(())
}

/// A stream that keeps a copy of what is written to it.
struct Recorder {
    inner: UnixStream,
    written: Vec<u8>,
}

impl Read for Recorder {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for Recorder {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// One handshake: a dialer `me` with `cookie` dialing `peer`, an acceptor `acceptor` that
/// knows `a@host` by `acceptor_cookie`; what each side wrote (dialer, acceptor).
fn record(
    me: &[u8],
    peer: &[u8],
    cookie: &[u8],
    acceptor: &[u8],
    acceptor_cookie: &[u8],
) -> (Vec<u8>, Vec<u8>) {
    let (d, a) = UnixStream::pair().expect("a socket pair");
    let (acceptor, acceptor_cookie) = (acceptor.to_vec(), acceptor_cookie.to_vec());
    let thread = std::thread::spawn(move || {
        let mut a = Recorder {
            inner: a,
            written: Vec::new(),
        };
        if let Ok(proven) = accept(&mut a, &acceptor, |name| {
            (name == DIALER).then_some(acceptor_cookie)
        }) {
            let welcome = Welcome {
                max_frame: 1 << 20,
                incarnation: 0x1122_3344_5566_7788,
                delivered: 7,
            };
            proven.welcome(&mut a, &welcome).expect("the OK goes out");
        }
        a.written
    });
    let mut d = Recorder {
        inner: d,
        written: Vec::new(),
    };
    let _ = dial(&mut d, me, peer, cookie, 3, 0x0102_0304_0506_0708);
    drop(d.inner);
    (d.written, thread.join().expect("the acceptor"))
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut m = (body.len() as u16).to_be_bytes().to_vec();
    m.extend_from_slice(body);
    m
}

/// A session input of the target: 'S', the dialer's lane and session, the acceptor's welcome,
/// and a body byte changed on the way (`dir` 0: towards the acceptor, 1: towards the dialer).
fn pipe(lane: u16, session: u64, welcome: Welcome, dir: u8, at: u16, xor: u8) -> Vec<u8> {
    let mut v = vec![b'S'];
    v.extend(lane.to_be_bytes());
    v.extend(session.to_be_bytes());
    v.extend(welcome.max_frame.to_be_bytes());
    v.extend(welcome.incarnation.to_be_bytes());
    v.extend(welcome.delivered.to_be_bytes());
    v.push(dir);
    v.extend(at.to_be_bytes());
    v.push(xor);
    v
}

fn handshake(seeds: &Path) -> io::Result<()> {
    let dir = seeds.join("handshake");
    fresh(&dir)?;
    let put = |name: &str, bytes: &[u8]| fs::write(dir.join(name), bytes);

    // Real sessions: each side's bytes are what the target's other side reads.
    let (d, a) = record(DIALER, ACCEPTOR, COOKIE, ACCEPTOR, COOKIE);
    put("session_dialer", &d)?;
    put("session_acceptor", &a)?;
    let (d, a) = record(DIALER, ACCEPTOR, b"WRONGCOOKIE", ACCEPTOR, COOKIE);
    put("wrong_cookie_dialer", &d)?;
    put("wrong_cookie_acceptor", &a)?;
    let (d, _) = record(b"z@host", ACCEPTOR, COOKIE, ACCEPTOR, COOKIE);
    put("unknown_node_dialer", &d)?;
    let (d, a) = record(DIALER, ACCEPTOR, COOKIE, b"c@host", COOKIE);
    put("wrong_peer_dialer", &d)?;
    put("wrong_peer_acceptor", &a)?;

    // Single messages and bodies.
    let hello = Hello {
        name: "ä@höst".as_bytes().to_vec(),
        nonce: [1; NONCE_LEN],
    };
    put("hello_utf8_name", &framed(&encode_hello(&hello).unwrap()))?;
    put("http", b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")?;
    put("reject_protocol", &framed(&encode_reject(REJECT_PROTOCOL)))?;
    let hello = Hello {
        name: DIALER.to_vec(),
        nonce: [2; NONCE_LEN],
    };
    put("body_hello", &encode_hello(&hello).unwrap())?;
    let challenge = Challenge {
        name: ACCEPTOR.to_vec(),
        nonce: [3; NONCE_LEN],
    };
    put("body_challenge", &encode_challenge(&challenge).unwrap())?;
    let response = Response {
        mac: [4; MAC_LEN],
        lane: 0xBEEF,
        session: 0x0123_4567_89AB_CDEF,
    };
    put("body_response", &encode_response(&response))?;
    let welcome = Welcome {
        max_frame: 1 << 20,
        incarnation: 0xFEDC_BA98_7654_3210,
        delivered: 1 << 40,
    };
    put(
        "body_ok",
        &encode_ok(&Accepted {
            mac: [5; MAC_LEN],
            welcome,
        }),
    )?;
    put("body_reject", &encode_reject(REJECT_PROTOCOL))?;

    // Sessions over the target's pipes: untouched, and with one byte changed in the HELLO's
    // nonce, the RESPONSE's session, the CHALLENGE's name and the OK's delivered count.
    let hello_len = 7 + DIALER.len() + NONCE_LEN;
    let challenge_len = 2 + ACCEPTOR.len() + NONCE_LEN;
    put("pipe_untouched", &pipe(5, 99, welcome, 0, 0, 0))?;
    put(
        "pipe_hello_nonce",
        &pipe(5, 99, welcome, 0, hello_len as u16 - 1, 1),
    )?;
    let session_at = hello_len + 1 + MAC_LEN + 2 + 7;
    put(
        "pipe_response_session",
        &pipe(5, 99, welcome, 0, session_at as u16, 0x80),
    )?;
    put("pipe_challenge_name", &pipe(5, 99, welcome, 1, 2, 1))?;
    let delivered_at = challenge_len + 1 + MAC_LEN + 4 + 8 + 7;
    put(
        "pipe_ok_delivered",
        &pipe(5, 99, welcome, 1, delivered_at as u16, 1),
    )?;
    Ok(())
}
