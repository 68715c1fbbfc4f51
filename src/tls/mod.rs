//! TLS for both federation edges (SIP over TLS, XMPP s2s), on rustls with the `ring` provider.
//!
//! This module owns certificates and handshakes: loading PEM files into rustls types with errors
//! that name the file, the server configuration (one certificate per local domain chosen by SNI,
//! a client certificate *requested* and verified against the trust bundle), the client
//! configuration (trust bundle, SNI = the target domain, our certificate presented for mutual
//! TLS), reading the peer's identity after the handshake, the per-peer certificate policy and a
//! bounded classification of handshake failures for metrics and logs. It decides nothing about
//! federation: which domains may talk to us, and which domain a peer claims, belong to the SIP
//! and XMPP layers, which call [`check_peer`] with that domain.
//!
//! Protocol versions and suites: TLS 1.2 and 1.3 only, with rustls' default suites — ECDHE key
//! exchange with AES-GCM or ChaCha20-Poly1305 (RFC 7525 / BCP 195). rustls has no TLS ≤ 1.1, no
//! CBC and no static-RSA or DHE suites, so **an old Windows Lync/OCS edge that lacks TLS 1.2
//! ECDHE-GCM suites cannot connect**; its handshake fails as `no_shared_cipher` or
//! `protocol_version` (see [`TlsFailure`]), and the caller logs it with the peer address.

mod identity;
mod verify;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, PeerIncompatible, RootCertStore,
    ServerConfig, SignatureScheme, SupportedProtocolVersion,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{Config, Domain, TlsVersion};

pub use identity::{matches_domain, matches_xmpp_domain, name_matches, CertParseError, PeerCert};

/// Errors building TLS configurations. Every file problem names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not valid PEM: {source}", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} contains no CERTIFICATE block", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} contains no private key (PKCS#8, RSA or EC PRIVATE KEY block)", path.display())]
    NoPrivateKey { path: PathBuf },
    #[error("{} contains more than one private key; keep exactly one per file", path.display())]
    SeveralKeys { path: PathBuf },
    #[error("the private key in {} is not usable: {source}", path.display())]
    BadKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the private key in {} does not belong to the certificate in {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("trust bundle {}: {reason}", path.display())]
    TrustBundle { path: PathBuf, reason: String },
    #[error("no server certificate: set tls.cert/tls.key or a cert/key on a [[local_domain]]")]
    NoServerCertificate,
    #[error("tls.trust_bundle is not set: outbound TLS cannot verify the peer's certificate")]
    NoTrustBundle,
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("cannot build the client-certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn pem_items(path: &Path) -> Result<Vec<rustls_pemfile::Item>, TlsError> {
    let bytes = read_file(path)?;
    rustls_pemfile::read_all(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_path_buf(),
            source,
        })
}

/// Reads every certificate of a PEM file, in file order (leaf first for a chain).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = pem_items(path)?
        .into_iter()
        .filter_map(|i| match i {
            rustls_pemfile::Item::X509Certificate(c) => Some(c),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Reads the one private key of a PEM file: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let mut keys: Vec<PrivateKeyDer<'static>> = pem_items(path)?
        .into_iter()
        .filter_map(|i| match i {
            rustls_pemfile::Item::Pkcs8Key(k) => Some(PrivateKeyDer::Pkcs8(k)),
            rustls_pemfile::Item::Pkcs1Key(k) => Some(PrivateKeyDer::Pkcs1(k)),
            rustls_pemfile::Item::Sec1Key(k) => Some(PrivateKeyDer::Sec1(k)),
            _ => None,
        })
        .collect();
    match (keys.pop(), keys.is_empty()) {
        (Some(k), true) => Ok(k),
        (Some(_), false) => Err(TlsError::SeveralKeys {
            path: path.to_path_buf(),
        }),
        (None, _) => Err(TlsError::NoPrivateKey {
            path: path.to_path_buf(),
        }),
    }
}

/// Loads a certificate chain and its key, checking that the key belongs to the leaf.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = load_certs(cert)?;
    let der = load_private_key(key)?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|source| TlsError::BadKey {
            path: key.to_path_buf(),
            source,
        })?;
    let ck = CertifiedKey::new(chain, signing);
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(ck))
        }
        Err(_) => Err(TlsError::KeyMismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        }),
    }
}

