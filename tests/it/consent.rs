//! Consent and polite blocking end to end (requirements §3, RFC 8048 §5.3.3): the real
//! `legate` binary between the Lync-like test UA (mutual TLS as `partner.test`) and a real
//! Prosody home node where the local users are logged in with XMPP clients; the block set with
//! the real `legate policy` command on the running node.
//!
//! Proven here:
//! - a watcher blocked with `legate policy block` gets a live subscription that says offline
//!   and nothing else (no `terminated`, no `rejected`), and the user is never asked;
//! - a user's refusal shows the watcher offline, the subscription stays alive (a refresh is
//!   accepted), and the refusal is stored in the user's list;
//! - an un-SUBSCRIBE does not revoke: the next SUBSCRIBE becomes active with the user's
//!   presence without the user being asked again;
//! - blocking an active watcher sends it offline at once, unblocking its current presence;
//! - over XMPP federation (a foreign Prosody, s2s with certificates): a blocked watcher's
//!   request never reaches the user and no `unsubscribed` ever reaches the watcher, for a
//!   block and for the user's own refusal.
//!
//! Needs `/usr/bin/prosody` and `/usr/sbin/dnsmasq` (`apt-get install prosody dnsmasq-base`).

use crate::common;
use crate::sip_ua;

use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use common::certs::CertFactory;
use common::rig::{self, lync_edge, notify_until, Gateway, WAIT};
use common::xmpp_client::{ClientConfig, XmppClient};
use sip_ua::{body_str, hv, to_tag, Ua};
use tokio::net::TcpListener;

/// msrtc availability Legate sends for offline (the lync system's `offline` state).
const OFFLINE: &str = ">18500<";
/// msrtc availability of an available user.
const AVAILABLE: &str = ">3500<";
/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(1500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_and_refused_watchers_see_offline_and_unsubscribe_keeps_approval() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(120), scenario())
        .await
        .map_err(|_| anyhow!("scenario timed out"))?
}

/// `legate policy ARGS --admin <the node's admin endpoint>`: exit code, stdout, stderr.
async fn policy(gw: &Gateway, args: &[&str]) -> Result<(i32, String, String)> {
    policy_at(gw.legate.addr("admin"), args).await
}

pub(crate) async fn policy_at(
    admin: std::net::SocketAddr,
    args: &[&str],
) -> Result<(i32, String, String)> {
    let admin = admin.to_string();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_legate"))
        .arg("policy")
        .args(args)
        .args(["--admin", &admin])
        .output()
        .await
        .context("running legate policy")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A SUBSCRIBE inside the dialog `call_id` / `tag` (a refresh, or with 0 an un-SUBSCRIBE).
async fn resubscribe(
    ua: &mut Ua,
    target: &str,
    call_id: &str,
    tag: &str,
    cseq: u32,
    expires: u32,
) -> Result<legate::sip::SipMessage> {
    let b = ua.branch();
    ua.send(
        &[
            &format!("SUBSCRIBE sip:{target} SIP/2.0"),
            &format!("Via: SIP/2.0/TLS sip.partner.test:5061;branch={b}"),
            "Max-Forwards: 70",
            &format!("From: <sip:bob@partner.test>;tag={call_id}-from"),
            &format!("To: <sip:{target}>;tag={tag}"),
            &format!("Call-ID: {call_id}"),
            &format!("CSeq: {cseq} SUBSCRIBE"),
            "Contact: <sip:bob@partner.test;opaque=user:epid:IW1;gruu>",
            "Event: presence",
            "Accept: application/msrtc-event-categories+xml",
            &format!("Expires: {expires}"),
            "Content-Length: {CL}",
        ],
        b"",
    )
    .await?;
    ua.response().await
}

/// Reads NOTIFYs until one satisfies `want`, failing on any that ends the subscription.
async fn alive_notify_until(
    ua: &mut Ua,
    gw: &Gateway,
    what: &str,
    want: impl Fn(&str) -> bool,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no NOTIFY with {what}:\n{}",
            gw.log()
        );
        let n = ua
            .request("NOTIFY")
            .await
            .with_context(|| format!("waiting for a NOTIFY with {what}:\n{}", gw.log()))?;
        ua.respond(&n, 200, "OK", &[], None).await?;
        let state = hv(&n, "Subscription-State").to_string();
        ensure!(
            !state.starts_with("terminated") && !state.contains("rejected"),
            "the watcher was told ({state}) while waiting for {what}"
        );
        if state.starts_with("active") && want(&body_str(&n)) {
            return Ok(());
        }
    }
}

