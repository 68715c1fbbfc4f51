//! The interworking rig: the real `legate` binary between a Lync-like foreign edge (mutual TLS
//! with a `partner.test` certificate, through the SIP test UA) and a real Prosody home node for
//! `example.test`, linked as the XEP-0114 component `partner.test`. Tests that need more (other
//! users, policy keys, limits) pass extra TOML and Prosody settings instead of copying the setup.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::certs::{CertFactory, Leaf};
use super::legate::Legate;
use super::prosody::{Prosody, ProsodyConfig};
use crate::sip_ua::{self, body_str, Ua};

/// The component secret Prosody and Legate share in the rig.
pub const SECRET: &str = "interworking-component-secret-42";
/// How long a rig test waits for one expected thing.
pub const WAIT: Duration = Duration::from_secs(10);
/// Prosody's loopback address in the rig (ports are drawn at random, so tests may share it).
pub const HOME_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 21);

/// A Prosody home node for `example.test` with `users` (localpart, password) and the
/// `partner.test` component; `more` adjusts the configuration before start.
pub fn home_node(
    users: &[(&str, &str)],
    more: impl FnOnce(ProsodyConfig) -> ProsodyConfig,
) -> Result<Prosody> {
    let mut cfg = ProsodyConfig::new(HOME_IP)
        .host("example.test")
        .component("partner.test", SECRET);
    for (user, pw) in users {
        cfg = cfg.user("example.test", user, pw);
    }
    Prosody::start(more(cfg))
}

/// A running `legate` in the rig, with its configuration and data directory (kept across
/// [`Gateway::restart`]).
pub struct Gateway {
    pub legate: Legate,
    /// The SIP TLS listener.
    pub sip: SocketAddr,
    cfg: PathBuf,
    dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts `legate run` with mutual TLS on an ephemeral port, federating with `partner.test`
    /// (Lync, msrtc; outbound SIP goes to `route`) and linked to the home node `prosody`.
    /// `extra` is appended to the configuration (more sections or keys of new tables). Returns
    /// once the `partner.test` component link is up, so the first stanzas do not bounce.
    pub async fn start(
        certs: &CertFactory,
        ours: &Leaf,
        route: SocketAddr,
        prosody: &Prosody,
        extra: &str,
    ) -> Result<Gateway> {
        let dir = tempfile::tempdir()?;
        let cfg = dir.path().join("legate.toml");
        std::fs::write(
            &cfg,
            format!(
                r#"[node]
id = "iw1"
data_dir = "{data}"
admin_listen = "127.0.0.1:0"
[[local_domain]]
name = "example.test"
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
route = "{route}"
presence_format = "msrtc"
[[home_node]]
name = "hn1"
addresses = ["{component}"]
component_secret = "{SECRET}"
default_system = "xmpp"
{extra}
"#,
                data = dir.path().display(),
                cert = ours.cert.display(),
                key = ours.key.display(),
                ca = certs.ca_path().display(),
                component = prosody.component_addr(),
            ),
        )?;
        let (legate, sip) = Self::launch(&cfg).await?;
        Ok(Gateway {
            legate,
            sip,
            cfg,
            dir,
        })
    }

    async fn launch(cfg: &Path) -> Result<(Legate, SocketAddr)> {
        let legate = Legate::start(cfg, &["sip_tls", "admin"])?;
        legate
            .wait_output("the partner.test component link", WAIT, |t| {
                t.contains("component partner.test connected")
            })
            .await?;
        let sip = legate.addr("sip_tls");
        Ok((legate, sip))
    }

    /// `kill -9`, then `legate run` again on the same configuration and data directory; returns
    /// once the component link is up again. The SIP listener gets a new port ([`Gateway::sip`]).
    pub async fn restart(&mut self) -> Result<()> {
        self.legate.kill();
        let (legate, sip) = Self::launch(&self.cfg).await?;
        self.legate = legate;
        self.sip = sip;
        Ok(())
    }

    /// The data directory (`node.data_dir`), which is also where the configuration lives.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Legate's log, followed by its metrics: what a failing assertion needs to explain itself.
    pub fn log(&self) -> String {
        let log = self.legate.output();
        let metrics = Some(self.legate.addr("admin"))
            .and_then(|a| {
                use std::io::{Read, Write};
                let mut s =
                    std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .ok()?;
                let mut out = String::new();
                s.read_to_string(&mut out).ok()?;
                Some(
                    out.lines()
                        .filter(|l| l.starts_with("legate_"))
                        .collect::<Vec<_>>()
                        .join("\n"),
                )
            })
            .unwrap_or_default();
        format!("{log}\n--- metrics ---\n{metrics}")
    }
}

