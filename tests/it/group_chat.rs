//! Group chat through a published chat-room alias (`[[chat_node]]`, requirements §5 and issue
//! 11 item 6), every hop real: bob on a foreign Prosody (`xmpp.test`) joins and talks in a room
//! of `conference.example.test`, a XEP-0045 service on the home Prosody of `example.test`,
//! through `legate run` — s2s (SASL EXTERNAL both ways, found through a loopback dnsmasq) in,
//! the XEP-0114 component `xmpp.test` toward the home node, and back the same way. alice, a
//! local user, is in the same room. A Lync peer addressing the room gets a clear refusal.
//!
//! Needs `/usr/bin/prosody` and `/usr/sbin/dnsmasq` (`apt-get install prosody dnsmasq-base`).

use crate::common;
use crate::sip_ua;

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use common::s2s_rig::{S2sRig, S2sRigSpec, WAIT};

const ROOM: &str = "lobby@conference.example.test";

/// The XEP-0045 join of `room/nick`.
fn join(nick: &str) -> String {
    format!("<presence to='{ROOM}/{nick}'><x xmlns='http://jabber.org/protocol/muc'/></presence>")
}

fn groupchat(text: &str) -> String {
    format!(
        "<message type='groupchat' to='{ROOM}' id='g-{}'><body>{text}</body></message>",
        text.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_xmpp_user_talks_in_a_room_on_the_home_node() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(90), scenario())
        .await
        .map_err(|_| anyhow!("scenario timed out"))?
}

async fn scenario() -> Result<()> {
    let rig = S2sRig::start(S2sRigSpec {
        ips: (
            Ipv4Addr::new(127, 0, 2, 10),
            Ipv4Addr::new(127, 0, 2, 11),
            Ipv4Addr::new(127, 0, 2, 12),
        ),
        // The alias is one of the names our s2s certificate must cover (SASL EXTERNAL).
        extra_names: &["conference.example.test"],
        federation: r#"[xmpp.federation]
mode = "allow_list"
dialback_allow_private_targets = true
[[xmpp.federation.domain]]
name = "xmpp.test"
system = "fed-xmpp"
auth = "external_only""#,
        extra: r#"[[chat_node]]
alias = "conference.example.test"
home_node = "hn1""#,
        home: |h| h.muc("conference.example.test"),
    })
    .await?;
    rig.wait_component().await?;
    let why = |what: &str| rig.why(what);

    // alice creates the room from the home side.
    let mut alice = rig.alice().await?;
    alice.send_raw(&join("alice")).await?;
    let me = format!("{ROOM}/alice");
    alice
        .next_stanza_matching(
            |s| s.name == "presence" && s.from.as_deref() == Some(me.as_str()),
            WAIT,
        )
        .await
        .context("alice is in the room")?;

    // bob, on the foreign server, first looks the service up as clients do before joining
    // (XEP-0045 §6.1): the bare alias answers as a text conference service with the MUC
    // feature, through Legate's s2s stream (the id kept), and lists no rooms.
    let mut bob = rig.bob().await?;
    bob.send_raw(
        "<iq type='get' to='conference.example.test' id='disco-1'>\
         <query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
    )
    .await?;
    let info = bob
        .next_stanza_matching(
            |s| s.name == "iq" && s.id.as_deref() == Some("disco-1"),
            WAIT,
        )
        .await
        .with_context(|| why("bob's disco#info to the alias got no answer"))?;
    assert_eq!(info.type_.as_deref(), Some("result"), "{}", info.raw);
    assert_eq!(info.from.as_deref(), Some("conference.example.test"));
    assert!(
        info.raw.contains("category='conference'") || info.raw.contains("category=\"conference\""),
        "{}",
        info.raw
    );
    assert!(
        info.raw.contains("http://jabber.org/protocol/muc"),
        "{}",
        info.raw
    );
    bob.send_raw(
        "<iq type='get' to='conference.example.test' id='disco-2'>\
         <query xmlns='http://jabber.org/protocol/disco#items'/></iq>",
    )
    .await?;
    let items = bob
        .next_stanza_matching(
            |s| s.name == "iq" && s.id.as_deref() == Some("disco-2"),
            WAIT,
        )
        .await
        .with_context(|| why("bob's disco#items to the alias got no answer"))?;
    assert_eq!(items.type_.as_deref(), Some("result"), "{}", items.raw);

    // bob joins through Legate.
    bob.send_raw(&join("bob")).await?;
    let bob_nick = format!("{ROOM}/bob");
    // The room's answer (bob's own occupant presence, status 110) crossed the component link
    // and Legate's s2s stream from the alias back to xmpp.test, MUC elements intact.
    let own = bob
        .next_stanza_matching(
            |s| s.name == "presence" && s.from.as_deref() == Some(bob_nick.as_str()),
            WAIT,
        )
        .await
        .with_context(|| why("bob got no presence from the room"))?;
    assert!(
        own.raw.contains("http://jabber.org/protocol/muc#user") && own.raw.contains("110"),
        "bob's self-presence lost its room elements: {}",
        own.raw
    );
    alice
        .next_stanza_matching(
            |s| s.name == "presence" && s.from.as_deref() == Some(bob_nick.as_str()),
            WAIT,
        )
        .await
        .with_context(|| why("alice did not see bob join"))?;

    // bob talks: alice reads it from his room nick; and back.
    bob.send_raw(&groupchat("hello room, from xmpp.test"))
        .await?;
    let m = alice
        .next_stanza_matching(
            |s| s.name == "message" && s.from.as_deref() == Some(bob_nick.as_str()),
            WAIT,
        )
        .await
        .with_context(|| why("bob's groupchat message did not reach the room"))?;
    assert_eq!(m.body.as_deref(), Some("hello room, from xmpp.test"));
    assert_eq!(m.type_.as_deref(), Some("groupchat"));
    alice.send_raw(&groupchat("welcome bob")).await?;
    let m = bob
        .next_stanza_matching(
            |s| s.name == "message" && s.from.as_deref() == Some(me.as_str()) && s.body.is_some(),
            WAIT,
        )
        .await
        .with_context(|| why("alice's groupchat message did not reach bob"))?;
    assert_eq!(m.body.as_deref(), Some("welcome bob"));

    // A Lync peer addressing the room is told clearly that rooms are XMPP-only.
    let partner = rig.certs.leaf("partner", &["partner.test"]);
    let mut lync = sip_ua::connect_tls(
        rig.legate.addr("sip_tls"),
        rig.certs.ca_path(),
        Some((&partner.cert, &partner.key)),
        "example.test",
    )
    .await?;
    let b = lync.branch();
    lync.send(
        &[
            &format!("MESSAGE sip:{ROOM} SIP/2.0"),
            &format!("Via: SIP/2.0/TLS sip.partner.test:5061;branch={b}"),
            "Max-Forwards: 70",
            "From: <sip:carol@partner.test>;tag=gc1",
            &format!("To: <sip:{ROOM}>"),
            "Call-ID: gc-1",
            "CSeq: 1 MESSAGE",
            "Content-Type: text/plain",
            "Content-Length: {CL}",
        ],
        b"hi room",
    )
    .await?;
    let r = lync.response().await?;
    assert_eq!(r.status(), Some(403), "{}", why("status"));
    assert!(
        r.reason().is_some_and(|p| p.contains("Group Chat")),
        "reason phrase: {:?}",
        r.reason()
    );

    alice.close().await;
    bob.close().await;
    Ok(())
}
