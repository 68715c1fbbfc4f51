//! The peer's certificate identity after a handshake, and RFC 6125 name matching.
//!
//! This module owns the answer to "which domain does this verified certificate speak for?". It
//! reads the presented identifiers of the leaf certificate — SAN `dNSName` (DNS-ID), SAN
//! `otherName` SRV-ID (RFC 4985) and `id-on-xmppAddr` (RFC 6120 §13.7.1.4), and the subject CN
//! only when the SAN holds none of these (RFC 6125 §6.4.4) — and whether the leaf allows TLS
//! client authentication (RFC 5280 §4.2.1.12). Parsing is x509-parser's: chain, signature and
//! validity were already checked by webpki inside rustls before any of this runs, so nothing
//! here decides trust — it only names the peer. It must not match by suffix or by anything
//! looser than RFC 6125 §6.4.

use crate::config::Domain;
use x509_parser::asn1_rs::{Any, Class, FromDer, Tag};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::X509Certificate;

/// What a verified peer certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// Reference-free presented identifiers: SAN `dNSName` entries (ASCII-lowercased, trailing
    /// dot removed), or the subject CN(s) if the certificate has no DNS-ID, SRV-ID, URI-ID or
    /// xmppAddr at all (RFC 6125 §6.4.4).
    pub dns_ids: Vec<String>,
    /// Domains of SAN SRV-IDs for XMPP server-to-server service (`_xmpp-server.example.com`,
    /// XEP-0368's `_xmpps-server.`; RFC 6120 §13.7.1.2.1, RFC 6125 §6.5.1), normalised.
    pub srv_ids: Vec<String>,
    /// SAN `id-on-xmppAddr` values that are bare domains (RFC 6120 §13.7.1.4), normalised.
    /// An xmppAddr with a localpart or resource names a user, never a server.
    pub xmpp_addrs: Vec<String>,
    /// SAN `iPAddress` entries (RFC 5280 §4.2.1.6: 4 or 16 octets; others are skipped). Not
    /// identifiers of a domain; for peers listed by address (intercluster).
    pub ip_addrs: Vec<std::net::IpAddr>,
    /// True when the leaf may be used for TLS client authentication: it has no EKU extension,
    /// or its EKU lists `id-kp-clientAuth` or `anyExtendedKeyUsage` (RFC 5280 §4.2.1.12).
    pub client_auth_eku: bool,
    /// True when the leaf's EKU lists `id-kp-serverAuth` (or it has no EKU extension).
    pub server_auth_eku: bool,
    /// The leaf certificate, DER, for logs and status pages (fingerprints).
    pub leaf_der: Vec<u8>,
}

/// Why a leaf certificate could not be read. webpki accepted it, so this means the X.509
/// reader met an encoding it does not handle; callers fail closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read the peer certificate: {0}")]
pub struct CertParseError(pub &'static str);

/// id-on-xmppAddr (RFC 6120 §13.7.1.4).
const OID_XMPP_ADDR: &str = "1.3.6.1.5.5.7.8.5";
/// id-on-dnsSRV (RFC 4985 §2).
const OID_DNS_SRV: &str = "1.3.6.1.5.5.7.8.7";
/// SRV-ID service labels that name an XMPP server (RFC 6120 §13.7.1.2.1, XEP-0368 §3).
const XMPP_SERVER_SERVICES: &[&str] = &["_xmpp-server", "_xmpps-server"];

impl PeerCert {
    /// Reads the identity fields of a DER X.509 certificate (RFC 5280 §4.1).
    pub fn from_der(der: &[u8]) -> Result<Self, CertParseError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|_| CertParseError("not a DER X.509 certificate"))?;
        let mut dns_ids = Vec::new();
        let mut srv_ids = Vec::new();
        let mut xmpp_addrs = Vec::new();
        let mut ip_addrs = Vec::new();
        // Any identifier of these types, usable or not, rules the CN out (RFC 6125 §6.4.4).
        let mut san_has_ids = false;
        let san = cert
            .subject_alternative_name()
            .map_err(|_| CertParseError("invalid subjectAltName"))?;
        for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
            match name {
                GeneralName::DNSName(d) => {
                    san_has_ids = true;
                    dns_ids.push(normalise_name(d));
                }
                GeneralName::URI(_) => san_has_ids = true,
                GeneralName::IPAddress(b) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*b) {
                        ip_addrs.push(std::net::IpAddr::from(v4));
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                        ip_addrs.push(std::net::IpAddr::from(v6));
                    }
                }
                GeneralName::OtherName(oid, value) => {
                    let oid = oid.to_id_string();
                    if oid == OID_XMPP_ADDR {
                        san_has_ids = true;
                        if let Some(d) = explicit_string(value).and_then(domain_of_jid) {
                            xmpp_addrs.push(d);
                        }
                    } else if oid == OID_DNS_SRV {
                        san_has_ids = true;
                        if let Some(d) = explicit_string(value).and_then(xmpp_srv_domain) {
                            srv_ids.push(d);
                        }
                    }
                }
                _ => {}
            }
        }
        if !san_has_ids {
            dns_ids = common_names(&cert);
        }
        let (client_auth_eku, server_auth_eku) = match cert.extended_key_usage() {
            Ok(None) => (true, true),
            Ok(Some(eku)) => {
                let e = eku.value;
                (e.any || e.client_auth, e.any || e.server_auth)
            }
            Err(_) => return Err(CertParseError("invalid extendedKeyUsage")),
        };
        Ok(Self {
            dns_ids,
            srv_ids,
            xmpp_addrs,
            ip_addrs,
            client_auth_eku,
            server_auth_eku,
            leaf_der: der.to_vec(),
        })
    }

    /// Every identifier that names an XMPP server domain: DNS-IDs (wildcards included),
    /// XMPP SRV-ID domains and domain xmppAddrs.
    pub fn xmpp_ids(&self) -> impl Iterator<Item = &str> {
        self.dns_ids
            .iter()
            .chain(&self.srv_ids)
            .chain(&self.xmpp_addrs)
            .map(String::as_str)
    }
}

