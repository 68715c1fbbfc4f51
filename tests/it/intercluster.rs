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
use common::prosody::{Prosody, ProsodyConfig};
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
    let s = wait_status(&node_a, "the alarm on A", alarm_raised).await?;
    assert_eq!(peer(&s, "b")["alarm"], true, "{s:#}");
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
    // The refusal is b's, about c's certificate: c's own sync with b works (b's certificate
    // names b's address).
    let s = wait_status(&node_c, "c's sync with b", |s| {
        peer(s, "b")["in_sync"] == true
    })
    .await?;
    assert!(
        peer(&s, "b")["certificate"]
            .as_str()
            .is_some_and(|c| c.starts_with("valid")),
        "{s:#}"
    );
    // Forcing a peer that is not listed is refused with a reason.
    let (code, _) = cli(&node_b, &["force-sync", "zz"])?;
    assert_eq!(code, 1);
    Ok(())
}
