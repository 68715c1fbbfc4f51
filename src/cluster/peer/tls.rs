//! TLS of the peer link: always mutual, verified or not as `cluster.tls_verify` says (issue 12
//! item 5, seed 001).
//!
//! - `permissive` (the default): encrypted; both sides present a certificate but neither is
//!   verified — how a cluster is formed with IP addresses before names and a CA are ready.
//!   Without `tls.cert`, a node presents a self-signed certificate made at start.
//! - `enforce`: the server's certificate must chain to `tls.trust_bundle` and name the peer
//!   address dialled (webpki's name check: a DNS-ID for an FQDN, an IP SAN for an address);
//!   a client's must chain to the same bundle and carry a DNS-ID naming one of the listed
//!   peers (a peer listed by IP address is accepted on its chain alone). Handshake signatures
//!   are checked in both modes.

use crate::config::{Config, Host, PeerTlsVerify};
use crate::tls::{load_certified_key, load_trust_bundle, provider, TlsError};
use crate::tls::{name_matches, PeerCert};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};
use std::sync::Arc;

/// Why the peer link's TLS cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum PeerTlsError {
    #[error(
        "cluster.tls_verify = \"enforce\" needs tls.cert and tls.key (this node's certificate, \
         presented to its peers) and tls.trust_bundle (the CA that signed every peer's)"
    )]
    EnforceNeedsCertificates,
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("cannot make this node's self-signed peer certificate: {0}")]
    Generate(String),
}

/// The client and server configurations of this node's peer link.
#[derive(Clone)]
pub struct PeerTls {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
    pub mode: PeerTlsVerify,
    /// FQDNs of the listed peers: in `enforce`, a client certificate must name one.
    peer_names: Arc<Vec<String>>,
    /// Whether this node presents a certificate made at start (no `tls.cert`).
    pub self_signed: bool,
}

impl PeerTls {
    pub fn from_config(cfg: &Config) -> Result<PeerTls, PeerTlsError> {
        let mode = cfg.cluster.tls_verify;
        let (key, self_signed) = match (&cfg.tls.cert, &cfg.tls.key) {
            (Some(c), Some(k)) => (load_certified_key(c, k)?, false),
            _ if mode == PeerTlsVerify::Enforce => {
                return Err(PeerTlsError::EnforceNeedsCertificates)
            }
            _ => (self_signed_key(&cfg.node.id.to_string())?, true),
        };
        let provider = provider();
        let algs = provider.signature_verification_algorithms;
        let (client_verifier, server_verifier): (
            Arc<dyn ClientCertVerifier>,
            Arc<dyn ServerCertVerifier>,
        ) = match mode {
            PeerTlsVerify::Permissive => (Arc::new(AnyCert { algs }), Arc::new(AnyCert { algs })),
            PeerTlsVerify::Enforce => {
                let path = cfg
                    .tls
                    .trust_bundle
                    .as_ref()
                    .ok_or(PeerTlsError::EnforceNeedsCertificates)?;
                let roots = load_trust_bundle(path)?;
                (
                    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                        .build()
                        .map_err(|e| PeerTlsError::Generate(e.to_string()))?,
                    WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                        .build()
                        .map_err(|e| PeerTlsError::Generate(e.to_string()))?,
                )
            }
        };
        let resolver = Arc::new(OneKey(key));
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(client_verifier)
            .with_cert_resolver(resolver.clone());
        server.alpn_protocols = vec![b"h2".to_vec()];
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(server_verifier)
            .with_client_cert_resolver(resolver);
        client.alpn_protocols = vec![b"h2".to_vec()];
        let peer_names = cfg
            .cluster
            .peers
            .iter()
            .filter_map(|p| match &p.address.host {
                Host::Name(d) => Some(d.to_string()),
                Host::Ip(_) => None,
            })
            .collect();
        Ok(PeerTls {
            server: Arc::new(server),
            client: Arc::new(client),
            mode,
            peer_names: Arc::new(peer_names),
            self_signed,
        })
    }

    /// After a handshake as server: whether the client's certificate may speak for a listed
    /// peer (always in `permissive`; the chain was verified during the handshake).
    pub fn client_allowed(&self, conn: &rustls::ServerConnection) -> Result<(), String> {
        if self.mode == PeerTlsVerify::Permissive {
            return Ok(());
        }
        let Some(leaf) = conn.peer_certificates().and_then(|c| c.first()) else {
            return Err("no client certificate".into());
        };
        let cert = PeerCert::from_der(leaf).map_err(|e| e.to_string())?;
        // Peers listed only by IP address: the chain is the whole check.
        if self.peer_names.is_empty() {
            return Ok(());
        }
        if cert
            .dns_ids
            .iter()
            .any(|id| self.peer_names.iter().any(|n| name_matches(id, n)))
        {
            Ok(())
        } else {
            Err(format!(
                "the client certificate names {:?}, none of the listed peers",
                cert.dns_ids
            ))
        }
    }
}

/// What this node dials for `host` (webpki checks the certificate against it in `enforce`).
pub fn server_name(host: &Host) -> ServerName<'static> {
    match host {
        Host::Ip(ip) => ServerName::IpAddress((*ip).into()),
        Host::Name(d) => crate::tls::server_name(d),
    }
}

fn self_signed_key(node_id: &str) -> Result<Arc<CertifiedKey>, PeerTlsError> {
    let made = rcgen::generate_simple_self_signed(vec![node_id.to_string()])
        .map_err(|e| PeerTlsError::Generate(e.to_string()))?;
    let der = rustls::pki_types::PrivateKeyDer::Pkcs8(made.signing_key.serialize_der().into());
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(PeerTlsError::Rustls)?;
    Ok(Arc::new(CertifiedKey::new(
        vec![made.cert.der().clone()],
        signing,
    )))
}

/// This node's one certificate, as server and as client (the intercluster link uses it too).
#[derive(Debug)]
pub(crate) struct OneKey(pub Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for OneKey {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for OneKey {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// `permissive`: any certificate, but the handshake signatures must be right (the link is
/// encrypted to whoever holds the key of the certificate shown).
#[derive(Debug)]
struct AnyCert {
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for AnyCert {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
