//! The SIP edge over real mutual TLS on loopback (test CA and leaves from `common::certs`):
//! a foreign Lync-like edge with a `partner.com` certificate subscribes, receives NOTIFYs,
//! refreshes, unsubscribes, runs an IM session both ways; a peer whose certificate names
//! another domain, or that presents none, is refused with 403 and the home side sees nothing;
//! outbound traffic reaches the partner's static route over TLS.

use crate::common;
use crate::common::metrics::{self, Family};
use crate::sip_ua;
use common::sipp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use common::certs::{CertFactory, Leaf};
use legate::config::{self, BUILTIN_SYSTEMS};
use legate::gateway::hub::{Delivery, Submitted};
use legate::gateway::{
    Address, Body, Envelope, Hub, Link, MessageBody, Origin, PresenceBody, Subscription,
};
use legate::presence::map::MappingStore;
use legate::sip::edge::SipEdge;
use sip_ua::{body_str, hv, to_tag, Ua, WAIT};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

struct Env {
    hub: Arc<Hub>,
    addr: SocketAddr,
    home: mpsc::Receiver<Delivery>,
    route: TcpListener,
    stop: watch::Sender<bool>,
    edge: Option<SipEdge>,
    certs: CertFactory,
    partner: Leaf,
    _dir: tempfile::TempDir,
}

async fn setup() -> Result<Env> {
    setup_with("").await
}

async fn setup_with(limits: &str) -> Result<Env> {
    let certs = CertFactory::new();
    let ours = certs.leaf("example", &["example.com"]);
    let partner = certs.leaf("partner", &["partner.com", "sip.partner.com"]);
    let dir = tempfile::tempdir()?;
    let route = TcpListener::bind("127.0.0.1:0").await?;
    let text = format!(
        r#"routing_node = "hn1"
[node]
id = "t1"
data_dir = "{data}"
admin_listen = "127.0.0.1:0"
[[local_domain]]
name = "example.com"
cert = "{cert}"
key = "{key}"
[listeners]
sip_tls = "127.0.0.1:0"
sip_tcp = "off"
xmpp_s2s = "off"
xmpp_s2s_direct_tls = "off"
[tls]
trust_bundle = "{ca}"
[limits]
{limits}
[[sip.federated_domain]]
name = "partner.com"
system = "lync"
route = "127.0.0.1:{port}"
[[home_node]]
name = "hn1"
addresses = ["127.0.0.1:5347"]
component_secret = "a-long-enough-secret-1"
default_system = "xmpp"
"#,
        data = dir.path().display(),
        cert = ours.cert.display(),
        key = ours.key.display(),
        ca = certs.ca_path().display(),
        port = route.local_addr()?.port(),
    );
    let cfg = config::from_toml(&text, &dir.path().join("legate.toml"), BUILTIN_SYSTEMS)
        .map_err(|d| anyhow!("config: {d}"))?;
    let maps = MappingStore::open(None).map_err(|d| anyhow!("maps: {d}"))?;
    let hub = Hub::new(cfg, maps);
    let home = hub.register_component("hn1", 256);
    let (stop, rx) = watch::channel(false);
    let edge = SipEdge::start(hub.clone(), rx).await?;
    let addr = edge.tls_addr().context("tls listener")?;
    Ok(Env {
        hub,
        addr,
        home,
        route,
        stop,
        edge: Some(edge),
        certs,
        partner,
        _dir: dir,
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS client presenting `leaf` (or no certificate) and trusting the test CA.
async fn tls_ua(env: &Env, leaf: Option<&Leaf>) -> Result<Ua> {
    let client = leaf.map(|l| (l.cert.as_path(), l.key.as_path()));
    sip_ua::connect_tls(env.addr, env.certs.ca_path(), client, "example.com").await
}

/// Accepts the edge's outbound TLS connection on the partner's route, as `partner.com`.
async fn accept_tls(env: &Env) -> Result<Ua> {
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            legate::tls::load_certs(&env.partner.cert)?,
            legate::tls::load_private_key(&env.partner.key)?,
        )?;
    let (tcp, _) = tokio::time::timeout(WAIT, env.route.accept()).await??;
    let s = tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg)).accept(tcp),
    )
    .await??;
    Ok(Ua::from_stream(s))
}

impl Env {
    async fn home_next(&mut self) -> Result<Delivery> {
        tokio::time::timeout(WAIT, self.home.recv())
            .await
            .context("home side received nothing")?
            .context("outbox closed")
    }

