//! The HTML status page of the admin endpoint (issue 14 item 3), rendered by a real headless
//! Chromium (Debian package `chromium`): a node whose home node does not answer shows the
//! link down with its last failure, and the `HomeNodeLinkDown` alarm with its action, in the
//! DOM the browser built. No script runs on the page; the test reads `--dump-dom`.

use crate::common;

use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::legate::Legate;
use common::prosody::GuardedChild;

const TEST_TIMEOUT: Duration = Duration::from_secs(90);
const CHROMIUM: &str = "/usr/bin/chromium";

/// The DOM Chromium builds for `url` (stdout of `--dump-dom`).
fn dump_dom(url: &str, profile: &Path) -> String {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: install the Debian package `chromium` (apt-get install chromium)"
    );
    let mut cmd = Command::new(CHROMIUM);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .arg("--dump-dom")
    .arg(url);
    let (mut child, mut stdout, mut stderr) =
        GuardedChild::spawn_piped(&cmd).expect("spawning chromium");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            _ => {
                child.kill();
                panic!("chromium did not finish within 60 s");
            }
        }
    }
    // Chromium's helper processes may still hold the pipes: end the whole group first.
    child.kill();
    let dom = out.join().unwrap_or_default();
    let log = err.join().unwrap_or_default();
    assert!(
        dom.contains("<html"),
        "chromium printed no DOM; its log:\n{log}"
    );
    dom
}

#[tokio::test]
async fn the_status_page_renders_links_and_alarms_in_a_real_browser() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        // A home node on a loopback port nobody listens on: the link stays down.
        let dead: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let toml = format!(
            r#"
[node]
id = "gw-page"
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
[[home_node]]
name = "hn1"
addresses = ["{dead}"]
component_secret = "component-secret-0123456789"
default_system = "xmpp"
[limits]
home_link_alarm_grace_secs = 1
"#
        );
        let path = dir.path().join("legate.toml");
        std::fs::write(&path, toml).expect("config");
        let legate = Legate::start(&path, &["admin"]).unwrap_or_else(|e| panic!("{e:#}"));
        // Bounded poll: the alarm is raised by a once-a-second watcher after the grace.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let alarms = legate.http_get("/alarms").await.expect("GET /alarms");
            if alarms.contains("\"HomeNodeLinkDown\"") {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no alarm:\n{alarms}\n{}",
                legate.output()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let url = format!("http://{}/", legate.addr("admin"));
        let profile = dir.path().join("chromium-profile");
        let dom = tokio::task::spawn_blocking(move || dump_dom(&url, &profile))
            .await
            .expect("chromium thread");
        assert!(dom.contains("<title>legate gw-page</title>"), "{dom}");
        assert!(
            dom.contains(
                r#"<tr class="home-link" data-home-node="hn1" data-domain="partner.test" data-up="false">"#
            ),
            "no home-node row for hn1/partner.test:\n{dom}"
        );
        assert!(
            dom.contains(r#"<tr class="alarm raised" data-name="HomeNodeLinkDown" data-subject="hn1/partner.test""#),
            "no raised HomeNodeLinkDown row:\n{dom}"
        );
        assert!(dom.contains("Check that the home node"), "the alarm's action:\n{dom}");
        assert!(dom.contains("s ago: "), "the age of the link's last failure:\n{dom}");
        assert!(!dom.contains("<script"), "the page has no script:\n{dom}");
        assert!(
            dom.contains(&format!(
                "<tr class=\"listener\"><td>admin</td><td>{}</td></tr>",
                legate.addr("admin")
            )),
            "the admin listener row:\n{dom}"
        );
    })
    .await
    .expect("test timed out");
}