/// Nothing from the edge but (optionally) offline NOTIFYs of a live subscription, for QUIET.
async fn nothing_but_offline(ua: &mut Ua) -> Result<()> {
    let until = tokio::time::Instant::now() + QUIET;
    while tokio::time::Instant::now() < until {
        if ua.quiet(until - tokio::time::Instant::now()).await {
            return Ok(());
        }
        let n = ua.request("NOTIFY").await?;
        ua.respond(&n, 200, "OK", &[], None).await?;
        let state = hv(&n, "Subscription-State");
        ensure!(state.starts_with("active"), "watcher told: {state}");
        ensure!(
            body_str(&n).contains(OFFLINE),
            "more than offline: {}",
            body_str(&n)
        );
    }
    Ok(())
}

async fn scenario() -> Result<()> {
    let certs = CertFactory::new();
    let ours = certs.leaf("example", &["example.test"]);
    let partner = certs.leaf("partner", &["partner.test", "sip.partner.test"]);
    let prosody = rig::home_node(&[("alice", "pw"), ("carol", "pw"), ("dave", "pw")], |c| c)?;
    let route = TcpListener::bind("127.0.0.1:0").await?;
    let gw = Gateway::start(&certs, &ours, route.local_addr()?, &prosody, "").await?;
    let client = |user: &str| ClientConfig::plain(prosody.c2s_addr(), "example.test", user, "pw");
    let mut alice = XmppClient::connect(client("alice")).await?;
    alice.send_presence(None, Some("at my desk")).await?;
    let mut carol = XmppClient::connect(client("carol")).await?;
    carol.send_presence(None, Some("carol here")).await?;
    let mut dave = XmppClient::connect(client("dave")).await?;
    dave.send_presence(None, None).await?;
    let mut bob = lync_edge(&certs, &partner, gw.sip).await?;

    // --- The admin command refuses bad input clearly, before and at the node. ---------------
    let (code, _, err) = policy(&gw, &["block", "carol@example.test", "bob@"]).await?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("`bob@`"), "{err}");
    let (code, _, err) =
        policy(&gw, &["block", "carol@elsewhere.test", "bob@partner.test"]).await?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a user of a local domain"), "{err}");

    // --- A watcher blocked with `legate policy block` sees offline and nothing else. --------
    let (code, out, err) = policy(&gw, &["block", "carol@example.test", "partner.test"]).await?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "carol@example.test block partner.test");
    let (code, out, _) = policy(&gw, &["show", "carol@example.test"]).await?;
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "carol@example.test block partner.test (domain)");

    let ok = rig::subscribe(&mut bob, "carol@example.test", "cs-blocked").await?;
    assert_eq!(ok.status(), Some(200), "{}", gw.log());
    alive_notify_until(&mut bob, &gw, "carol offline", |b| b.contains(OFFLINE)).await?;
    carol
        .send_presence(Some("chat"), Some("free to talk"))
        .await?;
    nothing_but_offline(&mut bob).await?;
    assert!(
        carol
            .expect_presence_from("bob@partner.test", Some("subscribe"), QUIET)
            .await
            .is_err(),
        "carol was asked although bob is blocked"
    );

    // --- dave refuses: offline, the subscription alive, the refusal stored. -----------------
    let ok = rig::subscribe(&mut bob, "dave@example.test", "cs-refused").await?;
    assert_eq!(ok.status(), Some(200), "{}", gw.log());
    let dave_tag = to_tag(&ok);
    let n = bob.request("NOTIFY").await?;
    bob.respond(&n, 200, "OK", &[], None).await?;
    assert!(hv(&n, "Subscription-State").starts_with("pending"));
    dave.expect_presence_from("bob@partner.test", Some("subscribe"), WAIT)
        .await
        .with_context(|| format!("dave got no request:\n{}", gw.log()))?;
    dave.send_raw("<presence to='bob@partner.test' type='unsubscribed'/>")
        .await?;
    alive_notify_until(&mut bob, &gw, "dave offline after refusing", |b| {
        b.contains(OFFLINE)
    })
    .await?;
    nothing_but_offline(&mut bob).await?;
    let refresh = resubscribe(
        &mut bob,
        "dave@example.test",
        "cs-refused",
        &dave_tag,
        2,
        3600,
    )
    .await?;
    assert_eq!(refresh.status(), Some(200), "refresh of a refused watcher");
    alive_notify_until(&mut bob, &gw, "dave still offline", |b| b.contains(OFFLINE)).await?;
    let (_, out, _) = policy(&gw, &["show", "dave@example.test"]).await?;
    assert_eq!(out.trim(), "dave@example.test block bob@partner.test (jid)");

    // --- alice approves; an un-SUBSCRIBE does not revoke it. --------------------------------
    let ok = rig::subscribe(&mut bob, "alice@example.test", "cs-alice-1").await?;
    assert_eq!(ok.status(), Some(200), "{}", gw.log());
    let alice_tag = to_tag(&ok);
    alice
        .expect_presence_from("bob@partner.test", Some("subscribe"), WAIT)
        .await
        .with_context(|| format!("alice got no request:\n{}", gw.log()))?;
    alice.approve("bob@partner.test").await?;
    alive_notify_until(&mut bob, &gw, "alice available", |b| b.contains(AVAILABLE)).await?;

    let gone = resubscribe(
        &mut bob,
        "alice@example.test",
        "cs-alice-1",
        &alice_tag,
        2,
        0,
    )
    .await?;
    assert_eq!(gone.status(), Some(200));
    let n = bob.request("NOTIFY").await?;
    bob.respond(&n, 200, "OK", &[], None).await?;
    assert!(hv(&n, "Subscription-State").starts_with("terminated"));
    // Prosody tells alice's client of a revocation with `unsubscribe`: none comes.
    assert!(
        alice
            .expect_presence_from("bob@partner.test", Some("unsubscribe"), QUIET)
            .await
            .is_err(),
        "the un-SUBSCRIBE revoked alice's approval"
    );

    let ok = rig::subscribe(&mut bob, "alice@example.test", "cs-alice-2").await?;
    assert_eq!(ok.status(), Some(200), "{}", gw.log());
    notify_until(&mut bob, "alice available again", |b| b.contains(AVAILABLE))
        .await
        .with_context(|| gw.log())?;
    assert!(
        alice
            .expect_presence_from("bob@partner.test", Some("subscribe"), QUIET)
            .await
            .is_err(),
        "alice was asked again"
    );

    // --- Blocking an active watcher: offline at once; unblocking: her state at once. --------
    // Her approval is stored as an allow for bob's JID, which a domain block would not
    // override (the most specific entry wins): the admin blocks the JID.
    let (_, out, _) = policy(&gw, &["show", "alice@example.test"]).await?;
    assert_eq!(
        out.trim(),
        "alice@example.test allow bob@partner.test (jid)"
    );
    let (code, _, err) = policy(&gw, &["block", "alice@example.test", "bob@partner.test"]).await?;
    assert_eq!(code, 0, "{err}");
    alive_notify_until(&mut bob, &gw, "alice offline after the block", |b| {
        b.contains(OFFLINE)
    })
    .await?;
    let (code, out, err) =
        policy(&gw, &["unblock", "alice@example.test", "bob@partner.test"]).await?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        "alice@example.test no entry for bob@partner.test"
    );
    alive_notify_until(&mut bob, &gw, "alice available after the unblock", |b| {
        b.contains(AVAILABLE) && b.contains("at my desk")
    })
    .await?;
    Ok(())
}

