//! `legate check` warns about the certificates a node would serve (issue 14 item 6): one
//! that does not name the local domain it is served for, one that expires within 30 days or
//! has expired, one without the clientAuth EKU (mutual TLS federation presents it as a
//! client); each warning names the file. A good certificate gets none, and warnings do not
//! fail the check (exit 0).

use crate::common;

use common::certs::{CertFactory, Eku, LeafSpec};
use std::path::Path;
use std::process::Command;

fn check(config: &Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_legate"))
        .args(["check", "--config"])
        .arg(config)
        .output()
        .expect("run legate check");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn certificate_names_expiry_and_client_auth_are_warned_about_with_the_file() {
    let certs = CertFactory::new();
    let good = certs.leaf("good", &["example.test"]);
    let wrong_name = certs.leaf("wrong-name", &["other.test"]);
    let expiring = certs.leaf_with(
        "expiring",
        LeafSpec::new(&["b.example.test"]).expires_in_days(10),
    );
    let expired = certs.leaf_with("expired", LeafSpec::new(&["c.example.test"]).expired());
    let server_only = certs.leaf_with(
        "server-only",
        LeafSpec::new(&["d.example.test"]).eku(Eku::ServerOnly),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let domain = |name: &str, leaf: &common::certs::Leaf| {
        format!(
            "[[local_domain]]\nname = \"{name}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            leaf.cert.display(),
            leaf.key.display()
        )
    };
    let toml = [
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            good.cert.display(),
            good.key.display()
        ),
        "[[local_domain]]\nname = \"example.test\"\n".to_string(),
        domain("a.example.test", &wrong_name),
        domain("b.example.test", &expiring),
        domain("c.example.test", &expired),
        domain("d.example.test", &server_only),
    ]
    .join("");
    let path = dir.path().join("legate.toml");
    std::fs::write(&path, toml).expect("config");
    let (code, err) = check(&path);
    assert_eq!(code, Some(0), "warnings do not fail the check:\n{err}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning: ")).collect();
    let has = |file: &Path, text: &str| {
        warnings
            .iter()
            .any(|w| w.contains(&file.display().to_string()) && w.contains(text))
    };
    assert!(
        has(&wrong_name.cert, "does not name it") && err.contains("local domain a.example.test"),
        "{err}"
    );
    assert!(
        has(&expiring.cert, "expires in 9 days") || has(&expiring.cert, "expires in 10 days"),
        "{err}"
    );
    assert!(has(&expired.cert, "has expired"), "{err}");
    assert!(has(&server_only.cert, "lacks the clientAuth"), "{err}");
    assert!(
        !warnings
            .iter()
            .any(|w| w.contains(&good.cert.display().to_string())),
        "the good certificate got a warning:\n{err}"
    );
    assert_eq!(warnings.len(), 4, "{err}");
}
