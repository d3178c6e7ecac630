//! The authentication handshake that opens every teleport connection, before any data frame.
//!
//! Both nodes share the Erlang cookie. The dialer (sender) and the acceptor (receiver) each send
//! a fresh 32-byte nonce and each prove knowledge of the cookie with an HMAC-SHA256 over both
//! nonces and both node names, so neither proof can be replayed into another session. The two
//! proofs use different labels so that one side's MAC can never be reflected back as the other's.
//!
//! As in Erlang's own distribution handshake, the dialer proves itself first and the acceptor
//! proves itself only to a dialer that has. Anyone who can reach the listening port therefore
//! gets no MAC to test cookie guesses against offline: only a CHALLENGE (two names and a nonce)
//! and then a REJECT. The other side of that coin is that a dialer hands its MAC to whatever
//! answers at the address it dials, so cookies must be long and random whatever the protocol.
//!
//! Every message is `Len:16/big, Body:Len/bytes` with `1 <= Len <= MAX_MESSAGE`; `Body` starts
//! with a tag byte:
//!
//! ```text
//! dialer -> acceptor  HELLO      'H', "TLPT", VERSION, NameLen:8, DialerName, NonceD:32
//! acceptor -> dialer  CHALLENGE  'C', NameLen:8, AcceptorName, NonceA:32
//!                     or REJECT  'R', Reason:8            (3: the HELLO was not understood)
//! dialer -> acceptor  RESPONSE   'A', MacD:32, Lane:16, Session:64
//! acceptor -> dialer  OK         'K', MacA:32, MaxFrame:32, Incarnation:64, Delivered:64
//!                     or REJECT  'R', Reason:8            (2: unknown node or wrong MacD,
//!                                                          3: the RESPONSE was malformed)
//!
//! MacD = HMAC-SHA256(Cookie, "teleport-dial\0\0\0" ++ NonceA ++ NonceD ++ Names
//!                            ++ Lane:16 ++ Session:64)
//! MacA = HMAC-SHA256(Cookie, "teleport-accept\0"   ++ NonceD ++ NonceA ++ Names
//!                            ++ MaxFrame:32 ++ Incarnation:64 ++ Delivered:64)
//! Names = len(DialerName):8 ++ DialerName ++ len(AcceptorName):8 ++ AcceptorName
//! ```
//!
//! Over TLS ([`crate::tls`]) both MACs also cover the session's binding, a value both ends
//! derive from their TLS session: `... ++ "tls\0" ++ Binding:32` after the names
//! ([`dial_bound`], [`accept_bound`]). A relay that terminates TLS towards each side holds
//! two sessions with two bindings, so the MAC it passes on from one does not verify on the
//! other: a certificate alone does not let a node in, nor does a relayed cookie proof.
//!
//! Besides authenticating, the handshake settles what delivery needs, each field covered by
//! its sender's MAC:
//! - `Lane`, which of the dialer's pool slots this connection serves, and `Session`, the
//!   dialer's pool (a new pool numbers its frames from 1 again). A sender that loses a
//!   connection opens a new one for the same slot, and the acceptor answers only once the
//!   old one's reader is done (see [`crate::lanes`]), so that the new one's frames never
//!   overtake the old one's.
//! - `Delivered`, the number of the last frame of the lane the acceptor delivered in that
//!   session: the dialer sends again, in order, every frame after it that it still holds
//!   (a dead connection takes unread frames with it; see [`crate::acks`]).
//! - `Incarnation`, the acceptor's listener (random at each start): when it changes, the
//!   acceptor cannot know what its earlier incarnation delivered, and the dialer drops (and
//!   counts) what it had written and not seen acknowledged, rather than deliver it twice.
//! - `MaxFrame`, the largest frame body the acceptor reads (its `max_frame_bytes`): the dialer
//!   refuses a larger message at once rather than sending what would close the connection.
//!
//! Version 3 (this one) added `Session`, `Incarnation` and `Delivered`; a node speaking
//! another version is refused by the acceptor, whose log line names both versions.
//!
//! The acceptor looks the dialer's cookie up once, right after the HELLO. For a node it has no
//! cookie for, it carries on exactly as for a known one, with a fresh nonce and a random
//! stand-in key, and refuses only after the RESPONSE with the same REJECT(2) as for a wrong
//! MAC: a prober cannot tell which node names the acceptor knows. (Reason 1,
//! [`REJECT_UNKNOWN_NODE`], is therefore never sent.)
//!
//! The dialer checks the name in the CHALLENGE before answering: a CHALLENGE under any other
//! name than the node it dialed gets no RESPONSE (the dialer closes). An OK whose MacA does not
//! verify means the acceptor does not know the cookie (it is an impostor); the dialer closes.
//!
//! All I/O is blocking and these functions set no timeouts. Socket timeouts bound each read
//! and write, not the handshake: a peer may trickle a byte per timeout. Pass a
//! [`crate::deadline::Deadline`] as the stream to bound the whole handshake; a timeout surfaces
//! as [`HandshakeError::Io`]. The parsers and serialisers are public and pure so that a fuzz
//! target can drive them directly.

use std::fmt;
use std::io::{self, Read, Write};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The handshake version this node speaks.
pub const VERSION: u8 = 3;
/// The largest handshake message body, in bytes; longer length prefixes are refused unread.
pub const MAX_MESSAGE: usize = 1024;
/// The magic that follows the HELLO tag and identifies the protocol.
pub const MAGIC: &[u8; 4] = b"TLPT";
/// Length of each side's random nonce.
pub const NONCE_LEN: usize = 32;
/// Length of an HMAC-SHA256 tag.
pub const MAC_LEN: usize = 32;

/// Tag of the dialer's HELLO.
pub const TAG_HELLO: u8 = b'H';
/// Tag of the acceptor's CHALLENGE.
pub const TAG_CHALLENGE: u8 = b'C';
/// Tag of the dialer's RESPONSE.
pub const TAG_RESPONSE: u8 = b'A';
/// Tag of the acceptor's final OK.
pub const TAG_OK: u8 = b'K';
/// Tag of the acceptor's REJECT.
pub const TAG_REJECT: u8 = b'R';

/// REJECT reason reserved for "the acceptor has no cookie for the dialer". Never sent: an
/// unknown node is refused with [`REJECT_BAD_MAC`], so that node names cannot be probed.
pub const REJECT_UNKNOWN_NODE: u8 = 1;
/// REJECT reason: the dialer's RESPONSE MAC was wrong, or the acceptor does not know the
/// dialer (the two are deliberately indistinguishable).
pub const REJECT_BAD_MAC: u8 = 2;
/// REJECT reason: bad version, bad magic or a malformed message.
pub const REJECT_PROTOCOL: u8 = 3;
/// REJECT reason: the acceptor runs TLS and the dialer opened in plain (sent before any
/// other message, in plain: the dialer reads it as the answer to its HELLO).
pub const REJECT_TLS_REQUIRED: u8 = 4;

// Distinct labels for the two proofs: without them the acceptor's MAC over (NonceD, NonceA)
// would be a valid dialer MAC in a session where the nonces are swapped. Both are 16 bytes.
const ACCEPT_LABEL: &[u8; 16] = b"teleport-accept\0";
const DIAL_LABEL: &[u8; 16] = b"teleport-dial\0\0\0";
/// What precedes a TLS session's binding in both MACs.
const BINDING_TAG: &[u8; 4] = b"tls\0";

type HmacSha256 = Hmac<Sha256>;

