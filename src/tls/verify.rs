//! The client-certificate verifier of our TLS servers.
//!
//! It owns one decision: is the certificate a foreign edge presents a valid chain to our trust
//! bundle? It does *not* decide whether that certificate may speak for the peer's domain, nor
//! whether a certificate without the clientAuth EKU is acceptable: at handshake time we know
//! only the peer's IP address, and both answers depend on which federated domain the peer
//! claims (the SIP `From`/Via host, the XMPP stream `from`). Those checks run after the
//! handshake in [`super::check_peer`] with the per-domain policy.
//!
//! Design: wrap rustls' `WebPkiClientVerifier` (client certificate *requested*, not required:
//! `allow_unauthenticated`). If it refuses a chain only because the leaf's EKU lacks
//! `id-kp-clientAuth` (`CertificateError::InvalidPurpose*`), verify the same chain for the
//! serverAuth purpose instead (old OCS/Lync edges present their server certificate as client
//! certificate). A chain valid for neither purpose is refused as webpki said. Which purpose the
//! leaf carries is read again from the certificate after the handshake (`PeerCert`), so no state
//! needs to travel from here to there.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};

/// Requests a client certificate, verifies its chain for clientAuth or (fallback) serverAuth.
#[derive(Debug)]
pub(crate) struct EkuTolerantClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
}

impl EkuTolerantClientVerifier {
    pub(crate) fn new(
        inner: Arc<dyn ClientCertVerifier>,
        roots: Arc<RootCertStore>,
        algs: WebPkiSupportedAlgorithms,
    ) -> Self {
        Self { inner, roots, algs }
    }
}

fn is_wrong_purpose(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
        )
    )
}

impl ClientCertVerifier for EkuTolerantClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    /// Requested, not required: a peer without a certificate may still authenticate by other
    /// means (XMPP dialback) or be refused by policy after the handshake with a clear reason.
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            Ok(v) => Ok(v),
            Err(e) if is_wrong_purpose(&e) => {
                let cert = ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_cert_signed_by_trust_anchor(
                    &cert,
                    &self.roots,
                    intermediates,
                    now,
                    self.algs.all,
                )
                .map(|()| ClientCertVerified::assertion())
                // webpki checks the leaf's EKU before building the chain, so the first error
                // may hide a chain problem (unknown CA, expiry): report the fallback's reason,
                // unless it is the EKU again (valid for neither purpose).
                .map_err(|fallback| {
                    if is_wrong_purpose(&fallback) {
                        e
                    } else {
                        fallback
                    }
                })
            }
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
