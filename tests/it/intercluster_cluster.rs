//! Intercluster routing with a multi-node cluster (issue 13 §3 on top of issue 12): cluster A
//! is one node (embedded store) with its own Prosody home node and the s2s edge the foreign
//! server's DNS points at; cluster B is **two** nodes on a real three-member etcd with one
//! Prosody home node. Both serve `example.test` and list each other over mutual TLS.
//!
//! A lists as B's address the B node that does **not** hold B's home-node component link
//! (read from B's `/status` before A's configuration is written; which of b1 and b2 it is
//! follows from their ranks for the link). So what a foreign XMPP user writes to a user of B
//! goes A → the listed node (`Forward`) → the holder (B's peer link) → the home node, and the
//! user's answers come out of the holder's component link. They must leave through A, on the s2s
//! stream the foreign server opened, never on B's own s2s link (which works here: B has DNS
//! for the foreign domain, so a wrong route shows as traffic on it, not as a loss). The same
//! after the link holder is killed (`kill -9`) and the other node takes the link over, and
//! again once the killed node is back (a fresh process, nothing in memory) and, ranked first
//! for the link, takes it back. The second test does the same with a Lync-like SIP edge on A
//! instead of the foreign XMPP server: the answers come back as NOTIFYs and in-dialog
//! MESSAGEs on the partner's connection to A, and B's own SIP route is never used.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::common;
use common::certs::{CertFactory, Leaf};
use common::dnsmasq::Dnsmasq;
use common::etcd::Etcd;
use common::legate::Legate;
use common::metrics::sum as metric_sum;
use common::prosody::{Prosody, ProsodyConfig};
use common::rig::XMPP_TEST_FEDERATION as FEDERATION;
use common::xmpp_client::{ClientConfig, TlsOptions, XmppClient};

const SECRET: &str = "intercluster-multi-component-secret-1";
const WAIT: Duration = Duration::from_secs(20);
const TTL_SECS: u64 = 3;
const B_LISTENERS: [&str; 3] = ["admin", "intercluster", "cluster"];

/// The Lync-like partner, routed to `route` (a listener of the test's).
fn sip_partner(route: SocketAddr) -> String {
    format!(
        "[[sip.federated_domain]]\nname = \"partner.test\"\nsystem = \"lync\"\nroute = \
         \"{route}\"\npresence_format = \"msrtc\"\n"
    )
}

/// How the foreign side reaches cluster A.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Edge {
    /// A foreign XMPP server (`xmpp.test`, user bob) whose DNS points at A's s2s listener.
    Xmpp,
    /// A Lync-like SIP edge (`partner.test`, user bob) connected to A's SIP TLS listener.
    Sip,
}

impl Edge {
    /// The foreign domain: the home nodes' component for it.
    fn domain(self) -> &'static str {
        match self {
            Edge::Xmpp => "xmpp.test",
            Edge::Sip => "partner.test",
        }
    }

    /// The `destination` label of a node's own link toward the foreign side.
    fn own(self) -> &'static str {
        match self {
            Edge::Xmpp => "destination=\"s2s\"",
            Edge::Sip => "destination=\"sip\"",
        }
    }

    /// A's listener for the foreign side.
    fn listener(self) -> &'static str {
        match self {
            Edge::Xmpp => "xmpp_s2s",
            Edge::Sip => "sip_tls",
        }
    }
}

/// One node's configuration. `cluster` is B's `[cluster]` section (empty for A, which keeps
/// the embedded store); `peer` is the address this cluster lists for the other one.
#[allow(clippy::too_many_arguments)]
fn node_config(
    dir: &Path,
    (cluster_name, node_id): (&str, &str),
    leaf: &Leaf,
    certs: &CertFactory,
    home: &Prosody,
    listeners: &str,
    (listen, peer_name, peer): (SocketAddr, &str, SocketAddr),
    more: &str,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("legate.toml");
    std::fs::write(
        &path,
        format!(
            r#"[node]
id = "{node_id}"
sip_host = "{node_id}.example.test"
data_dir = "{data}"
admin_listen = "127.0.0.1:0"
[[local_domain]]
name = "example.test"
cert = "{cert}"
key = "{key}"
[listeners]
sip_tcp = "off"
xmpp_s2s_direct_tls = "off"
{listeners}
[tls]
trust_bundle = "{ca}"
cert = "{cert}"
key = "{key}"
[[home_node]]
name = "hn1"
addresses = ["{home}"]
component_secret = "{SECRET}"
default_system = "xmpp"
{more}
[intercluster]
name = "{cluster_name}"
listen = "{listen}"
transport = "tls"
sync_interval_mins = 1440
[[intercluster.peer]]
name = "{peer_name}"
address = "{peer}"
"#,
            data = dir.display(),
            cert = leaf.cert.display(),
            key = leaf.key.display(),
            ca = certs.ca_path().display(),
            home = home.component_addr(),
        ),
    )?;
    Ok(path)
}

