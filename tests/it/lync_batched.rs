//! Lync / Skype for Business batched presence subscriptions ([MS-PRES] §2.2.2.4, RFC 4662)
//! through the real `legate` binary and a real Prosody home node (the rig of `common::rig`):
//! one SUBSCRIBE to the watcher's own URI lists three users of `example.test` (and one contact
//! that is not ours); each user approves in their XMPP client; a second batched SUBSCRIBE then
//! gets one RLMI NOTIFY whose three msrtc parts carry the three users' states; a user blocking
//! the watcher (`legate policy block`) shows offline in the list, politely.
//!
//! The SUBSCRIBE is the one kept in `tests/data/sip/lync-batched/subscribe-three.sip`.
//! Needs `/usr/bin/prosody` (`apt-get install prosody`).

use crate::common;
use crate::sip_ua::{hv, Ua};

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use common::certs::CertFactory;
use common::rig::{self, accept_lync, Gateway, WAIT};
use common::xmpp_client::{ClientConfig, XmppClient};
use legate::presence::codec::{msrtc, rlmi};
use legate::sip::SipMessage;
use tokio::net::TcpListener;

const TEMPLATE: &str = include_str!("../data/sip/lync-batched/subscribe-three.sip");
const USERS: [&str; 3] = ["alice", "carol", "dave"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_subscribe_for_three_contacts_gets_one_rlmi_notify() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(90), scenario())
        .await
        .map_err(|_| anyhow!("scenario timed out"))?
}

/// Sends the kept batched SUBSCRIBE from `bob@partner.test` for `contacts`.
async fn batch_subscribe(
    ua: &mut Ua,
    call_id: &str,
    contacts: &[String],
    piggyback: bool,
) -> Result<()> {
    let resources: String = contacts
        .iter()
        .map(|c| format!("<resource uri=\"sip:{c}\"/>"))
        .collect();
    let branch = ua.branch();
    let text = TEMPLATE
        .replace("{watcher}", "bob@partner.test")
        .replace("{branch}", &branch)
        .replace("{tag}", &format!("{call_id}-tag"))
        .replace("{call_id}", call_id)
        .replace(
            "{piggyback}",
            if piggyback {
                "ms-piggyback-first-notify"
            } else {
                "com.microsoft.autoextend"
            },
        )
        .replace("{resources}", &resources);
    let (head, body) = text
        .split_once("\n\n")
        .ok_or_else(|| anyhow!("template has no body"))?;
    let lines: Vec<&str> = head.lines().collect();
    ua.send(&lines, body.trim_end().as_bytes()).await
}

/// Each listed resource's URI and the msrtc availability of its part (if it has one).
type States = Vec<(String, Option<u32>)>;

/// The RLMI list of a multipart message and the msrtc availability of each resource's part.
fn rlmi_of(m: &SipMessage) -> Result<(rlmi::List, States)> {
    let ct = hv(m, "Content-Type");
    let parts = rlmi::decode_related(ct, m.body()).with_context(|| format!("multipart: {ct}"))?;
    let first = parts.first().ok_or_else(|| anyhow!("no parts"))?;
    let list = rlmi::decode_rlmi(&first.body)?;
    let mut states = Vec::new();
    for r in &list.resources {
        let cid = r.instances.first().and_then(|i| i.cid.clone());
        let part = cid.and_then(|c| parts.iter().find(|p| p.content_id == c));
        let av = match part {
            Some(p) => msrtc::decode_msrtc(&p.body)?.availability,
            None => None,
        };
        states.push((r.uri.clone(), av));
    }
    Ok((list, states))
}

/// Answers NOTIFYs until one of dialog `call_id` satisfies `want`.
async fn rlmi_notify_until(
    ua: &mut Ua,
    call_id: &str,
    what: &str,
    want: impl Fn(&rlmi::List, &[(String, Option<u32>)]) -> bool,
) -> Result<(SipMessage, rlmi::List, States)> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if tokio::time::Instant::now() > deadline {
            bail!("no RLMI NOTIFY with {what}");
        }
        let n = ua
            .request("NOTIFY")
            .await
            .with_context(|| format!("waiting for {what}"))?;
        ua.respond(&n, 200, "OK", &[], None).await?;
        if n.call_id().ok() != Some(call_id) {
            continue;
        }
        let (list, states) = rlmi_of(&n)?;
        if want(&list, &states) {
            return Ok((n, list, states));
        }
    }
}

