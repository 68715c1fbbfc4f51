//! A user's presence is the aggregate of their resources (RFC 6121 §4.7.2), through the real
//! `legate` binary, a real Prosody home node and the SIP test UA as a Lync watcher (the rig of
//! `common::rig`). Issue 11's case: alice's desktop is "dnd / Busy thing", her phone "Free";
//! when the phone signs off the watcher still sees her busy with her note, never `closed`.
//!
//! Needs `/usr/bin/prosody` (`apt-get install prosody`).

use crate::common;

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use common::certs::CertFactory;
use common::rig::{self, Gateway, WAIT};
use common::xmpp_client::{ClientConfig, XmppClient};
use legate::presence::codec::msrtc::decode_msrtc;
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_device_signing_off_leaves_the_first_visible() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(90), scenario())
        .await
        .map_err(|_| anyhow!("scenario timed out"))?
}

fn availability(body: &str) -> Option<u32> {
    decode_msrtc(body.as_bytes()).ok()?.availability
}

async fn scenario() -> Result<()> {
    let certs = CertFactory::new();
    let ours = certs.leaf("example", &["example.test"]);
    let partner = certs.leaf("partner", &["partner.test", "sip.partner.test"]);
    let prosody = rig::home_node(&[("alice", "pw")], |c| c)?;
    let route = TcpListener::bind("127.0.0.1:0").await?;
    let gw = Gateway::start(&certs, &ours, route.local_addr()?, &prosody, "").await?;

    let device = |resource: &str| {
        let mut c = ClientConfig::plain(prosody.c2s_addr(), "example.test", "alice", "pw");
        c.resource = resource.to_string();
        c
    };
    let mut desktop = XmppClient::connect(device("desktop")).await?;
    desktop
        .send_presence(Some("dnd"), Some("Busy thing"))
        .await?;

    let mut bob = rig::lync_edge(&certs, &partner, gw.sip).await?;
    let ok = rig::subscribe(&mut bob, "alice@example.test", "agg-1").await?;
    assert_eq!(ok.status(), Some(200), "{}", gw.log());
    desktop
        .expect_presence_from("bob@partner.test", Some("subscribe"), WAIT)
        .await
        .with_context(|| format!("alice got no subscription request:\n{}", gw.log()))?;
    desktop.approve("bob@partner.test").await?;
    // XMPP dnd is Lync busy (Table 6: 6500), with her text.
    let body = rig::notify_until(&mut bob, "alice busy", |b| availability(b) == Some(6500))
        .await
        .with_context(|| gw.log())?;
    assert!(body.contains("Busy thing"), "{body}");

    // The phone comes online "Free": on equal priority the more available resource shows.
    let mut phone = XmppClient::connect(device("phone")).await?;
    phone.send_presence(None, Some("Free")).await?;
    let body = rig::notify_until(&mut bob, "alice available", |b| {
        availability(b) == Some(3500)
    })
    .await
    .with_context(|| gw.log())?;
    assert!(body.contains("Free"), "{body}");

    // The phone signs off: the desktop's state comes back, not offline.
    phone.close().await;
    let body = rig::notify_until(&mut bob, "alice no longer available", |b| {
        availability(b) != Some(3500)
    })
    .await
    .with_context(|| gw.log())?;
    assert_eq!(availability(&body), Some(6500), "{body}\n{}", gw.log());
    assert!(body.contains("Busy thing"), "{body}");
    // And nothing later says otherwise (a `closed` NOTIFY would be the bug of issue 11).
    if !bob.quiet(Duration::from_millis(1500)).await {
        let n = bob.request("NOTIFY").await?;
        bob.respond(&n, 200, "OK", &[], None).await?;
        let b = crate::sip_ua::body_str(&n);
        assert_eq!(availability(&b), Some(6500), "a later NOTIFY: {b}");
    }

    // The last device leaves: now she is offline (Lync 18000 and above).
    desktop.close().await;
    let body = rig::notify_until(&mut bob, "alice offline", |b| {
        availability(b).is_some_and(|a| a >= 18000)
    })
    .await
    .with_context(|| gw.log())?;
    assert!(!body.contains("Busy thing"), "{body}");
    drop(route);
    Ok(())
}
