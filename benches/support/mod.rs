//! What the benches that start the real `legate run` binary share: the child guard, the
//! `legate: listening <name> <addr>` reader, a XEP-0114 home node that only counts
//! `<message/>`s, the admin `/metrics` scrape, and the legate process's CPU and peak RSS from
//! /proc. Written once here so `flood.rs` and `sip_pager.rs` measure the same way.

// Each bench uses a subset of these.
#![allow(dead_code)]

pub mod etcd;
pub mod sipp;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use legate::xmpp::stream::{StreamEvent, StreamFramer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The running `legate run` child; killed on every exit path (by its own handle: never by name).
pub struct Legate {
    child: Child,
    addrs: HashMap<String, SocketAddr>,
}

impl Legate {
    /// Starts `legate run --config <cfg>` (log level warn) and waits until it announced every
    /// listener in `wanted`. The binary is the one cargo built, unless `LEGATE_BIN` names
    /// another (to compare two builds under the same load).
    pub async fn start(cfg: &Path, wanted: &[&str]) -> Result<Legate> {
        let bin =
            std::env::var_os("LEGATE_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_legate").into());
        let mut child = Command::new(bin)
            .args(["run", "--config"])
            .arg(cfg)
            // LEGATE_BENCH_LOG (e.g. `info,legate::cluster=debug`) to see what a run did.
            .env(
                "LEGATE_LOG",
                std::env::var("LEGATE_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting legate")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"));
        // Guard first, so the child dies even if its stdout is unusable.
        let mut legate = Legate {
            child,
            addrs: HashMap::new(),
        };
        let stdout = stdout?;
        let wanted: Vec<String> = wanted.iter().map(|s| s.to_string()).collect();
        legate.addrs = tokio::task::spawn_blocking(move || listening(stdout, &wanted)).await??;
        Ok(legate)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address the listener `name` announced (it was in `wanted`).
    pub fn addr(&self, name: &str) -> Result<SocketAddr> {
        self.addrs
            .get(name)
            .copied()
            .ok_or_else(|| anyhow!("legate did not announce {name}"))
    }

    /// Waits (at most 30 s) until the admin endpoint reports the component link up.
    pub async fn wait_component_link(&self) -> Result<()> {
        let admin = self.addr("admin")?;
        let t0 = Instant::now();
        while !metrics(admin)
            .await?
            .contains("legate_component_links_up 1")
        {
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("the component link did not come up");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }
}

impl Drop for Legate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `legate: listening <name> <addr>` lines until every listener in `wanted` is known.
fn listening(stdout: ChildStdout, wanted: &[String]) -> Result<HashMap<String, SocketAddr>> {
    let mut found = HashMap::new();
    let mut reader = BufReader::new(stdout);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("legate exited before announcing its listeners");
        }
        let mut w = line.split_whitespace();
        if let (Some("legate:"), Some("listening"), Some(name), Some(addr)) =
            (w.next(), w.next(), w.next(), w.next())
        {
            if wanted.iter().any(|n| n == name) {
                found.insert(name.to_string(), addr.parse()?);
            }
        }
        if wanted.iter().all(|n| found.contains_key(n)) {
            // Keep draining stdout so legate never blocks on a full pipe.
            std::thread::spawn(move || for _ in reader.lines() {});
            return Ok(found);
        }
    }
}

/// A home node that accepts component connections and counts `<message/>`s (optionally
/// reading slowly, to show the sender being slowed).
pub async fn home_node(l: TcpListener, received: Arc<AtomicUsize>, slow: bool) {
    while let Ok((sock, _)) = l.accept().await {
        let received = received.clone();
        tokio::spawn(async move {
            if let Err(e) = component(sock, received, slow).await {
                eprintln!("home node connection ended: {e}");
            }
        });
    }
}

async fn component(mut sock: TcpStream, received: Arc<AtomicUsize>, slow: bool) -> Result<()> {
    let mut framer = StreamFramer::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut open = false;
    loop {
        loop {
            match framer.next_event() {
                Ok(Some(StreamEvent::StreamOpen(h))) if !open => {
                    open = true;
                    let to = h.to().unwrap_or_default().to_string();
                    sock.write_all(
                        format!(
                            "<stream:stream xmlns='jabber:component:accept' \
                             xmlns:stream='http://etherx.jabber.org/streams' id='flood1' \
                             from='{to}'>"
                        )
                        .as_bytes(),
                    )
                    .await?;
                }
                Ok(Some(StreamEvent::Stanza(s))) => match s.name() {
                    "handshake" => sock.write_all(b"<handshake/>").await?,
                    "message" => {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                },
                Ok(Some(StreamEvent::StreamClose)) => return Ok(()),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => bail!("bad XML from legate: {e}"),
            }
        }
        if slow {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let n = sock.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        framer.push(buf.get(..n).unwrap_or_default());
    }
}

/// GET /metrics from the admin endpoint.
pub async fn metrics(admin: SocketAddr) -> Result<String> {
    get(admin, "/metrics").await
}

/// One GET on the admin endpoint: the whole response, headers included.
pub async fn get(admin: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(admin).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Sum of the samples of `name` whose line contains every one of `labels`.
pub fn sum(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(name))
        .filter(|l| labels.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// utime + stime of `pid` in seconds (Linux /proc; USER_HZ is 100).
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Peak resident set of `pid` in KiB (VmHWM).
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// A numeric setting of a bench from the environment, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
