//! Component links in a cluster (issue 12 item 2), end to end: a real three-member etcd, two
//! `legate run` nodes, one real Prosody home node that accepts one connection per component.
//! - exactly one node holds the `partner.test` component link; the other never connects it;
//! - a pager MESSAGE a Lync-like edge sends to the node that does not hold the link reaches the
//!   Prosody user: handed to the holder over the peer link (mutual TLS);
//! - killing the holder (SIGKILL) moves the link to the survivor within the lease TTL + 1 s,
//!   and a MESSAGE accepted by the survivor while the holder was dying is delivered, not lost;
//! - a Lync watcher subscribed through the node that is not the leader keeps receiving
//!   presence after that node is killed: the leader takes its dialog over (NOTIFY in the old
//!   dialog over a connection it opens to the partner) and answers its refresh;
//! - a local user's answers to an IM session set up through the node without the link go out
//!   in that session: the holder hands them to the session's owner.

use crate::common;
use crate::sip_ua;

use anyhow::{Context, Result};
use common::certs::{CertFactory, Leaf};
use common::etcd::Etcd;
use common::legate::Legate;
use common::ports::{cluster_peers_toml, named_port};
use common::prosody::{Prosody, ProsodyConfig};
use common::xmpp_client::{ClientConfig, XmppClient};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

const SECRET: &str = "cluster-links-component-secret-42";
const WAIT: Duration = Duration::from_secs(20);
const TTL_SECS: u64 = 3;
const CLUSTER: &str = "links.test";
/// The second test's cluster (its own peer ports and etcd keys).
const CLUSTER2: &str = "takeover.test";
const LINK: &str = "hn1/partner.test";

#[allow(clippy::too_many_arguments)]
fn node_toml(
    cluster: &str,
    id: &str,
    dir: &Path,
    certs: &CertFactory,
    ours: &Leaf,
    etcd: &Etcd,
    component: SocketAddr,
    route: SocketAddr,
) -> String {
    let peers = cluster_peers_toml(cluster, &["gw1", "gw2"]);
    format!(
        r#"[node]
id = "{id}"
sip_host = "{id}.example.test"
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
[[home_node]]
name = "hn1"
addresses = ["{component}"]
component_secret = "{SECRET}"
default_system = "xmpp"
[cluster]
name = "{cluster}"
store = "etcd"
etcd_endpoints = {endpoints}
lease_ttl_secs = {TTL_SECS}
{peers}
"#,
        data = dir.display(),
        cert = ours.cert.display(),
        key = ours.key.display(),
        ca = certs.ca_path().display(),
        endpoints = etcd.endpoints_toml(),
    )
}

/// What both tests run on: a three-member etcd, certificates for us and the partner, and a
/// Prosody home node (on 127.0.0.`ip`) with alice and the `partner.test` component.
struct Parts {
    etcd: Etcd,
    certs: CertFactory,
    ours: Leaf,
    partner: Leaf,
    prosody: Prosody,
}

fn parts(ip: u8) -> Result<Parts> {
    let etcd = Etcd::start(3).context("three-member etcd")?;
    let certs = CertFactory::new();
    let ours = certs.leaf("example", &["example.test"]);
    let partner = certs.leaf("partner", &["partner.test", "sip.partner.test"]);
    let prosody = Prosody::start(
        ProsodyConfig::new(std::net::Ipv4Addr::new(127, 0, 0, ip))
            .host("example.test")
            .user("example.test", "alice", "pw")
            .component("partner.test", SECRET),
    )?;
    Ok(Parts {
        etcd,
        certs,
        ours,
        partner,
        prosody,
    })
}

