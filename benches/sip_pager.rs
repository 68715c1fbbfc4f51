//! Pager MESSAGE run through the real `legate run` binary over plain TCP (not a criterion
//! bench: a CPU-per-message figure for the README's performance table, issue 10's "cheaper
//! per message" target).
//!
//! Two sipp processes (Debian `sip-tester`), each over its own TCP connection from a
//! federated domain's static route address (plain TCP is only accepted from there), send
//! `PAGER_TOTAL` pager-mode MESSAGEs (RFC 3428) in all, each keeping at most `PAGER_WINDOW`
//! unanswered, toward a local user whose home node is a XEP-0114 server in this process that
//! only counts `<message/>`s. The run fails unless every MESSAGE reached the home node and both
//! sipp runs saw every MESSAGE answered 200.
//!
//! Reported: delivery rate, legate's CPU per 1 000 MESSAGEs (utime + stime of the `legate`
//! process from /proc, from the first MESSAGE sent to the last one counted), its peak RSS.
//!
//! Run: `cargo bench --bench sip_pager` (env `PAGER_TOTAL`, default 50 000; `PAGER_WINDOW`,
//! default 200 per sipp; `PAGER_RATE`, default 20 000/s per sipp). Bounded: the run gives up
//! after 180 s.

mod support;

use support::env_usize;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use support::sipp::{self, sipp_program, SCENARIO};
use support::{cpu_secs, home_node, metrics, peak_rss_kib, sum, Legate};
use tokio::net::TcpListener;

const LIMIT: Duration = Duration::from_secs(180);
const CLIENTS: usize = 2;

fn main() -> Result<()> {
    let total = env_usize("PAGER_TOTAL", 50_000);
    let window = env_usize("PAGER_WINDOW", 200);
    let rate = env_usize("PAGER_RATE", 20_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(run(total, window, rate))
}

async fn run(total: usize, window: usize, rate: usize) -> Result<()> {
    let sipp = sipp_program()?;
    let home = TcpListener::bind("127.0.0.1:0").await?;
    let home_addr = home.local_addr()?;
    let received = Arc::new(AtomicUsize::new(0));
    tokio::spawn(home_node(home, received.clone(), false));

    let dir = tempfile::tempdir()?;
    let scenario = dir.path().join("pager.xml");
    std::fs::write(&scenario, SCENARIO)?;
    let cfg = dir.path().join("legate.toml");
    // The route's port is never dialled (every MESSAGE is inbound); only its address matters.
    std::fs::write(
        &cfg,
        format!(
            r#"routing_node = "hn1"
[node]
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
addresses = ["{home_addr}"]
component_secret = "pager-component-secret-0123"
default_system = "xmpp"
"#,
            data = dir.path().display(),
        ),
    )?;
    let legate = Legate::start(&cfg, &["sip_tcp", "admin"]).await?;
    let pid = legate.pid();
    let (sip, admin) = (legate.addr("sip_tcp")?, legate.addr("admin")?);
    legate.wait_component_link().await?;

    let cpu0 = cpu_secs(pid);
    let start = Instant::now();
    let mut clients = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        // Split the total so the two counts add up exactly.
        let calls = total / CLIENTS + usize::from(i < total % CLIENTS);
        clients.push(sipp::spawn(
            sipp,
            &scenario,
            dir.path(),
            i,
            sip,
            calls,
            rate,
            window,
            LIMIT,
        )?);
    }
    sipp::wait_counted(&mut clients, dir.path(), &received, 0, total, start, LIMIT).await?;
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_secs(pid) - cpu0;
    let delivered = received.load(Ordering::Relaxed);

    sipp::all_succeeded(&mut clients, dir.path()).await?;
    let m = metrics(admin).await?;
    let ok = sum(
        &m,
        "legate_sip_responses_total",
        &["class=\"2xx\"", "direction=\"out\""],
    );
    println!(
        "sip_pager: {delivered} of {total} MESSAGEs delivered in {secs:.2} s = {:.0} msgs/s \
         ({CLIENTS} sipp over TCP, window {window} each); legate CPU {:.2} s = {:.1} ms per \
         1 000; peak RSS {} MB; 200 OK sent {ok}",
        delivered as f64 / secs,
        cpu,
        cpu * 1000.0 / (total as f64 / 1000.0),
        peak_rss_kib(pid) / 1024,
    );
    if delivered != total || ok < total as u64 {
        bail!("lost MESSAGEs: delivered {delivered}, answered 200 {ok}, of {total}");
    }
    Ok(())
}
