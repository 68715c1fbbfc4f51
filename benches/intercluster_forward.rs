//! Forwarding overhead between two clusters (issue 13 §3): pager MESSAGEs from sipp (Debian
//! `sip-tester`) over plain TCP to a user of cluster B, sent either straight to B's SIP edge or
//! to cluster A's, which forwards them to B over the intercluster link (gRPC, plain TCP here:
//! mutual TLS costs one handshake per peer channel, not per message). Two single-node clusters,
//! each the real `legate run` (release, embedded store); B's home node is a XEP-0114 component
//! in this process that counts `<message/>`s; A's home node counts too (it must get none).
//!
//! - **straight to B**: the baseline;
//! - **through A**: A routes each MESSAGE to `Link::Intercluster`, its forwarder batches them
//!   into `Forward` calls, B routes them to its home node.
//!
//! Reported per phase: delivery rate and the legate processes' CPU per 1 000 MESSAGEs (both
//! processes summed), and for "through A" the mean `Forward` round trip and batch size from A's
//! `legate_intercluster_forward_seconds`. On a 2-core machine that also runs sipp and the home
//! nodes, the CPU figure is the overhead; the rate is bounded by sipp and the machine.
//!
//! `cargo bench --features cluster --bench intercluster_forward` (env `IC_MESSAGES` per phase,
//! default 40 000; `IC_WINDOW`, default 200; `IC_RATE`, default 20 000/s). Bounded: each phase
//! gives up after 180 s.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use support::etcd::free_port;
use support::sipp::{self, sipp_program, SCENARIO};
use support::{cpu_secs, env_usize, home_node, metrics, Legate};
use tokio::net::TcpListener;

const LIMIT: Duration = Duration::from_secs(180);

