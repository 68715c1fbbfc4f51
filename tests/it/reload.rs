//! Reload through the real `legate run` (issue 14 item 4): SIGHUP with a broken configuration
//! keeps the running one and raises `ConfigReloadRefused` (seen in `/alarms`), a fixed file
//! clears it and `legate reload` names the keys that need a restart; a new certificate is
//! served to the next TLS handshake without a restart (and a broken one is refused, the last
//! good one still served), and the client certificate presented outbound rotates with it;
//! mapping files are read again (a broken one refuses the reload, file and line named);
//! removing a partner from the allow list refuses its next request (a real Prosody home node,
//! a Lync-like edge over mutual TLS).

use crate::common;
use crate::sip_ua;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use common::certs::{CertFactory, Leaf};
use common::legate::Legate;
use common::rig::{self, lync_edge, Gateway, WAIT};
use common::xmpp_client::{ClientConfig, XmppClient};

const TEST_TIMEOUT: Duration = Duration::from_secs(90);

/// `legate ARGS --admin ADDR`.
fn cli(args: &[&str], admin: SocketAddr) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_legate"))
        .args(args)
        .args(["--admin", &admin.to_string()])
        .output()
        .expect("running legate")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The JSON body of `GET path`.
async fn get_json(legate: &Legate, path: &str) -> serde_json::Value {
    let raw = legate.http_get(path).await.expect("admin GET");
    let body = raw.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{path} is not JSON ({e}): {raw}"))
}

/// Polls `GET path` until `pred` holds (reload and alarms have no event to await).
async fn wait_json(
    legate: &Legate,
    path: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let doc = get_json(legate, path).await;
        if pred(&doc) {
            return doc;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "{what}: not seen within {WAIT:?}: {doc}\n{}",
                legate.output()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn alarm<'a>(alarms: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    alarms.as_array()?.iter().find(|a| a["name"] == name)
}

fn admin_only(extra: &str) -> String {
    format!(
        r#"[node]
id = "n1"
admin_listen = "127.0.0.1:0"
data_dir = "data"
[[local_domain]]
name = "example.test"
[listeners]
sip_tls = "off"
sip_tcp = "off"
xmpp_s2s = "off"
xmpp_s2s_direct_tls = "off"
[[sip.federated_domain]]
name = "partner.test"
system = "lync"
{extra}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_broken_file_keeps_the_old_config_and_raises_the_alarm_until_fixed() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("legate.toml");
        std::fs::write(&path, admin_only("")).expect("write config");
        let mut legate = Legate::start(&path, &["admin"]).unwrap_or_else(|e| panic!("{e:#}"));
        let admin = legate.addr("admin");

        // Out of range (10–86400): refused with the file and line.
        std::fs::write(&path, admin_only("[limits]\nidle_timeout_secs = 1\n")).expect("write");
        legate.signal("HUP").expect("SIGHUP");
        let alarms = wait_json(&legate, "/alarms", "ConfigReloadRefused raised", |a| {
            alarm(a, "ConfigReloadRefused").is_some_and(|x| x["raised"] == true)
        })
        .await;
        let a = alarm(&alarms, "ConfigReloadRefused").expect("listed");
        let detail = a["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains("legate.toml:") && detail.contains("idle_timeout_secs"),
            "{a}"
        );
        assert!(
            a["action"]
                .as_str()
                .unwrap_or_default()
                .contains("legate check"),
            "{a}"
        );
        let status = get_json(&legate, "/status").await;
        assert_eq!(status["reload"]["last"]["outcome"], "refused", "{status}");
        assert_eq!(status["reload"]["last"]["trigger"], "sighup", "{status}");
        assert!(
            legate.try_wait().expect("poll").is_none(),
            "SIGHUP must not stop the node"
        );

        // The CLI says the same and exits 1.
        let out = cli(&["reload"], admin);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(
            stdout.contains("refused") && stdout.contains("idle_timeout_secs"),
            "{stdout}"
        );

        // A fixed file: applied by the next SIGHUP, the alarm clears.
        std::fs::write(&path, admin_only("[limits]\nidle_timeout_secs = 20\n")).expect("write");
        legate.signal("HUP").expect("SIGHUP");
        wait_json(&legate, "/alarms", "ConfigReloadRefused cleared", |a| {
            alarm(a, "ConfigReloadRefused").is_some_and(|x| x["raised"] == false)
        })
        .await;
        let status = wait_json(&legate, "/status", "the applied reload", |s| {
            s["reload"]["last"]["outcome"] == "applied"
        })
        .await;
        assert_eq!(
            status["reload"]["last"]["applied"],
            serde_json::json!(["limits"]),
            "{status}"
        );

        // A key that needs a restart is named, and its running value stays.
        std::fs::write(
            &path,
            admin_only("[limits]\nidle_timeout_secs = 20\n").replace("id = \"n1\"", "id = \"n2\""),
        )
        .expect("write");
        let out = cli(&["reload"], admin);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(
            stdout.contains("needs a restart (the running value stays): node.id"),
            "{stdout}"
        );

        // `legate check` lists the keys that need a restart.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_legate"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .expect("legate check");
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(
            stdout.contains("need a restart") && stdout.contains("listeners.*"),
            "{stdout}"
        );
    })
    .await
    .expect("test timed out");
}

