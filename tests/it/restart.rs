//! Restart without blanks (issue 11, item 3), every hop real: the `legate` binary between a
//! Lync-like edge (the SIP test UA over mutual TLS) and a real Prosody home node, killed with
//! SIGKILL and started again on the same `node.data_dir`.
//!
//! Proven here: the subscriptions of both roles are in the state store before the kill; after
//! the restart the Lync watcher gets a NOTIFY with alice's *current* state (changed while
//! Legate was down) within a second of the component link coming up, in its old dialog; alice's
//! subscription to her Lync contact is refreshed in its old dialog and his presence reaches her
//! again without re-adding him; nothing was sent to the home node before its link existed. And
//! when the state is lost altogether, alice signing in again (Prosody probes her contacts)
//! makes Legate subscribe to her Lync contact anew.
//!
//! Needs `/usr/bin/prosody` (`apt-get install prosody`).

use crate::common;
use crate::sip_ua;

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use common::certs::CertFactory;
use common::rig::{self, accept_lync, lync_edge, msrtc, notify_until, Gateway, WAIT};
use common::xmpp_client::{ClientConfig, XmppClient};
use sip_ua::{hv, Ua};
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_start_again_loses_no_presence() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(120), scenario())
        .await
        .map_err(|_| anyhow!("scenario timed out"))?
}

/// The partner's NOTIFY of bob's msrtc `availability` in the dialog of Legate's `sub`.
async fn notify_bob(
    ua: &mut Ua,
    sub: &legate::sip::SipMessage,
    cseq: u32,
    availability: u32,
) -> Result<()> {
    let contact = hv(sub, "Contact")
        .trim_start_matches('<')
        .split('>')
        .next()
        .unwrap_or("")
        .to_string();
    let b = ua.branch();
    let body = msrtc(availability, None);
    ua.send(
        &[
            &format!("NOTIFY {contact} SIP/2.0"),
            &format!("Via: SIP/2.0/TLS sip.partner.test:5061;branch={b}"),
            "Max-Forwards: 70",
            "From: <sip:bob@partner.test>;tag=uatag",
            &format!("To: <sip:alice@example.test>;tag={}", sip_ua::from_tag(sub)),
            &format!("Call-ID: {}", sub.call_id().map_err(|e| anyhow!("{e}"))?),
            &format!("CSeq: {cseq} NOTIFY"),
            "Event: presence",
            "Subscription-State: active;expires=3600",
            "Content-Type: application/msrtc-event-categories+xml",
            "Content-Length: {CL}",
        ],
        body.as_bytes(),
    )
    .await?;
    let r = ua.response().await?;
    anyhow::ensure!(r.status() == Some(200), "NOTIFY answered {:?}", r.status());
    Ok(())
}

/// Waits until alice's client sees bob with `show` (None: available).
async fn bob_seen_as(alice: &mut XmppClient, show: Option<&str>, gw: &Gateway) -> Result<()> {
    let p = alice
        .next_stanza_matching(
            |s| {
                s.name == "presence"
                    && s.sender_bare() == Some("bob@partner.test")
                    && s.type_.is_none()
                    && s.show.as_deref() == show
            },
            WAIT,
        )
        .await
        .with_context(|| format!("alice does not see bob as {show:?}:\n{}", gw.log()))?;
    drop(p);
    Ok(())
}