/// The string inside an otherName value: `[0] EXPLICIT` around a UTF8String (xmppAddr) or an
/// IA5String (SRV-ID). Anything else is not a name we use.
fn explicit_string(value: &[u8]) -> Option<&str> {
    let (_, outer) = Any::from_der(value).ok()?;
    if outer.class() != Class::ContextSpecific || outer.tag() != Tag(0) {
        return None;
    }
    let (_, inner) = Any::from_der(outer.data).ok()?;
    match inner.tag() {
        Tag::Utf8String | Tag::Ia5String => std::str::from_utf8(inner.data).ok(),
        _ => None,
    }
}

/// A domain xmppAddr (`example.com`) normalised; a JID with a localpart or resource is not a
/// server identity (RFC 6120 §13.7.1.4: the xmppAddr of a server is its domainpart).
fn domain_of_jid(jid: &str) -> Option<String> {
    if jid.contains(['@', '/']) {
        return None;
    }
    Domain::parse(jid).ok().map(|d| d.as_str().to_owned())
}

/// `_xmpp-server.example.com` → `example.com` (RFC 4985 `_Service.Name`, no protocol label).
fn xmpp_srv_domain(srv: &str) -> Option<String> {
    let (service, name) = srv.split_once('.')?;
    if !XMPP_SERVER_SERVICES
        .iter()
        .any(|s| s.eq_ignore_ascii_case(service))
    {
        return None;
    }
    Domain::parse(name).ok().map(|d| d.as_str().to_owned())
}

/// The subject's CN values (RFC 5280 §4.1.2.4) that are strings, normalised.
fn common_names(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(normalise_name)
        .collect()
}

/// ASCII-lowercase and drop one trailing dot (RFC 6125 §6.4.1: compare case-insensitively;
/// a fully qualified `example.com.` is the same name).
fn normalise_name(s: &str) -> String {
    s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase()
}

/// Does the presented identifier `presented` (a DNS-ID as written in a certificate) match the
/// reference identifier `reference` (RFC 6125 §6.4)?
///
/// - exact match, ASCII case-insensitive, a trailing dot ignored on either side;
/// - internationalised names are compared in their A-label (`xn--`) form only: a presented
///   identifier containing non-ASCII bytes never matches (§6.4.2);
/// - a wildcard is honoured only as the complete left-most label (`*.example.com`), matches
///   exactly one label (`a.example.com`, not `a.b.example.com`, §6.4.3), never the bare parent
///   (`example.com`), and never directly under a single-label parent (`*.com`, §7.2).
pub fn name_matches(presented: &str, reference: &str) -> bool {
    if !presented.is_ascii() || !reference.is_ascii() {
        return false;
    }
    let p = normalise_name(presented);
    let r = normalise_name(reference);
    if p.is_empty() || r.is_empty() || r.contains('*') {
        return false;
    }
    if let Some(parent) = p.strip_prefix("*.") {
        if parent.contains('*') || !parent.contains('.') || parent.split('.').any(str::is_empty) {
            return false;
        }
        return match r.split_once('.') {
            Some((first, rest)) => !first.is_empty() && rest == parent,
            None => false,
        };
    }
    // Any other `*` (partial-label wildcards like `f*.example.com`) is not honoured.
    !p.contains('*') && p == r
}

