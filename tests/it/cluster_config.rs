//! The configuration primary (issue 12 item 4, seed 001) on a real three-member etcd and three
//! real `legate run` processes: a federation and mapping change made on the primary's files
//! and applied there with SIGHUP is live on both subordinates in under a second; a
//! subordinate whose own file says something else runs with the primary's values and raises
//! ClusterConfigConflict (cleared once its admin copies the primary's sections and reloads); a
//! publication that does not validate on the subordinates (an invalid mapping file, written
//! to etcd as a primary of another build would) keeps the running configuration and raises
//! ClusterReplicationFailed; `legate cluster
//! force-config-update` is refused on the primary and re-applies on a subordinate; a node
//! missing from the primary's peer list and two nodes naming different primaries raise
//! ClusterNodeNotInPeerList and ClusterPrimaryMismatch.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::legate::Legate;
use common::ports::cluster_peers_toml;

const CLUSTER: &str = "cfg.test";
const WAIT: Duration = Duration::from_secs(20);
const PEERS: [&str; 3] = ["gw1", "gw2", "gw3"];

fn node_toml(id: &str, etcd: &Etcd, federated: &[&str], extra: &str) -> String {
    node_toml_with(id, etcd, federated, extra, "gw1", &PEERS, CLUSTER)
}

fn node_toml_with(
    id: &str,
    etcd: &Etcd,
    federated: &[&str],
    extra: &str,
    primary: &str,
    peers: &[&str],
    cluster: &str,
) -> String {
    let peers = cluster_peers_toml(cluster, peers);
    let federated: String = federated
        .iter()
        .map(|d| format!("[[sip.federated_domain]]\nname = \"{d}\"\nsystem = \"lync\"\n"))
        .collect();
    format!(
        r#"
[node]
id = "{id}"
admin_listen = "127.0.0.1:0"
data_dir = "data"
[[local_domain]]
name = "example.test"
[listeners]
sip_tls = "off"
sip_tcp = "off"
xmpp_s2s = "off"
xmpp_s2s_direct_tls = "off"
{federated}
[xmpp.federation]
dialback_secret = "{id}-dialback-secret-of-this-node"
[limits]
max_subscriptions_per_user = 50
{extra}
[cluster]
name = "{cluster}"
primary = "{primary}"
store = "etcd"
etcd_endpoints = {endpoints}
lease_ttl_secs = 3
{peers}
"#,
        endpoints = etcd.endpoints_toml()
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).expect("copy");
        }
    }
}

fn write(dir: &Path, id: &str, toml: &str) -> PathBuf {
    let d = dir.join(id);
    std::fs::create_dir_all(&d).expect("node dir");
    let path = d.join("legate.toml");
    std::fs::write(&path, toml).expect("write config");
    path
}

async fn status(l: &Legate) -> serde_json::Value {
    match l.http_get("/status").await {
        Ok(response) => {
            let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            serde_json::from_str(body).unwrap_or_default()
        }
        Err(_) => serde_json::Value::Null,
    }
}

