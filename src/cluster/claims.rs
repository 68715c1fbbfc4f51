//! Component-link claims: which live node holds each (home node, foreign domain) connection
//! (issue 12 item 2).
//!
//! A home node such as Prosody accepts one connection per component, so exactly one node may
//! hold each link. etcd decides, with no protocol of our own:
//! - the holder of a link is the value of `links/<home node>/<domain>`, written under the
//!   holder's member lease with a transaction that succeeds only while the key does not exist
//!   (`create_revision == 0`): two nodes claiming at once cannot both win;
//! - a node that dies loses its lease one TTL after its last keep-alive; etcd deletes its keys,
//!   every node watching the prefix sees the deletion, and a survivor claims the link at once.
//!   Takeover therefore takes the lease TTL plus a watch round trip and a connection;
//! - claims spread evenly: for each link, the live federation members are ranked by
//!   rendezvous hashing on (node, link); the first claims at once, the next after
//!   [`RANK_DELAY`], and so on, so the same node wins each time and the others only step in
//!   when it does not;
//! - a node that gets a new lease (after etcd was unreachable) writes its claims again under it;
//!   one whose claims expired meanwhile finds another holder and gives the link up;
//! - while this node is detached from etcd it keeps the links it holds: traffic keeps flowing
//!   on what was settled (the "losing quorum ... traffic keeps flowing").
//!
//! - a node that joins gets its share: a holder gives up each link whose first-ranked node
//!   has been live for [`SETTLED`], and that node claims it (`hand_back`).

use crate::store::etcd::{kv_get, kv_txn, open_watch, watch_changes};
use crate::store::StoreError;
use crate::xmpp::link::placement::Holder;
use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};

use super::Cluster;

/// Pause between ranks: a node ranked `n` for a link claims it `n × RANK_DELAY` after it
/// became free, unless a better-ranked node did first.
pub const RANK_DELAY: Duration = Duration::from_millis(400);
/// How often a holder checks whether a link belongs to a node that joined.
const REBALANCE_EVERY: Duration = Duration::from_secs(1);
/// How long the first-ranked node must have been a member before a link is handed to it
/// (a node that flaps does not pull links back and forth).
const SETTLED: Duration = Duration::from_secs(5);
/// Pause before listing again after the watch or etcd failed.
const RETRY: Duration = Duration::from_millis(500);

/// The claims of one node: what it follows, and the holder of each.
#[derive(Clone)]
pub struct Claims {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    /// `/legate/<cluster>/links/`
    prefix: String,
    me: Arc<str>,
    cluster: Cluster,
    /// Followed links by key suffix (`<home node>/<domain>`).
    links: Mutex<HashMap<String, watch::Sender<Holder>>>,
    /// A link was followed for the first time.
    added: Notify,
}

impl Claims {
    /// Starts the claims task of this node (it ends at shutdown).
    pub fn start(
        client: Client,
        cluster_name: &str,
        cluster: Cluster,
        shutdown: watch::Receiver<bool>,
    ) -> Claims {
        let me: Arc<str> = Arc::from(cluster.node_id());
        let claims = Claims {
            inner: Arc::new(Inner {
                client,
                prefix: format!("/legate/{cluster_name}/links/"),
                me,
                cluster,
                links: Mutex::new(HashMap::new()),
                added: Notify::new(),
            }),
        };
        tokio::spawn(claims.clone().run(shutdown));
        claims
    }

    /// This node's id.
    pub fn me(&self) -> &Arc<str> {
        &self.inner.me
    }

    /// Follows the holder of (home node, domain).
    pub fn follow(&self, home_node: &str, domain: &str) -> watch::Receiver<Holder> {
        let key = format!("{home_node}/{domain}");
        let Ok(mut links) = self.inner.links.lock() else {
            return watch::channel(Holder::Unknown).1;
        };
        if let Some(tx) = links.get(&key) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(Holder::Unknown);
        links.insert(key, tx);
        drop(links);
        self.inner.added.notify_one();
        rx
    }

    /// Whether this node holds (home node, domain) now.
    pub fn holds(&self, home_node: &str, domain: &str) -> bool {
        let key = format!("{home_node}/{domain}");
        self.inner
            .links
            .lock()
            .ok()
            .and_then(|l| l.get(&key).map(|tx| *tx.borrow() == Holder::Me))
            .unwrap_or(false)
    }

