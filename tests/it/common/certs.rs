//! Test certificate factory: one throwaway CA and leaf certificates signed by it, written as
//! PEM files into a temporary directory (removed when the factory is dropped).
//!
//! ECDSA P-256 everywhere (rcgen with ring). Leaves carry serverAuth + clientAuth by default,
//! like a Lync edge certificate used both ways. Use it from any integration test with
//! `mod common;` and `common::certs::CertFactory::new()`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

/// Which extended key usages a leaf carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eku {
    /// serverAuth + clientAuth (the default; one certificate both ways).
    Both,
    ServerOnly,
    ClientOnly,
    /// No EKU extension at all (any purpose, RFC 5280 §4.2.1.12).
    Absent,
    /// Only emailProtection: valid for neither TLS purpose.
    EmailOnly,
}

/// What to put in a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// SAN entries; IP literals become iPAddress SANs, everything else dNSName.
    pub sans: Vec<String>,
    /// Subject CN; `None` leaves the subject without CN.
    pub cn: Option<String>,
    pub eku: Eku,
    /// Validity ended in 2001.
    pub expired: bool,
    /// Validity ends this many days from now (certificate-expiry alarms).
    pub expires_in_days: Option<u64>,
    /// Signed by a fresh intermediate CA (itself signed by the root); the certificate file then
    /// holds the leaf followed by the intermediate.
    pub via_intermediate: bool,
}

impl LeafSpec {
    pub fn new(sans: &[&str]) -> Self {
        Self {
            sans: sans.iter().map(|s| s.to_string()).collect(),
            cn: sans.first().map(|s| s.to_string()),
            eku: Eku::Both,
            expired: false,
            expires_in_days: None,
            via_intermediate: false,
        }
    }

    pub fn eku(mut self, eku: Eku) -> Self {
        self.eku = eku;
        self
    }

    pub fn cn(mut self, cn: Option<&str>) -> Self {
        self.cn = cn.map(str::to_string);
        self
    }

    pub fn expired(mut self) -> Self {
        self.expired = true;
        self
    }

    pub fn expires_in_days(mut self, days: u64) -> Self {
        self.expires_in_days = Some(days);
        self
    }

    pub fn via_intermediate(mut self) -> Self {
        self.via_intermediate = true;
        self
    }
}

/// PEM files of one leaf.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The leaf certificate alone.
    pub cert: PathBuf,
    /// PKCS#8 private key.
    pub key: PathBuf,
    /// DER of the leaf, for direct parsing tests.
    pub der: Vec<u8>,
}

/// A CA plus a temp dir of PEM files.
pub struct CertFactory {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    ca_path: PathBuf,
}

impl CertFactory {
    /// A fresh CA named `name` in its own temp dir.
    pub fn with_ca_name(name: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "Legate tests");
        params.distinguished_name = dn;
        let cert = params.self_signed(&key).expect("CA self-signed");
        let ca_pem = cert.pem();
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, &ca_pem).expect("write CA");
        Self {
            dir,
            issuer: Issuer::new(params, key),
            ca_pem,
            ca_path,
        }
    }

    pub fn new() -> Self {
        Self::with_ca_name("Legate Test CA")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate (PEM file), to use as trust bundle.
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A leaf named `file_stem` (file names `<stem>.pem`, `<stem>.key`) with the given SANs,
    /// serverAuth + clientAuth.
    pub fn leaf(&self, file_stem: &str, sans: &[&str]) -> Leaf {
        self.leaf_with(file_stem, LeafSpec::new(sans))
    }

    pub fn leaf_with(&self, file_stem: &str, spec: LeafSpec) -> Leaf {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("leaf key");
        let mut params = CertificateParams::new(spec.sans.clone()).expect("leaf params");
        let mut dn = DistinguishedName::new();
        if let Some(cn) = &spec.cn {
            dn.push(DnType::CommonName, cn.as_str());
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match spec.eku {
            Eku::Both => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Eku::ServerOnly => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Eku::ClientOnly => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Eku::Absent => vec![],
            Eku::EmailOnly => vec![ExtendedKeyUsagePurpose::EmailProtection],
        };
        if spec.expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        if let Some(days) = spec.expires_in_days {
            let since_epoch = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970");
            params.not_after = rcgen::date_time_ymd(1970, 1, 1)
                + since_epoch
                + std::time::Duration::from_secs(days * 86_400);
        }
        let (cert, chain_pem) = if spec.via_intermediate {
            let (sub, sub_pem) = self.intermediate(&format!("{file_stem} Intermediate CA"));
            let cert = params.signed_by(&key, &sub).expect("sign leaf");
            let pem = cert.pem() + &sub_pem;
            (cert, pem)
        } else {
            let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
            let pem = cert.pem();
            (cert, pem)
        };
        let cert_path = self.dir.path().join(format!("{file_stem}.pem"));
        let key_path = self.dir.path().join(format!("{file_stem}.key"));
        std::fs::write(&cert_path, chain_pem).expect("write leaf");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        Leaf {
            cert: cert_path,
            key: key_path,
            der: cert.der().to_vec(),
        }
    }
}

impl CertFactory {
    /// An intermediate CA signed by the root: its issuer handle and its certificate PEM.
    fn intermediate(&self, name: &str) -> (Issuer<'static, KeyPair>, String) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("intermediate key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign intermediate");
        (Issuer::new(params, key), cert.pem())
    }
}

impl Default for CertFactory {
    fn default() -> Self {
        Self::new()
    }
}
