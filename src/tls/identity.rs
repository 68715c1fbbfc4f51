//! The peer's certificate identity after a handshake, and RFC 6125 name matching.
//!
//! This module owns the answer to "which domain does this verified certificate speak for?". It
//! reads the DNS-IDs of the leaf certificate (SAN `dNSName`, and the subject CN only when the
//! certificate has no DNS-ID, RFC 6125 §6.4.4) and whether the leaf allows TLS client
//! authentication (RFC 5280 §4.2.1.12). It parses only those few fields, with a small bounded
//! DER reader: chain, signature and validity were already checked by webpki inside rustls
//! before any of this runs, so nothing here decides trust — it only names the peer. It must not
//! match by suffix or by anything looser than RFC 6125 §6.4.

use crate::config::Domain;

/// What a verified peer certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// Reference-free presented identifiers: SAN `dNSName` entries (ASCII-lowercased, trailing
    /// dot removed), or the subject CN(s) if the certificate has no `dNSName` at all.
    pub dns_ids: Vec<String>,
    /// True when the leaf may be used for TLS client authentication: it has no EKU extension,
    /// or its EKU lists `id-kp-clientAuth` or `anyExtendedKeyUsage` (RFC 5280 §4.2.1.12).
    pub client_auth_eku: bool,
    /// True when the leaf's EKU lists `id-kp-serverAuth` (or it has no EKU extension).
    pub server_auth_eku: bool,
    /// The leaf certificate, DER, for logs and status pages (fingerprints).
    pub leaf_der: Vec<u8>,
}

/// Why a leaf certificate could not be read. webpki accepted it, so this means our reader met
/// an encoding it does not handle; callers fail closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read the peer certificate: {0}")]
pub struct CertParseError(pub &'static str);

// DER tags (X.690 §8) used below.
const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;
const TAG_OID: u8 = 0x06;
const TAG_BOOLEAN: u8 = 0x01;
const TAG_OCTET_STRING: u8 = 0x04;
const TAG_UTF8_STRING: u8 = 0x0c;
const TAG_PRINTABLE_STRING: u8 = 0x13;
const TAG_IA5_STRING: u8 = 0x16;
/// `[0] EXPLICIT Version` in TBSCertificate.
const TAG_VERSION: u8 = 0xa0;
/// `[3] EXPLICIT Extensions` in TBSCertificate.
const TAG_EXTENSIONS: u8 = 0xa3;
/// GeneralName `dNSName [2] IMPLICIT IA5String` (RFC 5280 §4.2.1.6).
const TAG_DNS_NAME: u8 = 0x82;

// OID contents (without tag and length).
/// id-at-commonName 2.5.4.3
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
/// id-ce-subjectAltName 2.5.29.17
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];
/// id-ce-extKeyUsage 2.5.29.37
const OID_EKU: &[u8] = &[0x55, 0x1d, 0x25];
/// anyExtendedKeyUsage 2.5.29.37.0
const OID_ANY_EKU: &[u8] = &[0x55, 0x1d, 0x25, 0x00];
/// id-kp-serverAuth 1.3.6.1.5.5.7.3.1
const OID_SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
/// id-kp-clientAuth 1.3.6.1.5.5.7.3.2
const OID_CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];

/// A cursor over DER bytes; every read is bounds-checked and returns an error, never panics.
struct Der<'a> {
    rest: &'a [u8],
}

impl<'a> Der<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn peek_tag(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    /// Reads one TLV and returns (tag, contents).
    fn read_any(&mut self) -> Result<(u8, &'a [u8]), CertParseError> {
        let (&tag, after_tag) = self
            .rest
            .split_first()
            .ok_or(CertParseError("truncated tag"))?;
        if tag & 0x1f == 0x1f {
            // High tag numbers never appear in the fields we read.
            return Err(CertParseError("multi-byte tag"));
        }
        let (&first, mut after_len) = after_tag
            .split_first()
            .ok_or(CertParseError("truncated length"))?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            // DER forbids the indefinite form; 4 length bytes cover any certificate.
            if n == 0 || n > 4 || after_len.len() < n {
                return Err(CertParseError("bad length"));
            }
            let (len_bytes, rest) = after_len.split_at(n);
            after_len = rest;
            len_bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
        };
        if after_len.len() < len {
            return Err(CertParseError("length past the end"));
        }
        let (contents, rest) = after_len.split_at(len);
        self.rest = rest;
        Ok((tag, contents))
    }

    fn read(&mut self, want: u8) -> Result<&'a [u8], CertParseError> {
        let (tag, contents) = self.read_any()?;
        if tag != want {
            return Err(CertParseError("unexpected tag"));
        }
        Ok(contents)
    }

    fn skip_if(&mut self, tag: u8) -> Result<(), CertParseError> {
        if self.peek_tag() == Some(tag) {
            self.read_any()?;
        }
        Ok(())
    }
}

