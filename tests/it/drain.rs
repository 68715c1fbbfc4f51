//! Drain through the real `legate run` (issue 14 item 5): `legate drain` while a Lync-like
//! edge sends pager MESSAGEs loses nothing (every request is answered, every accepted message
//! reaches alice on a real Prosody), refuses new INVITEs and SUBSCRIBEs with 503 and
//! Retry-After, lets an existing subscription end in its dialog, and reports "done" once it
//! has; SIGTERM closes an s2s stream with `<system-shutdown/>` and exits 0, and a stream
//! opened while draining is refused the same way.

use crate::common;
use crate::reload::pager;
use crate::sip_ua;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use common::certs::CertFactory;
use common::legate::Legate;
use common::rig::{self, lync_edge, Gateway, WAIT};
use common::xmpp_client::{ClientConfig, XmppClient};
use sip_ua::{hv, to_tag};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TEST_TIMEOUT: Duration = Duration::from_secs(120);

async fn status(legate: &Legate) -> serde_json::Value {
    let raw = legate.http_get("/status").await.expect("GET /status");
    let body = raw.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {raw}"))
}

/// A new dialog-creating request from bob (no To tag); the final response.
async fn new_dialog(
    ua: &mut sip_ua::Ua,
    method: &str,
    call_id: &str,
) -> Result<legate::sip::SipMessage> {
    let b = ua.branch();
    let (extra, body): (&[&str], &[u8]) = if method == "INVITE" {
        (
            &["Content-Type: application/sdp"],
            b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=session\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=message 5061 sip null\r\na=accept-types:text/plain\r\n",
        )
    } else {
        (&["Event: presence", "Expires: 3600"], b"")
    };
    let mut lines = vec![
        format!("{method} sip:alice@example.test SIP/2.0"),
        format!("Via: SIP/2.0/TLS sip.partner.test:5061;branch={b}"),
        "Max-Forwards: 70".into(),
        format!("From: <sip:bob@partner.test>;tag={call_id}"),
        "To: <sip:alice@example.test>".into(),
        format!("Call-ID: {call_id}"),
        format!("CSeq: 1 {method}"),
        "Contact: <sip:bob@partner.test;opaque=user:epid:DR1;gruu>".into(),
    ];
    lines.extend(extra.iter().map(|s| s.to_string()));
    lines.push("Content-Length: {CL}".into());
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    ua.send(&refs, body).await?;
    loop {
        let r = ua.response().await?;
        if r.status() != Some(100) {
            return Ok(r);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_during_traffic_loses_nothing_and_refuses_new_sessions() -> Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, scenario())
        .await
        .map_err(|_| anyhow!("test timed out"))?
}

async fn scenario() -> Result<()> {
    let certs = CertFactory::new();
    let ours = certs.leaf("example", &["example.test"]);
    let partner = certs.leaf("partner", &["partner.test", "sip.partner.test"]);
    let prosody = rig::home_node(&[("alice", "pw")], |c| c)?;
    let route = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gw = Gateway::start(&certs, &ours, route.local_addr()?, &prosody, "").await?;
    let mut alice = XmppClient::connect(ClientConfig::plain(
        prosody.c2s_addr(),
        "example.test",
        "alice",
        "pw",
    ))
    .await?;
    alice.send_presence(None, Some("here")).await?;
    let mut bob = lync_edge(&certs, &partner, gw.sip).await?;

    // An existing subscription: bob watches alice.
    let ok = rig::subscribe(&mut bob, "alice@example.test", "drain-sub-1").await?;
    assert_eq!(ok.status(), Some(200), "{}", gw.log());
    let sub_tag = to_tag(&ok);
    let n = bob.request("NOTIFY").await?;
    bob.respond(&n, 200, "OK", &[], None).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while status(&gw.legate).await["sip"]["foreign_watchers"] != 1 {
        assert!(tokio::time::Instant::now() < deadline, "{}", gw.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Traffic, with `legate drain` started in the middle of it.
    let admin = gw.legate.addr("admin").to_string();
    let mut drain_cmd = None;
    let mut sent = Vec::new();
    for n in 1..=30u32 {
        if n == 11 {
            let admin = admin.clone();
            drain_cmd = Some(tokio::task::spawn_blocking(move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_legate"))
                    .args(["drain", "--admin", &admin, "--wait", "60"])
                    .output()
            }));
        }
        let text = format!("message {n}");
        let code = pager(&mut bob, 1000 + n, &text).await?;
        // Every request is answered; pager MESSAGEs are not sessions, so they still pass.
        assert_eq!(code, Some(200), "message {n}\n{}", gw.log());
        sent.push(text);
    }
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let m = alice
            .expect_message_from("bob@partner.test", WAIT)
            .await
            .with_context(|| format!("got {} of {}:\n{}", got.len(), sent.len(), gw.log()))?;
        got.push(m.body.unwrap_or_default());
    }
    got.sort();
    sent.sort();
    assert_eq!(got, sent, "every accepted message is delivered once");

    // Draining: a new session and a new subscription are refused with a retry hint.
    // `legate drain` runs as its own process, started mid-traffic: on a loaded machine its
    // POST may land after the last message, so wait (bounded) for the node to say so.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let doc = status(&gw.legate).await;
        if doc["draining"] == true {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never draining: {doc}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for (method, call_id) in [("INVITE", "drain-im-new"), ("SUBSCRIBE", "drain-sub-new")] {
        let r = new_dialog(&mut bob, method, call_id).await?;
        assert_eq!(r.status(), Some(503), "{method}\n{}", gw.log());
        assert!(
            !hv(&r, "Retry-After").is_empty(),
            "{method}: no Retry-After"
        );
    }

    // The existing subscription ends in its dialog (allowed while draining): then nothing is
    // left and the drain is done.
    let b = bob.branch();
    bob.send(
        &[
            "SUBSCRIBE sip:alice@example.test SIP/2.0",
            &format!("Via: SIP/2.0/TLS sip.partner.test:5061;branch={b}"),
            "Max-Forwards: 70",
            "From: <sip:bob@partner.test>;tag=drain-sub-1-from",
            &format!("To: <sip:alice@example.test>;tag={sub_tag}"),
            "Call-ID: drain-sub-1",
            "CSeq: 2 SUBSCRIBE",
            "Contact: <sip:bob@partner.test;opaque=user:epid:IW1;gruu>",
            "Event: presence",
            "Accept: application/msrtc-event-categories+xml",
            "Expires: 0",
            "Content-Length: {CL}",
        ],
        b"",
    )
    .await?;
    let r = bob.response().await?;
    assert_eq!(r.status(), Some(200), "unsubscribe\n{}", gw.log());
    let out = drain_cmd
        .ok_or_else(|| anyhow!("drain never started"))?
        .await??;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("1 left"),
        "progress not reported:\n{stdout}"
    );
    assert!(stdout.trim_end().ends_with("done"), "{stdout}");
    let doc = status(&gw.legate).await;
    assert_eq!(doc["drain"]["done"], true, "{doc}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_legate"))
        .args(["status", "--admin", &admin])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("DRAINING (maintenance mode): done"), "{text}");
    Ok(())
}