async fn scenario() -> Result<()> {
    let certs = CertFactory::new();
    let ours = certs.leaf("example", &["example.test"]);
    let partner = certs.leaf("partner", &["partner.test", "sip.partner.test"]);
    let users: Vec<(&str, &str)> = USERS.iter().map(|u| (*u, "pw")).collect();
    let prosody = rig::home_node(&users, |c| c)?;
    let route = TcpListener::bind("127.0.0.1:0").await?;
    let mut gw = Gateway::start(&certs, &ours, route.local_addr()?, &prosody, "").await?;

    // Three users, three states: available, dnd (Lync busy), away.
    let mut clients = Vec::new();
    for (user, (show, text)) in USERS.iter().zip([
        (None, "at my desk"),
        (Some("dnd"), "Writing"),
        (Some("away"), "Lunch"),
    ]) {
        let mut c = XmppClient::connect(ClientConfig::plain(
            prosody.c2s_addr(),
            "example.test",
            user,
            "pw",
        ))
        .await?;
        c.send_presence(show, Some(text)).await?;
        clients.push(c);
    }

    // --- The batched SUBSCRIBE, first NOTIFY piggy-backed in the 200 OK. ----------------------
    let mut bob = rig::lync_edge(&certs, &partner, gw.sip).await?;
    let mut contacts: Vec<String> = USERS.iter().map(|u| format!("{u}@example.test")).collect();
    contacts.push("zed@elsewhere.test".into());
    batch_subscribe(&mut bob, "lb-1", &contacts, true).await?;
    let ok = bob.response().await?;
    assert_eq!(ok.status(), Some(200), "{}", gw.log());
    assert_eq!(hv(&ok, "Require"), "eventlist");
    assert!(
        !hv(&ok, "ms-piggyback-cseq").is_empty(),
        "no piggy-backed NOTIFY"
    );
    let (list, _) = rlmi_of(&ok)?;
    assert!(list.full_state);
    assert_eq!(list.resources.len(), 4);
    let zed = list.resources.last().and_then(|r| r.instances.first());
    assert_eq!(
        zed.map(|i| (i.state, i.reason.as_deref())),
        Some((rlmi::InstanceState::Terminated, Some("noresource"))),
        "a contact that is not ours is terminated in the list"
    );

    // Each user is asked through Prosody and approves.
    for c in clients.iter_mut() {
        c.expect_presence_from("bob@partner.test", Some("subscribe"), WAIT)
            .await
            .with_context(|| format!("{} got no subscription request:\n{}", c.jid(), gw.log()))?;
        c.approve("bob@partner.test").await?;
    }
    // Their states come in partial NOTIFYs of the same dialog.
    let mut seen = std::collections::HashMap::new();
    while seen.len() < 3 {
        let (_, list, states) = rlmi_notify_until(&mut bob, "lb-1", "the approvals", |_, _| true)
            .await
            .with_context(|| gw.log())?;
        assert!(!list.full_state, "changes are partial state");
        for (uri, av) in states {
            if let Some(av) = av {
                seen.insert(uri, av);
            }
        }
    }

    // --- A second batched SUBSCRIBE (no piggy-back): its NOTIFY has all three states. --------
    batch_subscribe(&mut bob, "lb-2", &contacts[..3], false).await?;
    let ok = bob.response().await?;
    assert_eq!(ok.status(), Some(200), "{}", gw.log());
    let (n, list, states) = rlmi_notify_until(&mut bob, "lb-2", "three states", |_, s| {
        s.iter().filter(|(_, a)| a.is_some()).count() == 3
    })
    .await
    .with_context(|| gw.log())?;
    assert!(
        hv(&n, "Content-Type").starts_with("multipart/related"),
        "{}",
        hv(&n, "Content-Type")
    );
    assert_eq!(list.resources.len(), 3);
    assert_eq!(
        states,
        [
            ("sip:alice@example.test".to_string(), Some(3500)),
            ("sip:carol@example.test".to_string(), Some(6500)),
            ("sip:dave@example.test".to_string(), Some(15500)),
        ],
        "{}",
        gw.log()
    );

    // Prosody answers the second batch's subscriptions with `subscribed` (already approved),
    // which Legate records as the users' answers: the block below must come after them, or
    // the late answer would record carol's approval again over it.
    gw.legate
        .wait_metrics("the home node's answers to the second batch", WAIT, |m| {
            common::legate::metric_value(
                m,
                "legate_envelopes_total{destination=\"sip\",kind=\"subscription\",origin=\"component\",outcome=\"delivered\"}",
            )
            .is_some_and(|v| v >= 6.0)
        })
        .await?;

    // --- Polite blocking per contact: carol blocks bob with `legate policy` (a JID entry: her
    // approval was stored as one, and the most specific entry wins); her instance stays active
    // and says offline (msrtc 18000 and above), never rejected.
    let (code, out, err) = crate::consent::policy_at(
        gw.legate.addr("admin"),
        &["block", "carol@example.test", "bob@partner.test"],
    )
    .await?;
    assert_eq!(code, 0, "{out}{err}");
    let (_, list, states) = rlmi_notify_until(&mut bob, "lb-2", "carol offline", |_, s| {
        s.iter()
            .any(|(u, a)| u == "sip:carol@example.test" && a.is_some_and(|a| a >= 18000))
    })
    .await
    .with_context(|| gw.log())?;
    assert!(!list.full_state);
    // (Prosody's answers to the second batch's subscriptions may ride in the same NOTIFY.)
    let carol = list
        .resources
        .iter()
        .find(|r| r.uri == "sip:carol@example.test")
        .and_then(|r| r.instances.first());
    assert_eq!(
        carol.map(|i| i.state),
        Some(rlmi::InstanceState::Active),
        "{states:?}"
    );

    // --- kill -9 and start again on the same data directory: the batch comes back from the
    // state store, and once the home link is up its members are probed and an RLMI NOTIFY in
    // the old dialog reaches the edge — over a new connection to the partner's route, the old
    // one died with the process. (Records reach the store within a second of a change.)
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gw.restart().await?;
    drop(bob);
    let mut bob = accept_lync(&route, &partner)
        .await
        .with_context(|| gw.log())?;
    let (_, _, states) =
        rlmi_notify_until(&mut bob, "lb-2", "the batch after a restart", |_, s| {
            s.iter()
                .any(|(u, a)| u == "sip:alice@example.test" && *a == Some(3500))
        })
        .await
        .with_context(|| gw.log())?;
    assert!(
        gw.legate.output().contains("batches=2"),
        "both batches restored:\n{}",
        gw.log()
    );
    assert!(!states.is_empty());

    // --- Un-SUBSCRIBE: 200 and a terminated NOTIFY. -------------------------------------------
    let to = hv(&ok, "To").to_string();
    let b = bob.branch();
    bob.send(
        &[
            "SUBSCRIBE sip:bob@partner.test SIP/2.0",
            &format!("Via: SIP/2.0/TLS sip.partner.test:5061;branch={b}"),
            "Max-Forwards: 70",
            "From: <sip:bob@partner.test>;tag=lb-2-tag",
            &format!("To: {to}"),
            "Call-ID: lb-2",
            "CSeq: 2 SUBSCRIBE",
            "Event: presence",
            "Expires: 0",
            "Content-Length: {CL}",
        ],
        b"",
    )
    .await?;
    assert_eq!(bob.response().await?.status(), Some(200));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if tokio::time::Instant::now() > deadline {
            bail!("no terminated NOTIFY:\n{}", gw.log());
        }
        let n = bob.request("NOTIFY").await?;
        bob.respond(&n, 200, "OK", &[], None).await?;
        if n.call_id().ok() == Some("lb-2")
            && hv(&n, "Subscription-State").starts_with("terminated")
        {
            break;
        }
    }
    drop(route);
    Ok(())
}
