//! `legate policy`: a user's consent lists on a running node, through its admin endpoint
//! (`GET /policy/<user>`, `POST /policy/<user>/<op>/<target>`). Arguments are checked here
//! first so a typo never reaches the node. Exit codes: 0 done, 1 the node could not be
//! reached or failed, 2 a bad user or target (refused here or by the node).

use legate::gateway::policy::Target;
use legate::gateway::Address;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// The default `node.admin_listen`.
const DEFAULT_ADMIN: &str = "127.0.0.1:9090";
const TIMEOUT: Duration = Duration::from_secs(5);
/// Longest answer read from the node.
const MAX_ANSWER: u64 = 1 << 20;

/// What `legate policy` was asked.
pub enum Request<'a> {
    Show {
        user: &'a str,
    },
    Change {
        op: &'a str,
        user: &'a str,
        target: &'a str,
    },
}

fn usage_error(text: impl std::fmt::Display) -> ExitCode {
    eprintln!("legate policy: {text}");
    ExitCode::from(2)
}

/// The bearer token `http` sends (`node.admin_token_file` of `--config`, else the
/// `LEGATE_ADMIN_TOKEN` environment variable); set by `admin_addr`, once per command.
static TOKEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// `--admin`, else `node.admin_listen` of `--config`, else the default. Also finds the
/// admin token the requests will carry (see `TOKEN`).
pub(super) fn admin_addr(admin: Option<&str>, config: Option<&Path>) -> Result<String, String> {
    let table = match config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let table: toml::Table =
                toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            Some((path, table))
        }
        None => None,
    };
    let node = table.as_ref().and_then(|(_, t)| t.get("node"));
    let token = match node
        .and_then(|n| n.get("admin_token_file"))
        .and_then(|f| f.as_str())
    {
        Some(file) => {
            // Relative to the configuration file, as the node resolves it.
            let base = config.and_then(Path::parent).unwrap_or(Path::new("."));
            let file = base.join(file);
            let t = std::fs::read_to_string(&file).map_err(|e| {
                format!("cannot read node.admin_token_file {}: {e}", file.display())
            })?;
            Some(t.trim().to_string())
        }
        None => std::env::var("LEGATE_ADMIN_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
    };
    let _ = TOKEN.set(token);
    if let Some(a) = admin {
        return Ok(a.to_string());
    }
    Ok(node
        .and_then(|n| n.get("admin_listen"))
        .and_then(|a| a.as_str())
        .unwrap_or(DEFAULT_ADMIN)
        .to_string())
}

/// Percent-encodes what is not safe in a path segment.
pub(super) fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@+".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One request; the status code and body.
pub(super) fn http(addr: &str, method: &str, path: &str) -> Result<(u16, String), String> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("bad admin address {addr}: {e}"))?
        .collect();
    let first = addrs
        .first()
        .ok_or_else(|| format!("admin address {addr} resolves to nothing"))?;
    let unreachable = |e: std::io::Error| {
        format!(
            "cannot reach the node's admin endpoint at {addr}: {e} (the node must be running: \
             start it with `legate run`, and give its `node.admin_listen` with --admin or --config)"
        )
    };
    let mut s = TcpStream::connect_timeout(first, TIMEOUT).map_err(unreachable)?;
    s.set_read_timeout(Some(TIMEOUT)).map_err(unreachable)?;
    s.set_write_timeout(Some(TIMEOUT)).map_err(unreachable)?;
    let auth = match TOKEN.get() {
        Some(Some(t)) => format!("Authorization: Bearer {t}\r\n"),
        _ => String::new(),
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(unreachable)?;
    let mut raw = String::new();
    s.take(MAX_ANSWER)
        .read_to_string(&mut raw)
        .map_err(unreachable)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("the node at {addr} sent no complete HTTP answer"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("the node at {addr} sent a bad status line"))?;
    Ok((status, body.to_string()))
}

pub fn policy(
    req: Request<'_>,
    admin: Option<&str>,
    config: Option<&Path>,
    json: bool,
) -> ExitCode {
    let user = match &req {
        Request::Show { user } | Request::Change { user, .. } => *user,
    };
    match Address::parse(user) {
        Ok(a) if a.resource.is_none() => {}
        Ok(_) => return usage_error(format!("`{user}` has a resource: give the bare JID")),
        Err(e) => return usage_error(format!("`{user}` is not a user address: {}", e.reason)),
    }
    let (method, path) = match &req {
        Request::Show { .. } => ("GET", format!("/policy/{}", encode(user))),
        Request::Change { op, target, .. } => {
            if let Err(e) = Target::parse(target) {
                return usage_error(e);
            }
            (
                "POST",
                format!("/policy/{}/{op}/{}", encode(user), encode(target)),
            )
        }
    };
    let addr = match admin_addr(admin, config) {
        Ok(a) => a,
        Err(e) => return usage_error(e),
    };
    let (status, body) = match http(&addr, method, &path) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("legate policy: {e}");
            return ExitCode::from(1);
        }
    };
    match status {
        200 => {}
        400 => return usage_error(body.trim()),
        404 | 405 => {
            eprintln!(
                "legate policy: the node at {addr} has no consent endpoint ({status}): is it an older legate?"
            );
            return ExitCode::from(1);
        }
        _ => {
            eprintln!(
                "legate policy: the node refused ({status}): {}",
                body.trim()
            );
            return ExitCode::from(1);
        }
    }
    if json {
        print!("{body}");
        return ExitCode::SUCCESS;
    }
    let doc: serde_json::Value = match serde_json::from_str(&body) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("legate policy: unreadable answer from the node: {e}");
            return ExitCode::from(1);
        }
    };
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_string();
    match req {
        Request::Show { .. } => {
            let entries = doc["entries"].as_array().cloned().unwrap_or_default();
            if entries.is_empty() {
                println!(
                    "{}: no entries (every watcher's request goes to the user)",
                    text(&doc["user"])
                );
            }
            for e in entries {
                println!(
                    "{} {} {} ({})",
                    text(&doc["user"]),
                    text(&e["verdict"]),
                    text(&e["target"]),
                    text(&e["kind"])
                );
            }
        }
        Request::Change { .. } => match doc["verdict"].as_str() {
            Some(v) => println!("{} {v} {}", text(&doc["user"]), text(&doc["target"])),
            None => println!(
                "{} no entry for {}",
                text(&doc["user"]),
                text(&doc["target"])
            ),
        },
    }
    ExitCode::SUCCESS
}
