//! Cluster failover through real processes (issue 12): a three-member etcd (Debian
//! `etcd-server`) and three `legate run` nodes on loopback, `cluster.lease_ttl_secs` = TTL
//! (env `TTL`, default 5 as shipped). Each round kills the leader with SIGKILL (no resign: its
//! lease must expire) and measures until a survivor's `/status` says LEADER; then the killed
//! node is started again. Then as many rounds kill the node holding the component link of a
//! home node in this process (one (home node, domain) link, held by one node through the
//! claims) and measure until a survivor's link is up. A last round stops the leader with
//! SIGTERM (resign + revoke) and measures the handover. Before that, configuration
//! replication: each round adds a SIP federated domain to the primary's (gw1) file, sends it SIGHUP and
//! measures until both subordinates' `/status` list the domain. Bounded: `ROUNDS` (default 3)
//! rounds of each, each at most 30 s.
//!
//! `cargo bench --features cluster --bench cluster_failover`

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use support::etcd::{free_port, start_etcd};
use support::Legate;

const NODES: [&str; 3] = ["gw1", "gw2", "gw3"];

fn write_config(
    dir: &Path,
    id: &str,
    endpoints: &[String],
    ttl: u64,
    peer_ports: &[u16],
    home: std::net::SocketAddr,
) -> Result<PathBuf> {
    let d = dir.join(id);
    std::fs::create_dir_all(&d)?;
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    let peers: String = NODES
        .iter()
        .zip(peer_ports)
        .map(|(n, port)| {
            format!("[[cluster.peers]]\nname = \"{n}\"\naddress = \"127.0.0.1:{port}\"\n")
        })
        .collect();
    let cfg = format!(
        "[node]\nid = \"{id}\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{data}\"\n\
         [[local_domain]]\nname = \"example.test\"\n\
         [listeners]\nsip_tls = \"off\"\nsip_tcp = \"off\"\nxmpp_s2s = \"off\"\nxmpp_s2s_direct_tls = \"off\"\n\
         [xmpp.federation]\ndialback_secret = \"bench-dialback-secret-0123\"\n\
         [[sip.federated_domain]]\nname = \"partner.test\"\nsystem = \"lync\"\nroute = \"127.0.0.1:9\"\n\
         [[home_node]]\nname = \"hn1\"\naddresses = [\"{home}\"]\ncomponent_secret = \"bench-component-secret-0123\"\n\
         [cluster]\nname = \"bench.test\"\nprimary = \"gw1\"\nstore = \"etcd\"\netcd_endpoints = [{eps}]\nlease_ttl_secs = {ttl}\n{peers}",
        data = d.join("data").display(),
        eps = eps.join(", "),
    );
    let path = d.join("legate.toml");
    std::fs::write(&path, cfg)?;
    Ok(path)
}

/// Polls every 10 ms (at most 30 s) until a node other than `not` has its component link up;
/// its index.
async fn wait_link_up(nodes: &[Option<Legate>], not: Option<usize>) -> Result<usize> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        for (i, n) in nodes.iter().enumerate() {
            let Some(n) = n.as_ref().filter(|_| Some(i) != not) else {
                continue;
            };
            let Ok(admin) = n.addr("admin") else { continue };
            if support::metrics(admin)
                .await
                .is_ok_and(|m| m.contains("legate_component_links_up 1"))
            {
                return Ok(i);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("no node has the component link up after 30 s")
}

async fn role(l: &Legate) -> Option<(String, String)> {
    let resp = support::get(l.addr("admin").ok()?, "/status").await.ok()?;
    let body = resp.split_once("\r\n\r\n")?.1;
    let doc: serde_json::Value = serde_json::from_str(body).ok()?;
    Some((
        doc["cluster"]["role"].as_str()?.to_owned(),
        doc["cluster"]["node"].as_str()?.to_owned(),
    ))
}

/// Polls every 5 ms (at most 30 s) until every node in `nodes` lists SIP federated domain
/// `domain` in its `/status`.
async fn wait_domain(nodes: &[&Legate], domain: &str) -> Result<()> {
    let t = Instant::now();
    'poll: while t.elapsed() < Duration::from_secs(30) {
        for n in nodes {
            let listed = match support::get(n.addr("admin")?, "/status").await {
                Ok(resp) => resp
                    .split_once("\r\n\r\n")
                    .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(b).ok())
                    .and_then(|doc| doc["sip_federated_domains"].as_array().cloned())
                    .is_some_and(|a| a.iter().any(|d| d == domain)),
                Err(_) => false,
            };
            if !listed {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue 'poll;
            }
        }
        return Ok(());
    }
    bail!("{domain} not replicated within 30 s")
}

