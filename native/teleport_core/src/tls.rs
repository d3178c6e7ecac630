//! `tls`: the TLS of teleport's connections, with rustls (and its `ring` provider: it needs
//! only a C compiler, where `aws-lc-rs` wants more of the build machine).
//!
//! TLS 1.3, and 1.2 where a node is told to speak only it ([`Versions`]): two teleport
//! nodes that both allow 1.3 always agree on it. The binding below is the exporter that RFC
//! 9266 endorses as a channel binding with TLS 1.3, and with 1.2 only where the extended
//! master secret is used (RFC 7627): both ends require it, and neither resumes a session.
//!
//! What is checked, as `inet_tls_dist` checks it for disterl:
//! - both ends present a certificate chain, verified against the one CA of the
//!   configuration (mutual authentication);
//! - the dialer checks that the acceptor's certificate names the host of the node it dials
//!   (the part after `@`: a DNS name or an IP address), unless `server_name_check` is off;
//! - `verify_none` (for tests only) checks nothing but that the TLS handshake completes.
//!
//! A certificate alone does not let a node in: the cookie handshake still runs inside TLS,
//! and its MACs also cover [`binding`], a value both ends derive from their TLS session
//! (RFC 8446's exporter), so that a relay that terminates TLS towards each side cannot
//! splice two sessions together.
//!
//! This module loads and checks the files ([`Tls::load`]), makes the rustls connections of
//! both sides ([`Tls::dialer`], [`Tls::acceptor`]) and the binding; it does no I/O on
//! sockets: rustls reads and writes through whatever its caller gives it.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, ClientConnection, ConnectionCommon, DigitallySignedStruct,
    DistinguishedName, RootCertStore, ServerConfig, ServerConnection, SignatureScheme,
};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The label of the exporter value that binds the cookie handshake to a TLS session.
pub const BINDING_LABEL: &[u8] = b"EXPORTER-teleport-handshake";

/// Bytes of [`binding`].
pub const BINDING_LEN: usize = 32;

/// A certificate that expires sooner than this is worth a warning when it is loaded.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);

/// How the peer's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Against the CA, and (on the dialer, unless told otherwise) against the peer's host.
    Peer,
    /// Not at all: for tests only.
    None,
}

/// The TLS versions a node speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Versions {
    /// TLS 1.3, or 1.2 with a peer that speaks only 1.2 (the default).
    Tls13And12,
    /// TLS 1.3 only.
    Tls13,
    /// TLS 1.2 only.
    Tls12,
}

impl Versions {
    fn rustls(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        use rustls::version::{TLS12, TLS13};
        static BOTH: [&rustls::SupportedProtocolVersion; 2] = [&TLS13, &TLS12];
        match self {
            Versions::Tls13And12 => &BOTH,
            Versions::Tls13 => &BOTH[..1],
            Versions::Tls12 => &BOTH[1..],
        }
    }
}

/// Where a node's TLS material is, and how peers are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This node's certificate chain (PEM), its own certificate first.
    pub certfile: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1; not encrypted).
    pub keyfile: PathBuf,
    /// The CA certificates peers' chains are checked against (PEM).
    pub cacertfile: PathBuf,
    /// How peers are checked.
    pub verify: Verify,
    /// Whether the dialer checks that the acceptor's certificate names the host it dials.
    pub server_name_check: bool,
    /// The versions it speaks.
    pub versions: Versions,
}

