//! `legate run` starts the SIP edge: the real binary (`CARGO_BIN_EXE_legate`) is started on
//! port 0, its `legate: listening sip_tcp <addr>` line tells the test where to connect, a SIP
//! OPTIONS is answered, and the admin endpoint's `/metrics` shows the SIP metrics. The child is
//! killed on drop and every wait is bounded (all of which `common::legate` does).

use anyhow::Result;
use std::time::Duration;

use crate::common::legate::Legate;
use crate::sip_ua::{hv, Ua};

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
    let legate = Legate::start(&cfg, &["sip_tcp", "admin"])?;
    let sip = legate.addr("sip_tcp");
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

    // The counters of the separate `legate` process: only this test moved them.
    let body = legate.metrics().await?;
    assert!(
        body.contains("legate_sip_requests_total{direction=\"in\",method=\"OPTIONS\"} 1"),
        "{body}"
    );
    assert!(body.contains("legate_sip_responses_total{class=\"2xx\",direction=\"out\"} 1"));
    let status = legate.http_get("/status").await?;
    assert!(status.contains("\"sip\""), "{status}");
    assert!(status.contains(&sip.to_string()), "{status}");
    // stderr is a pipe here, as under systemd or with a log file: no colour codes in it.
    // stderr is read by its own thread: the INFO lines may land after the stdout ones.
    legate
        .wait_output("an INFO log line", Duration::from_secs(10), |t| {
            t.contains("INFO")
        })
        .await?;
    let log = legate.output();
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a piped log:\n{log:?}"
    );
    drop(legate);
    Ok(())
}
