//! Bounded load run of the SIP edge over mutual TLS on loopback (not a criterion bench: a
//! throughput figure for the README's performance table).
//!
//! The bench process starts the edge in-process (hub, TLS listener, a home side that drains
//! its outbox) and re-executes itself as the *load client* (`LEGATE_LOAD_CLIENT=1`), so the CPU
//! and RSS it reports are the edge's alone. The client opens `CONNS` TLS connections as
//! `partner.com` and keeps `WINDOW` requests in flight on each until `TOTAL` are answered:
//! first pager-mode MESSAGEs, then MESSAGEs inside one Lync-style IM session per connection.
//!
//! Run: `cargo bench --bench sip_load` (env `LOAD_TOTAL`, `LOAD_CONNS`, `LOAD_WINDOW`).

#[path = "../tests/it/common/certs.rs"]
mod certs;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use legate::config::{self, BUILTIN_SYSTEMS};
use legate::gateway::Hub;
use legate::presence::map::MappingStore;
use legate::sip::edge::SipEdge;
use legate::sip::{Frame, Framer, SipMessage};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<()> {
    if std::env::var("LEGATE_LOAD_CLIENT").is_ok() {
        return client_main();
    }
    // `cargo bench` passes `--bench`; other harness flags are ignored.
    server_main()
}

/// utime + stime of this process in seconds, and VmRSS / VmHWM in KiB (Linux /proc).
fn usage() -> (f64, u64, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat (indexes 11, 12 after the name); the
    // kernel's USER_HZ is 100 on every Linux this runs on.
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (cpu, kib("VmRSS:"), kib("VmHWM:"))
}

fn server_main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let certs = certs::CertFactory::new();
        let ours = certs.leaf("example", &["example.com"]);
        let partner = certs.leaf("partner", &["partner.com"]);
        let dir = tempfile::tempdir()?;
        let text = format!(
            r#"routing_node = "hn1"
[node]
id = "load"
data_dir = "{data}"
admin_listen = "127.0.0.1:0"
[[local_domain]]
name = "example.com"
cert = "{cert}"
key = "{key}"
[listeners]
sip_tls = "127.0.0.1:0"
sip_tcp = "off"
xmpp_s2s = "off"
xmpp_s2s_direct_tls = "off"
[tls]
trust_bundle = "{ca}"
[[sip.federated_domain]]
name = "partner.com"
system = "lync"
[[home_node]]
name = "hn1"
addresses = ["127.0.0.1:5347"]
component_secret = "a-long-enough-secret-1"
default_system = "xmpp"
"#,
            data = dir.path().display(),
            cert = ours.cert.display(),
            key = ours.key.display(),
            ca = certs.ca_path().display(),
        );
        let cfg = config::from_toml(&text, &dir.path().join("legate.toml"), BUILTIN_SYSTEMS)
            .map_err(|d| anyhow!("config: {d}"))?;
        let hub = Hub::new(cfg, MappingStore::open(None).map_err(|d| anyhow!("{d}"))?);
        let mut home = hub.register_component("hn1", 65_536);
        let delivered = Arc::new(AtomicU64::new(0));
        let counter = delivered.clone();
        tokio::spawn(async move {
            while home.recv().await.is_some() {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        let (stop, rx) = tokio::sync::watch::channel(false);
        let edge = SipEdge::start(hub.clone(), rx).await?;
        let addr = edge.tls_addr().context("tls")?;
        let exe = std::env::current_exe()?;
        let run_client = |modes: &'static str| {
            let exe = exe.clone();
            let (ca, cert, key) = (
                certs.ca_path().to_owned(),
                partner.cert.clone(),
                partner.key.clone(),
            );
            async move {
                let child = tokio::process::Command::new(exe)
                    .env("LEGATE_LOAD_CLIENT", "1")
                    .env("LOAD_MODES", modes)
                    .env("LOAD_ADDR", addr.to_string())
                    .env("LOAD_CA", ca)
                    .env("LOAD_CERT", cert)
                    .env("LOAD_KEY", key)
                    .kill_on_drop(true)
                    .stdout(std::process::Stdio::piped())
                    .spawn()?;
                let out = tokio::time::timeout(Duration::from_secs(300), child.wait_with_output())
                    .await
                    .context("load client did not finish within 300 s")??;
                print!("{}", String::from_utf8_lossy(&out.stdout));
                if !out.status.success() {
                    bail!("load client failed");
                }
                anyhow::Ok(())
            }
        };
        let (cpu0, _, _) = usage();
        let t0 = Instant::now();
        run_client("pager,session").await?;
        let wall = t0.elapsed().as_secs_f64();
        let (cpu1, rss, hwm) = usage();
        let n = delivered.load(Ordering::Relaxed);
        println!(
            "edge: {n} messages delivered to the home side in {wall:.2} s wall; edge CPU {:.2} s ({:.0}% of one core on average); RSS {} KiB now, peak {} KiB",
            cpu1 - cpu0,
            100.0 * (cpu1 - cpu0) / wall,
            rss,
            hwm
        );
        let t1 = Instant::now();
        run_client("subscribe").await?;
        let wall = t1.elapsed().as_secs_f64();
        // Let the state store catch up, then measure what the subscriptions hold.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (cpu2, rss2, hwm2) = usage();
        let state = std::fs::metadata(dir.path().join("state.journal"))
            .map(|m| m.len())
            .unwrap_or(0);
        println!(
            "edge: subscriptions phase {wall:.2} s wall, edge CPU {:.2} s; RSS {rss2} KiB (+{} KiB for the subscriptions), peak {hwm2} KiB; state journal {} KiB",
            cpu2 - cpu1,
            rss2.saturating_sub(rss),
            state / 1024
        );
        let _ = stop.send(true);
        edge.join(Duration::from_secs(5)).await;
        Ok(())
    })
}

