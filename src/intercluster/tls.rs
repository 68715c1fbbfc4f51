//! TLS of the intercluster link (`intercluster.transport = "tls"`, the default): mutual, both
//! sides present the node's `tls.cert`/`tls.key` and verify the other's against
//! `tls.trust_bundle` (webpki). The dialling side checks that the answering certificate names
//! the host of the peer's listed address (a DNS-ID for a name, an IP SAN for an address); the
//! answering side checks that the caller's names the host of the address it lists for the
//! cluster the caller says it is, the same way.

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

/// What a TLS caller's certificate (chain already verified) names: its DNS-IDs and its
/// iPAddress SANs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Presented {
    pub names: Vec<String>,
    pub ips: Vec<std::net::IpAddr>,
}

/// What the leaf certificate a TLS peer presented names.
pub fn presented(certs: Option<&[rustls::pki_types::CertificateDer<'static>]>) -> Presented {
    certs
        .and_then(|c| c.first())
        .and_then(|leaf| PeerCert::from_der(leaf).ok())
        .map(|c| Presented {
            names: c.dns_ids,
            ips: c.ip_addrs,
        })
        .unwrap_or_default()
}

/// Whether a caller whose certificate names `p` may speak for a peer listed at `host`: the
/// certificate must name that host, as a DNS-ID for a name, as an iPAddress SAN for an
/// address (the check the dialling side makes of the answering certificate, RFC 6125 and
/// RFC 5280 §4.2.1.6), so a cluster can only speak for the address it is listed at.
pub fn caller_allowed(host: &Host, p: &Presented) -> Result<(), String> {
    let ok = match host {
        Host::Ip(ip) => p.ips.contains(ip),
        Host::Name(d) => p.names.iter().any(|n| name_matches(n, d.as_str())),
    };
    if ok {
        return Ok(());
    }
    let kind = match host {
        Host::Ip(_) => "an iPAddress SAN",
        Host::Name(_) => "a DNS name",
    };
    Err(format!(
        "the caller's certificate names {:?} and addresses {:?}, not {host} as {kind} (the host \
         of the address this cluster lists for it)",
        p.names, p.ips
    ))
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
        let named = |n: &str| Presented {
            names: vec![n.into()],
            ips: vec![[127, 0, 0, 1].into()],
        };
        assert!(caller_allowed(&host, &named("gw.b.example.com")).is_ok());
        assert!(caller_allowed(&host, &named("*.b.example.com")).is_ok());
        let e = caller_allowed(&host, &named("gw.c.example.com")).err();
        assert!(e.is_some_and(|e| e.contains("gw.b.example.com")));
        // Listed by address: an iPAddress SAN of that address, and nothing else, speaks for it.
        let ip = Host::Ip([127, 0, 0, 1].into());
        assert!(caller_allowed(&ip, &named("gw.c.example.com")).is_ok());
        let other = Host::Ip([127, 0, 0, 2].into());
        let e = caller_allowed(&other, &named("127.0.0.2")).err();
        assert!(e.is_some_and(|e| e.contains("127.0.0.2 as an iPAddress SAN")));
        let v6 = Host::Ip("::1".parse().unwrap_or_else(|e| panic!("{e}")));
        assert!(caller_allowed(&v6, &Presented::default()).is_err());
    }

    #[test]
    fn ip_sans_are_read_from_a_real_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["gw.b.example.com".to_string()])
            .unwrap_or_else(|e| panic!("{e}"));
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress([192, 0, 2, 7].into()));
        params.subject_alt_names.push(rcgen::SanType::IpAddress(
            "2001:db8::7".parse().unwrap_or_else(|e| panic!("{e}")),
        ));
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let cert = params.self_signed(&key).unwrap_or_else(|e| panic!("{e}"));
        let der = rustls::pki_types::CertificateDer::from(cert.der().to_vec());
        let p = presented(Some(&[der]));
        assert_eq!(p.names, vec!["gw.b.example.com".to_string()]);
        assert_eq!(
            p.ips,
            vec![
                std::net::IpAddr::from([192, 0, 2, 7]),
                "2001:db8::7"
                    .parse::<std::net::IpAddr>()
                    .unwrap_or_else(|e| panic!("{e}"))
            ]
        );
        assert!(caller_allowed(&Host::Ip([192, 0, 2, 7].into()), &p).is_ok());
    }
}