fn main() -> Result<()> {
    let total = env_usize("IC_MESSAGES", 40_000);
    let window = env_usize("IC_WINDOW", 200);
    let rate = env_usize("IC_RATE", 20_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(run(total, window, rate))
}

/// Cluster `me`'s configuration: `users` on its home node, peered with `peer`.
fn write_config(
    dir: &Path,
    me: &str,
    port: u16,
    peer: (&str, u16),
    home: SocketAddr,
    users: &str,
) -> Result<PathBuf> {
    let d = dir.join(me);
    std::fs::create_dir_all(&d)?;
    // The route's port is never dialled (every MESSAGE is inbound); only its address matters.
    let cfg = format!(
        r#"[node]
id = "{me}1"
admin_listen = "127.0.0.1:0"
data_dir = "{data}"
[[local_domain]]
name = "example.com"
[listeners]
sip_tls = "off"
sip_tcp = "127.0.0.1:0"
xmpp_s2s = "off"
xmpp_s2s_direct_tls = "off"
[[sip.federated_domain]]
name = "partner.test"
system = "lync"
route = "127.0.0.1:5999"
[[home_node]]
name = "hn1"
addresses = ["{home}"]
component_secret = "forward-component-secret-0123"
default_system = "xmpp"
users = [{users}]
[intercluster]
name = "{me}"
listen = "127.0.0.1:{port}"
transport = "tcp"
sync_interval_mins = 1440
[[intercluster.peer]]
name = "{peer}"
address = "127.0.0.1:{peer_port}"
"#,
        data = d.display(),
        peer = peer.0,
        peer_port = peer.1,
    );
    let path = d.join("legate.toml");
    std::fs::write(&path, cfg)?;
    Ok(path)
}

/// Sends `total` MESSAGEs to `target` (one sipp) and waits until B's home node counted them;
/// (seconds, CPU seconds of `pids`).
#[allow(clippy::too_many_arguments)]
async fn phase(
    dir: &Path,
    scenario: &Path,
    target: SocketAddr,
    pids: &[u32],
    received: &AtomicUsize,
    total: usize,
    rate: usize,
    window: usize,
) -> Result<(f64, f64)> {
    let program = sipp_program()?;
    let base = received.load(Ordering::Relaxed);
    let cpu0: f64 = pids.iter().map(|p| cpu_secs(*p)).sum();
    let start = Instant::now();
    let mut clients = vec![sipp::spawn(
        program, scenario, dir, 0, target, total, rate, window, LIMIT,
    )?];
    sipp::wait_counted(&mut clients, dir, received, base, total, start, LIMIT).await?;
    let secs = start.elapsed().as_secs_f64();
    let cpu: f64 = pids.iter().map(|p| cpu_secs(*p)).sum::<f64>() - cpu0;
    sipp::all_succeeded(&mut clients, dir).await?;
    Ok((secs, cpu))
}

fn report(what: &str, total: usize, secs: f64, cpu: f64) -> f64 {
    let per_k = cpu * 1000.0 / (total as f64 / 1000.0);
    println!(
        "intercluster_forward: {what}: {total} MESSAGEs in {secs:.2} s = {:.0} msgs/s; legate \
         CPU {cpu:.2} s = {per_k:.1} ms per 1 000",
        total as f64 / secs,
    );
    per_k
}

/// The sample of `series` (full name with labels) in a Prometheus text.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Waits (at most 30 s) until A's index places alice in B (A's first sync, at its start).
async fn wait_placed(a: &Legate) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let r = support::get(a.addr("admin")?, "/intercluster/lookup/alice@example.com").await?;
        if r.contains("\"cluster\":\"b\"") {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("A never placed alice in B: {r}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn run(total: usize, window: usize, rate: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (pa, pb) = (free_port()?, free_port()?);
    let (la, lb) = (
        TcpListener::bind("127.0.0.1:0").await?,
        TcpListener::bind("127.0.0.1:0").await?,
    );
    let (ha, hb) = (la.local_addr()?, lb.local_addr()?);
    let at_a = Arc::new(AtomicUsize::new(0));
    let at_b = Arc::new(AtomicUsize::new(0));
    tokio::spawn(home_node(la, at_a.clone(), false));
    tokio::spawn(home_node(lb, at_b.clone(), false));
    let scenario = dir.path().join("pager.xml");
    std::fs::write(&scenario, SCENARIO)?;
    let cfg_b = write_config(dir.path(), "b", pb, ("a", pa), hb, "\"alice@example.com\"")?;
    let cfg_a = write_config(dir.path(), "a", pa, ("b", pb), ha, "")?;
    let b = Legate::start(&cfg_b, &["sip_tcp", "admin", "intercluster"]).await?;
    b.wait_component_link().await?;
    let a = Legate::start(&cfg_a, &["sip_tcp", "admin", "intercluster"]).await?;
    a.wait_component_link().await?;
    wait_placed(&a).await?;

    let (secs, cpu) = phase(
        dir.path(),
        &scenario,
        b.addr("sip_tcp")?,
        &[a.pid(), b.pid()],
        &at_b,
        total,
        rate,
        window,
    )
    .await?;
    let straight = report("straight to B", total, secs, cpu);

    let (secs, cpu) = phase(
        dir.path(),
        &scenario,
        a.addr("sip_tcp")?,
        &[a.pid(), b.pid()],
        &at_b,
        total,
        rate,
        window,
    )
    .await?;
    let through = report("through A (forwarded to B)", total, secs, cpu);
    let m = metrics(a.addr("admin")?).await?;
    let forwarded = support::sum(
        &m,
        "legate_intercluster_forwarded_total",
        &["direction=\"out\"", "outcome=\"delivered\""],
    );
    let calls = value(
        &m,
        "legate_intercluster_forward_seconds_count{outcome=\"answered\"}",
    );
    let rtt = value(
        &m,
        "legate_intercluster_forward_seconds_sum{outcome=\"answered\"}",
    );
    if forwarded < total as u64 || at_a.load(Ordering::Relaxed) != 0 {
        bail!(
            "A forwarded {forwarded} of {total} MESSAGEs; A's home node got {}",
            at_a.load(Ordering::Relaxed)
        );
    }
    println!(
        "intercluster_forward: {forwarded} forwarded in {calls} Forward calls (mean batch {:.1}), \
         mean round trip {:.2} ms; overhead {:.1} ms CPU per 1 000 MESSAGEs ({:+.0} %)",
        forwarded as f64 / calls.max(1.0),
        rtt * 1e3 / calls.max(1.0),
        through - straight,
        (through / straight - 1.0) * 100.0
    );
    Ok(())
}
