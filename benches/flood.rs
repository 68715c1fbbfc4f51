//! Flood run through the real `legate run` binary (not a criterion bench: a delivery and
//! throughput figure for the README's performance table).
//!
//! One authenticated s2s stream (direct TLS, SASL EXTERNAL as `xmpp.test`) writes `FLOOD_TOTAL`
//! `<message/>`s flat out — no window, no pause — toward users of one home node. The home node
//! is a minimal XEP-0114 server in this process that only counts messages (optionally reading
//! slowly, `FLOOD_SLOW_HOME=1`, to show the sender being slowed). Legate runs with its default
//! limits. The run fails unless every message arrives and nothing was bounced.
//!
//! Reported: delivery rate, legate's CPU per 1 000 messages (utime + stime of the `legate`
//! process from /proc), its peak RSS, and how often readers waited for room
//! (`legate_backpressure_waits_total`).
//!
//! Run: `cargo bench --bench flood` (env `FLOOD_TOTAL`, default 200 000). Bounded: the run
//! gives up after 300 s.

#[path = "../tests/it/common/certs.rs"]
mod certs;
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use support::{cpu_secs, home_node, metrics, peak_rss_kib, sum, Legate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SECRET: &str = "flood-component-secret-0123";
const LIMIT: Duration = Duration::from_secs(300);

fn main() -> Result<()> {
    let total: usize = std::env::var("FLOOD_TOTAL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let slow = std::env::var("FLOOD_SLOW_HOME").is_ok();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(run(total, slow))
}

async fn run(total: usize, slow: bool) -> Result<()> {
    let certs = certs::CertFactory::new();
    let ours = certs.leaf("example", &["example.test"]);
    let theirs = certs.leaf("xmpp", &["xmpp.test"]);
    let home = TcpListener::bind("127.0.0.1:0").await?;
    let home_addr = home.local_addr()?;
    let received = Arc::new(AtomicUsize::new(0));
    tokio::spawn(home_node(home, received.clone(), slow));

    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("legate.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"routing_node = "hn1"
[node]
admin_listen = "127.0.0.1:0"
data_dir = "{data}"
[[local_domain]]
name = "example.test"
cert = "{cert}"
key = "{key}"
[listeners]
sip_tls = "off"
sip_tcp = "off"
xmpp_s2s = "off"
xmpp_s2s_direct_tls = "127.0.0.1:0"
[tls]
trust_bundle = "{ca}"
[xmpp.federation]
mode = "allow_list"
dialback_secret = "flood-dialback-secret-0123456789"
[[xmpp.federation.domain]]
name = "xmpp.test"
system = "fed-xmpp"
auth = "external_only"
[[home_node]]
name = "hn1"
addresses = ["{home_addr}"]
component_secret = "{SECRET}"
default_system = "xmpp"
"#,
            data = dir.path().display(),
            cert = ours.cert.display(),
            key = ours.key.display(),
            ca = certs.ca_path().display(),
        ),
    )?;
    let legate = Legate::start(&cfg, &["xmpp_s2s_direct_tls", "admin"]).await?;
    let pid = legate.pid();
    let (s2s, admin) = (legate.addr("xmpp_s2s_direct_tls")?, legate.addr("admin")?);
    legate.wait_component_link().await?;

    let stream = sasl_external(&certs, &theirs, s2s).await?;
    let (mut rd, mut wr) = tokio::io::split(stream);
    // Inbound s2s streams are one-way; drain whatever Legate says (nothing is expected).
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    let cpu0 = cpu_secs(pid);
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(64 * 1024);
        for i in 0..total {
            batch.extend_from_slice(
                format!(
                    "<message type='chat' from='bob@xmpp.test/r' to='alice@example.test' \
                     id='f{i}'><body>message number {i} with a body of typical chat \
                     length</body></message>"
                )
                .as_bytes(),
            );
            if batch.len() >= 60 * 1024 {
                wr.write_all(&batch).await?;
                batch.clear();
            }
        }
        wr.write_all(&batch).await?;
        wr.flush().await?;
        anyhow::Ok((Instant::now(), wr))
    });
    while received.load(Ordering::Relaxed) < total {
        if start.elapsed() > LIMIT {
            bail!(
                "gave up after {LIMIT:?}: {} of {total} delivered",
                received.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_secs(pid) - cpu0;
    let (written_at, _wr) = writer.await??;
    let write_secs = written_at.duration_since(start).as_secs_f64();
    let m = metrics(admin).await?;
    let bounced: u64 = sum(&m, "legate_envelopes_total", &["outcome=\"unavailable\""])
        + sum(&m, "legate_envelopes_total", &["outcome=\"timeout\""])
        + sum(&m, "legate_component_bounced_total", &[]);
    let waits = sum(&m, "legate_backpressure_waits_total", &[]);
    let delivered = received.load(Ordering::Relaxed);
    println!(
        "flood: {delivered} of {total} delivered in {secs:.2} s = {:.0} msgs/s; sender done \
         writing after {write_secs:.2} s; legate CPU {:.2} s = {:.1} ms per 1 000; peak RSS \
         {} MB; bounced {bounced}; reader waits for room {waits}{}",
        delivered as f64 / secs,
        cpu,
        cpu * 1000.0 / (total as f64 / 1000.0),
        peak_rss_kib(pid) / 1024,
        if slow { " (slow home node)" } else { "" }
    );
    if delivered != total || bounced != 0 {
        bail!("lost or bounced messages: delivered {delivered}, bounced {bounced}");
    }
    Ok(())
}

/// Opens a direct TLS (XEP-0368) stream to `addr` as `xmpp.test` and authenticates with
/// SASL EXTERNAL (RFC 6120 §6.4, the certificate names the domain).
async fn sasl_external(
    certs: &certs::CertFactory,
    leaf: &certs::Leaf,
    addr: SocketAddr,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let settings = legate::tls::TlsSettings {
        default_cert: Some((leaf.cert.clone(), leaf.key.clone())),
        domain_certs: vec![],
        trust_bundle: Some(certs.ca_path().to_path_buf()),
        min_version: legate::config::TlsVersion::V1_2,
    };
    let ct = legate::tls::ClientTls::new(&settings)?;
    let domain = legate::config::Domain::parse("example.test").map_err(|e| anyhow!(e))?;
    let sock = TcpStream::connect(addr).await?;
    let mut t = ct
        .connect(sock, None, &domain, Duration::from_secs(5))
        .await?;
    let header = "<?xml version='1.0'?><stream:stream xmlns='jabber:server' \
                  xmlns:stream='http://etherx.jabber.org/streams' version='1.0' \
                  to='example.test' from='xmpp.test'>";
    t.write_all(header.as_bytes()).await?;
    read_until(&mut t, "</stream:features>").await?;
    t.write_all(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>")
        .await?;
    let got = read_until(&mut t, ">").await?;
    if !got.contains("<success") {
        let more = read_until(&mut t, "</failure>").await.unwrap_or_default();
        bail!("SASL EXTERNAL refused: {got}{more}");
    }
    t.write_all(header.as_bytes()).await?;
    read_until(&mut t, "features").await?;
    Ok(t)
}

async fn read_until<S: tokio::io::AsyncRead + Unpin>(s: &mut S, needle: &str) -> Result<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(10), async {
        while !String::from_utf8_lossy(&got).contains(needle) {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                bail!("closed: {}", String::from_utf8_lossy(&got));
            }
            got.extend_from_slice(buf.get(..n).unwrap_or_default());
        }
        Ok(String::from_utf8_lossy(&got).into_owned())
    })
    .await
    .map_err(|_| anyhow!("timed out waiting for {needle}"))?
}