/// Reads a PEM bundle of trusted CA certificates. Every certificate must be usable as a trust
/// anchor: a bundle that silently loses a CA makes one partner fail mysteriously.
pub fn load_trust_bundle(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in load_certs(path)?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| TlsError::TrustBundle {
            path: path.to_path_buf(),
            reason: format!("certificate #{} is not a usable CA: {e}", i + 1),
        })?;
    }
    Ok(Arc::new(roots))
}

fn versions(min: TlsVersion) -> &'static [&'static SupportedProtocolVersion] {
    static BOTH: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];
    static ONLY13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
    match min {
        TlsVersion::V1_2 => BOTH,
        TlsVersion::V1_3 => ONLY13,
    }
}

/// Certificate files and policy for our TLS endpoints, as paths (so tests need no `Config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The node certificate `(cert, key)`: used for clients without SNI or with an unknown name.
    pub default_cert: Option<(PathBuf, PathBuf)>,
    /// One certificate per local domain, chosen by SNI (server) or by the local domain we speak
    /// for (client).
    pub domain_certs: Vec<(Domain, PathBuf, PathBuf)>,
    /// CAs trusted for peers' certificates, both directions.
    pub trust_bundle: Option<PathBuf>,
    pub min_version: TlsVersion,
}

impl TlsSettings {
    /// The TLS files named in a validated configuration (`[tls]` and `[[local_domain]]`).
    pub fn from_config(cfg: &Config) -> Self {
        let pair = |c: &Option<PathBuf>, k: &Option<PathBuf>| match (c, k) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            _ => None,
        };
        Self {
            default_cert: pair(&cfg.tls.cert, &cfg.tls.key),
            domain_certs: cfg
                .local_domains
                .iter()
                .filter_map(|d| pair(&d.cert, &d.key).map(|(c, k)| (d.name.clone(), c, k)))
                .collect(),
            trust_bundle: cfg.tls.trust_bundle.clone(),
            min_version: cfg.tls.min_version,
        }
    }

    /// Loads every certificate: (default, per-domain map). The default falls back to the first
    /// per-domain certificate when no node certificate is configured.
    fn load_certs(&self) -> Result<SniTable, TlsError> {
        let mut by_name = HashMap::new();
        let mut first = None;
        for (d, c, k) in &self.domain_certs {
            let ck = load_certified_key(c, k)?;
            first.get_or_insert_with(|| ck.clone());
            by_name.insert(d.as_str().to_string(), ck);
        }
        let default = match &self.default_cert {
            Some((c, k)) => load_certified_key(c, k)?,
            None => first.ok_or(TlsError::NoServerCertificate)?,
        };
        Ok(SniTable { by_name, default })
    }
}

#[derive(Debug)]
struct SniTable {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

/// Chooses the server certificate by SNI (RFC 6066 §3). Exact match on the normalised name;
/// no SNI, or a name we do not serve, gets the default certificate (Lync edges send SNI, some
/// XMPP servers do not). The table is swapped whole on reload.
#[derive(Debug)]
struct SniResolver {
    table: ArcSwap<SniTable>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let table = self.table.load();
        let chosen = hello
            .server_name()
            .map(|n| n.strip_suffix('.').unwrap_or(n).to_ascii_lowercase())
            .and_then(|n| table.by_name.get(&n).cloned());
        Some(chosen.unwrap_or_else(|| table.default.clone()))
    }
}

