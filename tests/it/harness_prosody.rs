//! Tests of the real-peer harness itself, against real Prosody 0.12 and dnsmasq only (no legate):
//! c2s between two users on one Prosody; s2s between two Prosodies found through dnsmasq SRV/A
//! records (plaintext dialback, dialback over TLS with untrusted certificates, and trusted
//! certificates with SASL EXTERNAL); a raw XEP-0114 component; the harness's own failure modes
//! (broken config, port taken, kill on drop).
//!
//! Needs `/usr/bin/prosody` and `/usr/sbin/dnsmasq` (`apt-get install prosody dnsmasq-base`).

use crate::common;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::dnsmasq::{DnsRecord, Dnsmasq};
use common::prosody::{CertPaths, Prosody, ProsodyConfig};
use common::xmpp_client::{
    connect_component, header_attr, ClientConfig, TlsOptions, XmlConn, XmppClient,
};
use sha1::{Digest, Sha1};

const TEST_TIMEOUT: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(10);

const EXAMPLE_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const XMPP_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// Runs `f` bounded by [`TEST_TIMEOUT`].
async fn bounded<F: std::future::Future<Output = ()>>(name: &str, f: F) {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("{name}: did not finish within {TEST_TIMEOUT:?}"));
}

fn start(cfg: ProsodyConfig) -> Prosody {
    let p = Prosody::start(cfg).expect("starting Prosody");
    eprintln!("Prosody on {} ready in {:?}", p.ip(), p.started_in());
    p
}

async fn login(p: &Prosody, domain: &str, user: &str, tls: Option<TlsOptions>) -> XmppClient {
    let mut cfg = ClientConfig::plain(p.c2s_addr(), domain, user, "pw");
    cfg.tls = tls;
    XmppClient::connect(cfg)
        .await
        .unwrap_or_else(|e| panic!("{user}@{domain} login: {e:#}"))
}

/// `a` subscribes to `b` and `b` approves; `a` then sees `b`'s presence (Prosody probes after
/// approval).
async fn subscribe_and_approve(a: &mut XmppClient, b: &mut XmppClient) {
    let (a_jid, b_jid) = (a.bare_jid().to_owned(), b.bare_jid().to_owned());
    a.subscribe(&b_jid).await.expect("send subscribe");
    b.expect_presence_from(&a_jid, Some("subscribe"), WAIT)
        .await
        .expect("subscription request arrives");
    b.approve(&a_jid).await.expect("send subscribed");
    a.expect_presence_from(&b_jid, Some("subscribed"), WAIT)
        .await
        .expect("approval arrives");
    a.expect_presence_from(&b_jid, None, WAIT)
        .await
        .expect("presence of the approver arrives");
}

async fn chat(a: &mut XmppClient, b: &mut XmppClient, body: &str) {
    let b_jid = b.bare_jid().to_owned();
    let a_jid = a.bare_jid().to_owned();
    a.send_message(&b_jid, body).await.expect("send message");
    let m = b
        .expect_message_from(&a_jid, WAIT)
        .await
        .expect("message arrives");
    assert_eq!(m.body.as_deref(), Some(body));
    assert!(m.is_type("chat"), "{m:?}");
}

#[tokio::test]
async fn c2s_two_users_subscribe_presence_and_chat() {
    bounded("c2s", async {
        let p = start(
            ProsodyConfig::new(Ipv4Addr::LOCALHOST)
                .host("example.test")
                .user("example.test", "alice", "pw")
                .user("example.test", "bob", "pw"),
        );
        let mut alice = login(&p, "example.test", "alice", None).await;
        let mut bob = login(&p, "example.test", "bob", None).await;
        assert!(
            alice.jid().starts_with("alice@example.test/"),
            "{}",
            alice.jid()
        );
        bob.send_presence(Some("dnd"), Some("in a meeting"))
            .await
            .expect("bob presence");
        alice
            .send_presence(None, None)
            .await
            .expect("alice presence");

        subscribe_and_approve(&mut alice, &mut bob).await;
        // The presence alice saw is bob's current one, show and status included.
        bob.send_presence(Some("away"), Some("lunch"))
            .await
            .expect("bob presence update");
        let pr = alice
            .next_stanza_matching(
                |s| {
                    s.name == "presence"
                        && s.sender_bare() == Some("bob@example.test")
                        && s.show.as_deref() == Some("away")
                },
                WAIT,
            )
            .await
            .expect("presence update arrives");
        assert_eq!(pr.status.as_deref(), Some("lunch"));

        chat(&mut alice, &mut bob, "hello bob <&> 'quoted'").await;
        chat(&mut bob, &mut alice, "hi alice").await;
        alice.close().await;
        bob.close().await;
    })
    .await;
}