const HDR: &[u8] = b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' version='1.0' to='example.test' from='remote.test'>";

/// Reads until `needle` shows up or the peer closes; everything read.
async fn read_until(s: &mut tokio::net::TcpStream, needle: &str) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            if String::from_utf8_lossy(&out).contains(needle) {
                break;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn open_stream(addr: SocketAddr) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(HDR).await.expect("write header");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_s2s_streams_with_system_shutdown_and_exits_0() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let certs = CertFactory::new();
        let ours = certs.leaf("example", &["example.test"]);
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("legate.toml");
        std::fs::write(
            &path,
            format!(
                r#"[node]
admin_listen = "127.0.0.1:0"
data_dir = "data"
[[local_domain]]
name = "example.test"
cert = "{}"
key = "{}"
[listeners]
sip_tls = "off"
sip_tcp = "off"
xmpp_s2s = "127.0.0.1:0"
xmpp_s2s_direct_tls = "off"
[tls]
trust_bundle = "{}"
[xmpp.federation]
mode = "allow_list"
[[xmpp.federation.domain]]
name = "remote.test"
[limits]
drain_grace_secs = 5
"#,
                ours.cert.display(),
                ours.key.display(),
                certs.ca_path().display()
            ),
        )
        .expect("write config");
        let mut legate =
            Legate::start(&path, &["xmpp_s2s", "admin"]).unwrap_or_else(|e| panic!("{e:#}"));
        let s2s = legate.addr("xmpp_s2s");
        let mut old = open_stream(s2s).await;
        let got = read_until(&mut old, "</stream:features>").await;
        assert!(
            got.contains("<stream:features"),
            "{got}\n{}",
            legate.output()
        );

        // Maintenance mode: a new stream is refused politely; the one already open stays.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_legate"))
            .args([
                "drain",
                "--admin",
                &legate.addr("admin").to_string(),
                "--wait",
                "0",
            ])
            .output()
            .expect("legate drain");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let mut new = open_stream(s2s).await;
        let got = read_until(&mut new, "</stream:stream>").await;
        assert!(
            got.contains("<system-shutdown"),
            "{got}\n{}",
            legate.output()
        );

        // SIGTERM: nothing left to drain, so the open stream is closed with system-shutdown
        // and the process exits 0.
        legate.signal("TERM").expect("SIGTERM");
        let got = read_until(&mut old, "</stream:stream>").await;
        assert!(
            got.contains("<system-shutdown"),
            "{got}\n{}",
            legate.output()
        );
        let st = legate
            .wait_exit(Duration::from_secs(15))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(st.code(), Some(0), "{}", legate.output());
    })
    .await
    .expect("test timed out");
}
