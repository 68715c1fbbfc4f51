//! Presence at scale through the real `legate run` binary (issue 11 item 10): how long it takes
//! to set up `SUBS` foreign SIP subscriptions (default 100 000), what each costs in memory and
//! on disk, and how long a storm of presence changes of `USERS` local users (default 10 000,
//! each watched by SUBS / USERS watchers) takes to reach every watcher as a NOTIFY.
//!
//! The foreign side is a Lync-like edge in this process over plain TCP from the federated
//! domain's static route address (`msrtc` bodies): it pipelines SUBSCRIBEs (at most `WINDOW`
//! not yet set up) and answers every NOTIFY 200 at once. The window counts subscriptions up
//! to their active NOTIFY, not to their 200: counted to the 200, the approvals' NOTIFYs were
//! not bounded by it, and under load a burst of them outran this process's reading by more
//! than Legate queues for a peer (`OUT_QUEUE_BYTES`, 4 MiB), so Legate closed the connection
//! as a peer that stopped reading and the run stalled with the window exhausted. The home node is a XEP-0114 server in this
//! process that behaves as an XMPP server whose users have approved their watchers: it answers
//! each `subscribe` with `subscribed` and the user's current presence (away), and each probe
//! with that presence. A subscription counts as set up when its dialog received an active
//! NOTIFY saying away (msrtc 15500). For the storm the home node sends, as an XMPP server does,
//! one presence stanza (dnd) per (user, watcher); done when every dialog got a NOTIFY saying
//! busy (6500).
//!
//! Reported: setup time and rate, storm time, legate CPU for each phase, RSS growth per
//! subscription, size of the data directory per subscription.
//!
//! Run: `cargo bench --bench presence_scale` (env `SUBS`, `USERS`, `WINDOW`). Bounded: each
//! phase, and each wait for a free SUBSCRIBE window slot, gives up after 120 s.

mod support;

use support::env_usize;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use legate::sip::{Frame, Framer};
use legate::xmpp::stream::{StreamEvent, StreamFramer};
use support::{cpu_secs, Legate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

const LIMIT: Duration = Duration::from_secs(120);

fn main() -> Result<()> {
    let subs = env_usize("SUBS", 100_000);
    let users = env_usize("USERS", 10_000).clamp(1, subs.max(1));
    let window = env_usize("WINDOW", 1_000).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(run(subs, users, window))
}

/// What the two in-process peers count.
#[derive(Default)]
struct Counters {
    /// Dialogs (Call-IDs) that saw an active NOTIFY with the away state.
    set_up: Mutex<HashSet<String>>,
    set_up_n: AtomicUsize,
    /// Dialogs that saw the storm's busy state.
    stormed: Mutex<HashSet<String>>,
    stormed_n: AtomicUsize,
    /// (user, watcher) pairs the home node approved, for the storm.
    pairs: Mutex<Vec<(String, String)>>,
}

async fn run(subs: usize, users: usize, window: usize) -> Result<()> {
    let home = TcpListener::bind("127.0.0.1:0").await?;
    let home_addr = home.local_addr()?;
    let counters = Arc::new(Counters::default());
    let (storm_tx, storm_rx) = mpsc::channel::<()>(1);
    tokio::spawn(home_node(home, counters.clone(), storm_rx));

    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let cfg = dir.path().join("legate.toml");
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
presence_format = "msrtc"
[[home_node]]
name = "hn1"
addresses = ["{home_addr}"]
component_secret = "scale-component-secret-0123"
default_system = "xmpp"
[limits]
foreign_watchers_per_domain = {subs}
sip_transactions_per_domain = {window2}
"#,
            data = data.display(),
            window2 = (window * 4).max(4096),
        ),
    )?;
    let legate = Legate::start(&cfg, &["sip_tcp", "admin"]).await?;
    let pid = legate.pid();
    legate.wait_component_link().await?;
    let rss0 = rss_kib(pid);

    let sock = TcpStream::connect(legate.addr("sip_tcp")?).await?;
    let (rd, wr) = sock.into_split();
    let (out_tx, out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(writer(wr, out_rx));
    let permits = Arc::new(Semaphore::new(window));
    tokio::spawn(reader(
        rd,
        out_tx.clone(),
        permits.clone(),
        counters.clone(),
    ));

    // --- Phase 1: set up the subscriptions. ------------------------------------------------
    let cpu0 = cpu_secs(pid);
    let t0 = Instant::now();
    for i in 0..subs {
        // Bounded like the phases: a SUBSCRIBE that never gets a final response must fail
        // the run, not hang it.
        match tokio::time::timeout(LIMIT, permits.acquire()).await {
            Ok(p) => p?.forget(),
            Err(_) => bail!(
                "gave up after {LIMIT:?}: {window} subscriptions not set up after {i} sent, {} set up",
                counters.set_up_n.load(Ordering::Relaxed)
            ),
        }
        let user = format!("u{}@example.com", i % users);
        out_tx.send(subscribe(i, &user))?;
    }
    wait_for(&counters.set_up_n, subs, "subscriptions set up").await?;
    let setup = t0.elapsed().as_secs_f64();
    let setup_cpu = cpu_secs(pid) - cpu0;
    // Let the store's group commit reach the disk before measuring it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = rss_kib(pid);
    let disk = dir_bytes(&data);

    // --- Phase 2: every user changes presence once. ------------------------------------------
    let cpu1 = cpu_secs(pid);
    let t1 = Instant::now();
    storm_tx.send(()).await?;
    wait_for(&counters.stormed_n, subs, "storm NOTIFYs").await?;
    let storm = t1.elapsed().as_secs_f64();
    let storm_cpu = cpu_secs(pid) - cpu1;

    let per_sub_rss = (rss1.saturating_sub(rss0) as f64 * 1024.0) / subs as f64;
    println!("presence_scale: {subs} foreign subscriptions to {users} local users");
    println!(
        "  setup: {setup:.2} s ({:.0}/s), legate CPU {setup_cpu:.2} s",
        subs as f64 / setup
    );
    println!(
        "  memory: RSS {} → {} KiB, {per_sub_rss:.0} B per subscription",
        rss0, rss1
    );
    println!(
        "  store: {} B on disk, {:.0} B per subscription",
        disk,
        disk as f64 / subs as f64
    );
    println!(
        "  storm: {users} presence changes → {subs} NOTIFYs in {storm:.2} s, legate CPU {storm_cpu:.2} s"
    );
    Ok(())
}