/// Starts `legate run` for gw1 and gw2 of `cluster` under `dir`, linked to `prosody`, with
/// outbound SIP for `partner.test` going to `route`. With `alone_first`, that node starts
/// first and holds the component link before the other starts. Returned as [gw1, gw2].
#[allow(clippy::too_many_arguments)]
async fn start_nodes(
    cluster: &str,
    dir: &Path,
    certs: &CertFactory,
    ours: &Leaf,
    etcd: &Etcd,
    prosody: &Prosody,
    route: SocketAddr,
    alone_first: Option<&str>,
) -> Result<Vec<Legate>> {
    let order = match alone_first {
        Some("gw2") => ["gw2", "gw1"],
        _ => ["gw1", "gw2"],
    };
    let mut started = Vec::new();
    for id in order {
        let d = dir.join(id);
        std::fs::create_dir_all(&d)?;
        let cfg = d.join("legate.toml");
        std::fs::write(
            &cfg,
            node_toml(
                cluster,
                id,
                &d,
                certs,
                ours,
                etcd,
                prosody.component_addr(),
                route,
            ),
        )?;
        let node = Legate::start(&cfg, &["sip_tls", "cluster"])?;
        if alone_first == Some(id) {
            let deadline = Instant::now() + WAIT;
            while holder(&node).await != id {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "{id} alone did not claim the link:\n{}",
                    node.output()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        started.push((id, node));
    }
    started.sort_by_key(|(id, _)| *id);
    Ok(started.into_iter().map(|(_, n)| n).collect())
}

/// Both nodes' logs and Prosody's, for a failure message.
fn why(nodes: &[Legate], prosody: &Prosody) -> String {
    format!(
        "--- gw1 ---\n{}\n--- gw2 ---\n{}\n--- prosody ---\n{}",
        nodes.first().map(|n| n.output()).unwrap_or_default(),
        nodes.get(1).map(|n| n.output()).unwrap_or_default(),
        prosody.log()
    )
}

/// Waits until both nodes name the same holder of the link (`want`, when given); returns it.
async fn agreed_holder(nodes: &[Legate], prosody: &Prosody, want: Option<&str>) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (a, b) = (holder(&nodes[0]).await, holder(&nodes[1]).await);
        if !a.is_empty() && a == b && want.is_none_or(|w| w == a) {
            return a;
        }
        assert!(
            Instant::now() < deadline,
            "no agreed holder (want {want:?}; gw1 says {a:?}, gw2 {b:?}):\n{}",
            why(nodes, prosody)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// alice signed in on Prosody (available, `status`), and bob's Lync-like edge connected to
/// `node`'s SIP TLS listener.
async fn alice_and_bob(
    parts: (&Prosody, &CertFactory, &Leaf),
    node: &Legate,
    status: &str,
) -> Result<(XmppClient, sip_ua::Ua)> {
    let (prosody, certs, partner) = parts;
    let mut alice = XmppClient::connect(ClientConfig::plain(
        prosody.c2s_addr(),
        "example.test",
        "alice",
        "pw",
    ))
    .await?;
    alice.send_presence(None, Some(status)).await?;
    let bob = common::rig::lync_edge(certs, partner, node.addr("sip_tls")).await?;
    Ok((alice, bob))
}

/// Whether a TLS client with `cfg` is served on the clustering `port` as `name`: the server
/// answers something after the handshake. With TLS 1.3 a refused client certificate shows
/// only then, as a closed connection.
async fn served(port: u16, name: &'static str, cfg: rustls::ClientConfig) -> Result<bool> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let attempt = async {
        let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
            .connect(name.try_into()?, tcp)
            .await?;
        let mut buf = [0u8; 64];
        let got = tokio::io::AsyncReadExt::read(&mut tls, &mut buf).await?;
        anyhow::ensure!(got > 0, "closed");
        Ok::<(), anyhow::Error>(())
    };
    Ok(tokio::time::timeout(WAIT, attempt).await?.is_ok())
}

/// Who `node` says holds the link ("" while not settled).
async fn holder(node: &Legate) -> String {
    let Ok(response) = node.http_get("/status").await else {
        return String::new();
    };
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    v["cluster"]["links"]
        .as_array()
        .and_then(|a| a.iter().find(|l| l["link"] == LINK))
        .and_then(|l| l["holder"].as_str())
        .unwrap_or_default()
        .to_string()
}

async fn pager(ua: &mut sip_ua::Ua, n: u32, body: &str) -> Result<Option<u16>> {
    let b = ua.branch();
    ua.send(
        &[
            "MESSAGE sip:alice@example.test SIP/2.0",
            &format!("Via: SIP/2.0/TLS sip.partner.test:5061;branch={b}"),
            "Max-Forwards: 70",
            &format!("From: <sip:bob@partner.test>;tag=cl{n}"),
            "To: <sip:alice@example.test>",
            &format!("Call-ID: cluster-links-{n}"),
            &format!("CSeq: {n} MESSAGE"),
            "Content-Type: text/plain; charset=UTF-8",
            "Content-Length: {CL}",
        ],
        body.as_bytes(),
    )
    .await?;
    Ok(ua.response().await?.status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_holds_a_component_link_the_other_hands_it_traffic_and_takes_it_over() -> Result<()>
{
    let Parts {
        mut etcd,
        certs,
        ours,
        partner,
        prosody,
    } = parts(43)?;
    let dir = tempfile::tempdir()?;
    // The node ranked second for the link starts alone and claims it; when the first-ranked
    // one has joined, the link is handed over to it.
    let members = ["gw1".to_string(), "gw2".to_string()];
    let first = members
        .iter()
        .find(|m| legate::cluster::claims::rank_of(m, LINK, &members) == 0)
        .cloned()
        .context("a first-ranked node")?;
    let second = if first == "gw1" { "gw2" } else { "gw1" };
    let mut nodes = start_nodes(
        CLUSTER,
        dir.path(),
        &certs,
        &ours,
        &etcd,
        &prosody,
        "127.0.0.1:9".parse()?,
        Some(second),
    )
    .await?;
    let why = |nodes: &[Legate]| why(nodes, &prosody);

    // Both nodes agree that the first-ranked node holds the link now, and only its component
    // connection is up (the second closed its own when it handed the link over).
    let held_by = agreed_holder(&nodes, &prosody, Some(&first)).await;
    let (h, n) = if held_by == "gw1" { (0, 1) } else { (1, 0) };
    let handed_back = common::legate::metric_value(
        &nodes[n].metrics().await?,
        "legate_cluster_link_claims_total{outcome=\"handed_back\"}",
    );
    assert_eq!(handed_back, Some(1.0), "{second} handed the link over once");
    nodes[h]
        .wait_output("the holder's component link", WAIT, |t| {
            t.contains("component partner.test connected")
        })
        .await?;
    // Exactly one connection is up: a node that held the link before handing it over has
    // closed its own.
    let deadline = Instant::now() + WAIT;
    loop {
        let links = |m: &str| common::legate::metric_value(m, "legate_component_links_up");
        let (on_h, on_n) = (
            links(&nodes[h].metrics().await?),
            links(&nodes[n].metrics().await?),
        );
        if on_h == Some(1.0) && on_n == Some(0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "component connections: holder {on_h:?}, other {on_n:?}\n{}",
            why(&nodes)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // `legate cluster status` on the other node names the holder and the peer link's TLS.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_legate"))
        .args([
            "cluster",
            "status",
            "--admin",
            &nodes[n].addr("admin").to_string(),
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains(LINK) && l.trim_end().ends_with(held_by.as_str())),
        "{text}"
    );
    assert!(text.contains("peer link tls: permissive"), "{text}");

    let (mut alice, mut bob) =
        alice_and_bob((&prosody, &certs, &partner), &nodes[n], "here").await?;

    // Through the node that does not hold the link: handed to the holder.
    assert_eq!(
        pager(&mut bob, 1, "via the peer link").await?,
        Some(200),
        "{}",
        why(&nodes)
    );
    let m = alice
        .expect_message_from("bob@partner.test", WAIT)
        .await
        .with_context(|| why(&nodes))?;
    assert_eq!(m.body.as_deref(), Some("via the peer link"));
    let metrics = nodes[n].metrics().await?;
    assert!(
        common::legate::metric_value(
            &metrics,
            "legate_cluster_handed_total{direction=\"out\",outcome=\"accepted\"}"
        )
        .is_some_and(|v| v >= 1.0),
        "{metrics}"
    );

    // etcd loses quorum: the nodes detach, but the holder keeps its link and the other keeps
    // handing it traffic on what it knew.
    etcd.stop(1);
    etcd.stop(2);
    let deadline = Instant::now() + WAIT;
    loop {
        let r = nodes[n].http_get("/status").await?;
        if r.contains("\"DETACHED\"") {
            break;
        }
        assert!(Instant::now() < deadline, "never detached: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        pager(&mut bob, 10, "without etcd quorum").await?,
        Some(200),
        "{}",
        why(&nodes)
    );
    let m = alice
        .expect_message_from("bob@partner.test", WAIT)
        .await
        .with_context(|| why(&nodes))?;
    assert_eq!(m.body.as_deref(), Some("without etcd quorum"));
    etcd.restart(1)?;
    etcd.restart(2)?;
    // Both rejoin (new leases; the holder writes its claim again under its new one) before
    // the next part measures a takeover from a steady state.
    let deadline = Instant::now() + WAIT;
    loop {
        let mut steady = true;
        for node in &nodes {
            let r = node.http_get("/status").await?;
            steady &= !r.contains("\"DETACHED\"");
            steady &= holder(node).await == held_by;
        }
        if steady {
            break;
        }
        assert!(Instant::now() < deadline, "no rejoin:\n{}", why(&nodes));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The holder's claim is under its new lease once its claims pass has run again.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The clustering port: an address that is not a listed peer is closed before any TLS;
    // a listed address without a client certificate fails the (mutual) handshake.
    let port = nodes[n].addr("cluster");
    let stranger = tokio::net::TcpSocket::new_v4()?;
    stranger.bind("127.0.0.77:0".parse()?)?;
    let mut s = stranger.connect(port).await?;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut s, &mut buf)).await?;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "a stranger's connection stayed open: {read:?}"
    );
    let no_cert = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .dangerous()
    .with_custom_certificate_verifier(std::sync::Arc::new(crate::tls::AcceptAny))
    .with_no_client_auth();
    assert!(
        !served(port.port(), "gw.peer", no_cert).await?,
        "a peer without a client certificate was served"
    );
    let metrics = nodes[n].metrics().await?;
    for outcome in ["not_a_peer", "tls_failed"] {
        assert!(
            common::legate::metric_value(
                &metrics,
                &format!("legate_cluster_peer_connections_total{{outcome=\"{outcome}\"}}")
            )
            .is_some_and(|v| v >= 1.0),
            "{outcome}: {metrics}"
        );
    }

    // The holder dies. A MESSAGE the survivor accepts meanwhile waits for the link and is
    // delivered once the survivor holds it.
    const CONNECTED: &str = "component partner.test connected";
    // The survivor may have held the link before (it hands links over when a better-ranked
    // node joins): only a connection made after the kill counts.
    let connected_before = nodes[n].output().matches(CONNECTED).count();
    let killed_at = Instant::now();
    nodes[h].kill();
    assert_eq!(
        pager(&mut bob, 2, "while the holder died").await?,
        Some(200),
        "{}",
        why(&nodes)
    );
    nodes[n]
        .wait_output("the survivor's component link", WAIT, |t| {
            t.matches(CONNECTED).count() > connected_before
        })
        .await
        .with_context(|| why(&nodes))?;
    let moved_in = killed_at.elapsed();
    eprintln!("component link moved in {moved_in:?}");
    let m = alice
        .expect_message_from("bob@partner.test", WAIT)
        .await
        .with_context(|| why(&nodes))?;
    assert_eq!(m.body.as_deref(), Some("while the holder died"));
    assert!(
        moved_in <= Duration::from_secs(TTL_SECS + 1),
        "the link moved in {moved_in:?}, more than the lease TTL + 1 s:\n{}",
        why(&nodes)
    );
    assert_eq!(holder(&nodes[n]).await, if n == 0 { "gw1" } else { "gw2" });

    // And the survivor now delivers on its own link.
    assert_eq!(pager(&mut bob, 3, "after the takeover").await?, Some(200));
    let m = alice
        .expect_message_from("bob@partner.test", WAIT)
        .await
        .with_context(|| why(&nodes))?;
    assert_eq!(m.body.as_deref(), Some("after the takeover"));
    drop(etcd);
    Ok(())
}

/// The leader of `nodes` by their `/status` (None while there is none or they disagree).
async fn leader(nodes: &[Legate]) -> Option<String> {
    let mut seen = None;
    for n in nodes {
        let response = n.http_get("/status").await.ok()?;
        let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        let l = v["cluster"]["leader"].as_str()?.to_string();
        if seen.as_ref().is_some_and(|s| *s != l) {
            return None;
        }
        seen = Some(l);
    }
    seen
}

/// Issue 12 item 3: a Lync-style watcher subscribed through node A keeps receiving presence
/// after A is killed, via the leader B, in its old dialog and without subscribing again; its
/// refresh sent to B is answered in that dialog. An IM session set up through A is taken over
/// the same way: alice's answer goes out in bob's dialog from B, and bob's next message in it,
/// sent to B, is answered there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_subscribed_through_a_killed_node_keeps_its_dialog_through_the_leader(
) -> Result<()> {
    use common::rig::{accept_lync, lync_edge, notify_until, subscribe, subscribe_in};
    let Parts {
        etcd,
        certs,
        ours,
        partner,
        prosody,
    } = parts(44)?;
    let route = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let dir = tempfile::tempdir()?;
    let mut nodes = start_nodes(
        CLUSTER2,
        dir.path(),
        &certs,
        &ours,
        &etcd,
        &prosody,
        route.local_addr()?,
        None,
    )
    .await?;
    let why = |nodes: &[Legate]| why(nodes, &prosody);
    let deadline = Instant::now() + WAIT;
    let (lead, held) = loop {
        let l = leader(&nodes).await;
        let (a, b) = (holder(&nodes[0]).await, holder(&nodes[1]).await);
        if let Some(l) = l.filter(|_| !a.is_empty() && a == b) {
            break (l, a);
        }
        assert!(
            Instant::now() < deadline,
            "no leader and holder:\n{}",
            why(&nodes)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // A: the node that is not the leader; the watcher subscribes through it.
    let (a, b) = if lead == "gw1" { (1, 0) } else { (0, 1) };
    let a_id = if a == 0 { "gw1" } else { "gw2" };
    let (mut alice, mut bob) =
        alice_and_bob((&prosody, &certs, &partner), &nodes[a], "at my desk").await?;
    let ok = subscribe(&mut bob, "alice@example.test", "tk-watch").await?;
    assert_eq!(ok.status(), Some(200), "{}", why(&nodes));
    let watch_tag = sip_ua::to_tag(&ok);
    alice
        .expect_presence_from("bob@partner.test", Some("subscribe"), WAIT)
        .await
        .with_context(|| format!("alice got no subscription request:\n{}", why(&nodes)))?;
    alice.approve("bob@partner.test").await?;
    notify_until(&mut bob, "alice available", |body| body.contains(">3500<"))
        .await
        .with_context(|| why(&nodes))?;

    // bob also opens an IM session through A.
    let im_tag = common::rig::invite_im(&mut bob, "tk-im", "tkim", "before the kill")
        .await
        .with_context(|| why(&nodes))?;
    let m = alice
        .expect_message_from("bob@partner.test", WAIT)
        .await
        .with_context(|| why(&nodes))?;
    assert_eq!(m.body.as_deref(), Some("before the kill"));

    // The watcher's dialog and the IM session are in A's part of etcd before the kill.
    let a_prefix = format!("/legate/{CLUSTER2}/state/node/{a_id}/sip/");
    let deadline = Instant::now() + WAIT;
    while etcd.count_prefix(&a_prefix)? < 2 || etcd.count_prefix(&format!("{a_prefix}i/"))? != 1 {
        assert!(
            Instant::now() < deadline,
            "A's dialog never reached etcd:\n{}",
            why(&nodes)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A dies; alice changes her state. The leader takes the dialog over and tells the watcher,
    // in its old dialog, over a connection it opens to the partner.
    nodes[a].kill();
    drop(bob);
    let killed = Instant::now();
    alice
        .send_presence(Some("dnd"), Some("Writing the report"))
        .await?;
    let mut edge = accept_lync(&route, &partner)
        .await
        .with_context(|| why(&nodes))?;
    let n = loop {
        let n = edge
            .request("NOTIFY")
            .await
            .with_context(|| format!("no NOTIFY through the leader:\n{}", why(&nodes)))?;
        edge.respond(&n, 200, "OK", &[], None).await?;
        if sip_ua::body_str(&n).contains(">6500<") {
            break n;
        }
    };
    eprintln!(
        "watcher's NOTIFY through {lead} {:?} after the kill of {a_id}",
        killed.elapsed()
    );
    assert_eq!(n.call_id().ok(), Some("tk-watch"), "{}", why(&nodes));
    assert_eq!(sip_ua::from_tag(&n), watch_tag, "the watcher's old dialog");
    // The leader's Contact names the leader (node.sip_host): the partner's next in-dialog
    // request goes to the node that owns the dialog now (RFC 6665 §4.1.3 remote target).
    let contact = sip_ua::hv(&n, "Contact");
    assert!(
        contact.contains(&format!("@{lead}.example.test")),
        "{contact}"
    );
    assert!(sip_ua::body_str(&n).contains("Writing the report"));
    assert_eq!(etcd.count_prefix(&a_prefix)?, 0, "A's records were moved");
    let _ = held;

    // The IM session was taken over too: alice's answer goes out in bob's dialog, from the
    // leader, over the connection it opened to the partner.
    alice
        .send_message("bob@partner.test", "after the kill")
        .await?;
    let m = edge
        .request("MESSAGE")
        .await
        .with_context(|| format!("no MESSAGE in the taken-over session:\n{}", why(&nodes)))?;
    assert_eq!(m.call_id().ok(), Some("tk-im"), "{}", why(&nodes));
    assert_eq!(sip_ua::from_tag(&m), im_tag, "bob's old dialog");
    assert_eq!(sip_ua::body_str(&m), "after the kill");
    edge.respond(&m, 200, "OK", &[], None).await?;

    // The watcher's refresh, sent to the leader in the same dialog, is answered there.
    let mut bob = lync_edge(&certs, &partner, nodes[b].addr("sip_tls")).await?;
    let refreshed = subscribe_in(
        &mut bob,
        "alice@example.test",
        "tk-watch",
        Some(&watch_tag),
        2,
    )
    .await?;
    assert_eq!(
        refreshed.status(),
        Some(200),
        "refresh through the leader:\n{}",
        why(&nodes)
    );
    // And bob's next message in the IM session, sent to the leader, is answered there.
    let b2 = bob.branch();
    bob.send(
        &[
            "MESSAGE sip:alice@example.test SIP/2.0",
            &format!("Via: SIP/2.0/TLS sip.partner.test:5061;branch={b2}"),
            "Max-Forwards: 70",
            "From: <sip:bob@partner.test>;tag=tkim",
            &format!("To: <sip:alice@example.test>;tag={im_tag}"),
            "Call-ID: tk-im",
            "CSeq: 2 MESSAGE",
            "Content-Type: text/plain; charset=UTF-8",
            "Content-Length: {CL}",
        ],
        b"in the old session",
    )
    .await?;
    assert_eq!(bob.response().await?.status(), Some(200), "{}", why(&nodes));
    let m = alice
        .expect_message_from("bob@partner.test", WAIT)
        .await
        .with_context(|| why(&nodes))?;
    assert_eq!(m.body.as_deref(), Some("in the old session"));
    drop(etcd);
    Ok(())
}

/// Issue 12 item 5: the peer link with `cluster.tls_verify = "enforce"`, peers listed by FQDN
/// and found through `cluster.address_map` (no DNS): a MESSAGE through the node that does not
/// hold the link is handed over a verified mutual-TLS connection; a client certificate from
/// the same CA that names no listed peer is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_enforce_the_peer_link_verifies_both_sides_by_name() -> Result<()> {
    const CLUSTER3: &str = "enforce.test";
    let Parts {
        etcd,
        certs,
        ours,
        partner,
        prosody,
    } = parts(45)?;
    let dir = tempfile::tempdir()?;
    let mut nodes = Vec::new();
    for id in ["gw1", "gw2"] {
        let d = dir.path().join(id);
        std::fs::create_dir_all(&d)?;
        let leaf = certs.leaf(&format!("peer-{id}"), &[&format!("{id}.cluster.test")]);
        let mut toml = node_toml(
            CLUSTER3,
            id,
            &d,
            &certs,
            &ours,
            &etcd,
            prosody.component_addr(),
            "127.0.0.1:9".parse()?,
        );
        for p in ["gw1", "gw2"] {
            let port = named_port(&format!("{CLUSTER3}/{p}"));
            toml = toml.replace(
                &format!("address = \"127.0.0.1:{port}\""),
                &format!("address = \"{p}.cluster.test:{port}\""),
            );
        }
        toml = toml
            .replace(
                "[tls]\n",
                &format!(
                    "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
                    leaf.cert.display(),
                    leaf.key.display()
                ),
            )
            .replace(
                &format!("lease_ttl_secs = {TTL_SECS}\n"),
                &format!("lease_ttl_secs = {TTL_SECS}\ntls_verify = \"enforce\"\n"),
            );
        toml.push_str(
            "[cluster.address_map]\n\"gw1.cluster.test\" = \"127.0.0.1\"\n\"gw2.cluster.test\" = \"127.0.0.1\"\n",
        );
        let cfg = d.join("legate.toml");
        std::fs::write(&cfg, toml)?;
        nodes.push(Legate::start(&cfg, &["sip_tls", "cluster"])?);
    }
    let why = |nodes: &[Legate]| why(nodes, &prosody);
    let held_by = agreed_holder(&nodes, &prosody, None).await;
    let n = if held_by == "gw1" { 1 } else { 0 };
    let (mut alice, mut bob) =
        alice_and_bob((&prosody, &certs, &partner), &nodes[n], "here").await?;
    assert_eq!(pager(&mut bob, 1, "verified both ways").await?, Some(200));
    let m = alice
        .expect_message_from("bob@partner.test", WAIT)
        .await
        .with_context(|| why(&nodes))?;
    assert_eq!(m.body.as_deref(), Some("verified both ways"));

    // Same CA, a name that is not a listed peer: refused after the handshake.
    let intruder = certs.leaf("intruder", &["intruder.cluster.test"]);
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let roots = legate::tls::load_trust_bundle(certs.ca_path())?;
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            legate::tls::load_certs(&intruder.cert)?,
            legate::tls::load_private_key(&intruder.key)?,
        )?;
    let name = if n == 0 {
        "gw1.cluster.test"
    } else {
        "gw2.cluster.test"
    };
    assert!(
        !served(nodes[n].addr("cluster").port(), name, cfg).await?,
        "a certificate naming no listed peer was served"
    );
    let metrics = nodes[n].metrics().await?;
    assert!(
        common::legate::metric_value(
            &metrics,
            "legate_cluster_peer_connections_total{outcome=\"refused_certificate\"}"
        )
        .is_some_and(|v| v >= 1.0),
        "{metrics}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_legate"))
        .args([
            "cluster",
            "status",
            "--admin",
            &nodes[n].addr("admin").to_string(),
        ])
        .output()?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("peer link tls: enforce"));
    drop(etcd);
    Ok(())
}

/// IM session ownership (issue 12 item 3): a Lync user opens an IM session through the node
/// that does not hold the component link; the local user's answers come in on the holder,
/// which hands them to the session's owner, so they go out as MESSAGEs inside the partner's
/// own dialog — not as a second session the holder would open (the partner's route here leads
/// nowhere, so a second session could not even be set up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_to_an_im_session_go_out_in_it_from_the_node_that_owns_it() -> Result<()> {
    const CLUSTER4: &str = "sessions.test";
    let Parts {
        etcd,
        certs,
        ours,
        partner,
        prosody,
    } = parts(46)?;
    let dir = tempfile::tempdir()?;
    let nodes = start_nodes(
        CLUSTER4,
        dir.path(),
        &certs,
        &ours,
        &etcd,
        &prosody,
        "127.0.0.1:9".parse()?,
        None,
    )
    .await?;
    let held_by = agreed_holder(&nodes, &prosody, None).await;
    let (h, n) = if held_by == "gw1" { (0, 1) } else { (1, 0) };
    nodes[h]
        .wait_output("the holder's component link", WAIT, |t| {
            t.contains("component partner.test connected")
        })
        .await?;
    let (mut alice, mut bob) =
        alice_and_bob((&prosody, &certs, &partner), &nodes[n], "here").await?;

    let tag = common::rig::invite_im(
        &mut bob,
        "cluster-session-1",
        "cs1",
        "Hello Alice, from Lync",
    )
    .await
    .with_context(|| why(&nodes, &prosody))?;
    let m = alice
        .expect_message_from("bob@partner.test", WAIT)
        .await
        .with_context(|| why(&nodes, &prosody))?;
    assert_eq!(m.body.as_deref(), Some("Hello Alice, from Lync"));

    // The session's owner is in etcd (the holder follows it by watch, milliseconds later).
    let key = format!("/legate/{CLUSTER4}/im/alice@example.test/bob@partner.test");
    let deadline = Instant::now() + WAIT;
    while etcd.count_prefix(&key)? != 1 {
        assert!(
            Instant::now() < deadline,
            "no owner entry {key}:\n{}",
            why(&nodes, &prosody)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    alice.send_message("bob@partner.test", "Hi Bob").await?;
    let reply = bob
        .request("MESSAGE")
        .await
        .with_context(|| format!("no MESSAGE in the session:\n{}", why(&nodes, &prosody)))?;
    assert_eq!(reply.call_id().ok(), Some("cluster-session-1"));
    assert_eq!(sip_ua::from_tag(&reply), tag, "in the partner's dialog");
    assert_eq!(sip_ua::body_str(&reply), "Hi Bob");
    bob.respond(&reply, 200, "OK", &[], None).await?;
    let hands = common::legate::metric_value(
        &nodes[h].metrics().await?,
        "legate_cluster_im_session_hands_total{outcome=\"handed\"}",
    );
    assert!(hands.is_some_and(|v| v >= 1.0), "holder handed {hands:?}");
    // Nothing was sent from the holder toward the partner: no second session.
    let invites = common::legate::metric_value(
        &nodes[h].metrics().await?,
        "legate_sip_requests_total{direction=\"out\",method=\"INVITE\"}",
    );
    assert!(
        invites.is_none_or(|v| v == 0.0),
        "holder sent INVITEs: {invites:?}"
    );

    // The partner's edge sends the next in-dialog requests to the other node (as a partner
    // does when both nodes share one host name): that node hands them to the dialog's owner,
    // told by the mark on its own To tag, and writes the owner's answers back.
    let mut bob_elsewhere =
        common::rig::lync_edge(&certs, &partner, nodes[h].addr("sip_tls")).await?;
    let b = bob_elsewhere.branch();
    bob_elsewhere
        .send(
            &[
                "MESSAGE sip:alice@example.test SIP/2.0",
                &format!("Via: SIP/2.0/TLS sip.partner.test:5061;branch={b}"),
                "Max-Forwards: 70",
                "From: <sip:bob@partner.test>;tag=cs1",
                &format!("To: <sip:alice@example.test>;tag={tag}"),
                "Call-ID: cluster-session-1",
                "CSeq: 2 MESSAGE",
                "Content-Type: text/plain; charset=UTF-8",
                "Content-Length: {CL}",
            ],
            b"through the other node",
        )
        .await?;
    let answer = bob_elsewhere.response().await?;
    assert_eq!(answer.status(), Some(200), "{}", why(&nodes, &prosody));
    let m = alice
        .expect_message_from("bob@partner.test", WAIT)
        .await
        .with_context(|| why(&nodes, &prosody))?;
    assert_eq!(m.body.as_deref(), Some("through the other node"));
    let relayed = |text: &str, d: &str| {
        common::legate::metric_value(
            text,
            &format!("legate_sip_relayed_requests_total{{direction=\"{d}\"}}"),
        )
    };
    assert_eq!(relayed(&nodes[h].metrics().await?, "out"), Some(1.0));
    assert_eq!(relayed(&nodes[n].metrics().await?, "in"), Some(1.0));

    // The partner ends the session (through the other node too): its owner entry goes with it.
    let bob = &mut bob_elsewhere;
    let b = bob.branch();
    bob.send(
        &[
            "BYE sip:alice@example.test SIP/2.0",
            &format!("Via: SIP/2.0/TLS sip.partner.test:5061;branch={b}"),
            "Max-Forwards: 70",
            "From: <sip:bob@partner.test>;tag=cs1",
            &format!("To: <sip:alice@example.test>;tag={tag}"),
            "Call-ID: cluster-session-1",
            "CSeq: 3 BYE",
            "Content-Length: 0",
        ],
        b"",
    )
    .await?;
    assert_eq!(bob.response().await?.status(), Some(200));
    let deadline = Instant::now() + WAIT;
    while etcd.count_prefix(&key)? != 0 {
        assert!(
            Instant::now() < deadline,
            "owner entry {key} outlived the session:\n{}",
            why(&nodes, &prosody)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