/// Why the TLS configuration cannot be used; each names the file and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsError {
    /// The file cannot be read.
    Unreadable {
        /// The file.
        file: PathBuf,
        /// The operating system's reason.
        reason: String,
    },
    /// The file holds no PEM item of the kind looked for.
    NoPem {
        /// The file.
        file: PathBuf,
        /// What was looked for ("certificate", "private key").
        what: &'static str,
    },
    /// The private key does not belong to the first certificate of the chain.
    KeyMismatch {
        /// The key's file.
        keyfile: PathBuf,
        /// The certificate's file.
        certfile: PathBuf,
    },
    /// This node's certificate is no longer valid.
    Expired {
        /// The file.
        file: PathBuf,
        /// When it expired.
        not_after: SystemTime,
    },
    /// A host that is neither a DNS name nor an IP address, to check a certificate against.
    BadHost(String),
    /// rustls refused the material (a CA that is not a certificate, a key of an unsupported
    /// kind, and so on).
    Refused(String),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Unreadable { file, reason } => {
                write!(f, "cannot read {}: {reason}", file.display())
            }
            TlsError::NoPem { file, what } => {
                write!(f, "{} holds no PEM {what}", file.display())
            }
            TlsError::KeyMismatch { keyfile, certfile } => write!(
                f,
                "the key in {} is not the key of the certificate in {}",
                keyfile.display(),
                certfile.display()
            ),
            TlsError::Expired { file, not_after } => write!(
                f,
                "the certificate in {} expired {} s ago",
                file.display(),
                SystemTime::now()
                    .duration_since(*not_after)
                    .unwrap_or_default()
                    .as_secs()
            ),
            TlsError::BadHost(host) => {
                write!(f, "{host:?} is neither a DNS name nor an IP address")
            }
            TlsError::Refused(why) => write!(f, "TLS configuration refused: {why}"),
        }
    }
}

impl std::error::Error for TlsError {}

/// A node's loaded TLS configuration: the rustls configurations of both sides.
#[derive(Debug, Clone)]
pub struct Tls {
    dialer: Arc<ClientConfig>,
    acceptor: Arc<ServerConfig>,
    /// When this node's certificate expires.
    not_after: Option<SystemTime>,
}

impl Tls {
    /// Reads and checks the files: each must hold what it should, the key must be the
    /// certificate's, and the certificate must not have expired (one that expires within
    /// [`EXPIRY_WARNING`] loads; see [`Tls::expires_within`]).
    pub fn load(files: &TlsFiles) -> Result<Tls, TlsError> {
        Tls::load_with(files, None)
    }

    /// [`Tls::load`], the key given as `key_pem` (`keyfile` as its caller read and
    /// decrypted it: Erlang's `public_key` opens a password-protected key) if it is.
    pub fn load_with(files: &TlsFiles, key_pem: Option<&[u8]>) -> Result<Tls, TlsError> {
        let chain = certificates(&files.certfile)?;
        let key = match key_pem {
            None => private_key(&files.keyfile)?,
            Some(pem) => key_of(pem, &files.keyfile)?,
        };
        let cas = certificates(&files.cacertfile)?;
        let not_after = validity_end(&chain[0]);
        if let Some(end) = not_after {
            if end < SystemTime::now() {
                return Err(TlsError::Expired {
                    file: files.certfile.clone(),
                    not_after: end,
                });
            }
        }
        // AES-128-GCM first (of 1.3's suites and of 1.2's): on this kind of machine it
        // encrypts 3.6 GB/s against AES-256-GCM's 3.1, and decrypts 7.8 against 6.2
        // (`tls_throughput` below).
        let mut provider = ring::default_provider();
        provider.cipher_suites.sort_by_key(|s| {
            !matches!(
                s.suite(),
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                    | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
                    | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            )
        });
        let provider = Arc::new(provider);
        let refused = |e: rustls::Error| TlsError::Refused(e.to_string());
        let mismatch = || TlsError::KeyMismatch {
            keyfile: files.keyfile.clone(),
            certfile: files.certfile.clone(),
        };
        let signing = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(refused)?;
        let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing);
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(_)) => return Err(mismatch()),
            Err(e) => return Err(refused(e)),
        }
        let mut roots = RootCertStore::empty();
        for ca in cas {
            roots.add(ca).map_err(refused)?;
        }
        let roots = Arc::new(roots);

        let server_verifier: Arc<dyn ServerCertVerifier> = match files.verify {
            Verify::None => Arc::new(AcceptAnyServer(provider.clone())),
            Verify::Peer => {
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                        .build()
                        .map_err(|e| TlsError::Refused(e.to_string()))?;
                if files.server_name_check {
                    webpki
                } else {
                    Arc::new(AnyName(webpki))
                }
            }
        };
        let versions = files.versions.rustls();
        let mut dialer = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(refused)?
            .dangerous()
            .with_custom_certificate_verifier(server_verifier)
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(refused)?;

        let client_verifier: Arc<dyn ClientCertVerifier> = match files.verify {
            Verify::None => Arc::new(AcceptAnyClient(provider.clone())),
            Verify::Peer => WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| TlsError::Refused(e.to_string()))?,
        };
        let mut acceptor = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .map_err(refused)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain, key)
            .map_err(refused)?;
        // Both ends are teleport's, and a connection lasts: resumption would buy nothing,
        // and a session of its own is what each connection's binding stands for.
        acceptor.send_tls13_tickets = 0;
        acceptor.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        dialer.resumption = rustls::client::Resumption::disabled();
        // With 1.2 the exporter binds a session only under the extended master secret.
        acceptor.require_ems = true;
        dialer.require_ems = true;
        // After the handshake a TLS 1.3 connection's records are teleport's own
        // (`crate::record`), sealed with the keys rustls hands over.
        acceptor.enable_secret_extraction = true;
        dialer.enable_secret_extraction = true;
        Ok(Tls {
            dialer: Arc::new(dialer),
            acceptor: Arc::new(acceptor),
            not_after,
        })
    }

    /// Whether this node's certificate expires within `window` from now (it is still
    /// valid: [`Tls::load`] refuses an expired one).
    pub fn expires_within(&self, window: Duration) -> bool {
        self.not_after
            .is_some_and(|end| end < SystemTime::now() + window)
    }

    /// The TLS client of a connection to the node whose host is `peer_host` (what follows
    /// the `@` of its name), which its certificate must name.
    pub fn dialer(&self, peer_host: &str) -> Result<ClientConnection, TlsError> {
        let name = ServerName::try_from(peer_host.to_string())
            .map_err(|_| TlsError::BadHost(peer_host.to_string()))?;
        ClientConnection::new(self.dialer.clone(), name)
            .map_err(|e| TlsError::Refused(e.to_string()))
    }

    /// The TLS client of a connection to the node named `node` (`name@host`), made for its
    /// host.
    pub fn dialer_for_node(&self, node: &str) -> Result<ClientConnection, TlsError> {
        let host = host_of(node).ok_or_else(|| TlsError::BadHost(node.to_string()))?;
        self.dialer(host)
    }

    /// The TLS server of an accepted connection.
    pub fn acceptor(&self) -> Result<ServerConnection, TlsError> {
        ServerConnection::new(self.acceptor.clone()).map_err(|e| TlsError::Refused(e.to_string()))
    }
}

