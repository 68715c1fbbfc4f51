//! `legate cluster status`: this node's place in its cluster, like seed 003's `xmpp cluster
//! status` — role (LEADER/FOLLOWER/DETACHED), the peers with the leader marked and which are
//! live, the last change of role, the TLS material in use, etcd, and the cluster alarms —
//! read from the node's `/status`. Exit codes: 0 in a healthy cluster (a leader is known and
//! this node is attached), 1 not (no leader, detached, or not clustered), 2 unreachable.

use super::policy::admin_addr;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

fn unreachable(text: impl std::fmt::Display) -> ExitCode {
    eprintln!("legate cluster status: {text}");
    ExitCode::from(2)
}

pub fn status(admin: Option<&str>, config: Option<&Path>, json: bool) -> ExitCode {
    let addr = match admin_addr(admin, config) {
        Ok(a) => a,
        Err(e) => return unreachable(e),
    };
    let doc = match super::status::fetch(&addr) {
        Ok(d) => d,
        Err(e) => return unreachable(e),
    };
    let cluster = &doc["cluster"];
    let alarms = raised(&doc, |n| n.starts_with("Cluster"));
    if json {
        println!(
            "{}",
            serde_json::json!({ "cluster": cluster, "alarms": alarms })
        );
    } else {
        print!("{}", render(cluster, &alarms, &doc["node"]));
    }
    if healthy(cluster) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The raised alarms of a `/status` document whose name `wanted` picks.
pub(super) fn raised(doc: &Value, wanted: impl Fn(&str) -> bool) -> Vec<Value> {
    doc["alarms"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|x| {
                    x["raised"].as_bool() == Some(true) && x["name"].as_str().is_some_and(&wanted)
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

fn healthy(c: &Value) -> bool {
    c.is_object() && c["role"] != "DETACHED" && c["leader"].is_string()
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

/// The human text (module doc).
pub fn render(c: &Value, alarms: &[Value], node: &Value) -> String {
    let mut out = String::new();
    if !c.is_object() {
        let _ = writeln!(
            out,
            "node {}: not in a cluster (cluster.store is \"memory\": it runs alone)",
            s(node)
        );
        return out;
    }
    let _ = writeln!(
        out,
        "cluster {}: this node {} is {} (since unix {}: {})",
        s(&c["cluster"]),
        s(&c["node"]),
        s(&c["role"]),
        c["last_change"].as_u64().unwrap_or(0),
        s(&c["last_change_text"]),
    );
    let leader = c["leader"].as_str();
    let _ = writeln!(out, "leader: {}", leader.unwrap_or("none known"));
    let live: Vec<&str> = c["members"]
        .as_array()
        .map(|m| m.iter().filter_map(|x| x["id"].as_str()).collect())
        .unwrap_or_default();
    let _ = writeln!(out, "peers:");
    let configured = c["configured_peers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for p in &configured {
        let id = s(&p["id"]);
        let _ = writeln!(
            out,
            "  {} {:<16} {:<24} {:<10} {}{}",
            if Some(id) == leader { "*" } else { " " },
            id,
            s(&p["address"]),
            if p["federation"].as_bool() == Some(false) {
                "no-fed"
            } else {
                "federation"
            },
            if live.contains(&id) {
                "live"
            } else {
                "NOT LIVE"
            },
            if Some(id) == leader { " (LEADER)" } else { "" },
        );
    }
    // A live member this node does not list: another node's configuration differs.
    for id in &live {
        if !configured.iter().any(|p| p["id"].as_str() == Some(id)) {
            let _ = writeln!(
                out,
                "    {id:<16} live, but not in this node's cluster.peers"
            );
        }
    }
    let _ = writeln!(
        out,
        "etcd: {} (lease TTL {} s; lease losses {}; elections won here {})",
        c["etcd_endpoints"]
            .as_array()
            .map(|e| e.iter().map(s).collect::<Vec<_>>().join(", "))
            .unwrap_or_default(),
        c["lease_ttl_secs"].as_u64().unwrap_or(0),
        c["lease_losses"].as_u64().unwrap_or(0),
        c["elections_won"].as_u64().unwrap_or(0),
    );
    let tls = &c["tls"];
    let _ = writeln!(
        out,
        "tls: certificate {}, key {}, trust bundle {}",
        s(&tls["cert"]),
        s(&tls["key"]),
        s(&tls["trust_bundle"])
    );
    let _ = writeln!(out, "peer link tls: {}", s(&tls["peer_verify"]));
    if let Some(links) = c["links"].as_array().filter(|l| !l.is_empty()) {
        let _ = writeln!(out, "component links (home node/domain: holder):");
        for l in links {
            let holder = l["holder"].as_str().filter(|h| !h.is_empty());
            let _ = writeln!(
                out,
                "  {:<40} {}",
                s(&l["link"]),
                holder.unwrap_or("not settled")
            );
        }
    }
    if let Some(n) = c["not_built_yet"].as_array() {
        let _ = writeln!(
            out,
            "not built yet: {}",
            n.iter().map(s).collect::<Vec<_>>().join("; ")
        );
    }
    render_alarms(&mut out, alarms);
    out
}

/// The raised alarms of a status text, each with what to do (also `legate intercluster
/// status`'s).
pub(super) fn render_alarms(out: &mut String, alarms: &[Value]) {
    if alarms.is_empty() {
        let _ = writeln!(out, "alarms: none");
    } else {
        let _ = writeln!(out, "alarms:");
        for a in alarms {
            let _ = writeln!(
                out,
                "  {} [{}] {}: {}\n    do: {}",
                s(&a["name"]),
                s(&a["severity"]),
                s(&a["subject"]),
                s(&a["detail"]),
                s(&a["action"])
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_the_leader_and_peers_that_are_not_live() {
        let c = serde_json::json!({
            "cluster": "gw.test", "node": "gw2", "role": "FOLLOWER", "leader": "gw1",
            "last_change": 10, "last_change_text": "joined as follower",
            "members": [{"id": "gw1"}, {"id": "gw2"}, {"id": "gw9"}],
            "configured_peers": [
                {"id": "gw1", "address": "10.0.0.1:7400", "federation": true},
                {"id": "gw2", "address": "10.0.0.2:7400", "federation": true},
                {"id": "gw3", "address": "10.0.0.3:7400", "federation": false}
            ],
            "etcd_endpoints": ["http://127.0.0.1:2379"], "lease_ttl_secs": 5,
            "tls": {"cert": "/etc/legate/gw2.pem"}
        });
        let t = render(&c, &[], &serde_json::json!("gw2"));
        assert!(t.contains("this node gw2 is FOLLOWER"), "{t}");
        assert!(
            t.lines()
                .any(|l| l.starts_with("  * gw1") && l.ends_with("live (LEADER)")),
            "{t}"
        );
        assert!(
            t.lines()
                .any(|l| l.contains("gw3") && l.contains("no-fed") && l.contains("NOT LIVE")),
            "{t}"
        );
        assert!(
            t.contains("gw9") && t.contains("not in this node's cluster.peers"),
            "{t}"
        );
        assert!(t.contains("certificate /etc/legate/gw2.pem"), "{t}");
        assert!(healthy(&c));
    }

    #[test]
    fn a_detached_node_or_no_cluster_is_not_healthy() {
        assert!(!healthy(
            &serde_json::json!({"role": "DETACHED", "leader": "gw1"})
        ));
        assert!(!healthy(
            &serde_json::json!({"role": "FOLLOWER", "leader": null})
        ));
        assert!(!healthy(&Value::Null));
        let t = render(&Value::Null, &[], &serde_json::json!("local"));
        assert!(t.contains("not in a cluster"), "{t}");
    }
}