/// Panics with the instance's diagnostics unless its log contains `needle`.
fn assert_log(p: &Prosody, needle: &str) {
    assert!(
        p.log().contains(needle),
        "{needle:?} not in the log of Prosody {}\n{}",
        p.ip(),
        p.diagnostics()
    );
}

fn dns_for(a: &ProsodyConfig, b: &ProsodyConfig, a_domain: &str, b_domain: &str) -> Dnsmasq {
    Dnsmasq::start(&[
        DnsRecord::a(a_domain, a.ip),
        DnsRecord::a(b_domain, b.ip),
        DnsRecord::xmpp_server(a_domain, a_domain, a.s2s_port),
        DnsRecord::xmpp_server(b_domain, b_domain, b.s2s_port),
    ])
    .expect("starting dnsmasq")
}

/// alice@example.test and bob@xmpp.test subscribe to each other, see presence and chat.
async fn federate(example: &Prosody, xmpp: &Prosody, tls: Option<&Path>) {
    let tls_for = |domain: &str| {
        tls.map(|ca| TlsOptions {
            ca_pem: std::fs::read(ca).expect("reading CA"),
            server_name: domain.to_owned(),
        })
    };
    let mut alice = login(example, "example.test", "alice", tls_for("example.test")).await;
    let mut bob = login(xmpp, "xmpp.test", "bob", tls_for("xmpp.test")).await;
    alice
        .send_presence(None, Some("at desk"))
        .await
        .expect("presence");
    bob.send_presence(Some("chat"), None)
        .await
        .expect("presence");

    subscribe_and_approve(&mut alice, &mut bob).await;
    subscribe_and_approve(&mut bob, &mut alice).await;
    chat(&mut alice, &mut bob, "hello over s2s").await;
    chat(&mut bob, &mut alice, "and back").await;
    alice.close().await;
    bob.close().await;
}

#[tokio::test]
async fn s2s_dialback_through_dnsmasq_srv() {
    bounded("s2s dialback", async {
        let ex_cfg =
            ProsodyConfig::new(EXAMPLE_IP)
                .host("example.test")
                .user("example.test", "alice", "pw");
        let xm_cfg = ProsodyConfig::new(XMPP_IP)
            .host("xmpp.test")
            .user("xmpp.test", "bob", "pw");
        let dns = dns_for(&ex_cfg, &xm_cfg, "example.test", "xmpp.test");
        let example = start(ex_cfg.dns(dns.unbound_forward()));
        let xmpp = start(xm_cfg.dns(dns.unbound_forward()));

        federate(&example, &xmpp, None).await;

        // Both directions authenticated by dialback, peers found through SRV.
        for (p, me, peer) in [
            (&example, "example.test", "xmpp.test"),
            (&xmpp, "xmpp.test", "example.test"),
        ] {
            assert_log(p, &format!("Resolve _xmpp-server._tcp.{peer} IN SRV"));
            assert_log(p, "sent dialback key on outgoing s2s stream");
            assert_log(p, &format!("asking {peer} if key"));
            assert_log(p, &format!("Outgoing s2s connection {me}->{peer} complete"));
            assert_log(p, &format!("Incoming s2s connection {peer}->{me} complete"));
        }
        assert!(dns.log().contains("_xmpp-server._tcp.xmpp.test"));
    })
    .await;
}

/// A CA and one leaf per domain (domain in CN and SAN, server and client auth), as PEM files.
struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    fn new(domains: &[&str]) -> TestPki {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let dir = tempfile::Builder::new()
            .prefix("legate-pki-")
            .tempdir()
            .expect("pki dir");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Legate test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("CA cert");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write CA");
        for d in domains {
            let mut params = CertificateParams::new(vec![d.to_string()]).expect("leaf params");
            params.distinguished_name.push(DnType::CommonName, *d);
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            let key = KeyPair::generate().expect("leaf key");
            let cert = params.signed_by(&key, &ca).expect("leaf cert");
            std::fs::write(dir.path().join(format!("{d}.crt")), cert.pem()).expect("write cert");
            std::fs::write(dir.path().join(format!("{d}.key")), key.serialize_pem())
                .expect("write key");
        }
        TestPki { dir }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn paths(&self, domain: &str) -> CertPaths {
        CertPaths {
            cert: self.dir.path().join(format!("{domain}.crt")),
            key: self.dir.path().join(format!("{domain}.key")),
        }
    }
}

