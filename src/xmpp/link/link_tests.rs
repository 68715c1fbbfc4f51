//! In-process tests of the running links against a fake XEP-0114 server on real loopback
//! sockets: handshake and relay both ways, failover, wrong secret with retries, queueing and
//! bouncing while the home node is down, error answers to unreadable stanzas.

use super::*;
use crate::gateway::envelope::{Address, Body, MessageBody};
use crate::gateway::hub::{Delivery, Handled, Waited};
use crate::presence::map::MappingStore;
use crate::xmpp::component::handshake_digest;
use crate::xmpp::stanza::{root_text, Stanza};
use crate::xmpp::stream::{StreamEvent, StreamFramer};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const SECRET: &str = "0123456789abcdef";
const WAIT: Duration = Duration::from_secs(10);

fn config(addresses: &[SocketAddr]) -> Config {
    config_with(addresses, "")
}

/// [`config`] with `more` appended to the `[[home_node]]` entry.
fn config_with(addresses: &[SocketAddr], more: &str) -> Config {
    let list: Vec<String> = addresses.iter().map(|a| format!("\"{a}\"")).collect();
    let src = format!(
        r#"
[[local_domain]]
name = "example.com"
[[sip.federated_domain]]
name = "partner.com"
[[home_node]]
name = "hn1"
addresses = [{}]
component_secret = "{SECRET}"
{more}
"#,
        list.join(", ")
    );
    crate::config::from_toml(&src, Path::new("t.toml"), crate::config::BUILTIN_SYSTEMS)
        .unwrap_or_else(|d| panic!("{d}"))
}

fn settings(cfg: &Config) -> LinkSettings {
    LinkSettings {
        handshake_timeout: Duration::from_secs(2),
        write_timeout: Duration::from_secs(2),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        queue_timeout: Duration::from_millis(400),
        ..LinkSettings::from_config(cfg)
    }
}