/// The JSON body of `GET path` on `node`'s admin endpoint.
async fn get_json(node: &Legate, path: &str) -> Result<Value> {
    let r = node.http_get(path).await?;
    let body = r.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).with_context(|| format!("GET {path}: {r}"))
}

fn peer<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["intercluster"]["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == name))
        .unwrap_or(&Value::Null)
}

/// Who `node` says holds `link` ("" while not settled).
async fn holder(node: &Legate, link: &str) -> String {
    let Ok(s) = get_json(node, "/status").await else {
        return String::new();
    };
    s["cluster"]["links"]
        .as_array()
        .and_then(|a| a.iter().find(|l| l["link"] == link))
        .and_then(|l| l["holder"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// `legate intercluster ARGS --admin ADDR`: exit code and stdout.
fn cli(node: &Legate, args: &[&str]) -> Result<(i32, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_legate"))
        .arg("intercluster")
        .args(args)
        .arg("--admin")
        .arg(node.addr("admin").to_string())
        .output()
        .context("running legate intercluster")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

const ENVELOPES: &str = "legate_envelopes_total";
/// What a node of B sent from its home node to A.
const TO_A: [&str; 3] = [
    "origin=\"component\"",
    "destination=\"intercluster\"",
    "outcome=\"delivered\"",
];

/// The rig: B's etcd, the home nodes' Prosodys, A and B's two nodes, and the foreign side
/// (XMPP: a Prosody and dnsmasq; SIP: the partner's certificate and the routes of A and B).
struct Rig {
    edge: Edge,
    certs: CertFactory,
    a: Legate,
    /// B's nodes, `[holder of the link, the node A lists]` at start.
    b: Vec<Option<Legate>>,
    b_ids: [&'static str; 2],
    /// Their configuration files, in the same order.
    b_cfgs: [PathBuf; 2],
    _home_a: Prosody,
    home_b: Prosody,
    foreign: Option<Prosody>,
    _dns: Option<Dnsmasq>,
    /// SIP: the partner's certificate, and the routes A and B have for it (never dialled:
    /// answers go out on the partner's own connection to A).
    partner: Option<Leaf>,
    routes: Vec<tokio::net::TcpListener>,
    _etcd: Etcd,
    _dirs: tempfile::TempDir,
}

impl Rig {
    async fn start(block: u8, edge: Edge) -> Result<Rig> {
        let ip = |n: u8| Ipv4Addr::new(127, 0, block, n);
        let free = |n: u8| {
            SocketAddr::new(
                IpAddr::V4(ip(n)),
                common::ports::free_port(IpAddr::V4(ip(n))),
            )
        };
        let etcd = Etcd::start(3).context("B's three-member etcd")?;
        let certs = CertFactory::new();
        // A on .1, B's nodes on .2 and .6; one certificate for B's nodes naming both.
        let (a_ic, b_ic) = (free(1), [free(2), free(6)]);
        let leaf_a = certs.leaf("a", &["example.test", &ip(1).to_string()]);
        let leaf_b = certs.leaf(
            "b",
            &["example.test", &ip(2).to_string(), &ip(6).to_string()],
        );
        let a_edge = free(1);
        let home = |n: u8| {
            Prosody::start(
                ProsodyConfig::new(ip(n))
                    .host("example.test")
                    .user("example.test", "zoe", "pw")
                    .user("example.test", "carol", "pw")
                    .user("example.test", "alice", "pw")
                    .component(edge.domain(), SECRET),
            )
        };
        let (home_a, home_b) = (home(3)?, home(4)?);
        // What A and B say of the foreign side: A has the edge; B has no listener for it but
        // a working way out of its own (DNS for xmpp.test, or a SIP route that is a listener
        // of ours), so an answer routed there is seen, not lost.
        let (a_edge_toml, a_more, b_more, foreign, dns, partner, routes) = match edge {
            Edge::Xmpp => {
                let (foreign, dns) = common::rig::foreign_xmpp(&certs, ip(5), a_edge)?;
                let more = format!("[dns]\nnameservers = [\"{}\"]\n{FEDERATION}", dns.addr());
                (
                    format!("xmpp_s2s = \"{a_edge}\"\nsip_tls = \"off\""),
                    more.clone(),
                    more,
                    Some(foreign),
                    Some(dns),
                    None,
                    Vec::new(),
                )
            }
            Edge::Sip => {
                let partner = certs.leaf("partner", &["partner.test", "sip.partner.test"]);
                let a_route = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let b_route = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                (
                    format!("sip_tls = \"{a_edge}\"\nxmpp_s2s = \"off\""),
                    sip_partner(a_route.local_addr()?),
                    sip_partner(b_route.local_addr()?),
                    None,
                    None,
                    Some(partner),
                    vec![a_route, b_route],
                )
            }
        };
        let dirs = tempfile::tempdir()?;
        let b_ids = ["b1", "b2"];
        // B's cluster name: its store keys and its peer ports, one per test of this process.
        let cluster_b = format!("icmulti-{block}.test");
        let cluster = format!(
            "{b_more}[cluster]\nname = \"{cluster_b}\"\nstore = \"etcd\"\netcd_endpoints = \
             {}\nlease_ttl_secs = {TTL_SECS}\n{}",
            etcd.endpoints_toml(),
            common::ports::cluster_peers_toml(&cluster_b, &b_ids),
        );
        let mut b = Vec::new();
        let mut cfgs = Vec::new();
        for (i, id) in b_ids.iter().enumerate() {
            let cfg = node_config(
                &dirs.path().join(id),
                ("b", id),
                &leaf_b,
                &certs,
                &home_b,
                "sip_tls = \"off\"\nxmpp_s2s = \"off\"",
                (b_ic[i], "a", a_ic),
                &cluster,
            )?;
            b.push(Legate::start(&cfg, &B_LISTENERS)?);
            cfgs.push(cfg);
        }
        // Which B node holds the link, as both say, once settled: the node ranked first for
        // it (a node that claimed it alone hands it over when that one joins), with its
        // component connection up and the other's down.
        let link = format!("hn1/{}", edge.domain());
        let members: Vec<String> = b_ids.iter().map(|s| s.to_string()).collect();
        let first = members
            .iter()
            .find(|m| legate::cluster::claims::rank_of(m, &link, &members) == 0)
            .cloned()
            .context("a first-ranked node of B")?;
        let up = |m: &str| common::legate::metric_value(m, "legate_component_links_up");
        let deadline = tokio::time::Instant::now() + WAIT;
        let h = loop {
            let (h0, h1) = (holder(&b[0], &link).await, holder(&b[1], &link).await);
            let i = b_ids.iter().position(|id| *id == h0);
            if let Some(i) = i.filter(|_| h0 == h1 && h0 == first) {
                let (on_h, on_o) = (up(&b[i].metrics().await?), up(&b[1 - i].metrics().await?));
                if on_h == Some(1.0) && on_o == Some(0.0) {
                    break i;
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "B's nodes do not settle on {first} holding {link} (b1 says {h0:?}, b2 \
                     {h1:?})\n--- b1 ---\n{}\n--- b2 ---\n{}",
                    b[0].output(),
                    b[1].output()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let other = 1 - h;
        // A lists, as B's address, the node that does not hold the link.
        let cfg_a = node_config(
            &dirs.path().join("a"),
            ("a", "a1"),
            &leaf_a,
            &certs,
            &home_a,
            &a_edge_toml,
            (a_ic, "b", b_ic[other]),
            &a_more,
        )?;
        let a = Legate::start(&cfg_a, &["admin", "intercluster", edge.listener()])?;
        let connected = format!("component {} connected to home node hn1", edge.domain());
        a.wait_output("A's component link", WAIT, |t| t.contains(&connected))
            .await?;
        let mut b: Vec<Option<Legate>> = b.into_iter().map(Some).collect();
        if h == 1 {
            b.swap(0, 1);
        }
        let rig = Rig {
            edge,
            certs,
            a,
            b,
            b_ids: [b_ids[h], b_ids[other]],
            b_cfgs: [cfgs[h].clone(), cfgs[other].clone()],
            _home_a: home_a,
            home_b,
            foreign,
            _dns: dns,
            partner,
            routes,
            _etcd: etcd,
            _dirs: dirs,
        };
        rig.wait_a("A's first sync with B (through the node it lists)", |s| {
            peer(s, "b")["in_sync"] == true
        })
        .await?;
        Ok(rig)
    }

    fn link(&self) -> String {
        format!("hn1/{}", self.edge.domain())
    }

    /// What a node prints when it connects the component link.
    fn connected(&self) -> String {
        format!(
            "component {} connected to home node hn1",
            self.edge.domain()
        )
    }

    /// What A sent out toward the foreign side from what B forwarded (B's answers).
    async fn a_out(&self) -> Result<u64> {
        let m = self.a.metrics().await?;
        Ok(metric_sum(
            &m,
            ENVELOPES,
            &[
                "origin=\"intercluster\"",
                self.edge.own(),
                "outcome=\"delivered\"",
            ],
        ))
    }

    /// The node A lists for B (it never holds the link before the kill).
    fn listed(&self) -> &Legate {
        self.b[1].as_ref().expect("the listed node of B runs")
    }

    /// Waits until every running node of B says `id` holds the link and `id`'s component
    /// connection made after `connected_before` of them is up.
    async fn wait_holder(&self, id: &str, node: &Legate, connected_before: usize) -> Result<()> {
        let connected = self.connected();
        node.wait_output(&format!("{id}'s component link"), WAIT, |t| {
            t.matches(&connected).count() > connected_before
        })
        .await
        .with_context(|| self.why(&format!("the link moves to {id}")))?;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let mut said = Vec::new();
            for n in self.b.iter().flatten() {
                said.push(holder(n, &self.link()).await);
            }
            if said.iter().all(|h| h == id) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{}",
                    self.why(&format!(
                        "B's nodes say {said:?} hold {}, not {id}",
                        self.link()
                    ))
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls A's `/status` until `pred` holds (bounded).
    async fn wait_a(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let s = get_json(&self.a, "/status").await?;
            if pred(&s) {
                return Ok(s);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{}",
                    self.why(&format!(
                        "{what}: not seen within {WAIT:?}\nA's intercluster: {:#}",
                        s["intercluster"]
                    ))
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Forces syncs on A until A places `user` in B.
    async fn synced_to_a(&self, user: &str) -> Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let before = peer(&get_json(&self.a, "/status").await?, "b")["syncs"]
                .as_u64()
                .unwrap_or(0);
            let (code, out) = cli(&self.a, &["force-sync", "b"])?;
            anyhow::ensure!(code == 0, "force-sync exited {code}: {out}");
            self.wait_a("the forced sync's end", |s| {
                let p = peer(s, "b");
                p["syncs"].as_u64().unwrap_or(0) > before && p["last_outcome"] != "running"
            })
            .await?;
            let l = get_json(&self.a, &format!("/intercluster/lookup/{user}")).await?;
            if l["cluster"] == "b" {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{}", self.why(&format!("A never placed {user} in B")));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Sum of `labels` in `family` over B's running nodes.
    async fn b_sum(&self, family: &str, labels: &[&str]) -> Result<u64> {
        let mut sum = 0;
        for n in self.b.iter().flatten() {
            sum += metric_sum(&n.metrics().await?, family, labels);
        }
        Ok(sum)
    }

    /// What B's running nodes sent from the home node, and the return paths each keeps.
    async fn b_routes(&self) -> Result<String> {
        let mut m = String::new();
        for (id, n) in self.b_ids.iter().zip(&self.b) {
            if let Some(n) = n {
                let text = n.metrics().await?;
                let lines: Vec<&str> = text
                    .lines()
                    .filter(|l| l.starts_with(ENVELOPES) && l.contains("origin=\"component\""))
                    .filter(|l| !l.ends_with(" 0"))
                    .collect();
                let paths = get_json(n, "/status").await?["intercluster"]["return_paths"].clone();
                m.push_str(&format!(
                    "--- {id} (return paths it keeps: {paths}) ---\n{}\n",
                    lines.join("\n")
                ));
            }
        }
        Ok(m)
    }

    /// `r`, or its error with where B sent its user's answers and every process's output.
    async fn check<T>(&self, step: &str, r: Result<T>) -> Result<T> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                let routes = self.b_routes().await.unwrap_or_else(|e| e.to_string());
                Err(e.context(self.why(&format!("{step}\n{routes}"))))
            }
        }
    }

    /// B sent nothing on its own link toward the foreign side: every answer went to A.
    async fn nothing_on_bs_own_link(&self, step: &str) -> Result<()> {
        let own = self
            .b_sum(ENVELOPES, &["origin=\"component\"", self.edge.own()])
            .await?;
        if own != 0 {
            bail!(
                "{}",
                self.why(&format!(
                    "{step}: B sent {own} of its user's answers on its own link ({}) instead \
                     of back through A (the node holding the component link did not find the \
                     return path that A's Forward left on the node A lists)\n{}",
                    self.edge.own(),
                    self.b_routes().await?
                ))
            );
        }
        Ok(())
    }

    /// Nothing dialled the partner's routes (SIP): A answered on the partner's connection, B
    /// never went out on its own.
    async fn no_route_dialled(&self) -> Result<()> {
        for (who, route) in ["A", "B"].iter().zip(&self.routes) {
            let dialled = tokio::time::timeout(Duration::from_millis(300), route.accept()).await;
            if dialled.is_ok() {
                bail!(
                    "{}",
                    self.why(&format!(
                        "{who} dialled the partner's route: answers did not go out on the \
                         partner's connection to A\n{}",
                        self.b_routes().await?
                    ))
                );
            }
        }
        Ok(())
    }

    /// `user`, logged in on B's home node, available with `status`.
    async fn user_of_b(&self, user: &str, status: Option<&str>) -> Result<XmppClient> {
        let mut c = XmppClient::connect(ClientConfig::plain(
            self.home_b.c2s_addr(),
            "example.test",
            user,
            "pw",
        ))
        .await?;
        c.send_presence(None, status).await?;
        Ok(c)
    }

    /// Pins `user` on B's home node (through the node that holds the link) and waits until
    /// A places `user` in B.
    async fn pin_in_b(&self, user: &str) -> Result<()> {
        let node = self.b[0].as_ref().context("B's holder")?;
        let (code, out) = cli(node, &["users", "add", user, "hn1"])?;
        anyhow::ensure!(code == 0, "users add {user}: {out}");
        self.synced_to_a(user).await
    }

    /// The SIP partner's edge, connected to A's SIP TLS listener.
    async fn sip_bob(&self) -> Result<crate::sip_ua::Ua> {
        let partner = self.partner.as_ref().context("the SIP rig's partner")?;
        common::rig::lync_edge(&self.certs, partner, self.a.addr("sip_tls")).await
    }

    /// bob, logged in on the foreign server over TLS, available.
    async fn bob(&self) -> Result<XmppClient> {
        let foreign = self
            .foreign
            .as_ref()
            .context("the XMPP rig's foreign server")?;
        let mut cc = ClientConfig::plain(foreign.c2s_addr(), "xmpp.test", "bob", "pw");
        cc.tls = Some(TlsOptions {
            ca_pem: self.certs.ca_pem().as_bytes().to_vec(),
            server_name: "xmpp.test".into(),
        });
        let mut b = XmppClient::connect(cc).await.context("bob logs in")?;
        b.send_presence(None, None).await?;
        Ok(b)
    }

    fn why(&self, what: &str) -> String {
        let mut s = format!("{what}\n--- A ---\n{}\n", self.a.output());
        for (id, n) in self.b_ids.iter().zip(&self.b) {
            match n {
                Some(n) => s.push_str(&format!("--- {id} ---\n{}\n", n.output())),
                None => s.push_str(&format!("--- {id} (killed) ---\n")),
            }
        }
        s.push_str(&format!("--- B's prosody ---\n{}", self.home_b.log()));
        s
    }
}

/// `a` subscribes to `b` and `b` approves; `a` then sees `b`'s presence.
async fn subscribe_and_approve(a: &mut XmppClient, b: &mut XmppClient) -> Result<()> {
    let (a_jid, b_jid) = (a.bare_jid().to_owned(), b.bare_jid().to_owned());
    a.subscribe(&b_jid).await?;
    b.expect_presence_from(&a_jid, Some("subscribe"), WAIT)
        .await
        .with_context(|| format!("{a_jid}'s subscription request reaches {b_jid}"))?;
    b.approve(&a_jid).await?;
    a.expect_presence_from(&b_jid, Some("subscribed"), WAIT)
        .await
        .with_context(|| format!("{b_jid}'s approval reaches {a_jid}"))?;
    a.expect_presence_from(&b_jid, None, WAIT)
        .await
        .with_context(|| format!("{b_jid}'s presence reaches {a_jid}"))?;
    Ok(())
}

/// Kills B's link holder (`kill -9`, by PID) and waits until the node A lists holds the link.
async fn kill_the_holder(rig: &mut Rig) -> Result<()> {
    let listed_id = rig.b_ids[1];
    let connected_before = rig.listed().output().matches(&rig.connected()).count();
    if let Some(mut h) = rig.b[0].take() {
        h.kill();
    }
    rig.wait_holder(listed_id, rig.listed(), connected_before)
        .await
}

/// Starts the killed holder again (same configuration and data directory: a fresh process,
/// nothing in memory) and waits until it, ranked first, holds the link again.
async fn restart_the_holder(rig: &mut Rig) -> Result<()> {
    let restarted = Legate::start(&rig.b_cfgs[0], &B_LISTENERS)?;
    rig.b[0] = Some(restarted);
    let back = rig.b[0].as_ref().context("the restarted node")?;
    rig.wait_holder(rig.b_ids[0], back, 0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_of_a_user_of_a_two_node_cluster_go_back_through_a_also_after_a_link_takeover(
) -> Result<()> {
    let mut rig = Rig::start(11, Edge::Xmpp).await?;
    let (holder_id, listed_id) = (rig.b_ids[0], rig.b_ids[1]);
    // carol lives in B (pinned by B's admin) and A learns it.
    rig.pin_in_b("carol@example.test").await?;
    let mut carol = rig.user_of_b("carol", None).await?;
    let mut bob = rig.bob().await?;

    // Presence both ways: bob ⇄ carol, each subscribing and approving.
    let r = subscribe_and_approve(&mut bob, &mut carol).await;
    rig.check("bob subscribes to carol", r).await?;
    rig.nothing_on_bs_own_link("carol's approval and presence")
        .await?;
    let r = subscribe_and_approve(&mut carol, &mut bob).await;
    rig.check("carol subscribes to bob", r).await?;
    rig.nothing_on_bs_own_link("carol's subscription").await?;

    // IM both ways.
    bob.send_message("carol@example.test", "hello carol, from xmpp.test")
        .await?;
    let r = carol.expect_message_from("bob@xmpp.test", WAIT).await;
    let m = rig.check("bob's message reaches carol", r).await?;
    assert_eq!(m.body.as_deref(), Some("hello carol, from xmpp.test"));
    carol
        .send_message("bob@xmpp.test", "hi bob, from B")
        .await?;
    let r = bob.expect_message_from("carol@example.test", WAIT).await;
    let m = rig.check("carol's answer reaches bob", r).await?;
    assert_eq!(m.body.as_deref(), Some("hi bob, from B"));
    rig.nothing_on_bs_own_link("carol's message").await?;

    // Which way it went: bob's traffic entered B on the node A lists and was handed to the
    // holder; carol's came out of the holder's component link and went to A, which sent it out
    // on its s2s stream.
    let ma = rig.a.metrics().await?;
    let mh = rig.b[0].as_ref().context("B's holder")?.metrics().await?;
    let ml = rig.listed().metrics().await?;
    assert!(
        metric_sum(&mh, ENVELOPES, &TO_A) >= 4,
        "the holder {holder_id} sends carol's answers (subscribed, presence, subscribe, message) \
         to A: {mh}"
    );
    assert!(
        metric_sum(
            &ml,
            ENVELOPES,
            &["origin=\"intercluster\"", "outcome=\"delivered\""]
        ) >= 4,
        "{listed_id} takes what A forwards: {ml}"
    );
    let a_out = rig.a_out().await?;
    assert!(
        a_out >= 4,
        "A sends carol's answers out on its s2s link: {ma}"
    );
    let fwd = "legate_intercluster_forwarded_total";
    assert!(metric_sum(&ma, fwd, &["direction=\"out\"", "outcome=\"delivered\""]) >= 4);
    assert!(metric_sum(&ma, fwd, &["direction=\"in\"", "outcome=\"delivered\""]) >= 4);
    assert_eq!(metric_sum(&ma, fwd, &["outcome=\"failed\""]), 0, "{ma}");

    // --- The holder dies (kill -9); the node A lists takes the link over. -------------------
    kill_the_holder(&mut rig).await?;
    // carol speaks first after the takeover (bob wrote nothing since): her presence and a
    // message still leave through A.
    carol
        .send_presence(Some("dnd"), Some("after the takeover"))
        .await?;
    let r = bob
        .next_stanza_matching(
            |s| {
                s.name == "presence"
                    && s.sender_bare() == Some("carol@example.test")
                    && s.type_.is_none()
                    && s.show.as_deref() == Some("dnd")
            },
            WAIT,
        )
        .await;
    let p = rig
        .check("carol's presence after the takeover reaches bob", r)
        .await?;
    assert!(p.raw.contains("after the takeover"), "{}", p.raw);
    carol
        .send_message("bob@xmpp.test", "still here, after the takeover")
        .await?;
    let r = bob.expect_message_from("carol@example.test", WAIT).await;
    let m = rig
        .check("carol's message after the takeover reaches bob", r)
        .await?;
    assert_eq!(m.body.as_deref(), Some("still here, after the takeover"));
    // And bob's answer reaches her through A and the survivor's own link.
    bob.send_message("carol@example.test", "good to hear")
        .await?;
    let r = carol.expect_message_from("bob@xmpp.test", WAIT).await;
    let m = rig
        .check("bob's message after the takeover reaches carol", r)
        .await?;
    assert_eq!(m.body.as_deref(), Some("good to hear"));
    rig.nothing_on_bs_own_link("carol's answers after the takeover")
        .await?;
    let ma = rig.a.metrics().await?;
    assert!(
        rig.a_out().await? >= a_out + 2,
        "A sent carol's presence and message out after the takeover: {ma}"
    );
    let ml = rig.listed().metrics().await?;
    assert!(
        metric_sum(&ml, ENVELOPES, &TO_A) >= 2,
        "the survivor {listed_id} sends carol's answers to A: {ml}"
    );

    // --- The killed node comes back and, ranked first for the link, takes it back: a fresh
    // process, with nothing in memory. carol's answers still leave through A.
    restart_the_holder(&mut rig).await?;
    let a_before = rig.a_out().await?;
    carol
        .send_presence(None, Some("back on the first node"))
        .await?;
    let r = bob
        .next_stanza_matching(
            |s| {
                s.name == "presence"
                    && s.sender_bare() == Some("carol@example.test")
                    && s.type_.is_none()
                    && s.raw.contains("back on the first node")
            },
            WAIT,
        )
        .await;
    let p = rig
        .check("carol's presence after the hand-back reaches bob", r)
        .await?;
    assert_eq!(p.show, None, "{}", p.raw);
    carol
        .send_message("bob@xmpp.test", "from the restarted holder")
        .await?;
    let r = bob.expect_message_from("carol@example.test", WAIT).await;
    let m = rig
        .check("carol's message after the hand-back reaches bob", r)
        .await?;
    assert_eq!(m.body.as_deref(), Some("from the restarted holder"));
    rig.nothing_on_bs_own_link("carol's answers through the restarted holder")
        .await?;
    let ma = rig.a.metrics().await?;
    assert!(
        rig.a_out().await? >= a_before + 2,
        "A sent carol's presence and message out after the hand-back: {ma}"
    );
    Ok(())
}

/// The same with a Lync-like SIP edge: bob@partner.test talks to A's SIP edge only; alice lives
/// in B. His SUBSCRIBE and IM session reach her through A → the node A lists → the holder of
/// B's `partner.test` link; what she answers (approval, presence, messages) comes back as
/// NOTIFYs and in-dialog MESSAGEs on his connection to A, before and after the holder is
/// killed, and after it is back. Neither A nor B ever dials the partner's route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lync_user_reaches_a_user_of_a_two_node_cluster_and_answers_come_back_in_his_dialogs(
) -> Result<()> {
    use crate::sip_ua::body_str;
    use common::rig::{invite_im, notify_until, subscribe};
    let mut rig = Rig::start(12, Edge::Sip).await?;
    rig.pin_in_b("alice@example.test").await?;
    let mut alice = rig.user_of_b("alice", Some("in region B")).await?;
    let mut bob = rig.sip_bob().await?;

    // The watcher subscribes through A; alice approves on B.
    let ok = subscribe(&mut bob, "alice@example.test", "icm-sub-1").await?;
    assert_eq!(ok.status(), Some(200), "{}", rig.why("SUBSCRIBE"));
    let n = bob.request("NOTIFY").await?;
    bob.respond(&n, 200, "OK", &[], None).await?;
    let r = alice
        .expect_presence_from("bob@partner.test", Some("subscribe"), WAIT)
        .await;
    rig.check("the SUBSCRIBE reaches alice on B", r).await?;
    alice.approve("bob@partner.test").await?;
    // msrtc 3500: available, with alice's text, in the dialog A holds.
    let r = notify_until(&mut bob, "alice available", |b| b.contains(">3500<")).await;
    let body = rig.check("alice's presence as a NOTIFY", r).await?;
    assert!(body.contains("in region B"), "{body}");
    rig.nothing_on_bs_own_link("alice's presence").await?;

    // IM: a session opened on A, answered by alice on B, inside the same dialog.
    let r = invite_im(&mut bob, "icm-im-1", "icmim1", "Hello Alice in B").await;
    rig.check("INVITE", r).await?;
    let r = alice.expect_message_from("bob@partner.test", WAIT).await;
    let m = rig.check("the first message reaches alice", r).await?;
    assert_eq!(m.body.as_deref(), Some("Hello Alice in B"));
    alice
        .send_message("bob@partner.test", "Hi Bob, from B")
        .await?;
    let r = bob.request("MESSAGE").await;
    let m = rig.check("alice's answer as a MESSAGE", r).await?;
    assert_eq!(m.call_id().ok(), Some("icm-im-1"), "in bob's session");
    assert_eq!(body_str(&m), "Hi Bob, from B");
    bob.respond(&m, 200, "OK", &[], None).await?;
    rig.nothing_on_bs_own_link("alice's message").await?;
    let a_out = rig.a_out().await?;
    assert!(a_out >= 2, "A sent alice's answers out: {a_out}");

    // --- The holder dies; the node A lists takes the link over. ------------------------------
    kill_the_holder(&mut rig).await?;
    alice
        .send_presence(Some("dnd"), Some("busy after the takeover"))
        .await?;
    let r = notify_until(&mut bob, "alice busy", |b| b.contains(">6500<")).await;
    let body = rig
        .check("alice's dnd after the takeover as a NOTIFY", r)
        .await?;
    assert!(body.contains("busy after the takeover"), "{body}");
    alice
        .send_message("bob@partner.test", "still here, after the takeover")
        .await?;
    let r = bob.request("MESSAGE").await;
    let m = rig
        .check("alice's message after the takeover as a MESSAGE", r)
        .await?;
    assert_eq!(m.call_id().ok(), Some("icm-im-1"), "in bob's session");
    assert_eq!(body_str(&m), "still here, after the takeover");
    bob.respond(&m, 200, "OK", &[], None).await?;
    rig.nothing_on_bs_own_link("alice's answers after the takeover")
        .await?;

    // --- The killed node is back and holds the link again (nothing in memory). --------------
    restart_the_holder(&mut rig).await?;
    alice
        .send_presence(None, Some("back on the first node"))
        .await?;
    let r = notify_until(&mut bob, "alice available again", |b| {
        b.contains(">3500<") && b.contains("back on the first node")
    })
    .await;
    rig.check("alice's presence after the hand-back as a NOTIFY", r)
        .await?;
    alice
        .send_message("bob@partner.test", "from the restarted holder")
        .await?;
    let r = bob.request("MESSAGE").await;
    let m = rig
        .check("alice's message after the hand-back as a MESSAGE", r)
        .await?;
    assert_eq!(m.call_id().ok(), Some("icm-im-1"), "in bob's session");
    assert_eq!(body_str(&m), "from the restarted holder");
    bob.respond(&m, 200, "OK", &[], None).await?;
    rig.nothing_on_bs_own_link("alice's answers through the restarted holder")
        .await?;
    rig.no_route_dialled().await?;
    assert!(
        rig.a_out().await? >= a_out + 4,
        "A sent alice's answers after the takeover and the hand-back out"
    );
    Ok(())
}