/// Does the certificate speak for `domain`? True when any of its DNS-IDs matches (RFC 6125
/// §6.4). `imp.example.com` is never matched by `example.com` and vice versa.
pub fn matches_domain(peer: &PeerCert, domain: &Domain) -> bool {
    peer.dns_ids
        .iter()
        .any(|id| name_matches(id, domain.as_str()))
}

/// Does the certificate speak for XMPP server `domain`? Its DNS-IDs as in
/// [`matches_domain`], plus an XMPP SRV-ID or a domain xmppAddr equal to it (RFC 6120
/// §13.7.2.1; these never carry wildcards).
pub fn matches_xmpp_domain(peer: &PeerCert, domain: &Domain) -> bool {
    matches_domain(peer, domain)
        || peer
            .srv_ids
            .iter()
            .chain(&peer.xmpp_addrs)
            .any(|id| id == domain.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_case() {
        assert!(name_matches("Example.COM", "example.com"));
        assert!(name_matches("example.com.", "example.com"));
        assert!(name_matches("example.com", "EXAMPLE.com."));
        assert!(!name_matches("example.com", "imp.example.com"));
        assert!(!name_matches("imp.example.com", "example.com"));
        assert!(!name_matches("", "example.com"));
    }

    #[test]
    fn wildcards() {
        assert!(name_matches("*.example.com", "a.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.com", "example.com"));
        assert!(!name_matches("f*.example.com", "foo.example.com"));
        assert!(!name_matches("a.*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.*.example.com", "a.b.example.com"));
        assert!(!name_matches("*", "example"));
        assert!(!name_matches("a.example.com", "*.example.com"));
    }

    #[test]
    fn idn_compared_as_a_labels() {
        assert!(name_matches(
            "xn--bcher-kva.example",
            "xn--bcher-kva.example"
        ));
        assert!(name_matches("*.example.org", "xn--bcher-kva.example.org"));
        assert!(!name_matches("bücher.example", "xn--bcher-kva.example"));
    }

    /// Every truncation of a real certificate is an error, never a panic; the whole parses.
    #[test]
    fn truncated_certificates_are_errors() {
        let Ok(key) = rcgen::KeyPair::generate() else {
            return;
        };
        let Ok(params) = rcgen::CertificateParams::new(vec!["a.example.com".to_string()]) else {
            return;
        };
        let Ok(cert) = params.self_signed(&key) else {
            return;
        };
        let der = cert.der().to_vec();
        let whole = PeerCert::from_der(&der);
        assert_eq!(
            whole.map(|p| p.dns_ids),
            Ok(vec!["a.example.com".to_string()])
        );
        for n in 0..der.len() {
            assert!(PeerCert::from_der(&der[..n]).is_err(), "prefix {n} parsed");
        }
    }

    /// A self-signed leaf with these SANs and subject CN, as DER.
    fn cert(sans: Vec<rcgen::SanType>, cn: Option<&str>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("key: {e}"));
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        let c = params
            .self_signed(&key)
            .unwrap_or_else(|e| panic!("cert: {e}"));
        c.der().to_vec()
    }

    fn dns(n: &str) -> rcgen::SanType {
        rcgen::SanType::DnsName(
            rcgen::string::Ia5String::try_from(n).unwrap_or_else(|e| panic!("{e}")),
        )
    }

    fn other(oid: &[u64], v: &str) -> rcgen::SanType {
        rcgen::SanType::OtherName((oid.to_vec(), v.into()))
    }

    const XMPP_ADDR: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 8, 5];
    const DNS_SRV: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 8, 7];

    fn parsed(der: &[u8]) -> PeerCert {
        PeerCert::from_der(der).unwrap_or_else(|e| panic!("{e}"))
    }

    fn d(s: &str) -> Domain {
        Domain::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    /// RFC 6125 §6.4.4: with a DNS-ID in the SAN, a different CN is not an identity.
    #[test]
    fn san_present_cn_ignored() {
        let p = parsed(&cert(vec![dns("a.example.com")], Some("cn.example.com")));
        assert_eq!(p.dns_ids, vec!["a.example.com".to_string()]);
        assert!(matches_domain(&p, &d("a.example.com")));
        assert!(!matches_domain(&p, &d("cn.example.com")));
    }

    /// Without any SAN identifier the CN is the fallback.
    #[test]
    fn no_san_cn_used() {
        let p = parsed(&cert(vec![], Some("CN.Example.com.")));
        assert_eq!(p.dns_ids, vec!["cn.example.com".to_string()]);
        assert!(matches_domain(&p, &d("cn.example.com")));
    }

    /// An xmppAddr alone names the server and also rules the CN out.
    #[test]
    fn xmpp_addr_names_the_server() {
        let p = parsed(&cert(
            vec![other(XMPP_ADDR, "xmpp.example.net")],
            Some("cn.example.net"),
        ));
        assert!(p.dns_ids.is_empty(), "{:?}", p.dns_ids);
        assert_eq!(p.xmpp_addrs, vec!["xmpp.example.net".to_string()]);
        assert!(matches_xmpp_domain(&p, &d("xmpp.example.net")));
        assert!(!matches_xmpp_domain(&p, &d("cn.example.net")));
        // Only the XMPP matcher reads xmppAddr: it is not a DNS-ID (SIP uses DNS-IDs).
        assert!(!matches_domain(&p, &d("xmpp.example.net")));
        // A user JID is not a server identity.
        let p = parsed(&cert(vec![other(XMPP_ADDR, "juliet@example.net")], None));
        assert!(p.xmpp_addrs.is_empty() && p.dns_ids.is_empty());
    }

    /// SRV-IDs for the XMPP server service name their domain; other services do not.
    #[test]
    fn srv_id_for_xmpp_server() {
        let p = parsed(&cert(
            vec![
                other(DNS_SRV, "_xmpp-server.example.org"),
                other(DNS_SRV, "_imap.mail.example.org"),
            ],
            Some("cn.example.org"),
        ));
        assert_eq!(p.srv_ids, vec!["example.org".to_string()]);
        assert!(p.dns_ids.is_empty(), "CN ignored: {:?}", p.dns_ids);
        assert!(matches_xmpp_domain(&p, &d("example.org")));
        assert!(!matches_xmpp_domain(&p, &d("mail.example.org")));
    }

    /// A wildcard DNS-ID covers one label and is matched, never listed as an exact domain.
    #[test]
    fn wildcard_dns_id() {
        let p = parsed(&cert(vec![dns("*.example.com")], None));
        assert_eq!(p.dns_ids, vec!["*.example.com".to_string()]);
        assert!(matches_xmpp_domain(&p, &d("chat.example.com")));
        assert!(!matches_xmpp_domain(&p, &d("example.com")));
        assert!(!matches_xmpp_domain(&p, &d("a.chat.example.com")));
    }

    #[test]
    fn eku_is_read() {
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("key: {e}"));
        let mut params = rcgen::CertificateParams::new(vec!["a.example.com".to_string()])
            .unwrap_or_else(|e| panic!("{e}"));
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let c = params
            .self_signed(&key)
            .unwrap_or_else(|e| panic!("cert: {e}"));
        let p = parsed(c.der());
        assert!(p.server_auth_eku && !p.client_auth_eku);
    }

    /// The `peer_cert` fuzz property on mutations of a real certificate (so the reader goes
    /// deep, not just past the first tag): never a panic, and every name it yields is text of
    /// the input.
    #[test]
    fn mutated_certificates_never_panic_and_names_come_from_the_input() {
        use rand::{Rng, SeedableRng};
        let base = cert(
            vec![
                dns("a.example.com"),
                dns("*.wild.example.com"),
                other(XMPP_ADDR, "x.example.com"),
                other(DNS_SRV, "_xmpp-server.s.example.com"),
            ],
            Some("cn.example.com"),
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(6125);
        for _ in 0..3000 {
            let mut der = base.clone();
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..der.len());
                der[i] = rng.random();
            }
            if let Ok(p) = PeerCert::from_der(&der) {
                let lower = der.to_ascii_lowercase();
                for id in p.xmpp_ids() {
                    assert!(
                        id.is_empty() || lower.windows(id.len()).any(|w| w == id.as_bytes()),
                        "{id:?} not in the input"
                    );
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = PeerCert::from_der(&bytes);
        }
    }

    #[test]
    fn garbage_der_is_an_error_not_a_panic() {
        for bad in [
            &[][..],
            &[0x30],
            &[0x30, 0x85, 1, 2, 3, 4, 5],
            &[0x30, 0x02, 0x30, 0x10],
            &[0x1f, 0x00],
        ] {
            assert!(PeerCert::from_der(bad).is_err());
        }
    }
}
