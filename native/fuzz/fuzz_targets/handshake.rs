//! `handshake`: arbitrary bytes as what the other side of a handshake sends.
//!
//! Every input goes, over an in-memory duplex (reads from the input, writes kept in a buffer
//! allocated once), to:
//! - `handshake::accept` as node `b@host`, as the bytes a dialer sends; `cookie_for` knows one
//!   node, `a@host`;
//! - `handshake::dial` as `a@host` dialing `b@host`, as the bytes the acceptor sends;
//! - every pub parser: `read_message`, `parse_hello`, `parse_challenge`, `parse_response`,
//!   `parse_verdict`, `parse_reject`; and `write_message` and `encode_hello` with the input.
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
//!   the same bytes back).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;
use std::io::{self, Read, Write};
use teleport_core::handshake::{
    accept, dial, encode_challenge, encode_hello, encode_ok, encode_reject, encode_response,
    parse_challenge, parse_hello, parse_reject, parse_response, parse_verdict, read_message,
    write_message, HandshakeError, Hello, MAX_MESSAGE, NONCE_LEN, REJECT_BAD_MAC, REJECT_PROTOCOL,
    TAG_CHALLENGE, TAG_OK, TAG_REJECT, VERSION,
};
use teleport_fuzz::run_check_with_budget;

/// The dialer's node name, the one node the acceptor has a cookie for.
const DIALER: &[u8] = b"a@host";
/// The acceptor's node name.
const ACCEPTOR: &[u8] = b"b@host";
const COOKIE: &[u8] = b"SECRETCOOKIEXYZ";

/// The most heap one input may add, all checks included.
const BUDGET: usize = 4 * MAX_MESSAGE + 4096;
/// The most one side may read: two messages.
const MAX_READ: usize = 2 * (2 + MAX_MESSAGE);
/// Room for what one side writes (two messages), reserved once, outside the budget.
const OUT_CAP: usize = 2 * (2 + MAX_MESSAGE);

thread_local! {
    static OUT: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(OUT_CAP));
}

fuzz_target!(|data: &[u8]| {
    OUT.with(|out| out.borrow_mut().clear());
    run_check_with_budget(data, BUDGET, check)
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
    let result = accept(&mut duplex, ACCEPTOR, 1 << 20, |name| {
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
        Ok(dialer) => panic!(
            "the acceptor authenticated {:?} from arbitrary bytes",
            String::from_utf8_lossy(&dialer.name)
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
    let result = dial(&mut duplex, DIALER, ACCEPTOR, COOKIE, 0);
    let read = duplex.pos;
    let Err(err) = result else {
        panic!("the dialer accepted an acceptor that cannot know its nonce");
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
        parse_response(sent[1]).expect("the dialer's RESPONSE parses");
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
        Ok(response) => assert_eq!(encode_response(&response), data),
        Err(HandshakeError::Malformed(_)) => {}
        Err(e) => panic!("parse_response failed with {e:?}"),
    }
    match parse_verdict(data) {
        Ok(accepted) => assert_eq!(encode_ok(&accepted), data),
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
