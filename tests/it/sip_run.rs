//! `legate run` starts the SIP edge: the real binary (`CARGO_BIN_EXE_legate`) is started on
//! port 0, its `legate: listening sip_tcp <addr>` line tells the test where to connect, a SIP
//! OPTIONS is answered, and the admin endpoint's `/metrics` shows the SIP metrics. The child is
//! killed on drop and every wait is bounded.

use crate::sip_ua;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sip_ua::{hv, Ua};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

#[tokio::test]
async fn legate_run_serves_sip_and_metrics() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("legate.toml");
    std::fs::write(
        &cfg,
        r#"[node]
id = "run1"
data_dir = "data"
admin_listen = "127.0.0.1:0"
[[local_domain]]
name = "example.com"
[listeners]
sip_tls = "off"
sip_tcp = "127.0.0.1:0"
xmpp_s2s = "off"
xmpp_s2s_direct_tls = "off"
[[sip.federated_domain]]
name = "partner.com"
system = "lync"
route = "127.0.0.1:5999"
"#,
    )?;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_legate"))
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let (mut sip, mut admin) = (None::<SocketAddr>, None::<SocketAddr>);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while sip.is_none() || admin.is_none() {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .context("legate did not announce its listeners")??
            .context("legate exited")?;
        let mut f = line.split_whitespace();
        if let (Some("legate:"), Some("listening"), Some(name), Some(addr)) =
            (f.next(), f.next(), f.next(), f.next())
        {
            match name {
                "sip_tcp" => sip = Some(addr.parse()?),
                "admin" => admin = Some(addr.parse()?),
                _ => {}
            }
        }
    }
    let (Some(sip), Some(admin)) = (sip, admin) else {
        bail!("listeners missing");
    };
    let mut ua = Ua::connect(sip).await?;
    let b = ua.branch();
    ua.send(
        &[
            "OPTIONS sip:alice@example.com SIP/2.0",
            &format!("Via: SIP/2.0/TCP 127.0.0.1:5999;branch={b}"),
            "Max-Forwards: 70",
            "From: <sip:bob@partner.com>;tag=o",
            "To: <sip:alice@example.com>",
            "Call-ID: run-options",
            "CSeq: 1 OPTIONS",
            "Content-Length: 0",
        ],
        b"",
    )
    .await?;
    let r = ua.response().await?;
    assert_eq!(r.status(), Some(200));
    assert!(hv(&r, "Allow").contains("MESSAGE"));

    let mut s = tokio::net::TcpStream::connect(admin).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body)).await??;
    assert!(
        body.contains("legate_sip_requests_total{direction=\"in\",method=\"OPTIONS\"} 1"),
        "{body}"
    );
    assert!(body.contains("legate_sip_responses_total{class=\"2xx\",direction=\"out\"} 1"));
    let mut s = tokio::net::TcpStream::connect(admin).await?;
    s.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut status = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut status)).await??;
    assert!(status.contains("\"sip\""), "{status}");
    assert!(status.contains(&sip.to_string()), "{status}");
    child.start_kill()?;
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    Ok(())
}