/// Polls every 10 ms (at most 30 s) until one of `nodes` other than `not` is LEADER.
async fn wait_leader(nodes: &[Option<Legate>], not: Option<&str>) -> Result<(usize, Duration)> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        for (i, n) in nodes.iter().enumerate() {
            if let Some(n) = n {
                if let Some((r, id)) = role(n).await {
                    if r == "LEADER" && Some(id.as_str()) != not {
                        return Ok((i, t.elapsed()));
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("no leader within 30 s")
}

fn stats(name: &str, v: &mut [Duration]) {
    v.sort();
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    if let (Some(min), Some(max)) = (v.first(), v.last()) {
        println!(
            "{name}: {} rounds, min {:.0} ms, median {:.0} ms, max {:.0} ms",
            v.len(),
            ms(min),
            ms(&v[v.len() / 2]),
            ms(max)
        );
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let ttl: u64 = std::env::var("TTL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir()?;
    let (_etcd, endpoints) = start_etcd(dir.path())?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let peer_ports: Vec<u16> = NODES.iter().map(|_| free_port()).collect::<Result<_>>()?;
    // A home node that takes any component connection; the claims make sure only one node
    // holds the link at a time.
    let home = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let home_addr = home.local_addr()?;
    tokio::spawn(support::home_node(
        home,
        std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        false,
    ));
    let configs: Vec<PathBuf> = NODES
        .iter()
        .map(|id| write_config(dir.path(), id, &endpoints, ttl, &peer_ports, home_addr))
        .collect::<Result<_>>()?;
    let mut nodes: Vec<Option<Legate>> = Vec::new();
    for c in &configs {
        nodes.push(Some(Legate::start(c, &["admin"]).await?));
    }
    let (mut leader, _) = wait_leader(&nodes, None).await?;

    let mut failovers = Vec::new();
    for _ in 0..rounds {
        let old = NODES[leader];
        // SIGKILL: the dead leader's lease must expire (TTL) before another is elected.
        nodes[leader] = None;
        let (next, took) = wait_leader(&nodes, Some(old)).await?;
        println!(
            "killed {old}: {} leads after {} ms",
            NODES[next],
            took.as_millis()
        );
        failovers.push(took);
        nodes[leader] = Some(Legate::start(&configs[leader], &["admin"]).await?);
        leader = next;
    }
    stats(
        &format!("failover after SIGKILL (TTL {ttl} s, bound TTL + 1 s)"),
        &mut failovers,
    );

    // Component-link takeover: SIGKILL of the node holding the link, until a survivor's
    // component connection is up. Between rounds the killed node is started again and the
    // cluster left to settle (a link may be handed back to it after 5 s).
    let mut takeovers = Vec::new();
    for _ in 0..rounds {
        tokio::time::sleep(Duration::from_secs(7)).await;
        let holder = wait_link_up(&nodes, None).await?;
        let old = NODES[holder];
        let t = Instant::now();
        nodes[holder] = None;
        let next = wait_link_up(&nodes, Some(holder)).await?;
        let took = t.elapsed();
        println!(
            "killed {old} (link holder): {} holds the link after {} ms",
            NODES[next],
            took.as_millis()
        );
        takeovers.push(took);
        nodes[holder] = Some(Legate::start(&configs[holder], &["admin"]).await?);
    }
    stats(
        &format!("component-link takeover after SIGKILL (TTL {ttl} s, bound TTL + 1 s)"),
        &mut takeovers,
    );
    let (leader_now, _) = wait_leader(&nodes, None).await?;
    leader = leader_now;

    // Configuration replication from the primary (gw1): a new federated domain per round
    // (last: the new domains' links would change what the takeover rounds count).
    let mut replications = Vec::new();
    for round in 0..rounds {
        let domain = format!("round{round}.partner.test");
        let text = std::fs::read_to_string(&configs[0])?.replace(
            "[[home_node]]",
            &format!(
                "[[sip.federated_domain]]\nname = \"{domain}\"\nsystem = \"lync\"\n\
                 route = \"127.0.0.1:9\"\n[[home_node]]"
            ),
        );
        std::fs::write(&configs[0], text)?;
        let pid = nodes[0].as_ref().map(Legate::pid).unwrap_or(0);
        let t = Instant::now();
        Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()?;
        let subordinates: Vec<&Legate> = nodes[1..].iter().flatten().collect();
        wait_domain(&subordinates, &domain).await?;
        let took = t.elapsed();
        println!(
            "replication: {domain} live on gw2 and gw3 {} ms after SIGHUP of gw1",
            took.as_millis()
        );
        replications.push(took);
    }
    stats(
        "configuration replication, SIGHUP on the primary -> live on both subordinates (bound 1 s)",
        &mut replications,
    );

    let old = NODES[leader];
    let pid = nodes[leader].as_ref().map(Legate::pid).unwrap_or(0);
    let t = Instant::now();
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    let (next, _) = wait_leader(&nodes, Some(old)).await?;
    println!(
        "handover after SIGTERM of {old}: {} leads after {} ms",
        NODES[next],
        t.elapsed().as_millis()
    );
    Ok(())
}
