//! The XEP-0114 component links against a real Prosody 0.12 home node (`example.test`, with
//! `Component "partner.test"` and `Component "xmpp.test"`).
//!
//! In-process tests build a `Config`, a `Hub` with stand-in SIP and s2s outboxes, and start the
//! link manager; a c2s client logged into Prosody plays the local user. One test runs the real
//! `legate run` binary against Prosody and checks the links come up and answer through the
//! home node. Every step is bounded; Prosody instances are the harness's own (never the system
//! service) and are killed on drop.
//!
//! Needs `/usr/bin/prosody` (`apt-get install prosody`).

use crate::common;
use crate::common::metrics::{self, Family};

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::dnsmasq::{DnsRecord, Dnsmasq};
use common::legate::{metric_value, Legate};
use common::prosody::{Prosody, ProsodyConfig};
use common::xmpp_client::{ClientConfig, XmppClient};
use legate::config::{self, Config, Domain, BUILTIN_SYSTEMS};
use legate::dns::{DnsSettings, Resolver};
use legate::gateway::envelope::{Address, Body, MessageBody, PresenceBody, Subscription};
use legate::gateway::hub::{Delivery, Submitted};
use legate::gateway::{Envelope, Hub, Origin};
use legate::presence::map::MappingStore;
use legate::xmpp::link::{self, ComponentLinks, ComponentStatus, LinkSettings};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(10);
const SECRET: &str = "component-secret-0123456789";
/// Loopback addresses of our own (the harness tests use .2–.4).
const HOME_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

async fn bounded<F: std::future::Future<Output = ()>>(name: &str, f: F) {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("{name}: did not finish within {TEST_TIMEOUT:?}"));
}

/// `legate_component_stanzas_total` for one direction and kind, in this process's registry.
fn stanzas(direction: &str, kind: &str) -> u64 {
    metrics::counter(
        "legate_component_stanzas_total",
        &[
            &format!("direction=\"{direction}\""),
            &format!("kind=\"{kind}\""),
        ],
    )
}

fn home_node(ip: Ipv4Addr) -> Prosody {
    let p = Prosody::start(
        ProsodyConfig::new(ip)
            .host("example.test")
            .user("example.test", "alice", "pw")
            .component("partner.test", SECRET)
            .component("xmpp.test", SECRET),
    )
    .unwrap_or_else(|e| panic!("starting Prosody: {e:#}"));
    eprintln!("Prosody on {} ready in {:?}", p.ip(), p.started_in());
    p
}

fn config_toml(addresses: &[SocketAddr], secret: &str) -> String {
    let list: Vec<String> = addresses.iter().map(|a| format!("\"{a}\"")).collect();
    config_toml_with("hn1", &format!("addresses = [{}]", list.join(", ")), secret)
}

/// `endpoint` is the home node's `addresses = [...]` or `srv = true` line.
fn config_toml_with(name: &str, endpoint: &str, secret: &str) -> String {
    format!(
        r#"
[node]
admin_listen = "127.0.0.1:0"
# Relative to the configuration's directory (the harness runs legate there): never the shared
# default /var/lib/legate, whose state lock another test's legate may hold.
data_dir = "data"
[[local_domain]]
name = "example.test"
[listeners]
sip_tls = "off"
sip_tcp = "off"
xmpp_s2s = "off"
xmpp_s2s_direct_tls = "off"
[[sip.federated_domain]]
name = "partner.test"
system = "lync"
[xmpp.federation]
mode = "allow_list"
[[xmpp.federation.domain]]
name = "xmpp.test"
[[home_node]]
name = "{name}"
{endpoint}
component_secret = "{secret}"
default_system = "xmpp"
"#
    )
}

fn config(addresses: &[SocketAddr], secret: &str) -> Config {
    config::from_toml(
        &config_toml(addresses, secret),
        Path::new("component_link.toml"),
        BUILTIN_SYSTEMS,
    )
    .unwrap_or_else(|d| panic!("{d}"))
}