/// The DER of the certificate the TLS listener at `addr` serves for `example.test`.
pub(crate) async fn served_certificate(addr: SocketAddr, ca: &Path) -> Result<Vec<u8>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in legate::tls::load_certs(ca)? {
        roots.add(c)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("example.test")?;
    let tls = tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .context("TLS handshake timed out")??;
    let chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .ok_or_else(|| anyhow!("no server certificate"))?;
    Ok(chain
        .first()
        .ok_or_else(|| anyhow!("empty chain"))?
        .as_ref()
        .to_vec())
}

fn der_of(leaf: &Leaf) -> Vec<u8> {
    legate::tls::load_certs(&leaf.cert).expect("leaf")[0]
        .as_ref()
        .to_vec()
}

fn install(leaf: &Leaf, dir: &Path) {
    std::fs::copy(&leaf.cert, dir.join("node.pem")).expect("copy cert");
    std::fs::copy(&leaf.key, dir.join("node.key")).expect("copy key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_certificate_is_served_to_the_next_tls_connection_without_restart() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let certs = CertFactory::new();
        let first = certs.leaf("first", &["example.test"]);
        let second = certs.leaf("second", &["example.test"]);
        assert_ne!(der_of(&first), der_of(&second));
        let dir = tempfile::tempdir().expect("temp dir");
        install(&first, dir.path());
        let path = dir.path().join("legate.toml");
        std::fs::write(
            &path,
            admin_only(&format!(
                "[tls]\ncert = \"{}\"\nkey = \"{}\"\ntrust_bundle = \"{}\"\n",
                dir.path().join("node.pem").display(),
                dir.path().join("node.key").display(),
                certs.ca_path().display()
            ))
            .replace("sip_tls = \"off\"", "sip_tls = \"127.0.0.1:0\""),
        )
        .expect("write config");
        let legate =
            Legate::start(&path, &["sip_tls", "admin"]).unwrap_or_else(|e| panic!("{e:#}"));
        let sip = legate.addr("sip_tls");
        let served = served_certificate(sip, certs.ca_path()).await.expect("TLS");
        assert_eq!(served, der_of(&first), "{}", legate.output());

        // Rotation: same paths, new files, `legate reload`.
        install(&second, dir.path());
        let out = cli(&["reload"], legate.addr("admin"));
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(
            text(&out.stdout).contains("certificates: read again"),
            "{}",
            text(&out.stdout)
        );
        let served = served_certificate(sip, certs.ca_path()).await.expect("TLS");
        assert_eq!(served, der_of(&second), "{}", legate.output());

        // A broken certificate file is refused: the last good one is still served.
        std::fs::write(dir.path().join("node.pem"), "not a certificate\n").expect("write");
        let out = cli(&["reload"], legate.addr("admin"));
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
        assert!(
            text(&out.stdout).contains("certificates"),
            "{}",
            text(&out.stdout)
        );
        let alarms = get_json(&legate, "/alarms").await;
        assert!(
            alarm(&alarms, "ConfigReloadRefused").is_some_and(|a| a["raised"] == true),
            "{alarms}"
        );
        let served = served_certificate(sip, certs.ca_path()).await.expect("TLS");
        assert_eq!(served, der_of(&second), "{}", legate.output());
    })
    .await
    .expect("test timed out");
}

