//! The mission path end to end, every hop real: a Lync-like foreign edge (the Rust test UA,
//! mutual TLS with a `partner.test` certificate) ⇄ the real `legate` binary ⇄ the XEP-0114
//! component link ⇄ a real Prosody 0.12 home node for `example.test`, where alice is logged in
//! with an XMPP client.
//!
//! Proven here: a Lync watcher subscribes to alice, alice approves in her client, the watcher
//! gets NOTIFYs whose msrtc bodies are alice's XMPP presence translated through the default
//! tables; an IM session opened by the Lync side (first message in `ms-text-format`) reaches
//! alice, and her reply comes back as a MESSAGE inside the same SIP dialog; alice subscribes to
//! the Lync user and sees his msrtc availability as XMPP presence; the TLS connection of a
//! domain not federated is closed after its handshake (its certificate proves no federated
//! domain) and alice receives nothing.
//!
//! Needs `/usr/bin/prosody` (`apt-get install prosody`).

use crate::common;
use crate::sip_ua;

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use common::certs::CertFactory;
use common::rig::{self, lync_edge, msrtc, notify_until, Gateway, WAIT};
use common::xmpp_client::{ClientConfig, XmppClient};
use sip_ua::{body_str, hv};
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lync_and_xmpp_users_see_each_other_and_chat() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(90), scenario())
        .await
        .map_err(|_| anyhow!("scenario timed out"))?
}

