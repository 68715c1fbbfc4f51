//! `legate status`: the running node at a glance, read from its admin endpoint's `/status`
//! (listeners, home-node links, partners per protocol, subscriptions, sessions, alarms).
//! Exit codes: 0 no critical or major alarm raised, 1 one is, 2 the node cannot be reached
//! (or answered something unreadable).

use super::policy::{admin_addr, http};
use serde_json::Value;
use std::path::Path;
use std::process::ExitCode;
use std::time::SystemTime;

fn unreachable(text: impl std::fmt::Display) -> ExitCode {
    eprintln!("legate status: {text}");
    ExitCode::from(2)
}

/// True when `doc` has a raised alarm of severity critical or major.
fn has_serious_alarm(doc: &Value) -> bool {
    doc["alarms"].as_array().is_some_and(|a| {
        a.iter().any(|x| {
            x["raised"].as_bool() == Some(true)
                && matches!(x["severity"].as_str(), Some("critical" | "major"))
        })
    })
}

/// The node's `/status` document, or why it could not be read (for `legate status` and
/// `legate cluster status`).
pub(super) fn fetch(addr: &str) -> Result<Value, String> {
    let body = match http(addr, "GET", "/status")? {
        (200, body) => body,
        (401, _) => {
            return Err(format!(
                "the node at {addr} wants its admin token (401): give --config with the node's \
                 configuration (node.admin_token_file), or set LEGATE_ADMIN_TOKEN"
            ))
        }
        (code, body) => {
            return Err(format!(
                "the node at {addr} answered {code} to GET /status: {}",
                body.trim()
            ))
        }
    };
    serde_json::from_str(&body).map_err(|e| format!("unreadable /status from {addr}: {e}"))
}