/// A pager MESSAGE from bob@partner.test to alice; the final status.
pub(crate) async fn pager(ua: &mut sip_ua::Ua, n: u32, body: &str) -> Result<Option<u16>> {
    let b = ua.branch();
    ua.send(
        &[
            "MESSAGE sip:alice@example.test SIP/2.0",
            &format!("Via: SIP/2.0/TLS sip.partner.test:5061;branch={b}"),
            "Max-Forwards: 70",
            &format!("From: <sip:bob@partner.test>;tag=pager{n}"),
            "To: <sip:alice@example.test>",
            &format!("Call-ID: reload-pager-{n}"),
            &format!("CSeq: {n} MESSAGE"),
            "Content-Type: text/plain; charset=UTF-8",
            "Content-Length: {CL}",
        ],
        body.as_bytes(),
    )
    .await?;
    Ok(ua.response().await?.status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_removed_from_the_allow_list_is_refused_on_its_next_request() -> Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let certs = CertFactory::new();
        let ours = certs.leaf("example", &["example.test"]);
        let partner = certs.leaf("partner", &["partner.test", "sip.partner.test"]);
        let prosody = rig::home_node(&[("alice", "pw")], |c| c)?;
        let route = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let gw = Gateway::start(&certs, &ours, route.local_addr()?, &prosody, "").await?;
        let mut alice = XmppClient::connect(ClientConfig::plain(
            prosody.c2s_addr(),
            "example.test",
            "alice",
            "pw",
        ))
        .await?;
        alice.send_presence(None, Some("here")).await?;
        let mut bob = lync_edge(&certs, &partner, gw.sip).await?;
        assert_eq!(
            pager(&mut bob, 1, "before").await?,
            Some(200),
            "{}",
            gw.log()
        );
        let m = alice
            .expect_message_from("bob@partner.test", WAIT)
            .await
            .with_context(|| gw.log())?;
        assert_eq!(m.body.as_deref(), Some("before"));

        // partner.test leaves the allow list (another partner takes its place).
        let cfg = gw.dir().join("legate.toml");
        let before = std::fs::read_to_string(&cfg)?;
        let after = before.replacen("name = \"partner.test\"", "name = \"other.test\"", 1);
        assert_ne!(before, after);
        std::fs::write(&cfg, after)?;
        gw.legate.signal("HUP")?;
        let status = wait_json(&gw.legate, "/status", "the applied reload", |s| {
            s["reload"]["last"]["outcome"] == "applied"
        })
        .await;
        assert!(
            status["reload"]["last"]["restart_needed"]
                .to_string()
                .contains("other.test"),
            "{status}"
        );

        // The same TLS connection, the next request: refused, and nothing reaches alice.
        let code = pager(&mut bob, 2, "after").await?.unwrap_or(0);
        assert!((400..500).contains(&code), "got {code}\n{}", gw.log());
        assert!(
            alice
                .expect_message_from("bob@partner.test", Duration::from_secs(1))
                .await
                .is_err(),
            "a refused message was delivered"
        );
        Ok(())
    })
    .await
    .map_err(|_| anyhow!("test timed out"))?
}