    fn home_send(&self, from: &str, to: &str, body: Body) -> Result<()> {
        let env = Envelope {
            from: Address::parse(from)?,
            to: Address::parse(to)?,
            body,
            stanza_id: None,
            via_cluster: None,
        };
        match self.hub.submit(
            &Origin::Component {
                home_node: "hn1".into(),
            },
            env,
        ) {
            Submitted::Delivered(Link::Sip { .. }) => Ok(()),
            other => bail!("not delivered to SIP: {other:?}"),
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(e) = self.edge.take() {
            e.join(Duration::from_secs(5)).await;
        }
    }
}

fn subscribe(b: &str, cseq: u32, to_tag: Option<&str>, expires: u32) -> Vec<u8> {
    let to = match to_tag {
        Some(t) => format!("To: <sip:alice@example.com>;tag={t}"),
        None => "To: <sip:alice@example.com>".into(),
    };
    sip_ua::build(
        &[
            "SUBSCRIBE sip:alice@example.com SIP/2.0",
            &format!("Via: SIP/2.0/TLS sip.partner.com:5061;branch={b}"),
            "Max-Forwards: 70",
            "From: <sip:bob@partner.com>;tag=bobtag",
            &to,
            "Call-ID: tls-sub-1",
            &format!("CSeq: {cseq} SUBSCRIBE"),
            "Contact: <sip:bob@partner.com;opaque=user:epid:E1;gruu>",
            "Event: presence",
            "Accept: application/pidf+xml",
            &format!("Expires: {expires}"),
            "Content-Length: {CL}",
        ],
        b"",
    )
}

#[tokio::test]
async fn presence_and_im_over_mutual_tls() -> Result<()> {
    let _sip_shared = metrics::moves(Family::Sip).await;
    let mut env = setup().await?;
    let partner = env.partner.clone();
    let mut ua = tls_ua(&env, Some(&partner)).await?;

    // Presence, with PIDF this time (Accept lists only PIDF).
    let b = ua.branch();
    ua.send_raw(&subscribe(&b, 1, None, 3600)).await?;
    let ok = ua.response().await?;
    assert_eq!(ok.status(), Some(200));
    let tag = to_tag(&ok);
    let n = ua.request("NOTIFY").await?;
    assert!(hv(&n, "Subscription-State").starts_with("pending"));
    assert!(hv(&n, "Via").starts_with("SIP/2.0/TLS "));
    ua.respond(&n, 200, "OK", &[], None).await?;
    let d = env.home_next().await?;
    assert_eq!(d.envelope.body, Body::Subscription(Subscription::Subscribe));
    env.home_send(
        "alice@example.com",
        "bob@partner.com",
        Body::Subscription(Subscription::Subscribed),
    )?;
    let n = ua.request("NOTIFY").await?;
    assert!(hv(&n, "Subscription-State").starts_with("active"));
    assert_eq!(hv(&n, "Content-Type"), "application/pidf+xml");
    assert!(
        body_str(&n).contains("closed"),
        "offline until known: {}",
        body_str(&n)
    );
    ua.respond(&n, 200, "OK", &[], None).await?;
    env.home_send(
        "alice@example.com/pc",
        "bob@partner.com",
        Body::Presence(PresenceBody {
            system: "xmpp".into(),
            state: "available".into(),
            note: Some("at my desk".into()),
            priority: None,
        }),
    )?;
    let n = ua.request("NOTIFY").await?;
    let body = body_str(&n);
    assert!(body.contains("<basic>open</basic>"), "{body}");
    assert!(body.contains("at my desk"), "{body}");
    assert!(body.contains("entity=\"sip:alice@example.com\""), "{body}");
    ua.respond(&n, 200, "OK", &[], None).await?;
    let b = ua.branch();
    ua.send_raw(&subscribe(&b, 2, Some(&tag), 3600)).await?;
    assert_eq!(ua.response().await?.status(), Some(200));
    let n = ua.request("NOTIFY").await?;
    ua.respond(&n, 200, "OK", &[], None).await?;
    let b = ua.branch();
    ua.send_raw(&subscribe(&b, 3, Some(&tag), 0)).await?;
    assert_eq!(ua.response().await?.status(), Some(200));
    let n = ua.request("NOTIFY").await?;
    assert!(hv(&n, "Subscription-State").starts_with("terminated"));
    ua.respond(&n, 200, "OK", &[], None).await?;
    // RFC 8048 §5.3.3: unavailable presence, not a revocation.
    let body = env.home_next().await?.envelope.body;
    assert!(
        matches!(&body, Body::Presence(p) if &*p.state == "offline"),
        "{body:?}"
    );

    // IM session on the same TLS connection.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode("hi over tls");
    let b = ua.branch();
    ua.send(
        &[
            "INVITE sip:alice@example.com SIP/2.0",
            &format!("Via: SIP/2.0/TLS sip.partner.com:5061;branch={b}"),
            "Max-Forwards: 70",
            "From: <sip:bob@partner.com>;tag=imtag",
            "To: <sip:alice@example.com>",
            "Call-ID: tls-im-1",
            "CSeq: 1 INVITE",
            "Contact: <sip:bob@partner.com;opaque=user:epid:E1;gruu>",
            &format!("ms-text-format: text/plain; charset=UTF-8;ms-body={b64}"),
            "Content-Type: application/sdp",
            "Content-Length: {CL}",
        ],
        b"v=0\r\nm=message 5061 sip null\r\na=accept-types:text/plain\r\n",
    )
    .await?;
    assert_eq!(ua.response().await?.status(), Some(100));
    let ok = ua.response().await?;
    assert_eq!(ok.status(), Some(200));
    let im_tag = to_tag(&ok);
    let b = ua.branch();
    ua.send(
        &[
            "ACK sip:alice@example.com SIP/2.0",
            &format!("Via: SIP/2.0/TLS sip.partner.com:5061;branch={b}"),
            "Max-Forwards: 70",
            "From: <sip:bob@partner.com>;tag=imtag",
            &format!("To: <sip:alice@example.com>;tag={im_tag}"),
            "Call-ID: tls-im-1",
            "CSeq: 1 ACK",
            "Content-Length: 0",
        ],
        b"",
    )
    .await?;
    match env.home_next().await?.envelope.body {
        Body::Message(m) => assert_eq!(m.text, "hi over tls"),
        other => bail!("expected a message, got {other:?}"),
    }
    env.home_send(
        "alice@example.com",
        "bob@partner.com",
        Body::Message(MessageBody {
            id: None,
            text: "hello back".into(),
            thread: None,
            ..Default::default()
        }),
    )?;
    let m = ua.request("MESSAGE").await?;
    assert_eq!(m.call_id().ok(), Some("tls-im-1"));
    assert_eq!(body_str(&m), "hello back");
    ua.respond(&m, 200, "OK", &[], None).await?;
    let b = ua.branch();
    ua.send(
        &[
            "BYE sip:alice@example.com SIP/2.0",
            &format!("Via: SIP/2.0/TLS sip.partner.com:5061;branch={b}"),
            "Max-Forwards: 70",
            "From: <sip:bob@partner.com>;tag=imtag",
            &format!("To: <sip:alice@example.com>;tag={im_tag}"),
            "Call-ID: tls-im-1",
            "CSeq: 2 BYE",
            "Content-Length: 0",
        ],
        b"",
    )
    .await?;
    assert_eq!(ua.response().await?.status(), Some(200));
    env.stop().await;
    Ok(())
}

fn pager(b: &str) -> Vec<u8> {
    sip_ua::build(
        &[
            "MESSAGE sip:alice@example.com SIP/2.0",
            &format!("Via: SIP/2.0/TLS sip.partner.com:5061;branch={b}"),
            "Max-Forwards: 70",
            "From: <sip:bob@partner.com>;tag=p",
            "To: <sip:alice@example.com>",
            &format!("Call-ID: {b}"),
            "CSeq: 1 MESSAGE",
            "Content-Type: text/plain",
            "Content-Length: {CL}",
        ],
        b"claimed partner",
    )
}

#[tokio::test]
async fn tls_peers_without_a_usable_certificate_are_closed_after_the_handshake() -> Result<()> {
    let _sip_counts = metrics::asserts(Family::Sip).await;
    let mut env = setup().await?;
    let counted = || {
        legate::sip::edge::metrics::CONNS_REFUSED
            .with_label_values(&["unauthenticated_tls"])
            .get()
    };
    let before = counted();
    // Trusted CA, but the certificate names another (non-federated) domain: the edge closes
    // the connection right after the handshake, before any request, well inside the idle
    // and first-request bounds (600 s / 10 s): `closed()` waits at most WAIT.
    let impostor = env.certs.leaf("impostor", &["evil.com"]);
    let mut ua = tls_ua(&env, Some(&impostor)).await?;
    let t0 = std::time::Instant::now();
    assert!(ua.closed().await, "impostor connection closed");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());