/// Polls the nodes' `/status` until `pred` holds for all of them.
async fn wait_for(
    nodes: &[&Legate],
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut all = Vec::new();
        for n in nodes {
            all.push(status(n).await);
        }
        if all.iter().all(&pred) {
            return all;
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = nodes.iter().map(|n| n.output()).collect();
            panic!(
                "{what}: not reached within {WAIT:?}; last: {:#?}\nlogs:\n{}",
                all.iter()
                    .map(|s| &s["cluster"]["replication"])
                    .collect::<Vec<_>>(),
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn raised(s: &serde_json::Value, name: &str) -> bool {
    s["alarms"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x["name"] == name && x["raised"] == true))
}

fn domains(s: &serde_json::Value) -> Vec<String> {
    s["sip_federated_domains"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The record of `node` in a `/status`'s `cluster.replication.peers`.
fn record<'a>(s: &'a serde_json::Value, node: &str) -> &'a serde_json::Value {
    s["cluster"]["replication"]["peers"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["node"] == node))
        .unwrap_or(&serde_json::Value::Null)
}

fn primary_digest(s: &serde_json::Value) -> Option<String> {
    s["cluster"]["replication"]["primary_digest"]
        .as_str()
        .map(String::from)
}

async fn force(admin: std::net::SocketAddr) -> (i32, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_legate"))
        .args([
            "cluster",
            "force-config-update",
            "--admin",
            &admin.to_string(),
        ])
        .output()
        .await
        .expect("running legate cluster");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primarys_configuration_is_live_on_every_subordinate_within_a_second() {
    let etcd = Etcd::start(3).expect("three-member etcd");
    let dir = tempfile::tempdir().expect("temp dir");
    // The primary runs its own copy of the mapping files; the subordinates have none (the
    // shipped set, the same text): the primary's replicate.
    let maps = dir.path().join("gw1").join("maps");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings"),
        &maps,
    );
    let primary_extra = "[mappings]\ndir = \"maps\"\n";
    let p1 = write(
        dir.path(),
        "gw1",
        &node_toml("gw1", &etcd, &["partner.test"], primary_extra),
    );
    let p2 = write(
        dir.path(),
        "gw2",
        &node_toml("gw2", &etcd, &["partner.test"], ""),
    );
    // gw3's own file disagrees with the primary about the partners and a start-only limit
    // (the primary's applies: nothing had read it when gw3 took the primary's at start).
    let p3 = write(
        dir.path(),
        "gw3",
        &node_toml(
            "gw3",
            &etcd,
            &["gw3-only.test"],
            "sip_max_header_bytes = 4096\n",
        ),
    );
    let gw1 = Legate::start(&p1, &["admin"]).expect("gw1");
    let gw2 = Legate::start(&p2, &["admin"]).expect("gw2");
    let gw3 = Legate::start(&p3, &["admin"]).expect("gw3");
    let subs = [&gw2, &gw3];
    let all = [&gw1, &gw2, &gw3];

    // Every node in sync with the primary's publication, gw3 included, with the primary's
    // partner list and a conflict alarm.
    let first = wait_for(&all, "three nodes in sync with gw1", |s| {
        let d = primary_digest(s);
        d.is_some()
            && PEERS.iter().all(|n| {
                record(s, n)["in_sync"] == true
                    && record(s, n)["applied_digest"].as_str() == d.as_deref()
            })
    })
    .await;
    for s in &first {
        assert_eq!(domains(s), ["partner.test"], "{s:#}");
        assert_eq!(s["mapping_digest"], first[0]["mapping_digest"]);
        assert_eq!(s["cluster"]["replication"]["primary"], "gw1");
    }
    assert!(
        raised(&first[2], "ClusterConfigConflict"),
        "{:#}",
        first[2]["alarms"]
    );
    assert!(
        !raised(&first[1], "ClusterConfigConflict"),
        "{:#}",
        first[1]["alarms"]
    );
    assert_eq!(
        first[0]["cluster"]["replication"]["this_node_is_primary"],
        true
    );
    assert_eq!(
        record(&first[0], "gw3")["restart_needed"],
        serde_json::json!([]),
        "{:#}",
        first[0]["cluster"]
    );

    // A federation, limits and mapping change on the primary, applied there with SIGHUP.
    let text = std::fs::read_to_string(&p1).expect("read");
    let text = text
        .replace(
            "[xmpp.federation]",
            "[[sip.federated_domain]]\nname = \"new-partner.test\"\nsystem = \"lync\"\n[xmpp.federation]",
        )
        .replace(
            "max_subscriptions_per_user = 50",
            "max_subscriptions_per_user = 60\nsip_max_header_bytes = 8192",
        );
    std::fs::write(&p1, text).expect("write");
    let table = std::fs::read_dir(maps.join("tables"))
        .expect("tables")
        .flatten()
        .map(|e| e.path())
        .next()
        .expect("a table file");
    let mut t = std::fs::read_to_string(&table).expect("read table");
    t.push_str("\n# edited on the primary\n");
    std::fs::write(&table, t).expect("write table");
    let before = primary_digest(&first[0]);
    let t0 = Instant::now();
    gw1.signal("HUP").expect("SIGHUP");
    let mut seen_at = Vec::new();
    let want = ["partner.test".to_string(), "new-partner.test".to_string()];
    let primary_now = wait_for(&[&gw1], "gw1 reloaded and published", |s| {
        primary_digest(s) != before && domains(s) == want
    })
    .await;
    let new_digest = primary_digest(&primary_now[0]);
    let maps_digest = primary_now[0]["mapping_digest"].clone();
    for n in subs {
        wait_for(&[n], "the change live on a subordinate", |s| {
            domains(s) == want && s["mapping_digest"] == maps_digest
        })
        .await;
        seen_at.push(t0.elapsed());
    }
    let took = *seen_at.iter().max().expect("two");
    let after = wait_for(&all, "records in sync with the new digest", |s| {
        PEERS
            .iter()
            .all(|n| record(s, n)["applied_digest"].as_str() == new_digest.as_deref())
    })
    .await;
    let lags: Vec<u64> = ["gw2", "gw3"]
        .iter()
        .filter_map(|n| record(&after[0], n)["lag_ms"].as_u64())
        .collect();
    eprintln!(
        "replication: SIGHUP on the primary -> visible in /status of gw2, gw3 after {seen_at:?}; \
         publish -> apply lag recorded by the subordinates {lags:?} ms"
    );
    assert!(
        took < Duration::from_secs(1),
        "the change took {took:?} to be live on every subordinate"
    );
    // A replicated start-only limit is reported, not applied, as a local reload does.
    for n in ["gw2", "gw3"] {
        let r = record(&after[0], n);
        assert!(
            r["restart_needed"]
                .as_array()
                .is_some_and(|a| a.iter().any(|k| k == "limits.sip_max_header_bytes")),
            "{r:#}"
        );
    }
    let m = gw2.metrics().await.expect("metrics");
    assert!(
        common::legate::metric_value(
            &m,
            "legate_cluster_config_replications_total{outcome=\"applied\"}"
        )
        .is_some_and(|v| v >= 2.0),
        "{m}"
    );
    assert!(m.contains("legate_cluster_replication_lag_ms"), "{m}");

    // A publication that does not validate here (an invalid mapping table): the running
    // configuration stays, ClusterReplicationFailed is raised, the record names the error.
    let key = format!("/legate/{CLUSTER}/config");
    let endpoints = etcd.endpoints().join(",");
    let etcdctl = crate::common::programs::require_program("etcdctl", "etcd-client");
    let got = std::process::Command::new(&etcdctl)
        .args(["--endpoints", &endpoints, "get", "--print-value-only", &key])
        .env("ETCDCTL_API", "3")
        .output()
        .expect("etcdctl get");
    let mut published: serde_json::Value =
        serde_json::from_slice(&got.stdout).expect("published JSON");
    published["mappings"]
        .as_array_mut()
        .expect("mapping files")
        .push(
            serde_json::json!({"rel": "tables/broken.toml", "text": "from = \"nosuchsystem\"\n"}),
        );
    published["digest"] = "broken-digest".into();
    published["published_at_ms"] = serde_json::json!(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64);
    let put = std::process::Command::new(&etcdctl)
        .args([
            "--endpoints",
            &endpoints,
            "put",
            &key,
            &published.to_string(),
        ])
        .env("ETCDCTL_API", "3")
        .output()
        .expect("etcdctl put");
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let broken = wait_for(&subs, "ClusterReplicationFailed on the subordinates", |s| {
        raised(s, "ClusterReplicationFailed")
    })
    .await;
    for (s, n) in broken.iter().zip(["gw2", "gw3"]) {
        assert_eq!(domains(s), want, "the running configuration stays");
        assert_eq!(s["mapping_digest"], maps_digest);
        let r = record(s, n);
        assert_eq!(r["applied_digest"].as_str(), new_digest.as_deref(), "{r:#}");
        assert_eq!(r["in_sync"], false, "{r:#}");
        assert!(
            r["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("broken.toml")),
            "{r:#}"
        );
    }
    // Forcing takes the same broken one again: refused, exit 1.
    let (code, out) = force(gw2.addr("admin")).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("refused") && out.contains("broken.toml"),
        "{out}"
    );

    // force-config-update is refused on the primary itself, with a clear message.
    let (code, out) = force(gw1.addr("admin")).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("is the configuration primary"), "{out}");

    // The primary publishes again (a reload with nothing changed): the subordinates are in
    // sync and the alarm clears; a forced update then re-applies the primary's at once.
    gw1.signal("HUP").expect("SIGHUP");
    wait_for(&subs, "in sync again, alarm cleared", |s| {
        !raised(s, "ClusterReplicationFailed")
            && primary_digest(s) == new_digest
            && record(s, s["node"].as_str().unwrap_or_default())["in_sync"] == true
    })
    .await;
    let (code, out) = force(gw3.addr("admin")).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("applied the primary's configuration"), "{out}");
    let s = status(&gw3).await;
    assert_eq!(domains(&s), want);
    assert!(
        raised(&s, "ClusterConfigConflict"),
        "gw3's file still differs"
    );

    // gw3's admin copies the primary's cluster-wide sections and mapping files and reloads:
    // the conflict clears.
    copy_dir(&maps, &dir.path().join("gw3").join("maps"));
    let fixed = std::fs::read_to_string(&p1)
        .expect("read")
        .replace("id = \"gw1\"", "id = \"gw3\"")
        .replace("gw1-dialback-secret", "gw3-dialback-secret");
    std::fs::write(&p3, fixed).expect("write");
    gw3.signal("HUP").expect("SIGHUP");
    wait_for(&[&gw3], "the conflict cleared on gw3", |s| {
        !raised(s, "ClusterConfigConflict")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_missing_from_the_primarys_peers_and_a_second_primary_are_alarmed() {
    let etcd = Etcd::start(3).expect("three-member etcd");
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = "mismatch.test";
    // The primary's peer list forgot gw2.
    let p1 = write(
        dir.path(),
        "gw1",
        &node_toml_with(
            "gw1",
            &etcd,
            &["partner.test"],
            "",
            "gw1",
            &["gw1", "gw3"],
            cluster,
        ),
    );
    let p2 = write(
        dir.path(),
        "gw2",
        &node_toml_with("gw2", &etcd, &["partner.test"], "", "gw1", &PEERS, cluster),
    );
    let gw1 = Legate::start(&p1, &["admin"]).expect("gw1");
    let gw2 = Legate::start(&p2, &["admin"]).expect("gw2");
    let s = wait_for(&[&gw2], "ClusterNodeNotInPeerList on gw2", |s| {
        raised(s, "ClusterNodeNotInPeerList")
    })
    .await;
    let alarm = s[0]["alarms"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == "ClusterNodeNotInPeerList"))
        .cloned()
        .unwrap_or_default();
    assert!(alarm.to_string().contains("the primary's"), "{alarm:#}");
    // It still runs the primary's configuration.
    assert_eq!(
        record(&s[0], "gw2")["in_sync"],
        true,
        "{:#}",
        s[0]["cluster"]
    );

    // gw3 believes it is the primary: it publishes, gw2 keeps what it runs and both gw1 and
    // gw2 say the primaries differ.
    let p3 = write(
        dir.path(),
        "gw3",
        &node_toml_with("gw3", &etcd, &["other.test"], "", "gw3", &PEERS, cluster),
    );
    let gw3 = Legate::start(&p3, &["admin"]).expect("gw3");
    let s = wait_for(
        &[&gw1, &gw2],
        "ClusterPrimaryMismatch on gw1 and gw2",
        |s| raised(s, "ClusterPrimaryMismatch"),
    )
    .await;
    assert_eq!(
        domains(&s[1]),
        ["partner.test"],
        "gw2 keeps the configuration of gw1"
    );
    assert!(
        record(&s[1], "gw2")["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("published by `gw3`")),
        "{:#}",
        s[1]["cluster"]
    );
    drop(gw3);
}

/// Without etcd quorum a change on the primary is applied there but cannot be published: the
/// primary says so (`ClusterReplicationFailed`, the reload itself succeeds), and once quorum
/// returns the publication is retried by itself and the subordinate takes the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_without_quorum_reaches_the_subordinates_when_quorum_returns() {
    let mut etcd = Etcd::start(3).expect("three-member etcd");
    let dir = tempfile::tempdir().expect("temp dir");
    let peers = ["gw1", "gw2"];
    let toml = |id: &str, partners: &[&str]| {
        node_toml_with(id, &etcd, partners, "", "gw1", &peers, "quorum-cfg.test")
    };
    let p1 = write(dir.path(), "gw1", &toml("gw1", &["partner.test"]));
    let p2 = write(dir.path(), "gw2", &toml("gw2", &["partner.test"]));
    let gw1 = Legate::start(&p1, &["admin"]).expect("gw1");
    let gw2 = Legate::start(&p2, &["admin"]).expect("gw2");
    wait_for(&[&gw1, &gw2], "both in sync", |s| {
        let d = primary_digest(s);
        d.is_some()
            && peers
                .iter()
                .all(|n| record(s, n)["applied_digest"].as_str() == d.as_deref())
    })
    .await;

    let edited = toml("gw1", &["partner.test", "added.test"]);
    etcd.stop(1);
    etcd.stop(2);
    std::fs::write(&p1, edited).expect("edit");
    gw1.signal("HUP").expect("SIGHUP");
    wait_for(
        &[&gw1],
        "applied on the primary, publication refused",
        |s| domains(s).contains(&"added.test".to_string()) && raised(s, "ClusterReplicationFailed"),
    )
    .await;
    assert_eq!(
        domains(&status(&gw2).await),
        ["partner.test"],
        "not replicated without quorum"
    );

    etcd.restart(1).expect("member 1 back");
    etcd.restart(2).expect("member 2 back");
    wait_for(
        &[&gw2],
        "the subordinate takes the retried publication",
        |s| domains(s).contains(&"added.test".to_string()),
    )
    .await;
    wait_for(&[&gw1], "the primary's alarm clears", |s| {
        !raised(s, "ClusterReplicationFailed")
    })
    .await;
}
