//! What is wrong with the certificates a node serves, read from their files: expired
//! (RFC 5280 §4.1.2.5), expiring within 30 days, not naming a local domain they are served
//! for (RFC 6125 §6), or lacking the clientAuth extended key usage (RFC 5280 §4.2.1.12) that
//! mutual TLS federation needs: Legate presents the same certificate as a client when it
//! dials a partner (SIP TLS to a Lync/Skype edge, XMPP s2s with SASL EXTERNAL).
//!
//! `legate check` prints these as warnings; the alarm driver (`alarms::check_certificates`)
//! turns the same findings into alarms on a running node. Time is passed in.

use crate::config::{Config, Domain};
use crate::tls::{matches_domain, PeerCert};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Days before expiry from which a certificate is reported as expiring.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// The leaf of a PEM certificate file: its identity and its notAfter (Unix seconds).
pub fn read_leaf(path: &Path) -> Result<(PeerCert, i64), String> {
    let certs = crate::tls::load_certs(path).map_err(|e| e.to_string())?;
    let der = certs.first().ok_or("no certificate in the file")?;
    let (_, x) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|_| "not a DER X.509 certificate".to_string())?;
    let not_after = x.validity().not_after.timestamp();
    let id = PeerCert::from_der(der.as_ref()).map_err(|e| e.to_string())?;
    Ok((id, not_after))
}

/// One problem with one certificate file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    Unreadable { path: PathBuf, error: String },
    Expired { path: PathBuf },
    Expiring { path: PathBuf, days: i64 },
    NotCovering { path: PathBuf, domain: Domain },
    NoClientAuth { path: PathBuf },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::Unreadable { path, error } => {
                write!(f, "certificate {}: {error}", path.display())
            }
            Finding::Expired { path } => write!(
                f,
                "{}: the certificate has expired; partners refuse TLS with it: renew it",
                path.display()
            ),
            Finding::Expiring { path, days } => write!(
                f,
                "{}: the certificate expires in {days} days: renew it before then",
                path.display()
            ),
            Finding::NotCovering { path, domain } => write!(
                f,
                "{}: the certificate served for local domain {domain} does not name it \
                 (subjectAltName dNSName); partners will refuse TLS for {domain}: get one that \
                 names it, or give that [[local_domain]] its own cert and key",
                path.display()
            ),
            Finding::NoClientAuth { path } => write!(
                f,
                "{}: the certificate lacks the clientAuth extended key usage; Legate presents it \
                 as a client to partners (mutual TLS: Lync/Skype edges, XMPP SASL EXTERNAL), \
                 which refuse it: get a certificate with both serverAuth and clientAuth",
                path.display()
            ),
        }
    }
}

/// The certificate file served for local domain `d`: its own, else the node's `[tls]` one.
pub fn served_for<'a>(cfg: &'a Config, d: &'a crate::config::LocalDomain) -> Option<&'a Path> {
    d.cert.as_deref().or(cfg.tls.cert.as_deref())
}

/// Every certificate file of `cfg` (`[tls] cert`, then per-domain ones), each once, with
/// its leaf or why it could not be read.
pub fn leaves(cfg: &Config) -> BTreeMap<&Path, Result<(PeerCert, i64), String>> {
    let mut out = BTreeMap::new();
    let files = cfg
        .tls
        .cert
        .iter()
        .chain(cfg.local_domains.iter().filter_map(|d| d.cert.as_ref()));
    for path in files {
        out.entry(path.as_path()).or_insert_with(|| read_leaf(path));
    }
    out
}

/// Every finding about `cfg`'s certificates at time `now` (Unix seconds), file by file.
pub fn inspect(cfg: &Config, now: i64) -> Vec<Finding> {
    let leaves = leaves(cfg);
    let mut out = Vec::new();
    for (path, leaf) in &leaves {
        let path = path.to_path_buf();
        match leaf {
            Err(error) => out.push(Finding::Unreadable {
                path,
                error: error.clone(),
            }),
            Ok((id, not_after)) => {
                if *not_after <= now {
                    out.push(Finding::Expired { path: path.clone() });
                } else {
                    let days = (not_after - now).div_euclid(86_400);
                    if days < EXPIRY_WARNING_DAYS {
                        out.push(Finding::Expiring {
                            path: path.clone(),
                            days,
                        });
                    }
                }
                if !id.client_auth_eku {
                    out.push(Finding::NoClientAuth { path });
                }
            }
        }
    }
    for d in &cfg.local_domains {
        let Some(path) = served_for(cfg, d) else {
            continue;
        };
        if let Some(Ok((id, _))) = leaves.get(path) {
            if !matches_domain(id, &d.name) {
                out.push(Finding::NotCovering {
                    path: path.to_path_buf(),
                    domain: d.name.clone(),
                });
            }
        }
    }
    out
}