/// The server side of our TLS: SNI certificate choice and a requested client certificate.
///
/// Without a trust bundle no client certificate is requested (nothing could verify it);
/// mutual TLS needs `tls.trust_bundle`.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
    resolver: Arc<SniResolver>,
    mutual: bool,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("mutual", &self.mutual)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    pub fn new(settings: &TlsSettings) -> Result<Self, TlsError> {
        let provider = provider();
        let resolver = Arc::new(SniResolver {
            table: ArcSwap::from_pointee(settings.load_certs()?),
        });
        let verifier: Arc<dyn rustls::server::danger::ClientCertVerifier> = match &settings
            .trust_bundle
        {
            Some(path) => {
                let roots = load_trust_bundle(path)?;
                let inner =
                    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                        .allow_unauthenticated()
                        .build()?;
                Arc::new(verify::EkuTolerantClientVerifier::new(
                    inner,
                    roots,
                    provider.signature_verification_algorithms,
                ))
            }
            None => WebPkiClientVerifier::no_client_auth(),
        };
        let config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions(settings.min_version))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(resolver.clone());
        Ok(Self {
            config: Arc::new(config),
            resolver,
            mutual: settings.trust_bundle.is_some(),
        })
    }

    pub fn from_config(cfg: &Config) -> Result<Self, TlsError> {
        Self::new(&TlsSettings::from_config(cfg))
    }

    /// Replaces the certificates (rotation) without touching live connections; on error the
    /// old ones stay. The trust bundle and versions are not reloaded here.
    pub fn reload_certs(&self, settings: &TlsSettings) -> Result<(), TlsError> {
        self.resolver.table.store(Arc::new(settings.load_certs()?));
        Ok(())
    }

    /// Whether a client certificate is requested (a trust bundle is configured).
    pub fn requests_client_cert(&self) -> bool {
        self.mutual
    }

    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.clone())
    }

    /// Runs the server handshake on `io`, bounded by `timeout`.
    pub async fn accept<IO>(
        &self,
        io: IO,
        timeout: Duration,
    ) -> Result<tokio_rustls::server::TlsStream<IO>, HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        bounded(timeout, self.acceptor().accept(io)).await
    }
}

async fn bounded<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T, HandshakeError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(HandshakeError::from_io(e)),
        Err(_) => Err(HandshakeError {
            failure: TlsFailure::Timeout,
            source: io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"),
        }),
    }
}

/// Presents the certificate of one local domain (or the default one) as client certificate,
/// looked up at each handshake in a table swapped whole on reload (rotation).
#[derive(Debug)]
struct ClientCert {
    table: Arc<ArcSwap<SniTable>>,
    /// `None`: the default certificate.
    domain: Option<String>,
}

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let table = self.table.load();
        let ck = self
            .domain
            .as_ref()
            .and_then(|d| table.by_name.get(d))
            .unwrap_or(&table.default);
        // Offer it only if the server accepts our key's signature scheme; otherwise send no
        // certificate rather than fail the handshake locally.
        ck.key
            .choose_scheme(sigschemes)
            .is_some()
            .then(|| ck.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The client side of our TLS: verifies the peer against the trust bundle and the target
/// domain, sends SNI = the target domain, presents our certificate (Lync uses one certificate
/// with serverAuth + clientAuth both ways).
#[derive(Clone)]
pub struct ClientTls {
    default: Arc<ClientConfig>,
    by_domain: HashMap<Domain, Arc<ClientConfig>>,
    /// The certificates presented, shared by every clone; `None`: none configured.
    certs: Option<Arc<ArcSwap<SniTable>>>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("domains", &self.by_domain.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    pub fn new(settings: &TlsSettings) -> Result<Self, TlsError> {
        let path = settings
            .trust_bundle
            .as_ref()
            .ok_or(TlsError::NoTrustBundle)?;
        let roots = load_trust_bundle(path)?;
        let certs = match settings.load_certs() {
            Ok(t) => Some(Arc::new(ArcSwap::from_pointee(t))),
            Err(TlsError::NoServerCertificate) => None,
            Err(e) => return Err(e),
        };
        let build = |domain: Option<&Domain>| -> Result<Arc<ClientConfig>, TlsError> {
            let b = ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(versions(settings.min_version))?
                .with_root_certificates(roots.clone());
            Ok(Arc::new(match &certs {
                Some(table) => b.with_client_cert_resolver(Arc::new(ClientCert {
                    table: table.clone(),
                    domain: domain.map(|d| d.as_str().to_string()),
                })),
                None => b.with_no_client_auth(),
            }))
        };
        let mut by_domain = HashMap::new();
        if certs.is_some() {
            for (d, _, _) in &settings.domain_certs {
                by_domain.insert(d.clone(), build(Some(d))?);
            }
        }
        Ok(Self {
            default: build(None)?,
            by_domain,
            certs,
        })
    }

    /// Replaces the certificates presented (rotation) from the next handshake on; on error the
    /// old ones stay. A client built without any certificate keeps presenting none, and a
    /// local domain that had no certificate of its own keeps the default one: both need a
    /// restart. The trust bundle and versions are not reloaded here.
    pub fn reload_certs(&self, settings: &TlsSettings) -> Result<(), TlsError> {
        if let Some(table) = &self.certs {
            table.store(Arc::new(settings.load_certs()?));
        }
        Ok(())
    }

    pub fn from_config(cfg: &Config) -> Result<Self, TlsError> {
        Self::new(&TlsSettings::from_config(cfg))
    }

    /// The client configuration presenting the certificate of `local` (our domain this
    /// connection speaks for), or the default certificate.
    pub fn config(&self, local: Option<&Domain>) -> Arc<ClientConfig> {
        local
            .and_then(|d| self.by_domain.get(d))
            .unwrap_or(&self.default)
            .clone()
    }

    pub fn connector(&self, local: Option<&Domain>) -> TlsConnector {
        TlsConnector::from(self.config(local))
    }

    /// Runs the client handshake toward `target` (SNI and the name its certificate must carry,
    /// RFC 5922 §7.3 / RFC 6120 §13.7.2: the *domain*, not the SRV target host), bounded by
    /// `timeout`.
    pub async fn connect<IO>(
        &self,
        io: IO,
        local: Option<&Domain>,
        target: &Domain,
        timeout: Duration,
    ) -> Result<tokio_rustls::client::TlsStream<IO>, HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let name = server_name(target);
        bounded(timeout, self.connector(local).connect(name, io)).await
    }
}

/// SNI / reference identity for a domain.
pub fn server_name(d: &Domain) -> ServerName<'static> {
    // A `Domain` is a validated LDH hostname, which rustls always accepts as a DNS name. Should
    // that ever change, fail closed: the unspecified address matches no certificate, so the
    // handshake is refused rather than sent without SNI or checked against the wrong name.
    ServerName::try_from(d.as_str().to_string()).unwrap_or(ServerName::IpAddress(
        std::net::Ipv4Addr::UNSPECIFIED.into(),
    ))
}

