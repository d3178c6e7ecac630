//! `handshake`: arbitrary bytes as what the other side of a handshake sends.
//!
//! Every input goes, over an in-memory duplex (reads from the input, writes kept in a buffer
//! allocated once), to:
//! - `handshake::accept` as node `b@host`, as the bytes a dialer sends; `cookie_for` knows one
//!   node, `a@host`;
//! - `handshake::dial` as `a@host` dialing `b@host` for lane `LANE` of session `SESSION`, as
//!   the bytes the acceptor sends;
//! - every pub parser: `read_message`, `parse_hello`, `parse_challenge`, `parse_response`,
//!   `parse_verdict`, `parse_reject`; and `write_message` and `encode_hello` with the input.
//!
//! An input that starts with `S` (which the above refuse as a length prefix) also describes a
//! real session between `dial` and `accept` + `Proven::welcome`, over in-memory pipes, with
//! the acceptor on a thread of its own, fresh nonces (see [`check_session`]):
//!
//! ```text
//! 'S', Lane:16, Session:64, MaxFrame:32, Incarnation:64, Delivered:64,
//!      Dir:8 (bit 0: which way the tampered byte goes), At:16, Xor:8
//! ```
//!
//! Checks, for every input:
//! - no panic, no hang; the live heap grows by at most [`BUDGET`] (4 × `MAX_MESSAGE` + 4 KiB),
//!   whatever the input: a length prefix is checked before anything is allocated;
//! - neither side ever succeeds: the fuzzer cannot know the other side's fresh nonce, so a
//!   success would mean a MAC that verifies without the cookie. The acceptor never sends OK;
//! - each side reads at most two messages (`2 × (2 + MAX_MESSAGE)` bytes), and no more than
//!   the length prefix of a message whose length is out of bounds;
//! - what each side wrote is well-formed, and is what the protocol says for the error it
//!   returned: the acceptor a CHALLENGE under its own name (after asking `cookie_for` exactly
//!   once, for the name in the HELLO), then a REJECT(2) for `UnknownNode` and `BadMac`, a
//!   REJECT(3) for a malformed message, nothing for an I/O error; the dialer a HELLO, then a
//!   RESPONSE only to a CHALLENGE under the name it dialed;
//! - a message that parses is the canonical encoding of what it parsed to (`encode_*` gives
//!   the same bytes back), and its fields (the RESPONSE's `Lane` and `Session`, the OK's
//!   `MaxFrame`, `Incarnation` and `Delivered`) are where the layout puts them;
//! - in a session: untouched, both sides succeed, the acceptor learns the dialer's name, lane
//!   and session and the dialer gets the `Welcome` the acceptor sent; with one body byte
//!   changed on the way (the MACs cover every field), the side that reads it fails as the
//!   protocol says, and neither side ever succeeds with a value the other did not send.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, OnceLock};
use teleport_core::handshake::{
    accept, dial, encode_challenge, encode_hello, encode_ok, encode_reject, encode_response,
    parse_challenge, parse_hello, parse_reject, parse_response, parse_verdict, read_message,
    write_message, Dialer, HandshakeError, Hello, Welcome, MAC_LEN, MAX_MESSAGE, NONCE_LEN,
    REJECT_BAD_MAC, REJECT_PROTOCOL, TAG_CHALLENGE, TAG_OK, TAG_REJECT, TAG_RESPONSE, VERSION,
};
use teleport_fuzz::run_check_with_budget;

/// The dialer's node name, the one node the acceptor has a cookie for.
const DIALER: &[u8] = b"a@host";
/// The acceptor's node name.
const ACCEPTOR: &[u8] = b"b@host";
const COOKIE: &[u8] = b"SECRETCOOKIEXYZ";
/// The lane and session the dialer dials for.
const LANE: u16 = 0x0102;
const SESSION: u64 = 0x0304_0506_0708_090A;
/// What a RESPONSE and an OK body are: tag, MAC, then the fields.
const RESPONSE_LEN: usize = 1 + MAC_LEN + 2 + 8;
const OK_LEN: usize = 1 + MAC_LEN + 4 + 8 + 8;

