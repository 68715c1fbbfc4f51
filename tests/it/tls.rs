//! Real TLS handshakes over loopback TCP between `legate::tls` configurations: SNI certificate
//! choice, requested (not required) client certificates, peer identity and RFC 6125 matching,
//! the clientAuth-EKU tolerance, and the classification of failed handshakes.

use crate::common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::certs::{CertFactory, Eku, LeafSpec};
use legate::config::{Domain, TlsVersion};
use legate::tls::{
    check_peer, load_certified_key, load_private_key, matches_domain, name_matches, peer_identity,
    ClientTls, HandshakeError, PeerCert, PeerDenied, PeerPermit, ServerTls, TlsError, TlsFailure,
    TlsSettings,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const T: Duration = Duration::from_secs(10);
const HS: Duration = Duration::from_secs(5);

fn dom(s: &str) -> Domain {
    Domain::parse(s).expect("test domain")
}

/// Server settings: node cert `node.test` (default), per-domain `a.test` and `b.test`,
/// trusting the factory's CA.
fn server_settings(f: &CertFactory) -> TlsSettings {
    let node = f.leaf("node", &["node.test"]);
    let a = f.leaf("a", &["a.test"]);
    let b = f.leaf("b", &["b.test"]);
    TlsSettings {
        default_cert: Some((node.cert, node.key)),
        domain_certs: vec![
            (dom("a.test"), a.cert, a.key),
            (dom("b.test"), b.cert, b.key),
        ],
        trust_bundle: Some(f.ca_path().to_path_buf()),
        min_version: TlsVersion::V1_2,
    }
}

/// Client settings presenting `cert` (if any) and trusting `ca`.
fn client_settings(ca: &Path, cert: Option<(&Path, &Path)>) -> TlsSettings {
    TlsSettings {
        default_cert: cert.map(|(c, k)| (c.to_path_buf(), k.to_path_buf())),
        domain_certs: vec![],
        trust_bundle: Some(ca.to_path_buf()),
        min_version: TlsVersion::V1_2,
    }
}

async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    (l, a)
}

/// Runs one server handshake against `ClientTls::connect` toward `target`. Returns the server
/// outcome (peer identity of the client, or the failure) and whether the client's handshake
/// completed.
async fn mutual(
    server: &ServerTls,
    client: &ClientTls,
    target: &str,
) -> (Result<Option<PeerCert>, HandshakeError>, bool) {
    let (l, addr) = listener().await;
    let server = server.clone();
    let srv = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.expect("accept");
        let mut s = server.accept(tcp, HS).await?;
        let id = peer_identity(s.get_ref().1).expect("parse peer cert");
        // Complete the exchange so the client sees a live connection.
        let mut buf = [0u8; 4];
        let _ = s.read_exact(&mut buf).await;
        let _ = s.write_all(b"pong").await;
        Ok::<_, HandshakeError>(id)
    });
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let client_ok = match client.connect(tcp, None, &dom(target), HS).await {
        Ok(mut c) => {
            let _ = c.write_all(b"ping").await;
            let mut buf = [0u8; 4];
            c.read_exact(&mut buf).await.is_ok()
        }
        Err(_) => false,
    };
    let out = srv.await.expect("server task");
    (out, client_ok)
}

/// Accepts any server certificate: only to observe which certificate the server chose.
#[derive(Debug)]
pub(crate) struct AcceptAny;

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The DNS-IDs of the certificate the server presents for `sni` (`None`: send no SNI).
async fn served_names(server: &ServerTls, sni: Option<&str>) -> Vec<String> {
    let (l, addr) = listener().await;
    let server = server.clone();
    let srv = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.expect("accept");
        let _ = server.accept(tcp, HS).await;
    });
    let mut cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny))
            .with_no_client_auth();
    cfg.enable_sni = sni.is_some();
    let name = ServerName::try_from(sni.unwrap_or("ignored.test").to_string()).expect("name");
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let c = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("handshake");
    let id = peer_identity(c.get_ref().1)
        .expect("parse")
        .expect("server cert");
    drop(c);
    let _ = srv.await;
    id.dns_ids
}