async fn scenario() -> Result<()> {
    let certs = CertFactory::new();
    let ours = certs.leaf("example", &["example.test"]);
    let partner = certs.leaf("partner", &["partner.test", "sip.partner.test"]);
    let prosody = rig::home_node(&[("alice", "pw")], |c| c)?;
    let route = TcpListener::bind("127.0.0.1:0").await?;
    let mut gw = Gateway::start(&certs, &ours, route.local_addr()?, &prosody, "").await?;
    let mut alice = XmppClient::connect(ClientConfig::plain(
        prosody.c2s_addr(),
        "example.test",
        "alice",
        "pw",
    ))
    .await?;
    alice.send_presence(None, Some("at my desk")).await?;

    // --- Before: the Lync watcher bob follows alice, alice follows bob. ----------------------
    let mut bob = lync_edge(&certs, &partner, gw.sip).await?;
    let ok = rig::subscribe(&mut bob, "alice@example.test", "rs-watch").await?;
    assert_eq!(ok.status(), Some(200), "{}", gw.log());
    let watch_tag = sip_ua::to_tag(&ok);
    alice
        .expect_presence_from("bob@partner.test", Some("subscribe"), WAIT)
        .await
        .with_context(|| format!("alice got no subscription request:\n{}", gw.log()))?;
    alice.approve("bob@partner.test").await?;
    notify_until(&mut bob, "alice available", |b| b.contains(">3500<")).await?;

    alice.subscribe("bob@partner.test").await?;
    let sub = bob.request("SUBSCRIBE").await?;
    bob.respond(&sub, 200, "OK", &[("Expires", "3600")], None)
        .await?;
    notify_bob(&mut bob, &sub, 1, 15500).await?;
    bob_seen_as(&mut alice, Some("away"), &gw).await?;

    // Both subscriptions reach the journal (written within a second of changing).
    let journal = gw.dir().join("state.journal");
    let deadline = Instant::now() + WAIT;
    loop {
        let j = std::fs::read(&journal).unwrap_or_default();
        let has = |s: &str| j.windows(s.len()).any(|w| w == s.as_bytes());
        if has("sip/s/alice@example.test/bob@partner.test") && has("rs-watch") {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "subscriptions not in the store:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // --- kill -9; alice changes her state while Legate is down. -------------------------------
    gw.legate.kill();
    drop(bob);
    alice
        .send_presence(Some("dnd"), Some("Writing the report"))
        .await?;
    let restarted = Instant::now();
    gw.restart().await?;
    let link_up = Instant::now();

    // Legate has no connection to the partner any more: it dials the route. First comes the
    // refresh of alice's subscription to bob, in its old dialog.
    let mut edge = accept_lync(&route, &partner).await?;
    let refresh = edge.request("SUBSCRIBE").await?;
    assert_eq!(
        refresh.call_id().ok(),
        sub.call_id().ok(),
        "the old dialog is refreshed"
    );
    assert_eq!(sip_ua::to_tag(&refresh), "uatag", "in the old dialog");
    assert!(refresh.cseq().map(|c| c.seq).unwrap_or(0) > sub.cseq().map(|c| c.seq).unwrap_or(0));
    edge.respond(&refresh, 200, "OK", &[("Expires", "3600")], None)
        .await?;

    // (a) The watcher hears alice's current state (dnd → Lync busy 6500) in its old dialog,
    // within a second of the link coming up.
    let n = loop {
        let n = edge
            .request("NOTIFY")
            .await
            .with_context(|| format!("no NOTIFY for the Lync watcher:\n{}", gw.log()))?;
        edge.respond(&n, 200, "OK", &[], None).await?;
        if sip_ua::body_str(&n).contains(">6500<") {
            break n;
        }
    };
    let waited = link_up.elapsed();
    assert_eq!(n.call_id().ok(), Some("rs-watch"));
    assert_eq!(sip_ua::from_tag(&n), watch_tag, "the watcher's old dialog");
    let body = sip_ua::body_str(&n);
    assert!(body.contains("Writing the report"), "{body}");
    assert!(
        waited < Duration::from_secs(1),
        "NOTIFY {waited:?} after the link came up:\n{}",
        gw.log()
    );
    eprintln!(
        "restart: started again {:?} after the kill; watcher NOTIFY {waited:?} after link up",
        link_up - restarted
    );

    // (b) alice's Lync contact comes back without re-adding: bob is available now.
    notify_bob(&mut edge, &refresh, 2, 3500).await?;
    bob_seen_as(&mut alice, None, &gw).await?;

    // The admin status shows the store the node restored from.
    let status = gw.legate.http_get("/status").await?;
    let json = status.split("\r\n\r\n").nth(1).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(json).context("status JSON")?;
    assert_eq!(v["store"]["kind"], "embedded", "{status}");
    assert!(v["store"]["keys"].as_u64().unwrap_or(0) >= 2, "{status}");

    let log = gw.log();
    assert!(
        !log.contains("destination link unavailable"),
        "something was sent to the home node before its link was up:\n{log}"
    );
    drop(route);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_probe_brings_back_a_contact_whose_subscription_was_lost() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(120), probe_scenario())
        .await
        .map_err(|_| anyhow!("scenario timed out"))?
}

/// alice follows bob; the node loses its state entirely (journal deleted while it is down);
/// alice signs in again: Prosody's presence probe toward bob makes Legate subscribe anew and
/// bob's presence reaches her — the contact never stays offline for want of a re-add.
async fn probe_scenario() -> Result<()> {
    let certs = CertFactory::new();
    let ours = certs.leaf("example", &["example.test"]);
    let partner = certs.leaf("partner", &["partner.test", "sip.partner.test"]);
    let prosody = rig::home_node(&[("alice", "pw")], |c| c)?;
    let route = TcpListener::bind("127.0.0.1:0").await?;
    let mut gw = Gateway::start(&certs, &ours, route.local_addr()?, &prosody, "").await?;
    let login = || {
        XmppClient::connect(ClientConfig::plain(
            prosody.c2s_addr(),
            "example.test",
            "alice",
            "pw",
        ))
    };
    let mut alice = login().await?;
    alice.send_presence(None, None).await?;
    alice.subscribe("bob@partner.test").await?;
    let mut edge = accept_lync(&route, &partner).await?;
    let sub = edge.request("SUBSCRIBE").await?;
    edge.respond(&sub, 200, "OK", &[("Expires", "3600")], None)
        .await?;
    notify_bob(&mut edge, &sub, 1, 3500).await?;
    bob_seen_as(&mut alice, None, &gw).await?;
    alice.close().await;

    gw.legate.kill();
    drop(edge);
    std::fs::remove_file(gw.dir().join("state.journal")).context("the journal")?;
    gw.restart().await?;

    let mut alice = login().await?;
    alice.send_presence(None, None).await?;
    let mut edge = accept_lync(&route, &partner)
        .await
        .with_context(|| format!("no SUBSCRIBE after alice's sign-in probe:\n{}", gw.log()))?;
    let fresh = edge.request("SUBSCRIBE").await?;
    assert_ne!(
        fresh.call_id().ok(),
        sub.call_id().ok(),
        "a new subscription"
    );
    assert_eq!(hv(&fresh, "Event"), "presence");
    edge.respond(&fresh, 200, "OK", &[("Expires", "3600")], None)
        .await?;
    notify_bob(&mut edge, &fresh, 1, 15500).await?;
    bob_seen_as(&mut alice, Some("away"), &gw).await?;
    drop(route);
    Ok(())
}