struct Gateway {
    hub: Arc<Hub>,
    sip: mpsc::Receiver<Delivery>,
    links: ComponentLinks,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

fn start(addresses: &[SocketAddr]) -> Gateway {
    start_on(&config(addresses), None)
}

/// Starts the links of `cfg` (in a cluster when `placement` is given); the gateway's `sip`
/// is the hub's SIP outbox.
fn start_on(cfg: &Config, placement: Option<Arc<dyn placement::Placement>>) -> Gateway {
    let maps = MappingStore::open(None).unwrap_or_else(|d| panic!("{d}"));
    let hub = Hub::new(cfg.clone(), maps);
    let sip = hub.register_sip(64);
    let (stop, rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let links = spawn_with(
        hub.clone(),
        None,
        settings(cfg),
        rx,
        &mut tasks,
        None,
        placement,
    );
    Gateway {
        hub,
        sip,
        links,
        stop,
        tasks,
    }
}

impl Gateway {
    fn status(&self) -> ComponentStatus {
        self.links
            .status
            .get("hn1", &dom("partner.com"))
            .unwrap_or_default()
    }

    async fn wait_status(
        &self,
        what: &str,
        f: impl Fn(&ComponentStatus) -> bool,
    ) -> ComponentStatus {
        let t0 = tokio::time::Instant::now();
        loop {
            let s = self.status();
            if f(&s) {
                return s;
            }
            assert!(t0.elapsed() < WAIT, "timed out waiting for {what}: {s:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) {
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

fn message(from: &str, to: &str, text: &str) -> Envelope {
    Envelope {
        from: addr(from),
        to: addr(to),
        body: Body::Message(MessageBody {
            id: Some("m1".into()),
            text: text.into(),
            thread: None,
            ..Default::default()
        }),
        stanza_id: None,
        via_cluster: None,
    }
}

/// The home node's side of one component connection.
struct Peer {
    sock: TcpStream,
    framer: StreamFramer,
    domain: String,
}

impl Peer {
    /// Answers the handshake on a connection the test held so far, accepting any digest.
    async fn complete_held_handshake(sock: TcpStream) -> Peer {
        let mut p = Peer {
            sock,
            framer: StreamFramer::default(),
            domain: String::new(),
        };
        let StreamEvent::StreamOpen(_) = p.next().await else {
            panic!("no header")
        };
        p.send("<stream:stream xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams' id='id42'>").await;
        let _hs = p.stanza().await;
        p.send("<handshake/>").await;
        p
    }

    async fn next(&mut self) -> StreamEvent {
        let mut buf = [0u8; 4096];
        tokio::time::timeout(WAIT, async {
            loop {
                match self.framer.next_event() {
                    Ok(Some(ev)) => return ev,
                    Ok(None) => {}
                    Err(e) => panic!("gateway sent bad XML: {e}"),
                }
                let n = self.sock.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    return StreamEvent::StreamClose;
                }
                self.framer.push(&buf[..n]);
            }
        })
        .await
        .unwrap_or_else(|_| panic!("nothing from the gateway"))
    }

    async fn stanza(&mut self) -> Stanza {
        match self.next().await {
            StreamEvent::Stanza(s) => s,
            other => panic!("expected a stanza, got {other:?}"),
        }
    }

    async fn send(&mut self, xml: &str) {
        self.sock
            .write_all(xml.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Accepts one component connection and answers its handshake: `Ok` accepts it, `Err(cond)`
/// refuses it with that stream error.
async fn accept(listener: &TcpListener, verdict: Result<(), &str>) -> Peer {
    let (sock, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .unwrap_or_else(|_| panic!("no connection"))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut p = Peer {
        sock,
        framer: StreamFramer::default(),
        domain: String::new(),
    };
    let StreamEvent::StreamOpen(h) = p.next().await else {
        panic!("no stream header")
    };
    assert_eq!(h.default_ns(), "jabber:component:accept");
    p.domain = h.to().unwrap_or_default().to_string();
    let domain = p.domain.clone();
    p.send(&format!("<stream:stream xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams' id='id42' from='{domain}'>")).await;
    let hs = p.stanza().await;
    assert_eq!(hs.name(), "handshake");
    let ok = root_text(&hs) == handshake_digest("id42", SECRET);
    match verdict {
        Ok(()) if ok => p.send("<handshake/>").await,
        Ok(()) => panic!("wrong handshake digest"),
        Err(cond) => {
            p.send(&format!("<stream:error><{cond} xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error></stream:stream>")).await;
        }
    }
    p
}

async fn next_delivery(rx: &mut mpsc::Receiver<Delivery>) -> Delivery {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("nothing delivered"))
        .unwrap_or_else(|| panic!("outbox closed"))
}

async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

fn local(l: &TcpListener) -> SocketAddr {
    l.local_addr().unwrap_or_else(|e| panic!("{e}"))
}

/// A loopback port nothing listens on (bound, then closed).
async fn refused_port() -> SocketAddr {
    let l = listener().await;
    let a = local(&l);
    drop(l);
    a
}

#[tokio::test]
async fn relays_both_ways_after_the_handshake() {
    let l = listener().await;
    let mut gw = start(&[local(&l)]);
    let mut peer = accept(&l, Ok(())).await;
    assert_eq!(peer.domain, "partner.com");
    gw.wait_status("link up", |s| s.up).await;

    // Home node → gateway → SIP outbox.
    peer.send("<message from='alice@example.com/pc' to='bob@partner.com' id='x1' type='chat'><body>hi bob</body></message>").await;
    let d = next_delivery(&mut gw.sip).await;
    assert_eq!(d.envelope.from.to_string(), "alice@example.com/pc");
    assert_eq!(d.envelope.to.to_string(), "bob@partner.com");

    // Foreign side → hub → component link.
    let sub = gw.hub.submit(
        &Origin::Sip {
            domain: dom("partner.com"),
        },
        message("bob@partner.com", "alice@example.com", "hello <alice>"),
    );
    assert!(
        matches!(sub, crate::gateway::hub::Submitted::Delivered(_)),
        "{sub:?}"
    );
    let s = peer.stanza().await;
    assert_eq!(s.name(), "message");
    assert_eq!(s.from().as_deref(), Some("bob@partner.com"));
    assert_eq!(s.to().as_deref(), Some("alice@example.com"));
    assert!(String::from_utf8_lossy(s.bytes()).contains("<body>hello &lt;alice&gt;</body>"));

    // An unreadable stanza is answered on the link, not forwarded.
    peer.send("<message from='alice@example.com' to='bo b@partner.com' id='bad1'><body>x</body></message>").await;
    let e = peer.stanza().await;
    assert_eq!(e.stanza_type().as_deref(), Some("error"));
    assert_eq!(e.id().as_deref(), Some("bad1"));
    assert!(String::from_utf8_lossy(e.bytes()).contains("jid-malformed"));
    // And an iq to the component itself gets service-unavailable.
    peer.send("<iq from='alice@example.com/pc' to='partner.com' id='q1' type='get'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>").await;
    let e = peer.stanza().await;
    assert!(String::from_utf8_lossy(e.bytes()).contains("service-unavailable"));

    // Shutdown closes the stream with `system-shutdown` (RFC 6120 §4.9.3.17).
    let _ = gw.stop.send(true);
    let e = peer.stanza().await;
    assert_eq!(e.name(), "error");
    assert!(String::from_utf8_lossy(e.bytes()).contains("<system-shutdown "));
    assert_eq!(peer.next().await, StreamEvent::StreamClose);
    gw.stop().await;
}

#[tokio::test]
async fn fails_over_to_the_next_address_and_back_after_a_drop() {
    let dead = refused_port().await;
    let l = listener().await;
    let gw = start(&[dead, local(&l)]);
    let peer = accept(&l, Ok(())).await;
    let s = gw.wait_status("link up", |s| s.up).await;
    assert_eq!(s.peer, Some(local(&l)));
    assert!(s.failures >= 1);
    assert_eq!(s.last_failure.as_ref().map(|f| f.0), Some("connect"));

    // The home node drops the connection: the gateway reconnects (first address still dead).
    drop(peer);
    let _peer = accept(&l, Ok(())).await;
    gw.wait_status("second connect", |s| s.up && s.connects == 2)
        .await;
    gw.stop().await;
}

#[tokio::test]
async fn wrong_secret_is_reported_and_retried_with_backoff() {
    // Only this test refuses a handshake, so the change in the counter is its own.
    let refused = || CONNECTS.with_label_values(&["not_authorized"]).get();
    let refused_before = refused();
    let l = listener().await;
    let gw = start(&[local(&l)]);
    let t0 = tokio::time::Instant::now();
    for _ in 0..3 {
        let _p = accept(&l, Err("not-authorized")).await;
    }
    // Three refusals took at least the first two backoff delays (≥ 25 ms + 50 ms).
    assert!(t0.elapsed() >= Duration::from_millis(75));
    let s = gw
        .wait_status("failures recorded", |s| s.failures >= 3)
        .await;
    assert!(!s.up);
    assert_eq!(s.connects, 0);
    assert_eq!(s.last_failure.as_ref().map(|f| f.0), Some("not_authorized"));
    assert!(
        refused() >= refused_before + 3,
        "the three refusals are not counted"
    );
    gw.stop().await;
}

#[tokio::test]
async fn deliveries_wait_for_the_link_then_bounce_when_it_stays_down() {
    let l = listener().await;
    let mut gw = start(&[local(&l)]);
    // The home node accepts TCP but we hold the handshake: the delivery must wait, then go out.
    let (sock, _) = tokio::time::timeout(WAIT, l.accept())
        .await
        .unwrap_or_else(|_| panic!("no connection"))
        .unwrap_or_else(|e| panic!("{e}"));
    gw.hub.submit(
        &Origin::Sip {
            domain: dom("partner.com"),
        },
        message("bob@partner.com", "alice@example.com", "queued"),
    );
    gw.wait_status("queued", |s| s.queued == 1).await;
    drop(sock);
    // Nobody accepts any more: after the queue timeout the sender gets remote-server-timeout
    // (RFC 6120 §8.3.3.16: the link to the recipient's server did not come up in time).
    drop(l);
    let d = next_delivery(&mut gw.sip).await;
    assert_eq!(d.envelope.to.to_string(), "bob@partner.com");
    assert!(
        matches!(&d.envelope.body, Body::Error { condition: ErrorCondition::RemoteServerTimeout, id: Some(id), .. } if id == "m1"),
        "{d:?}"
    );
    gw.wait_status("queue empty", |s| s.queued == 0).await;
    gw.stop().await;
}

#[tokio::test]
async fn queued_deliveries_are_written_once_connected() {
    let l = listener().await;
    let gw = start(&[local(&l)]);
    let (sock, _) = tokio::time::timeout(WAIT, l.accept())
        .await
        .unwrap_or_else(|_| panic!("no connection"))
        .unwrap_or_else(|e| panic!("{e}"));
    gw.hub.submit(
        &Origin::Sip {
            domain: dom("partner.com"),
        },
        message("bob@partner.com", "alice@example.com", "early"),
    );
    gw.wait_status("queued", |s| s.queued == 1).await;
    // Answer the handshake on the connection that was held.
    let mut p = Peer::complete_held_handshake(sock).await;
    let m = p.stanza().await;
    assert!(String::from_utf8_lossy(m.bytes()).contains("<body>early</body>"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_node_that_stops_reading_slows_the_sender_and_loses_nothing() {
    // 2 000 messages of 8 KiB (16 MiB) cannot all fit in the outbox (8) and the loopback
    // socket buffers: while the home node reads nothing, the submitter must be held.
    const N: usize = 2_000;
    let l = listener().await;
    let gw = start_with(&[local(&l)], |s| {
        s.queue_capacity = 8;
        s.write_timeout = Duration::from_secs(20);
    });
    let mut peer = accept(&l, Ok(())).await;
    gw.wait_status("link up", |s| s.up).await;
    let submitted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hub = gw.hub.clone();
    let count = submitted.clone();
    let body = "x".repeat(8 * 1024);
    let sender = tokio::spawn(async move {
        let mut outcomes = Vec::new();
        for i in 0..N {
            let env = message(
                "bob@partner.com",
                "alice@example.com",
                &format!("{i} {body}"),
            );
            let origin = Origin::Sip {
                domain: dom("partner.com"),
            };
            outcomes.push(hub.submit_wait(&origin, env).await);
            count.store(i + 1, std::sync::atomic::Ordering::SeqCst);
        }
        outcomes
    });
    // The sender stalls below N: wait until its progress stops moving.
    let mut last = usize::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = submitted.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            now < N,
            "all {N} submitted while the home node read nothing"
        );
        if now == last {
            break;
        }
        last = now;
    }
    // The home node reads again: every message arrives, in order, none bounced.
    for i in 0..N {
        let m = peer.stanza().await;
        let text = String::from_utf8_lossy(m.bytes()).into_owned();
        assert!(
            text.contains(&format!("<body>{i} x")),
            "message {i} out of order or missing: {}",
            text.get(..120).unwrap_or(&text)
        );
    }
    let outcomes = tokio::time::timeout(WAIT, sender)
        .await
        .unwrap_or_else(|_| panic!("sender still blocked"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, crate::gateway::hub::Submitted::Delivered(_))));
    let mut gw = gw;
    assert!(
        gw.sip.try_recv().is_err(),
        "nothing may bounce to the sender"
    );
    gw.stop().await;
}

fn start_with(addresses: &[SocketAddr], tweak: impl FnOnce(&mut LinkSettings)) -> Gateway {
    let cfg = config(addresses);
    let mut s = settings(&cfg);
    tweak(&mut s);
    let maps = MappingStore::open(None).unwrap_or_else(|d| panic!("{d}"));
    let hub = Hub::new(cfg, maps);
    let sip = hub.register_sip(64);
    let (stop, rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let links = spawn(hub.clone(), None, s, rx, &mut tasks);
    Gateway {
        hub,
        sip,
        links,
        stop,
        tasks,
    }
}

#[tokio::test]
async fn idle_links_send_whitespace_keepalives() {
    let l = listener().await;
    let gw = start_with(&[local(&l)], |s| s.keepalive = Duration::from_millis(100));
    let mut peer = accept(&l, Ok(())).await;
    gw.wait_status("link up", |s| s.up).await;
    // The framer drops inter-stanza whitespace, so read the raw bytes.
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, peer.sock.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("no keepalive"))
        .unwrap_or(0);
    assert!(
        n > 0 && buf[..n].iter().all(|b| *b == b' '),
        "{:?}",
        &buf[..n]
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_silent_home_node_times_out_the_handshake() {
    let l = listener().await;
    let gw = start_with(&[local(&l)], |s| {
        s.handshake_timeout = Duration::from_millis(300)
    });
    let (mut sock, _) = tokio::time::timeout(WAIT, l.accept())
        .await
        .unwrap_or_else(|_| panic!("no connection"))
        .unwrap_or_else(|e| panic!("{e}"));
    let s = gw
        .wait_status("handshake timeout", |s| s.failures >= 1)
        .await;
    assert_eq!(
        s.last_failure.as_ref().map(|f| f.0),
        Some("timeout"),
        "{s:?}"
    );
    // We said why before closing (RFC 6120 §4.9.3.4).
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, sock.read_to_end(&mut got)).await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.contains("<connection-timeout"), "{got}");
    gw.stop().await;
}

#[tokio::test]
async fn garbage_after_the_handshake_ends_the_stream_and_reconnects() {
    let l = listener().await;
    let gw = start(&[local(&l)]);
    let mut peer = accept(&l, Ok(())).await;
    gw.wait_status("link up", |s| s.up).await;
    peer.send("<message></iq>").await;
    let _again = accept(&l, Ok(())).await;
    let s = gw
        .wait_status("second connect", |s| s.up && s.connects == 2)
        .await;
    assert_eq!(
        s.last_failure.as_ref().map(|f| f.0),
        Some("framing"),
        "{s:?}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_stream_error_on_an_established_link_is_not_reported_as_a_handshake_failure() {
    let l = listener().await;
    let gw = start(&[local(&l)]);
    let mut peer = accept(&l, Ok(())).await;
    gw.wait_status("link up", |s| s.up).await;
    // What Prosody does with a stanza it cannot parse: a stream error, then the close.
    peer.send("<stream:error><not-well-formed xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error></stream:stream>").await;
    let s = gw
        .wait_status("link down", |s| !s.up && s.last_failure.is_some())
        .await;
    let (label, text) = s.last_failure.unwrap_or_default();
    assert_eq!(label, "stream_error");
    assert!(
        text.starts_with("established stream ended") && text.contains("NotWellFormed"),
        "{text}"
    );
    assert!(!text.contains("handshake"), "{text}");
    gw.stop().await;
}

/// A cluster placement for one test: the holder is set by the test, and each hand-over is
/// recorded and answered from a script (then "accepted" for everything).
struct FakePlacement {
    holder: watch::Sender<placement::Holder>,
    script: std::sync::Mutex<std::collections::VecDeque<Result<Vec<placement::Handed>, String>>>,
    calls: std::sync::Mutex<Vec<(String, Vec<String>)>>,
}

impl placement::Placement for FakePlacement {
    fn follow(&self, _: &str, _: &Domain) -> watch::Receiver<placement::Holder> {
        self.holder.subscribe()
    }

    fn hand(
        &self,
        peer: Arc<str>,
        _home_node: Arc<str>,
        batch: &[&Envelope],
    ) -> placement::HandFuture {
        let texts = batch
            .iter()
            .map(|e| match &e.body {
                Body::Message(m) => m.text.clone(),
                _ => String::new(),
            })
            .collect();
        if let Ok(mut c) = self.calls.lock() {
            c.push((peer.to_string(), texts));
        }
        let n = batch.len();
        let answer = self
            .script
            .lock()
            .ok()
            .and_then(|mut s| s.pop_front())
            .unwrap_or_else(|| Ok(vec![placement::Handed::Accepted; n]));
        Box::pin(async move { answer })
    }
}

#[tokio::test]
async fn a_link_another_node_holds_hands_its_deliveries_over_in_order_then_connects_when_it_holds_it(
) {
    use placement::{Handed, Holder};
    let l = listener().await;
    let cfg = config(&[local(&l)]);
    let fake = Arc::new(FakePlacement {
        holder: watch::channel(Holder::Peer(Arc::from("gw2"))).0,
        script: std::sync::Mutex::new(
            [
                Err("gw2 unreachable".to_string()),
                Ok(vec![Handed::Accepted, Handed::NotHolder, Handed::NotHolder]),
                Ok(vec![Handed::Accepted, Handed::Timeout]),
            ]
            .into(),
        ),
        calls: std::sync::Mutex::new(Vec::new()),
    });
    let mut gw = start_on(&cfg, Some(fake.clone() as Arc<dyn placement::Placement>));
    let from_sip = Origin::Sip {
        domain: dom("partner.com"),
    };
    for text in ["m1", "m2", "m3"] {
        gw.hub.submit(
            &from_sip,
            message("bob@partner.com", "alice@example.com", text),
        );
    }
    // Kept through a failed call and a moved claim, in order; the one the holder could not
    // take in time is bounced to its sender.
    let d = next_delivery(&mut gw.sip).await;
    assert!(
        matches!(
            &d.envelope.body,
            Body::Error {
                condition: ErrorCondition::RemoteServerTimeout,
                ..
            }
        ),
        "{d:?}"
    );
    let calls = fake.calls.lock().map(|c| c.clone()).unwrap_or_default();
    let texts: Vec<Vec<String>> = calls.iter().map(|(_, t)| t.clone()).collect();
    assert_eq!(
        texts.first().map(Vec::as_slice),
        Some(&["m1".to_string(), "m2".into(), "m3".into()][..])
    );
    assert!(
        texts.ends_with(&[
            vec!["m1".to_string(), "m2".into(), "m3".into()],
            vec!["m2".to_string(), "m3".into()]
        ]),
        "{texts:?}"
    );
    assert!(calls.iter().all(|(p, _)| p == "gw2"));
    let s = gw.wait_status("queue empty", |s| s.queued == 0).await;
    assert_eq!(s.held_by.as_deref(), Some("gw2"));
    assert!(!s.up);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), l.accept())
            .await
            .is_err(),
        "a node that does not hold the link connected it"
    );

    // This node holds it now: it connects and writes on its own stream.
    let _ = fake.holder.send(Holder::Me);
    let mut p = accept(&l, Ok(())).await;
    gw.wait_status("up", |s| s.up && s.held_by.is_none()).await;
    gw.hub.submit(
        &from_sip,
        message("bob@partner.com", "alice@example.com", "m4"),
    );
    let m = p.stanza().await;
    assert!(String::from_utf8_lossy(m.bytes()).contains("<body>m4</body>"));

    // The claim moves to gw3: the stream is closed and deliveries go to gw3.
    let _ = fake.holder.send(Holder::Peer(Arc::from("gw3")));
    assert!(matches!(p.next().await, StreamEvent::StreamClose));
    gw.wait_status("released", |s| !s.up && s.held_by.as_deref() == Some("gw3"))
        .await;
    gw.hub.submit(
        &from_sip,
        message("bob@partner.com", "alice@example.com", "m5"),
    );
    let t0 = tokio::time::Instant::now();
    loop {
        let last = fake.calls.lock().ok().and_then(|c| c.last().cloned());
        if last == Some(("gw3".to_string(), vec!["m5".to_string()])) {
            break;
        }
        assert!(t0.elapsed() < WAIT, "m5 not handed to gw3: {last:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_home_node_that_takes_a_connection_from_every_node_is_connected_whoever_holds_claims() {
    let l = listener().await;
    let cfg = config_with(&[local(&l)], "connect_from_every_node = true");
    assert!(cfg.home_nodes.iter().all(|h| h.connect_from_every_node));
    let fake = Arc::new(FakePlacement {
        holder: watch::channel(placement::Holder::Peer(Arc::from("gw2"))).0,
        script: std::sync::Mutex::new(Default::default()),
        calls: std::sync::Mutex::new(Vec::new()),
    });
    let gw = start_on(&cfg, Some(fake.clone() as Arc<dyn placement::Placement>));
    // Another node "holds" the link, but this home node takes one connection per gateway node
    // (ejabberd): this node connects and writes its own traffic on it, handing nothing over.
    let mut p = accept(&l, Ok(())).await;
    gw.wait_status("up", |s| s.up && s.held_by.is_none()).await;
    gw.hub.submit(
        &Origin::Sip {
            domain: dom("partner.com"),
        },
        message("bob@partner.com", "alice@example.com", "own link"),
    );
    let m = p.stanza().await;
    assert!(String::from_utf8_lossy(m.bytes()).contains("<body>own link</body>"));
    assert!(fake.calls.lock().map(|c| c.is_empty()).unwrap_or(false));
    gw.stop().await;
}

/// The peer link says a handed envelope is taken only when the link is done with it
/// ([`Handled`]): written to the home node's stream, or answered with an error.
#[tokio::test]
async fn a_delivery_is_done_when_written_or_answered_not_when_queued() {
    let l = listener().await;
    let gw = start(&[local(&l)]);
    let (sock, _) = tokio::time::timeout(WAIT, l.accept())
        .await
        .unwrap_or_else(|_| panic!("no connection"))
        .unwrap_or_else(|e| panic!("{e}"));
    let to_home = |text: &str| {
        let (handled, done) = Handled::pair();
        let d = Delivery {
            link: crate::gateway::Link::Component {
                home_node: "hn1".into(),
            },
            envelope: message("bob@partner.com", "alice@example.com", text),
            handled,
        };
        (d, done)
    };
    let (d, mut done) = to_home("held");
    assert_eq!(gw.hub.deliver_wait(d, WAIT).await, Waited::Delivered);
    gw.wait_status("queued", |s| s.queued == 1).await;
    // Queued while the handshake is held: not done yet.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut done)
            .await
            .is_err(),
        "done before the link was even up"
    );
    let mut p = Peer::complete_held_handshake(sock).await;
    let m = p.stanza().await;
    assert!(String::from_utf8_lossy(m.bytes()).contains("<body>held</body>"));
    let written = tokio::time::timeout(WAIT, done).await;
    assert!(matches!(written, Ok(Ok(()))), "{written:?}");

    // The home node goes away and nobody accepts again: a delivery queued for the link is
    // answered with an error when the node stops, and that counts as done too.
    drop(p);
    drop(l);
    gw.wait_status("down", |s| !s.up).await;
    let (d, done) = to_home("answered");
    assert_eq!(gw.hub.deliver_wait(d, WAIT).await, Waited::Delivered);
    gw.wait_status("queued again", |s| s.queued == 1).await;
    gw.stop().await;
    let answered = tokio::time::timeout(WAIT, done).await;
    assert!(matches!(answered, Ok(Ok(()))), "{answered:?}");
}