pub fn status(admin: Option<&str>, config: Option<&Path>, json: bool) -> ExitCode {
    let addr = match admin_addr(admin, config) {
        Ok(a) => a,
        Err(e) => return unreachable(e),
    };
    let doc = match fetch(&addr) {
        Ok(d) => d,
        Err(e) => return unreachable(e),
    };
    if json {
        println!("{doc}");
    } else {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        print!("{}", render(&doc, &addr, now));
    }
    if has_serious_alarm(&doc) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// The human text of a `/status` document read from `addr` at Unix time `now`.
fn render(doc: &Value, addr: &str, now: u64) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "node {}  up {} s  (admin {addr})",
        text(&doc["node"]),
        num(&doc["uptime_secs"])
    );
    if doc["draining"] == true {
        let _ = writeln!(
            o,
            "DRAINING (maintenance mode): {}",
            if doc["drain"]["done"] == true {
                "done, nothing left".to_string()
            } else {
                format!("{} left", num(&doc["drain"]["remaining_total"]))
            }
        );
    }
    if let Some(role) = doc["cluster"]["role"].as_str() {
        let live = doc["cluster"]["members"].as_array().map_or(0, Vec::len);
        let _ = writeln!(
            o,
            "cluster {}: {role}, leader {}, {live} live member(s)  (`legate cluster status` for more)",
            text(&doc["cluster"]["cluster"]),
            doc["cluster"]["leader"].as_str().unwrap_or("none known"),
        );
    }
    let _ = writeln!(o, "\nlisteners:");
    let _ = writeln!(o, "  admin      {addr}");
    for (kind, key) in [("sip tcp", "tcp"), ("sip tls", "tls")] {
        if let Some(a) = doc["sip"]["listeners"][key].as_str() {
            let _ = writeln!(o, "  {kind:<10} {a}");
        }
    }
    for l in doc["s2s"]["listeners"].as_array().into_iter().flatten() {
        let _ = writeln!(o, "  {}", text(l));
    }

    let _ = writeln!(o, "\nhome-node links:");
    let links = doc["component_links"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if links.is_empty() {
        let _ = writeln!(o, "  none");
    }
    for l in &links {
        let state = if l["up"].as_bool() == Some(true) {
            "up"
        } else {
            "DOWN"
        };
        let mut line = format!(
            "  {} / {}  {state}  connects {} failures {}",
            text(&l["home_node"]),
            text(&l["domain"]),
            num(&l["connects"]),
            num(&l["failures"])
        );
        if let Some(age) = l["last_failure_age_secs"].as_u64() {
            let _ = write!(
                line,
                "  last failure {age} s ago: {}",
                text(&l["last_failure"])
            );
        }
        let _ = writeln!(o, "{line}");
    }

    let _ = writeln!(o, "\npartners connected:");
    match doc["sip"]["connections"].as_u64() {
        Some(n) => {
            let _ = writeln!(o, "  sip   {n} connections");
        }
        None => {
            let _ = writeln!(o, "  sip   off");
        }
    }
    let s2s = doc["s2s"]["outbound"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let up: Vec<String> = s2s
        .iter()
        .filter(|p| p["up"].as_bool() == Some(true))
        .map(|p| text(&p["remote"]))
        .collect();
    if doc["s2s"].is_null() {
        let _ = writeln!(o, "  xmpp  s2s off");
    } else {
        let _ = writeln!(
            o,
            "  xmpp  {} of {} outbound s2s streams up{}",
            up.len(),
            s2s.len(),
            if up.is_empty() {
                String::new()
            } else {
                format!(": {}", up.join(", "))
            }
        );
    }

    let sip = &doc["sip"];
    let _ = writeln!(
        o,
        "\nsubscriptions: {} local SIP, {} foreign watchers; consent requests pending {}",
        num(&sip["local_subscriptions"]),
        num(&sip["foreign_watchers"]),
        num(&doc["consent_pending"])
    );
    let _ = writeln!(o, "sessions: {} IM sessions", num(&sip["im_sessions"]));

    let alarms = doc["alarms"].as_array().cloned().unwrap_or_default();
    let raised: Vec<&Value> = alarms
        .iter()
        .filter(|a| a["raised"].as_bool() == Some(true))
        .collect();
    let _ = writeln!(
        o,
        "\nalarms: {} raised, {} cleared",
        raised.len(),
        alarms.len() - raised.len()
    );
    for a in raised {
        let _ = writeln!(
            o,
            "  {} {} {}: {}",
            text(&a["severity"]).to_uppercase(),
            text(&a["name"]),
            text(&a["subject"]),
            text(&a["detail"])
        );
        let _ = writeln!(
            o,
            "    raised {} time(s); first seen {} s ago, last seen {} s ago",
            num(&a["count"]),
            now.saturating_sub(num(&a["first_seen"])),
            now.saturating_sub(num(&a["last_seen"]))
        );
        let _ = writeln!(o, "    action: {}", text(&a["action"]));
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raised_major_or_critical_alarm_is_serious_a_cleared_or_minor_one_is_not() {
        let doc = |sev: &str, raised: bool| serde_json::json!({"alarms": [{"name": "X", "severity": sev, "raised": raised}]});
        assert!(has_serious_alarm(&doc("critical", true)));
        assert!(has_serious_alarm(&doc("major", true)));
        assert!(!has_serious_alarm(&doc("critical", false)));
        assert!(!has_serious_alarm(&doc("minor", true)));
        assert!(!has_serious_alarm(&serde_json::json!({})));
    }

    #[test]
    fn text_shows_down_links_with_failure_age_and_alarm_actions() {
        let doc = serde_json::json!({
            "node": "gw1", "uptime_secs": 5,
            "component_links": [{"home_node": "hn", "domain": "p.com", "up": false,
                "connects": 0, "failures": 4, "last_failure": "connect: refused",
                "last_failure_age_secs": 2}],
            "alarms": [{"name": "HomeNodeLinkDown", "severity": "critical", "raised": true,
                "subject": "hn/p.com", "detail": "down", "count": 3, "first_seen": 90,
                "last_seen": 99, "action": "Check the home node."}],
        });
        let t = render(&doc, "127.0.0.1:9", 100);
        assert!(t.contains("hn / p.com  DOWN"), "{t}");
        assert!(t.contains("last failure 2 s ago: connect: refused"), "{t}");
        assert!(
            t.contains("CRITICAL HomeNodeLinkDown hn/p.com: down"),
            "{t}"
        );
        assert!(t.contains("first seen 10 s ago, last seen 1 s ago"), "{t}");
        assert!(t.contains("xmpp  s2s off"), "{t}");
        assert!(t.contains("action: Check the home node."), "{t}");
        assert!(t.contains("sip   off"), "{t}");
        assert!(
            !t.contains("cluster "),
            "a single node says nothing of a cluster: {t}"
        );
    }

    #[test]
    fn a_cluster_node_shows_its_role_and_the_leader() {
        let doc = serde_json::json!({
            "node": "gw2", "uptime_secs": 5,
            "cluster": {"cluster": "gw.test", "role": "FOLLOWER", "leader": "gw1",
                "members": [{"id": "gw1"}, {"id": "gw2"}]},
        });
        let t = render(&doc, "127.0.0.1:9", 100);
        assert!(
            t.contains("cluster gw.test: FOLLOWER, leader gw1, 2 live member(s)"),
            "{t}"
        );
    }
}