fn client_main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let addr: SocketAddr = std::env::var("LOAD_ADDR")?.parse()?;
        let total = env_usize("LOAD_TOTAL", 200_000);
        let conns = env_usize("LOAD_CONNS", 8).max(1);
        let window = env_usize("LOAD_WINDOW", 32).max(1);
        let roots = legate::tls::load_trust_bundle(std::path::Path::new(&std::env::var("LOAD_CA")?))?;
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            legate::tls::load_certs(std::path::Path::new(&std::env::var("LOAD_CERT")?))?,
            legate::tls::load_private_key(std::path::Path::new(&std::env::var("LOAD_KEY")?))?,
        )?;
        let cfg = Arc::new(cfg);
        let modes = std::env::var("LOAD_MODES").unwrap_or_else(|_| "pager,session".into());
        let subs = env_usize("LOAD_SUBSCRIPTIONS", 20_000);
        for mode in modes.split(',').filter_map(|m| match m {
            "pager" => Some(Mode::Pager),
            "session" => Some(Mode::Session),
            "subscribe" => Some(Mode::Subscribe),
            _ => None,
        }) {
            let total = match mode {
                Mode::Subscribe => subs,
                _ => total,
            };
            let t0 = Instant::now();
            let mut tasks = Vec::new();
            for c in 0..conns {
                let cfg = cfg.clone();
                let per = total / conns;
                tasks.push(tokio::spawn(async move {
                    run_conn(addr, cfg, c, per, window, mode).await
                }));
            }
            let mut done = 0usize;
            for t in tasks {
                done += t.await??;
            }
            let dt = t0.elapsed().as_secs_f64();
            let what = match mode {
                Mode::Subscribe => "SUBSCRIBE/200 + NOTIFY/200",
                _ => "MESSAGE/200",
            };
            println!(
                "{mode:?}: {done} {what} over TLS, {conns} connections, window {window}: {dt:.2} s, {:.0}/s",
                done as f64 / dt
            );
        }
        Ok(())
    })
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Pager-mode MESSAGE (RFC 3428), a new transaction each.
    Pager,
    /// MESSAGEs inside one IM session (INVITE with `m=message`), like Lync.
    Session,
    /// New presence subscriptions (each answered 200 plus a NOTIFY we answer); they stay.
    Subscribe,
}

