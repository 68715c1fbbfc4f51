//! RFC 7247 addresses and errors and RFC 7572 IM, end to end: the Lync-like test UA (mutual
//! TLS, `partner.test`) ⇄ the real `legate` binary ⇄ a real Prosody home node where alice is
//! logged in (the shared rig, `common::rig`). One legate and one Prosody for every case:
//!
//! - `sip:o'malley@partner.test` reaches alice as `o\27malley@partner.test` (XEP-0106) and her
//!   answer goes back to `sip:o'malley@…`; subject, thread ⇄ Call-ID and `xml:lang` ⇄
//!   `Content-Language` survive both ways; a pager MESSAGE arrives as a `normal` message;
//! - a GRUU (`gr`) is alice's resource to answer, and her answer reaches that very GRUU;
//! - `sips:` requests are refused with 416, never translated (RFC 7247 §8);
//! - every row of RFC 7247 §7.1: alice's client answers a pager MESSAGE with that error, and the
//!   SIP sender (answered 200 at queueing) gets a failure notice naming condition and status;
//! - every specific row of §7.2 (and one code of each class row): the SIP UA refuses alice's
//!   message with that status — a MESSAGE inside an established session, and the INVITE of a
//!   new session — and alice gets that stanza error with her message's id kept;
//! - a subscription from alice to `o\27malley@…` goes out as a SUBSCRIBE to `sip:o'malley@…`.
//!
//! Needs `/usr/bin/prosody` (`apt-get install prosody`).

use crate::common;
use crate::sip_ua;

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use common::certs::CertFactory;
use common::rig::{self, Gateway, WAIT};
use common::xmpp_client::{ClientConfig, XmppClient};
use legate::gateway::interwork::errors::{Status, SIP_TO_XMPP, XMPP_TO_SIP};
use sip_ua::{body_str, hv, Ua};
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc7247_addresses_errors_and_rfc7572_im_end_to_end() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(150), scenario())
        .await
        .map_err(|_| anyhow!("scenario timed out"))?
}

/// A pager MESSAGE from `from` (a name-addr URI) to `ruri`; returns the final status.
async fn pager(
    ua: &mut Ua,
    ruri: &str,
    from: &str,
    call_id: &str,
    extra: &[&str],
    text: &str,
) -> Result<u16> {
    let b = ua.branch();
    let via = format!("Via: SIP/2.0/TLS sip.partner.test:5061;branch={b}");
    let from = format!("From: <{from}>;tag={call_id}-f");
    let to = format!("To: <{ruri}>");
    let cid = format!("Call-ID: {call_id}");
    let req = format!("MESSAGE {ruri} SIP/2.0");
    let mut lines: Vec<&str> = vec![
        &req,
        &via,
        "Max-Forwards: 70",
        &from,
        &to,
        &cid,
        "CSeq: 1 MESSAGE",
    ];
    lines.extend_from_slice(extra);
    lines.push("Content-Type: text/plain; charset=UTF-8");
    lines.push("Content-Length: {CL}");
    ua.send(&lines, text.as_bytes()).await?;
    loop {
        let r = ua.response().await?;
        match r.status() {
            Some(c) if c >= 200 => return Ok(c),
            Some(_) => {}
            None => bail!("response without status"),
        }
    }
}

/// Answers Legate's INVITE for a new IM session with 200 (Contact, SDP) and returns it.
async fn accept_invite(ua: &mut Ua) -> Result<legate::sip::SipMessage> {
    let inv = ua
        .request("INVITE")
        .await
        .context("no INVITE from Legate")?;
    ua.respond(
        &inv,
        200,
        "OK",
        &[("Contact", "<sip:edge@sip.partner.test;transport=tls>")],
        Some((
            "application/sdp",
            b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=session\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=message 5061 sip null\r\na=accept-types:text/plain\r\n",
        )),
    )
    .await?;
    Ok(inv)
}