/// The client certificate `client` presents to a server requesting one (handshake in memory).
async fn presented_client_certificate(
    server: &legate::tls::ServerTls,
    client: &legate::tls::ClientTls,
) -> Result<Vec<u8>> {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let target = legate::config::Domain::parse("example.test").map_err(|e| anyhow!("{e:?}"))?;
    let (s, c) = tokio::join!(
        server.accept(a, WAIT),
        client.connect(b, None, &target, WAIT)
    );
    let s = s.map_err(|e| anyhow!("server handshake: {:?}", e.failure))?;
    c.map_err(|e| anyhow!("client handshake: {:?}", e.failure))?;
    Ok(s.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| anyhow!("no client certificate"))?
        .as_ref()
        .to_vec())
}

/// What the node does on reload for its outbound side: the shared `ClientTls` presents the
/// rotated certificate from the next handshake on (the end-to-end test above covers the
/// server side through the real binary).
#[tokio::test]
async fn the_client_certificate_rotates_with_the_server_certificate() {
    let certs = CertFactory::new();
    let first = certs.leaf("first", &["example.test"]);
    let second = certs.leaf("second", &["example.test"]);
    let dir = tempfile::tempdir().expect("temp dir");
    install(&first, dir.path());
    let settings = legate::tls::TlsSettings {
        default_cert: Some((dir.path().join("node.pem"), dir.path().join("node.key"))),
        domain_certs: Vec::new(),
        trust_bundle: Some(certs.ca_path().to_path_buf()),
        min_version: legate::config::TlsVersion::V1_2,
    };
    let server = legate::tls::ServerTls::new(&settings).expect("server TLS");
    let client = legate::tls::ClientTls::new(&settings).expect("client TLS");
    let kept = client.clone();
    assert_eq!(
        presented_client_certificate(&server, &client)
            .await
            .expect("handshake"),
        der_of(&first)
    );
    install(&second, dir.path());
    client.reload_certs(&settings).expect("reload");
    // Every clone (the SIP and s2s edges hold theirs) presents the new one.
    assert_eq!(
        presented_client_certificate(&server, &kept)
            .await
            .expect("handshake"),
        der_of(&second)
    );
}

/// Mapping files are read again by a reload too, with the watcher off (`reload = false`): a
/// valid edit is swapped in at once, a broken one refuses the whole reload (file and line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legate_reload_rereads_the_mapping_files() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("temp dir");
        let maps = dir.path().join("mappings");
        crate::mapping_reload::copy_dir(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings"),
            &maps,
        );
        let path = dir.path().join("legate.toml");
        std::fs::write(
            &path,
            admin_only(&format!(
                "[mappings]\ndir = \"{}\"\nreload = false\n",
                maps.display()
            )),
        )
        .expect("write config");
        let legate = Legate::start(&path, &["admin"]).unwrap_or_else(|e| panic!("{e:#}"));
        let admin = legate.addr("admin");
        let digest0 = get_json(&legate, "/status").await["mapping_digest"].clone();

        let table = maps.join("tables/04-lync.toml");
        let good = std::fs::read_to_string(&table).expect("read");
        std::fs::write(
            &table,
            good.replacen("note = \"Busy\"", "note = \"Occupied\"", 1),
        )
        .expect("write");
        let out = cli(&["reload"], admin);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
        let digest1 = get_json(&legate, "/status").await["mapping_digest"].clone();
        assert_ne!(digest1, digest0, "the edit is in use");

        std::fs::write(
            &table,
            good.replacen("from = \"away\"", "from = \"awya\"", 1),
        )
        .expect("write");
        let out = cli(&["reload"], admin);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
        assert!(
            text(&out.stdout).contains("04-lync.toml:"),
            "{}",
            text(&out.stdout)
        );
        assert_eq!(
            get_json(&legate, "/status").await["mapping_digest"],
            digest1,
            "the last good set stays"
        );
    })
    .await
    .expect("test timed out");
}