struct Conn<S> {
    s: S,
    framer: Framer,
    buf: Vec<u8>,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Conn<S> {
    async fn next(&mut self) -> Result<SipMessage> {
        loop {
            match self.framer.next() {
                Ok(Some(Frame::Message(m))) => return Ok(*m),
                Ok(Some(_)) | Ok(None) => {}
                Err(e) => bail!("framing: {e}"),
            }
            let n = tokio::time::timeout(Duration::from_secs(30), self.s.read(&mut self.buf))
                .await
                .context("read timeout")??;
            if n == 0 {
                bail!("edge closed the connection");
            }
            self.framer.push(self.buf.get(..n).unwrap_or(&[]));
        }
    }
}

fn message(c: usize, seq: usize, tag: Option<&str>, call: &str, cseq: usize) -> Vec<u8> {
    // The branch must be unique per request (RFC 3261 §8.1.1.7); the call id carries the mode.
    let body = format!("load message {seq} on connection {c}");
    let to = match tag {
        Some(t) => format!("<sip:alice{c}@example.com>;tag={t}"),
        None => format!("<sip:alice{c}@example.com>"),
    };
    format!(
        "MESSAGE sip:alice{c}@example.com SIP/2.0\r\nVia: SIP/2.0/TLS sip.partner.com:5061;branch=z9hG4bK{call}x{seq}\r\nMax-Forwards: 70\r\nFrom: <sip:bob{c}@partner.com>;tag=lt{c}\r\nTo: {to}\r\nCall-ID: {call}\r\nCSeq: {cseq} MESSAGE\r\nContent-Type: text/plain; charset=UTF-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn run_conn(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    c: usize,
    total: usize,
    window: usize,
    mode: Mode,
) -> Result<usize> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let s = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("example.com")?, tcp)
        .await?;
    let mut conn = Conn {
        s,
        framer: Framer::default(),
        buf: vec![0u8; 64 * 1024],
    };
    let call = format!("load-{c}-{mode:?}");
    let mut tag = None;
    if let Mode::Session = mode {
        let sdp = "v=0\r\nm=message 5061 sip null\r\n";
        let inv = format!(
            "INVITE sip:alice{c}@example.com SIP/2.0\r\nVia: SIP/2.0/TLS sip.partner.com:5061;branch=z9hG4bKinv{c}\r\nMax-Forwards: 70\r\nFrom: <sip:bob{c}@partner.com>;tag=lt{c}\r\nTo: <sip:alice{c}@example.com>\r\nCall-ID: {call}\r\nCSeq: 1 INVITE\r\nContact: <sip:bob{c}@127.0.0.1;transport=tls>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
            sdp.len()
        );
        conn.s.write_all(inv.as_bytes()).await?;
        loop {
            let r = conn.next().await?;
            match r.status() {
                Some(100) => continue,
                Some(200) => {
                    tag = r.to().ok().and_then(|t| t.tag().map(str::to_owned));
                    break;
                }
                other => bail!("INVITE answered {other:?}"),
            }
        }
        let ack = format!(
            "ACK sip:alice{c}@example.com SIP/2.0\r\nVia: SIP/2.0/TLS sip.partner.com:5061;branch=z9hG4bKack{c}\r\nMax-Forwards: 70\r\nFrom: <sip:bob{c}@partner.com>;tag=lt{c}\r\nTo: <sip:alice{c}@example.com>;tag={}\r\nCall-ID: {call}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
            tag.as_deref().unwrap_or("")
        );
        conn.s.write_all(ack.as_bytes()).await?;
    }
    if let Mode::Subscribe = mode {
        return run_subscribe(conn, c, total, window).await;
    }
    let mut sent = 0usize;
    let mut ok = 0usize;
    let mut batch = Vec::with_capacity(window * 400);
    while sent < total.min(window) {
        let call_id = match mode {
            Mode::Pager | Mode::Subscribe => format!("{call}-{sent}"),
            Mode::Session => call.clone(),
        };
        batch.extend_from_slice(&message(c, sent, tag.as_deref(), &call_id, sent + 2));
        sent += 1;
    }
    conn.s.write_all(&batch).await?;
    while ok < total {
        let r = conn.next().await?;
        match r.status() {
            Some(200) => ok += 1,
            other => bail!("MESSAGE answered {other:?} {:?}", r.reason()),
        }
        if sent < total {
            let call_id = match mode {
                Mode::Pager | Mode::Subscribe => format!("{call}-{sent}"),
                Mode::Session => call.clone(),
            };
            let m = message(c, sent, tag.as_deref(), &call_id, sent + 2);
            conn.s.write_all(&m).await?;
            sent += 1;
        }
    }
    Ok(ok)
}

fn subscribe(c: usize, i: usize) -> Vec<u8> {
    format!(
        "SUBSCRIBE sip:alice{u}@example.com SIP/2.0\r\nVia: SIP/2.0/TLS sip.partner.com:5061;branch=z9hG4bKsub{c}x{i}\r\nMax-Forwards: 70\r\nFrom: <sip:bob{c}x{i}@partner.com>;tag=st{i}\r\nTo: <sip:alice{u}@example.com>\r\nCall-ID: sub-{c}-{i}\r\nCSeq: 1 SUBSCRIBE\r\nContact: <sip:bob{c}x{i}@127.0.0.1;transport=tls>\r\nEvent: presence\r\nAccept: application/msrtc-event-categories+xml, application/pidf+xml\r\nExpires: 3600\r\nContent-Length: 0\r\n\r\n",
        u = i % 100
    )
    .into_bytes()
}

async fn run_subscribe<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut conn: Conn<S>,
    c: usize,
    total: usize,
    window: usize,
) -> Result<usize> {
    let mut sent = 0usize;
    let mut ok = 0usize;
    let mut batch = Vec::new();
    while sent < total.min(window) {
        batch.extend_from_slice(&subscribe(c, sent));
        sent += 1;
    }
    conn.s.write_all(&batch).await?;
    while ok < total {
        let m = conn.next().await?;
        if m.is_request() {
            let r = m
                .build_response(200, "OK", None)
                .map_err(|e| anyhow!("{e}"))?;
            conn.s.write_all(&r.to_bytes()).await?;
            continue;
        }
        match m.status() {
            Some(200) => ok += 1,
            other => bail!("SUBSCRIBE answered {other:?} {:?}", m.reason()),
        }
        if sent < total {
            conn.s.write_all(&subscribe(c, sent)).await?;
            sent += 1;
        }
    }
    Ok(ok)
}