    // No client certificate at all: closed as well, and a request sent is never answered.
    let mut ua = tls_ua(&env, None).await?;
    let b = ua.branch();
    let _ = ua.send_raw(&pager(&b)).await;
    assert!(ua.closed().await, "certificate-less connection closed");
    assert_eq!(counted() - before, 2);

    // The genuine partner gets through.
    let partner = env.partner.clone();
    let mut ua = tls_ua(&env, Some(&partner)).await?;
    let b = ua.branch();
    ua.send_raw(&pager(&b)).await?;
    let r = ua.response().await?;
    assert_eq!(r.status(), Some(200), "{:?}", r.reason());
    let d = env.home_next().await?;
    assert!(matches!(d.envelope.body, Body::Message(_)));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), env.home.recv())
            .await
            .is_err(),
        "the refused requests never reached the home side"
    );
    env.stop().await;
    Ok(())
}

/// `legate_sip_tls_handshake_failures_total` for `reason`, in this process's registry.
fn handshake_failures(reason: &str) -> u64 {
    metrics::counter(
        "legate_sip_tls_handshake_failures_total",
        &[&format!("reason=\"{reason}\"")],
    )
}

#[tokio::test]
async fn plaintext_on_the_tls_port_is_a_counted_handshake_failure() -> Result<()> {
    let _sip_exclusive = metrics::asserts(Family::Sip).await;
    let before = handshake_failures("not_tls");
    let env = setup().await?;
    let mut s = TcpStream::connect(env.addr).await?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"OPTIONS sip:alice@example.com SIP/2.0\r\nContent-Length: 0\r\n\r\n")
        .await?;
    let mut buf = [0u8; 256];
    // The edge answers with a TLS alert at most, then closes.
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "connection closed");
    // A delta under the exclusive SIP lock: this connection's failure, no other test's.
    assert_eq!(handshake_failures("not_tls"), before + 1);
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_silent_peer_is_dropped_after_the_handshake_timeout() -> Result<()> {
    let _sip_exclusive = metrics::asserts(Family::Sip).await;
    let before = handshake_failures("timeout");
    let env = setup_with("handshake_timeout_secs = 1").await?;
    let mut s = TcpStream::connect(env.addr).await?;
    let t0 = std::time::Instant::now();
    let mut buf = [0u8; 64];
    use tokio::io::AsyncReadExt;
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "closed: {r:?}");
    assert!(t0.elapsed() >= Duration::from_millis(900));
    assert_eq!(handshake_failures("timeout"), before + 1);
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn outbound_im_goes_to_the_static_route_over_tls() -> Result<()> {
    let _sip_shared = metrics::moves(Family::Sip).await;
    let env = setup().await?;
    env.home_send(
        "alice@example.com",
        "bob@partner.com",
        Body::Message(MessageBody {
            id: None,
            text: "outbound tls".into(),
            thread: None,
            ..Default::default()
        }),
    )?;
    let mut peer = accept_tls(&env).await?;
    let inv = peer.request("INVITE").await?;
    assert!(hv(&inv, "Via").starts_with("SIP/2.0/TLS "));
    peer.respond(
        &inv,
        200,
        "OK",
        &[("Contact", "<sip:bob@sip.partner.com:5061;transport=tls>")],
        Some(("application/sdp", b"v=0\r\nm=message 5061 sip null\r\n")),
    )
    .await?;
    peer.request("ACK").await?;
    let m = peer.request("MESSAGE").await?;
    assert_eq!(body_str(&m), "outbound tls");
    peer.respond(&m, 200, "OK", &[], None).await?;
    env.stop().await;
    Ok(())
}

