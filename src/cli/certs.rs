//! `legate certs dev`: a development CA and certificates so TLS works on a laptop in one
//! command (issue 14 item 6), with no `openssl` needed (rcgen, ECDSA P-256).
//!
//! Writes into `--out`: `ca.pem`/`ca.key` (the development CA: every node's and test peer's
//! `trust_bundle`), `<domain>.pem`/`.key` per domain (per-domain SNI certificates) and
//! `node.pem`/`.key` naming every domain (the node certificate). Leaves carry serverAuth and
//! clientAuth (one certificate both ways, as federation's mutual TLS needs). Keys are
//! written with mode 0600. Nothing is overwritten: an existing file stops the command.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Longest validity accepted (days): CA/Browser Forum's old 825-day cap, also the default.
pub const MAX_DAYS: u32 = 825;

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("give at least one --domain")]
    NoDomain,
    #[error("`{0}` is not a domain name: {1}")]
    BadDomain(String, String),
    #[error("--days must be 1 to {MAX_DAYS}")]
    BadDays,
    #[error(
        "{0} already exists: nothing was written (use another --out, or move the old files away)"
    )]
    Exists(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// What was written, for the summary.
pub struct Written {
    pub ca: PathBuf,
    pub node_cert: PathBuf,
    pub node_key: PathBuf,
    pub per_domain: Vec<(String, PathBuf, PathBuf)>,
}

/// Makes the CA and certificates (module doc) in `out`.
pub fn dev(out: &Path, domains: &[String], days: u32) -> Result<Written, CertsError> {
    if domains.is_empty() {
        return Err(CertsError::NoDomain);
    }
    if days == 0 || days > MAX_DAYS {
        return Err(CertsError::BadDays);
    }
    let mut names = Vec::new();
    for d in domains {
        let parsed = crate_domain(d)?;
        if !names.contains(&parsed) {
            names.push(parsed);
        }
    }
    let mut files = vec!["ca.pem", "ca.key", "node.pem", "node.key"]
        .into_iter()
        .map(|f| out.join(f))
        .collect::<Vec<_>>();
    for n in &names {
        files.push(out.join(format!("{n}.pem")));
        files.push(out.join(format!("{n}.key")));
    }
    if let Some(f) = files.iter().find(|f| f.exists()) {
        return Err(CertsError::Exists(f.clone()));
    }
    std::fs::create_dir_all(out).map_err(|source| CertsError::Io {
        path: out.to_path_buf(),
        source,
    })?;

    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        "Legate development CA (not for production)",
    );
    dn.push(DnType::OrganizationName, "Legate development");
    ca.distinguished_name = dn;
    set_validity(&mut ca, days);
    let ca_cert = ca.self_signed(&ca_key)?;
    write(&out.join("ca.pem"), ca_cert.pem().as_bytes(), false)?;
    write(&out.join("ca.key"), ca_key.serialize_pem().as_bytes(), true)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut per_domain = Vec::new();
    for n in &names {
        let (cert, key) = (out.join(format!("{n}.pem")), out.join(format!("{n}.key")));
        leaf(&issuer, std::slice::from_ref(n), days, &cert, &key)?;
        per_domain.push((n.clone(), cert, key));
    }
    let (node_cert, node_key) = (out.join("node.pem"), out.join("node.key"));
    leaf(&issuer, &names, days, &node_cert, &node_key)?;
    Ok(Written {
        ca: out.join("ca.pem"),
        node_cert,
        node_key,
        per_domain,
    })
}

fn crate_domain(d: &str) -> Result<String, CertsError> {
    legate::config::Domain::parse(d)
        .map(|d| d.to_string())
        .map_err(|e| CertsError::BadDomain(d.to_string(), e.to_string()))
}

fn set_validity(params: &mut CertificateParams, days: u32) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    // An hour back: a peer whose clock is a little behind still accepts the certificate.
    params.not_before = epoch + now.saturating_sub(std::time::Duration::from_secs(3600));
    params.not_after = epoch + now + std::time::Duration::from_secs(u64::from(days) * 86_400);
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    sans: &[String],
    days: u32,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), CertsError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(sans.to_vec())?;
    let mut dn = DistinguishedName::new();
    if let Some(first) = sans.first() {
        dn.push(DnType::CommonName, first.as_str());
    }
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    set_validity(&mut params, days);
    let cert = params.signed_by(&key, issuer)?;
    write(cert_path, cert.pem().as_bytes(), false)?;
    write(key_path, key.serialize_pem().as_bytes(), true)
}

/// Creates `path` (never overwrites); private keys get mode 0600 from the start.
fn write(path: &Path, data: &[u8], private: bool) -> Result<(), CertsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| CertsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io)?;
    f.write_all(data).map_err(io)
}

/// `legate certs dev`: exit 0 written, 2 refused (bad arguments, existing files, I/O).
pub fn run(out: &Path, domains: &[String], days: u32) -> ExitCode {
    match dev(out, domains, days) {
        Ok(w) => {
            println!(
                "legate certs dev: wrote a development CA and certificates in {}",
                out.display()
            );
            println!(
                "  trust bundle (every node and test peer): {}",
                w.ca.display()
            );
            println!(
                "  node certificate: {} (key {})",
                w.node_cert.display(),
                w.node_key.display()
            );
            for (d, c, k) in &w.per_domain {
                println!("  {d}: {} (key {})", c.display(), k.display());
            }
            println!(
                "Next: in your configuration\n  [tls]\n  trust_bundle = \"{}\"\n  cert = \"{}\"\n  key = \"{}\"\n\
                 then `legate check --config FILE`. Never use this CA in production, never commit its key.",
                w.ca.display(),
                w.node_cert.display(),
                w.node_key.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("legate certs dev: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_arguments_and_existing_files() {
        let dir = tempfile::tempdir().expect("dir");
        assert!(matches!(
            dev(dir.path(), &[], 30),
            Err(CertsError::NoDomain)
        ));
        assert!(matches!(
            dev(dir.path(), &["example.com".into()], 0),
            Err(CertsError::BadDays)
        ));
        assert!(matches!(
            dev(dir.path(), &["not a domain".into()], 30),
            Err(CertsError::BadDomain(..))
        ));
        let w = dev(
            dir.path(),
            &["example.com".into(), "Example.com".into()],
            30,
        )
        .expect("dev");
        assert_eq!(
            w.per_domain.len(),
            1,
            "a domain given twice is written once"
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&w.node_key).expect("key").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        match dev(dir.path(), &["example.com".into()], 30) {
            Err(CertsError::Exists(p)) => assert!(p.ends_with("ca.pem")),
            other => panic!("expected Exists, got {:?}", other.err()),
        }
    }
}
