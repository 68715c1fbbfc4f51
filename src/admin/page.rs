//! The HTML status page (`GET /` on the admin endpoint): the same data as `legate status`
//! (listeners, home-node links with the age of their last failure, partners per protocol,
//! subscriptions, sessions, alarms with their action), rendered on the server from the
//! `/status` document. No script, no external asset (the style is inline), every value
//! HTML-escaped: subjects and failure texts carry peer-controlled strings. The page reloads
//! itself every 10 s (`<meta http-equiv="refresh">`).
//!
//! Each row carries a class (`listener`, `home-link`, `s2s-stream`, `alarm`) and its key
//! values as `data-*` attributes, so a browser test can find them in the DOM.

use serde_json::Value;
use std::fmt::Write;

/// `s` with the five HTML-special characters escaped (safe in text and in quoted attributes).
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => escape(s),
        Value::Null => "-".to_string(),
        other => escape(&other.to_string()),
    }
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn list(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin:.5em 0 1.5em}\
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}\
th{background:#f0f0f0}.down,.critical,.major{color:#b00;font-weight:bold}\
.up{color:#070}.minor,.warning{color:#a60}.cleared{color:#888}";

/// The page for `/status` document `doc`, at Unix time `now` (for "seen N s ago").
pub fn render(doc: &Value, now: u64) -> String {
    let mut o = String::new();
    let node = text(&doc["node"]);
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"10\">\
         <title>legate {node}</title><style>{STYLE}</style></head><body>\n\
         <h1>legate node <span id=\"node\">{node}</span></h1>\n\
         <p>up {} s; local domains: {}</p>\n",
        num(&doc["uptime_secs"]),
        list(&doc["local_domains"])
            .iter()
            .map(text)
            .collect::<Vec<_>>()
            .join(", ")
    );

    if doc["cluster"]["role"].is_string() {
        let _ = writeln!(
            o,
            "<p id=\"cluster\">cluster {}: this node is <b>{}</b>; leader {}; {} live member(s)</p>",
            text(&doc["cluster"]["cluster"]),
            text(&doc["cluster"]["role"]),
            if doc["cluster"]["leader"].is_string() {
                text(&doc["cluster"]["leader"])
            } else {
                "none known".to_string()
            },
            list(&doc["cluster"]["members"]).len()
        );
    }

    let _ = write!(
        o,
        "<h2>Listeners</h2>\n<table id=\"listeners\"><tr><th>listener</th><th>address</th></tr>\n"
    );
    if let Some(a) = doc["admin_listen"].as_str() {
        let _ = writeln!(
            o,
            "<tr class=\"listener\"><td>admin</td><td>{}</td></tr>",
            escape(a)
        );
    }
    for (kind, key) in [("sip tcp", "tcp"), ("sip tls", "tls")] {
        if let Some(a) = doc["sip"]["listeners"][key].as_str() {
            let _ = writeln!(
                o,
                "<tr class=\"listener\"><td>{kind}</td><td>{}</td></tr>",
                escape(a)
            );
        }
    }
    for l in list(&doc["s2s"]["listeners"]) {
        let l = l.as_str().unwrap_or_default();
        let (kind, addr) = l.split_once(' ').unwrap_or(("xmpp", l));
        let _ = writeln!(
            o,
            "<tr class=\"listener\"><td>{}</td><td>{}</td></tr>",
            escape(kind),
            escape(addr)
        );
    }
    o.push_str("</table>\n");

    o.push_str(
        "<h2>Home-node links</h2>\n<table id=\"home-links\"><tr><th>home node</th>\
         <th>domain</th><th>state</th><th>connects</th><th>failures</th>\
         <th>last failure</th></tr>\n",
    );
    let links = list(&doc["component_links"]);
    if links.is_empty() {
        o.push_str("<tr><td colspan=\"6\">none</td></tr>\n");
    }
    for l in &links {
        let up = l["up"].as_bool() == Some(true);
        let last = match l["last_failure_age_secs"].as_u64() {
            Some(age) => format!("{age} s ago: {}", text(&l["last_failure"])),
            None => "-".to_string(),
        };
        let _ = writeln!(
            o,
            "<tr class=\"home-link\" data-home-node=\"{hn}\" data-domain=\"{d}\" data-up=\"{up}\">\
             <td>{hn}</td><td>{d}</td><td class=\"{state}\">{state}</td><td>{}</td><td>{}</td>\
             <td>{last}</td></tr>",
            num(&l["connects"]),
            num(&l["failures"]),
            hn = text(&l["home_node"]),
            d = text(&l["domain"]),
            state = if up { "up" } else { "down" },
        );
    }
    o.push_str("</table>\n");

    o.push_str("<h2>Partners connected</h2>\n<table id=\"partners\"><tr><th>protocol</th><th>connected</th></tr>\n");
    let sip = match doc["sip"]["connections"].as_u64() {
        Some(n) => format!("{n} connections"),
        None => "off".to_string(),
    };
    let _ = writeln!(
        o,
        "<tr class=\"protocol\" data-protocol=\"sip\"><td>SIP</td><td>{sip}</td></tr>"
    );
    let streams = list(&doc["s2s"]["outbound"]);
    let xmpp = if doc["s2s"].is_null() {
        "s2s off".to_string()
    } else {
        let up = streams
            .iter()
            .filter(|p| p["up"].as_bool() == Some(true))
            .count();
        format!("{up} of {} outbound s2s streams up", streams.len())
    };
    let _ = writeln!(
        o,
        "<tr class=\"protocol\" data-protocol=\"xmpp\"><td>XMPP</td><td>{xmpp}</td></tr>\n</table>"
    );
    if !streams.is_empty() {
        o.push_str(
            "<table id=\"s2s-streams\"><tr><th>local</th><th>remote</th><th>state</th>\
             <th>auth</th><th>failures</th><th>last failure</th></tr>\n",
        );
        for p in &streams {
            let up = p["up"].as_bool() == Some(true);
            let _ = writeln!(
                o,
                "<tr class=\"s2s-stream\" data-remote=\"{r}\"><td>{}</td><td>{r}</td>\
                 <td class=\"{state}\">{state}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                text(&p["local"]),
                text(&p["auth"]),
                num(&p["failures"]),
                text(&p["last_failure"]),
                r = text(&p["remote"]),
                state = if up { "up" } else { "down" },
            );
        }
        o.push_str("</table>\n");
    }

    let sip = &doc["sip"];
    let _ = write!(
        o,
        "<h2>Subscriptions and sessions</h2>\n<table id=\"counts\">\
         <tr><td>local SIP subscriptions</td><td id=\"local-subscriptions\">{}</td></tr>\
         <tr><td>foreign watchers</td><td id=\"foreign-watchers\">{}</td></tr>\
         <tr><td>consent requests pending</td><td id=\"consent-pending\">{}</td></tr>\
         <tr><td>IM sessions</td><td id=\"im-sessions\">{}</td></tr></table>\n",
        num(&sip["local_subscriptions"]),
        num(&sip["foreign_watchers"]),
        num(&doc["consent_pending"]),
        num(&sip["im_sessions"]),
    );

    let alarms = list(&doc["alarms"]);
    let raised = alarms
        .iter()
        .filter(|a| a["raised"].as_bool() == Some(true))
        .count();
    let _ = write!(
        o,
        "<h2>Alarms</h2>\n<p id=\"alarm-summary\">{raised} raised, {} cleared</p>\n\
         <table id=\"alarms\"><tr><th>severity</th><th>alarm</th><th>subject</th><th>detail</th>\
         <th>count</th><th>first seen</th><th>last seen</th><th>action</th></tr>\n",
        alarms.len() - raised
    );
    for a in &alarms {
        let is_raised = a["raised"].as_bool() == Some(true);
        let sev = text(&a["severity"]);
        let _ = writeln!(
            o,
            "<tr class=\"alarm {state}\" data-name=\"{name}\" data-subject=\"{subject}\" \
             data-raised=\"{is_raised}\"><td class=\"{sev}\">{sev}</td><td>{name}</td>\
             <td>{subject}</td><td>{}</td><td>{}</td><td>{} s ago</td><td>{} s ago</td>\
             <td>{}</td></tr>",
            text(&a["detail"]),
            num(&a["count"]),
            now.saturating_sub(num(&a["first_seen"])),
            now.saturating_sub(num(&a["last_seen"])),
            text(&a["action"]),
            state = if is_raised { "raised" } else { "cleared" },
            name = text(&a["name"]),
            subject = text(&a["subject"]),
        );
    }
    o.push_str("</table>\n<p><a href=\"/status\">/status</a> (JSON) · <a href=\"/alarms\">/alarms</a> · <a href=\"/metrics\">/metrics</a></p>\n</body></html>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped_and_rows_are_marked() {
        let doc = serde_json::json!({
            "node": "gw<1>", "uptime_secs": 7, "local_domains": ["example.com"],
            "component_links": [{"home_node": "hn", "domain": "p.com", "up": false,
                "connects": 0, "failures": 4, "last_failure": "connect: <refused> & \"x\"",
                "last_failure_age_secs": 2}],
            "alarms": [{"name": "HomeNodeLinkDown", "severity": "critical", "raised": true,
                "subject": "hn/p.com", "detail": "<script>alert(1)</script>", "count": 3,
                "first_seen": 90, "last_seen": 99, "action": "Check it's up."}],
        });
        let page = render(&doc, 100);
        assert!(!page.contains("<script>"), "{page}");
        assert!(
            page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{page}"
        );
        assert!(page.contains("gw&lt;1&gt;"), "{page}");
        assert!(
            page.contains("2 s ago: connect: &lt;refused&gt; &amp; &quot;x&quot;"),
            "{page}"
        );
        assert!(
            page.contains(
                "class=\"home-link\" data-home-node=\"hn\" data-domain=\"p.com\" data-up=\"false\""
            ),
            "{page}"
        );
        assert!(page.contains("class=\"alarm raised\" data-name=\"HomeNodeLinkDown\""));
        assert!(page.contains("10 s ago</td><td>1 s ago"), "{page}");
        assert!(page.contains("Check it&#39;s up."), "{page}");
        assert!(
            page.contains("s2s off") && page.contains("<td>off</td>"),
            "{page}"
        );
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "no external asset"
        );
    }

    #[test]
    fn a_cluster_node_shows_its_role_escaped() {
        let doc = serde_json::json!({
            "node": "gw2", "uptime_secs": 1,
            "cluster": {"cluster": "gw<x>.test", "role": "FOLLOWER", "leader": "gw1",
                "members": [{"id": "gw1"}, {"id": "gw2"}]},
        });
        let page = render(&doc, 10);
        assert!(
            page.contains("cluster gw&lt;x&gt;.test: this node is <b>FOLLOWER</b>; leader gw1; 2 live member(s)"),
            "{page}"
        );
        let single = render(&serde_json::json!({"node": "gw1"}), 10);
        assert!(!single.contains("id=\"cluster\""));
    }
}