async fn scenario() -> Result<()> {
    let certs = CertFactory::new();
    let ours = certs.leaf("example", &["example.test"]);
    let partner = certs.leaf("partner", &["partner.test", "sip.partner.test"]);
    let mut prosody = rig::home_node(&[("alice", "pw")], |c| c)?;
    let route = TcpListener::bind("127.0.0.1:0").await?;
    // A short delivery timeout, so the home node's disappearance (last case) is told quickly.
    let extra = "[limits]\ndelivery_timeout_secs = 2\n";
    let gw = Gateway::start(&certs, &ours, route.local_addr()?, &prosody, extra).await?;
    let mut alice = XmppClient::connect(ClientConfig::plain(
        prosody.c2s_addr(),
        "example.test",
        "alice",
        "pw",
    ))
    .await?;
    alice.send_presence(None, None).await?;
    let mut ua = rig::lync_edge(&certs, &partner, gw.sip).await?;

    // --- o'malley, subject, thread, language; pager MESSAGE → normal. -------------------------
    let code = pager(
        &mut ua,
        "sip:alice@example.test",
        "sip:O'Malley@partner.test",
        "rfc7247-omalley-1",
        &["Subject: Lunch?", "Content-Language: fr"],
        "On déjeune ?",
    )
    .await?;
    assert_eq!(code, 200, "{}", gw.log());
    let m = alice
        .expect_message_from("o\\27malley@partner.test", WAIT)
        .await
        .with_context(|| gw.log())?;
    assert_eq!(m.body.as_deref(), Some("On déjeune ?"));
    assert_eq!(m.type_, None, "a pager MESSAGE is a normal message: {m:?}");
    for part in [
        "<subject>Lunch?</subject>",
        "<thread>rfc7247-omalley-1</thread>",
        "xml:lang='fr'",
    ] {
        assert!(m.raw.contains(part), "{part} missing: {m:?}");
    }
    // alice answers in the same thread, in German, with a subject.
    alice
        .send_raw(
            "<message to='o\\27malley@partner.test' type='chat' xml:lang='de' id='om2'>\
             <subject>Re: Lunch?</subject><thread>rfc7247-omalley-1</thread>\
             <body>Gern</body></message>",
        )
        .await?;
    let inv = accept_invite(&mut ua).await.with_context(|| gw.log())?;
    let ruri = inv
        .request_uri()
        .and_then(Result::ok)
        .map(|u| u.as_str().to_owned());
    assert_eq!(ruri.as_deref(), Some("sip:o'malley@partner.test"));
    assert_eq!(
        inv.call_id().ok(),
        Some("rfc7247-omalley-1"),
        "thread → Call-ID"
    );
    let msg = ua.request("MESSAGE").await.with_context(|| gw.log())?;
    ua.respond(&msg, 200, "OK", &[], None).await?;
    assert_eq!(body_str(&msg), "Gern");
    assert_eq!(hv(&msg, "Subject"), "Re: Lunch?");
    assert_eq!(hv(&msg, "Content-Language"), "de");
    assert_eq!(msg.call_id().ok(), Some("rfc7247-omalley-1"));

    // alice adds him as a contact: the SUBSCRIBE names him as his own SIP address.
    alice.subscribe("o\\27malley@partner.test").await?;
    let sub = ua.request("SUBSCRIBE").await.with_context(|| gw.log())?;
    let ruri = sub
        .request_uri()
        .and_then(Result::ok)
        .map(|u| u.as_str().to_owned());
    assert_eq!(ruri.as_deref(), Some("sip:o'malley@partner.test"));
    assert!(
        hv(&sub, "To").contains("<sip:o'malley@partner.test>"),
        "{sub:?}"
    );
    ua.respond(
        &sub,
        200,
        "OK",
        &[
            ("Expires", "3600"),
            ("Contact", "<sip:edge@sip.partner.test;transport=tls>"),
        ],
        None,
    )
    .await?;

    // --- GRUU ⇄ resource. ---------------------------------------------------------------------
    let gruu = "urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6";
    let code = pager(
        &mut ua,
        "sip:alice@example.test",
        &format!("sip:bob@partner.test;gr={gruu}"),
        "rfc7247-gruu-1",
        &[],
        "from my desk phone",
    )
    .await?;
    assert_eq!(code, 200);
    let m = alice.expect_message_from("bob@partner.test", WAIT).await?;
    let full = format!("bob@partner.test/{gruu}");
    assert_eq!(m.from.as_deref(), Some(full.as_str()));
    alice.send_message(&full, "back to that phone").await?;
    let inv = accept_invite(&mut ua).await.with_context(|| gw.log())?;
    let ruri = inv
        .request_uri()
        .and_then(Result::ok)
        .map(|u| u.as_str().to_owned());
    assert_eq!(ruri, Some(format!("sip:bob@partner.test;gr={gruu}")));
    let msg = ua.request("MESSAGE").await?;
    ua.respond(&msg, 200, "OK", &[], None).await?;
    assert_eq!(body_str(&msg), "back to that phone");

    // Lync's form of a GRUU ([MS-SIPRE]): `opaque=user:epid:…;gruu` is the resource, and goes
    // back in the same form, so the Lync edge reaches the endpoint it named.
    let epid = "user:epid:AbCdEf01gHiJkLmNo_pqRsAA";
    let code = pager(
        &mut ua,
        "sip:alice@example.test",
        &format!("sip:carol@partner.test;opaque={epid};gruu"),
        "rfc7247-gruu-lync",
        &[],
        "from my Lync desktop",
    )
    .await?;
    assert_eq!(code, 200);
    let m = alice
        .expect_message_from("carol@partner.test", WAIT)
        .await?;
    let carol = format!("carol@partner.test/{epid}");
    assert_eq!(m.from.as_deref(), Some(carol.as_str()));
    alice.send_message(&carol, "back to that desktop").await?;
    let inv = accept_invite(&mut ua).await.with_context(|| gw.log())?;
    let ruri = inv
        .request_uri()
        .and_then(Result::ok)
        .map(|u| u.as_str().to_owned());
    assert_eq!(
        ruri,
        Some(format!("sip:carol@partner.test;opaque={epid};gruu"))
    );
    let msg = ua.request("MESSAGE").await?;
    ua.respond(&msg, 200, "OK", &[], None).await?;
    assert_eq!(body_str(&msg), "back to that desktop");

    // --- sips: is never translated. -------------------------------------------------------------
    for (ruri, from) in [
        ("sips:alice@example.test", "sip:bob@partner.test"),
        ("sip:alice@example.test", "sips:bob@partner.test"),
    ] {
        let code = pager(&mut ua, ruri, from, "rfc7247-sips", &[], "secure?").await?;
        assert_eq!(code, 416, "{ruri} from {from}");
    }

    // --- RFC 7247 §7.1, every row: an XMPP error after the 200 reaches the SIP sender. ---------
    for (i, row) in XMPP_TO_SIP.iter().enumerate() {
        let cond = row.condition.as_str();
        let code = pager(
            &mut ua,
            "sip:alice@example.test",
            "sip:bob@partner.test",
            &format!("rfc7247-x2s-{i}"),
            &[],
            &format!("row {cond}"),
        )
        .await?;
        assert_eq!(code, 200, "{cond}");
        let want = format!("row {cond}");
        alice
            .next_stanza_matching(|s| s.body.as_deref() == Some(want.as_str()), WAIT)
            .await
            .with_context(|| format!("{cond}: alice got nothing\n{}", gw.log()))?;
        alice
            .send_raw(&format!(
                "<message to='bob@partner.test' type='error' id='e{i}'><error type='cancel'>\
                 <{cond} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"
            ))
            .await?;
        let notice = ua
            .request("MESSAGE")
            .await
            .with_context(|| format!("{cond}: no failure notice\n{}", gw.log()))?;
        ua.respond(&notice, 200, "OK", &[], None).await?;
        let text = body_str(&notice);
        let expect = format!("{cond} ({} {})", row.status, row.reason);
        assert!(text.contains(&expect), "{cond}: {text:?} lacks {expect:?}");
    }

    // --- RFC 7247 §7.2, every row: the SIP UA refuses alice's message with that status. -------
    let codes: Vec<(u16, &str)> = SIP_TO_XMPP
        .iter()
        .map(|r| {
            let code = match r.status {
                Status::Code(c) => c,
                // A code no specific row names stands for its class.
                Status::Class(3) => 399,
                Status::Class(c) => c * 100 + 99,
            };
            (code, r.condition.as_str())
        })
        .collect();
    // Inside the session alice and bob already have: his UA refuses one MESSAGE per row. 408
    // and 481 are left to the INVITE loop below: they mean "session lost" and make Legate
    // reopen the session for that message (RFC 3261 §12.2.1.2) instead of failing it.
    for (code, cond) in codes.iter().filter(|(c, _)| !matches!(c, 408 | 481)) {
        alice
            .send_raw(&format!(
                "<message to='{full}' type='chat' id='s{code}'><body>in session, to {code}</body></message>"
            ))
            .await?;
        let m = ua
            .request("MESSAGE")
            .await
            .with_context(|| format!("{code}: no MESSAGE\n{}", gw.log()))?;
        ua.respond(&m, *code, "Refused For The Test", &[], None)
            .await?;
        let err = alice
            .next_stanza_matching(
                |s| {
                    s.name == "message"
                        && s.is_type("error")
                        && s.sender_bare() == Some("bob@partner.test")
                },
                WAIT,
            )
            .await
            .with_context(|| format!("{code}: alice got no error\n{}", gw.log()))?;
        assert!(err.has_child(cond), "{code} should be <{cond}/>: {err:?}");
        assert_eq!(err.id, Some(format!("s{code}")), "the id is kept: {err:?}");
    }
    for (code, cond) in codes {
        let user = format!("u{code}@partner.test");
        alice
            .send_raw(&format!(
                "<message to='{user}' type='chat' id='i{code}'><body>to {code}</body></message>"
            ))
            .await?;
        let inv = ua
            .request("INVITE")
            .await
            .with_context(|| format!("{code}: no INVITE\n{}", gw.log()))?;
        ua.respond(&inv, code, "Refused For The Test", &[], None)
            .await?;
        let err = alice
            .next_stanza_matching(
                |s| s.name == "message" && s.is_type("error") && s.sender_bare() == Some(&user),
                WAIT,
            )
            .await
            .with_context(|| format!("{code}: alice got no error\n{}", gw.log()))?;
        assert!(err.has_child(cond), "{code} should be <{cond}/>: {err:?}");
        assert_eq!(err.id, Some(format!("i{code}")), "the id is kept: {err:?}");
    }
    // --- Late errors the home node and Legate produce themselves. ------------------------------
    // No such user: Prosody answers the (already accepted) MESSAGE with an error.
    let code = pager(
        &mut ua,
        "sip:nobody@example.test",
        "sip:bob@partner.test",
        "rfc7247-nobody",
        &[],
        "anyone?",
    )
    .await?;
    assert_eq!(code, 200);
    // The notice comes from nobody@example.test, a new pair: it opens its own session.
    accept_invite(&mut ua).await.with_context(|| gw.log())?;
    let notice = ua.request("MESSAGE").await.with_context(|| gw.log())?;
    ua.respond(&notice, 200, "OK", &[], None).await?;
    let text = body_str(&notice);
    assert!(
        text.starts_with("Message not delivered to nobody@example.test: "),
        "{text:?}"
    );
    // The home node goes away: the MESSAGE is accepted (queued for the link), and when the link
    // stays down past the delivery timeout the sender hears it once, as remote-server-timeout.
    prosody.kill();
    drop(alice);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let code = pager(
        &mut ua,
        "sip:alice@example.test",
        "sip:bob@partner.test",
        "rfc7247-down",
        &[],
        "are you there?",
    )
    .await?;
    assert_eq!(code, 200, "{}", gw.log());
    let notice = ua.request("MESSAGE").await.with_context(|| gw.log())?;
    ua.respond(&notice, 200, "OK", &[], None).await?;
    let text = body_str(&notice);
    assert!(
        text.contains("remote-server-timeout (408 Request Timeout)"),
        "{text:?}"
    );
    // The sender is told exactly once.
    let again = tokio::time::timeout(Duration::from_secs(3), ua.request("MESSAGE")).await;
    assert!(again.is_err(), "a second report: {again:?}");
    drop(route);
    Ok(())
}
