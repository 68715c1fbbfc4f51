//! User sync between two clusters (issue 13): two single-node clusters, each the real `legate
//! run` (embedded store), cluster B with `IC_USERS` users (default 100 000, listed in its
//! `[[home_node]] users`), cluster A peered with it over the intercluster link (plain TCP here:
//! a TLS handshake per sync adds about a millisecond, not a per-user cost).
//!
//! Measured on A (its `legate_intercluster_sync_seconds` histogram: dial, transfer, and the
//! writes to A's store of what changed):
//! - **first full**: A's first sync at its start, every user new to A's store;
//! - **full again**: `force-sync --full`: the whole list is sent and compared, nothing written;
//! - **incremental**: after `IC_CHANGES` users (default 1 000) were pinned on B, only those;
//! - **incremental, nothing new**.
//!
//! `cargo bench --features cluster --bench intercluster_sync`. Bounded: gives up after 300 s.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use support::etcd::free_port;
use support::{env_usize, home_node, metrics, Legate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(300);

fn main() -> Result<()> {
    let users = env_usize("IC_USERS", 100_000);
    let changes = env_usize("IC_CHANGES", 1_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(run(users, changes))
}

fn write_config(
    dir: &Path,
    me: &str,
    port: u16,
    peer: (&str, u16),
    home: (std::net::SocketAddr, usize),
) -> Result<PathBuf> {
    let d = dir.join(me);
    std::fs::create_dir_all(&d)?;
    let mut users = String::new();
    for i in 0..home.1 {
        users.push_str(&format!("\"u{i}@example.com\","));
    }
    let cfg = format!(
        r#"[node]
id = "{me}1"
admin_listen = "127.0.0.1:0"
data_dir = "{data}"
[[local_domain]]
name = "example.com"
[listeners]
sip_tls = "off"
sip_tcp = "off"
xmpp_s2s = "off"
xmpp_s2s_direct_tls = "off"
[[sip.federated_domain]]
name = "partner.com"
system = "lync"
route = "127.0.0.1:9"
[[home_node]]
name = "hn1"
addresses = ["{home}"]
component_secret = "bench-component-secret-1"
users = [{users}]
[intercluster]
name = "{me}"
listen = "127.0.0.1:{port}"
transport = "tcp"
[[intercluster.peer]]
name = "{peer}"
address = "127.0.0.1:{peer_port}"
"#,
        data = d.display(),
        home = home.0,
        peer = peer.0,
        peer_port = peer.1,
    );
    let path = d.join("legate.toml");
    std::fs::write(&path, cfg)?;
    Ok(path)
}

/// The sample of `series` (full name with labels) in a Prometheus text.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// (count, sum) of A's sync histogram for `outcome`.
async fn syncs(a: &Legate, outcome: &str) -> Result<(f64, f64)> {
    let m = metrics(a.addr("admin")?).await?;
    let l = format!("{{outcome=\"{outcome}\"}}");
    Ok((
        value(&m, &format!("legate_intercluster_sync_seconds_count{l}")),
        value(&m, &format!("legate_intercluster_sync_seconds_sum{l}")),
    ))
}

/// Waits until A counted one more `outcome` sync than `before`; the seconds it took.
async fn next_sync(a: &Legate, outcome: &str, before: (f64, f64)) -> Result<f64> {
    let t0 = Instant::now();
    loop {
        let now = syncs(a, outcome).await?;
        if now.0 > before.0 {
            return Ok(now.1 - before.1);
        }
        if syncs(a, "failed").await?.0 > 0.0 {
            bail!("a sync failed (run with LEGATE_BENCH_LOG=info to see why)");
        }
        if t0.elapsed() > LIMIT {
            bail!("no {outcome} sync within {LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn force(a: &Legate, full: bool) -> Result<()> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_legate"));
    cmd.args(["intercluster", "force-sync", "b", "--admin"])
        .arg(a.addr("admin")?.to_string());
    if full {
        cmd.arg("--full");
    }
    let out = cmd.output().context("legate intercluster force-sync")?;
    if !out.status.success() {
        bail!("force-sync: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// `POST path` on an admin endpoint; the status code.
async fn post(admin: std::net::SocketAddr, path: &str) -> Result<u16> {
    let mut s = TcpStream::connect(admin).await?;
    s.write_all(
        format!("POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status line")
}

async fn run(users: usize, changes: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (pa, pb) = (free_port()?, free_port()?);
    let (la, lb) = (
        TcpListener::bind("127.0.0.1:0").await?,
        TcpListener::bind("127.0.0.1:0").await?,
    );
    let (ha, hb) = (la.local_addr()?, lb.local_addr()?);
    tokio::spawn(home_node(la, Arc::new(AtomicUsize::new(0)), false));
    tokio::spawn(home_node(lb, Arc::new(AtomicUsize::new(0)), false));
    let cfg_b = write_config(dir.path(), "b", pb, ("a", pa), (hb, users))?;
    let cfg_a = write_config(dir.path(), "a", pa, ("b", pb), (ha, 0))?;
    let t = Instant::now();
    let b = Legate::start(&cfg_b, &["admin", "intercluster"]).await?;
    println!(
        "cluster B started with {users} users in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let a = Legate::start(&cfg_a, &["admin", "intercluster"]).await?;
    let first = next_sync(&a, "complete", (0.0, 0.0)).await?;
    println!("first full sync ({users} users, all new to A): {first:.3} s");
    let mut full = Vec::new();
    for _ in 0..3 {
        let before = syncs(&a, "complete").await?;
        force(&a, true)?;
        full.push(next_sync(&a, "complete", before).await?);
    }
    println!(
        "full sync again ({users} users, nothing new): {} s",
        full.iter()
            .map(|s| format!("{s:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let admin_b = b.addr("admin")?;
    for i in 0..changes {
        let code = post(
            admin_b,
            &format!("/intercluster/users/add/new{i}@example.com/hn1"),
        )
        .await?;
        if code != 200 {
            bail!("pinning a user on B answered {code}");
        }
    }
    // B's change log follows its store; give it a moment to take the last one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = syncs(&a, "incremental").await?;
    force(&a, false)?;
    let inc = next_sync(&a, "incremental", before).await?;
    println!(
        "incremental sync ({changes} new users of {}): {:.1} ms",
        users + changes,
        inc * 1e3
    );
    let mut none = Vec::new();
    for _ in 0..3 {
        let before = syncs(&a, "incremental").await?;
        force(&a, false)?;
        none.push(next_sync(&a, "incremental", before).await? * 1e3);
    }
    println!(
        "incremental sync, nothing new: {} ms",
        none.iter()
            .map(|s| format!("{s:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "A's peak RSS {} MiB, CPU {:.2} s; B's peak RSS {} MiB",
        support::peak_rss_kib(a.pid()) / 1024,
        support::cpu_secs(a.pid()),
        support::peak_rss_kib(b.pid()) / 1024
    );
    Ok(())
}
