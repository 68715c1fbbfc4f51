//! XMPP federation through Legate's s2s edge with a real foreign server: Prosody 0.12 serving
//! `xmpp.test` on 127.0.0.3 ⇄ Legate serving `example.test` on 127.0.0.2, both found through
//! a loopback dnsmasq (`_xmpp-server._tcp` SRV + A records; Prosody asks `_xmpps-server`
//! first and gets NXDOMAIN). Every stanza between bob@xmpp.test and alice@example.test crosses
//! Legate's inbound listener or outbound manager and its hub.
//!
//! The home side of `example.test` is played in process: a component outbox registered on
//! Legate's hub receives what would go to the home node, and the test submits alice's stanzas
//! as the component origin would. (The variant with a home Prosody behind the XEP-0114 link
//! needs the component link edge, built separately.)
//!
//! Runs once with certificates (SASL EXTERNAL both ways, Prosody without mod_dialback) and
//! once with dialback (Prosody does not trust our CA, Legate's policy for xmpp.test is
//! `dialback_only`), and checks that a domain refused by policy gets nothing through.
//!
//! Needs `/usr/bin/prosody` and `/usr/sbin/dnsmasq` (`apt-get install prosody dnsmasq-base`).

use crate::common;
use crate::common::metrics::{self, Family};

use common::certs::CertFactory;
use common::dnsmasq::{DnsRecord, Dnsmasq};
use common::legate::Legate;
use common::ports;
use common::prosody::{CertPaths, Prosody, ProsodyConfig};
use common::xmpp_client::{ClientConfig, TlsOptions, XmppClient};
use legate::config::{self, BUILTIN_SYSTEMS};
use legate::dns::{DnsSettings, Resolver};
use legate::gateway::hub::Delivery;
use legate::gateway::{Address, Body, Envelope, Hub, Origin, PresenceBody, Subscription};
use legate::presence::map::MappingStore;
use legate::xmpp::s2s::{start, S2sOptions};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(15);
/// Loopback addresses of our own, one block of three per test (Legate, foreign Prosody, home
/// Prosody) in 127.0.1.0/24, away from every other test's 127.0.0.x.
fn ips(block: u8) -> (Ipv4Addr, Ipv4Addr, Ipv4Addr) {
    let b = 20 + 3 * block;
    (
        Ipv4Addr::new(127, 0, 1, b),
        Ipv4Addr::new(127, 0, 1, b + 1),
        Ipv4Addr::new(127, 0, 1, b + 2),
    )
}
const COMPONENT_SECRET: &str = "component-secret-0123456789";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Certificates,
    Dialback,
    Refused,
    /// Legate allows both methods; Prosody does not trust our CA: Prosody → Legate uses SASL
    /// EXTERNAL (its certificate is good for us), Legate → Prosody falls back to dialback.
    Mixed,
    /// Prosody without TLS at all (plaintext dialback); Legate's policy for xmpp.test says
    /// `tls = "optional"`.
    Plain,
}

struct Setup {
    _certs: CertFactory,
    _dns: Dnsmasq,
    prosody: Prosody,
    hub: Arc<Hub>,
    /// The in-process home side (`None` when a home Prosody is used).
    home: mpsc::Receiver<Delivery>,
    /// The home Prosody for `example.test` and alice logged into it, when used.
    home_prosody: Option<Prosody>,
    alice: Option<XmppClient>,
    bob: XmppClient,
    _tasks: JoinSet<()>,
    _stop: watch::Sender<bool>,
}

fn addr(s: &str) -> Address {
    Address::parse(s).expect("address")
}

