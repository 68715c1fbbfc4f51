//! Intercluster peering (issue 13, first slice): two single-node clusters of `example.test`
//! (embedded store, so no etcd: each node is its own cluster leader), each the real `legate`
//! binary with its own real Prosody home node, peered over mutual TLS with certificates of one
//! test CA. A user cluster B learned from traffic (or an admin pinned) is unknown to A until a
//! sync, known after; a second sync carries only the change; a dead peer raises
//! `InterClusterSyncAgentPeerPeriodicSyncingFailure` after the (scaled down) stuck threshold,
//! auto-recovery restarts the agent, and the alarm clears once B is back and a sync succeeds.
//! A peer that no longer lists us, and one with a certificate that does not name its address,
//! show up in the status with the reason.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::common;
use common::certs::{CertFactory, Leaf};
use common::legate::Legate;
use common::metrics::sum as metric_sum;
use common::prosody::{Prosody, ProsodyConfig};
use common::rig::XMPP_TEST_FEDERATION as FEDERATION;
use common::xmpp_client::{ClientConfig, XmppClient};

const SECRET: &str = "intercluster-component-secret-1";
const WAIT: Duration = Duration::from_secs(20);
const ALARM: &str = "InterClusterSyncAgentPeerPeriodicSyncingFailure";

/// One cluster's addresses: its Prosody (if any) and its intercluster listener.
struct Site {
    name: &'static str,
    ip: Ipv4Addr,
    port: u16,
}

impl Site {
    fn new(name: &'static str, ip: Ipv4Addr) -> Site {
        Site {
            name,
            ip,
            port: common::ports::free_port(IpAddr::V4(ip)),
        }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip), self.port)
    }
}

/// Writes the configuration of cluster `me` (listing `peers`) in `dir`.
fn config(
    dir: &Path,
    me: &Site,
    peers: &[&Site],
    certs: &CertFactory,
    leaf: &Leaf,
    prosody: Option<&Prosody>,
) -> Result<PathBuf> {
    let home = prosody
        .map(|p| {
            format!(
                "[[home_node]]\nname = \"hn1\"\naddresses = [\"{}\"]\ncomponent_secret = \"{SECRET}\"\n",
                p.component_addr()
            )
        })
        .unwrap_or_default();
    let peers: String = peers
        .iter()
        .map(|p| {
            format!(
                "[[intercluster.peer]]\nname = \"{}\"\naddress = \"{}\"\n",
                p.name,
                p.addr()
            )
        })
        .collect();
    let path = dir.join("legate.toml");
    std::fs::write(
        &path,
        format!(
            r#"[node]
id = "{name}1"
data_dir = "{data}"
admin_listen = "127.0.0.1:0"
[[local_domain]]
name = "example.test"
[listeners]
sip_tls = "off"
sip_tcp = "off"
xmpp_s2s = "off"
xmpp_s2s_direct_tls = "off"
[tls]
trust_bundle = "{ca}"
cert = "{cert}"
key = "{key}"
[[sip.federated_domain]]
name = "partner.test"
system = "lync"
route = "127.0.0.1:9"
{home}
[intercluster]
name = "{name}"
listen = "{listen}"
transport = "tls"
stuck_after_secs = 3
auto_recovery = true
{peers}"#,
            name = me.name,
            data = dir.display(),
            ca = certs.ca_path().display(),
            cert = leaf.cert.display(),
            key = leaf.key.display(),
            listen = me.addr(),
        ),
    )?;
    Ok(path)
}

fn start(cfg: &Path) -> Result<Legate> {
    Legate::start(cfg, &["admin", "intercluster"])
}

/// `legate intercluster ARGS --admin ADDR`: exit code and stdout.
fn cli(node: &Legate, args: &[&str]) -> Result<(i32, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_legate"))
        .arg("intercluster")
        .args(args)
        .arg("--admin")
        .arg(node.addr("admin").to_string())
        .output()
        .context("running legate intercluster")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// The JSON body of `GET path` on `node`'s admin endpoint.
async fn get_json(node: &Legate, path: &str) -> Result<Value> {
    let r = node.http_get(path).await?;
    let body = r.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).with_context(|| format!("GET {path}: {r}"))
}

async fn status(node: &Legate) -> Result<Value> {
    get_json(node, "/status").await
}

fn peer<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["intercluster"]["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == name))
        .unwrap_or(&Value::Null)
}

fn alarm_raised(s: &Value) -> bool {
    s["alarms"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x["name"] == ALARM && x["raised"] == true))
}

