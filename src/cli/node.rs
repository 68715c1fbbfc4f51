//! `legate reload` and `legate drain`: operations on a RUNNING node through its admin endpoint
//! (`POST /reload`; `POST /drain` then `GET /drain` until done). Exit codes: 0 done, 1 refused
//! (reload) or not finished in time (drain), 2 the node could not be reached.

use super::policy::{admin_addr, http};
use serde_json::Value;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn unreachable(cmd: &str, e: impl std::fmt::Display) -> ExitCode {
    eprintln!("legate {cmd}: {e}");
    ExitCode::from(2)
}

/// One admin request whose answer is JSON.
fn call(cmd: &str, addr: &str, method: &str, path: &str) -> Result<(u16, Value), ExitCode> {
    let (code, body) = http(addr, method, path).map_err(|e| unreachable(cmd, e))?;
    let doc = serde_json::from_str(&body).map_err(|_| {
        unreachable(
            cmd,
            format!(
                "the node at {addr} answered {code} without JSON (an older Legate?): {}",
                body.trim()
            ),
        )
    })?;
    Ok((code, doc))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

pub fn reload(admin: Option<&str>, config: Option<&Path>, json: bool) -> ExitCode {
    let addr = match admin_addr(admin, config) {
        Ok(a) => a,
        Err(e) => return unreachable("reload", e),
    };
    let (code, doc) = match call("reload", &addr, "POST", "/reload") {
        Ok(x) => x,
        Err(c) => return c,
    };
    if json {
        println!("{doc}");
    } else if code == 200 {
        let applied = strings(&doc["applied"]);
        println!(
            "reloaded: {}",
            if applied.is_empty() {
                "no change in the configuration".to_string()
            } else {
                format!("changed and in effect: {}", applied.join(", "))
            }
        );
        if doc["certificates_reloaded"] == true {
            println!("certificates: read again; the next TLS handshake serves them");
        }
        for key in strings(&doc["restart_needed"]) {
            println!("needs a restart (the running value stays): {key}");
        }
    } else if code == 422 {
        println!("refused: the running configuration stays in use (alarm ConfigReloadRefused)");
        for p in strings(&doc["problems"]) {
            println!("  {p}");
        }
    } else {
        eprintln!("legate reload: the node answered {code}: {doc}");
    }
    match code {
        200 => ExitCode::SUCCESS,
        422 => ExitCode::from(1),
        _ => ExitCode::from(2),
    }
}

fn progress(doc: &Value) -> String {
    let r = &doc["remaining"];
    format!(
        "{} left (SIP IM sessions {}, foreign watchers {}, our SIP subscriptions {})",
        doc["remaining_total"],
        r["sip_im_sessions"],
        r["sip_foreign_watchers"],
        r["sip_local_subscriptions"]
    )
}

/// Starts the drain, then reports progress each time it changes until nothing is left (`done`)
/// or `wait` passed (0: report once and return).
pub fn drain(admin: Option<&str>, config: Option<&Path>, wait: u64, json: bool) -> ExitCode {
    let addr = match admin_addr(admin, config) {
        Ok(a) => a,
        Err(e) => return unreachable("drain", e),
    };
    let deadline = Instant::now() + Duration::from_secs(wait);
    let mut doc = match call("drain", &addr, "POST", "/drain") {
        Ok((200, d)) => d,
        Ok((code, d)) => return unreachable("drain", format!("the node answered {code}: {d}")),
        Err(c) => return c,
    };
    if !json {
        println!("draining: new SIP sessions and subscriptions and new s2s streams are refused");
    }
    let mut last = String::new();
    loop {
        let line = if json {
            doc.to_string()
        } else {
            progress(&doc)
        };
        if line != last {
            println!("{line}");
            last = line;
        }
        if doc["done"] == true {
            if !json {
                println!("done");
            }
            return ExitCode::SUCCESS;
        }
        if Instant::now() >= deadline {
            if !json {
                println!("not done after {wait} s; the node goes on draining (`legate drain` again to follow)");
            }
            return ExitCode::from(1);
        }
        std::thread::sleep(Duration::from_millis(250));
        doc = match call("drain", &addr, "GET", "/drain") {
            Ok((_, d)) => d,
            Err(c) => return c,
        };
    }
}

/// `legate cluster force-config-update`: the subordinate drops its copy of the primary's
/// configuration and applies the primary's again. Exit codes: 0 applied, 1 refused (or asked
/// of the primary itself), 2 the node cannot be reached.
pub fn force_config_update(admin: Option<&str>, config: Option<&Path>, json: bool) -> ExitCode {
    const CMD: &str = "cluster force-config-update";
    let addr = match admin_addr(admin, config) {
        Ok(a) => a,
        Err(e) => return unreachable(CMD, e),
    };
    let (code, doc) = match call(CMD, &addr, "POST", "/cluster/force-config-update") {
        Ok(x) => x,
        Err(c) => return c,
    };
    if json {
        println!("{doc}");
    } else if code == 200 {
        println!("applied the primary's configuration");
        for key in strings(&doc["restart_needed"]) {
            println!("needs a restart (the running value stays): {key}");
        }
    } else if code == 422 {
        println!(
            "refused: the primary's configuration does not validate here; the running one stays \
             (alarm ClusterReplicationFailed)"
        );
        for p in strings(&doc["problems"]) {
            println!("  {p}");
        }
    } else if let Some(e) = doc["error"].as_str() {
        eprintln!("legate {CMD}: {e}");
    } else {
        eprintln!("legate {CMD}: the node answered {code}: {doc}");
    }
    match code {
        200 => ExitCode::SUCCESS,
        422 | 409 => ExitCode::from(1),
        _ => ExitCode::from(2),
    }
}