async fn scenario() -> Result<()> {
    let certs = CertFactory::new();
    let ours = certs.leaf("example", &["example.test"]);
    let partner = certs.leaf("partner", &["partner.test", "sip.partner.test"]);
    let stranger = certs.leaf("stranger", &["stranger.test"]);
    let prosody = rig::home_node(&[("alice", "pw")], |c| c)?;
    let route = TcpListener::bind("127.0.0.1:0").await?;
    let gw = Gateway::start(&certs, &ours, route.local_addr()?, &prosody, "").await?;

    let mut alice = XmppClient::connect(ClientConfig::plain(
        prosody.c2s_addr(),
        "example.test",
        "alice",
        "pw",
    ))
    .await?;
    alice.send_presence(None, Some("at my desk")).await?;

    // --- A Lync watcher subscribes to alice. ---------------------------------------------------
    let mut bob = lync_edge(&certs, &partner, gw.sip).await?;
    let b = bob.branch();
    bob.send(
        &[
            "SUBSCRIBE sip:alice@example.test SIP/2.0",
            &format!("Via: SIP/2.0/TLS sip.partner.test:5061;branch={b}"),
            "Max-Forwards: 70",
            "From: <sip:bob@partner.test>;tag=bob1",
            "To: <sip:alice@example.test>",
            "Call-ID: iw-sub-1",
            "CSeq: 1 SUBSCRIBE",
            "Contact: <sip:bob@partner.test;opaque=user:epid:IW1;gruu>",
            "Event: presence",
            "Accept: application/msrtc-event-categories+xml",
            "Expires: 3600",
            "Content-Length: {CL}",
        ],
        b"",
    )
    .await?;
    let ok = bob.response().await?;
    assert_eq!(ok.status(), Some(200), "{}", gw.log());
    let n = bob.request("NOTIFY").await?;
    assert!(
        hv(&n, "Subscription-State").starts_with("pending"),
        "{}",
        hv(&n, "Subscription-State")
    );
    bob.respond(&n, 200, "OK", &[], None).await?;

    // alice's client is asked, through Prosody, and approves.
    alice
        .expect_presence_from("bob@partner.test", Some("subscribe"), WAIT)
        .await
        .with_context(|| format!("alice got no subscription request:\n{}", gw.log()))?;
    alice.approve("bob@partner.test").await?;

    // The watcher now sees alice available, with her own text (msrtc 3500 = Lync Available).
    let body = notify_until(&mut bob, "alice available", |b| b.contains(">3500<")).await?;
    assert!(body.contains("at my desk"), "{body}");

    // alice goes Do Not Disturb: Table 6 maps XMPP dnd to Lync busy (6500); her text survives.
    alice
        .send_presence(Some("dnd"), Some("Writing the report"))
        .await?;
    let body = notify_until(&mut bob, "alice busy", |b| b.contains(">6500<")).await?;
    assert!(body.contains("Writing the report"), "{body}");

    // --- The Lync user opens an IM session; the first message rides in ms-text-format. ------
    let im_tag = rig::invite_im(&mut bob, "iw-im-1", "im1", "Hello Alice, from Lync")
        .await
        .with_context(|| gw.log())?;
    let m = alice
        .expect_message_from("bob@partner.test", WAIT)
        .await
        .with_context(|| gw.log())?;
    assert_eq!(m.body.as_deref(), Some("Hello Alice, from Lync"));

    // alice answers in her client: it comes back inside the same SIP dialog.
    alice
        .send_message("bob@partner.test", "Hi Bob <3 & welcome")
        .await?;
    let m = bob
        .request("MESSAGE")
        .await
        .with_context(|| format!("no MESSAGE back:\n{}", gw.log()))?;
    assert_eq!(m.call_id().ok(), Some("iw-im-1"));
    assert_eq!(body_str(&m), "Hi Bob <3 & welcome");
    bob.respond(&m, 200, "OK", &[], None).await?;

    // A second message from the Lync side inside the dialog.
    let b = bob.branch();
    bob.send(
        &[
            "MESSAGE sip:alice@example.test SIP/2.0",
            &format!("Via: SIP/2.0/TLS sip.partner.test:5061;branch={b}"),
            "Max-Forwards: 70",
            "From: <sip:bob@partner.test>;tag=im1",
            &format!("To: <sip:alice@example.test>;tag={im_tag}"),
            "Call-ID: iw-im-1",
            "CSeq: 2 MESSAGE",
            "Content-Type: text/plain; charset=UTF-8",
            "Content-Length: {CL}",
        ],
        "Ça marche très bien".as_bytes(),
    )
    .await?;
    assert_eq!(bob.response().await?.status(), Some(200));
    let m = alice.expect_message_from("bob@partner.test", WAIT).await?;
    assert_eq!(m.body.as_deref(), Some("Ça marche très bien"));

    // --- alice subscribes to the Lync user. Legate reuses the live TLS connection the partner's
    // edge opened (as Lync edges expect) rather than opening a second one.
    alice.subscribe("bob@partner.test").await?;
    let partner_side = &mut bob;
    let sub = partner_side.request("SUBSCRIBE").await?;
    assert_eq!(hv(&sub, "Event"), "presence");
    assert!(sub
        .to_bytes()
        .windows(b"bob@partner.test".len())
        .any(|w| w == b"bob@partner.test"));
    partner_side
        .respond(&sub, 200, "OK", &[("Expires", "3600")], None)
        .await?;
    // The partner notifies: Lync "Away" (15500) with a personal note.
    let b = partner_side.branch();
    let body = msrtc(15500, None);
    let from_tag = sip_ua::from_tag(&sub);
    let our_contact = hv(&sub, "Contact")
        .trim_start_matches('<')
        .split('>')
        .next()
        .unwrap_or("")
        .to_string();
    partner_side
        .send(
            &[
                &format!("NOTIFY {our_contact} SIP/2.0"),
                &format!("Via: SIP/2.0/TLS sip.partner.test:5061;branch={b}"),
                "Max-Forwards: 70",
                "From: <sip:bob@partner.test>;tag=bobnotify",
                &format!("To: <sip:alice@example.test>;tag={from_tag}"),
                &format!("Call-ID: {}", sub.call_id().map_err(|e| anyhow!("{e}"))?),
                "CSeq: 1 NOTIFY",
                "Event: presence",
                "Subscription-State: active;expires=3600",
                "Content-Type: application/msrtc-event-categories+xml",
                "Content-Length: {CL}",
            ],
            body.as_bytes(),
        )
        .await?;
    assert_eq!(
        partner_side.response().await?.status(),
        Some(200),
        "{}",
        gw.log()
    );
    let p = alice
        .next_stanza_matching(
            |s| {
                s.name == "presence"
                    && s.sender_bare() == Some("bob@partner.test")
                    && s.type_.is_none()
            },
            WAIT,
        )
        .await
        .with_context(|| format!("alice sees no presence from bob:\n{}", gw.log()))?;
    assert_eq!(p.show.as_deref(), Some("away"), "{p:?}");

    // --- A domain that is not federated is closed; alice receives nothing. --------------------
    let mut intruder = lync_edge(&certs, &stranger, gw.sip).await?;
    let b = intruder.branch();
    // The edge may already have closed: a failed write is part of the expected outcome.
    let _ = intruder
        .send(
            &[
                "MESSAGE sip:alice@example.test SIP/2.0",
                &format!("Via: SIP/2.0/TLS sip.stranger.test:5061;branch={b}"),
                "Max-Forwards: 70",
                "From: <sip:eve@stranger.test>;tag=eve",
                "To: <sip:alice@example.test>",
                "Call-ID: iw-eve-1",
                "CSeq: 1 MESSAGE",
                "Content-Type: text/plain",
                "Content-Length: {CL}",
            ],
            b"let me in",
        )
        .await;
    assert!(
        intruder.closed().await,
        "the stranger's connection stayed open"
    );
    let leaked = alice
        .next_stanza_matching(
            |s| s.sender_bare() == Some("eve@stranger.test"),
            Duration::from_millis(800),
        )
        .await;
    assert!(
        leaked.is_err(),
        "a refused domain reached alice: {leaked:?}"
    );
    drop(route);
    Ok(())
}