/// The foreign edge's TLS connection to Legate, presenting `leaf`.
pub async fn lync_edge(certs: &CertFactory, leaf: &Leaf, addr: SocketAddr) -> Result<Ua> {
    sip_ua::connect_tls(
        addr,
        certs.ca_path(),
        Some((&leaf.cert, &leaf.key)),
        "example.test",
    )
    .await
}

/// An msrtc `state` category document for `bob@partner.test` (availability number, optional
/// activity token), as a Lync edge sends in a NOTIFY.
pub fn msrtc(availability: u32, activity: Option<&str>) -> String {
    let act = activity
        .map(|a| format!("<activity token=\"{a}\"/>"))
        .unwrap_or_default();
    format!(
        "<categories xmlns=\"http://schemas.microsoft.com/2006/09/sip/categories\" uri=\"sip:bob@partner.test\">\
         <category name=\"state\" instance=\"1\" publishTime=\"2026-12-01T12:00:00Z\" container=\"2\" version=\"1\" expireType=\"static\">\
         <state xsi:type=\"aggregateState\" xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" xmlns=\"http://schemas.microsoft.com/2006/09/sip/state\">\
         <availability>{availability}</availability>{act}</state></category></categories>"
    )
}

/// Reads NOTIFYs (answering each 200) until one's body satisfies `want`.
pub async fn notify_until(ua: &mut Ua, what: &str, want: impl Fn(&str) -> bool) -> Result<String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if tokio::time::Instant::now() > deadline {
            bail!("no NOTIFY with {what}");
        }
        let n = ua
            .request("NOTIFY")
            .await
            .with_context(|| format!("waiting for a NOTIFY with {what}"))?;
        ua.respond(&n, 200, "OK", &[], None).await?;
        let body = body_str(&n);
        if want(&body) {
            return Ok(body);
        }
    }
}

/// Sends a presence SUBSCRIBE from `bob@partner.test` to `alice@example.test`-style `target`
/// (Call-ID `call_id`, msrtc accepted, one hour) and returns the final response.
pub async fn subscribe(
    ua: &mut Ua,
    target: &str,
    call_id: &str,
) -> Result<legate::sip::SipMessage> {
    subscribe_in(ua, target, call_id, None, 1).await
}

/// [`subscribe`] inside the dialog `to_tag` gave (a refresh, CSeq `cseq`), or outside any
/// dialog when it is None.
pub async fn subscribe_in(
    ua: &mut Ua,
    target: &str,
    call_id: &str,
    to_tag: Option<&str>,
    cseq: u32,
) -> Result<legate::sip::SipMessage> {
    let b = ua.branch();
    let to = match to_tag {
        Some(t) => format!("To: <sip:{target}>;tag={t}"),
        None => format!("To: <sip:{target}>"),
    };
    ua.send(
        &[
            &format!("SUBSCRIBE sip:{target} SIP/2.0"),
            &format!("Via: SIP/2.0/TLS sip.partner.test:5061;branch={b}"),
            "Max-Forwards: 70",
            &format!("From: <sip:bob@partner.test>;tag={call_id}-from"),
            &to,
            &format!("Call-ID: {call_id}"),
            &format!("CSeq: {cseq} SUBSCRIBE"),
            "Contact: <sip:bob@partner.test;opaque=user:epid:IW1;gruu>",
            "Event: presence",
            "Accept: application/msrtc-event-categories+xml",
            "Expires: 3600",
            "Content-Length: {CL}",
        ],
        b"",
    )
    .await?;
    ua.response().await
}

/// Accepts Legate's outbound TLS connection on the partner's `route`, as `partner.test`
/// presenting `leaf` (a restarted Legate has no inbound connection to reuse and dials).
pub async fn accept_lync(route: &tokio::net::TcpListener, leaf: &Leaf) -> Result<Ua> {
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            legate::tls::load_certs(&leaf.cert)?,
            legate::tls::load_private_key(&leaf.key)?,
        )?;
    let (tcp, _) = tokio::time::timeout(WAIT, route.accept())
        .await
        .context("Legate did not dial the partner's route")??;
    let s = tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg)).accept(tcp),
    )
    .await
    .context("TLS handshake timeout")??;
    Ok(Ua::from_stream(s))
}

