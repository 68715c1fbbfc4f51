//! The peer-certificate reader (DER, bounds-checked, ours): arbitrary bytes must give a
//! certificate view or an error, never a panic; no wildcard name it yields may match the bare
//! parent it covers (RFC 6125 §6.4.3).
#![no_main]

use legate::config::Domain;
use legate::tls::{matches_domain, name_matches, PeerCert};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cert) = PeerCert::from_der(data) {
        for id in &cert.dns_ids {
            if let Some(parent) = id.strip_prefix("*.") {
                if let Ok(d) = Domain::parse(parent) {
                    assert!(!name_matches(id, d.as_str()), "{id} matched its parent");
                    // The certificate as a whole matches only if some name does.
                    let any = cert.dns_ids.iter().any(|n| name_matches(n, d.as_str()));
                    assert_eq!(matches_domain(&cert, &d), any, "{id}");
                }
            }
        }
    }
});
