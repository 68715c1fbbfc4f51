//! TLS of the intercluster link (`intercluster.transport = "tls"`, the default): mutual, both
//! sides present the node's `tls.cert`/`tls.key` and verify the other's against
//! `tls.trust_bundle` (webpki). The dialling side checks that the answering certificate names
//! the host of the peer's listed address (a DNS-ID for a name, an IP SAN for an address); the
//! answering side checks that the caller's names the host of the address it lists for the
//! cluster the caller says it is (a peer listed by IP address is accepted on its chain alone).

use crate::cluster::peer::tls::OneKey;
use crate::config::{Config, Host};
use crate::tls::{load_certified_key, load_trust_bundle, name_matches, provider, PeerCert};
use rustls::client::WebPkiServerVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};
use std::sync::Arc;

/// Why the link's TLS cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum IcTlsError {
    #[error("intercluster.transport = \"tls\" needs tls.cert, tls.key and tls.trust_bundle")]
    Missing,
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS verifier: {0}")]
    Verifier(String),
}

#[derive(Clone)]
pub struct IcTls {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

impl IcTls {
    pub fn from_config(cfg: &Config) -> Result<IcTls, IcTlsError> {
        let (Some(cert), Some(key), Some(bundle)) =
            (&cfg.tls.cert, &cfg.tls.key, &cfg.tls.trust_bundle)
        else {
            return Err(IcTlsError::Missing);
        };
        let key = load_certified_key(cert, key)?;
        let roots = load_trust_bundle(bundle)?;
        let provider = provider();
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| IcTlsError::Verifier(e.to_string()))?;
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| IcTlsError::Verifier(e.to_string()))?;
        let resolver = Arc::new(OneKey(key));
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(client_verifier)
            .with_cert_resolver(resolver.clone());
        server.alpn_protocols = vec![b"h2".to_vec()];
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_webpki_verifier(server_verifier)
            .with_client_cert_resolver(resolver);
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(IcTls {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// The DNS-IDs of the certificate a TLS peer presented (chain already verified).
pub fn peer_names(certs: Option<&[rustls::pki_types::CertificateDer<'static>]>) -> Vec<String> {
    certs
        .and_then(|c| c.first())
        .and_then(|leaf| PeerCert::from_der(leaf).ok())
        .map(|c| c.dns_ids)
        .unwrap_or_default()
}

/// Whether a caller whose certificate names `names` may speak for a peer listed at `host`.
pub fn caller_allowed(host: &Host, names: &[String]) -> Result<(), String> {
    match host {
        // webpki verified the chain; an IP SAN check would need the raw SANs: the chain
        // alone decides for peers listed by address.
        Host::Ip(_) => Ok(()),
        Host::Name(d) => {
            if names.iter().any(|n| name_matches(n, d.as_str())) {
                Ok(())
            } else {
                Err(format!(
                    "the caller's certificate names {names:?}, not {d} (the host of the address \
                     this cluster lists for it)"
                ))
            }
        }
    }
}

/// What the status shows of a verified server certificate: when it expires.
pub fn describe(certs: Option<&[rustls::pki_types::CertificateDer<'static>]>, now: i64) -> String {
    let Some(leaf) = certs.and_then(|c| c.first()) else {
        return "valid (no certificate details)".into();
    };
    match x509_parser::parse_x509_certificate(leaf) {
        Ok((_, c)) => {
            let until = c.validity().not_after.timestamp();
            format!(
                "valid: verified against tls.trust_bundle, names the peer's address; expires in \
                 {} days (unix {until})",
                (until - now).max(0) / 86_400
            )
        }
        Err(_) => "valid (verified; expiry unreadable)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Domain;

    #[test]
    fn a_caller_must_be_named_by_its_certificate() {
        let host = Host::Name(Domain::parse("gw.b.example.com").unwrap_or_else(|e| panic!("{e}")));
        assert!(caller_allowed(&host, &["gw.b.example.com".into()]).is_ok());
        let e = caller_allowed(&host, &["gw.c.example.com".into()]).err();
        assert!(e.is_some_and(|e| e.contains("gw.b.example.com")));
        assert!(caller_allowed(&Host::Ip([127, 0, 0, 1].into()), &[]).is_ok());
    }
}
