//! Alarms through the real `legate run` (issue 14 item 2) and `legate status` (item 3): a home
//! node nobody listens on raises `HomeNodeLinkDown` after `limits.home_link_alarm_grace_secs`,
//! seen in `/alarms`, `/metrics` and `legate status` (exit 1, the alarm and its action
//! printed); a real Prosody started on that address clears it; a certificate that expires in
//! 10 days raises `CertificateExpiring` at start, and one that does not name the local domain
//! raises `CertificateNotCoveringLocalDomain`; a refused mapping edit raises
//! `MappingReloadRefused` and the next good edit clears it.

use crate::common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::certs::{CertFactory, Leaf, LeafSpec};
use common::legate::{metric_value, Legate};
use common::prosody::{Prosody, ProsodyConfig};

const TEST_TIMEOUT: Duration = Duration::from_secs(90);
const WAIT: Duration = Duration::from_secs(15);
const SECRET: &str = "component-secret-0123456789";
/// Loopback address of this module's home node.
const HOME_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 9, 10);
const LINK_DOWN: &str = r#"legate_alarms_active{name="HomeNodeLinkDown",severity="critical"}"#;

fn config_toml(home: SocketAddr, cert: &Leaf) -> String {
    format!(
        r#"
[node]
admin_listen = "127.0.0.1:0"
data_dir = "data"
[[local_domain]]
name = "example.test"
[tls]
cert = "{}"
key = "{}"
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
addresses = ["{home}"]
component_secret = "{SECRET}"
default_system = "xmpp"
[limits]
home_link_alarm_grace_secs = 1
"#,
        cert.cert.display(),
        cert.key.display()
    )
}

fn start(dir: &Path, toml: &str) -> Legate {
    let path = dir.join("legate.toml");
    std::fs::write(&path, toml).expect("write config");
    Legate::start(&path, &["admin"]).unwrap_or_else(|e| panic!("{e:#}"))
}

/// `legate status` against `admin` (more arguments after).
fn status_cmd(admin: &str, more: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_legate"))
        .args(["status", "--admin", admin])
        .args(more)
        .output()
        .expect("running legate status")
}

/// The `/alarms` document once `pred` holds for it (bounded poll: alarms have no event).
async fn wait_alarms(
    legate: &Legate,
    what: &str,
    pred: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let raw = legate.http_get("/alarms").await.expect("GET /alarms");
        let body = raw.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        let doc: Vec<serde_json::Value> = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("/alarms is not JSON ({e}): {raw}"));
        if pred(&doc) {
            return doc;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "{what}: not seen within {WAIT:?}: {doc:?}\n{}",
                legate.output()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn find<'a>(alarms: &'a [serde_json::Value], name: &str) -> Option<&'a serde_json::Value> {
    alarms.iter().find(|a| a["name"] == name)
}

fn raised(alarms: &[serde_json::Value], name: &str) -> bool {
    find(alarms, name).is_some_and(|a| a["raised"] == true)
}