/// The verified peer certificate of a finished handshake, `None` when the peer sent none.
///
/// Pass the rustls connection (`stream.get_ref().1` of a tokio-rustls stream). Only chains
/// that passed verification reach this point, so the identity is trustworthy; whether it
/// speaks for the domain the peer claims is [`check_peer`]'s question.
pub fn peer_identity(conn: &rustls::CommonState) -> Result<Option<PeerCert>, CertParseError> {
    match conn.peer_certificates().and_then(|c| c.first()) {
        Some(leaf) => PeerCert::from_der(leaf.as_ref()).map(Some),
        None => Ok(None),
    }
}

/// A peer certificate accepted for a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerPermit {
    /// The certificate lacks the clientAuth EKU and was accepted only because the peer's
    /// domain tolerates it (`tolerate_no_client_auth_eku`); worth a log line.
    pub eku_tolerated: bool,
}

/// Why a peer's certificate does not authenticate it for the domain it claims.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerDenied {
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the peer certificate names {presented:?}, not {claimed}")]
    NameMismatch {
        claimed: Domain,
        presented: Vec<String>,
    },
    #[error(
        "the peer certificate lacks the clientAuth extended key usage \
         (set tolerate_no_client_auth_eku for this domain to accept it)"
    )]
    NoClientAuthEku,
}

impl PeerDenied {
    /// Bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            PeerDenied::NoCertificate => "no_certificate",
            PeerDenied::NameMismatch { .. } => "name_mismatch",
            PeerDenied::NoClientAuthEku => "no_client_auth_eku",
        }
    }
}