#[tokio::test]
async fn s2s_certificates_sasl_external_through_dnsmasq_srv() {
    bounded("s2s certs", async {
        let pki = TestPki::new(&["example.test", "xmpp.test"]);
        let ex_cfg = ProsodyConfig::new(EXAMPLE_IP)
            .host("example.test")
            .user("example.test", "alice", "pw")
            .host_cert("example.test", pki.paths("example.test"))
            .secure_s2s(&pki.ca());
        let xm_cfg = ProsodyConfig::new(XMPP_IP)
            .host("xmpp.test")
            .user("xmpp.test", "bob", "pw")
            .host_cert("xmpp.test", pki.paths("xmpp.test"))
            .secure_s2s(&pki.ca());
        let dns = dns_for(&ex_cfg, &xm_cfg, "example.test", "xmpp.test");
        let example = start(ex_cfg.dns(dns.unbound_forward()));
        let xmpp = start(xm_cfg.dns(dns.unbound_forward()));

        federate(&example, &xmpp, Some(&pki.ca())).await;

        // Both directions authenticated by certificate (no dialback module loaded at all).
        for (p, me, peer) in [
            (&example, "example.test", "xmpp.test"),
            (&xmpp, "xmpp.test", "example.test"),
        ] {
            assert_log(p, &format!("SASL EXTERNAL with {peer} succeeded"));
            assert_log(p, &format!("Accepting SASL EXTERNAL identity from {peer}"));
            assert_log(p, &format!("Outgoing s2s connection {me}->{peer} complete"));
            assert!(!p.log().contains("dialback key"), "dialback used by {me}");
        }
    })
    .await;
}

fn handshake(stream_id: &str, secret: &str) -> String {
    hex::encode(Sha1::digest(format!("{stream_id}{secret}").as_bytes()))
}

#[tokio::test]
async fn component_xep0114_raw_roundtrip() {
    bounded("component", async {
        let p = start(
            ProsodyConfig::new(Ipv4Addr::new(127, 0, 0, 4))
                .host("example.test")
                .user("example.test", "alice", "pw")
                .component("partner.test", "s3cret"),
        );

        let mut comp = XmlConn::connect(p.component_addr(), "component partner.test")
            .await
            .expect("connect component port");
        comp.send_raw(
            "<stream:stream xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams' to='partner.test'>",
        )
        .await
        .expect("send header");
        let header = comp.expect_stream_open(WAIT).await.expect("stream header");
        let id = header_attr(&header, "id").expect("stream id in header");
        comp.send_raw(&format!(
            "<handshake>{}</handshake>",
            handshake(&id, "s3cret")
        ))
        .await
        .expect("send handshake");
        let ack = comp.next_stanza(WAIT).await.expect("handshake reply");
        assert_eq!(ack.name, "handshake", "{ack:?}");

        let mut alice = login(&p, "example.test", "alice", None).await;
        alice.send_presence(None, None).await.expect("presence");
        alice
            .send_message("bob@partner.test", "to the component")
            .await
            .expect("send");
        let m = comp
            .next_stanza_matching(|s| s.name == "message", WAIT)
            .await
            .expect("component receives the message");
        assert_eq!(m.to.as_deref(), Some("bob@partner.test"));
        assert_eq!(m.sender_bare(), Some("alice@example.test"));
        assert_eq!(m.body.as_deref(), Some("to the component"));

        comp.send_raw(&format!(
            "<message from='bob@partner.test/gw' to='{}' type='chat' id='k1'><body>from the component</body></message>",
            alice.jid()
        ))
        .await
        .expect("component sends");
        let m = alice
            .expect_message_from("bob@partner.test", WAIT)
            .await
            .expect("alice receives the component's message");
        assert_eq!(m.body.as_deref(), Some("from the component"));
    })
    .await;
}