/// No static route: the edge finds `partner.test` through `_sipfederationtls._tcp` SRV
/// (dnsmasq on loopback, never real DNS), connects over TLS and checks the certificate names
/// the domain.
#[tokio::test]
async fn outbound_target_found_through_sipfederationtls_srv() -> Result<()> {
    let _sip_shared = metrics::moves(Family::Sip).await;
    use common::dnsmasq::{DnsRecord, Dnsmasq};
    let certs = CertFactory::new();
    let ours = certs.leaf("example", &["example.com"]);
    let partner = certs.leaf("partner", &["partner.test"]);
    let route = TcpListener::bind("127.0.0.1:0").await?;
    let port = route.local_addr()?.port();
    let dns = Dnsmasq::start(&[
        DnsRecord::srv(
            "_sipfederationtls._tcp.partner.test",
            "sip.partner.test",
            port,
        ),
        DnsRecord::a("sip.partner.test", std::net::Ipv4Addr::LOCALHOST),
    ])?;
    let dir = tempfile::tempdir()?;
    let text = format!(
        r#"routing_node = "hn1"
[node]
data_dir = "{data}"
admin_listen = "127.0.0.1:0"
[[local_domain]]
name = "example.com"
cert = "{cert}"
key = "{key}"
[listeners]
sip_tls = "127.0.0.1:0"
sip_tcp = "off"
xmpp_s2s = "off"
xmpp_s2s_direct_tls = "off"
[tls]
trust_bundle = "{ca}"
[[sip.federated_domain]]
name = "partner.test"
system = "lync"
[[home_node]]
name = "hn1"
addresses = ["127.0.0.1:5347"]
component_secret = "a-long-enough-secret-1"
default_system = "xmpp"
"#,
        data = dir.path().display(),
        cert = ours.cert.display(),
        key = ours.key.display(),
        ca = certs.ca_path().display(),
    );
    let cfg = config::from_toml(&text, &dir.path().join("legate.toml"), BUILTIN_SYSTEMS)
        .map_err(|d| anyhow!("config: {d}"))?;
    let hub = Hub::new(cfg, MappingStore::open(None).map_err(|d| anyhow!("{d}"))?);
    let _home = hub.register_component("hn1", 16);
    let resolver = legate::dns::Resolver::new(
        &legate::dns::DnsSettings {
            nameservers: Some(vec![dns.addr()]),
            ..Default::default()
        },
        &[],
    )?;
    let (stop, rx) = watch::channel(false);
    let edge = SipEdge::start_with(hub.clone(), rx, Some(Arc::new(resolver))).await?;
    let r = hub.submit(
        &Origin::Component {
            home_node: "hn1".into(),
        },
        Envelope {
            from: Address::parse("alice@example.com")?,
            to: Address::parse("bob@partner.test")?,
            body: Body::Message(MessageBody {
                id: None,
                text: "found you".into(),
                thread: None,
                ..Default::default()
            }),
            stanza_id: None,
            via_cluster: None,
        },
    );
    assert!(matches!(r, Submitted::Delivered(Link::Sip { .. })), "{r:?}");
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            legate::tls::load_certs(&partner.cert)?,
            legate::tls::load_private_key(&partner.key)?,
        )?;
    let (tcp, _) = tokio::time::timeout(WAIT, route.accept()).await??;
    let s = tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg)).accept(tcp),
    )
    .await??;
    let mut peer = Ua::from_stream(s);
    let inv = peer.request("INVITE").await?;
    assert_eq!(inv.request_uri_str(), Some("sip:bob@partner.test"));
    let _ = stop.send(true);
    edge.join(Duration::from_secs(5)).await;
    Ok(())
}