/// Why a handshake failed.
#[derive(Debug)]
pub enum HandshakeError {
    /// Reading or writing failed, including a read that timed out (`TimedOut`/`WouldBlock`)
    /// and the peer closing the connection (`UnexpectedEof`).
    Io(io::Error),
    /// A message was truncated, too long, empty, had trailing bytes or an unexpected tag; or a
    /// local argument (node name, cookie) was unusable. The text says which.
    Malformed(&'static str),
    /// The first message was not a teleport HELLO (another protocol is talking).
    BadMagic,
    /// The dialer speaks another handshake version (the one it announced).
    BadVersion(u8),
    /// Acceptor side: the acceptor has no cookie for the dialer's node name. The dialer was
    /// told REJECT(2), as for a wrong MAC.
    UnknownNode,
    /// Dialer side: the acceptor answered with a node name other than the one dialed.
    WrongPeer,
    /// The peer's MAC did not verify: it does not know the cookie, or the message is replayed.
    /// On the acceptor side the dialer was told REJECT(2); on the dialer side the acceptor had
    /// said OK but could not prove it knows the cookie.
    BadMac,
    /// Dialer side: the acceptor sent REJECT with this reason code (see the `REJECT_*`
    /// constants).
    Rejected(u8),
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "handshake I/O failed: {e}"),
            Self::Malformed(what) => write!(f, "malformed handshake: {what}"),
            Self::BadMagic => f.write_str("peer does not speak the teleport protocol (bad magic)"),
            Self::BadVersion(v) => write!(
                f,
                "peer speaks teleport handshake version {v}, this node speaks {VERSION}"
            ),
            Self::UnknownNode => {
                f.write_str("dialing node is unknown or not connected over distributed Erlang")
            }
            Self::WrongPeer => f.write_str("peer is not the node that was dialed"),
            Self::BadMac => f.write_str("peer proved no knowledge of the cookie"),
            Self::Rejected(code) => {
                f.write_str("peer rejected the handshake: ")?;
                match *code {
                    REJECT_UNKNOWN_NODE => f.write_str("it does not know this node"),
                    REJECT_BAD_MAC => f.write_str(
                        "it does not know this node, or this node proved no knowledge of the cookie",
                    ),
                    REJECT_PROTOCOL => f.write_str("bad version or protocol"),
                    REJECT_TLS_REQUIRED => f.write_str(
                        "it requires TLS (its teleport runs TLS, this node's runs plain: tls => false)",
                    ),
                    other => write!(f, "reason code {other}"),
                }
            }
        }
    }
}

impl std::error::Error for HandshakeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// The dialer's first message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The dialer's node name (UTF-8, 1..=255 bytes).
    pub name: Vec<u8>,
    /// The dialer's nonce.
    pub nonce: [u8; NONCE_LEN],
}

/// The acceptor's answer to a HELLO: its name and nonce, and no proof yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The acceptor's node name (UTF-8, 1..=255 bytes).
    pub name: Vec<u8>,
    /// The acceptor's nonce.
    pub nonce: [u8; NONCE_LEN],
}

/// The dialer's proof that it knows the cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The dialer's proof, `MacD`.
    pub mac: [u8; MAC_LEN],
    /// The dialer's pool slot this connection serves.
    pub lane: u16,
    /// The dialer's pool.
    pub session: u64,
}

/// What the acceptor's OK tells the dialer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    /// The largest frame body the acceptor reads.
    pub max_frame: u32,
    /// The acceptor's listener, random at each start.
    pub incarnation: u64,
    /// The last frame of the lane delivered in the dialer's session (0: none).
    pub delivered: u64,
}

/// The acceptor's OK, with its proof that it knows the cookie too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The acceptor's proof, `MacA`.
    pub mac: [u8; MAC_LEN],
    /// What it tells.
    pub welcome: Welcome,
}

/// What the acceptor learns of an authenticated dialer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dialer {
    /// Its node name.
    pub name: Vec<u8>,
    /// The pool slot the connection serves.
    pub lane: u16,
    /// The dialer's pool.
    pub session: u64,
}

/// A dialer that proved it knows the cookie, not yet answered: the acceptor finds out what
/// the lane delivered, then [`Proven::welcome`]s it.
#[derive(Debug)]
pub struct Proven {
    /// Who it is.
    pub dialer: Dialer,
    cookie: Vec<u8>,
    nonce_d: [u8; NONCE_LEN],
    nonce_a: [u8; NONCE_LEN],
    me: Vec<u8>,
    /// The TLS session's binding both MACs cover, if the connection runs over TLS.
    binding: Option<Vec<u8>>,
}

