//! `legate intercluster …`: the intercluster peering of a RUNNING node, through its admin
//! endpoint (issue 13). `status` reads `/status` (the `intercluster` member and the sync
//! alarms); `force-sync`, `users add|remove` and `lookup` call the `/intercluster/…` routes.
//! Exit codes: 0 done (status: every peer in sync), 1 refused (status: a peer not in sync),
//! 2 the node cannot be reached.

use super::policy::{admin_addr, encode, http};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

fn unreachable(cmd: &str, text: impl std::fmt::Display) -> ExitCode {
    eprintln!("legate intercluster {cmd}: {text}");
    ExitCode::from(2)
}

pub fn status(admin: Option<&str>, config: Option<&Path>, json: bool) -> ExitCode {
    let addr = match admin_addr(admin, config) {
        Ok(a) => a,
        Err(e) => return unreachable("status", e),
    };
    let doc = match super::status::fetch(&addr) {
        Ok(d) => d,
        Err(e) => return unreachable("status", e),
    };
    let ic = &doc["intercluster"];
    let alarms = super::cluster::raised(&doc, |n| n == legate::intercluster::ALARM.as_str());
    if json {
        println!(
            "{}",
            serde_json::json!({ "intercluster": ic, "alarms": alarms })
        );
    } else {
        print!("{}", render(ic, &alarms));
    }
    if healthy(ic) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn healthy(ic: &Value) -> bool {
    ic.is_object()
        && ic["peers"]
            .as_array()
            .is_some_and(|p| p.iter().all(|p| p["in_sync"] == true))
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn yes(v: &Value) -> &'static str {
    match v.as_bool() {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    }
}

/// The human text (module doc).
pub fn render(ic: &Value, alarms: &[Value]) -> String {
    let mut out = String::new();
    if !ic.is_object() {
        let _ = writeln!(
            out,
            "intercluster peering does not run on this node (intercluster.listen is not set)"
        );
        return out;
    }
    let _ = writeln!(
        out,
        "cluster {} on {} ({}); sync every {} min, stuck after {} s, auto-recovery {}",
        s(&ic["name"]),
        s(&ic["listen"]),
        s(&ic["transport"]),
        s(&ic["sync_interval_mins"]),
        s(&ic["stuck_after_secs"]),
        yes(&ic["auto_recovery"]),
    );
    let _ = writeln!(
        out,
        "sync agent: {}; users we contribute: {}; users known in peer clusters: {}",
        if ic["agent_here"] == true {
            "runs on this node (leader)"
        } else {
            "on the cluster leader"
        },
        s(&ic["users_contributed"]),
        s(&ic["users_known"]),
    );
    let _ = writeln!(out, "peers:");
    for p in ic["peers"].as_array().cloned().unwrap_or_default() {
        let _ = writeln!(
            out,
            "  {} {}: reachable {}, in sync {}, users {}, lists us {}",
            s(&p["name"]),
            s(&p["address"]),
            yes(&p["reachable"]),
            yes(&p["in_sync"]),
            s(&p["users"]),
            yes(&p["listed_by_peer"]),
        );
        let _ = writeln!(
            out,
            "    last sync: start {} end {} outcome {} (last success {}, restarts {})",
            s(&p["last_sync_start"]),
            s(&p["last_sync_end"]),
            s(&p["last_outcome"]),
            s(&p["last_success"]),
            s(&p["restarts"]),
        );
        let _ = writeln!(out, "    certificate: {}", s(&p["certificate"]));
        if p["listed_by_peer"] == false {
            let _ = writeln!(
                out,
                "    the peer no longer lists this cluster: remove it here too, or list us there"
            );
        }
    }
    for c in ic["unlisted_callers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let _ = writeln!(
            out,
            "  {} still lists us but we no longer list it (last call unix {} from {}): remove \
             this cluster from its [[intercluster.peer]], or list it here",
            s(&c["name"]),
            s(&c["last_seen"]),
            s(&c["from"]),
        );
    }
    super::cluster::render_alarms(&mut out, alarms);
    if let Some(n) = ic["not_built_yet"].as_array() {
        let _ = writeln!(
            out,
            "not built yet: {}",
            n.iter().map(s).collect::<Vec<_>>().join("; ")
        );
    }
    out
}

/// One POST or GET whose answer is JSON, printed; exit 0 on 2xx, 1 on a refusal.
fn call(
    cmd: &str,
    admin: Option<&str>,
    config: Option<&Path>,
    method: &str,
    path: &str,
    json: bool,
) -> ExitCode {
    let addr = match admin_addr(admin, config) {
        Ok(a) => a,
        Err(e) => return unreachable(cmd, e),
    };
    let (code, body) = match http(&addr, method, path) {
        Ok(x) => x,
        Err(e) => return unreachable(cmd, e),
    };
    let doc: Value = serde_json::from_str(&body).unwrap_or(Value::String(body.trim().into()));
    if json || (200..300).contains(&code) {
        println!("{doc}");
    } else if let Some(e) = doc["error"].as_str() {
        eprintln!("legate intercluster {cmd}: {e}");
    } else {
        eprintln!("legate intercluster {cmd}: the node answered {code}: {doc}");
    }
    match code {
        200..=299 => ExitCode::SUCCESS,
        400..=499 => ExitCode::from(1),
        _ => ExitCode::from(2),
    }
}

pub fn force_sync(
    admin: Option<&str>,
    config: Option<&Path>,
    peer: Option<&str>,
    full: bool,
    json: bool,
) -> ExitCode {
    let mut path = format!("/intercluster/force-sync?full={full}");
    if let Some(p) = peer {
        path.push_str(&format!("&peer={}", encode(p)));
    }
    call("force-sync", admin, config, "POST", &path, json)
}

pub fn users(
    admin: Option<&str>,
    config: Option<&Path>,
    user: &str,
    home_node: Option<&str>,
    json: bool,
) -> ExitCode {
    let path = match home_node {
        Some(h) => format!("/intercluster/users/add/{}/{}", encode(user), encode(h)),
        None => format!("/intercluster/users/remove/{}", encode(user)),
    };
    call("users", admin, config, "POST", &path, json)
}

pub fn lookup(admin: Option<&str>, config: Option<&Path>, user: &str, json: bool) -> ExitCode {
    let path = format!("/intercluster/lookup/{}", encode(user));
    call("lookup", admin, config, "GET", &path, json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_each_peer_and_the_clusters_we_no_longer_list() {
        let ic = serde_json::json!({
            "name": "a", "listen": "127.0.0.1:7401", "transport": "tls",
            "sync_interval_mins": 30, "stuck_after_secs": 7200, "auto_recovery": true,
            "agent_here": true, "users_contributed": 3, "users_known": 2,
            "peers": [{"name": "b", "address": "gw.b:7401", "reachable": true, "in_sync": false,
                       "users": 2, "listed_by_peer": false, "last_outcome": "failed: x",
                       "certificate": "valid: expires in 30 days"}],
            "unlisted_callers": [{"name": "c", "last_seen": 5, "from": "10.0.0.3:4000"}],
        });
        let t = render(&ic, &[]);
        assert!(
            t.contains("b gw.b:7401: reachable yes, in sync NO, users 2, lists us NO"),
            "{t}"
        );
        assert!(t.contains("no longer lists this cluster"), "{t}");
        assert!(
            t.contains("c still lists us but we no longer list it"),
            "{t}"
        );
        assert!(t.contains("certificate: valid"), "{t}");
        assert!(!healthy(&ic));
        assert!(render(&Value::Null, &[]).contains("does not run"));
    }
}