#[tokio::test]
async fn sni_chooses_the_certificate_of_each_local_domain() {
    tokio::time::timeout(T, async {
        let f = CertFactory::new();
        let server = ServerTls::new(&server_settings(&f)).expect("server tls");
        assert!(server.requests_client_cert());
        assert_eq!(served_names(&server, Some("a.test")).await, vec!["a.test"]);
        assert_eq!(served_names(&server, Some("B.TEST")).await, vec!["b.test"]);
        assert_eq!(
            served_names(&server, Some("other.test")).await,
            vec!["node.test"]
        );
        assert_eq!(served_names(&server, None).await, vec!["node.test"]);

        // The same through a verifying client: the chain is valid and names the domain.
        let me = f.leaf("client", &["partner.test"]);
        let client = ClientTls::new(&client_settings(f.ca_path(), Some((&me.cert, &me.key))))
            .expect("client tls");
        for d in ["a.test", "b.test", "node.test"] {
            let (srv, ok) = mutual(&server, &client, d).await;
            assert!(ok, "client handshake toward {d}");
            assert!(srv.is_ok(), "{d}: {srv:?}");
        }
        // The client refuses a server whose certificate does not name the target.
        let (_, ok) = mutual(&server, &client, "other.test").await;
        assert!(!ok);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn mutual_tls_reports_the_client_identity() {
    tokio::time::timeout(T, async {
        let f = CertFactory::new();
        let server = ServerTls::new(&server_settings(&f)).expect("server tls");
        let me = f.leaf("partner", &["partner.test", "sip.partner.test"]);
        let client = ClientTls::new(&client_settings(f.ca_path(), Some((&me.cert, &me.key))))
            .expect("client tls");
        let (srv, ok) = mutual(&server, &client, "a.test").await;
        assert!(ok);
        let peer = srv.expect("server handshake").expect("client cert present");
        assert_eq!(peer.dns_ids, vec!["partner.test", "sip.partner.test"]);
        assert!(peer.client_auth_eku && peer.server_auth_eku);
        assert!(matches_domain(&peer, &dom("partner.test")));
        assert!(matches_domain(&peer, &dom("SIP.partner.test")));
        assert!(!matches_domain(&peer, &dom("other.test")));
        assert!(!matches_domain(&peer, &dom("imp.partner.test")));
        assert_eq!(
            check_peer(Some(&peer), &dom("partner.test"), false),
            Ok(PeerPermit {
                eku_tolerated: false
            })
        );
        assert!(matches!(
            check_peer(Some(&peer), &dom("evil.test"), true),
            Err(PeerDenied::NameMismatch { .. })
        ));
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn client_cert_from_an_unknown_ca_fails_the_handshake() {
    tokio::time::timeout(T, async {
        let f = CertFactory::new();
        let rogue = CertFactory::with_ca_name("Rogue CA");
        let server = ServerTls::new(&server_settings(&f)).expect("server tls");
        let me = rogue.leaf("partner", &["partner.test"]);
        let client = ClientTls::new(&client_settings(f.ca_path(), Some((&me.cert, &me.key))))
            .expect("client tls");
        let (srv, ok) = mutual(&server, &client, "a.test").await;
        assert!(!ok, "the client must not get a working connection");
        let err = srv.expect_err("server must refuse");
        assert_eq!(err.failure, TlsFailure::UnknownCa, "{err}");
        assert_eq!(err.failure.label(), "unknown_ca");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn expired_client_cert_is_classified() {
    tokio::time::timeout(T, async {
        let f = CertFactory::new();
        let server = ServerTls::new(&server_settings(&f)).expect("server tls");
        let me = f.leaf_with("old", LeafSpec::new(&["partner.test"]).expired());
        let client = ClientTls::new(&client_settings(f.ca_path(), Some((&me.cert, &me.key))))
            .expect("client tls");
        let (srv, _) = mutual(&server, &client, "a.test").await;
        assert_eq!(srv.expect_err("refused").failure, TlsFailure::CertExpired);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn client_without_certificate_still_connects() {
    tokio::time::timeout(T, async {
        let f = CertFactory::new();
        let server = ServerTls::new(&server_settings(&f)).expect("server tls");
        let client = ClientTls::new(&client_settings(f.ca_path(), None)).expect("client tls");
        let (srv, ok) = mutual(&server, &client, "a.test").await;
        assert!(ok);
        let peer = srv.expect("requested, not required");
        assert_eq!(peer, None);
        assert_eq!(
            check_peer(peer.as_ref(), &dom("partner.test"), true),
            Err(PeerDenied::NoCertificate)
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn missing_client_auth_eku_is_refused_unless_tolerated() {
    tokio::time::timeout(T, async {
        let f = CertFactory::new();
        let server = ServerTls::new(&server_settings(&f)).expect("server tls");
        let me = f.leaf_with(
            "ocs",
            LeafSpec::new(&["ocs.partner.test"]).eku(Eku::ServerOnly),
        );
        let client = ClientTls::new(&client_settings(f.ca_path(), Some((&me.cert, &me.key))))
            .expect("client tls");
        let (srv, ok) = mutual(&server, &client, "a.test").await;
        assert!(ok, "the chain is valid; the EKU is a per-peer decision");
        let peer = srv.expect("handshake").expect("cert");
        assert!(!peer.client_auth_eku);
        let d = dom("ocs.partner.test");
        assert_eq!(
            check_peer(Some(&peer), &d, false),
            Err(PeerDenied::NoClientAuthEku)
        );
        assert_eq!(PeerDenied::NoClientAuthEku.label(), "no_client_auth_eku");
        assert_eq!(
            check_peer(Some(&peer), &d, true),
            Ok(PeerPermit {
                eku_tolerated: true
            })
        );

        // The serverAuth fallback verifies chains with intermediates like the normal path.
        let chained = f.leaf_with(
            "ocs-chain",
            LeafSpec::new(&["ocs.partner.test"])
                .eku(Eku::ServerOnly)
                .via_intermediate(),
        );
        let client = ClientTls::new(&client_settings(
            f.ca_path(),
            Some((&chained.cert, &chained.key)),
        ))
        .expect("client tls");
        let (srv, ok) = mutual(&server, &client, "a.test").await;
        assert!(ok);
        let peer = srv.expect("handshake").expect("cert");
        assert!(!peer.client_auth_eku);
        assert!(check_peer(Some(&peer), &d, true).is_ok());

        // A serverAuth-only leaf from an unknown CA is still refused during the handshake.
        let rogue = CertFactory::with_ca_name("Rogue CA");
        let bad = rogue.leaf_with(
            "rogue-ocs",
            LeafSpec::new(&["ocs.partner.test"]).eku(Eku::ServerOnly),
        );
        let client = ClientTls::new(&client_settings(f.ca_path(), Some((&bad.cert, &bad.key))))
            .expect("client tls");
        let (srv, ok) = mutual(&server, &client, "a.test").await;
        assert!(!ok);
        assert_eq!(srv.expect_err("refused").failure, TlsFailure::UnknownCa);

        // A leaf valid for neither TLS purpose is refused during the handshake.
        let mail = f.leaf_with(
            "mail",
            LeafSpec::new(&["mail.partner.test"]).eku(Eku::EmailOnly),
        );
        let client = ClientTls::new(&client_settings(f.ca_path(), Some((&mail.cert, &mail.key))))
            .expect("client tls");
        let (srv, ok) = mutual(&server, &client, "a.test").await;
        assert!(!ok);
        assert_eq!(
            srv.expect_err("refused").failure,
            TlsFailure::BadCertificate
        );

        // A clientAuth-only leaf passes the normal path.
        let c_only = f.leaf_with(
            "conly",
            LeafSpec::new(&["c.partner.test"]).eku(Eku::ClientOnly),
        );
        let client = ClientTls::new(&client_settings(
            f.ca_path(),
            Some((&c_only.cert, &c_only.key)),
        ))
        .expect("client tls");
        let (srv, _) = mutual(&server, &client, "a.test").await;
        let peer = srv.expect("handshake").expect("cert");
        assert!(peer.client_auth_eku && !peer.server_auth_eku);

        // No EKU extension at all means any purpose (RFC 5280 §4.2.1.12).
        let any = f.leaf_with("any", LeafSpec::new(&["any.test"]).eku(Eku::Absent));
        let client = ClientTls::new(&client_settings(f.ca_path(), Some((&any.cert, &any.key))))
            .expect("client tls");
        let (srv, _) = mutual(&server, &client, "a.test").await;
        let peer = srv.expect("handshake").expect("cert");
        assert!(peer.client_auth_eku);
        assert!(check_peer(Some(&peer), &dom("any.test"), false).is_ok());
    })
    .await
    .expect("test timed out");
}

/// A server handshake against raw bytes (or silence) from a plain TCP client.
async fn server_failure_against(
    server: &ServerTls,
    timeout: Duration,
    client: impl FnOnce(TcpStream) -> tokio::task::JoinHandle<()>,
) -> TlsFailure {
    let (l, addr) = listener().await;
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (stcp, _) = l.accept().await.expect("accept");
    let task = client(tcp);
    let err = server
        .accept(stcp, timeout)
        .await
        .expect_err("handshake must fail");
    task.abort();
    err.failure
}

#[tokio::test]
async fn handshake_failures_are_classified() {
    tokio::time::timeout(T, async {
        let f = CertFactory::new();
        let server = ServerTls::new(&server_settings(&f)).expect("server tls");

        // Plain SIP on the TLS port.
        let fail = server_failure_against(&server, HS, |mut tcp| {
            tokio::spawn(async move {
                let _ = tcp
                    .write_all(b"OPTIONS sip:a.test SIP/2.0\r\nContent-Length: 0\r\n\r\n")
                    .await;
                // Keep the connection open until the harness aborts this task: the server
                // must classify what it read, not a hang-up.
                std::future::pending::<()>().await;
                drop(tcp);
            })
        })
        .await;
        assert_eq!(fail, TlsFailure::NotTls);

        // Silence until the handshake deadline.
        let fail = server_failure_against(&server, Duration::from_millis(200), |tcp| {
            tokio::spawn(async move {
                // Silent and open until the harness aborts this task, so only the server's
                // handshake deadline can end it.
                std::future::pending::<()>().await;
                drop(tcp);
            })
        })
        .await;
        assert_eq!(fail, TlsFailure::Timeout);

        // The peer hangs up before saying anything.
        let fail = server_failure_against(&server, HS, |tcp| {
            tokio::spawn(async move {
                drop(tcp);
            })
        })
        .await;
        assert_eq!(fail, TlsFailure::Eof);

        // A TLS 1.2-only client against a server that requires 1.3.
        let mut s13 = server_settings(&f);
        s13.min_version = TlsVersion::V1_3;
        let server13 = ServerTls::new(&s13).expect("server tls");
        let (l, addr) = listener().await;
        let srv = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.expect("accept");
            server13.accept(tcp, HS).await.map(|_| ())
        });
        let cfg =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS12])
                .expect("versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAny))
                .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let client_err = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("a.test").expect("name"), tcp)
            .await
            .expect_err("no common version");
        let err = srv.await.expect("task").expect_err("server refuses");
        assert_eq!(err.failure, TlsFailure::ProtocolVersion, "{err}");
        assert_eq!(
            TlsFailure::from_io(&client_err),
            TlsFailure::ProtocolVersion,
            "{client_err}"
        );
    })
    .await
    .expect("test timed out");
}

#[test]
fn certificate_names_follow_rfc_6125() {
    let f = CertFactory::new();
    let wild = PeerCert::from_der(&f.leaf("w", &["*.Partner.test"]).der).expect("parse");
    assert_eq!(wild.dns_ids, vec!["*.partner.test"]);
    assert!(matches_domain(&wild, &dom("sip.partner.test")));
    assert!(!matches_domain(&wild, &dom("partner.test")));
    assert!(!matches_domain(&wild, &dom("a.b.partner.test")));

    // The CN counts only when there is no DNS-ID (RFC 6125 §6.4.4).
    let cn_only = PeerCert::from_der(
        &f.leaf_with("cn", LeafSpec::new(&[]).cn(Some("legacy.test")))
            .der,
    )
    .expect("parse");
    assert_eq!(cn_only.dns_ids, vec!["legacy.test"]);
    assert!(matches_domain(&cn_only, &dom("legacy.test")));
    let both = PeerCert::from_der(
        &f.leaf_with("both", LeafSpec::new(&["san.test"]).cn(Some("cn.test")))
            .der,
    )
    .expect("parse");
    assert_eq!(both.dns_ids, vec!["san.test"]);
    assert!(!matches_domain(&both, &dom("cn.test")));

    // IP SANs are not DNS-IDs.
    let ip = PeerCert::from_der(&f.leaf("ip", &["192.0.2.7", "ip.test"]).der).expect("parse");
    assert_eq!(ip.dns_ids, vec!["ip.test"]);

    // Matching rules on their own.
    assert!(name_matches("PARTNER.test", "partner.TEST"));
    assert!(name_matches("partner.test.", "partner.test"));
    assert!(name_matches("partner.test", "partner.test."));
    assert!(name_matches("*.partner.test", "x.partner.test."));
    assert!(!name_matches("*.test", "partner.test"));
    assert!(!name_matches("p*.partner.test", "pa.partner.test"));
    assert!(!name_matches("*.partner.test", "partner.test"));
    assert!(name_matches("xn--mnchen-3ya.test", "XN--MNCHEN-3YA.test"));
    assert!(!name_matches("münchen.test", "xn--mnchen-3ya.test"));
    assert!(!name_matches("münchen.test", "münchen.test"));
}

#[test]
fn pem_loading_errors_name_the_file() {
    let f = CertFactory::new();
    let leaf = f.leaf("x", &["x.test"]);
    let other = f.leaf("y", &["y.test"]);
    assert!(load_certified_key(&leaf.cert, &leaf.key).is_ok());

    let e = load_certified_key(&leaf.cert, &other.key).expect_err("mismatch");
    assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
    assert!(e.to_string().contains("y.key"), "{e}");

    let e = load_certified_key(&leaf.key, &leaf.key).expect_err("no cert");
    assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
    assert!(e.to_string().contains("x.key"));

    let e = load_private_key(&leaf.cert).expect_err("no key");
    assert!(matches!(e, TlsError::NoPrivateKey { .. }), "{e}");

    let two = f.dir().join("two.key");
    let pem = std::fs::read_to_string(&leaf.key).expect("read")
        + &std::fs::read_to_string(&other.key).expect("read");
    std::fs::write(&two, pem).expect("write");
    assert!(matches!(
        load_private_key(&two),
        Err(TlsError::SeveralKeys { .. })
    ));

    let e = ServerTls::new(&TlsSettings {
        default_cert: None,
        domain_certs: vec![],
        trust_bundle: None,
        min_version: TlsVersion::V1_2,
    })
    .expect_err("no cert");
    assert!(matches!(e, TlsError::NoServerCertificate));
    let e =
        ClientTls::new(&client_settings(&f.dir().join("nope.pem"), None)).expect_err("no bundle");
    assert!(e.to_string().contains("nope.pem"), "{e}");
}

/// Runs certs/make-dev-certs.sh (openssl CLI) and checks that what it makes loads and serves,
/// including the SEC1 and RSA (PKCS#1) key formats.
#[tokio::test]
async fn dev_cert_script_output_loads() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("tmp");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/make-dev-certs.sh");
        let out = std::process::Command::new("sh")
            .arg(&script)
            .arg(dir.path())
            .arg("example.test")
            .arg("conf.example.test")
            .output()
            .expect("run make-dev-certs.sh (needs openssl)");
        assert!(
            out.status.success(),
            "make-dev-certs.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let p = |n: &str| dir.path().join(n);
        let settings = TlsSettings {
            default_cert: Some((p("node.pem"), p("node.key"))),
            domain_certs: vec![(
                dom("conf.example.test"),
                p("conf.example.test.pem"),
                p("conf.example.test.key"),
            )],
            trust_bundle: Some(p("ca.pem")),
            min_version: TlsVersion::V1_2,
        };
        let server = ServerTls::new(&settings).expect("script output loads");
        let client = ClientTls::new(&settings).expect("client");
        let (srv, ok) = mutual(&server, &client, "conf.example.test").await;
        assert!(ok);
        let peer = srv.expect("handshake").expect("client cert");
        assert!(matches_domain(&peer, &dom("example.test")));
        assert!(matches_domain(&peer, &dom("conf.example.test")));
        assert!(peer.client_auth_eku && peer.server_auth_eku);

        // Other key encodings: SEC1 (`EC PRIVATE KEY`) and PKCS#1 (`RSA PRIVATE KEY`).
        let openssl = |args: &[&str]| {
            let o = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("openssl");
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        };
        openssl(&["ec", "-in", "example.test.key", "-out", "sec1.key"]);
        let sec1 = std::fs::read_to_string(p("sec1.key")).expect("read");
        assert!(sec1.contains("BEGIN EC PRIVATE KEY"), "{sec1}");
        assert!(load_certified_key(&p("example.test.pem"), &p("sec1.key")).is_ok());
        openssl(&["genrsa", "-traditional", "-out", "rsa.key", "2048"]);
        openssl(&[
            "req",
            "-new",
            "-x509",
            "-key",
            "rsa.key",
            "-subj",
            "/CN=rsa.test",
            "-days",
            "2",
            "-out",
            "rsa.pem",
        ]);
        let rsa = std::fs::read_to_string(p("rsa.key")).expect("read");
        assert!(rsa.contains("BEGIN RSA PRIVATE KEY"));
        assert!(load_certified_key(&p("rsa.pem"), &p("rsa.key")).is_ok());
    })
    .await
    .expect("test timed out");
}

/// The TLS files named in a configuration file (relative to it) build working endpoints.
#[tokio::test]
async fn endpoints_from_a_configuration_file() {
    tokio::time::timeout(T, async {
        let f = CertFactory::new();
        f.leaf("node", &["gw1.example.test"]);
        f.leaf("example", &["example.test"]);
        f.leaf("imp", &["imp.example.test"]);
        let toml = r#"
[node]
id = "gw1"

[[local_domain]]
name = "example.test"
cert = "example.pem"
key = "example.key"

[[local_domain]]
name = "imp.example.test"
cert = "imp.pem"
key = "imp.key"

[[local_domain]]
name = "other.example.test"

[listeners]
sip_tls = "127.0.0.1:0"
sip_tcp = "off"
xmpp_s2s = "off"
xmpp_s2s_direct_tls = "off"

[tls]
trust_bundle = "ca.pem"
cert = "node.pem"
key = "node.key"
min_version = "1.2"
"#;
        let path = f.dir().join("legate.toml");
        std::fs::write(&path, toml).expect("write config");
        let cfg = legate::config::load_file(&path, legate::config::BUILTIN_SYSTEMS)
            .unwrap_or_else(|d| panic!("config: {d}"));
        let settings = TlsSettings::from_config(&cfg);
        assert_eq!(settings.domain_certs.len(), 2);
        assert_eq!(settings.trust_bundle.as_deref(), Some(f.ca_path()));

        let server = ServerTls::from_config(&cfg).expect("server");
        assert_eq!(
            served_names(&server, Some("imp.example.test")).await,
            vec!["imp.example.test"]
        );
        assert_eq!(
            served_names(&server, Some("other.example.test")).await,
            vec!["gw1.example.test"]
        );

        // Outbound as imp.example.test presents that domain's certificate.
        let client = ClientTls::from_config(&cfg).expect("client");
        let (l, addr) = listener().await;
        let srv = {
            let server = server.clone();
            tokio::spawn(async move {
                let (tcp, _) = l.accept().await.expect("accept");
                let s = server.accept(tcp, HS).await.expect("handshake");
                peer_identity(s.get_ref().1).expect("parse")
            })
        };
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let local = dom("imp.example.test");
        let _c = client
            .connect(tcp, Some(&local), &dom("example.test"), HS)
            .await
            .expect("client handshake");
        let peer = srv.await.expect("task").expect("client cert");
        assert_eq!(peer.dns_ids, vec!["imp.example.test"]);
    })
    .await
    .expect("test timed out");
}