#[tokio::test]
async fn a_down_home_node_raises_an_alarm_that_status_shows_and_prosody_clears() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let certs = CertFactory::new();
        let soon = certs.leaf_with("soon", LeafSpec::new(&["example.test"]).expires_in_days(10));
        // The home node's address, with nobody listening on it yet.
        let pcfg = ProsodyConfig::new(HOME_IP)
            .host("example.test")
            .component("partner.test", SECRET);
        let home = SocketAddr::from((HOME_IP, pcfg.component_port));
        let dir = tempfile::tempdir().expect("temp dir");
        let legate = start(dir.path(), &config_toml(home, &soon));
        let admin = legate.addr("admin").to_string();

        // The certificate check runs at start.
        let alarms = wait_alarms(&legate, "CertificateExpiring", |a| {
            raised(a, "CertificateExpiring")
        })
        .await;
        let exp = find(&alarms, "CertificateExpiring").expect("listed");
        assert_eq!(exp["severity"], "minor");
        assert!(
            exp["detail"]
                .as_str()
                .unwrap_or("")
                .contains("expires in 9 days")
                || exp["detail"]
                    .as_str()
                    .unwrap_or("")
                    .contains("expires in 10 days"),
            "{exp}"
        );
        assert!(
            !raised(&alarms, "CertificateNotCoveringLocalDomain"),
            "{alarms:?}"
        );

        // Down past the 1 s grace period.
        let alarms = wait_alarms(&legate, "HomeNodeLinkDown", |a| {
            raised(a, "HomeNodeLinkDown")
        })
        .await;
        let down = find(&alarms, "HomeNodeLinkDown").expect("listed");
        assert_eq!(down["subject"], "hn1/partner.test");
        assert_eq!(down["severity"], "critical");
        assert!(down["count"].as_u64() >= Some(1), "{down}");
        assert!(
            down["action"].as_str().unwrap_or("").contains("home node"),
            "{down}"
        );
        assert_eq!(
            alarms[0]["name"], "HomeNodeLinkDown",
            "critical first: {alarms:?}"
        );
        legate
            .wait_metrics("the alarm gauge", WAIT, |m| {
                metric_value(m, LINK_DOWN) == Some(1.0)
            })
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        let status = legate.http_get("/status").await.expect("GET /status");
        assert!(
            status.contains("\"alarms\":[") && status.contains("HomeNodeLinkDown"),
            "{status}"
        );

        let out = status_cmd(&admin, &[]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("CRITICAL HomeNodeLinkDown hn1/partner.test"),
            "{text}"
        );
        assert!(text.contains("action: Check that the home node"), "{text}");
        assert!(text.contains("hn1 / partner.test  DOWN"), "{text}");
        assert!(
            text.contains("s ago: connect"),
            "age of the last failure: {text}"
        );
        let out = status_cmd(&admin, &["--json"]);
        let doc: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("legate status --json is JSON");
        assert_eq!(out.status.code(), Some(1));
        assert!(
            doc["component_links"][0]["last_failure_age_secs"].is_u64(),
            "{doc}"
        );

        // The home node comes up: the link connects and the alarm clears.
        let prosody = Prosody::start(pcfg).unwrap_or_else(|e| panic!("starting Prosody: {e:#}"));
        let alarms = wait_alarms(&legate, "HomeNodeLinkDown cleared", |a| {
            find(a, "HomeNodeLinkDown").is_some_and(|x| x["raised"] == false)
        })
        .await;
        assert!(raised(&alarms, "CertificateExpiring"), "{alarms:?}");
        legate
            .wait_metrics("the alarm gauge at 0", WAIT, |m| {
                metric_value(m, LINK_DOWN) == Some(0.0)
            })
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        let out = status_cmd(&admin, &[]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "only a minor alarm is left: {text}"
        );
        assert!(text.contains("hn1 / partner.test  up"), "{text}");
        assert!(text.contains("MINOR CertificateExpiring"), "{text}");
        drop(prosody);
        drop(legate);
    })
    .await
    .unwrap_or_else(|_| panic!("did not finish within {TEST_TIMEOUT:?}"));
}

#[tokio::test]
async fn a_certificate_not_naming_the_local_domain_raises_a_major_alarm() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let certs = CertFactory::new();
        let other = certs.leaf("other", &["other.test"]);
        let dir = tempfile::tempdir().expect("temp dir");
        // A home node nobody listens on; the default 30 s grace keeps its alarm out of this test.
        let toml = config_toml("127.0.9.11:5347".parse().expect("addr"), &other)
            .replace("home_link_alarm_grace_secs = 1", "");
        let legate = start(dir.path(), &toml);
        let alarms = wait_alarms(&legate, "CertificateNotCoveringLocalDomain", |a| {
            raised(a, "CertificateNotCoveringLocalDomain")
        })
        .await;
        let a = find(&alarms, "CertificateNotCoveringLocalDomain").expect("listed");
        assert_eq!(
            (a["subject"].as_str(), a["severity"].as_str()),
            (Some("example.test"), Some("major"))
        );
        let out = status_cmd(&legate.addr("admin").to_string(), &[]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        drop(legate);
    })
    .await
    .unwrap_or_else(|_| panic!("did not finish within {TEST_TIMEOUT:?}"));
}

#[test]
fn status_names_the_address_it_cannot_reach_and_exits_2() {
    // A port nothing listens on (bound, then released).
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let out = status_cmd(&addr.to_string(), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&addr.to_string()), "{err}");
}