impl PeerCert {
    /// Reads the identity fields of a DER X.509 certificate (RFC 5280 §4.1).
    pub fn from_der(der: &[u8]) -> Result<Self, CertParseError> {
        let cert = Der::new(der).read(TAG_SEQUENCE)?;
        let mut tbs = Der::new(Der::new(cert).read(TAG_SEQUENCE)?);
        tbs.skip_if(TAG_VERSION)?;
        tbs.read_any()?; // serialNumber
        tbs.read(TAG_SEQUENCE)?; // signature AlgorithmIdentifier
        tbs.read(TAG_SEQUENCE)?; // issuer
        tbs.read(TAG_SEQUENCE)?; // validity
        let subject = tbs.read(TAG_SEQUENCE)?;
        tbs.read(TAG_SEQUENCE)?; // subjectPublicKeyInfo
        let mut san_dns = Vec::new();
        let mut eku: Option<Vec<&[u8]>> = None;
        while !tbs.is_empty() {
            let (tag, contents) = tbs.read_any()?;
            if tag != TAG_EXTENSIONS {
                continue; // issuerUniqueID / subjectUniqueID
            }
            let mut exts = Der::new(Der::new(contents).read(TAG_SEQUENCE)?);
            while !exts.is_empty() {
                let mut ext = Der::new(exts.read(TAG_SEQUENCE)?);
                let oid = ext.read(TAG_OID)?;
                ext.skip_if(TAG_BOOLEAN)?;
                let value = ext.read(TAG_OCTET_STRING)?;
                if oid == OID_SAN {
                    let mut names = Der::new(Der::new(value).read(TAG_SEQUENCE)?);
                    while !names.is_empty() {
                        let (tag, name) = names.read_any()?;
                        if tag == TAG_DNS_NAME {
                            san_dns.push(name);
                        }
                    }
                } else if oid == OID_EKU {
                    let mut list = Der::new(Der::new(value).read(TAG_SEQUENCE)?);
                    let mut oids = Vec::new();
                    while !list.is_empty() {
                        oids.push(list.read(TAG_OID)?);
                    }
                    eku = Some(oids);
                }
            }
        }
        // RFC 6125 §6.4.4: the CN is a fallback only when no DNS-ID is presented.
        let raw_ids: Vec<&[u8]> = if san_dns.is_empty() {
            common_names(subject)?
        } else {
            san_dns
        };
        let dns_ids = raw_ids
            .into_iter()
            .filter_map(|b| std::str::from_utf8(b).ok())
            .map(normalise_name)
            .collect();
        let has = |want: &[u8]| {
            eku.as_ref()
                .is_none_or(|l| l.iter().any(|o| *o == want || *o == OID_ANY_EKU))
        };
        Ok(Self {
            dns_ids,
            client_auth_eku: has(OID_CLIENT_AUTH),
            server_auth_eku: has(OID_SERVER_AUTH),
            leaf_der: der.to_vec(),
        })
    }
}

/// The CN attribute values of a Name (RFC 5280 §4.1.2.4), string types that can hold a
/// hostname only.
fn common_names(name: &[u8]) -> Result<Vec<&[u8]>, CertParseError> {
    let mut out = Vec::new();
    let mut rdns = Der::new(name);
    while !rdns.is_empty() {
        let mut set = Der::new(rdns.read(TAG_SET)?);
        while !set.is_empty() {
            let mut atv = Der::new(set.read(TAG_SEQUENCE)?);
            let oid = atv.read(TAG_OID)?;
            let (tag, value) = atv.read_any()?;
            if oid == OID_CN
                && matches!(tag, TAG_UTF8_STRING | TAG_PRINTABLE_STRING | TAG_IA5_STRING)
            {
                out.push(value);
            }
        }
    }
    Ok(out)
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
