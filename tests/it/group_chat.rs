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

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use common::certs::CertFactory;
use common::dnsmasq::{DnsRecord, Dnsmasq};
use common::legate::Legate;
use common::ports;
use common::prosody::{CertPaths, Prosody, ProsodyConfig};
use common::xmpp_client::{ClientConfig, TlsOptions, XmppClient};

const WAIT: Duration = Duration::from_secs(15);
const LEGATE_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 2, 10);
const FOREIGN_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 2, 11);
const HOME_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 2, 12);
const SECRET: &str = "group-chat-component-secret-1";
const ROOM: &str = "lobby@conference.example.test";

/// The XEP-0045 join of `room/nick`.
fn join(nick: &str) -> String {
    format!("<presence to='{ROOM}/{nick}'><x xmlns='http://jabber.org/protocol/muc'/></presence>")
}

fn groupchat(text: &str) -> String {
    format!(
        "<message type='groupchat' to='{ROOM}' id='g-{text_len}'><body>{text}</body></message>",
        text_len = text.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_xmpp_user_talks_in_a_room_on_the_home_node() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(90), scenario())
        .await
        .map_err(|_| anyhow!("scenario timed out"))?
}

async fn scenario() -> Result<()> {
    let certs = CertFactory::new();
    // The alias is one of the names our s2s certificate must cover (SASL EXTERNAL both ways).
    let ours = certs.leaf("example.test", &["example.test", "conference.example.test"]);
    let theirs = certs.leaf("xmpp.test", &["xmpp.test"]);
    let legate_port = ports::free_port(IpAddr::V4(LEGATE_IP));
    let foreign_cfg = ProsodyConfig::new(FOREIGN_IP)
        .host("xmpp.test")
        .user("xmpp.test", "bob", "pw")
        .host_cert(
            "xmpp.test",
            CertPaths {
                cert: theirs.cert.clone(),
                key: theirs.key.clone(),
            },
        )
        .secure_s2s(certs.ca_path());
    let dns = Dnsmasq::start(&[
        DnsRecord::a("example.test", LEGATE_IP),
        DnsRecord::a("conference.example.test", LEGATE_IP),
        DnsRecord::a("xmpp.test", FOREIGN_IP),
        DnsRecord::xmpp_server("example.test", "example.test", legate_port),
        DnsRecord::xmpp_server(
            "conference.example.test",
            "conference.example.test",
            legate_port,
        ),
        DnsRecord::xmpp_server("xmpp.test", "xmpp.test", foreign_cfg.s2s_port),
    ])?;
    let home = Prosody::start(
        ProsodyConfig::new(HOME_IP)
            .host("example.test")
            .user("example.test", "alice", "pw")
            .muc("conference.example.test")
            .component("xmpp.test", SECRET),
    )?;
    let foreign = Prosody::start(foreign_cfg.dns(dns.unbound_forward()))?;

    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("legate.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[node]
admin_listen = "127.0.0.1:0"
data_dir = "data"
[[local_domain]]
name = "example.test"
cert = "{cert}"
key = "{key}"
[listeners]
sip_tls = "127.0.0.1:0"
sip_tcp = "off"
xmpp_s2s = "{LEGATE_IP}:{legate_port}"
xmpp_s2s_direct_tls = "off"
[tls]
trust_bundle = "{ca}"
[xmpp.federation]
mode = "allow_list"
dialback_allow_private_targets = true
[[xmpp.federation.domain]]
name = "xmpp.test"
system = "fed-xmpp"
auth = "external_only"
[[sip.federated_domain]]
name = "partner.test"
system = "lync"
route = "127.0.0.1:9"
[[home_node]]
name = "hn1"
addresses = ["{home_addr}"]
component_secret = "{SECRET}"
default_system = "xmpp"
[[chat_node]]
alias = "conference.example.test"
home_node = "hn1"
[dns]
nameservers = ["{dns_addr}"]
"#,
            cert = ours.cert.display(),
            key = ours.key.display(),
            ca = certs.ca_path().display(),
            home_addr = home.component_addr(),
            dns_addr = dns.addr(),
        ),
    )?;
    let legate = Legate::start(&cfg, &["xmpp_s2s", "sip_tls", "admin"])?;
    legate
        .wait_output("the xmpp.test component link", WAIT, |t| {
            t.contains("component xmpp.test connected to home node hn1")
        })
        .await?;
    let why = |what: &str| {
        format!(
            "{what}\n--- legate ---\n{}\n--- home prosody ---\n{}",
            legate.output(),
            home.log()
        )
    };

    // alice creates the room from the home side.
    let mut alice = XmppClient::connect(ClientConfig::plain(
        home.c2s_addr(),
        "example.test",
        "alice",
        "pw",
    ))
    .await?;
    alice.send_presence(None, None).await?;
    alice.send_raw(&join("alice")).await?;
    let me = format!("{ROOM}/alice");
    alice
        .next_stanza_matching(
            |s| s.name == "presence" && s.from.as_deref() == Some(me.as_str()),
            WAIT,
        )
        .await
        .context("alice is in the room")?;

    // bob, on the foreign server, joins through Legate.
    let mut cc = ClientConfig::plain(foreign.c2s_addr(), "xmpp.test", "bob", "pw");
    cc.tls = Some(TlsOptions {
        ca_pem: certs.ca_pem().as_bytes().to_vec(),
        server_name: "xmpp.test".into(),
    });
    let mut bob = XmppClient::connect(cc).await?;
    bob.send_presence(None, None).await?;
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
    let partner = certs.leaf("partner", &["partner.test"]);
    let mut lync = sip_ua::connect_tls(
        legate.addr("sip_tls"),
        certs.ca_path(),
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