    /// Every followed link and its holder (node id; empty when not settled), for `/status`.
    pub fn snapshot(&self) -> Vec<(String, String)> {
        let me = self.inner.me.to_string();
        let mut v: Vec<(String, String)> = self
            .inner
            .links
            .lock()
            .map(|l| {
                l.iter()
                    .map(|(k, tx)| {
                        let h = match &*tx.borrow() {
                            Holder::Me => me.clone(),
                            Holder::Peer(p) => p.to_string(),
                            Holder::Unknown => String::new(),
                        };
                        (k.clone(), h)
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn set(&self, key: &str, holder: Holder) {
        if let Ok(links) = self.inner.links.lock() {
            if let Some(tx) = links.get(key) {
                tx.send_if_modified(|h| {
                    if *h == holder {
                        return false;
                    }
                    tracing::info!(link = key, from = ?h, to = ?holder, "component link holder changed");
                    *h = holder.clone();
                    true
                });
            }
        }
    }

    fn holder_of(&self, key: &str) -> Option<Holder> {
        self.inner
            .links
            .lock()
            .ok()
            .and_then(|l| l.get(key).map(|tx| tx.borrow().clone()))
    }

    fn keys(&self) -> Vec<String> {
        self.inner
            .links
            .lock()
            .map(|l| l.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn holder_from_value(&self, value: &[u8]) -> Holder {
        match std::str::from_utf8(value) {
            Ok(v) if v == &*self.inner.me => Holder::Me,
            Ok(v) if !v.is_empty() => Holder::Peer(Arc::from(v)),
            _ => Holder::Unknown,
        }
    }

    /// Lists, claims, then follows the watch until it breaks or the lease changes; again.
    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut lease_rx = self.inner.cluster.watch_lease();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let lease = *lease_rx.borrow_and_update();
            let Some(lease) = lease else {
                // Detached: keep what is settled until a new lease comes.
                tokio::select! {
                    _ = lease_rx.changed() => continue,
                    _ = shutdown.changed() => return,
                }
            };
            let end = tokio::select! {
                r = self.term(lease) => r,
                _ = lease_rx.changed() => Ok(()),
                _ = shutdown.changed() => return,
            };
            if let Err(e) = end {
                tracing::debug!(error = %e, "component-link claims: etcd failed; listing again");
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }

    /// One pass on `lease`: returns when the watch breaks (Err) — the caller lists again.
    async fn term(&self, lease: i64) -> Result<(), StoreError> {
        let listing = kv_get(
            &self.inner.client,
            self.inner.prefix.clone(),
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
        let revision = listing.header().map_or(0, |h| h.revision());
        let mut present: HashMap<String, Holder> = HashMap::new();
        for kv in listing.kvs() {
            if let Some(k) = kv
                .key_str()
                .ok()
                .and_then(|k| k.strip_prefix(&self.inner.prefix))
            {
                present.insert(k.to_string(), self.holder_from_value(kv.value()));
            }
        }
        // Ours from an earlier lease: written again under this one (a no-op when unchanged).
        for (k, h) in &present {
            if *h == Holder::Me {
                self.reclaim(k, lease).await?;
            }
        }
        // `due`: links without a holder, and when this node may claim each.
        let mut due: HashMap<String, tokio::time::Instant> = HashMap::new();
        for k in self.keys() {
            match present.get(&k) {
                Some(h) => self.set(&k, h.clone()),
                None => {
                    self.set(&k, Holder::Unknown);
                    due.insert(k.clone(), self.when_to_claim(&k));
                }
            }
        }
        let mut stream = open_watch(&self.inner.client, &self.inner.prefix, revision + 1).await?;
        let mut rebalance = tokio::time::interval(REBALANCE_EVERY);
        rebalance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = due.values().min().copied();
            tokio::select! {
                msg = stream.message() => {
                    for (k, value) in watch_changes(msg, &self.inner.prefix, "claims")? {
                        match value {
                            Some(v) => {
                                due.remove(&k);
                                self.set(&k, self.holder_from_value(&v));
                            }
                            None => {
                                if let Some(was) = self.holder_of(&k) {
                                    self.set(&k, Holder::Unknown);
                                    // The holder whose claim just ended is gone (or leaving):
                                    // ranking it would make the next node wait for nobody.
                                    let gone = match &was {
                                        Holder::Peer(p) => Some(p.as_ref()),
                                        _ => None,
                                    };
                                    let at = self.when_to_claim_without(&k, gone);
                                    due.insert(k, at);
                                }
                            }
                        }
                    }
                }
                _ = self.inner.added.notified() => {
                    // A newly followed link: settle it from etcd (present, or to be claimed).
                    for k in self.keys() {
                        if self.holder_of(&k) == Some(Holder::Unknown) && !due.contains_key(&k) {
                            let at = self.when_to_claim(&k);
                            due.insert(k, at);
                        }
                    }
                }
                _ = rebalance.tick() => self.hand_back().await?,
                _ = sleep_opt(next) => {
                    let now = tokio::time::Instant::now();
                    let ready: Vec<String> = due.iter().filter(|(_, t)| **t <= now).map(|(k, _)| k.clone()).collect();
                    for k in ready {
                        due.remove(&k);
                        if self.holder_of(&k) == Some(Holder::Unknown) {
                            self.claim(&k, lease).await?;
                        }
                    }
                }
            }
        }
    }

    /// When this node may claim the free link `key`: at once for the node ranked first for it
    /// among the live federation members, [`RANK_DELAY`] later per rank for the others.
    fn when_to_claim(&self, key: &str) -> tokio::time::Instant {
        self.when_to_claim_without(key, None)
    }

    /// [`Self::when_to_claim`], leaving node `gone` out of the ranking.
    fn when_to_claim_without(&self, key: &str, gone: Option<&str>) -> tokio::time::Instant {
        let mut members = self.inner.cluster.federation_members();
        members.retain(|m| Some(m.as_str()) != gone);
        let rank = rank_of(&self.inner.me, key, &members);
        tokio::time::Instant::now() + RANK_DELAY * rank
    }

    /// Claims `key` if nobody holds it; either way, learns who does.
    async fn claim(&self, key: &str, lease: i64) -> Result<(), StoreError> {
        let full = format!("{}{key}", self.inner.prefix);
        let txn = Txn::new()
            .when([Compare::create_revision(full.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                full.clone(),
                self.inner.me.as_bytes().to_vec(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(full, None)]);
        let resp = kv_txn(&self.inner.client, txn).await?;
        if resp.succeeded() {
            CLAIMS.with_label_values(&["won"]).inc();
            tracing::info!(link = key, "component link claimed: this node holds it");
            self.set(key, Holder::Me);
        } else if let Some(h) = first_value(&resp) {
            let h = self.holder_from_value(&h);
            self.set(key, h);
        }
        Ok(())
    }

    /// Gives up each link this node holds whose first-ranked node is live and has been for
    /// [`SETTLED`]: a node that joins (or comes back) gets its share of the links, so the
    /// links — and the outbound traffic of each — spread over the live federation nodes.
    /// The claim is deleted only while it is still ours; the first-ranked node claims at once
    /// and this node, ranked lower, would only step in if it did not.
    async fn hand_back(&self) -> Result<(), StoreError> {
        let Some(status) = self.inner.cluster.status() else {
            return Ok(());
        };
        let now = super::unix_now();
        let members = self.inner.cluster.federation_members();
        for key in self.keys() {
            if self.holder_of(&key) != Some(Holder::Me) {
                continue;
            }
            let Some(first) = members.iter().find(|m| rank_of(m, &key, &members) == 0) else {
                continue;
            };
            if first.as_str() == &*self.inner.me {
                continue;
            }
            let settled = status
                .members
                .iter()
                .find(|m| &m.id == first)
                .is_some_and(|m| now.saturating_sub(m.since) >= SETTLED.as_secs());
            if !settled {
                continue;
            }
            let full = format!("{}{key}", self.inner.prefix);
            let txn = Txn::new()
                .when([Compare::value(
                    full.clone(),
                    CompareOp::Equal,
                    self.inner.me.as_bytes().to_vec(),
                )])
                .and_then([TxnOp::delete(full, None)]);
            if kv_txn(&self.inner.client, txn).await?.succeeded() {
                CLAIMS.with_label_values(&["handed_back"]).inc();
                tracing::info!(link = %key, to = %first, "component link handed over to the node ranked first for it");
            }
        }
        Ok(())
    }

    /// Writes our claim on `key` again under `lease` if it is still ours.
    async fn reclaim(&self, key: &str, lease: i64) -> Result<(), StoreError> {
        let full = format!("{}{key}", self.inner.prefix);
        let txn = Txn::new()
            .when([Compare::value(
                full.clone(),
                CompareOp::Equal,
                self.inner.me.as_bytes().to_vec(),
            )])
            .and_then([TxnOp::put(
                full,
                self.inner.me.as_bytes().to_vec(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        kv_txn(&self.inner.client, txn).await.map(|_| ())
    }
}

/// The value of the first key a failed transaction's `get` returned.
fn first_value(resp: &etcd_client::TxnResponse) -> Option<Vec<u8>> {
    resp.op_responses().into_iter().find_map(|op| match op {
        etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
        _ => None,
    })
}

/// Position of `me` among `members` ranked by rendezvous hashing on (member, link): every
/// node computes the same order from the same member list, and removing one member moves only
/// the links it ranked first for. A node not in the list ranks last.
pub fn rank_of(me: &str, key: &str, members: &[String]) -> u32 {
    let score = |m: &str| fnv1a(m.as_bytes(), fnv1a(key.as_bytes(), FNV_OFFSET));
    let mine = score(me);
    if !members.iter().any(|m| m == me) {
        return u32::try_from(members.len()).unwrap_or(u32::MAX);
    }
    let better = members
        .iter()
        .filter(|m| m.as_str() != me)
        .filter(|m| {
            let s = score(m);
            s > mine || (s == mine && m.as_str() < me)
        })
        .count();
    u32::try_from(better).unwrap_or(u32::MAX)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a, seeded: stable across builds and platforms (std's hasher is not).
fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut h = seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // A final mix so that similar node names do not rank alike for every link.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

async fn sleep_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

static CLAIMS: std::sync::LazyLock<prometheus::IntCounterVec> = std::sync::LazyLock::new(|| {
    crate::metrics::counter_vec(
        "legate_cluster_link_claims_total",
        "Component links this node claimed (won: it holds the link from then on) or gave to \
         the node ranked first for them once it had joined (handed_back)",
        &["outcome"],
    )
});

/// Creates the claims' metric family at start.
pub fn register_metrics() {
    CLAIMS.with_label_values(&["won"]);
    CLAIMS.with_label_values(&["handed_back"]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("gw{i}")).collect()
    }

    #[test]
    fn every_link_has_exactly_one_first_ranked_node() {
        let m = members(3);
        for i in 0..200 {
            let key = format!("hn{}/partner{i}.example", i % 3);
            let mut ranks: Vec<u32> = m.iter().map(|me| rank_of(me, &key, &m)).collect();
            ranks.sort_unstable();
            assert_eq!(ranks, [0, 1, 2], "{key}");
        }
    }

    #[test]
    fn links_spread_over_the_nodes() {
        let m = members(3);
        let mut firsts = HashMap::new();
        for i in 0..300 {
            let key = format!("hn1/d{i}.example");
            let first = m.iter().find(|me| rank_of(me, &key, &m) == 0).cloned();
            *firsts.entry(first).or_insert(0) += 1;
        }
        for me in &m {
            let n = firsts.get(&Some(me.clone())).copied().unwrap_or(0);
            assert!((60..=140).contains(&n), "{me} ranks first for {n} of 300");
        }
    }

    #[test]
    fn a_node_leaving_moves_only_its_own_links() {
        let three = members(3);
        let two: Vec<String> = three.iter().filter(|m| *m != "gw3").cloned().collect();
        for i in 0..200 {
            let key = format!("hn1/d{i}.example");
            let before = three.iter().find(|me| rank_of(me, &key, &three) == 0);
            let after = two.iter().find(|me| rank_of(me, &key, &two) == 0);
            if before.map(String::as_str) != Some("gw3") {
                assert_eq!(before, after, "{key}");
            }
        }
    }

    #[test]
    fn a_node_outside_the_list_ranks_last() {
        let m = members(2);
        assert_eq!(rank_of("mgmt", "hn1/x.example", &m), 2);
        assert_eq!(rank_of("gw1", "hn1/x.example", &[]), 0);
    }
}