/// The per-peer certificate check after an inbound handshake: the peer claims `domain`; its
/// certificate must name it (RFC 6125 §6.4) and allow client authentication, unless this
/// domain's policy tolerates a serverAuth-only certificate (old OCS/Lync edges).
pub fn check_peer(
    peer: Option<&PeerCert>,
    domain: &Domain,
    tolerate_no_client_auth_eku: bool,
) -> Result<PeerPermit, PeerDenied> {
    let peer = peer.ok_or(PeerDenied::NoCertificate)?;
    if !matches_domain(peer, domain) {
        return Err(PeerDenied::NameMismatch {
            claimed: domain.clone(),
            presented: peer.dns_ids.clone(),
        });
    }
    if !peer.client_auth_eku && !tolerate_no_client_auth_eku {
        return Err(PeerDenied::NoClientAuthEku);
    }
    Ok(PeerPermit {
        eku_tolerated: !peer.client_auth_eku,
    })
}

/// Why a handshake failed, as a fixed label set for metrics and logs (never a peer string).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsFailure {
    /// No common cipher suite, key-exchange group or signature scheme. Typical for old Windows
    /// edges without TLS 1.2 ECDHE-GCM.
    NoSharedCipher,
    /// The peer offers only TLS versions we do not speak (≤ 1.1), or not the one we require.
    ProtocolVersion,
    /// A certificate was malformed, for another name or purpose, badly signed or revoked.
    BadCertificate,
    /// The certificate does not chain to our trust bundle (or the peer's).
    UnknownCa,
    /// Outside its validity period.
    CertExpired,
    /// The peer spoke something other than TLS (plain SIP/XMPP on a TLS port) or broke the
    /// protocol.
    NotTls,
    Timeout,
    /// The peer closed or reset the connection mid-handshake.
    Eof,
    Other,
}

impl TlsFailure {
    pub const ALL: [TlsFailure; 9] = [
        TlsFailure::NoSharedCipher,
        TlsFailure::ProtocolVersion,
        TlsFailure::BadCertificate,
        TlsFailure::UnknownCa,
        TlsFailure::CertExpired,
        TlsFailure::NotTls,
        TlsFailure::Timeout,
        TlsFailure::Eof,
        TlsFailure::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            TlsFailure::NoSharedCipher => "no_shared_cipher",
            TlsFailure::ProtocolVersion => "protocol_version",
            TlsFailure::BadCertificate => "bad_certificate",
            TlsFailure::UnknownCa => "unknown_ca",
            TlsFailure::CertExpired => "cert_expired",
            TlsFailure::NotTls => "not_tls",
            TlsFailure::Timeout => "timeout",
            TlsFailure::Eof => "eof",
            TlsFailure::Other => "other",
        }
    }

    /// Classifies a rustls error, raised locally or received as an alert from the peer.
    pub fn from_rustls(e: &rustls::Error) -> Self {
        use rustls::Error as E;
        match e {
            E::PeerIncompatible(p) => match p {
                PeerIncompatible::ServerDoesNotSupportTls12Or13
                | PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig
                | PeerIncompatible::SupportedVersionsExtensionRequired
                | PeerIncompatible::Tls12NotOffered
                | PeerIncompatible::Tls12NotOfferedOrEnabled => TlsFailure::ProtocolVersion,
                _ => TlsFailure::NoSharedCipher,
            },
            E::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer => TlsFailure::UnknownCa,
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => TlsFailure::CertExpired,
                _ => TlsFailure::BadCertificate,
            },
            E::NoCertificatesPresented => TlsFailure::BadCertificate,
            E::AlertReceived(a) => match a {
                AlertDescription::HandshakeFailure | AlertDescription::InsufficientSecurity => {
                    TlsFailure::NoSharedCipher
                }
                AlertDescription::ProtocolVersion => TlsFailure::ProtocolVersion,
                AlertDescription::UnknownCA => TlsFailure::UnknownCa,
                AlertDescription::CertificateExpired => TlsFailure::CertExpired,
                AlertDescription::BadCertificate
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateUnknown
                | AlertDescription::CertificateRequired
                | AlertDescription::AccessDenied => TlsFailure::BadCertificate,
                _ => TlsFailure::Other,
            },
            E::InvalidMessage(_)
            | E::InappropriateMessage { .. }
            | E::InappropriateHandshakeMessage { .. }
            | E::PeerMisbehaved(_) => TlsFailure::NotTls,
            _ => TlsFailure::Other,
        }
    }

    /// Classifies an I/O error from a tokio-rustls handshake (rustls errors travel inside
    /// `io::ErrorKind::InvalidData`).
    pub fn from_io(e: &io::Error) -> Self {
        if let Some(r) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            return Self::from_rustls(r);
        }
        match e.kind() {
            io::ErrorKind::TimedOut => TlsFailure::Timeout,
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => TlsFailure::Eof,
            _ => TlsFailure::Other,
        }
    }
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A failed handshake: the bounded reason plus the underlying error for the log line.
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake failed ({failure}): {source}")]
pub struct HandshakeError {
    pub failure: TlsFailure,
    #[source]
    pub source: io::Error,
}