/// The most heap one input may add, all checks included.
const BUDGET: usize = 4 * MAX_MESSAGE + 4096;
/// What a session may add to that: the pipes' channels (a block of messages each), the
/// messages on their way, the acceptor thread's share.
const SESSION_BUDGET: usize = 32 * 1024;
/// The most one side may read: two messages.
const MAX_READ: usize = 2 * (2 + MAX_MESSAGE);
/// Room for what one side writes (two messages), reserved once, outside the budget.
const OUT_CAP: usize = 2 * (2 + MAX_MESSAGE);

thread_local! {
    static OUT: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(OUT_CAP));
}

fuzz_target!(|data: &[u8]| {
    OUT.with(|out| out.borrow_mut().clear());
    let budget = if is_session(data) {
        // Started once, outside any input's budget.
        acceptor_worker();
        BUDGET + SESSION_BUDGET
    } else {
        BUDGET
    };
    run_check_with_budget(data, budget, check)
});

fn check(data: &[u8]) {
    OUT.with(|out| {
        let out = &mut *out.borrow_mut();
        check_accept(data, out);
        out.clear();
        check_dial(data, out);
        out.clear();
    });
    check_parsers(data);
    check_session(data);
}

/// The other side of the connection: reads come from the input, writes go to `out`.
struct Duplex<'a> {
    input: &'a [u8],
    pos: usize,
    out: &'a mut Vec<u8>,
}