#[tokio::test]
async fn a_refused_mapping_edit_raises_an_alarm_and_a_good_one_clears_it() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("temp dir");
        let maps = dir.path().join("mappings");
        crate::mapping_reload::copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings"), &maps);
        let toml = format!(
            "[node]\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n[[local_domain]]\nname = \"example.com\"\n\
             [listeners]\nsip_tls = \"off\"\nxmpp_s2s = \"off\"\n[mappings]\ndir = \"{}\"\nreload = true\n",
            maps.display()
        );
        let legate = start(dir.path(), &toml);
        // The reloader takes its first look right after it registers its status section: an
        // edit before that look would be its starting point, not an edit.
        let deadline = tokio::time::Instant::now() + WAIT;
        while !legate
            .http_get("/status")
            .await
            .expect("GET /status")
            .contains("\"mappings\":{")
        {
            assert!(tokio::time::Instant::now() < deadline, "{}", legate.output());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let table = maps.join("tables/04-lync.toml");
        let good = std::fs::read_to_string(&table).expect("read");
        std::fs::write(&table, good.replacen("from = \"away\"", "from = \"awya\"", 1))
            .expect("write");
        let alarms = wait_alarms(&legate, "MappingReloadRefused", |a| {
            raised(a, "MappingReloadRefused")
        })
        .await;
        let a = find(&alarms, "MappingReloadRefused").expect("listed");
        assert_eq!(a["subject"], maps.display().to_string());
        assert!(a["detail"].as_str().unwrap_or("").contains("unknown state `awya`"), "{a}");
        std::fs::write(&table, good.replacen("note = \"Busy\"", "note = \"Occupied\"", 1))
            .expect("write");
        wait_alarms(&legate, "MappingReloadRefused cleared", |a| {
            find(a, "MappingReloadRefused").is_some_and(|x| x["raised"] == false)
        })
        .await;
        drop(legate);
    })
    .await
    .unwrap_or_else(|_| panic!("did not finish within {TEST_TIMEOUT:?}"));
}

/// `PartnerUnreachable` from the SIP edge's own dial outcomes: a partner whose route refuses
/// connections three times in a row is alarmed; the next dial that connects clears it.
#[tokio::test]
async fn sip_dials_failing_in_a_row_raise_partner_unreachable_and_a_success_clears_it() {
    use legate::gateway::envelope::{Address, Body, MessageBody};
    use legate::gateway::{Envelope, Origin};
    let _sip = common::metrics::moves(common::metrics::Family::Sip).await;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("temp dir");
        // A port nobody listens on: connecting is refused at once.
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let (hub, edge, mut home, stop) = crate::sip_edge::start_edge_with(
            dir.path(),
            dead.port(),
            "sip_dial_backoff_max_secs = 1",
        )
        .await
        .expect("edge");
        let send = |n: u32| {
            hub.submit(
                &Origin::Component {
                    home_node: "hn1".into(),
                },
                Envelope {
                    from: Address::parse("alice@example.com/pc").expect("addr"),
                    to: Address::parse("bob@partner.com").expect("addr"),
                    body: Body::Message(MessageBody {
                        id: Some(format!("m{n}")),
                        text: format!("message {n}"),
                        thread: None,
                        ..Default::default()
                    }),
                    stanza_id: None,
                    via_cluster: None,
                },
            );
        };
        let is_raised = |name: &str| {
            hub.alarms()
                .to_json()
                .as_array()
                .is_some_and(|a| raised(a, name))
        };
        // Each message is bounced (dialed and failed, or refused while in backoff); the
        // backoff is capped at 1 s, so three dials fail within a few seconds.
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut n = 0;
        while !is_raised("PartnerUnreachable") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}",
                hub.alarms().to_json()
            );
            n += 1;
            send(n);
            crate::sip_edge::next(&mut home).await.expect("a bounce");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let doc = hub.alarms().to_json();
        let a = find(doc.as_array().expect("list"), "PartnerUnreachable").expect("listed");
        assert_eq!(a["subject"], "partner.com");
        assert!(
            a["detail"]
                .as_str()
                .unwrap_or("")
                .contains("3 failed connections in a row"),
            "{a}"
        );

        // The partner comes back: the next dial connects and the alarm clears.
        let _partner = tokio::net::TcpListener::bind(dead).await.expect("rebind");
        let deadline = tokio::time::Instant::now() + WAIT;
        while is_raised("PartnerUnreachable") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}",
                hub.alarms().to_json()
            );
            n += 1;
            send(n);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let _ = stop.send(true);
        edge.join(Duration::from_secs(5)).await;
    })
    .await
    .unwrap_or_else(|_| panic!("did not finish within {TEST_TIMEOUT:?}"));
}
