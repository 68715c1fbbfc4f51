//! `legate certs dev` (issue 14 item 6): the certificates it writes pass `legate check`
//! without a warning and are served by a real `legate run` over TLS, verified against the CA
//! it wrote; a second run into the same directory overwrites nothing.

use crate::common::legate::Legate;
use std::process::Command;

fn certs_dev(out: &std::path::Path, domains: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_legate"));
    cmd.args(["certs", "dev", "--out"]).arg(out);
    for d in domains {
        cmd.args(["--domain", d]);
    }
    cmd.output().expect("running legate certs dev")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_certificates_pass_check_and_serve_tls() {
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = dir.path().join("certs");
    let out = certs_dev(&certs, &["example.test", "conf.example.test"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "ca.pem",
        "ca.key",
        "node.pem",
        "node.key",
        "example.test.pem",
        "conf.example.test.key",
    ] {
        assert!(certs.join(f).is_file(), "{f} missing; {stdout}");
    }
    assert!(
        stdout.contains("trust_bundle = "),
        "the next step is printed: {stdout}"
    );

    let config = dir.path().join("legate.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[node]
admin_listen = "127.0.0.1:0"
data_dir = "data"
[[local_domain]]
name = "example.test"
[[local_domain]]
name = "conf.example.test"
cert = "{c}/conf.example.test.pem"
key = "{c}/conf.example.test.key"
[tls]
trust_bundle = "{c}/ca.pem"
cert = "{c}/node.pem"
key = "{c}/node.key"
[listeners]
sip_tls = "127.0.0.1:0"
sip_tcp = "off"
xmpp_s2s = "off"
xmpp_s2s_direct_tls = "off"
"#,
            c = certs.display()
        ),
    )
    .expect("write config");
    let check = Command::new(env!("CARGO_BIN_EXE_legate"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("legate check");
    let err = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(0), "{err}");
    assert!(
        !err.contains("warning:"),
        "no certificate warning expected: {err}"
    );

    let legate = Legate::start(&config, &["sip_tls"]).unwrap_or_else(|e| panic!("{e:#}"));
    let served = crate::reload::served_certificate(legate.addr("sip_tls"), &certs.join("ca.pem"))
        .await
        .expect("a TLS handshake verified against the dev CA");
    let node = legate::tls::load_certs(&certs.join("node.pem")).expect("node.pem")[0]
        .as_ref()
        .to_vec();
    assert_eq!(
        served, node,
        "the node certificate is served for example.test"
    );

    // A second run into the same directory refuses and leaves the files as they were.
    let before = std::fs::read(certs.join("ca.key")).expect("ca.key");
    let again = certs_dev(&certs, &["example.test"]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    assert_eq!(std::fs::read(certs.join("ca.key")).expect("ca.key"), before);
}