impl Read for Duplex<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.input.len() - self.pos);
        buf[..n].copy_from_slice(&self.input[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for Duplex<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        assert!(
            self.out.len() + buf.len() <= OUT_CAP,
            "a side wrote more than two messages"
        );
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The message bodies in `bytes`, which must be whole, well-formed messages (at most two).
fn written(bytes: &[u8]) -> ([&[u8]; 2], usize) {
    let mut bodies: [&[u8]; 2] = [&[], &[]];
    let (mut n, mut rest) = (0, bytes);
    while !rest.is_empty() {
        assert!(n < 2, "more than two messages written");
        assert!(rest.len() >= 2, "a message cut in its length");
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        assert!((1..=MAX_MESSAGE).contains(&len), "a message of {len} bytes");
        assert!(rest.len() >= 2 + len, "a message cut in its body");
        bodies[n] = &rest[2..2 + len];
        rest = &rest[2 + len..];
        n += 1;
    }
    (bodies, n)
}

/// The first message of `data` as a peer would read it, if it is whole and well-formed.
fn first_message(data: &[u8]) -> Option<&[u8]> {
    let len = usize::from(u16::from_be_bytes([*data.first()?, *data.get(1)?]));
    if !(1..=MAX_MESSAGE).contains(&len) {
        return None;
    }
    data.get(2..2 + len)
}

/// Whether the first two bytes are a length prefix that must be refused unread.
fn bad_prefix(data: &[u8]) -> bool {
    data.len() >= 2
        && !(1..=MAX_MESSAGE).contains(&usize::from(u16::from_be_bytes([data[0], data[1]])))
}

fn check_accept(data: &[u8], out: &mut Vec<u8>) {
    let mut asked = 0;
    let mut asked_name = [0u8; 255];
    let mut asked_len = 0;
    let mut duplex = Duplex {
        input: data,
        pos: 0,
        out,
    };
    let result = accept(&mut duplex, ACCEPTOR, |name| {
        asked += 1;
        assert!(
            (1..=255).contains(&name.len()) && std::str::from_utf8(name).is_ok(),
            "cookie_for asked about a name that is not 1..=255 bytes of UTF-8"
        );
        asked_name[..name.len()].copy_from_slice(name);
        asked_len = name.len();
        (name == DIALER).then(|| COOKIE.to_vec())
    });
    let read = duplex.pos;
    let err = match result {
        // Then `Proven::welcome` would send the OK; it must not come to that.
        Ok(proven) => panic!(
            "the acceptor authenticated {:?} (lane {}, session {}) from arbitrary bytes",
            String::from_utf8_lossy(&proven.dialer.name),
            proven.dialer.lane,
            proven.dialer.session
        ),
        Err(e) => e,
    };
    assert!(read <= MAX_READ, "the acceptor read {read} bytes");
    if bad_prefix(data) {
        assert_eq!(read, 2, "a bad length prefix was read past");
    }
    let (sent, n) = written(duplex.out);
    assert!(
        sent[..n].iter().all(|m| m[0] != TAG_OK),
        "the acceptor sent OK"
    );
    let challenged = n > 0 && sent[0][0] == TAG_CHALLENGE;
    if challenged {
        let challenge = parse_challenge(sent[0]).expect("the acceptor's CHALLENGE parses");
        assert_eq!(challenge.name, ACCEPTOR);
        assert_eq!(asked, 1, "cookie_for asked {asked} times");
        // The name it asked about is the one in the input's HELLO.
        let hello = parse_hello(first_message(data).expect("a HELLO was read"))
            .expect("the HELLO that was answered parses");
        assert_eq!(hello.name, &asked_name[..asked_len]);
    } else {
        assert_eq!(asked, 0, "cookie_for asked, but no CHALLENGE sent");
    }
    let reject = |code: u8| encode_reject(code);
    match &err {
        HandshakeError::Io(_) => {
            assert!(n == usize::from(challenged), "{err:?} after {n} messages")
        }
        HandshakeError::BadMagic | HandshakeError::BadVersion(_) => {
            assert!(n == 1 && sent[0] == reject(REJECT_PROTOCOL), "{err:?}");
        }
        HandshakeError::Malformed(_) => {
            let at = usize::from(challenged);
            assert!(
                n == at + 1 && sent[at] == reject(REJECT_PROTOCOL),
                "{err:?}"
            );
        }
        HandshakeError::UnknownNode | HandshakeError::BadMac => {
            assert!(
                challenged && n == 2 && sent[1] == reject(REJECT_BAD_MAC),
                "{err:?}"
            );
            let known = &asked_name[..asked_len] == DIALER;
            assert_eq!(known, matches!(err, HandshakeError::BadMac), "{err:?}");
        }
        HandshakeError::WrongPeer | HandshakeError::Rejected(_) => {
            panic!("the acceptor failed with a dialer's error: {err:?}")
        }
    }
}

fn check_dial(data: &[u8], out: &mut Vec<u8>) {
    let mut duplex = Duplex {
        input: data,
        pos: 0,
        out,
    };
    let result = dial(&mut duplex, DIALER, ACCEPTOR, COOKIE, LANE, SESSION);
    let read = duplex.pos;
    let err = match result {
        Ok(welcome) => {
            panic!("the dialer accepted an acceptor that cannot know its nonce: {welcome:?}")
        }
        Err(e) => e,
    };
    assert!(read <= MAX_READ, "the dialer read {read} bytes");
    if bad_prefix(data) {
        assert_eq!(read, 2, "a bad length prefix was read past");
    }
    let (sent, n) = written(duplex.out);
    assert!(n >= 1, "no HELLO sent");
    let hello = parse_hello(sent[0]).expect("the dialer's HELLO parses");
    assert_eq!(hello.name, DIALER);
    // A RESPONSE goes only to a CHALLENGE under the name dialed.
    let challenge = first_message(data).map(parse_challenge);
    let answered = matches!(&challenge, Some(Ok(c)) if c.name == ACCEPTOR);
    assert_eq!(n, 1 + usize::from(answered), "{err:?}");
    if answered {
        let response = parse_response(sent[1]).expect("the dialer's RESPONSE parses");
        assert_eq!(
            (response.lane, response.session),
            (LANE, SESSION),
            "the RESPONSE is for another lane or session"
        );
    }
    // The acceptor's answer to the RESPONSE, if there was one.
    let verdict = first_message(data)
        .filter(|_| answered)
        .and_then(|m| first_message(&data[2 + m.len()..]));
    match &err {
        HandshakeError::WrongPeer => assert!(matches!(challenge, Some(Ok(_))) && !answered),
        HandshakeError::BadMac => {
            assert!(
                matches!(verdict.map(parse_verdict), Some(Ok(_))),
                "BadMac without an OK"
            );
        }
        HandshakeError::Rejected(code) => {
            // A REJECT instead of the CHALLENGE, or instead of the OK.
            let reject = if answered {
                verdict
            } else {
                first_message(data)
            };
            assert_eq!(reject, Some(&[TAG_REJECT, *code][..]));
        }
        HandshakeError::Io(_) | HandshakeError::Malformed(_) => {}
        HandshakeError::BadMagic | HandshakeError::BadVersion(_) | HandshakeError::UnknownNode => {
            panic!("the dialer failed with an acceptor's error: {err:?}")
        }
    }
}

fn check_parsers(data: &[u8]) {
    match read_message(&mut &data[..]) {
        Ok(body) => {
            assert!((1..=MAX_MESSAGE).contains(&body.len()));
            assert_eq!(Some(&body[..]), first_message(data));
        }
        Err(HandshakeError::Malformed(_)) => assert!(bad_prefix(data)),
        Err(HandshakeError::Io(e)) => {
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
            assert!(first_message(data).is_none() && !bad_prefix(data));
        }
        Err(e) => panic!("read_message failed with {e:?}"),
    }

    let mut framed = Vec::new();
    match write_message(&mut framed, data) {
        Ok(()) => {
            assert!((1..=MAX_MESSAGE).contains(&data.len()));
            assert_eq!(first_message(&framed), Some(data));
            assert_eq!(framed.len(), 2 + data.len());
        }
        Err(HandshakeError::Malformed(_)) => {
            assert!(!(1..=MAX_MESSAGE).contains(&data.len()));
            assert!(framed.is_empty());
        }
        Err(e) => panic!("write_message failed with {e:?}"),
    }
    drop(framed);

    let is_reject = matches!(data, [TAG_REJECT, _]);
    match parse_hello(data) {
        Ok(hello) => assert_eq!(encode_hello(&hello).expect("re-encodes"), data),
        Err(HandshakeError::BadMagic) => assert!(data.len() >= 5 && !data.starts_with(b"HTLPT")),
        Err(HandshakeError::BadVersion(v)) => {
            assert!(data.len() >= 6 && data[5] == v && v != VERSION)
        }
        Err(HandshakeError::Malformed(_)) => {}
        Err(e) => panic!("parse_hello failed with {e:?}"),
    }
    match parse_challenge(data) {
        Ok(challenge) => assert_eq!(encode_challenge(&challenge).expect("re-encodes"), data),
        Err(HandshakeError::Rejected(code)) => assert!(is_reject && data[1] == code),
        Err(HandshakeError::Malformed(_)) => assert!(!is_reject),
        Err(e) => panic!("parse_challenge failed with {e:?}"),
    }
    match parse_response(data) {
        Ok(response) => {
            assert_eq!(encode_response(&response), data);
            assert_eq!(data.len(), RESPONSE_LEN);
            assert_eq!(response.mac, data[1..1 + MAC_LEN]);
            let fields = &data[1 + MAC_LEN..];
            assert_eq!(response.lane, u16::from_be_bytes([fields[0], fields[1]]));
            assert_eq!(response.session, be64(&fields[2..10]));
        }
        Err(HandshakeError::Malformed(_)) => {
            assert!(data.first() != Some(&TAG_RESPONSE) || data.len() != RESPONSE_LEN)
        }
        Err(e) => panic!("parse_response failed with {e:?}"),
    }
    match parse_verdict(data) {
        Ok(accepted) => {
            assert_eq!(encode_ok(&accepted), data);
            assert_eq!(data.len(), OK_LEN);
            assert_eq!(accepted.mac, data[1..1 + MAC_LEN]);
            let fields = &data[1 + MAC_LEN..];
            let w = accepted.welcome;
            assert_eq!(
                w.max_frame,
                u32::from_be_bytes(fields[..4].try_into().unwrap())
            );
            assert_eq!(w.incarnation, be64(&fields[4..12]));
            assert_eq!(w.delivered, be64(&fields[12..20]));
        }
        Err(HandshakeError::Malformed(_)) if data.first() == Some(&TAG_OK) => {
            assert_ne!(data.len(), OK_LEN)
        }
        Err(HandshakeError::Rejected(code)) => assert!(is_reject && data[1] == code),
        Err(HandshakeError::Malformed(_)) => assert!(!is_reject),
        Err(e) => panic!("parse_verdict failed with {e:?}"),
    }
    match parse_reject(data) {
        Ok(code) => assert!(is_reject && data[1] == code),
        Err(HandshakeError::Malformed(_)) => assert!(!is_reject),
        Err(e) => panic!("parse_reject failed with {e:?}"),
    }
    // A node name taken from the input: encoded if and only if it is 1..=255 bytes of UTF-8,
    // and then parsed back.
    let name = &data[..data.len().min(256)];
    let hello = Hello {
        name: name.to_vec(),
        nonce: [7; NONCE_LEN],
    };
    let valid = (1..=255).contains(&name.len()) && std::str::from_utf8(name).is_ok();
    match encode_hello(&hello) {
        Ok(body) => {
            assert!(valid);
            assert_eq!(parse_hello(&body).expect("parses back"), hello);
        }
        Err(HandshakeError::Malformed(_)) => assert!(!valid),
        Err(e) => panic!("encode_hello failed with {e:?}"),
    }
}

fn be64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes.try_into().unwrap())
}