async fn setup(mode: Mode, block: u8, with_home: bool) -> Setup {
    let (legate_ip, foreign_ip, home_ip) = ips(block);
    let certs = CertFactory::new();
    let ours = certs.leaf("example.test", &["example.test"]);
    let theirs = certs.leaf("xmpp.test", &["xmpp.test"]);
    let legate_port = ports::free_port(IpAddr::V4(legate_ip));

    let mut pc = ProsodyConfig::new(foreign_ip)
        .host("xmpp.test")
        .user("xmpp.test", "bob", "pw");
    if mode != Mode::Plain {
        pc = pc.host_cert(
            "xmpp.test",
            CertPaths {
                cert: theirs.cert.clone(),
                key: theirs.key.clone(),
            },
        );
    }
    match mode {
        Mode::Plain => {}
        // Certificates only: Prosody trusts our CA, no dialback module.
        Mode::Certificates | Mode::Refused => pc = pc.secure_s2s(certs.ca_path()),
        // TLS required but our certificate untrusted by Prosody: dialback over TLS.
        Mode::Dialback | Mode::Mixed => pc.s2s_require_encryption = true,
    }
    let dns = Dnsmasq::start(&[
        DnsRecord::a("example.test", legate_ip),
        DnsRecord::a("xmpp.test", foreign_ip),
        DnsRecord::xmpp_server("example.test", "example.test", legate_port),
        DnsRecord::xmpp_server("xmpp.test", "xmpp.test", pc.s2s_port),
    ])
    .expect("dnsmasq");

    let fed = match mode {
        Mode::Certificates => {
            "[[xmpp.federation.domain]]\nname = \"xmpp.test\"\nsystem = \"fed-xmpp\"\nauth = \"external_only\"\n"
        }
        Mode::Dialback => {
            "[[xmpp.federation.domain]]\nname = \"xmpp.test\"\nsystem = \"fed-xmpp\"\nauth = \"dialback_only\"\n"
        }
        Mode::Refused => "[[xmpp.federation.domain]]\nname = \"partner.test\"\nsystem = \"fed-xmpp\"\n",
        Mode::Mixed => "[[xmpp.federation.domain]]\nname = \"xmpp.test\"\nsystem = \"fed-xmpp\"\n",
        Mode::Plain => {
            "[[xmpp.federation.domain]]\nname = \"xmpp.test\"\nsystem = \"fed-xmpp\"\ntls = \"optional\"\n"
        }
    };
    let home_prosody = with_home.then(|| {
        Prosody::start(
            ProsodyConfig::new(home_ip)
                .host("example.test")
                .user("example.test", "alice", "pw")
                .component("xmpp.test", COMPONENT_SECRET),
        )
        .expect("home prosody")
    });
    let home_addr = home_prosody.as_ref().map_or_else(
        || "127.0.0.1:1".to_string(),
        |p| p.component_addr().to_string(),
    );
    let toml = format!(
        r#"routing_node = "hn1"
[node]
admin_listen = "127.0.0.1:0"
[[local_domain]]
name = "example.test"
cert = "{cert}"
key = "{key}"
[listeners]
sip_tls = "off"
sip_tcp = "off"
xmpp_s2s = "{legate_ip}:{legate_port}"
xmpp_s2s_direct_tls = "off"
[tls]
trust_bundle = "{ca}"
[xmpp.federation]
mode = "allow_list"
# Prosody and dnsmasq live on loopback: let dialback verify there.
dialback_allow_private_targets = true
{fed}
[[home_node]]
name = "hn1"
addresses = ["{home_addr}"]
component_secret = "{COMPONENT_SECRET}"
default_system = "xmpp"
[limits]
handshake_timeout_secs = 10
"#,
        cert = ours.cert.display(),
        key = ours.key.display(),
        ca = certs.ca_path().display(),
    );
    let cfg = config::from_toml(&toml, Path::new("federation-test.toml"), BUILTIN_SYSTEMS)
        .unwrap_or_else(|d| panic!("config: {d}"));
    let hub = Hub::new(cfg, MappingStore::open(None).expect("maps"));
    let (stop, rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    // The home side: the real component link to the home Prosody, or an outbox we read.
    let home = if with_home {
        let links = legate::xmpp::link::spawn(
            hub.clone(),
            None,
            legate::xmpp::link::LinkSettings::from_config(&hub.config()),
            rx.clone(),
            &mut tasks,
        );
        if mode != Mode::Refused {
            let t0 = std::time::Instant::now();
            while !links
                .status
                .get(
                    "hn1",
                    &legate::config::Domain::parse("xmpp.test").expect("domain"),
                )
                .is_some_and(|s| s.up)
            {
                assert!(t0.elapsed() < WAIT, "component link did not come up");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        mpsc::channel(1).1
    } else {
        hub.register_component("hn1", 1000)
    };
    let resolver = Resolver::new(
        &DnsSettings {
            nameservers: Some(vec![dns.addr()]),
            ..Default::default()
        },
        &[],
    )
    .expect("resolver");
    let opts = S2sOptions {
        resolver: Some(Arc::new(resolver)),
        ..Default::default()
    };
    let h = start(hub.clone(), opts, rx, &mut tasks)
        .await
        .unwrap_or_else(|e| panic!("legate s2s: {e}"));
    assert_eq!(
        h.listeners,
        vec![(
            "xmpp_s2s",
            SocketAddr::new(IpAddr::V4(legate_ip), legate_port)
        )]
    );

    let prosody = Prosody::start(pc.dns(dns.unbound_forward())).expect("prosody");
    let mut cc = ClientConfig::plain(prosody.c2s_addr(), "xmpp.test", "bob", "pw");
    cc.tls = Some(TlsOptions {
        ca_pem: certs.ca_pem().as_bytes().to_vec(),
        server_name: "xmpp.test".into(),
    });
    if mode == Mode::Plain {
        cc.tls = None;
    }
    let mut bob = XmppClient::connect(cc).await.expect("bob logs in");
    bob.send_presence(Some("chat"), Some("at desk"))
        .await
        .expect("presence");
    let alice = match &home_prosody {
        Some(hp) => {
            let mut a = XmppClient::connect(ClientConfig::plain(
                hp.c2s_addr(),
                "example.test",
                "alice",
                "pw",
            ))
            .await
            .expect("alice logs in");
            a.send_presence(None, Some("at home"))
                .await
                .expect("presence");
            Some(a)
        }
        None => None,
    };
    Setup {
        _certs: certs,
        _dns: dns,
        prosody,
        hub,
        home,
        home_prosody,
        alice,
        bob,
        _tasks: tasks,
        _stop: stop,
    }
}

/// The next delivery to the home side that `pred` accepts (others are skipped).
async fn home_next(
    home: &mut mpsc::Receiver<Delivery>,
    what: &str,
    pred: impl Fn(&Envelope) -> bool,
) -> Envelope {
    let r = tokio::time::timeout(WAIT, async {
        loop {
            match home.recv().await {
                Some(d) if pred(&d.envelope) => return d.envelope,
                Some(_) => {}
                None => panic!("home outbox closed"),
            }
        }
    })
    .await;
    r.unwrap_or_else(|_| panic!("{what} did not reach the home side"))
}

fn from_home(s: &Setup, body: Body, to: &str) {
    let r = s.hub.submit(
        &Origin::Component {
            home_node: Arc::from("hn1"),
        },
        Envelope {
            from: addr("alice@example.test/desk"),
            to: addr(to),
            body,
            stanza_id: None,
            via_cluster: None,
        },
    );
    assert!(
        matches!(r, legate::gateway::hub::Submitted::Delivered(_)),
        "{r:?}"
    );
}

fn is_sub(e: &Envelope, s: Subscription) -> bool {
    matches!(&e.body, Body::Subscription(x) if *x == s)
}

/// bob and alice subscribe to each other, see presence and chat both ways, all via Legate.
async fn federate(s: &mut Setup) {
    let alice_bare = "alice@example.test";
    // bob → alice: subscribe (Prosody → Legate inbound → hub → home).
    s.bob.subscribe(alice_bare).await.expect("subscribe");
    let e = home_next(&mut s.home, "bob's subscribe", |e| {
        is_sub(e, Subscription::Subscribe)
    })
    .await;
    assert_eq!(e.from.bare_string(), "bob@xmpp.test");
    // alice approves and is available (home → hub → Legate outbound → Prosody → bob).
    from_home(
        s,
        Body::Subscription(Subscription::Subscribed),
        "bob@xmpp.test",
    );
    from_home(
        s,
        Body::Presence(PresenceBody {
            system: "xmpp".into(),
            state: "away".into(),
            note: Some("lunch".into()),
            priority: None,
        }),
        "bob@xmpp.test",
    );
    s.bob
        .expect_presence_from(alice_bare, Some("subscribed"), WAIT)
        .await
        .expect("approval reaches bob");
    let p = s
        .bob
        .expect_presence_from(alice_bare, None, WAIT)
        .await
        .expect("alice's presence reaches bob");
    assert_eq!(p.show.as_deref(), Some("away"), "{p:?}");
    assert_eq!(p.status.as_deref(), Some("lunch"), "{p:?}");

    // alice → bob: subscribe; bob approves; Prosody then sends bob's presence to alice.
    from_home(
        s,
        Body::Subscription(Subscription::Subscribe),
        "bob@xmpp.test",
    );
    s.bob
        .expect_presence_from(alice_bare, Some("subscribe"), WAIT)
        .await
        .expect("alice's request reaches bob");
    s.bob.approve(alice_bare).await.expect("approve");
    home_next(&mut s.home, "bob's approval", |e| {
        is_sub(e, Subscription::Subscribed)
    })
    .await;
    let e = home_next(&mut s.home, "bob's presence", |e| {
        matches!(e.body, Body::Presence(_))
    })
    .await;
    match &e.body {
        // Translated from fed-xmpp into the home node's system (`xmpp`).
        Body::Presence(p) => {
            assert_eq!(&*p.system, "xmpp", "{p:?}");
            assert_eq!(p.note.as_deref(), Some("at desk"), "{p:?}");
        }
        other => panic!("{other:?}"),
    }

    // Chat both ways.
    s.bob
        .send_message(alice_bare, "hello alice, via Legate")
        .await
        .expect("send");
    let e = home_next(
        &mut s.home,
        "bob's message",
        |e| matches!(&e.body, Body::Xmpp(x) if x.name == "message"),
    )
    .await;
    match &e.body {
        Body::Xmpp(x) => assert!(
            String::from_utf8_lossy(&x.bytes).contains("hello alice, via Legate"),
            "{x:?}"
        ),
        other => panic!("{other:?}"),
    }
    from_home(
        s,
        Body::Message(legate::gateway::MessageBody {
            id: Some("a1".into()),
            text: "hi bob <&> back".into(),
            thread: None,
            ..Default::default()
        }),
        "bob@xmpp.test",
    );
    let m = s
        .bob
        .expect_message_from(alice_bare, WAIT)
        .await
        .expect("alice's message reaches bob");
    assert_eq!(m.body.as_deref(), Some("hi bob <&> back"));
}

/// `legate_s2s_streams_total` for one auth and direction, in this process's registry. Tests
/// read it before and after under the exclusive s2s lock (`common::metrics`).
fn streams(auth: &str, direction: &str) -> u64 {
    metrics::counter(
        "legate_s2s_streams_total",
        &[
            &format!("auth=\"{auth}\""),
            &format!("direction=\"{direction}\""),
        ],
    )
}

fn assert_log(p: &Prosody, needle: &str) {
    assert!(
        p.log().contains(needle),
        "{needle:?} not in Prosody's log\n{}",
        p.diagnostics()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prosody_federates_with_certificates() {
    let _s2s_exclusive = metrics::asserts(Family::S2s).await;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (in_before, out_before) = (
            streams("external", "inbound"),
            streams("external", "outbound"),
        );
        let mut s = setup(Mode::Certificates, 0, false).await;
        federate(&mut s).await;
        // Both directions by SASL EXTERNAL: Prosody accepted our identity and we its.
        assert_log(&s.prosody, "SASL EXTERNAL with example.test succeeded");
        assert_log(
            &s.prosody,
            "Accepting SASL EXTERNAL identity from example.test",
        );
        assert!(streams("external", "inbound") > in_before);
        assert!(streams("external", "outbound") > out_before);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prosody_federates_with_dialback() {
    let _s2s_exclusive = metrics::asserts(Family::S2s).await;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (in_before, out_before) = (
            streams("dialback", "inbound"),
            streams("dialback", "outbound"),
        );
        let mut s = setup(Mode::Dialback, 1, false).await;
        federate(&mut s).await;
        assert_log(&s.prosody, "sent dialback key on outgoing s2s stream");
        assert!(!s.prosody.log().contains("Accepting SASL EXTERNAL identity"));
        assert!(streams("dialback", "inbound") > in_before);
        assert!(streams("dialback", "outbound") > out_before);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_domain_gets_nothing_through() {
    let _s2s_exclusive = metrics::asserts(Family::S2s).await;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut s = setup(Mode::Refused, 2, false).await;
        let before = metrics::counter(
            "legate_s2s_refused_total",
            &["reason=\"domain_not_allowed\""],
        );
        s.bob
            .send_message("alice@example.test", "are you there?")
            .await
            .expect("send");
        s.bob
            .subscribe("alice@example.test")
            .await
            .expect("subscribe");
        // Prosody reports our refusal, text included, and bounces to bob.
        let e = s
            .bob
            .next_stanza_matching(|st| st.is_type("error"), WAIT)
            .await
            .expect("bob gets an error back");
        assert!(e.raw.contains("example.test"), "{e:?}");
        assert!(
            tokio::time::timeout(Duration::from_secs(2), s.home.recv())
                .await
                .is_err(),
            "a refused domain's stanza reached the home side"
        );
        assert_log(&s.prosody, "federation with xmpp.test is not allowed");
        assert!(
            metrics::counter(
                "legate_s2s_refused_total",
                &["reason=\"domain_not_allowed\""]
            ) > before
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prosody_external_one_way_dialback_the_other() {
    let _s2s_exclusive = metrics::asserts(Family::S2s).await;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let before_in = streams("external", "inbound");
        let before_out = streams("dialback", "outbound");
        let mut s = setup(Mode::Mixed, 12, false).await;
        federate(&mut s).await;
        assert_log(&s.prosody, "SASL EXTERNAL with example.test succeeded");
        assert!(!s.prosody.log().contains("Accepting SASL EXTERNAL identity"));
        assert!(streams("external", "inbound") > before_in);
        assert!(streams("dialback", "outbound") > before_out);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prosody_plaintext_dialback_where_policy_allows_it() {
    let _s2s_shared = metrics::moves(Family::S2s).await;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut s = setup(Mode::Plain, 13, false).await;
        federate(&mut s).await;
        assert_log(&s.prosody, "sent dialback key on outgoing s2s stream");
        assert!(!s.prosody.log().contains("Stream encrypted"));
    })
    .await
    .expect("test timed out");
}

// ---------------------------------------------------------------------------------------------
// The whole chain: foreign Prosody ⇄ Legate (s2s edge + component link) ⇄ home Prosody.

/// `a` subscribes to `b` and `b` approves; `a` then sees `b`'s presence.
async fn subscribe_and_approve(a: &mut XmppClient, b: &mut XmppClient) {
    let (a_jid, b_jid) = (a.bare_jid().to_owned(), b.bare_jid().to_owned());
    a.subscribe(&b_jid).await.expect("send subscribe");
    b.expect_presence_from(&a_jid, Some("subscribe"), WAIT)
        .await
        .unwrap_or_else(|e| panic!("{a_jid}'s subscription request reaches {b_jid}: {e:#}"));
    b.approve(&a_jid).await.expect("send subscribed");
    a.expect_presence_from(&b_jid, Some("subscribed"), WAIT)
        .await
        .unwrap_or_else(|e| panic!("{b_jid}'s approval reaches {a_jid}: {e:#}"));
    a.expect_presence_from(&b_jid, None, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{b_jid}'s presence reaches {a_jid}: {e:#}"));
}

async fn chat(a: &mut XmppClient, b: &mut XmppClient, body: &str) {
    let (a_jid, b_jid) = (a.bare_jid().to_owned(), b.bare_jid().to_owned());
    a.send_message(&b_jid, body).await.expect("send message");
    let m = b
        .expect_message_from(&a_jid, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{a_jid}'s message reaches {b_jid}: {e:#}"));
    assert_eq!(m.body.as_deref(), Some(body));
}

async fn full_chain(mode: Mode, block: u8) {
    let mut s = setup(mode, block, true).await;
    let mut alice = s.alice.take().expect("alice");
    subscribe_and_approve(&mut s.bob, &mut alice).await;
    subscribe_and_approve(&mut alice, &mut s.bob).await;
    // Presence updates keep flowing both ways, translated by the fed-xmpp mapping.
    alice
        .send_presence(Some("dnd"), Some("in a meeting"))
        .await
        .expect("presence");
    let p = s
        .bob
        .next_stanza_matching(
            |st| {
                st.name == "presence"
                    && st.sender_bare() == Some("alice@example.test")
                    && st.status.as_deref() == Some("in a meeting")
            },
            WAIT,
        )
        .await
        .expect("alice's update reaches bob");
    assert_eq!(p.show.as_deref(), Some("dnd"), "{p:?}");
    chat(
        &mut s.bob,
        &mut alice,
        "hello alice <&> 'quoted', via Legate",
    )
    .await;
    chat(&mut alice, &mut s.bob, "hi bob, back through Legate").await;
    alice.close().await;
    if let Some(hp) = &s.home_prosody {
        assert!(
            hp.log().contains("xmpp.test"),
            "home Prosody never saw the component\n{}",
            hp.diagnostics()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_chain_with_certificates() {
    let _s2s_exclusive = metrics::asserts(Family::S2s).await;
    let _component_shared = metrics::moves(Family::Component).await;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let before = streams("external", "inbound");
        full_chain(Mode::Certificates, 3).await;
        assert!(streams("external", "inbound") > before);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_chain_with_dialback() {
    let _s2s_exclusive = metrics::asserts(Family::S2s).await;
    let _component_shared = metrics::moves(Family::Component).await;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let before = streams("dialback", "inbound");
        full_chain(Mode::Dialback, 4).await;
        assert!(streams("dialback", "inbound") > before);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_chain_refused_domain_reaches_no_home_user() {
    let _s2s_shared = metrics::moves(Family::S2s).await;
    let _component_shared = metrics::moves(Family::Component).await;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut s = setup(Mode::Refused, 5, true).await;
        let mut alice = s.alice.take().expect("alice");
        s.bob
            .send_message("alice@example.test", "let me in")
            .await
            .expect("send");
        s.bob
            .subscribe("alice@example.test")
            .await
            .expect("subscribe");
        s.bob
            .next_stanza_matching(|st| st.is_type("error"), WAIT)
            .await
            .expect("bob gets an error back");
        assert!(
            alice
                .next_stanza_matching(|st| st.raw.contains("xmpp.test"), Duration::from_secs(2))
                .await
                .is_err(),
            "alice received something from the refused domain"
        );
        assert_log(&s.prosody, "federation with xmpp.test is not allowed");
        alice.close().await;
    })
    .await
    .expect("test timed out");
}

// ---------------------------------------------------------------------------------------------
// The same chain through the real `legate run` binary.
//
// The binary is pointed at the test's dnsmasq with `[dns] nameservers`, so the test domains are
// never asked of the machine's real resolver.

async fn binary_chain(mode: Mode, block: u8) {
    let (legate_ip, foreign_ip, home_ip) = ips(block);
    let certs = CertFactory::new();
    let ours = certs.leaf("example.test", &["example.test"]);
    let theirs = certs.leaf("xmpp.test", &["xmpp.test"]);
    let legate_port = ports::free_port(IpAddr::V4(legate_ip));
    let mut pc = ProsodyConfig::new(foreign_ip)
        .host("xmpp.test")
        .user("xmpp.test", "bob", "pw")
        .host_cert(
            "xmpp.test",
            CertPaths {
                cert: theirs.cert.clone(),
                key: theirs.key.clone(),
            },
        );
    match mode {
        Mode::Certificates | Mode::Refused => pc = pc.secure_s2s(certs.ca_path()),
        Mode::Dialback | Mode::Mixed | Mode::Plain => pc.s2s_require_encryption = true,
    }
    let dns = Dnsmasq::start(&[
        DnsRecord::a("example.test", legate_ip),
        DnsRecord::a("xmpp.test", foreign_ip),
        DnsRecord::xmpp_server("example.test", "example.test", legate_port),
        DnsRecord::xmpp_server("xmpp.test", "xmpp.test", pc.s2s_port),
    ])
    .expect("dnsmasq");
    let home = Prosody::start(
        ProsodyConfig::new(home_ip)
            .host("example.test")
            .user("example.test", "alice", "pw")
            .component("xmpp.test", COMPONENT_SECRET),
    )
    .expect("home prosody");
    let foreign = Prosody::start(pc.dns(dns.unbound_forward())).expect("foreign prosody");

    let fed = match mode {
        Mode::Certificates => "name = \"xmpp.test\"\nauth = \"external_only\"",
        Mode::Dialback => "name = \"xmpp.test\"\nauth = \"dialback_only\"",
        Mode::Refused => "name = \"partner.test\"",
        Mode::Mixed | Mode::Plain => "name = \"xmpp.test\"",
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg_path = dir.path().join("legate.toml");
    std::fs::write(
        &cfg_path,
        format!(
            r#"routing_node = "hn1"
[node]
admin_listen = "127.0.0.1:0"
data_dir = "data"
[[local_domain]]
name = "example.test"
cert = "{cert}"
key = "{key}"
[listeners]
sip_tls = "off"
sip_tcp = "off"
xmpp_s2s = "{legate_ip}:{legate_port}"
xmpp_s2s_direct_tls = "off"
[tls]
trust_bundle = "{ca}"
[xmpp.federation]
mode = "allow_list"
# Prosody and dnsmasq live on loopback: let dialback verify there.
dialback_allow_private_targets = true
[[xmpp.federation.domain]]
system = "fed-xmpp"
{fed}
[[home_node]]
name = "hn1"
addresses = ["{home_addr}"]
component_secret = "{COMPONENT_SECRET}"
default_system = "xmpp"
[dns]
nameservers = ["{dns_addr}"]
"#,
            dns_addr = dns.addr(),
            cert = ours.cert.display(),
            key = ours.key.display(),
            ca = certs.ca_path().display(),
            home_addr = home.component_addr(),
        ),
    )
    .expect("write config");
    let legate = Legate::start(&cfg_path, &["xmpp_s2s", "admin"]).expect("legate run");
    assert_eq!(
        legate.addr("xmpp_s2s"),
        SocketAddr::new(IpAddr::V4(legate_ip), legate_port)
    );
    if mode != Mode::Refused {
        legate
            .wait_output("the component link to hn1", WAIT, |t| {
                t.contains("component xmpp.test connected to home node hn1")
            })
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    let mut cc = ClientConfig::plain(foreign.c2s_addr(), "xmpp.test", "bob", "pw");
    cc.tls = Some(TlsOptions {
        ca_pem: certs.ca_pem().as_bytes().to_vec(),
        server_name: "xmpp.test".into(),
    });
    let mut bob = XmppClient::connect(cc).await.expect("bob logs in");
    bob.send_presence(Some("chat"), Some("at desk"))
        .await
        .expect("presence");
    let mut alice = XmppClient::connect(ClientConfig::plain(
        home.c2s_addr(),
        "example.test",
        "alice",
        "pw",
    ))
    .await
    .expect("alice logs in");
    alice
        .send_presence(None, Some("at home"))
        .await
        .expect("presence");

    // The counters of the separate `legate` process: no other test can move them.
    let metrics = || async { legate.metrics().await.expect("GET /metrics") };
    if mode == Mode::Refused {
        bob.send_message("alice@example.test", "let me in")
            .await
            .expect("send");
        bob.next_stanza_matching(|st| st.is_type("error"), WAIT)
            .await
            .expect("bob gets an error back");
        assert!(
            alice
                .next_stanza_matching(|st| st.raw.contains("xmpp.test"), Duration::from_secs(2))
                .await
                .is_err(),
            "alice received something from the refused domain"
        );
        assert_log(&foreign, "federation with xmpp.test is not allowed");
        let m = metrics().await;
        assert!(
            m.lines()
                .any(|l| l.starts_with("legate_s2s_refused_total{reason=\"domain_not_allowed\"}")),
            "{m}"
        );
    } else {
        subscribe_and_approve(&mut bob, &mut alice).await;
        subscribe_and_approve(&mut alice, &mut bob).await;
        chat(&mut bob, &mut alice, "hello alice, through legate run").await;
        chat(&mut alice, &mut bob, "hi bob, through legate run").await;
        let m = metrics().await;
        let auth = if mode == Mode::Certificates {
            "external"
        } else {
            "dialback"
        };
        let st = legate.http_get("/status").await.expect("GET /status");
        assert!(
            st.contains("\"remote\":\"xmpp.test\"") && st.contains("\"up\":true"),
            "/status does not show the outbound stream:\n{st}"
        );
        assert!(st.contains(&format!("\"auth\":\"{auth}\"")), "{st}");
        for dir in ["inbound", "outbound"] {
            assert!(
                m.lines().any(|l| l.starts_with("legate_s2s_streams_total")
                    && l.contains(&format!("auth=\"{auth}\""))
                    && l.contains(&format!("direction=\"{dir}\""))),
                "no {dir} {auth} stream in the metrics:\n{m}"
            );
        }
    }
    alice.close().await;
    bob.close().await;
    drop(legate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legate_run_federates_with_certificates() {
    tokio::time::timeout(TEST_TIMEOUT, binary_chain(Mode::Certificates, 6))
        .await
        .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legate_run_federates_with_dialback() {
    tokio::time::timeout(TEST_TIMEOUT, binary_chain(Mode::Dialback, 8))
        .await
        .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legate_run_refuses_a_domain_by_policy() {
    tokio::time::timeout(TEST_TIMEOUT, binary_chain(Mode::Refused, 10))
        .await
        .expect("test timed out");
}