/// Legate in-process: hub, stand-in outboxes for the SIP and s2s edges, the component links.
struct Gateway {
    hub: Arc<Hub>,
    sip: mpsc::Receiver<Delivery>,
    s2s: mpsc::Receiver<Delivery>,
    links: ComponentLinks,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

fn start_gateway(cfg: Config, fast_retries: bool) -> Gateway {
    start_gateway_with(cfg, fast_retries, None)
}

fn start_gateway_with(cfg: Config, fast_retries: bool, resolver: Option<Resolver>) -> Gateway {
    let mut settings = LinkSettings::from_config(&cfg);
    if fast_retries {
        settings.backoff_min = Duration::from_millis(100);
        settings.backoff_max = Duration::from_millis(400);
    }
    let maps = MappingStore::open(None).unwrap_or_else(|d| panic!("{d}"));
    let hub = Hub::new(cfg, maps);
    let sip = hub.register_sip(64);
    let s2s = hub.register_s2s(64);
    let (stop, shutdown) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let links = link::spawn(hub.clone(), resolver, settings, shutdown, &mut tasks);
    Gateway {
        hub,
        sip,
        s2s,
        links,
        stop,
        tasks,
    }
}

impl Gateway {
    fn status(&self, domain: &str) -> ComponentStatus {
        // One home node per test gateway.
        self.links
            .status
            .snapshot()
            .into_iter()
            .find(|(_, d, _)| d.as_str() == domain)
            .map(|(_, _, s)| s)
            .unwrap_or_default()
    }