async fn wait_for(n: &AtomicUsize, want: usize, what: &str) -> Result<()> {
    let t0 = Instant::now();
    while n.load(Ordering::Relaxed) < want {
        if t0.elapsed() > LIMIT {
            bail!(
                "gave up after {LIMIT:?}: {} of {want} {what}",
                n.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

fn subscribe(i: usize, user: &str) -> Vec<u8> {
    format!(
        "SUBSCRIBE sip:{user} SIP/2.0\r\n\
         Via: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bKscale{i}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:w{i}@partner.test>;tag=t{i}\r\n\
         To: <sip:{user}>\r\n\
         Call-ID: scale-{i}\r\n\
         CSeq: 1 SUBSCRIBE\r\n\
         Contact: <sip:w{i}@127.0.0.1:5999;transport=tcp>\r\n\
         Event: presence\r\n\
         Accept: application/msrtc-event-categories+xml\r\n\
         Expires: 3600\r\n\
         Content-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

async fn writer(mut wr: tokio::net::tcp::OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    let mut buf = Vec::with_capacity(256 * 1024);
    while let Some(first) = rx.recv().await {
        buf.clear();
        buf.extend_from_slice(&first);
        while buf.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(more) => buf.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if wr.write_all(&buf).await.is_err() {
            return;
        }
    }
}

/// Reads Legate's responses and NOTIFYs, answers each NOTIFY 200, frees a window slot per
/// subscription set up (or refused) and counts dialogs per phase.
async fn reader(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    out: mpsc::UnboundedSender<Vec<u8>>,
    permits: Arc<Semaphore>,
    c: Arc<Counters>,
) {
    let mut framer = Framer::default();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        loop {
            match framer.next() {
                Ok(Some(Frame::Message(m))) => {
                    if let Some(status) = m.status() {
                        if status >= 300 {
                            eprintln!("SUBSCRIBE refused: {status}");
                            permits.add_permits(1);
                        }
                        continue;
                    }
                    if m.method() != Some("NOTIFY") {
                        continue;
                    }
                    if let Ok(r) = m.build_response(200, "OK", None) {
                        let _ = out.send(r.to_bytes().to_vec());
                    }
                    let call = m
                        .header_value_by_raw_name("Call-ID")
                        .unwrap_or("")
                        .to_string();
                    let state = m
                        .header_value_by_raw_name("Subscription-State")
                        .unwrap_or("");
                    let body = String::from_utf8_lossy(m.body());
                    if state.starts_with("active") && body.contains(">15500<") {
                        if c.set_up.lock().is_ok_and(|mut s| s.insert(call.clone())) {
                            c.set_up_n.fetch_add(1, Ordering::Relaxed);
                            permits.add_permits(1);
                        }
                    } else if body.contains(">6500<")
                        && c.stormed.lock().is_ok_and(|mut s| s.insert(call))
                    {
                        c.stormed_n.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    eprintln!("framing: {e}");
                    return;
                }
            }
        }
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => framer.push(buf.get(..n).unwrap_or_default()),
        }
    }
}

/// The home node: approves every subscription with the user's presence (away), answers probes,
/// and on the storm signal sends dnd from every user to each of its watchers. It reads and
/// writes independently (as a real server does), so neither side's writes can stall the other.
async fn home_node(l: TcpListener, c: Arc<Counters>, mut storm: mpsc::Receiver<()>) {
    let Ok((sock, _)) = l.accept().await else {
        return;
    };
    let (mut rd, wr) = sock.into_split();
    let (tx, rx) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(writer(wr, rx));
    let storm_tx = tx.clone();
    let storm_pairs = c.clone();
    tokio::spawn(async move {
        if storm.recv().await.is_none() {
            return;
        }
        let pairs = storm_pairs
            .pairs
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default();
        for chunk in pairs.chunks(1000) {
            let mut out = Vec::with_capacity(chunk.len() * 96);
            for (user, watcher) in chunk {
                out.extend_from_slice(
                    format!(
                        "<presence from='{user}/desk' to='{watcher}'><show>dnd</show></presence>"
                    )
                    .as_bytes(),
                );
            }
            if storm_tx.send(out).is_err() {
                return;
            }
        }
    });
    let mut framer = StreamFramer::default();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let mut out = Vec::new();
        loop {
            match framer.next_event() {
                Ok(Some(StreamEvent::StreamOpen(h))) => {
                    let to = h.to().unwrap_or_default().to_string();
                    out.extend_from_slice(
                        format!(
                            "<stream:stream xmlns='jabber:component:accept' \
                             xmlns:stream='http://etherx.jabber.org/streams' id='scale1' \
                             from='{to}'>"
                        )
                        .as_bytes(),
                    );
                }
                Ok(Some(StreamEvent::Stanza(s))) => {
                    if s.name() == "handshake" {
                        out.extend_from_slice(b"<handshake/>");
                        continue;
                    }
                    if s.name() != "presence" {
                        continue;
                    }
                    let (Some(from), Some(to)) = (s.from(), s.to()) else {
                        continue;
                    };
                    let (watcher, user) = (from.to_string(), to.to_string());
                    match s.stanza_type().as_deref() {
                        Some("subscribe") => {
                            out.extend_from_slice(
                                format!(
                                    "<presence type='subscribed' from='{user}' to='{watcher}'/>"
                                )
                                .as_bytes(),
                            );
                            away(&mut out, &user, &watcher);
                            if let Ok(mut p) = c.pairs.lock() {
                                p.push((user, watcher));
                            }
                        }
                        Some("probe") => away(&mut out, &user, &watcher),
                        _ => {}
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    eprintln!("home node: bad XML from legate: {e}");
                    return;
                }
            }
        }
        if !out.is_empty() && tx.send(out).is_err() {
            return;
        }
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => framer.push(buf.get(..n).unwrap_or_default()),
        }
    }
}

fn away(out: &mut Vec<u8>, user: &str, watcher: &str) {
    out.extend_from_slice(
        format!("<presence from='{user}/desk' to='{watcher}'><show>away</show></presence>")
            .as_bytes(),
    );
}

/// Current resident set of `pid` in KiB (VmRSS).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Total size of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