#[tokio::test]
async fn component_wrong_secret_is_refused() {
    bounded("component wrong secret", async {
        let p = start(
            ProsodyConfig::new(Ipv4Addr::new(127, 0, 0, 4))
                .host("example.test")
                .component("partner.test", "s3cret"),
        );
        let err = match connect_component(p.component_addr(), "partner.test", "wrong").await {
            Ok(_) => panic!("a wrong secret must be refused"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains("not-authorized"), "{err}");
        // The helper itself works with the right secret.
        connect_component(p.component_addr(), "partner.test", "s3cret")
            .await
            .expect("right secret accepted");
    })
    .await;
}

#[test]
fn prosody_start_failure_surfaces_its_output() {
    let mut cfg = ProsodyConfig::new(Ipv4Addr::LOCALHOST).host("example.test");
    cfg.extra_global_lua = "this is not lua at all".to_owned();
    let err = match Prosody::start(cfg) {
        Ok(_) => panic!("a broken config must fail to start"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("exited during start-up"), "{err}");
    assert!(
        err.contains("this is not lua at all"),
        "config not shown: {err}"
    );
    assert!(
        err.contains("A problem occurred while reading the config file"),
        "Prosody's complaint not shown: {err}"
    );
}

/// True while `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn prosody_and_dnsmasq_are_killed_on_drop() {
    let p = Prosody::start(ProsodyConfig::new(Ipv4Addr::LOCALHOST).host("example.test"))
        .expect("starting Prosody");
    let pid = p.pid().expect("Prosody wrote its pidfile");
    assert!(alive(pid));
    let c2s = p.c2s_addr();
    drop(p);
    assert!(!alive(pid), "Prosody {pid} still running after drop");
    assert!(
        std::net::TcpStream::connect_timeout(&c2s, Duration::from_millis(200)).is_err(),
        "c2s port still open after drop"
    );

    let dns = Dnsmasq::start(&[DnsRecord::a("x.test", Ipv4Addr::LOCALHOST)]).expect("dnsmasq");
    let addr = dns.addr();
    // A TCP connection makes dnsmasq fork a child holding the listener; it must die too.
    let _tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("tcp");
    drop(dns);
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err(),
        "dnsmasq (or a forked child) still listening after drop"
    );
}

#[test]
fn dnsmasq_serves_a_srv_naptr_and_nxdomain_in_test_zone() {
    let dns = Dnsmasq::start(&[
        DnsRecord::a("sip.partner.test", Ipv4Addr::new(127, 0, 0, 5)),
        DnsRecord::srv("_sip._tcp.partner.test", "sip.partner.test", 5060),
        DnsRecord::Naptr(
            "partner.test,10,50,\"s\",\"SIP+D2T\",\"\",_sip._tcp.partner.test".to_owned(),
        ),
    ])
    .expect("dnsmasq");
    const A: u16 = 1;
    const SRV: u16 = 33;
    const NAPTR: u16 = 35;
    assert_eq!(dns.query("sip.partner.test", A).expect("answer"), (0, 1));
    assert_eq!(
        dns.query("_sip._tcp.partner.test", SRV).expect("answer"),
        (0, 1)
    );
    assert_eq!(dns.query("partner.test", NAPTR).expect("answer"), (0, 1));
    // Unknown names in test. are answered locally (NXDOMAIN = 3), never forwarded.
    assert_eq!(dns.query("nothing.partner.test", A).expect("answer").0, 3);
}

#[test]
fn prosody_start_fails_fast_when_a_port_is_taken() {
    let cfg = ProsodyConfig::new(Ipv4Addr::LOCALHOST).host("example.test");
    let _squatter =
        std::net::TcpListener::bind(("127.0.0.1", cfg.s2s_port)).expect("bind the s2s port first");
    let t0 = std::time::Instant::now();
    let err = match Prosody::start(cfg) {
        Ok(_) => panic!("start must fail when the s2s port is taken"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("could not bind a port"), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn s2s_dialback_over_tls_when_certificates_are_not_trusted() {
    bounded("s2s dialback over TLS", async {
        // Certificates from a CA neither side trusts: TLS is still required, SASL EXTERNAL fails
        // and both fall back to dialback (s2s_secure_auth = false), the common real-world mode.
        let pki = TestPki::new(&["example.test", "xmpp.test"]);
        let mk = |ip, domain: &str, user| {
            let mut c = ProsodyConfig::new(ip)
                .host(domain)
                .user(domain, user, "pw")
                .host_cert(domain, pki.paths(domain));
            c.s2s_require_encryption = true;
            c
        };
        let ex_cfg = mk(EXAMPLE_IP, "example.test", "alice");
        let xm_cfg = mk(XMPP_IP, "xmpp.test", "bob");
        let dns = dns_for(&ex_cfg, &xm_cfg, "example.test", "xmpp.test");
        let example = start(ex_cfg.dns(dns.unbound_forward()));
        let xmpp = start(xm_cfg.dns(dns.unbound_forward()));

        federate(&example, &xmpp, Some(&pki.ca())).await;

        for (p, me, peer) in [
            (&example, "example.test", "xmpp.test"),
            (&xmpp, "xmpp.test", "example.test"),
        ] {
            assert_log(p, "Stream encrypted");
            assert_log(p, "certificate chain validation result: invalid");
            assert_log(p, "sent dialback key on outgoing s2s stream");
            assert_log(p, &format!("Outgoing s2s connection {me}->{peer} complete"));
            assert!(
                !p.log().contains("Accepting SASL EXTERNAL identity"),
                "{me} accepted an untrusted certificate"
            );
        }
    })
    .await;
}