mod xmpp {
    use super::*;
    use common::dnsmasq::{DnsRecord, Dnsmasq};
    use common::legate::Legate;
    use common::ports;
    use common::prosody::{CertPaths, Prosody, ProsodyConfig};
    use common::xmpp_client::TlsOptions;
    use std::net::{IpAddr, Ipv4Addr};

    const LEGATE_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 3, 10);
    const FOREIGN_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 3, 11);
    const HOME_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 3, 12);
    const SECRET: &str = "consent-component-secret-1";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn xmpp_watchers_are_blocked_politely() -> Result<()> {
        tokio::time::timeout(Duration::from_secs(120), scenario())
            .await
            .map_err(|_| anyhow!("scenario timed out"))?
    }

    async fn scenario() -> Result<()> {
        let certs = CertFactory::new();
        let ours = certs.leaf("example.test", &["example.test"]);
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
            DnsRecord::a("xmpp.test", FOREIGN_IP),
            DnsRecord::xmpp_server("example.test", "example.test", legate_port),
            DnsRecord::xmpp_server("xmpp.test", "xmpp.test", foreign_cfg.s2s_port),
        ])?;
        let home = Prosody::start(
            ProsodyConfig::new(HOME_IP)
                .host("example.test")
                .user("example.test", "carol", "pw")
                .user("example.test", "dave", "pw")
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
data_dir = "{data}"
[[local_domain]]
name = "example.test"
cert = "{cert}"
key = "{key}"
[listeners]
sip_tls = "off"
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
[[home_node]]
name = "hn1"
addresses = ["{home_addr}"]
component_secret = "{SECRET}"
default_system = "xmpp"
[dns]
nameservers = ["{dns_addr}"]
"#,
                data = dir.path().display(),
                cert = ours.cert.display(),
                key = ours.key.display(),
                ca = certs.ca_path().display(),
                home_addr = home.component_addr(),
                dns_addr = dns.addr(),
            ),
        )?;
        let legate = Legate::start(&cfg, &["xmpp_s2s", "admin"])?;
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
        let admin = legate.addr("admin");
        let local = |user: &str| ClientConfig::plain(home.c2s_addr(), "example.test", user, "pw");
        let mut carol = XmppClient::connect(local("carol")).await?;
        carol.send_presence(None, Some("carol here")).await?;
        let mut dave = XmppClient::connect(local("dave")).await?;
        dave.send_presence(None, None).await?;
        let mut cc = ClientConfig::plain(foreign.c2s_addr(), "xmpp.test", "bob", "pw");
        cc.tls = Some(TlsOptions {
            ca_pem: certs.ca_pem().as_bytes().to_vec(),
            server_name: "xmpp.test".into(),
        });
        let mut bob = XmppClient::connect(cc).await?;
        bob.send_presence(None, None).await?;

        // carol blocks the whole domain: bob's request never reaches her, bob is never told.
        let (code, _, err) =
            policy_at(admin, &["block", "carol@example.test", "xmpp.test"]).await?;
        assert_eq!(code, 0, "{err}");
        bob.subscribe("carol@example.test").await?;
        assert!(
            carol
                .expect_presence_from("bob@xmpp.test", Some("subscribe"), QUIET)
                .await
                .is_err(),
            "{}",
            why("carol was asked although xmpp.test is blocked")
        );
        assert!(
            bob.expect_presence_from("carol@example.test", Some("unsubscribed"), QUIET)
                .await
                .is_err(),
            "bob was told he is blocked"
        );
        assert!(
            bob.expect_presence_from("carol@example.test", None, QUIET)
                .await
                .is_err(),
            "bob sees carol available"
        );

        // dave refuses: bob gets no `unsubscribed`; the refusal is stored as a block.
        bob.subscribe("dave@example.test").await?;
        dave.expect_presence_from("bob@xmpp.test", Some("subscribe"), WAIT)
            .await
            .with_context(|| why("dave got no request"))?;
        dave.send_raw("<presence to='bob@xmpp.test' type='unsubscribed'/>")
            .await?;
        assert!(
            bob.expect_presence_from("dave@example.test", Some("unsubscribed"), QUIET)
                .await
                .is_err(),
            "{}",
            why("dave's refusal reached bob")
        );
        let (_, out, _) = policy_at(admin, &["show", "dave@example.test"]).await?;
        assert_eq!(out.trim(), "dave@example.test block bob@xmpp.test (jid)");
        // Asking again does not reach dave.
        bob.subscribe("dave@example.test").await?;
        assert!(
            dave.expect_presence_from("bob@xmpp.test", Some("subscribe"), QUIET)
                .await
                .is_err(),
            "dave was asked again after refusing"
        );
        carol.close().await;
        dave.close().await;
        bob.close().await;
        Ok(())
    }
}

/// Without a running node the command says so, names the endpoint it tried (from the
/// configuration's `node.admin_listen`) and exits 1; bad arguments exit 2 before any
/// connection.
#[tokio::test]
async fn the_policy_command_needs_a_running_node_and_says_so() -> Result<()> {
    let free = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = free.local_addr()?;
    drop(free);
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("legate.toml");
    std::fs::write(&cfg, format!("[node]\nadmin_listen = \"{addr}\"\n"))?;
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_legate"))
            .arg("policy")
            .args(args)
            .output()
    };
    let cfg_s = cfg.display().to_string();
    let out = run(&["show", "alice@example.test", "--config", &cfg_s])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&addr.to_string()), "{err}");
    assert!(err.contains("must be running"), "{err}");
    let out = run(&[
        "allow",
        "alice@example.test/desk",
        "bob@partner.test",
        "--config",
        &cfg_s,
    ])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("bare JID"), "{err}");
    let out = run(&["block", "alice@example.test", "bob@partner.test/phone"])?;
    assert_eq!(out.status.code(), Some(2));
    Ok(())
}