    async fn wait_status(
        &self,
        domain: &str,
        what: &str,
        f: impl Fn(&ComponentStatus) -> bool,
    ) -> ComponentStatus {
        let t0 = tokio::time::Instant::now();
        loop {
            let s = self.status(domain);
            if f(&s) {
                return s;
            }
            assert!(
                t0.elapsed() < WAIT,
                "{domain}: timed out waiting for {what}: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(WAIT, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
    }
}

fn dom(s: &str) -> Domain {
    Domain::parse(s).unwrap_or_else(|e| panic!("{e}"))
}

fn addr(s: &str) -> Address {
    Address::parse(s).unwrap_or_else(|e| panic!("{e}"))
}

/// The next delivery in `rx` that `pred` accepts (others, such as presence probes Prosody
/// sends on its own, are skipped).
async fn delivery_matching(
    rx: &mut mpsc::Receiver<Delivery>,
    what: &str,
    pred: impl Fn(&Envelope) -> bool,
) -> Envelope {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let d = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {what} delivered within {WAIT:?}"))
            .unwrap_or_else(|| panic!("outbox closed while waiting for {what}"));
        if pred(&d.envelope) {
            return d.envelope;
        }
        eprintln!("skipping {:?}", d.envelope);
    }
}

async fn login(p: &Prosody, user: &str) -> XmppClient {
    XmppClient::connect(ClientConfig::plain(
        p.c2s_addr(),
        "example.test",
        user,
        "pw",
    ))
    .await
    .unwrap_or_else(|e| panic!("{user} login: {e:#}"))
}

#[tokio::test]
async fn local_user_and_foreign_users_talk_through_the_component_links() {
    let _component_exclusive = metrics::asserts(Family::Component).await;
    bounded("component links", async {
        let (in_messages, out_presences) = (stanzas("in", "message"), stanzas("out", "presence"));
        let p = home_node(HOME_IP);
        let mut gw = start_gateway(config(&[p.component_addr()], SECRET), false);
        for d in ["partner.test", "xmpp.test"] {
            let s = gw.wait_status(d, "link up", |s| s.up).await;
            assert_eq!(s.peer, Some(p.component_addr()));
        }

        let mut alice = login(&p, "alice").await;
        alice.send_presence(None, None).await.expect("presence");

        // alice → bob@partner.test: out of the partner.test component, into the SIP outbox.
        alice
            .send_message("bob@partner.test", "hello bob")
            .await
            .expect("send");
        let env = delivery_matching(&mut gw.sip, "alice's message", |e| {
            !matches!(e.body, Body::Subscription(_) | Body::Presence(_))
        })
        .await;
        assert_eq!(env.from.to_string(), alice.jid());
        assert_eq!(env.to.to_string(), "bob@partner.test");
        // The core relays the stanza as is; the SIP edge takes its text (`message_text`).
        let text = match &env.body {
            Body::Message(m) => Some(m.text.clone()),
            Body::Xmpp(raw) => legate::xmpp::convert::message_text(raw).map(|m| m.text),
            _ => None,
        };
        assert_eq!(text.as_deref(), Some("hello bob"), "{env:?}");

        // alice → dave@xmpp.test: the xmpp.test component, into the s2s outbox, bytes intact.
        alice
            .send_message("dave@xmpp.test", "hello dave")
            .await
            .expect("send");
        let env = delivery_matching(
            &mut gw.s2s,
            "alice's message to xmpp.test",
            |e| matches!(&e.body, Body::Xmpp(x) if x.name == "message"),
        )
        .await;
        assert_eq!(env.to.to_string(), "dave@xmpp.test");
        let Body::Xmpp(raw) = &env.body else {
            unreachable!()
        };
        assert!(String::from_utf8_lossy(&raw.bytes).contains("<body>hello dave</body>"));

        // bob (SIP) → alice: injected on the partner.test component, delivered by Prosody.
        let sub = gw.hub.submit(
            &Origin::Sip {
                domain: dom("partner.test"),
            },
            Envelope {
                from: addr("bob@partner.test"),
                to: addr("alice@example.test"),
                body: Body::Message(MessageBody {
                    id: Some("sip-1".into()),
                    text: "hi alice & co".into(),
                    thread: None,
                    ..Default::default()
                }),
                stanza_id: None,
                via_cluster: None,
            },
        );
        assert!(matches!(sub, Submitted::Delivered(_)), "{sub:?}");
        let m = alice
            .expect_message_from("bob@partner.test", WAIT)
            .await
            .expect("alice receives bob's message");
        assert_eq!(m.body.as_deref(), Some("hi alice & co"));

        // bob's presence (Lync "busy") → alice sees the XMPP rendering of the tables.
        let sub = gw.hub.submit(
            &Origin::Sip {
                domain: dom("partner.test"),
            },
            Envelope {
                from: addr("bob@partner.test"),
                to: addr("alice@example.test"),
                body: Body::Presence(PresenceBody {
                    system: Arc::from("lync"),
                    state: Arc::from("busy"),
                    note: None,
                    priority: None,
                }),
                stanza_id: None,
                via_cluster: None,
            },
        );
        assert!(matches!(sub, Submitted::Delivered(_)), "{sub:?}");
        let pr = alice
            .expect_presence_from("bob@partner.test", None, WAIT)
            .await
            .expect("alice receives bob's presence");
        assert_eq!(pr.show.as_deref(), Some("away"), "{}", pr.raw);
        assert_eq!(pr.status.as_deref(), Some("Busy"), "{}", pr.raw);

        // alice subscribes to bob: a subscription envelope reaches the SIP outbox.
        alice
            .subscribe("bob@partner.test")
            .await
            .expect("subscribe");
        let env = delivery_matching(&mut gw.sip, "alice's subscription", |e| {
            e.body == Body::Subscription(Subscription::Subscribe)
        })
        .await;
        assert_eq!(env.from.bare_string(), "alice@example.test");
        assert_eq!(env.to.bare_string(), "bob@partner.test");

        // The home node's users were learned from the link.
        assert_eq!(
            gw.hub
                .directory()
                .lookup(&gw.hub.config(), &addr("alice@example.test"))
                .as_deref(),
            Some("hn1")
        );
        // Deltas under the exclusive component lock: this test's own stanzas.
        assert!(
            stanzas("in", "message") > in_messages,
            "alice's message not counted"
        );
        assert!(
            stanzas("out", "presence") > out_presences,
            "bob's presence not counted"
        );

        alice.close().await;
        let links = gw.links.clone();
        gw.shutdown().await;
        for (_, d, s) in links.status.snapshot() {
            assert!(!s.up, "{d} still up after shutdown");
        }
    })
    .await;
}

/// A loopback port nothing listens on.
fn refused_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let a = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
    drop(l);
    a
}

#[tokio::test]
async fn fails_over_from_a_refusing_address_to_prosody() {
    let _component_shared = metrics::moves(Family::Component).await;
    bounded("failover", async {
        let p = home_node(Ipv4Addr::new(127, 0, 0, 7));
        let dead = refused_addr();
        let gw = start_gateway(config(&[dead, p.component_addr()], SECRET), false);
        for d in ["partner.test", "xmpp.test"] {
            let s = gw
                .wait_status(d, "link up on the second address", |s| s.up)
                .await;
            assert_eq!(s.peer, Some(p.component_addr()));
            assert!(s.failures >= 1, "{s:?}");
            assert_eq!(
                s.last_failure.as_ref().map(|f| f.0),
                Some("connect"),
                "{s:?}"
            );
        }
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn fails_over_between_xmpp_component_srv_targets() {
    let _component_shared = metrics::moves(Family::Component).await;
    bounded("srv failover", async {
        let p = home_node(Ipv4Addr::new(127, 0, 0, 10));
        let dead = refused_addr();
        // RFC 2782 order: priority 0 (refusing) first, then priority 10 (Prosody).
        let records = [
            DnsRecord::Srv {
                owner: "_xmpp-component._tcp.home.test".into(),
                target: "dead.home.test".into(),
                port: dead.port(),
                priority: 0,
                weight: 5,
            },
            DnsRecord::Srv {
                owner: "_xmpp-component._tcp.home.test".into(),
                target: "hn.home.test".into(),
                port: p.component_addr().port(),
                priority: 10,
                weight: 5,
            },
            DnsRecord::a("dead.home.test", Ipv4Addr::LOCALHOST),
            DnsRecord::a("hn.home.test", p.ip()),
        ];
        let dns = Dnsmasq::start(&records).unwrap_or_else(|e| panic!("dnsmasq: {e:#}"));
        let resolver = Resolver::new(
            &DnsSettings {
                nameservers: Some(vec![dns.addr()]),
                timeout: Duration::from_secs(2),
                attempts: 1,
                ..DnsSettings::default()
            },
            &[],
        )
        .unwrap_or_else(|e| panic!("resolver: {e}"));
        let cfg = config::from_toml(
            &config_toml_with("home.test", "srv = true", SECRET),
            Path::new("srv.toml"),
            BUILTIN_SYSTEMS,
        )
        .unwrap_or_else(|d| panic!("{d}"));
        let gw = start_gateway_with(cfg, false, Some(resolver));
        for d in ["partner.test", "xmpp.test"] {
            let s = gw
                .wait_status(d, "link up on the SRV fallback", |s| s.up)
                .await;
            assert_eq!(s.peer, Some(p.component_addr()));
            assert_eq!(
                s.last_failure.as_ref().map(|f| f.0),
                Some("connect"),
                "{s:?}"
            );
        }
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn wrong_secret_is_reported_and_retried_with_backoff() {
    let _component_exclusive = metrics::asserts(Family::Component).await;
    bounded("wrong secret", async {
        let p = home_node(Ipv4Addr::new(127, 0, 0, 8));
        let refused_before = metrics::counter(
            "legate_component_connects_total",
            &["outcome=\"not_authorized\""],
        );
        let gw = start_gateway(
            config(&[p.component_addr()], "not-the-secret-0123456789"),
            true,
        );
        let t0 = tokio::time::Instant::now();
        let s = gw
            .wait_status("partner.test", "three refusals", |s| s.failures >= 3)
            .await;
        // Three refusals need at least the first two (jittered) backoff delays: 50 + 100 ms.
        assert!(t0.elapsed() >= Duration::from_millis(150));
        assert!(!s.up);
        assert_eq!(s.connects, 0);
        assert_eq!(
            s.last_failure.as_ref().map(|f| f.0),
            Some("not_authorized"),
            "{s:?}"
        );
        assert!(
            metrics::counter(
                "legate_component_connects_total",
                &["outcome=\"not_authorized\""]
            ) >= refused_before + 3,
            "the three refusals are not counted"
        );
        // A delivery meanwhile waits, then is bounced to its sender.
        gw.hub.submit(
            &Origin::Sip {
                domain: dom("partner.test"),
            },
            Envelope {
                from: addr("bob@partner.test"),
                to: addr("alice@example.test"),
                body: Body::Message(MessageBody {
                    id: Some("lost-1".into()),
                    text: "anyone?".into(),
                    thread: None,
                    ..Default::default()
                }),
                stanza_id: None,
                via_cluster: None,
            },
        );
        gw.wait_status("partner.test", "delivery queued", |s| s.queued == 1)
            .await;
        gw.shutdown_bounce_check().await;
        // Prosody 0.12's side of it.
        assert!(p
            .log()
            .contains("Component authentication failed for partner.test"));
    })
    .await;
}

impl Gateway {
    /// Shuts down and checks that what waited for the link was answered, not dropped.
    async fn shutdown_bounce_check(mut self) {
        let _ = self.stop.send(true);
        let env = delivery_matching(&mut self.sip, "the bounce", |e| {
            matches!(e.body, Body::Error { .. })
        })
        .await;
        assert_eq!(env.to.to_string(), "bob@partner.test");
        self.shutdown().await;
    }
}

#[tokio::test]
async fn legate_run_connects_its_components_to_prosody() {
    bounded("legate run", async {
        let p = home_node(Ipv4Addr::new(127, 0, 0, 9));
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let cfg_path = dir.path().join("legate.toml");
        std::fs::write(&cfg_path, config_toml(&[p.component_addr()], SECRET))
            .unwrap_or_else(|e| panic!("{e}"));
        let legate = Legate::start(&cfg_path, &["admin"]).unwrap_or_else(|e| panic!("{e:#}"));

        // Both components connect (the gauge of the separate process, and its log line).
        legate
            .wait_metrics("both component links up", 2 * WAIT, |m| {
                metric_value(m, "legate_component_links_up") == Some(2.0)
            })
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        legate
            .wait_output("the partner.test link's log line", WAIT, |t| {
                t.contains("component partner.test connected to home node hn1")
            })
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));

        // alice's message to bob@partner.test crosses Prosody and the link into legate; with no
        // SIP edge to carry it, the hub answers alice with an error through the same link.
        let mut alice = login(&p, "alice").await;
        alice.send_presence(None, None).await.expect("presence");
        alice
            .send_message("bob@partner.test", "through the binary")
            .await
            .expect("send");
        let e = alice
            .next_stanza_matching(
                |s| s.name == "message" && s.sender_bare() == Some("bob@partner.test"),
                WAIT,
            )
            .await
            .expect("an answer from bob@partner.test's side");
        assert!(e.is_type("error"), "{}", e.raw);
        alice.close().await;
        drop(legate);
    })
    .await;
}

#[tokio::test]
async fn prosody_refusals_are_classified_and_retried() {
    let _component_shared = metrics::moves(Family::Component).await;
    bounded("conflict and host-unknown", async {
        let p = home_node(Ipv4Addr::new(127, 0, 0, 11));
        // Someone else already holds partner.test (Prosody's default `kick_new` policy refuses
        // the newcomer), and unknown.test is not a component of this home node.
        let squatter =
            common::xmpp_client::connect_component(p.component_addr(), "partner.test", SECRET)
                .await
                .unwrap_or_else(|e| panic!("raw component: {e:#}"));
        let toml = config_toml(&[p.component_addr()], SECRET).replace(
            "[xmpp.federation]",
            "[[sip.federated_domain]]\nname = \"unknown.test\"\nsystem = \"lync\"\n[xmpp.federation]",
        );
        let cfg = config::from_toml(&toml, Path::new("c.toml"), BUILTIN_SYSTEMS)
            .unwrap_or_else(|d| panic!("{d}"));
        let gw = start_gateway(cfg, true);
        gw.wait_status("xmpp.test", "link up", |s| s.up).await;
        let s = gw
            .wait_status("partner.test", "conflict", |s| s.failures >= 2)
            .await;
        assert_eq!(s.last_failure.as_ref().map(|f| f.0), Some("conflict"), "{s:?}");
        assert!(!s.up);
        let s = gw
            .wait_status("unknown.test", "host-unknown", |s| s.failures >= 1)
            .await;
        assert_eq!(
            s.last_failure.as_ref().map(|f| f.0),
            Some("host_unknown"),
            "{s:?}"
        );
        // Once the other holder leaves, the retries win the component.
        drop(squatter);
        let s = gw
            .wait_status("partner.test", "link up after the conflict", |s| s.up)
            .await;
        assert_eq!(s.connects, 1);
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn links_come_back_after_the_home_node_restarts() {
    let _component_shared = metrics::moves(Family::Component).await;
    bounded("home node restart", async {
        let p = home_node(Ipv4Addr::new(127, 0, 0, 12));
        let prosody_cfg = p.config().clone();
        let gw = start_gateway(config(&[p.component_addr()], SECRET), true);
        gw.wait_status("partner.test", "link up", |s| s.up).await;
        drop(p);
        let s = gw.wait_status("partner.test", "link down", |s| !s.up).await;
        assert!(s.last_failure.is_some(), "{s:?}");
        let p = Prosody::start(prosody_cfg).unwrap_or_else(|e| panic!("restart: {e:#}"));
        gw.wait_status("partner.test", "link up again", |s| s.up && s.connects == 2)
            .await;
        gw.wait_status("xmpp.test", "link up again", |s| s.up && s.connects == 2)
            .await;
        let mut alice = login(&p, "alice").await;
        alice.send_presence(None, None).await.expect("presence");
        gw.hub.submit(
            &Origin::Sip {
                domain: dom("partner.test"),
            },
            Envelope {
                from: addr("bob@partner.test"),
                to: addr("alice@example.test"),
                body: Body::Message(MessageBody {
                    id: None,
                    text: "after the restart".into(),
                    thread: None,
                    ..Default::default()
                }),
                stanza_id: None,
                via_cluster: None,
            },
        );
        let m = alice
            .expect_message_from("bob@partner.test", WAIT)
            .await
            .expect("message after the restart");
        assert_eq!(m.body.as_deref(), Some("after the restart"));
        alice.close().await;
        gw.shutdown().await;
    })
    .await;
}

/// Issue 12 (nothing accepted is lost): a SIP MESSAGE is answered 200 only once the home node's
/// link has written it. Here the home node (a real Prosody) is down: the hub takes the message
/// into the link's queue, but the link tells nothing until the restarted Prosody is connected
/// and the message written; then the user receives it.
#[tokio::test]
async fn a_message_is_told_written_only_once_the_restarted_home_node_has_it() {
    let _component_shared = metrics::moves(Family::Component).await;
    bounded("written only after the restart", async {
        let p = home_node(Ipv4Addr::new(127, 0, 0, 13));
        let prosody_cfg = p.config().clone();
        let gw = start_gateway(config(&[p.component_addr()], SECRET), true);
        gw.wait_status("partner.test", "link up", |s| s.up).await;
        drop(p);
        gw.wait_status("partner.test", "link down", |s| !s.up).await;
        let (handled, mut written) = legate::gateway::hub::Handled::pair();
        let (submitted, tells) = gw.hub.submit_handled(
            &Origin::Sip {
                domain: dom("partner.test"),
            },
            Envelope {
                from: addr("bob@partner.test"),
                to: addr("alice@example.test"),
                body: Body::Message(MessageBody {
                    text: "queued while the home node was down".into(),
                    ..Default::default()
                }),
                stanza_id: None,
                via_cluster: None,
            },
            handled,
        );
        assert!(
            matches!(submitted, Submitted::Delivered(_)),
            "{submitted:?}"
        );
        assert!(tells, "a component link's own outbox tells when it wrote");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            matches!(
                written.try_recv(),
                Err(tokio::sync::oneshot::error::TryRecvError::Empty)
            ),
            "not written while the home node is down"
        );
        let p = Prosody::start(prosody_cfg).unwrap_or_else(|e| panic!("restart: {e:#}"));
        tokio::time::timeout(WAIT, &mut written)
            .await
            .expect("told within the wait once the link is back")
            .expect("written, not lost");
        let mut alice = login(&p, "alice").await;
        alice.send_presence(None, None).await.expect("presence");
        let m = alice
            .expect_message_from("bob@partner.test", WAIT)
            .await
            .expect("the queued message is delivered (offline storage or live)");
        assert_eq!(
            m.body.as_deref(),
            Some("queued while the home node was down")
        );
        alice.close().await;
        gw.shutdown().await;
    })
    .await;
}