/// The bodies one side of an honest session writes, their lengths: the dialer's HELLO and
/// RESPONSE, the acceptor's CHALLENGE and OK.
const HELLO_LEN: usize = 1 + 4 + 1 + 1 + DIALER.len() + NONCE_LEN;
const CHALLENGE_LEN: usize = 1 + 1 + ACCEPTOR.len() + NONCE_LEN;
/// The input of a session: 'S', then the fields and the tampering.
const SESSION_INPUT: usize = 1 + 2 + 8 + 4 + 8 + 8 + 1 + 2 + 1;

/// One end of an in-memory connection: what it writes goes to the other end, one message at
/// a time, with one body byte changed if the session says so; a read with nothing there
/// waits for the other end, and ends (0) once the other end is gone.
struct Pipe {
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
    pending: Vec<u8>,
    taken: usize,
    /// Body bytes written so far.
    sent: usize,
    /// The body byte to change (counted over all the bodies this end writes) and how.
    tamper: Option<(usize, u8)>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.taken == self.pending.len() {
            match self.rx.recv() {
                Ok(bytes) => (self.pending, self.taken) = (bytes, 0),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.pending.len() - self.taken);
        buf[..n].copy_from_slice(&self.pending[self.taken..self.taken + n]);
        self.taken += n;
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // `write_message` writes a message whole, in one call: the tampering, which keeps
        // clear of the length prefixes (a longer length would leave both sides waiting),
        // relies on it.
        assert!(buf.len() >= 2, "a write of {} bytes", buf.len());
        let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
        assert_eq!(buf.len(), 2 + len, "a message written in pieces");
        let mut bytes = buf.to_vec();
        if let Some((at, xor)) = self.tamper {
            if (self.sent..self.sent + len).contains(&at) {
                bytes[2 + at - self.sent] ^= xor;
            }
        }
        self.sent += len;
        // The other end may be gone already (it failed); what it would not read is lost.
        let _ = self.tx.send(bytes);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn pipes(dialer_tamper: Option<(usize, u8)>, acceptor_tamper: Option<(usize, u8)>) -> [Pipe; 2] {
    let (to_acceptor, from_dialer) = channel();
    let (to_dialer, from_acceptor) = channel();
    let end = |tx, rx, tamper| Pipe {
        tx,
        rx,
        pending: Vec::new(),
        taken: 0,
        sent: 0,
        tamper,
    };
    [
        end(to_acceptor, from_acceptor, dialer_tamper),
        end(to_dialer, from_dialer, acceptor_tamper),
    ]
}

/// Whether the input describes a session.
fn is_session(data: &[u8]) -> bool {
    data.len() >= SESSION_INPUT && data[0] == b'S'
}

/// What the acceptor of a session ends with: the proven dialer and what `welcome` returned.
type Welcomed = Result<(Dialer, Result<Dialer, HandshakeError>), HandshakeError>;

/// One session's acceptor side: its end of the pipes and the `Welcome` it sends.
struct Job {
    end: Pipe,
    welcome: Welcome,
}

/// The thread that plays the acceptor of every session (one thread for the whole run: a
/// thread per input would cost more than the session).
struct Worker {
    jobs: Sender<Job>,
    /// What each session's acceptor ended with, and how often it asked `cookie_for`.
    done: Mutex<Receiver<(Welcomed, usize)>>,
}

fn acceptor_worker() -> &'static Worker {
    static WORKER: OnceLock<Worker> = OnceLock::new();
    WORKER.get_or_init(|| {
        let (jobs, todo) = channel::<Job>();
        let (report, done) = channel();
        std::thread::spawn(move || {
            for mut job in todo {
                let mut asked = 0;
                let proven = accept(&mut job.end, ACCEPTOR, |name| {
                    asked += 1;
                    (name == DIALER).then(|| COOKIE.to_vec())
                });
                let welcomed = proven.map(|p| {
                    let dialer = p.dialer.clone();
                    (dialer, p.welcome(&mut job.end, &job.welcome))
                });
                // Gone: a dialer still waiting for an answer reads the end of the stream.
                drop(job.end);
                if report.send((welcomed, asked)).is_err() {
                    return;
                }
            }
        });
        Worker {
            jobs,
            done: Mutex::new(done),
        }
    })
}

/// A real session, as the input describes it: the values the dialer and the acceptor send,
/// and a body byte that one of them sends changed on the way (`Xor` 0: none).
///
/// Untouched, both succeed, and each learns what the other sent. Otherwise, by where the
/// byte is (the bodies of one direction counted in turn):
/// - the dialer's HELLO: the acceptor refuses (a bad magic, version, name: REJECT(3); a name
///   it has no cookie for, a nonce that is not the dialer's: REJECT(2)), so the dialer gets
///   `Rejected`;
/// - the RESPONSE's tag: REJECT(3); its MAC, lane or session: `BadMac` and REJECT(2);
/// - the CHALLENGE: the dialer refuses it (`Malformed`, `WrongPeer`) or answers a nonce that
///   is not the acceptor's, which then refuses it (`BadMac`); the acceptor fails either way;
/// - the OK's tag: `Malformed`; its MAC or fields: `BadMac`; the acceptor succeeded (it does
///   not wait for an answer to its OK).
///
/// Whenever a side succeeds, it is with exactly what the other side sent.
fn check_session(data: &[u8]) {
    if !is_session(data) {
        return;
    }
    let d = &data[1..];
    let lane = u16::from_be_bytes([d[0], d[1]]);
    let session = be64(&d[2..10]);
    let welcome = Welcome {
        max_frame: u32::from_be_bytes(d[10..14].try_into().unwrap()),
        incarnation: be64(&d[14..22]),
        delivered: be64(&d[22..30]),
    };
    let towards_dialer = d[30] & 1 != 0;
    let at = usize::from(u16::from_be_bytes([d[31], d[32]]));
    let xor = d[33];
    let tamper = (xor != 0).then_some((at, xor));
    let (dialer_tamper, acceptor_tamper) = if towards_dialer {
        (None, tamper)
    } else {
        (tamper, None)
    };
    let [mut dialer_end, acceptor_end] = pipes(dialer_tamper, acceptor_tamper);
    let worker = acceptor_worker();
    worker
        .jobs
        .send(Job {
            end: acceptor_end,
            welcome,
        })
        .expect("the acceptor's thread is gone");
    let dialed = dial(&mut dialer_end, DIALER, ACCEPTOR, COOKIE, lane, session);
    // Gone: an acceptor still waiting for the RESPONSE reads the end of the stream.
    drop(dialer_end);
    let (accepted, asked) = worker
        .done
        .lock()
        .unwrap()
        .recv()
        .expect("the acceptor's thread is gone");
    assert!(asked <= 1, "cookie_for asked {asked} times");
    let honest = Dialer {
        name: DIALER.to_vec(),
        lane,
        session,
    };
    // Whoever succeeds has what the other side sent.
    if let Ok((proven, welcomed)) = &accepted {
        assert_eq!(*proven, honest, "the acceptor proved another dialer");
        match welcomed {
            Ok(dialer) => assert_eq!(*dialer, honest),
            Err(e) => panic!("the OK could not be sent: {e:?}"),
        }
    }
    if let Ok(w) = &dialed {
        assert_eq!(*w, welcome, "the dialer was told something else");
    }

    let role = |r: &Result<(Dialer, Result<Dialer, HandshakeError>), HandshakeError>| match r {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("{e:?}"),
    };
    let outcome = format!(
        "dialer {:?}, acceptor {}",
        dialed.as_ref().map(|_| ()),
        role(&accepted)
    );
    let rejected = |code| matches!(dialed, Err(HandshakeError::Rejected(c)) if c == code);
    let accepted_err = accepted.as_ref().err();
    match tamper {
        // What an untampered session, or one changed past what is sent, ends with.
        None => assert!(dialed.is_ok() && accepted.is_ok(), "{outcome}"),
        Some((at, _)) if !towards_dialer => {
            if at < HELLO_LEN {
                let code = match accepted_err {
                    Some(HandshakeError::UnknownNode | HandshakeError::BadMac) => REJECT_BAD_MAC,
                    Some(
                        HandshakeError::BadMagic
                        | HandshakeError::BadVersion(_)
                        | HandshakeError::Malformed(_),
                    ) => REJECT_PROTOCOL,
                    _ => panic!("a changed HELLO: {outcome}"),
                };
                assert!(rejected(code), "a changed HELLO: {outcome}");
            } else if at == HELLO_LEN {
                assert!(
                    matches!(accepted_err, Some(HandshakeError::Malformed(_)))
                        && rejected(REJECT_PROTOCOL),
                    "a changed RESPONSE tag: {outcome}"
                );
            } else if at < HELLO_LEN + RESPONSE_LEN {
                assert!(
                    matches!(accepted_err, Some(HandshakeError::BadMac))
                        && rejected(REJECT_BAD_MAC),
                    "a changed RESPONSE: {outcome}"
                );
            } else {
                assert!(dialed.is_ok() && accepted.is_ok(), "{outcome}");
            }
        }
        Some((at, _)) => {
            if at < CHALLENGE_LEN {
                assert!(
                    accepted.is_err()
                        && matches!(
                            dialed,
                            Err(HandshakeError::Malformed(_)
                                | HandshakeError::WrongPeer
                                | HandshakeError::Rejected(REJECT_BAD_MAC))
                        ),
                    "a changed CHALLENGE: {outcome}"
                );
            } else if at == CHALLENGE_LEN {
                assert!(
                    accepted.is_ok() && matches!(dialed, Err(HandshakeError::Malformed(_))),
                    "a changed OK tag: {outcome}"
                );
            } else if at < CHALLENGE_LEN + OK_LEN {
                assert!(
                    accepted.is_ok() && matches!(dialed, Err(HandshakeError::BadMac)),
                    "a changed OK: {outcome}"
                );
            } else {
                assert!(dialed.is_ok() && accepted.is_ok(), "{outcome}");
            }
        }
    }
}