/// bob@partner.test opens a Lync-style IM session to alice@example.test on `ua`: an INVITE
/// offering `m=message ... sip null` with `first` in `ms-text-format` (base64 `ms-body`), then
/// the ACK of its 200. Returns the dialog's To tag; a final answer other than 200 is an error.
pub async fn invite_im(ua: &mut Ua, call_id: &str, from_tag: &str, first: &str) -> Result<String> {
    use base64::Engine;
    let first = base64::engine::general_purpose::STANDARD.encode(first);
    let b = ua.branch();
    ua.send(
        &[
            "INVITE sip:alice@example.test SIP/2.0",
            &format!("Via: SIP/2.0/TLS sip.partner.test:5061;branch={b}"),
            "Max-Forwards: 70",
            &format!("From: <sip:bob@partner.test>;tag={from_tag}"),
            "To: <sip:alice@example.test>",
            &format!("Call-ID: {call_id}"),
            "CSeq: 1 INVITE",
            &format!("Contact: <sip:bob@partner.test;opaque=user:epid:{from_tag};gruu>"),
            &format!("ms-text-format: text/plain; charset=UTF-8;ms-body={first}"),
            "Content-Type: application/sdp",
            "Content-Length: {CL}",
        ],
        b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=session\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=message 5061 sip null\r\na=accept-types:text/plain\r\n",
    )
    .await?;
    let ok = loop {
        let r = ua.response().await?;
        if r.status() != Some(100) {
            break r;
        }
    };
    if ok.status() != Some(200) {
        bail!("INVITE answered {:?}", ok.status());
    }
    let tag = sip_ua::to_tag(&ok);
    let b = ua.branch();
    ua.send(
        &[
            "ACK sip:alice@example.test SIP/2.0",
            &format!("Via: SIP/2.0/TLS sip.partner.test:5061;branch={b}"),
            "Max-Forwards: 70",
            &format!("From: <sip:bob@partner.test>;tag={from_tag}"),
            &format!("To: <sip:alice@example.test>;tag={tag}"),
            &format!("Call-ID: {call_id}"),
            "CSeq: 1 ACK",
            "Content-Length: 0",
        ],
        b"",
    )
    .await?;
    Ok(tag)
}

/// The `[xmpp.federation]` of a gateway federating with [`foreign_xmpp`]'s `xmpp.test`
/// (certificates only, on loopback).
pub const XMPP_TEST_FEDERATION: &str = r#"[xmpp.federation]
mode = "allow_list"
dialback_allow_private_targets = true
[[xmpp.federation.domain]]
name = "xmpp.test"
system = "fed-xmpp"
auth = "external_only"
"#;

/// A foreign XMPP server, `xmpp.test` on `ip` with user bob (password `pw`), s2s by
/// certificate only (SASL EXTERNAL), and the DNS it resolves with: it knows one way to
/// `example.test`, the s2s listener `edge` of the gateway under test.
pub fn foreign_xmpp(
    certs: &CertFactory,
    ip: Ipv4Addr,
    edge: SocketAddr,
) -> Result<(Prosody, super::dnsmasq::Dnsmasq)> {
    use super::dnsmasq::{DnsRecord, Dnsmasq};
    let theirs = certs.leaf("xmpp.test", &["xmpp.test"]);
    let cfg = ProsodyConfig::new(ip)
        .host("xmpp.test")
        .user("xmpp.test", "bob", "pw")
        .host_cert(
            "xmpp.test",
            super::prosody::CertPaths {
                cert: theirs.cert.clone(),
                key: theirs.key.clone(),
            },
        )
        .secure_s2s(certs.ca_path());
    let std::net::IpAddr::V4(edge_ip) = edge.ip() else {
        bail!("the gateway's s2s edge must be on an IPv4 loopback address: {edge}");
    };
    let dns = Dnsmasq::start(&[
        DnsRecord::a("xmpp.test", ip),
        DnsRecord::xmpp_server("xmpp.test", "xmpp.test", cfg.s2s_port),
        DnsRecord::a("example.test", edge_ip),
        DnsRecord::xmpp_server("example.test", "example.test", edge.port()),
    ])?;
    let foreign = Prosody::start(cfg.dns(dns.unbound_forward()))?;
    Ok((foreign, dns))
}
