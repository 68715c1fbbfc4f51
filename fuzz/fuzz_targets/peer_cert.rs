//! The peer-certificate reader (DER, bounds-checked, ours): arbitrary bytes must give a
//! certificate view or an error, never a panic; the names it yields must never match a domain
//! by anything looser than RFC 6125 allows.
#![no_main]

use legate::config::Domain;
use legate::tls::{matches_domain, PeerCert};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cert) = PeerCert::from_der(data) {
        for id in &cert.dns_ids {
            // A wildcard never matches the bare parent it covers.
            if let Some(parent) = id.strip_prefix("*.") {
                if let Ok(d) = Domain::parse(parent) {
                    let only_wildcard = cert.dns_ids.iter().all(|x| x.starts_with("*."));
                    if only_wildcard {
                        assert!(!matches_domain(&cert, &d), "{id} matched its parent");
                    }
                }
            }
        }
    }
});