/// The value that binds a cookie handshake to the TLS session of `conn` (both ends derive
/// the same): `None` before its TLS handshake is done.
pub fn binding<D>(conn: &ConnectionCommon<D>) -> Option<[u8; BINDING_LEN]> {
    conn.export_keying_material([0u8; BINDING_LEN], BINDING_LABEL, None)
        .ok()
}

/// The host part of a node name (`name@host`), which the acceptor's certificate names.
pub fn host_of(node: &str) -> Option<&str> {
    node.split_once('@')
        .map(|(_, host)| host)
        .filter(|h| !h.is_empty())
}

fn read(file: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(file).map_err(|e| TlsError::Unreadable {
        file: file.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The certificates of a PEM file, in order; at least one.
fn certificates(file: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(file)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoPem {
            file: file.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// The first private key of a PEM file.
fn private_key(file: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    key_of(&read(file)?, file)
}

/// The first private key of `pem`, read from `file`.
fn key_of(pem: &[u8], file: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|_| TlsError::NoPem {
        file: file.to_path_buf(),
        what: "private key",
    })
}

/// The end of a certificate's validity (`notAfter`), read from its DER; `None` if the
/// certificate cannot be read so (rustls then judges it at each handshake).
fn validity_end(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    //   serialNumber, signature, issuer, validity SEQUENCE { notBefore, notAfter }, ... } }
    let (_, cert, _) = der(cert.as_ref())?;
    let (_, mut tbs, _) = der(cert)?;
    let (tag, _, rest) = der(tbs)?;
    if tag == 0xa0 {
        tbs = rest; // the version
    }
    for _ in 0..3 {
        let (_, _, rest) = der(tbs)?; // serial number, signature algorithm, issuer
        tbs = rest;
    }
    let (_, validity, _) = der(tbs)?;
    let (_, _, after) = der(validity)?;
    let (tag, time, _) = der(after)?;
    der_time(tag, time)
}

/// One DER item of `input`: its tag, its contents and what follows it.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| acc << 8 | b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// A UTCTime (`YYMMDDHHMMSSZ`, tag 0x17) or GeneralizedTime (`YYYYMMDDHHMMSSZ`, 0x18).
fn der_time(tag: u8, time: &[u8]) -> Option<SystemTime> {
    let text = time.strip_suffix(b"Z")?;
    if !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let digits = |s: &[u8]| s.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    let (year, rest) = match tag {
        0x17 if text.len() == 12 => {
            let yy = digits(&text[..2]);
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &text[2..])
        }
        0x18 if text.len() == 14 => (digits(&text[..4]), &text[4..]),
        _ => return None,
    };
    let (month, day) = (digits(&rest[..2]), digits(&rest[2..4]));
    let (h, m, s) = (
        digits(&rest[4..6]),
        digits(&rest[6..8]),
        digits(&rest[8..10]),
    );
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || year < 1970 {
        return None;
    }
    // Days since 1970-01-01 of the civil date (Howard Hinnant's algorithm).
    let (y, mo) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + m * 60 + s;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// The CA's verification of an acceptor's certificate without the check of its name.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `verify_none` on the dialer: any certificate, whose signatures of the handshake must
/// still be right.
#[derive(Debug)]
struct AcceptAnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify_none` on the acceptor: a dialer's certificate is asked for, and any is taken.
#[derive(Debug)]
struct AcceptAnyClient(Arc<CryptoProvider>);

impl ClientCertVerifier for AcceptAnyClient {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{memory_handshake as handshake, node, Ca, Dir};
    use std::io::{Read, Write};

    /// Dials `host` from `dialer` to `acceptor`: the handshake's outcome, and both ends.
    fn dial(
        dialer: &TlsFiles,
        acceptor: &TlsFiles,
        host: &str,
    ) -> (
        Result<(), rustls::Error>,
        ClientConnection,
        ServerConnection,
    ) {
        let mut c = Tls::load(dialer).unwrap().dialer(host).unwrap();
        let mut s = Tls::load(acceptor).unwrap().acceptor().unwrap();
        let out = handshake(&mut c, &mut s);
        (out, c, s)
    }

    #[test]
    fn two_nodes_of_one_ca_authenticate_each_other_and_share_a_binding() {
        let dir = Dir::new("ok");
        let ca = Ca::new("teleport test CA");
        let a = node(&dir, "a", &ca, &["alpha.example"], &ca);
        let b = node(&dir, "b", &ca, &["beta.example", "127.0.0.1"], &ca);
        for host in ["beta.example", "127.0.0.1"] {
            let (out, mut c, mut s) = dial(&a, &b, host);
            out.unwrap();
            let (bc, bs) = (binding(&c).unwrap(), binding(&s).unwrap());
            assert_eq!(bc, bs);
            // Both ends saw a certificate of the other.
            assert!(c.peer_certificates().is_some_and(|p| !p.is_empty()));
            assert!(s.peer_certificates().is_some_and(|p| !p.is_empty()));
            c.writer().write_all(b"hello over TLS").unwrap();
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            assert!(!wire.windows(5).any(|w| w == b"hello"), "sent in clear");
            s.read_tls(&mut &wire[..]).unwrap();
            s.process_new_packets().unwrap();
            let mut got = [0u8; 14];
            s.reader().read_exact(&mut got).unwrap();
            assert_eq!(&got, b"hello over TLS");
        }
        // Another session, another binding.
        let (_, c1, _) = dial(&a, &b, "beta.example");
        let (_, c2, _) = dial(&a, &b, "beta.example");
        assert_ne!(binding(&c1), binding(&c2));
    }

    /// The whole opening of a TLS connection over a socket: the TLS handshake, then the
    /// cookie handshake inside it, bound to the session; then data in both directions.
    #[test]
    fn the_cookie_handshake_runs_inside_tls_bound_to_the_session() {
        use crate::handshake::{accept_bound, dial_bound, Welcome};
        use std::net::{TcpListener, TcpStream};
        let dir = Dir::new("socket");
        let ca = Ca::new("teleport test CA");
        let a = Tls::load(&node(&dir, "a", &ca, &["alpha.example"], &ca)).unwrap();
        let b = Tls::load(&node(&dir, "b", &ca, &["127.0.0.1"], &ca)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let welcome = Welcome {
            max_frame: 1 << 20,
            incarnation: 9,
            delivered: 0,
        };
        let acceptor = std::thread::spawn(move || {
            let (mut sock, _) = listener.accept().unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut tls = b.acceptor().unwrap();
            while tls.is_handshaking() {
                tls.complete_io(&mut sock).unwrap();
            }
            let bound = binding(&tls).unwrap();
            let mut stream = rustls::StreamOwned::new(tls, sock);
            let proven = accept_bound(&mut stream, b"b@127.0.0.1", Some(&bound), |_| {
                Some(b"cookie".to_vec())
            })
            .unwrap();
            let dialer = proven.welcome(&mut stream, &welcome).unwrap();
            stream.flush().unwrap();
            let mut frame = [0u8; 5];
            stream.read_exact(&mut frame).unwrap();
            stream.write_all(b"ack").unwrap();
            stream.flush().unwrap();
            (dialer.name, frame)
        });
        let mut sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut tls = a.dialer(host_of("b@127.0.0.1").unwrap()).unwrap();
        while tls.is_handshaking() {
            tls.complete_io(&mut sock).unwrap();
        }
        let bound = binding(&tls).unwrap();
        let mut stream = rustls::StreamOwned::new(tls, sock);
        let told = dial_bound(
            &mut stream,
            b"a@alpha.example",
            b"b@127.0.0.1",
            b"cookie",
            0,
            1,
            Some(&bound),
        )
        .unwrap();
        assert_eq!(told, welcome);
        stream.write_all(b"frame").unwrap();
        stream.flush().unwrap();
        let mut ack = [0u8; 3];
        stream.read_exact(&mut ack).unwrap();
        assert_eq!(&ack, b"ack");
        let (name, frame) = acceptor.join().unwrap();
        assert_eq!(name, b"a@alpha.example");
        assert_eq!(&frame, b"frame");
    }

    #[test]
    fn a_certificate_of_another_ca_is_refused_on_either_side() {
        let dir = Dir::new("ca");
        let ca = Ca::new("teleport test CA");
        let other = Ca::new("another CA");
        let a = node(&dir, "a", &ca, &["alpha.example"], &ca);
        let b = node(&dir, "b", &ca, &["beta.example"], &ca);
        // The acceptor's certificate from elsewhere: the dialer refuses it.
        let b_stranger = node(&dir, "bs", &other, &["beta.example"], &ca);
        let (out, _, _) = dial(&a, &b_stranger, "beta.example");
        assert!(
            matches!(
                out,
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer
                ))
            ),
            "{out:?}"
        );
        // The dialer's certificate from elsewhere: the acceptor refuses it.
        let a_stranger = node(&dir, "as", &other, &["alpha.example"], &ca);
        let (out, _, _) = dial(&a_stranger, &b, "beta.example");
        assert!(out.is_err(), "{out:?}");
    }

    #[test]
    fn the_acceptor_must_name_the_host_dialed_unless_told_otherwise() {
        let dir = Dir::new("name");
        let ca = Ca::new("teleport test CA");
        let mut a = node(&dir, "a", &ca, &["alpha.example"], &ca);
        let b = node(&dir, "b", &ca, &["beta.example"], &ca);
        let (out, _, _) = dial(&a, &b, "gamma.example");
        assert!(
            matches!(
                out,
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                )) | Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForNameContext { .. }
                ))
            ),
            "{out:?}"
        );
        a.server_name_check = false;
        let (out, _, _) = dial(&a, &b, "gamma.example");
        out.unwrap();
        // Still against the CA.
        let other = Ca::new("another CA");
        let b_stranger = node(&dir, "bs", &other, &["beta.example"], &ca);
        let (out, _, _) = dial(&a, &b_stranger, "gamma.example");
        assert!(out.is_err());
    }

    #[test]
    fn a_node_told_to_speak_tls_1_2_gets_it_bound_and_without_resumption() {
        let dir = Dir::new("tls12");
        let ca = Ca::new("teleport test CA");
        let a = node(&dir, "a", &ca, &["alpha.example"], &ca);
        let b = node(&dir, "b", &ca, &["beta.example"], &ca);
        let only = |files: &TlsFiles, versions| TlsFiles {
            versions,
            ..files.clone()
        };
        let tls13 = Some(rustls::ProtocolVersion::TLSv1_3);
        let tls12 = Some(rustls::ProtocolVersion::TLSv1_2);
        for (dialer, acceptor, agreed) in [
            (a.clone(), b.clone(), tls13),
            (only(&a, Versions::Tls12), b.clone(), tls12),
            (a.clone(), only(&b, Versions::Tls12), tls12),
            (only(&a, Versions::Tls13), b.clone(), tls13),
        ] {
            let dialer = Tls::load(&dialer).unwrap();
            let acceptor = Tls::load(&acceptor).unwrap();
            // Twice over the same configurations: the second is a new session, not a
            // resumed one.
            for _ in 0..2 {
                let mut c = dialer.dialer("beta.example").unwrap();
                let mut s = acceptor.acceptor().unwrap();
                handshake(&mut c, &mut s).unwrap();
                assert_eq!(
                    (c.protocol_version(), s.protocol_version()),
                    (agreed, agreed)
                );
                assert_eq!(c.handshake_kind(), Some(rustls::HandshakeKind::Full));
                assert_eq!(binding(&c), binding(&s));
            }
        }
        // No version in common: refused.
        let (out, _, _) = dial(
            &only(&a, Versions::Tls13),
            &only(&b, Versions::Tls12),
            "beta.example",
        );
        assert!(out.is_err());
    }

    #[test]
    fn verify_none_takes_any_certificate() {
        let dir = Dir::new("none");
        let ca = Ca::new("teleport test CA");
        let other = Ca::new("another CA");
        let mut a = node(&dir, "a", &ca, &["alpha.example"], &other);
        let mut b = node(&dir, "b", &other, &["beta.example"], &ca);
        a.verify = Verify::None;
        b.verify = Verify::None;
        let (out, c, s) = dial(&a, &b, "gamma.example");
        out.unwrap();
        assert_eq!(binding(&c), binding(&s));
    }

    #[test]
    fn bad_files_are_refused_naming_the_file_and_the_fault() {
        let dir = Dir::new("bad");
        let ca = Ca::new("teleport test CA");
        let good = node(&dir, "a", &ca, &["alpha.example"], &ca);
        assert!(Tls::load(&good).is_ok());
        let missing = TlsFiles {
            certfile: dir.0.join("nowhere.crt"),
            ..good.clone()
        };
        let e = Tls::load(&missing).unwrap_err();
        assert!(matches!(&e, TlsError::Unreadable { file, .. } if file == &missing.certfile));
        assert!(e.to_string().contains("nowhere.crt"), "{e}");
        let not_pem = TlsFiles {
            cacertfile: dir.file("junk.crt", "not a certificate\n"),
            ..good.clone()
        };
        let e = Tls::load(&not_pem).unwrap_err();
        assert_eq!(
            e,
            TlsError::NoPem {
                file: not_pem.cacertfile.clone(),
                what: "certificate"
            }
        );
        let no_key = TlsFiles {
            keyfile: good.certfile.clone(),
            ..good.clone()
        };
        assert!(matches!(
            Tls::load(&no_key).unwrap_err(),
            TlsError::NoPem {
                what: "private key",
                ..
            }
        ));
        let (_, other_key) = ca.issue(&["alpha.example"], false);
        let wrong_key = TlsFiles {
            keyfile: dir.file("other.key", &other_key),
            ..good.clone()
        };
        let e = Tls::load(&wrong_key).unwrap_err();
        assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e:?}");
        assert!(e.to_string().contains("other.key"), "{e}");
        let (old, old_key) = ca.issue(&["alpha.example"], true);
        let expired = TlsFiles {
            certfile: dir.file("old.crt", &old),
            keyfile: dir.file("old.key", &old_key),
            ..good.clone()
        };
        let e = Tls::load(&expired).unwrap_err();
        assert!(matches!(e, TlsError::Expired { .. }), "{e:?}");
        let tls = Tls::load(&good).unwrap();
        assert!(tls.dialer("not a host!").is_err());
        // rcgen's certificates are valid for centuries; one that ends in three days loads,
        // and is said to expire soon.
        assert!(!tls.expires_within(EXPIRY_WARNING));
        let (soon, soon_key) = ca.issue_until(&["alpha.example"], Some(date_in_days(3)));
        let soon = TlsFiles {
            certfile: dir.file("soon.crt", &soon),
            keyfile: dir.file("soon.key", &soon_key),
            ..good.clone()
        };
        let tls = Tls::load(&soon).unwrap();
        assert!(tls.expires_within(EXPIRY_WARNING));
        assert!(!tls.expires_within(Duration::from_secs(24 * 3600)));
    }

    /// The civil date (UTC) `days` from now.
    fn date_in_days(days: u64) -> (i32, u8, u8) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap();
        let z = (now.as_secs() / 86_400 + days) as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        (y as i32, m as u8, d as u8)
    }

    /// Throughput of the cipher suite rustls picks here, one end encrypting 10 MB records'
    /// worth of data and the other decrypting them (`cargo test --release -- --ignored
    /// tls_throughput --nocapture`): a measure for the design, not an assertion.
    #[test]
    #[ignore]
    fn tls_throughput() {
        let dir = Dir::new("speed");
        let ca = Ca::new("teleport test CA");
        let a = node(&dir, "a", &ca, &["alpha.example"], &ca);
        let b = node(&dir, "b", &ca, &["beta.example"], &ca);
        let (out, mut c, mut s) = dial(&a, &b, "beta.example");
        out.unwrap();
        println!("suite {:?}", c.negotiated_cipher_suite().map(|s| s.suite()));
        c.set_buffer_limit(None);
        s.set_buffer_limit(None);
        let chunk = vec![7u8; 10 << 20];
        let mut plain = vec![0u8; 1 << 20];
        let (mut enc, mut dec) = (Duration::ZERO, Duration::ZERO);
        let rounds = 20;
        for _ in 0..rounds {
            let t0 = std::time::Instant::now();
            c.writer().write_all(&chunk).unwrap();
            let mut wire = Vec::with_capacity(11 << 20);
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            let t1 = std::time::Instant::now();
            let mut input = &wire[..];
            let mut got = 0;
            while got < chunk.len() {
                if !input.is_empty() {
                    s.read_tls(&mut input).unwrap();
                    s.process_new_packets().unwrap();
                }
                match s.reader().read(&mut plain) {
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
            enc += t1 - t0;
            dec += t1.elapsed();
        }
        let mb = (rounds * chunk.len()) as f64 / 1e6;
        println!(
            "encrypt {:.0} MB/s, decrypt {:.0} MB/s",
            mb / enc.as_secs_f64(),
            mb / dec.as_secs_f64()
        );
    }

    #[test]
    fn der_times_read_as_the_calendar_says() {
        let at = |tag, s: &str| der_time(tag, s.as_bytes());
        let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(at(0x17, "700101000000Z").map(secs), Some(0));
        assert_eq!(at(0x17, "000301000000Z").map(secs), Some(951_868_800));
        assert_eq!(at(0x18, "20261204050000Z").map(secs), Some(1_796_360_400));
        assert_eq!(at(0x17, "491231235959Z").map(secs), Some(2_524_607_999));
        assert_eq!(at(0x17, "701301000000Z"), None);
        assert_eq!(at(0x18, "2026120405000Z"), None);
        assert_eq!(at(0x16, "700101000000Z"), None);
        // Not digits, or not ASCII at all: no time, and no panic.
        assert_eq!(at(0x17, "7001010000x0Z"), None);
        assert_eq!(der_time(0x17, "é00101000000Z".as_bytes()), None);
        assert_eq!(der_time(0x18, &[0xff; 15]), None);
    }

    #[test]
    fn the_host_is_what_follows_the_at() {
        assert_eq!(host_of("a@beta.example"), Some("beta.example"));
        assert_eq!(host_of("a@127.0.0.1"), Some("127.0.0.1"));
        assert_eq!(host_of("a@"), None);
        assert_eq!(host_of("nohost"), None);
    }
}