/// Polls `node`'s `/status` until `pred` holds (bounded).
async fn wait_status(node: &Legate, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = status(node).await?;
        if pred(&s) {
            return Ok(s);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "{what}: not seen within {WAIT:?}\nintercluster: {:#}\nalarms: {:#}\n--- output ---\n{}",
                s["intercluster"],
                s["alarms"],
                node.output()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn lookup(node: &Legate, user: &str) -> Result<Value> {
    get_json(node, &format!("/intercluster/lookup/{user}")).await
}

/// A force-sync of `peer_name` on `node`, then `node`'s status once that sync ended.
async fn force_sync(node: &Legate, peer_name: &str) -> Result<Value> {
    let before = peer(&status(node).await?, peer_name)["syncs"]
        .as_u64()
        .unwrap_or(0);
    let (code, out) = cli(node, &["force-sync", peer_name])?;
    anyhow::ensure!(code == 0, "force-sync exited {code}: {out}");
    wait_status(node, "the forced sync's end", |s| {
        let p = peer(s, peer_name);
        p["syncs"].as_u64().unwrap_or(0) > before && p["last_outcome"] != "running"
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_sync_between_clusters_and_a_dead_peer_raises_the_alarm_until_it_is_back(
) -> Result<()> {
    let certs = CertFactory::new();
    let (a, b) = (
        Site::new("a", Ipv4Addr::new(127, 0, 0, 41)),
        Site::new("b", Ipv4Addr::new(127, 0, 0, 42)),
    );
    let leaf_a = certs.leaf("a", &["127.0.0.41"]);
    let leaf_b = certs.leaf("b", &["127.0.0.42"]);
    let prosody_a = Prosody::start(
        ProsodyConfig::new(Ipv4Addr::new(127, 0, 0, 31))
            .host("example.test")
            .component("partner.test", SECRET)
            .user("example.test", "alice", "pw"),
    )?;
    let prosody_b = Prosody::start(
        ProsodyConfig::new(Ipv4Addr::new(127, 0, 0, 32))
            .host("example.test")
            .component("partner.test", SECRET)
            .user("example.test", "carol", "pw"),
    )?;
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let cfg_b = config(dir_b.path(), &b, &[&a], &certs, &leaf_b, Some(&prosody_b))?;
    let cfg_a = config(dir_a.path(), &a, &[&b], &certs, &leaf_a, Some(&prosody_a))?;
    let mut node_b = start(&cfg_b)?;
    let mut node_a = start(&cfg_a)?;
    node_b
        .wait_output("B's component link", WAIT, |t| {
            t.contains("component partner.test connected")
        })
        .await?;
    // A's first sync, at its start: B answers, with nobody yet.
    let s = wait_status(&node_a, "A's first sync with B", |s| {
        peer(s, "b")["in_sync"] == true
    })
    .await?;
    assert_eq!(peer(&s, "b")["users"], 0, "{s:#}");
    assert!(
        peer(&s, "b")["certificate"]
            .as_str()
            .is_some_and(|c| c.starts_with("valid")),
        "{s:#}"
    );
    assert_eq!(peer(&s, "b")["listed_by_peer"], true);

    // carol writes to a foreign user through B: B learns she lives there.
    let mut carol = XmppClient::connect(ClientConfig::plain(
        prosody_b.c2s_addr(),
        "example.test",
        "carol",
        "pw",
    ))
    .await?;
    carol.send_message("bob@partner.test", "hello").await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while lookup(&node_b, "carol@example.test").await?["in_this_cluster"] != true {
        if tokio::time::Instant::now() > deadline {
            bail!("B did not learn carol:\n{}", node_b.output());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Not known to A before a sync...
    assert_eq!(
        lookup(&node_a, "carol@example.test").await?["cluster"],
        Value::Null
    );
    // ...known after one, which carried only her.
    let s = force_sync(&node_a, "b").await?;
    let p = peer(&s, "b");
    assert_eq!(p["last_outcome"], "incremental", "{s:#}");
    assert_eq!(
        (p["users"].as_u64(), p["last_transferred"].as_u64()),
        (Some(1), Some(1)),
        "{s:#}"
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while lookup(&node_a, "carol@example.test").await?["cluster"] != "b" {
        if tokio::time::Instant::now() > deadline {
            bail!("A does not route carol to B:\n{}", node_a.output());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // An admin pins dave on B's home node: the next sync carries dave alone.
    let (code, out) = cli(&node_b, &["users", "add", "dave@example.test", "hn1"])?;
    assert_eq!(code, 0, "{out}");
    let deadline = tokio::time::Instant::now() + WAIT;
    while lookup(&node_b, "dave@example.test").await?["in_this_cluster"] != true {
        if tokio::time::Instant::now() > deadline {
            bail!("B did not take dave");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = force_sync(&node_a, "b").await?;
    let p = peer(&s, "b");
    assert_eq!(p["last_outcome"], "incremental", "{s:#}");
    assert_eq!(
        (p["users"].as_u64(), p["last_transferred"].as_u64()),
        (Some(2), Some(1)),
        "{s:#}"
    );
    let (code, text) = cli(&node_a, &["status"])?;
    assert_eq!(code, 0, "every peer in sync: {text}");
    assert!(text.contains("b 127.0.0.42"), "{text}");
    assert!(text.contains("in sync yes, users 2"), "{text}");

    // B's link dies: the next sync fails, and once the stuck threshold (3 s) passes the alarm
    // is raised and auto-recovery restarts the agent. carol and dave stay known (split brain).
    node_b.kill();
    let (code, _) = cli(&node_a, &["force-sync", "b"])?;
    assert_eq!(code, 0);
    // The alarm table and the peer's status record are written one after the other: both
    // are waited for.
    wait_status(&node_a, "the alarm on A", |s| {
        alarm_raised(s) && peer(s, "b")["alarm"] == true
    })
    .await?;
    let s = wait_status(&node_a, "an auto-recovery restart", |s| {
        peer(s, "b")["restarts"].as_u64().unwrap_or(0) >= 1
    })
    .await?;
    assert_eq!(peer(&s, "b")["in_sync"], false, "{s:#}");
    assert!(
        peer(&s, "b")["last_outcome"]
            .as_str()
            .is_some_and(|o| o.starts_with("failed")),
        "{s:#}"
    );
    assert_eq!(lookup(&node_a, "carol@example.test").await?["cluster"], "b");
    let (code, text) = cli(&node_a, &["status"])?;
    assert_eq!(code, 1, "a peer out of sync: {text}");
    assert!(text.contains(ALARM), "{text}");

    // B is back (its users kept in its data directory): a restarted attempt succeeds, in full
    // since B's change log is new, and the alarm clears.
    let node_b = start(&cfg_b)?;
    let s = wait_status(&node_a, "the alarm cleared", |s| {
        !alarm_raised(s) && peer(s, "b")["in_sync"] == true
    })
    .await?;
    let p = peer(&s, "b");
    assert_eq!(p["last_outcome"], "complete", "{s:#}");
    assert_eq!(p["users"], 2, "{s:#}");
    let m = node_a.metrics().await?;
    assert!(
        common::legate::metric_value(&m, "legate_intercluster_syncs_total{outcome=\"failed\"}")
            .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
    assert_eq!(
        common::legate::metric_value(&m, "legate_intercluster_peer_users{peer=\"b\"}"),
        Some(2.0)
    );
    assert!(m.contains("legate_intercluster_sync_seconds_bucket"), "{m}");

    // A no longer lists B (restarted so): B's users are forgotten, not routed to a cluster A
    // does not talk to.
    node_a.kill();
    let cfg_a = config(dir_a.path(), &a, &[], &certs, &leaf_a, Some(&prosody_a))?;
    let node_a = start(&cfg_a)?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while lookup(&node_a, "carol@example.test").await?["cluster"] != Value::Null {
        if tokio::time::Instant::now() > deadline {
            bail!("A still knows carol after dropping B:\n{}", node_a.output());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(node_b);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_no_longer_lists_us_and_a_wrong_certificate_show_in_the_status() -> Result<()> {
    let certs = CertFactory::new();
    let (a, b, c) = (
        Site::new("a", Ipv4Addr::new(127, 0, 0, 44)),
        Site::new("b", Ipv4Addr::new(127, 0, 0, 45)),
        Site::new("c", Ipv4Addr::new(127, 0, 0, 46)),
    );
    let leaf_a = certs.leaf("a", &["127.0.0.44"]);
    let leaf_b = certs.leaf("b", &["127.0.0.45"]);
    // c's certificate names another address than the one b lists for it.
    let leaf_c = certs.leaf("c", &["127.0.0.99"]);
    let (da, db, dc) = (
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    );
    // a no longer lists b; b still lists a (and c).
    let node_a = start(&config(da.path(), &a, &[], &certs, &leaf_a, None)?)?;
    let node_c = start(&config(dc.path(), &c, &[&b], &certs, &leaf_c, None)?)?;
    let node_b = start(&config(db.path(), &b, &[&a, &c], &certs, &leaf_b, None)?)?;

    let s = wait_status(&node_b, "b's syncs with a and c", |s| {
        peer(s, "a")["listed_by_peer"] == false && peer(s, "c")["last_sync_end"].is_u64()
    })
    .await?;
    let pa = peer(&s, "a");
    assert_eq!(pa["in_sync"], false, "{s:#}");
    assert!(
        pa["last_outcome"]
            .as_str()
            .is_some_and(|o| o.contains("does not list this cluster `b`")),
        "{s:#}"
    );
    let pc = peer(&s, "c");
    assert_eq!(pc["reachable"], false, "{s:#}");
    let cert = pc["certificate"].as_str().unwrap_or_default();
    assert!(
        cert.starts_with("failed")
            && (cert.contains("NotValidForName") || cert.contains("not valid for name")),
        "the certificate status says why: {s:#}"
    );
    let (_, text) = cli(&node_b, &["status"])?;
    assert!(
        text.contains("the peer no longer lists this cluster"),
        "{text}"
    );

    // On a's side: b still lists us, we do not list it.
    let s = wait_status(&node_a, "b as an unlisted caller on a", |s| {
        s["intercluster"]["unlisted_callers"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["name"] == "b"))
    })
    .await?;
    let (_, text) = cli(&node_a, &["status"])?;
    assert!(
        text.contains("b still lists us but we no longer list it"),
        "{text}\n{s:#}"
    );
    // c's calls to b are refused by b the same way: b lists c at 127.0.0.46 and c's
    // certificate does not name that address, so c cannot speak for it (b's certificate is
    // valid for c: the refusal is b's answer, not a handshake failure).
    let s = wait_status(&node_c, "c's sync with b refused by b", |s| {
        peer(s, "b")["last_outcome"]
            .as_str()
            .is_some_and(|o| o.contains("iPAddress SAN"))
    })
    .await?;
    let pb = peer(&s, "b");
    assert_eq!(pb["in_sync"], false, "{s:#}");
    assert!(
        pb["certificate"]
            .as_str()
            .is_some_and(|c| c.starts_with("valid")),
        "{s:#}"
    );
    // Each answering side shows whom it refused and why: b refused c's certificate for the
    // address it lists; c's listener saw b's handshake fail (b refused c's certificate).
    let refused = |s: &Value, reason: &str, peer: Option<&str>| {
        s["intercluster"]["refused_callers"]
            .as_array()
            .is_some_and(|r| {
                r.iter().any(|r| {
                    r["reason"] == reason
                        && peer.is_none_or(|p| r["peer"] == p)
                        && r["from"].as_str().is_some_and(|f| f.starts_with("127."))
                })
            })
    };
    let s = wait_status(&node_b, "b's refusal of c", |s| {
        refused(s, "certificate_names", Some("c"))
    })
    .await?;
    assert!(
        s["intercluster"]["refused_callers"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["detail"]
                .as_str()
                .is_some_and(|d| d.contains("127.0.0.99")))),
        "{s:#}"
    );
    wait_status(&node_c, "c's listener saw b's handshake fail", |s| {
        refused(s, "tls_handshake", None)
    })
    .await?;
    let m = node_b.http_get("/metrics").await?;
    assert!(
        metric_sum(
            &m,
            "legate_intercluster_callers_refused_total",
            &["reason=\"certificate_names\""]
        ) >= 1,
        "{m}"
    );
    // Forcing a peer that is not listed is refused with a reason.
    let (code, _) = cli(&node_b, &["force-sync", "zz"])?;
    assert_eq!(code, 1);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Routing (issue 13 §3): a foreign XMPP server reaches a user of cluster B through cluster A.

/// The routing rig: cluster A (the s2s edge the foreign server's DNS points at) and cluster B
/// (no s2s listener, and no DNS that knows the foreign domain: whatever reaches the foreign
/// server from B's users went through A), each a single node with its own Prosody home node,
/// peered over mutual TLS; a foreign Prosody `xmpp.test` with user bob.
struct RouteRig {
    certs: CertFactory,
    a: Legate,
    b: Legate,
    _home_a: Prosody,
    home_b: Prosody,
    foreign: Prosody,
    _dns: common::dnsmasq::Dnsmasq,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// The configuration of cluster `me` (peered with `peer`) in the routing tests: `edge` is the
/// `[listeners]` table's entries, `more` the federation sections (and `[dns]`).
fn route_config(
    dir: &Path,
    (me, peer): (&Site, &Site),
    leaf: &Leaf,
    certs: &CertFactory,
    home: &Prosody,
    edge: &str,
    more: &str,
) -> Result<PathBuf> {
    let path = dir.join("legate.toml");
    std::fs::write(
        &path,
        format!(
            r#"[node]
id = "{name}1"
data_dir = "{data}"
admin_listen = "127.0.0.1:0"
[[local_domain]]
name = "example.test"
cert = "{cert}"
key = "{key}"
[listeners]
sip_tcp = "off"
xmpp_s2s_direct_tls = "off"
{edge}
[tls]
trust_bundle = "{ca}"
cert = "{cert}"
key = "{key}"
[[home_node]]
name = "hn1"
addresses = ["{home}"]
component_secret = "{SECRET}"
default_system = "xmpp"
{more}
[intercluster]
name = "{name}"
listen = "{addr}"
transport = "tls"
sync_interval_mins = 1440
[[intercluster.peer]]
name = "{peer}"
address = "{peer_addr}"
"#,
            name = me.name,
            data = dir.display(),
            cert = leaf.cert.display(),
            key = leaf.key.display(),
            ca = certs.ca_path().display(),
            home = home.component_addr(),
            addr = me.addr(),
            peer = peer.name,
            peer_addr = peer.addr(),
        ),
    )?;
    Ok(path)
}

/// What both clusters of the XMPP rig say of SIP: a partner nobody reaches (unused there).
const NO_SIP: &str = "[[sip.federated_domain]]\nname = \"partner.test\"\nsystem = \"lync\"\nroute = \"127.0.0.1:9\"\n";

/// Waits until `a` places `user` in cluster `b`, forcing syncs.
async fn synced_to_a(a: &Legate, user: &str, why: impl Fn(&str) -> String) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        force_sync(a, "b").await?;
        if lookup(a, user).await?["cluster"] == "b" {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{}", why(&format!("A never placed {user} in B")));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl RouteRig {
    async fn start(block: u8) -> Result<RouteRig> {
        let ip = |n: u8| Ipv4Addr::new(127, 0, block, n);
        let certs = CertFactory::new();
        let (a, b) = (Site::new("a", ip(1)), Site::new("b", ip(2)));
        let a_ip = ip(1).to_string();
        let b_ip = ip(2).to_string();
        let leaf_a = certs.leaf("a", &["example.test", &a_ip]);
        let leaf_b = certs.leaf("b", &["example.test", &b_ip]);
        let a_s2s = common::ports::free_port(IpAddr::V4(ip(1)));
        let (foreign, dns) =
            common::rig::foreign_xmpp(&certs, ip(5), SocketAddr::new(IpAddr::V4(ip(1)), a_s2s))?;
        let home_a = Prosody::start(
            ProsodyConfig::new(ip(3))
                .host("example.test")
                .user("example.test", "alice", "pw")
                .component("xmpp.test", SECRET),
        )?;
        let home_b = Prosody::start(
            ProsodyConfig::new(ip(4))
                .host("example.test")
                .user("example.test", "carol", "pw")
                .user("example.test", "dave", "pw")
                .component("xmpp.test", SECRET),
        )?;
        let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let cfg_a = route_config(
            dir_a.path(),
            (&a, &b),
            &leaf_a,
            &certs,
            &home_a,
            &format!(
                "sip_tls = \"off\"\nxmpp_s2s = \"{}\"",
                SocketAddr::new(IpAddr::V4(ip(1)), a_s2s)
            ),
            &format!(
                "{NO_SIP}[dns]\nnameservers = [\"{}\"]\n{FEDERATION}",
                dns.addr()
            ),
        )?;
        // B: no s2s listener, and no DNS that knows xmpp.test.
        let cfg_b = route_config(
            dir_b.path(),
            (&b, &a),
            &leaf_b,
            &certs,
            &home_b,
            "sip_tls = \"off\"\nxmpp_s2s = \"off\"",
            &format!("{NO_SIP}{FEDERATION}"),
        )?;
        let b_node = start(&cfg_b)?;
        let a_node = Legate::start(&cfg_a, &["admin", "intercluster", "xmpp_s2s"])?;
        for (n, what) in [
            (&a_node, "A's component link"),
            (&b_node, "B's component link"),
        ] {
            n.wait_output(what, WAIT, |t| {
                t.contains("component xmpp.test connected to home node hn1")
            })
            .await?;
        }
        wait_status(&a_node, "A's first sync with B", |s| {
            peer(s, "b")["in_sync"] == true
        })
        .await?;
        Ok(RouteRig {
            certs,
            a: a_node,
            b: b_node,
            _home_a: home_a,
            home_b,
            foreign,
            _dns: dns,
            _dirs: (dir_a, dir_b),
        })
    }

    /// `user`, logged in on B's home node, available.
    async fn user_of_b(&self, user: &str) -> Result<XmppClient> {
        let mut c = XmppClient::connect(ClientConfig::plain(
            self.home_b.c2s_addr(),
            "example.test",
            user,
            "pw",
        ))
        .await?;
        c.send_presence(None, None).await?;
        Ok(c)
    }

    /// bob, logged in on the foreign server over TLS, available.
    async fn bob(&self) -> Result<XmppClient> {
        let mut cc = ClientConfig::plain(self.foreign.c2s_addr(), "xmpp.test", "bob", "pw");
        cc.tls = Some(common::xmpp_client::TlsOptions {
            ca_pem: self.certs.ca_pem().as_bytes().to_vec(),
            server_name: "xmpp.test".into(),
        });
        let mut b = XmppClient::connect(cc).await.context("bob logs in")?;
        b.send_presence(None, None).await?;
        Ok(b)
    }

    fn why(&self, what: &str) -> String {
        format!(
            "{what}\n--- A ---\n{}\n--- B ---\n{}\n--- B's prosody ---\n{}",
            self.a.output(),
            self.b.output(),
            self.home_b.log()
        )
    }
}

/// `a` subscribes to `b` and `b` approves; `a` then sees `b`'s presence.
async fn subscribe_and_approve(a: &mut XmppClient, b: &mut XmppClient) -> Result<()> {
    let (a_jid, b_jid) = (a.bare_jid().to_owned(), b.bare_jid().to_owned());
    a.subscribe(&b_jid).await?;
    b.expect_presence_from(&a_jid, Some("subscribe"), WAIT)
        .await
        .with_context(|| format!("{a_jid}'s subscription request reaches {b_jid}"))?;
    b.approve(&a_jid).await?;
    a.expect_presence_from(&b_jid, Some("subscribed"), WAIT)
        .await
        .with_context(|| format!("{b_jid}'s approval reaches {a_jid}"))?;
    a.expect_presence_from(&b_jid, None, WAIT)
        .await
        .with_context(|| format!("{b_jid}'s presence reaches {a_jid}"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_xmpp_user_reaches_a_user_of_b_through_a_and_answers_come_back_through_a(
) -> Result<()> {
    let mut rig = RouteRig::start(3).await?;
    // carol lives in B (pinned by B's admin) and A learns it at a forced sync.
    let (code, out) = cli(&rig.b, &["users", "add", "carol@example.test", "hn1"])?;
    assert_eq!(code, 0, "{out}");
    synced_to_a(&rig.a, "carol@example.test", |w| rig.why(w)).await?;
    let mut carol = rig.user_of_b("carol").await?;
    let mut bob = rig.bob().await?;

    // Presence both ways: bob ⇄ carol, each subscribing and approving.
    let r = subscribe_and_approve(&mut bob, &mut carol).await;
    r.with_context(|| rig.why("bob subscribes to carol"))?;
    let r = subscribe_and_approve(&mut carol, &mut bob).await;
    r.with_context(|| rig.why("carol subscribes to bob"))?;

    // IM both ways.
    bob.send_message("carol@example.test", "hello carol, from xmpp.test")
        .await?;
    let m = carol
        .expect_message_from("bob@xmpp.test", WAIT)
        .await
        .with_context(|| rig.why("bob's message reaches carol"))?;
    assert_eq!(m.body.as_deref(), Some("hello carol, from xmpp.test"));
    carol
        .send_message("bob@xmpp.test", "hi bob, from B")
        .await?;
    let m = bob
        .expect_message_from("carol@example.test", WAIT)
        .await
        .with_context(|| rig.why("carol's answer reaches bob"))?;
    assert_eq!(m.body.as_deref(), Some("hi bob, from B"));

    // Which way it went: B sent nothing on an s2s link of its own (it could not have: it has
    // no DNS for xmpp.test); everything of carol's left through A, which forwarded bob's
    // traffic to B and sent carol's out on its s2s stream.
    let (ma, mb) = (rig.a.metrics().await?, rig.b.metrics().await?);
    let f = "legate_envelopes_total";
    assert_eq!(
        metric_sum(&mb, f, &["origin=\"component\"", "destination=\"s2s\""]),
        0,
        "{mb}"
    );
    assert!(
        metric_sum(
            &mb,
            f,
            &[
                "origin=\"component\"",
                "destination=\"intercluster\"",
                "outcome=\"delivered\""
            ]
        ) >= 4,
        "B's answers (subscribed, presence, subscribe, message) go to A: {mb}"
    );
    assert!(
        metric_sum(
            &ma,
            f,
            &[
                "origin=\"intercluster\"",
                "destination=\"s2s\"",
                "outcome=\"delivered\""
            ]
        ) >= 4,
        "A sends them out on its s2s link: {ma}"
    );
    assert!(
        metric_sum(
            &ma,
            f,
            &[
                "origin=\"s2s\"",
                "destination=\"intercluster\"",
                "outcome=\"delivered\""
            ]
        ) >= 4,
        "{ma}"
    );
    let fwd = "legate_intercluster_forwarded_total";
    assert!(metric_sum(&ma, fwd, &["direction=\"out\"", "outcome=\"delivered\""]) >= 4);
    assert!(metric_sum(&ma, fwd, &["direction=\"in\"", "outcome=\"delivered\""]) >= 4);
    assert_eq!(metric_sum(&ma, fwd, &["outcome=\"failed\""]), 0, "{ma}");
    assert!(
        ma.contains("legate_intercluster_forward_seconds_bucket"),
        "{ma}"
    );
    let s = status(&rig.b).await?;
    assert!(
        s["intercluster"]["return_paths"].as_u64() >= Some(1),
        "{s:#}"
    );
    let fwd_a = peer(&status(&rig.a).await?, "b")["forwarded"].clone();
    assert!(fwd_a["out_delivered"].as_u64() >= Some(4), "{fwd_a:#}");
    assert!(fwd_a["in_delivered"].as_u64() >= Some(4), "{fwd_a:#}");
    assert_eq!(fwd_a["out_not_delivered"], 0, "{fwd_a:#}");

    // Ask the peers: dave lives in B, but no sync since (the interval is a day, nothing is
    // forced): A does not know him, asks B, and delivers.
    let (code, out) = cli(&rig.b, &["users", "add", "dave@example.test", "hn1"])?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        lookup(&rig.a, "dave@example.test").await?["cluster"],
        Value::Null
    );
    let mut dave = rig.user_of_b("dave").await?;
    // B takes dave's pin through its store follower: wait until B would answer yes.
    let deadline = tokio::time::Instant::now() + WAIT;
    while lookup(&rig.b, "dave@example.test").await?["in_this_cluster"] != true {
        if tokio::time::Instant::now() > deadline {
            bail!("B did not take dave");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bob.send_message("dave@example.test", "are you there, dave?")
        .await?;
    let m = dave
        .expect_message_from("bob@xmpp.test", WAIT)
        .await
        .with_context(|| rig.why("bob's message reaches dave, unknown to A"))?;
    assert_eq!(m.body.as_deref(), Some("are you there, dave?"));
    assert_eq!(lookup(&rig.a, "dave@example.test").await?["cluster"], "b");
    let (code, text) = cli(&rig.a, &["lookup", "dave@example.test"])?;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains('b'), "{text}");
    let ma = rig.a.metrics().await?;
    assert!(
        metric_sum(
            &ma,
            "legate_intercluster_lookups_total",
            &["direction=\"out\"", "answer=\"yes\""]
        ) >= 1,
        "{ma}"
    );
    // dave answers: back through A as well.
    dave.send_message("bob@xmpp.test", "yes").await?;
    let m = bob
        .expect_message_from("dave@example.test", WAIT)
        .await
        .with_context(|| rig.why("dave's answer reaches bob"))?;
    assert_eq!(m.body.as_deref(), Some("yes"));

    // A user nobody has: A asks B, hears no, and routes as without peers (its only home node).
    bob.send_message("nobody@example.test", "anyone?").await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (ma, mb) = (rig.a.metrics().await?, rig.b.metrics().await?);
        let asked = metric_sum(
            &ma,
            "legate_intercluster_lookups_total",
            &["direction=\"out\"", "answer=\"no\""],
        );
        let answered = metric_sum(
            &mb,
            "legate_intercluster_lookups_total",
            &["direction=\"in\"", "answer=\"no\""],
        );
        if asked >= 1 && answered >= 1 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{}", rig.why("A did not ask B about nobody"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        lookup(&rig.a, "nobody@example.test").await?["cluster"],
        Value::Null
    );

    // B dies: what A forwards to it bounces to the foreign sender, with the reason.
    rig.b.kill();
    bob.send_message("carol@example.test", "still there?")
        .await?;
    let e = bob
        .next_stanza_matching(
            |s| {
                s.name == "message"
                    && s.is_type("error")
                    && s.sender_bare() == Some("carol@example.test")
            },
            WAIT,
        )
        .await
        .with_context(|| rig.why("the bounce of a message for a dead peer"))?;
    assert!(
        e.raw.contains("service-unavailable") || e.raw.contains("remote-server-timeout"),
        "{}",
        e.raw
    );
    let ma = rig.a.metrics().await?;
    assert!(
        metric_sum(
            &ma,
            "legate_intercluster_forwarded_total",
            &["direction=\"out\"", "outcome=\"failed\""]
        ) >= 1,
        "{ma}"
    );
    Ok(())
}

/// A Lync-like partner edge (`partner.test`, the SIP test UA over mutual TLS) talks to A's SIP
/// edge only; alice lives in B (whose SIP route leads nowhere). A SUBSCRIBE and an IM session
/// reach her through A, and what she answers (approval, presence, messages) comes back as
/// NOTIFYs and in-dialog MESSAGEs on the partner's connection to A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lync_user_reaches_a_user_of_b_through_a_and_answers_come_back_in_as_dialogs(
) -> Result<()> {
    use crate::sip_ua::{body_str, hv};
    use common::rig::{self, lync_edge, notify_until};
    let block = 4;
    let ip = |n: u8| Ipv4Addr::new(127, 0, block, n);
    let certs = CertFactory::new();
    let (a, b) = (Site::new("a", ip(1)), Site::new("b", ip(2)));
    let (a_ip, b_ip) = (ip(1).to_string(), ip(2).to_string());
    let leaf_a = certs.leaf("a", &["example.test", &a_ip]);
    let leaf_b = certs.leaf("b", &["example.test", &b_ip]);
    let partner = certs.leaf("partner", &["partner.test", "sip.partner.test"]);
    let route = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let home = |n: u8, user: &str| {
        Prosody::start(
            ProsodyConfig::new(ip(n))
                .host("example.test")
                .user("example.test", user, "pw")
                .component("partner.test", SECRET),
        )
    };
    let (home_a, home_b) = (home(3, "zoe")?, home(4, "alice")?);
    let sip = |route: &str| {
        format!(
            "[[sip.federated_domain]]\nname = \"partner.test\"\nsystem = \"lync\"\nroute = \
             \"{route}\"\npresence_format = \"msrtc\"\n"
        )
    };
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let cfg_a = route_config(
        dir_a.path(),
        (&a, &b),
        &leaf_a,
        &certs,
        &home_a,
        &format!("sip_tls = \"{}:0\"\nxmpp_s2s = \"off\"", ip(1)),
        &sip(&route.local_addr()?.to_string()),
    )?;
    let cfg_b = route_config(
        dir_b.path(),
        (&b, &a),
        &leaf_b,
        &certs,
        &home_b,
        "sip_tls = \"off\"\nxmpp_s2s = \"off\"",
        &sip("127.0.0.1:9"),
    )?;
    let node_b = start(&cfg_b)?;
    let node_a = Legate::start(&cfg_a, &["admin", "intercluster", "sip_tls"])?;
    for n in [&node_a, &node_b] {
        n.wait_output("the partner.test component link", WAIT, |t| {
            t.contains("component partner.test connected to home node hn1")
        })
        .await?;
    }
    let why = |what: &str| {
        format!(
            "{what}\n--- A ---\n{}\n--- B ---\n{}\n--- B's prosody ---\n{}",
            node_a.output(),
            node_b.output(),
            home_b.log()
        )
    };
    let (code, out) = cli(&node_b, &["users", "add", "alice@example.test", "hn1"])?;
    assert_eq!(code, 0, "{out}");
    synced_to_a(&node_a, "alice@example.test", why).await?;

    let mut alice = XmppClient::connect(ClientConfig::plain(
        home_b.c2s_addr(),
        "example.test",
        "alice",
        "pw",
    ))
    .await?;
    alice.send_presence(None, Some("in region B")).await?;

    // --- The Lync watcher subscribes to alice on A; alice approves on B. ---------------------
    let mut bob = lync_edge(&certs, &partner, node_a.addr("sip_tls")).await?;
    let ok = rig::subscribe(&mut bob, "alice@example.test", "ic-sub-1").await?;
    assert_eq!(ok.status(), Some(200), "{}", why("SUBSCRIBE"));
    let n = bob.request("NOTIFY").await?;
    assert!(
        hv(&n, "Subscription-State").starts_with("pending"),
        "{}",
        hv(&n, "Subscription-State")
    );
    bob.respond(&n, 200, "OK", &[], None).await?;
    alice
        .expect_presence_from("bob@partner.test", Some("subscribe"), WAIT)
        .await
        .with_context(|| why("the SUBSCRIBE reaches alice on B"))?;
    alice.approve("bob@partner.test").await?;
    // msrtc 3500: Lync Available, with alice's text, from the dialog A holds.
    let body = notify_until(&mut bob, "alice available", |b| b.contains(">3500<"))
        .await
        .with_context(|| why("alice's presence as a NOTIFY"))?;
    assert!(body.contains("in region B"), "{body}");
    alice.send_presence(Some("dnd"), Some("busy in B")).await?;
    let body = notify_until(&mut bob, "alice busy", |b| b.contains(">6500<"))
        .await
        .with_context(|| why("alice's dnd as a NOTIFY"))?;
    assert!(body.contains("busy in B"), "{body}");

    // --- IM: a session opened on A, answered by alice on B, inside the same dialog. ---------
    let _tag = rig::invite_im(&mut bob, "ic-im-1", "icim1", "Hello Alice in B")
        .await
        .with_context(|| why("INVITE"))?;
    let m = alice
        .expect_message_from("bob@partner.test", WAIT)
        .await
        .with_context(|| why("the first message reaches alice"))?;
    assert_eq!(m.body.as_deref(), Some("Hello Alice in B"));
    alice
        .send_message("bob@partner.test", "Hi Bob, from B")
        .await?;
    let m = bob
        .request("MESSAGE")
        .await
        .with_context(|| why("alice's answer as a MESSAGE"))?;
    assert_eq!(
        m.call_id().ok(),
        Some("ic-im-1"),
        "in the partner's session"
    );
    assert_eq!(body_str(&m), "Hi Bob, from B");
    bob.respond(&m, 200, "OK", &[], None).await?;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), route.accept())
            .await
            .is_err(),
        "nothing dialled the partner's route: answers went on its own connection"
    );

    // A pager MESSAGE (outside any dialog) to alice through A.
    let br = bob.branch();
    bob.send(
        &[
            "MESSAGE sip:alice@example.test SIP/2.0",
            &format!("Via: SIP/2.0/TLS sip.partner.test:5061;branch={br}"),
            "Max-Forwards: 70",
            "From: <sip:bob@partner.test>;tag=icpager1",
            "To: <sip:alice@example.test>",
            "Call-ID: ic-pager-1",
            "CSeq: 1 MESSAGE",
            "Content-Type: text/plain; charset=UTF-8",
            "Content-Length: {CL}",
        ],
        b"a pager message for B",
    )
    .await?;
    assert_eq!(
        bob.response().await?.status(),
        Some(200),
        "{}",
        why("pager")
    );
    let m = alice
        .expect_message_from("bob@partner.test", WAIT)
        .await
        .with_context(|| why("the pager MESSAGE reaches alice"))?;
    assert_eq!(m.body.as_deref(), Some("a pager message for B"));

    // --- alice (B) subscribes to the Lync user: the SUBSCRIBE leaves A on the partner's own
    // connection, and the partner's NOTIFY reaches alice on B as presence.
    alice.subscribe("bob@partner.test").await?;
    let sub = bob
        .request("SUBSCRIBE")
        .await
        .with_context(|| why("alice's SUBSCRIBE toward the partner"))?;
    assert_eq!(hv(&sub, "Event"), "presence");
    bob.respond(&sub, 200, "OK", &[("Expires", "3600")], None)
        .await?;
    let from_tag = crate::sip_ua::from_tag(&sub);
    let our_contact = hv(&sub, "Contact")
        .trim_start_matches('<')
        .split('>')
        .next()
        .unwrap_or("")
        .to_string();
    let br = bob.branch();
    let call_id = sub
        .call_id()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .to_string();
    bob.send(
        &[
            &format!("NOTIFY {our_contact} SIP/2.0"),
            &format!("Via: SIP/2.0/TLS sip.partner.test:5061;branch={br}"),
            "Max-Forwards: 70",
            "From: <sip:bob@partner.test>;tag=icnotify",
            &format!("To: <sip:alice@example.test>;tag={from_tag}"),
            &format!("Call-ID: {call_id}"),
            "CSeq: 1 NOTIFY",
            "Event: presence",
            "Subscription-State: active;expires=3600",
            "Content-Type: application/msrtc-event-categories+xml",
            "Content-Length: {CL}",
        ],
        rig::msrtc(15500, None).as_bytes(),
    )
    .await?;
    assert_eq!(
        bob.response().await?.status(),
        Some(200),
        "{}",
        why("NOTIFY")
    );
    let p = alice
        .next_stanza_matching(
            |s| {
                s.name == "presence"
                    && s.sender_bare() == Some("bob@partner.test")
                    && s.type_.is_none()
            },
            WAIT,
        )
        .await
        .with_context(|| why("the partner's presence reaches alice on B"))?;
    assert_eq!(p.show.as_deref(), Some("away"), "{}", p.raw);

    // B sent nothing toward SIP itself; A did, from what B forwarded.
    let (ma, mb) = (node_a.metrics().await?, node_b.metrics().await?);
    let f = "legate_envelopes_total";
    assert_eq!(
        metric_sum(&mb, f, &["origin=\"component\"", "destination=\"sip\""]),
        0,
        "{mb}"
    );
    assert!(
        metric_sum(
            &ma,
            f,
            &[
                "origin=\"intercluster\"",
                "destination=\"sip\"",
                "outcome=\"delivered\""
            ]
        ) >= 3,
        "{ma}"
    );
    assert!(
        metric_sum(
            &ma,
            f,
            &[
                "origin=\"sip\"",
                "destination=\"intercluster\"",
                "outcome=\"delivered\""
            ]
        ) >= 2,
        "{ma}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The local side of the mesh (issue 13 §3): users of the same domain homed in two clusters.

/// The mesh component of `example.test` on both home nodes, and the module that hands it
/// what a user writes to a colleague the home node has no account for.
const MESH: &str = "mesh.example.test";

fn mesh_home(ip: Ipv4Addr, user: &str) -> ProsodyConfig {
    let mut cfg = ProsodyConfig::new(ip)
        .host("example.test")
        .user("example.test", user, "pw")
        .host_lua(
            "example.test",
            &format!("\tlegate_mesh_component = \"{MESH}\""),
        )
        .component("partner.test", SECRET)
        .component_lua(MESH, SECRET, "\tvalidate_from_addresses = false");
    cfg.extra_modules.push("legate_mesh".into());
    cfg.extra_global_lua = format!(
        "plugin_paths = {{ {} }}",
        common::prosody::lua_str(concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/prosody"))
    );
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_of_one_domain_in_two_clusters_chat_and_see_each_other_through_the_mesh() -> Result<()>
{
    let ip = |n: u8| Ipv4Addr::new(127, 0, 13, n);
    let certs = CertFactory::new();
    let (a, b) = (Site::new("a", ip(1)), Site::new("b", ip(2)));
    let leaf_a = certs.leaf("a", &["example.test", &ip(1).to_string()]);
    let leaf_b = certs.leaf("b", &["example.test", &ip(2).to_string()]);
    let home_a = Prosody::start(mesh_home(ip(3), "alice"))?;
    let home_b = Prosody::start(mesh_home(ip(4), "carol"))?;
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let write =
        |dir: &Path, me: &Site, peer: &Site, leaf: &Leaf, home: &Prosody| -> Result<PathBuf> {
            let path = route_config(
                dir,
                (me, peer),
                leaf,
                &certs,
                home,
                "sip_tls = \"off\"\nxmpp_s2s = \"off\"",
                NO_SIP,
            )?;
            let text = std::fs::read_to_string(&path)?.replacen(
                "name = \"example.test\"\n",
                &format!("name = \"example.test\"\nmesh_component = \"{MESH}\"\n"),
                1,
            );
            std::fs::write(&path, text)?;
            Ok(path)
        };
    let node_b = start(&write(dir_b.path(), &b, &a, &leaf_b, &home_b)?)?;
    let node_a = start(&write(dir_a.path(), &a, &b, &leaf_a, &home_a)?)?;
    for (n, what) in [
        (&node_a, "A's mesh component"),
        (&node_b, "B's mesh component"),
    ] {
        n.wait_output(what, WAIT, |t| {
            t.contains(&format!("component {MESH} connected to home node hn1"))
        })
        .await?;
    }
    let why = |what: &str| {
        format!(
            "{what}\n--- A ---\n{}\n--- B ---\n{}\n--- A's prosody ---\n{}\n--- B's prosody ---\n{}",
            node_a.output(),
            node_b.output(),
            home_a.log(),
            home_b.log()
        )
    };
    let login = |home: &Prosody, user: &str| {
        XmppClient::connect(ClientConfig::plain(
            home.c2s_addr(),
            "example.test",
            user,
            "pw",
        ))
    };
    let mut alice = login(&home_a, "alice").await?;
    alice.send_presence(None, None).await?;
    let mut carol = login(&home_b, "carol").await?;
    carol.send_presence(None, None).await?;

    // B's admin pins carol on B's home node; nobody told A. A asks B (and B will ask A about
    // alice, whom A learned from her first message).
    let (code, out) = cli(&node_b, &["users", "add", "carol@example.test", "hn1"])?;
    assert_eq!(code, 0, "{out}");
    alice
        .send_message("carol@example.test", "hello carol, from cluster A")
        .await?;
    let m = carol
        .expect_message_from("alice@example.test", WAIT)
        .await
        .with_context(|| why("alice's message reaches carol in B"))?;
    assert_eq!(m.body.as_deref(), Some("hello carol, from cluster A"));
    carol
        .send_message("alice@example.test", "hi alice, from cluster B")
        .await?;
    let m = alice
        .expect_message_from("carol@example.test", WAIT)
        .await
        .with_context(|| why("carol's answer reaches alice in A"))?;
    assert_eq!(m.body.as_deref(), Some("hi alice, from cluster B"));

    // Presence both ways: each subscribes, the other approves, each sees the other.
    subscribe_and_approve(&mut alice, &mut carol)
        .await
        .with_context(|| why("alice subscribes to carol"))?;
    subscribe_and_approve(&mut carol, &mut alice)
        .await
        .with_context(|| why("carol subscribes to alice"))?;
    carol
        .send_presence(Some("dnd"), Some("In a meeting"))
        .await?;
    let p = alice
        .next_stanza_matching(
            |s| {
                s.name == "presence"
                    && s.sender_bare() == Some("carol@example.test")
                    && s.show.as_deref() == Some("dnd")
            },
            WAIT,
        )
        .await
        .with_context(|| why("carol's new state reaches alice"))?;
    assert!(p.raw.contains("In a meeting"), "{}", p.raw);

    // Both ways went over the link, placed by the peers' answers.
    assert_eq!(lookup(&node_a, "carol@example.test").await?["cluster"], "b");
    assert_eq!(lookup(&node_b, "alice@example.test").await?["cluster"], "a");
    let ma = node_a.metrics().await?;
    assert!(
        metric_sum(
            &ma,
            "legate_intercluster_forwarded_total",
            &["direction=\"out\"", "outcome=\"delivered\""]
        ) >= 4,
        "{ma}"
    );

    // A colleague nobody has: alice gets an error, not silence, and nothing loops.
    alice
        .send_message("zed@example.test", "anyone there?")
        .await?;
    let e = alice
        .next_stanza_matching(
            |s| {
                s.name == "message"
                    && s.is_type("error")
                    && s.sender_bare() == Some("zed@example.test")
            },
            WAIT,
        )
        .await
        .with_context(|| why("a message to nobody is answered with an error"))?;
    assert!(e.raw.contains("item-not-found"), "{}", e.raw);
    Ok(())
}