/// Reads one message and returns its body.
///
/// The length prefix is checked (`1..=MAX_MESSAGE`) before anything is allocated or read past
/// it, so a peer speaking another protocol costs at most two bytes read.
pub fn read_message<R: Read>(r: &mut R) -> Result<Vec<u8>, HandshakeError> {
    let mut prefix = [0u8; 2];
    r.read_exact(&mut prefix)?;
    let len = usize::from(u16::from_be_bytes(prefix));
    if len == 0 {
        return Err(HandshakeError::Malformed("empty message"));
    }
    if len > MAX_MESSAGE {
        return Err(HandshakeError::Malformed("message longer than 1024 bytes"));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

/// Writes one message (length prefix and body) and flushes it.
pub fn write_message<W: Write>(w: &mut W, body: &[u8]) -> Result<(), HandshakeError> {
    if body.is_empty() || body.len() > MAX_MESSAGE {
        return Err(HandshakeError::Malformed(
            "message body must be 1..=1024 bytes",
        ));
    }
    // One buffer, one write: the prefix and body travel in the same segment even with Nagle on.
    let mut buf = Vec::with_capacity(2 + body.len());
    buf.extend_from_slice(&(body.len() as u16).to_be_bytes());
    buf.extend_from_slice(body);
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Parses a HELLO body. A body that does not start with `'H', "TLPT"` is [`HandshakeError::BadMagic`]
/// (a prefix of it is [`HandshakeError::Malformed`], being merely truncated).
pub fn parse_hello(body: &[u8]) -> Result<Hello, HandshakeError> {
    let mut f = Fields(body);
    let signature = f.take(1 + MAGIC.len(), "truncated HELLO signature")?;
    if signature[0] != TAG_HELLO || &signature[1..] != MAGIC {
        return Err(HandshakeError::BadMagic);
    }
    let version = f.byte("truncated before version")?;
    if version != VERSION {
        return Err(HandshakeError::BadVersion(version));
    }
    let name = f.name()?;
    let nonce = f.array("truncated nonce")?;
    f.finish()?;
    Ok(Hello { name, nonce })
}

/// Serialises a HELLO body; fails only if the name is not 1..=255 bytes of UTF-8.
pub fn encode_hello(hello: &Hello) -> Result<Vec<u8>, HandshakeError> {
    let len = name_len(&hello.name)?;
    let mut body = Vec::with_capacity(7 + hello.name.len() + NONCE_LEN);
    body.push(TAG_HELLO);
    body.extend_from_slice(MAGIC);
    body.push(VERSION);
    body.push(len);
    body.extend_from_slice(&hello.name);
    body.extend_from_slice(&hello.nonce);
    Ok(body)
}

/// Parses a CHALLENGE body. A REJECT body is [`HandshakeError::Rejected`] with its code, so the
/// dialer can pass whatever the acceptor answered straight here.
pub fn parse_challenge(body: &[u8]) -> Result<Challenge, HandshakeError> {
    let mut f = Fields(body);
    match f.byte("empty CHALLENGE")? {
        TAG_CHALLENGE => {}
        TAG_REJECT => return Err(HandshakeError::Rejected(parse_reject(body)?)),
        _ => return Err(HandshakeError::Malformed("expected CHALLENGE")),
    }
    let name = f.name()?;
    let nonce = f.array("truncated nonce")?;
    f.finish()?;
    Ok(Challenge { name, nonce })
}

/// Serialises a CHALLENGE body; fails only if the name is not 1..=255 bytes of UTF-8.
pub fn encode_challenge(challenge: &Challenge) -> Result<Vec<u8>, HandshakeError> {
    let len = name_len(&challenge.name)?;
    let mut body = Vec::with_capacity(2 + challenge.name.len() + NONCE_LEN);
    body.push(TAG_CHALLENGE);
    body.push(len);
    body.extend_from_slice(&challenge.name);
    body.extend_from_slice(&challenge.nonce);
    Ok(body)
}

/// Parses a RESPONSE body.
pub fn parse_response(body: &[u8]) -> Result<Response, HandshakeError> {
    let mut f = Fields(body);
    if f.byte("empty RESPONSE")? != TAG_RESPONSE {
        return Err(HandshakeError::Malformed("expected RESPONSE"));
    }
    let mac = f.array("truncated MAC")?;
    let lane = u16::from_be_bytes(f.array("truncated lane")?);
    let session = u64::from_be_bytes(f.array("truncated session")?);
    f.finish()?;
    Ok(Response { mac, lane, session })
}

/// Serialises a RESPONSE body.
pub fn encode_response(response: &Response) -> Vec<u8> {
    let mut body = Vec::with_capacity(11 + MAC_LEN);
    body.push(TAG_RESPONSE);
    body.extend_from_slice(&response.mac);
    body.extend_from_slice(&response.lane.to_be_bytes());
    body.extend_from_slice(&response.session.to_be_bytes());
    body
}

/// Parses the acceptor's final answer: the OK with its MAC (not yet verified), or
/// [`HandshakeError::Rejected`] for a REJECT.
pub fn parse_verdict(body: &[u8]) -> Result<Accepted, HandshakeError> {
    let mut f = Fields(body);
    match f.byte("empty verdict")? {
        TAG_OK => {}
        TAG_REJECT => return Err(HandshakeError::Rejected(parse_reject(body)?)),
        _ => return Err(HandshakeError::Malformed("expected OK or REJECT")),
    }
    let mac = f.array("truncated MAC")?;
    let max_frame = u32::from_be_bytes(f.array("truncated max frame size")?);
    let incarnation = u64::from_be_bytes(f.array("truncated incarnation")?);
    let delivered = u64::from_be_bytes(f.array("truncated delivered")?);
    f.finish()?;
    Ok(Accepted {
        mac,
        welcome: Welcome {
            max_frame,
            incarnation,
            delivered,
        },
    })
}

/// Serialises an OK body.
pub fn encode_ok(accepted: &Accepted) -> Vec<u8> {
    let w = &accepted.welcome;
    let mut body = Vec::with_capacity(21 + MAC_LEN);
    body.push(TAG_OK);
    body.extend_from_slice(&accepted.mac);
    body.extend_from_slice(&w.max_frame.to_be_bytes());
    body.extend_from_slice(&w.incarnation.to_be_bytes());
    body.extend_from_slice(&w.delivered.to_be_bytes());
    body
}

/// Parses a REJECT body and returns its reason code.
pub fn parse_reject(body: &[u8]) -> Result<u8, HandshakeError> {
    match body {
        [TAG_REJECT, code] => Ok(*code),
        [TAG_REJECT] => Err(HandshakeError::Malformed("truncated REJECT")),
        [TAG_REJECT, ..] => Err(HandshakeError::Malformed("trailing bytes after REJECT")),
        _ => Err(HandshakeError::Malformed("expected REJECT")),
    }
}

/// Serialises a REJECT body with a reason code (see the `REJECT_*` constants).
pub fn encode_reject(code: u8) -> Vec<u8> {
    vec![TAG_REJECT, code]
}

/// Runs the dialer's side: proves to the node `peer` that this node `me` knows `cookie`, after
/// checking that `peer` answers under that name, then checks that `peer` knows the cookie too.
/// `lane` is the pool slot the connection is for, `session` the pool.
///
/// On success it returns what the acceptor told (its frame limit, its incarnation and what
/// the lane delivered), and the stream is positioned right after the handshake, ready for
/// data frames. On
/// [`HandshakeError::WrongPeer`] nothing more than the HELLO has been sent; on
/// [`HandshakeError::BadMac`] the acceptor said OK without knowing the cookie. Either way, and
/// on every other error, the caller should close the connection. An empty cookie is refused
/// before anything is sent.
pub fn dial<S: Read + Write>(
    s: &mut S,
    me: &[u8],
    peer: &[u8],
    cookie: &[u8],
    lane: u16,
    session: u64,
) -> Result<Welcome, HandshakeError> {
    dial_bound(s, me, peer, cookie, lane, session, None)
}

/// [`dial`] inside a TLS session whose binding ([`crate::tls::binding`]) both MACs cover
/// (`None`: a plain connection, as [`dial`]).
pub fn dial_bound<S: Read + Write>(
    s: &mut S,
    me: &[u8],
    peer: &[u8],
    cookie: &[u8],
    lane: u16,
    session: u64,
    binding: Option<&[u8]>,
) -> Result<Welcome, HandshakeError> {
    name_len(me)?;
    name_len(peer)?;
    if cookie.is_empty() {
        // An empty key still makes an HMAC, one that anybody can compute.
        return Err(HandshakeError::Malformed("the cookie is empty"));
    }
    let [nonce_d, _] = random()?;
    let hello = Hello {
        name: me.to_vec(),
        nonce: nonce_d,
    };
    write_message(s, &encode_hello(&hello)?)?;

    let challenge = parse_challenge(&read_message(s)?)?;
    if challenge.name != peer {
        // Our MAC would be bound to `peer`'s name and useless elsewhere, but it would still be
        // something to test cookie guesses against: send nothing.
        return Err(HandshakeError::WrongPeer);
    }
    let mac = dial_mac(
        cookie,
        &challenge.nonce,
        &nonce_d,
        me,
        peer,
        lane,
        session,
        binding,
    )?
    .finalize()
    .into_bytes()
    .into();
    write_message(s, &encode_response(&Response { mac, lane, session }))?;

    let accepted = parse_verdict(&read_message(s)?)?;
    // `verify_slice` compares in constant time.
    accept_mac(
        cookie,
        &nonce_d,
        &challenge.nonce,
        me,
        peer,
        &accepted.welcome,
        binding,
    )?
    .verify_slice(&accepted.mac)
    .map_err(|_| HandshakeError::BadMac)?;
    Ok(accepted.welcome)
}

/// Runs the acceptor's side as node `me` up to the dialer's proof, and returns the proven
/// dialer, still to be answered with [`Proven::welcome`] (which sends the OK).
///
/// `cookie_for` is asked once, right after the HELLO, for the cookie shared with the dialer, by
/// the name the dialer claims. `None` (or an empty cookie) refuses the dialer as
/// [`HandshakeError::UnknownNode`], but only after its RESPONSE and with the REJECT(2) of a
/// wrong MAC, so that a prober learns nothing about which names are known. Every refusal the
/// protocol can tell the dialer about is answered with a REJECT before the error is returned;
/// I/O failures are not.
pub fn accept<S: Read + Write>(
    s: &mut S,
    me: &[u8],
    cookie_for: impl FnOnce(&[u8]) -> Option<Vec<u8>>,
) -> Result<Proven, HandshakeError> {
    accept_bound(s, me, None, cookie_for)
}

/// [`accept`] inside a TLS session whose binding ([`crate::tls::binding`]) both MACs cover
/// (`None`: a plain connection, as [`accept`]).
pub fn accept_bound<S: Read + Write>(
    s: &mut S,
    me: &[u8],
    binding: Option<&[u8]>,
    cookie_for: impl FnOnce(&[u8]) -> Option<Vec<u8>>,
) -> Result<Proven, HandshakeError> {
    name_len(me)?;
    let hello = read_message(s).and_then(|body| parse_hello(&body));
    let hello = rejecting(s, REJECT_PROTOCOL, hello)?;

    // Both the nonce and a stand-in key come from one read, whether the key is needed or not,
    // so that known and unknown names take the same path at the same cost.
    let [nonce_a, stand_in] = random()?;
    let (cookie, known) = match cookie_for(&hello.name) {
        Some(cookie) if !cookie.is_empty() => (cookie, true),
        _ => (stand_in.to_vec(), false),
    };
    let challenge = Challenge {
        name: me.to_vec(),
        nonce: nonce_a,
    };
    write_message(s, &encode_challenge(&challenge)?)?;

    let response = read_message(s).and_then(|body| parse_response(&body));
    let response = rejecting(s, REJECT_PROTOCOL, response)?;
    // `verify_slice` compares in constant time. Under the stand-in key the MAC cannot verify
    // (but for a 2^-256 chance, which `known` rules out anyway).
    let mac_ok = dial_mac(
        &cookie,
        &nonce_a,
        &hello.nonce,
        &hello.name,
        me,
        response.lane,
        response.session,
        binding,
    )?
    .verify_slice(&response.mac)
    .is_ok();
    if !known {
        return rejecting(s, REJECT_BAD_MAC, Err(HandshakeError::UnknownNode));
    }
    if !mac_ok {
        return rejecting(s, REJECT_BAD_MAC, Err(HandshakeError::BadMac));
    }
    Ok(Proven {
        dialer: Dialer {
            name: hello.name,
            lane: response.lane,
            session: response.session,
        },
        cookie,
        nonce_d: hello.nonce,
        nonce_a,
        me: me.to_vec(),
        binding: binding.map(<[u8]>::to_vec),
    })
}

impl Proven {
    /// Sends the OK with what `welcome` tells; the stream is then positioned right after the
    /// handshake. Returns the dialer.
    pub fn welcome<S: Write>(self, s: &mut S, welcome: &Welcome) -> Result<Dialer, HandshakeError> {
        let mac = accept_mac(
            &self.cookie,
            &self.nonce_d,
            &self.nonce_a,
            &self.dialer.name,
            &self.me,
            welcome,
            self.binding.as_deref(),
        )?
        .finalize()
        .into_bytes()
        .into();
        write_message(
            s,
            &encode_ok(&Accepted {
                mac,
                welcome: *welcome,
            }),
        )?;
        Ok(self.dialer)
    }
}

/// Passes `result` through, first telling the peer REJECT(`code`) if it is a protocol error.
/// I/O errors get no REJECT: the connection is already broken or timed out. The REJECT is a
/// courtesy, so failing to send it does not hide the original error.
fn rejecting<S: Write, T>(
    s: &mut S,
    code: u8,
    result: Result<T, HandshakeError>,
) -> Result<T, HandshakeError> {
    if let Err(e) = &result {
        if !matches!(e, HandshakeError::Io(_)) {
            let _ = write_message(s, &encode_reject(code));
        }
    }
    result
}

/// The keyed HMAC state for the acceptor's proof `MacA`, ready to finalise or verify.
fn accept_mac(
    cookie: &[u8],
    nonce_d: &[u8; NONCE_LEN],
    nonce_a: &[u8; NONCE_LEN],
    dialer: &[u8],
    acceptor: &[u8],
    welcome: &Welcome,
    binding: Option<&[u8]>,
) -> Result<HmacSha256, HandshakeError> {
    let mut mac = keyed_mac(
        cookie,
        ACCEPT_LABEL,
        nonce_d,
        nonce_a,
        dialer,
        acceptor,
        binding,
    )?;
    mac.update(&welcome.max_frame.to_be_bytes());
    mac.update(&welcome.incarnation.to_be_bytes());
    mac.update(&welcome.delivered.to_be_bytes());
    Ok(mac)
}

/// The keyed HMAC state for the dialer's proof `MacD`: note the nonces in the other order.
#[allow(clippy::too_many_arguments)]
fn dial_mac(
    cookie: &[u8],
    nonce_a: &[u8; NONCE_LEN],
    nonce_d: &[u8; NONCE_LEN],
    dialer: &[u8],
    acceptor: &[u8],
    lane: u16,
    session: u64,
    binding: Option<&[u8]>,
) -> Result<HmacSha256, HandshakeError> {
    let mut mac = keyed_mac(
        cookie, DIAL_LABEL, nonce_a, nonce_d, dialer, acceptor, binding,
    )?;
    mac.update(&lane.to_be_bytes());
    mac.update(&session.to_be_bytes());
    Ok(mac)
}

fn keyed_mac(
    cookie: &[u8],
    label: &[u8],
    first: &[u8; NONCE_LEN],
    second: &[u8; NONCE_LEN],
    dialer: &[u8],
    acceptor: &[u8],
    binding: Option<&[u8]>,
) -> Result<HmacSha256, HandshakeError> {
    // HMAC takes keys of any length, so this error cannot happen; it is mapped, not unwrapped.
    let mut mac = HmacSha256::new_from_slice(cookie)
        .map_err(|_| HandshakeError::Malformed("cookie unusable as an HMAC key"))?;
    mac.update(label);
    mac.update(first);
    mac.update(second);
    // Length-prefixed names keep ("ab", "c") and ("a", "bc") apart.
    mac.update(&[name_len(dialer)?]);
    mac.update(dialer);
    mac.update(&[name_len(acceptor)?]);
    mac.update(acceptor);
    if let Some(binding) = binding {
        mac.update(BINDING_TAG);
        mac.update(binding);
    }
    Ok(mac)
}

/// The length byte of a node name, after checking it is 1..=255 bytes of UTF-8.
fn name_len(name: &[u8]) -> Result<u8, HandshakeError> {
    match u8::try_from(name.len()) {
        Ok(len) if len > 0 && std::str::from_utf8(name).is_ok() => Ok(len),
        _ => Err(HandshakeError::Malformed(
            "node name must be 1..=255 bytes of UTF-8",
        )),
    }
}

/// A random 64-bit number from the OS: a pool's session or a listener's incarnation.
pub fn random_id() -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(u64::from_le_bytes(bytes))
}

/// Two fresh random 32-byte strings from the OS (a nonce and, for the acceptor, a stand-in
/// key). `/dev/urandom` because the crate forbids the `unsafe` that `getrandom(2)` would need;
/// it never blocks once the system has booted.
fn random() -> Result<[[u8; NONCE_LEN]; 2], HandshakeError> {
    let mut bytes = [0u8; 2 * NONCE_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let mut out = [[0u8; NONCE_LEN]; 2];
    out[0].copy_from_slice(&bytes[..NONCE_LEN]);
    out[1].copy_from_slice(&bytes[NONCE_LEN..]);
    Ok(out)
}

/// A bounds-checked reader over a message body: every field either fits or is `Malformed`.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HandshakeError> {
        if self.0.len() < n {
            return Err(HandshakeError::Malformed(what));
        }
        let (field, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(field)
    }

    fn byte(&mut self, what: &'static str) -> Result<u8, HandshakeError> {
        Ok(self.take(1, what)?[0])
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], HandshakeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn name(&mut self) -> Result<Vec<u8>, HandshakeError> {
        let len = self.byte("truncated before node name")?;
        if len == 0 {
            return Err(HandshakeError::Malformed("empty node name"));
        }
        let name = self.take(usize::from(len), "truncated node name")?;
        if std::str::from_utf8(name).is_err() {
            return Err(HandshakeError::Malformed("node name is not UTF-8"));
        }
        Ok(name.to_vec())
    }

    fn finish(self) -> Result<(), HandshakeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(HandshakeError::Malformed("trailing bytes"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::net::{TcpListener, TcpStream};
    use std::thread;
    use std::time::{Duration, Instant};

    const COOKIE: &[u8] = b"SECRETCOOKIEXYZ";
    const DIALER: &[u8] = b"a@host";
    const ACCEPTOR: &[u8] = b"b@host";
    const LANE: u16 = 5;
    const MAX_FRAME: u32 = 64 << 20;
    const SESSION: u64 = 0x5e55_1011;
    const WELCOME: Welcome = Welcome {
        max_frame: MAX_FRAME,
        incarnation: 0x1ca4_a7e0,
        delivered: 41,
    };

    /// The acceptor's side as a listener runs it when the lane has nothing to wait for.
    fn accept_now<S: Read + Write>(
        s: &mut S,
        me: &[u8],
        max_frame: u32,
        cookie_for: impl FnOnce(&[u8]) -> Option<Vec<u8>>,
    ) -> Result<Dialer, HandshakeError> {
        assert_eq!(max_frame, MAX_FRAME);
        accept(s, me, cookie_for)?.welcome(s, &WELCOME)
    }

    /// A connected loopback pair, with timeouts so that a broken test fails instead of hanging.
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let dialer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (acceptor, _) = listener.accept().unwrap();
        for s in [&dialer, &acceptor] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        (dialer, acceptor)
    }

    /// A stream that records everything written through it.
    struct Recorder<S> {
        inner: S,
        written: Vec<u8>,
    }

    impl<S: Read> Read for Recorder<S> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.inner.read(buf)
        }
    }

    impl<S: Write> Write for Recorder<S> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = self.inner.write(buf)?;
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.inner.flush()
        }
    }

    /// An in-memory duplex: reads come from a fixed script, writes are collected.
    struct Scripted {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Scripted {
        fn new(input: &[u8]) -> Self {
            Self {
                input: Cursor::new(input.to_vec()),
                output: Vec::new(),
            }
        }
    }

    impl Read for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Scripted {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The messages of a byte stream, as bodies.
    fn messages(mut bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            out.push(read_message(&mut bytes).unwrap());
        }
        out
    }

    /// The bytes of a stream carrying these message bodies.
    fn framed(bodies: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for body in bodies {
            write_message(&mut out, body).unwrap();
        }
        out
    }

    /// Both sides' results of one session, then the bytes each side wrote (dialer, acceptor).
    type Session = (
        Result<Welcome, HandshakeError>,
        Result<Dialer, HandshakeError>,
        Vec<u8>,
        Vec<u8>,
    );

    /// One handshake over loopback TCP.
    fn session(
        dialer_cookie: &[u8],
        acceptor_cookie: Option<&[u8]>,
        expected_peer: &[u8],
    ) -> Session {
        let (d, a) = pair();
        let acceptor_cookie = acceptor_cookie.map(<[u8]>::to_vec);
        let acceptor = thread::spawn(move || {
            let mut a = Recorder {
                inner: a,
                written: Vec::new(),
            };
            let result = accept_now(&mut a, ACCEPTOR, MAX_FRAME, |name| {
                assert_eq!(name, DIALER);
                acceptor_cookie
            });
            (result, a.written)
        });
        let mut d = Recorder {
            inner: d,
            written: Vec::new(),
        };
        let dialed = dial(&mut d, DIALER, expected_peer, dialer_cookie, LANE, SESSION);
        // Close before joining, as a real caller would on failure, so the acceptor sees EOF.
        drop(d.inner);
        let (accepted, acceptor_bytes) = acceptor.join().unwrap();
        (dialed, accepted, d.written, acceptor_bytes)
    }

    /// A hand-driven dialer: sends a HELLO as `DIALER`, then reads what the acceptor answers.
    fn hello_and_challenge(d: &mut TcpStream, nonce_d: [u8; NONCE_LEN]) -> Vec<u8> {
        let hello = Hello {
            name: DIALER.to_vec(),
            nonce: nonce_d,
        };
        write_message(d, &encode_hello(&hello).unwrap()).unwrap();
        read_message(d).unwrap()
    }

    fn mac_bytes(mac: HmacSha256) -> [u8; MAC_LEN] {
        mac.finalize().into_bytes().into()
    }

    fn valid_hello() -> Vec<u8> {
        encode_hello(&Hello {
            name: DIALER.to_vec(),
            nonce: [7; NONCE_LEN],
        })
        .unwrap()
    }

    fn valid_challenge() -> Vec<u8> {
        encode_challenge(&Challenge {
            name: ACCEPTOR.to_vec(),
            nonce: [8; NONCE_LEN],
        })
        .unwrap()
    }

    fn valid_response() -> Vec<u8> {
        encode_response(&Response {
            mac: [10; MAC_LEN],
            lane: 7,
            session: 8,
        })
    }

    fn valid_ok() -> Vec<u8> {
        encode_ok(&Accepted {
            mac: [11; MAC_LEN],
            welcome: Welcome {
                max_frame: 1 << 20,
                incarnation: 12,
                delivered: 13,
            },
        })
    }

    /// A small deterministic PRNG (xorshift64*) for garbage inputs.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    #[test]
    fn handshake_succeeds_and_settles_name_lane_and_max_frame() {
        let (dialed, accepted, dialer_bytes, acceptor_bytes) =
            session(COOKIE, Some(COOKIE), ACCEPTOR);
        assert_eq!(dialed.unwrap(), WELCOME);
        assert_eq!(
            accepted.unwrap(),
            Dialer {
                name: DIALER.to_vec(),
                lane: LANE,
                session: SESSION,
            }
        );
        // HELLO, RESPONSE one way; CHALLENGE, OK the other.
        let sent = messages(&dialer_bytes);
        assert_eq!(sent.len(), 2);
        let hello = parse_hello(&sent[0]).unwrap();
        let response = parse_response(&sent[1]).unwrap();
        let answered = messages(&acceptor_bytes);
        assert_eq!(answered.len(), 2);
        let challenge = parse_challenge(&answered[0]).unwrap();
        let accepted = parse_verdict(&answered[1]).unwrap();
        assert_eq!(challenge.name, ACCEPTOR);
        // The MACs on the wire are the documented ones.
        let mac_d = dial_mac(
            COOKIE,
            &challenge.nonce,
            &hello.nonce,
            DIALER,
            ACCEPTOR,
            LANE,
            SESSION,
            None,
        )
        .unwrap();
        assert_eq!(response.mac, mac_bytes(mac_d));
        let mac_a = accept_mac(
            COOKIE,
            &hello.nonce,
            &challenge.nonce,
            DIALER,
            ACCEPTOR,
            &WELCOME,
            None,
        )
        .unwrap();
        assert_eq!(accepted.mac, mac_bytes(mac_a));
        assert_eq!(accepted.welcome, WELCOME);
    }

    /// Over TLS both proofs cover the session's binding: the same binding on both ends
    /// passes; a relay's two sessions (two bindings), or one end bound and the other not,
    /// fail as a wrong cookie does, the acceptor saying REJECT(2).
    #[test]
    fn proofs_cover_the_tls_binding() {
        let run = |dialer_binding: Option<[u8; 32]>, acceptor_binding: Option<[u8; 32]>| {
            let (mut d, mut a) = pair();
            let acceptor = thread::spawn(move || {
                accept_bound(
                    &mut a,
                    ACCEPTOR,
                    acceptor_binding.as_ref().map(|b| &b[..]),
                    |_| Some(COOKIE.to_vec()),
                )
                .and_then(|p| p.welcome(&mut a, &WELCOME))
            });
            let dialed = dial_bound(
                &mut d,
                DIALER,
                ACCEPTOR,
                COOKIE,
                LANE,
                SESSION,
                dialer_binding.as_ref().map(|b| &b[..]),
            );
            (dialed, acceptor.join().unwrap())
        };
        let (one, two) = ([1u8; 32], [2u8; 32]);
        let (dialed, accepted) = run(Some(one), Some(one));
        assert_eq!(dialed.unwrap(), WELCOME);
        assert_eq!(accepted.unwrap().name, DIALER);
        for (d, a) in [(Some(one), Some(two)), (Some(one), None), (None, Some(one))] {
            let (dialed, accepted) = run(d, a);
            assert!(
                matches!(accepted, Err(HandshakeError::BadMac)),
                "{accepted:?}"
            );
            assert!(
                matches!(dialed, Err(HandshakeError::Rejected(REJECT_BAD_MAC))),
                "{dialed:?}"
            );
        }
        // The binding changes both MACs.
        let (x, y) = ([3u8; NONCE_LEN], [4u8; NONCE_LEN]);
        let plain =
            mac_bytes(dial_mac(COOKIE, &x, &y, DIALER, ACCEPTOR, LANE, SESSION, None).unwrap());
        let bound = mac_bytes(
            dial_mac(COOKIE, &x, &y, DIALER, ACCEPTOR, LANE, SESSION, Some(&one)).unwrap(),
        );
        assert_ne!(plain, bound);
        let plain =
            mac_bytes(accept_mac(COOKIE, &x, &y, DIALER, ACCEPTOR, &WELCOME, None).unwrap());
        let bound =
            mac_bytes(accept_mac(COOKIE, &x, &y, DIALER, ACCEPTOR, &WELCOME, Some(&one)).unwrap());
        assert_ne!(plain, bound);
    }

    #[test]
    fn stream_is_left_right_after_the_handshake() {
        let (mut d, mut a) = pair();
        let acceptor = thread::spawn(move || {
            let name = accept_now(&mut a, ACCEPTOR, MAX_FRAME, |_| Some(COOKIE.to_vec())).unwrap();
            let mut frame = [0u8; 5];
            a.read_exact(&mut frame).unwrap();
            (name, frame)
        });
        dial(&mut d, DIALER, ACCEPTOR, COOKIE, LANE, SESSION).unwrap();
        d.write_all(b"frame").unwrap();
        let (dialer, frame) = acceptor.join().unwrap();
        assert_eq!(dialer.name, DIALER);
        assert_eq!(&frame, b"frame");
    }

    #[test]
    fn dialer_with_wrong_cookie_is_rejected() {
        // The dialer proves itself first: the acceptor catches the mismatch and says REJECT(2),
        // having sent no MAC of its own.
        let (dialed, accepted, dialer_bytes, acceptor_bytes) =
            session(b"WRONG", Some(COOKIE), ACCEPTOR);
        assert!(
            matches!(dialed, Err(HandshakeError::Rejected(REJECT_BAD_MAC))),
            "{dialed:?}"
        );
        assert!(
            matches!(accepted, Err(HandshakeError::BadMac)),
            "{accepted:?}"
        );
        assert_eq!(messages(&dialer_bytes).len(), 2, "HELLO and RESPONSE");
        let answered = messages(&acceptor_bytes);
        assert_eq!(answered.len(), 2);
        parse_challenge(&answered[0]).unwrap();
        assert_eq!(answered[1], encode_reject(REJECT_BAD_MAC));
    }

    #[test]
    fn acceptor_with_wrong_cookie_rejects_the_honest_dialer() {
        // The acceptor checks MacD with its own (wrong) cookie, so it is the one that finds the
        // mismatch, exactly as when the dialer's cookie is the wrong one: neither side can tell
        // whose cookie is off, and the acceptor never sends a MAC.
        let (dialed, accepted, _, acceptor_bytes) = session(COOKIE, Some(b"WRONG"), ACCEPTOR);
        assert!(
            matches!(dialed, Err(HandshakeError::Rejected(REJECT_BAD_MAC))),
            "{dialed:?}"
        );
        assert!(
            matches!(accepted, Err(HandshakeError::BadMac)),
            "{accepted:?}"
        );
        let answered = messages(&acceptor_bytes);
        assert_eq!(answered.len(), 2);
        assert_eq!(answered[1], encode_reject(REJECT_BAD_MAC));
    }

    #[test]
    fn unknown_node_is_rejected_like_a_bad_mac() {
        let (dialed, accepted, dialer_bytes, acceptor_bytes) = session(COOKIE, None, ACCEPTOR);
        assert!(
            matches!(dialed, Err(HandshakeError::Rejected(REJECT_BAD_MAC))),
            "{dialed:?}"
        );
        assert!(
            matches!(accepted, Err(HandshakeError::UnknownNode)),
            "{accepted:?}"
        );
        // A full CHALLENGE first, then the same REJECT as for a wrong MAC.
        assert_eq!(messages(&dialer_bytes).len(), 2, "HELLO and RESPONSE");
        let answered = messages(&acceptor_bytes);
        assert_eq!(answered.len(), 2);
        assert_eq!(answered[0].len(), valid_challenge().len());
        assert_eq!(parse_challenge(&answered[0]).unwrap().name, ACCEPTOR);
        assert_eq!(answered[1], encode_reject(REJECT_BAD_MAC));
    }

    #[test]
    fn empty_cookie_is_refused_on_both_sides() {
        let (dialed, accepted, _, _) = session(COOKIE, Some(b""), ACCEPTOR);
        assert!(matches!(
            dialed,
            Err(HandshakeError::Rejected(REJECT_BAD_MAC))
        ));
        assert!(matches!(accepted, Err(HandshakeError::UnknownNode)));
        let mut s = Scripted::new(b"");
        let dialed = dial(&mut s, DIALER, ACCEPTOR, b"", LANE, SESSION);
        assert!(matches!(dialed, Err(HandshakeError::Malformed(_))));
        assert!(s.output.is_empty());
    }

    #[test]
    fn unknown_cookie_lookup_happens_once_after_hello() {
        let (mut d, mut a) = pair();
        let acceptor = thread::spawn(move || {
            let mut calls = 0;
            let result = accept_now(&mut a, ACCEPTOR, MAX_FRAME, |name| {
                calls += 1;
                assert_eq!(name, DIALER);
                None
            });
            (result, calls)
        });
        hello_and_challenge(&mut d, [1; NONCE_LEN]);
        write_message(
            &mut d,
            &encode_response(&Response {
                mac: [0; MAC_LEN],
                lane: 0,
                session: 0,
            }),
        )
        .unwrap();
        assert_eq!(read_message(&mut d).unwrap(), encode_reject(REJECT_BAD_MAC));
        let (result, calls) = acceptor.join().unwrap();
        assert!(
            matches!(result, Err(HandshakeError::UnknownNode)),
            "{result:?}"
        );
        assert_eq!(calls, 1);
    }

    /// What a prober sees from an acceptor: the CHALLENGE body, then the answer to a RESPONSE.
    fn probe(
        cookie: Option<&'static [u8]>,
        response: Vec<u8>,
    ) -> (Vec<u8>, Vec<u8>, HandshakeError) {
        let (mut d, mut a) = pair();
        let acceptor = thread::spawn(move || {
            accept_now(&mut a, ACCEPTOR, MAX_FRAME, |_| cookie.map(<[u8]>::to_vec))
        });
        let challenge = hello_and_challenge(&mut d, [3; NONCE_LEN]);
        write_message(&mut d, &response).unwrap();
        let verdict = read_message(&mut d).unwrap();
        // Then the acceptor closes (here: returns and drops its end).
        let err = acceptor.join().unwrap().unwrap_err();
        let mut rest = Vec::new();
        assert_eq!(
            d.read_to_end(&mut rest).unwrap(),
            0,
            "nothing after the verdict"
        );
        (challenge, verdict, err)
    }

    #[test]
    fn prober_gets_no_mac_and_cannot_tell_known_names() {
        // An attacker who can reach the port but has no cookie sends HELLO, reads, and answers
        // with garbage. The CHALLENGE holds a name and a nonce, nothing derived from the cookie,
        // and the answer is REJECT(2) whether or not the name is known.
        let garbage = encode_response(&Response {
            mac: [0xAB; MAC_LEN],
            lane: 0,
            session: 0,
        });
        let (known_challenge, known_verdict, known_err) = probe(Some(COOKIE), garbage.clone());
        let (unknown_challenge, unknown_verdict, unknown_err) = probe(None, garbage);
        for challenge in [&known_challenge, &unknown_challenge] {
            assert_eq!(
                challenge.len(),
                1 + 1 + ACCEPTOR.len() + NONCE_LEN,
                "no MAC"
            );
            let parsed = parse_challenge(challenge).unwrap();
            assert_eq!(parsed.name, ACCEPTOR);
        }
        assert_ne!(known_challenge, unknown_challenge, "fresh nonces");
        assert_eq!(known_verdict, encode_reject(REJECT_BAD_MAC));
        assert_eq!(unknown_verdict, known_verdict);
        assert!(matches!(known_err, HandshakeError::BadMac), "{known_err:?}");
        assert!(
            matches!(unknown_err, HandshakeError::UnknownNode),
            "{unknown_err:?}"
        );

        // A malformed RESPONSE gets REJECT(3), again known or not.
        let (_, known_verdict, known_err) = probe(Some(COOKIE), vec![TAG_RESPONSE, 1, 2]);
        let (_, unknown_verdict, unknown_err) = probe(None, vec![TAG_RESPONSE, 1, 2]);
        assert_eq!(known_verdict, encode_reject(REJECT_PROTOCOL));
        assert_eq!(unknown_verdict, known_verdict);
        assert!(
            matches!(known_err, HandshakeError::Malformed(_)),
            "{known_err:?}"
        );
        assert!(
            matches!(unknown_err, HandshakeError::Malformed(_)),
            "{unknown_err:?}"
        );
    }

    #[test]
    fn dialer_refuses_the_wrong_peer() {
        let (dialed, accepted, dialer_bytes, _) = session(COOKIE, Some(COOKIE), b"c@host");
        assert!(
            matches!(dialed, Err(HandshakeError::WrongPeer)),
            "{dialed:?}"
        );
        assert!(
            matches!(accepted, Err(HandshakeError::Io(_))),
            "{accepted:?}"
        );
        assert_eq!(messages(&dialer_bytes).len(), 1, "only HELLO was sent");
    }

    /// A fake acceptor that answers under the right name and then says OK with `mac_a`
    /// (computed from the two nonces by `make_mac`).
    fn impostor(
        make_mac: impl FnOnce(&[u8; NONCE_LEN], &[u8; NONCE_LEN]) -> [u8; MAC_LEN] + Send + 'static,
    ) -> Result<Welcome, HandshakeError> {
        let (mut d, mut a) = pair();
        let fake = thread::spawn(move || {
            let hello = parse_hello(&read_message(&mut a).unwrap()).unwrap();
            let nonce_a = [5; NONCE_LEN];
            let challenge = Challenge {
                name: ACCEPTOR.to_vec(),
                nonce: nonce_a,
            };
            write_message(&mut a, &encode_challenge(&challenge).unwrap()).unwrap();
            parse_response(&read_message(&mut a).unwrap()).unwrap();
            let mac = make_mac(&hello.nonce, &nonce_a);
            write_message(
                &mut a,
                &encode_ok(&Accepted {
                    mac,
                    welcome: WELCOME,
                }),
            )
            .unwrap();
        });
        let dialed = dial(&mut d, DIALER, ACCEPTOR, COOKIE, LANE, SESSION);
        fake.join().unwrap();
        dialed
    }

    #[test]
    fn acceptor_without_the_cookie_cannot_fake_an_ok() {
        let dialed = impostor(|_, _| [0; MAC_LEN]);
        assert!(matches!(dialed, Err(HandshakeError::BadMac)), "{dialed:?}");
        let dialed = impostor(|d, a| {
            mac_bytes(accept_mac(b"WRONG", d, a, DIALER, ACCEPTOR, &WELCOME, None).unwrap())
        });
        assert!(matches!(dialed, Err(HandshakeError::BadMac)), "{dialed:?}");
        // The acceptor's MAC under the right cookie is what makes it pass.
        let dialed = impostor(|d, a| {
            mac_bytes(accept_mac(COOKIE, d, a, DIALER, ACCEPTOR, &WELCOME, None).unwrap())
        });
        dialed.unwrap();
    }

    #[test]
    fn replayed_response_fails() {
        // A recorded HELLO and RESPONSE, played against a fresh acceptor session (new NonceA).
        let (dialed, accepted, dialer_bytes, _) = session(COOKIE, Some(COOKIE), ACCEPTOR);
        dialed.unwrap();
        accepted.unwrap();
        let mut replay = Scripted::new(&dialer_bytes);
        let result = accept_now(&mut replay, ACCEPTOR, MAX_FRAME, |_| Some(COOKIE.to_vec()));
        assert!(matches!(result, Err(HandshakeError::BadMac)), "{result:?}");
        let sent = messages(&replay.output);
        assert_eq!(sent.len(), 2);
        parse_challenge(&sent[0]).unwrap();
        assert_eq!(sent[1], encode_reject(REJECT_BAD_MAC));

        // The same over TCP, against a live acceptor.
        let (mut d, mut a) = pair();
        let acceptor = thread::spawn(move || {
            accept_now(&mut a, ACCEPTOR, MAX_FRAME, |_| Some(COOKIE.to_vec()))
        });
        let recorded = messages(&dialer_bytes);
        write_message(&mut d, &recorded[0]).unwrap();
        parse_challenge(&read_message(&mut d).unwrap()).unwrap();
        write_message(&mut d, &recorded[1]).unwrap();
        assert_eq!(read_message(&mut d).unwrap(), encode_reject(REJECT_BAD_MAC));
        let result = acceptor.join().unwrap();
        assert!(matches!(result, Err(HandshakeError::BadMac)), "{result:?}");
    }

    #[test]
    fn replayed_ok_fails() {
        // A recorded CHALLENGE and OK, played against a fresh dialer session (new NonceD).
        let (dialed, _, _, acceptor_bytes) = session(COOKIE, Some(COOKIE), ACCEPTOR);
        dialed.unwrap();
        let mut replay = Scripted::new(&acceptor_bytes);
        let result = dial(&mut replay, DIALER, ACCEPTOR, COOKIE, LANE, SESSION);
        assert!(matches!(result, Err(HandshakeError::BadMac)), "{result:?}");
        assert_eq!(messages(&replay.output).len(), 2, "HELLO and RESPONSE");
    }

    #[test]
    fn reflected_mac_fails() {
        // The acceptor's MacA sent back as the dialer's MacD must not verify, nor the reverse.
        let (d, a) = ([1; NONCE_LEN], [2; NONCE_LEN]);
        let mac_a =
            mac_bytes(accept_mac(COOKIE, &d, &a, DIALER, ACCEPTOR, &WELCOME, None).unwrap());
        let mac_d =
            mac_bytes(dial_mac(COOKIE, &a, &d, DIALER, ACCEPTOR, LANE, SESSION, None).unwrap());
        assert_ne!(mac_a, mac_d);
        for (x, y) in [(&a, &d), (&d, &a)] {
            assert!(
                dial_mac(COOKIE, x, y, DIALER, ACCEPTOR, LANE, SESSION, None)
                    .unwrap()
                    .verify_slice(&mac_a)
                    .is_err()
            );
            assert!(accept_mac(COOKIE, x, y, DIALER, ACCEPTOR, &WELCOME, None)
                .unwrap()
                .verify_slice(&mac_d)
                .is_err());
        }
    }

    #[test]
    fn nonces_differ_between_sessions() {
        let (_, _, d1, a1) = session(COOKIE, Some(COOKIE), ACCEPTOR);
        let (_, _, d2, a2) = session(COOKIE, Some(COOKIE), ACCEPTOR);
        let hello = |b: &[u8]| parse_hello(&messages(b)[0]).unwrap().nonce;
        let challenge = |b: &[u8]| parse_challenge(&messages(b)[0]).unwrap().nonce;
        let all = [hello(&d1), hello(&d2), challenge(&a1), challenge(&a2)];
        for i in 0..all.len() {
            for j in i + 1..all.len() {
                assert_ne!(all[i], all[j]);
            }
        }
    }

    #[test]
    fn reject_instead_of_challenge_is_reported() {
        let mut s = Scripted::new(&framed(&[encode_reject(REJECT_PROTOCOL)]));
        let result = dial(&mut s, DIALER, ACCEPTOR, COOKIE, LANE, SESSION);
        assert!(
            matches!(result, Err(HandshakeError::Rejected(REJECT_PROTOCOL))),
            "{result:?}"
        );
        assert_eq!(messages(&s.output).len(), 1, "only HELLO was sent");
    }

    #[test]
    fn http_request_is_refused() {
        let http = b"GET / HTTP/1.1\r\n\r\n";
        // As raw bytes the "GE" is read as a length of 18245 and refused unread.
        let mut s = Scripted::new(http);
        let result = accept_now(&mut s, ACCEPTOR, MAX_FRAME, |_| {
            panic!("no cookie for garbage")
        });
        assert!(
            matches!(result, Err(HandshakeError::Malformed(_))),
            "{result:?}"
        );
        assert_eq!(s.input.position(), 2);
        assert_eq!(messages(&s.output), vec![encode_reject(REJECT_PROTOCOL)]);
        // Framed, it is a body without the magic.
        let mut s = Scripted::new(&framed(&[http.to_vec()]));
        let result = accept_now(&mut s, ACCEPTOR, MAX_FRAME, |_| {
            panic!("no cookie for garbage")
        });
        assert!(
            matches!(result, Err(HandshakeError::BadMagic)),
            "{result:?}"
        );
        assert!(matches!(parse_hello(http), Err(HandshakeError::BadMagic)));
    }

    #[test]
    fn bad_lengths_are_refused_before_reading_the_body() {
        for prefix in [[0xFF, 0xFF], [0x04, 0x01], [0, 0]] {
            // Nothing follows the prefix: reading on would be an EOF (Io), not Malformed.
            let result = read_message(&mut &prefix[..]);
            assert!(
                matches!(result, Err(HandshakeError::Malformed(_))),
                "{result:?}"
            );
            // The dialer reads the same prefix as the acceptor's answer to its HELLO.
            let mut s = Scripted::new(&prefix);
            let result = dial(&mut s, DIALER, ACCEPTOR, COOKIE, LANE, SESSION);
            assert!(
                matches!(result, Err(HandshakeError::Malformed(_))),
                "{result:?}"
            );
        }
        let mut max = vec![0x04, 0x00];
        max.extend_from_slice(&[0; MAX_MESSAGE]);
        assert_eq!(read_message(&mut &max[..]).unwrap().len(), MAX_MESSAGE);
    }

    #[test]
    fn bad_version_is_rejected() {
        // Version 1 had no lane nor max frame size: its peers are refused as clearly as any.
        let mut hello = valid_hello();
        hello[5] = 1;
        assert!(matches!(
            parse_hello(&hello),
            Err(HandshakeError::BadVersion(1))
        ));
        let mut s = Scripted::new(&framed(&[hello]));
        let result = accept_now(&mut s, ACCEPTOR, MAX_FRAME, |_| {
            panic!("no cookie for bad version")
        });
        assert!(matches!(result, Err(HandshakeError::BadVersion(1))));
        assert_eq!(messages(&s.output), vec![encode_reject(REJECT_PROTOCOL)]);
    }

    #[test]
    fn random_bytes_fail_without_panicking() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..2000 {
            let len = (rng.next() % 200) as usize;
            let mut input = rng.bytes(len);
            if round % 2 == 0 && len >= 2 {
                // Half the time a plausible length prefix, so the parsers see random bodies.
                let body = (len - 2) as u16;
                input[..2].copy_from_slice(&body.to_be_bytes());
            }
            let mut s = Scripted::new(&input);
            assert!(accept_now(&mut s, ACCEPTOR, MAX_FRAME, |_| Some(COOKIE.to_vec())).is_err());
            let mut s = Scripted::new(&input);
            assert!(dial(&mut s, DIALER, ACCEPTOR, COOKIE, LANE, SESSION).is_err());
            // Every parser sees the raw bytes too, and with each valid tag in front.
            for tag in [
                None,
                Some(TAG_HELLO),
                Some(TAG_CHALLENGE),
                Some(TAG_RESPONSE),
                Some(TAG_OK),
                Some(TAG_REJECT),
            ] {
                let mut body = input.clone();
                if let (Some(tag), Some(first)) = (tag, body.first_mut()) {
                    *first = tag;
                }
                let _ = parse_hello(&body);
                let _ = parse_challenge(&body);
                let _ = parse_response(&body);
                let _ = parse_verdict(&body);
                let _ = parse_reject(&body);
            }
        }
        // A valid HELLO followed by random bytes reaches the acceptor's later stages.
        for _ in 0..200 {
            let len = (rng.next() % 80) as usize;
            let mut input = framed(&[valid_hello()]);
            input.extend(rng.bytes(len));
            let mut s = Scripted::new(&input);
            assert!(accept_now(&mut s, ACCEPTOR, MAX_FRAME, |_| Some(COOKIE.to_vec())).is_err());
            let mut input = framed(&[valid_challenge()]);
            input.extend(rng.bytes(len));
            let mut s = Scripted::new(&input);
            assert!(dial(&mut s, DIALER, ACCEPTOR, COOKIE, LANE, SESSION).is_err());
        }
    }

    #[test]
    fn every_truncation_is_malformed() {
        type Parse = fn(&[u8]) -> Result<(), HandshakeError>;
        let cases: [(&str, Vec<u8>, Parse); 4] = [
            ("hello", valid_hello(), |b| parse_hello(b).map(drop)),
            ("challenge", valid_challenge(), |b| {
                parse_challenge(b).map(drop)
            }),
            ("response", valid_response(), |b| {
                parse_response(b).map(drop)
            }),
            ("ok", valid_ok(), |b| parse_verdict(b).map(drop)),
        ];
        for (what, body, parse) in cases {
            parse(&body).unwrap();
            for cut in 0..body.len() {
                let result = parse(&body[..cut]);
                assert!(
                    matches!(result, Err(HandshakeError::Malformed(_))),
                    "{what} cut at {cut}: {result:?}"
                );
            }
            let mut long = body.clone();
            long.push(0);
            assert!(matches!(parse(&long), Err(HandshakeError::Malformed(_))));
        }
        for body in [&[][..], &[TAG_REJECT], &[TAG_OK], &[TAG_REJECT, 1, 2], b"X"] {
            assert!(matches!(
                parse_verdict(body),
                Err(HandshakeError::Malformed(_))
            ));
        }
        assert_eq!(parse_verdict(&valid_ok()).unwrap().mac, [11; MAC_LEN]);
        assert!(matches!(
            parse_verdict(&encode_reject(9)),
            Err(HandshakeError::Rejected(9))
        ));
        assert!(matches!(
            parse_challenge(&encode_reject(2)),
            Err(HandshakeError::Rejected(2))
        ));
    }

    #[test]
    fn messages_round_trip() {
        let challenge = Challenge {
            name: ACCEPTOR.to_vec(),
            nonce: [4; NONCE_LEN],
        };
        assert_eq!(
            parse_challenge(&encode_challenge(&challenge).unwrap()).unwrap(),
            challenge
        );
        let response = Response {
            mac: [5; MAC_LEN],
            lane: 0xBEEF,
            session: 0x0123_4567_89AB_CDEF,
        };
        assert_eq!(
            parse_response(&encode_response(&response)).unwrap(),
            response
        );
        let accepted = Accepted {
            mac: [6; MAC_LEN],
            welcome: Welcome {
                max_frame: 0xDEAD_BEEF,
                incarnation: u64::MAX,
                delivered: 1 << 40,
            },
        };
        assert_eq!(parse_verdict(&encode_ok(&accepted)).unwrap(), accepted);
        assert_eq!(parse_reject(&encode_reject(7)).unwrap(), 7);
    }

    #[test]
    fn names_are_checked() {
        let mut hello = valid_hello();
        hello[6] = 0;
        assert!(matches!(
            parse_hello(&hello),
            Err(HandshakeError::Malformed(_))
        ));
        let mut hello = valid_hello();
        hello[7] = 0xFF;
        assert!(matches!(
            parse_hello(&hello),
            Err(HandshakeError::Malformed(_))
        ));
        let long = vec![b'a'; 256];
        let max = vec![b'a'; 255];
        for (me, peer) in [
            (&b""[..], ACCEPTOR),
            (&long[..], ACCEPTOR),
            (DIALER, &b"\xff"[..]),
        ] {
            let mut s = Scripted::new(b"");
            let result = dial(&mut s, me, peer, COOKIE, LANE, SESSION);
            assert!(matches!(result, Err(HandshakeError::Malformed(_))));
            assert!(s.output.is_empty());
        }
        let hello = Hello {
            name: max.clone(),
            nonce: [0; NONCE_LEN],
        };
        assert_eq!(parse_hello(&encode_hello(&hello).unwrap()).unwrap(), hello);
    }

    #[test]
    fn read_timeout_gives_io_quickly() {
        // The peers stay open and silent: no EOF, only the timeout can end the wait.
        let (mut d, _silent_acceptor) = pair();
        d.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let start = Instant::now();
        let result = dial(&mut d, DIALER, ACCEPTOR, COOKIE, LANE, SESSION);
        assert!(matches!(result, Err(HandshakeError::Io(_))), "{result:?}");
        assert!(start.elapsed() < Duration::from_secs(2));

        let (_silent_dialer, mut a) = pair();
        a.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let start = Instant::now();
        let result = accept_now(&mut a, ACCEPTOR, MAX_FRAME, |_| Some(COOKIE.to_vec()));
        assert!(matches!(result, Err(HandshakeError::Io(_))), "{result:?}");
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn errors_read_well() {
        assert_eq!(
            HandshakeError::BadMac.to_string(),
            "peer proved no knowledge of the cookie"
        );
        assert!(HandshakeError::Rejected(REJECT_BAD_MAC)
            .to_string()
            .contains("cookie"));
        let io = HandshakeError::from(io::Error::from(io::ErrorKind::TimedOut));
        assert!(std::error::Error::source(&io).is_some());
    }
}
