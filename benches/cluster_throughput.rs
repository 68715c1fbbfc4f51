//! Throughput of two cluster nodes against one, on this machine (issue 12): pager MESSAGEs
//! from sipp (Debian `sip-tester`) over plain TCP through `legate run` to a XEP-0114 home node
//! in this process that counts `<message/>`s, with the nodes on a three-member etcd (Debian
//! `etcd-server`).
//!
//! - **one node**: gw1 alone (it holds the component link); two sipp clients send to it;
//! - **two nodes**: gw2 joins; the home node accepts one connection per component (like
//!   Prosody), so gw1 keeps the link and gw2 hands what it receives to gw1 over the peer link
//!   (gRPC over mutual TLS); one sipp client sends to each node.
//!
//! Every MESSAGE must reach the home node and be answered 200 by sipp's count. Reported per
//! phase: delivery rate and the legate processes' CPU per 1 000 MESSAGEs (all nodes summed).
//! On a 2-core machine that also runs sipp, etcd and the home node, a second node adds no
//! cores: the figure shows what forwarding costs, not a scale-out.
//!
//! `cargo bench --features cluster --bench cluster_throughput` (env `PAGER_TOTAL` per phase,
//! default 40 000; `PAGER_WINDOW` per sipp, default 200; `PAGER_RATE` per sipp, default
//! 20 000/s). Bounded: each phase gives up after 180 s.

mod support;

use support::env_usize;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use support::etcd::{free_port, start_etcd};
use support::sipp::{self, sipp_program, SCENARIO};
use support::{cpu_secs, home_node, Legate};
use tokio::net::TcpListener;

const LIMIT: Duration = Duration::from_secs(180);

fn main() -> Result<()> {
    let total = env_usize("PAGER_TOTAL", 40_000);
    let window = env_usize("PAGER_WINDOW", 200);
    let rate = env_usize("PAGER_RATE", 20_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(run(total, window, rate))
}

#[allow(clippy::too_many_arguments)]
fn write_config(
    dir: &Path,
    id: &str,
    endpoints: &[String],
    peer_ports: &[u16],
    home: SocketAddr,
) -> Result<PathBuf> {
    let d = dir.join(id);
    std::fs::create_dir_all(&d)?;
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    let peers: String = ["gw1", "gw2"]
        .iter()
        .zip(peer_ports)
        .map(|(n, p)| format!("[[cluster.peers]]\nname = \"{n}\"\naddress = \"127.0.0.1:{p}\"\n"))
        .collect();
    // The route's port is never dialled (every MESSAGE is inbound); only its address matters.
    let cfg = format!(
        r#"routing_node = "hn1"
[node]
id = "{id}"
admin_listen = "127.0.0.1:0"
data_dir = "{data}"
[[local_domain]]
name = "example.com"
[listeners]
sip_tls = "off"
sip_tcp = "127.0.0.1:0"
xmpp_s2s = "off"
xmpp_s2s_direct_tls = "off"
[xmpp.federation]
dialback_secret = "bench-dialback-secret-0123"
[[sip.federated_domain]]
name = "partner.test"
system = "lync"
route = "127.0.0.1:5999"
[[home_node]]
name = "hn1"
addresses = ["{home}"]
component_secret = "pager-component-secret-0123"
default_system = "xmpp"
[cluster]
name = "throughput.test"
store = "etcd"
etcd_endpoints = [{eps}]
{peers}"#,
        data = d.join("data").display(),
        eps = eps.join(", "),
    );
    let path = d.join("legate.toml");
    std::fs::write(&path, cfg)?;
    Ok(path)
}

/// Sends `total` MESSAGEs split over `targets` (one sipp each) and waits until the home node
/// counted them all; returns (seconds, CPU seconds of `pids`).
#[allow(clippy::too_many_arguments)]
async fn phase(
    dir: &Path,
    scenario: &Path,
    targets: &[SocketAddr],
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
    let mut clients = Vec::new();
    for (i, sip) in targets.iter().enumerate() {
        let calls = total / targets.len() + usize::from(i < total % targets.len());
        clients.push(sipp::spawn(
            program, scenario, dir, i, *sip, calls, rate, window, LIMIT,
        )?);
    }
    sipp::wait_counted(&mut clients, dir, received, base, total, start, LIMIT).await?;
    let secs = start.elapsed().as_secs_f64();
    let cpu: f64 = pids.iter().map(|p| cpu_secs(*p)).sum::<f64>() - cpu0;
    sipp::all_succeeded(&mut clients, dir).await?;
    Ok((secs, cpu))
}

/// Waits (at most 30 s) until `node`'s `/status` says gw1 holds the component link.
async fn wait_holder(node: &Legate) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let resp = support::get(node.addr("admin")?, "/status").await?;
        let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let doc: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        let held = doc["cluster"]["links"]
            .as_array()
            .and_then(|l| l.first())
            .and_then(|l| l["holder"].as_str())
            == Some("gw1");
        if held {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("gw2 never saw gw1 holding the component link: {body}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn report(what: &str, total: usize, secs: f64, cpu: f64) {
    println!(
        "cluster_throughput: {what}: {total} MESSAGEs in {secs:.2} s = {:.0} msgs/s; legate \
         CPU {cpu:.2} s = {:.1} ms per 1 000",
        total as f64 / secs,
        cpu * 1000.0 / (total as f64 / 1000.0)
    );
}

async fn run(total: usize, window: usize, rate: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_etcd, endpoints) = start_etcd(dir.path())?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let home = TcpListener::bind("127.0.0.1:0").await?;
    let home_addr = home.local_addr()?;
    let received = Arc::new(AtomicUsize::new(0));
    // One connection per component, as Prosody: a second one is refused by the claims, not
    // by this home node, which accepts whatever comes.
    tokio::spawn(home_node(home, received.clone(), false));
    let scenario = dir.path().join("pager.xml");
    std::fs::write(&scenario, SCENARIO)?;
    let ports = [free_port()?, free_port()?];
    let c1 = write_config(dir.path(), "gw1", &endpoints, &ports, home_addr)?;
    let c2 = write_config(dir.path(), "gw2", &endpoints, &ports, home_addr)?;

    let gw1 = Legate::start(&c1, &["sip_tcp", "admin"]).await?;
    gw1.wait_component_link().await?;
    let (secs, cpu) = phase(
        dir.path(),
        &scenario,
        &[gw1.addr("sip_tcp")?, gw1.addr("sip_tcp")?],
        &[gw1.pid()],
        &received,
        total,
        rate,
        window,
    )
    .await?;
    report("one node (2 sipp to gw1)", total, secs, cpu);

    let gw2 = Legate::start(&c2, &["sip_tcp", "admin"]).await?;
    wait_holder(&gw2).await?;
    let (secs, cpu) = phase(
        dir.path(),
        &scenario,
        &[gw1.addr("sip_tcp")?, gw2.addr("sip_tcp")?],
        &[gw1.pid(), gw2.pid()],
        &received,
        total,
        rate,
        window,
    )
    .await?;
    report(
        "two nodes (1 sipp each; gw2 hands its half to gw1, which holds the link)",
        total,
        secs,
        cpu,
    );
    let m = support::metrics(gw2.addr("admin")?).await?;
    let handed = support::sum(
        &m,
        "legate_cluster_handed_total",
        &["direction=\"out\"", "outcome=\"accepted\""],
    );
    println!("cluster_throughput: gw2 handed {handed} MESSAGEs to gw1 over the peer link");
    if handed < (total / 2) as u64 {
        bail!(
            "gw2 handed {handed} MESSAGEs, fewer than the {} it received",
            total / 2
        );
    }
    Ok(())
}
