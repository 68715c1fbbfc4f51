//! The peer-certificate reader (x509-parser behind `PeerCert::from_der`): arbitrary bytes must
//! give a certificate view or an error, never a panic; every name it yields must come from the
//! input (it is the input's text, lowercased, with `_xmpp-server.`-style prefixes and a
//! trailing dot removed); no wildcard name may match the bare parent it covers (RFC 6125
//! §6.4.3); and the certificate as a whole matches a domain only if one of its names does.
#![no_main]

use legate::config::Domain;
use legate::tls::{matches_domain, matches_xmpp_domain, name_matches, PeerCert};
use libfuzzer_sys::fuzz_target;

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

fuzz_target!(|data: &[u8]| {
    let Ok(cert) = PeerCert::from_der(data) else {
        return;
    };
    let lower = data.to_ascii_lowercase();
    for id in cert.xmpp_ids() {
        assert!(
            contains(&lower, id.as_bytes()),
            "{id:?} is not in the input"
        );
    }
    for id in &cert.dns_ids {
        if let Some(parent) = id.strip_prefix("*.") {
            if let Ok(d) = Domain::parse(parent) {
                assert!(!name_matches(id, d.as_str()), "{id} matched its parent");
                let any = cert.dns_ids.iter().any(|n| name_matches(n, d.as_str()));
                assert_eq!(matches_domain(&cert, &d), any, "{id}");
            }
        }
    }
    for id in cert.srv_ids.iter().chain(&cert.xmpp_addrs) {
        if let Ok(d) = Domain::parse(id) {
            assert!(
                matches_xmpp_domain(&cert, &d),
                "{id} listed but not matched"
            );
        }
    }
});