/// sipp (built without TLS) through Debian's stunnel4 in client mode: stunnel presents the
/// partner's certificate to the edge, so sipp's MESSAGE and SUBSCRIBE scenarios run over real
/// mutual TLS. Fails, naming the package, when sipp or stunnel4 is missing.
#[tokio::test]
async fn sipp_through_stunnel_over_mutual_tls() -> Result<()> {
    let _sip_shared = metrics::moves(Family::Sip).await;
    let stunnel = common::programs::require_program("stunnel4", "stunnel4");
    let mut env = setup().await?;
    let local = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let conf = env.certs.dir().join("stunnel.conf");
    std::fs::write(
        &conf,
        format!(
            "foreground = yes\npid =\ndebug = 4\n[sip]\nclient = yes\naccept = {local}\nconnect = {edge}\ncert = {cert}\nkey = {key}\nCAfile = {ca}\nverifyChain = yes\ncheckHost = example.com\nsni = example.com\n",
            edge = env.addr,
            cert = env.partner.cert.display(),
            key = env.partner.key.display(),
            ca = env.certs.ca_path().display(),
        ),
    )?;
    let _tunnel = tokio::process::Command::new(stunnel)
        .arg(&conf)
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    // stunnel prints nothing on stdout when ready; a probe connection would open a TLS
    // connection to the edge, so watch the socket table instead.
    common::programs::wait_listening(local.port(), WAIT).await?;
    let home = std::mem::replace(&mut env.home, mpsc::channel(1).1);
    let (drain, mut got) = sipp::forward_home(home);
    let (messages, subscriptions) = (20, 5);
    sipp::run_uac(&sipp::scenario("message.xml"), local, messages, 50).await?;
    sipp::run_uac(&sipp::scenario("subscribe.xml"), local, subscriptions, 50).await?;
    sipp::expect_delivered(&mut got, messages, subscriptions, WAIT).await?;
    drain.abort();
    env.stop().await;
    Ok(())
}