impl HandshakeError {
    pub fn from_io(source: io::Error) -> Self {
        Self {
            failure: TlsFailure::from_io(&source),
            source,
        }
    }

    /// The log line for a failed handshake with `peer` (issue 6 item 3: peer address and
    /// reason), with the likely cause spelled out where we know it.
    pub fn log(&self, peer: std::net::SocketAddr) {
        let hint = match self.failure {
            TlsFailure::NoSharedCipher | TlsFailure::ProtocolVersion => {
                "the peer may be an old Windows edge without TLS 1.2 ECDHE-GCM suites,                  which Legate does not support"
            }
            TlsFailure::UnknownCa => "the certificate's CA is not in tls.trust_bundle (or ours not in theirs)",
            TlsFailure::CertExpired => "a certificate is outside its validity period (check clocks too)",
            TlsFailure::NotTls => "the peer did not speak TLS (plain SIP/XMPP on a TLS port?)",
            _ => "",
        };
        tracing::warn!(
            %peer,
            reason = self.failure.label(),
            error = %self.source,
            hint,
            "TLS handshake failed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_unique_and_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for f in TlsFailure::ALL {
            assert!(seen.insert(f.label()));
            assert!(f
                .label()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_'));
        }
    }

    #[test]
    fn classification() {
        use rustls::Error as E;
        assert_eq!(
            TlsFailure::from_rustls(&E::InvalidCertificate(CertificateError::UnknownIssuer)),
            TlsFailure::UnknownCa
        );
        assert_eq!(
            TlsFailure::from_rustls(&E::PeerIncompatible(
                PeerIncompatible::NoCipherSuitesInCommon
            )),
            TlsFailure::NoSharedCipher
        );
        assert_eq!(
            TlsFailure::from_rustls(&E::AlertReceived(AlertDescription::ProtocolVersion)),
            TlsFailure::ProtocolVersion
        );
        assert_eq!(
            TlsFailure::from_rustls(&E::InvalidCertificate(CertificateError::Expired)),
            TlsFailure::CertExpired
        );
        let wrapped = io::Error::new(
            io::ErrorKind::InvalidData,
            E::InvalidCertificate(CertificateError::BadSignature),
        );
        assert_eq!(TlsFailure::from_io(&wrapped), TlsFailure::BadCertificate);
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert_eq!(TlsFailure::from_io(&eof), TlsFailure::Eof);
    }

    #[test]
    fn missing_file_names_the_file() {
        let e = load_certs(Path::new("/nonexistent/legate-cert.pem"));
        assert!(matches!(e, Err(TlsError::Read { .. })));
        assert!(e
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("/nonexistent/legate-cert.pem"));
    }

    #[test]
    fn check_peer_policy() {
        let d = Domain::parse("partner.test").ok();
        let Some(d) = d else { return };
        let mut pc = PeerCert {
            dns_ids: vec!["partner.test".into()],
            srv_ids: Vec::new(),
            xmpp_addrs: Vec::new(),
            ip_addrs: Vec::new(),
            client_auth_eku: false,
            server_auth_eku: true,
            leaf_der: vec![],
        };
        assert_eq!(
            check_peer(Some(&pc), &d, false),
            Err(PeerDenied::NoClientAuthEku)
        );
        assert_eq!(
            check_peer(Some(&pc), &d, true),
            Ok(PeerPermit {
                eku_tolerated: true
            })
        );
        pc.client_auth_eku = true;
        assert_eq!(
            check_peer(Some(&pc), &d, false),
            Ok(PeerPermit {
                eku_tolerated: false
            })
        );
        assert_eq!(check_peer(None, &d, true), Err(PeerDenied::NoCertificate));
    }
}
