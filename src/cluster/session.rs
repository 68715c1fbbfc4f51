//! One node's session in its cluster: lease, registration, election, leader duties.
//!
//! The loop is a sequence of *terms*. A term starts with a fresh lease and the member key
//! written under it; the node campaigns (follower) and, once elected, leads until the term
//! ends. A term ends when keep-alives have failed for [`super::step_down_after`] (etcd gone,
//! no quorum, or the lease already expired on the server): the node steps down at once,
//! marks itself `Detached`, and starts a new term as soon as etcd grants a lease again.
//! Traffic never waits for any of this.

use super::{
    step_down_after, Cluster, ClusterError, Member, Role, Status, EVENTS, IS_LEADER, MAX_PEERS,
    MEMBERS,
};
use crate::config::Config;
use crate::ops::alarms::{AlarmName, Alarms};
use crate::store::etcd::{deadline, kv_delete, kv_get, kv_put, kv_txn, retrying};
use crate::store::StoreError;
use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often the member list is read again for the status.
const MEMBERS_EVERY: Duration = Duration::from_secs(1);
/// How often the leader compacts etcd's history, and how many revisions it keeps (a watcher
/// that falls further behind than this resyncs).
const COMPACT_EVERY: Duration = Duration::from_secs(300);
const KEEP_REVISIONS: i64 = 10_000;

struct Keys {
    members: String,
    election: String,
}

impl Keys {
    fn new(cluster: &str) -> Self {
        Self {
            members: format!("/legate/{cluster}/members/"),
            election: format!("/legate/{cluster}/leader"),
        }
    }
}

/// Joins the cluster of `config` on etcd through `client`: checks the member limit and the
/// node id, registers, and starts the session task. Returns once registered (a follower).
pub async fn join(
    client: Client,
    config: &Config,
    alarms: Alarms,
    shutdown: watch::Receiver<bool>,
    stand_aside: StandAside,
) -> Result<Cluster, ClusterError> {
    let name = config
        .cluster
        .name
        .as_ref()
        .ok_or(ClusterError::NoName)?
        .to_string();
    let id = config.node.id.to_string();
    let me = super::peer_entry(config, &id).ok_or_else(|| ClusterError::NotAPeer(id.clone()))?;
    let member = Member {
        id: id.clone(),
        address: me.address.to_string(),
        federation: me.federation,
        since: super::unix_now(),
    };
    let ttl = Duration::from_secs(config.cluster.lease_ttl_secs);
    let keys = Keys::new(&name);
    let lease = register(&client, &keys, &member, ttl).await?;
    let endpoints = match &config.cluster.store {
        crate::config::Store::Etcd { endpoints } => endpoints.clone(),
        crate::config::Store::Memory => Vec::new(),
    };
    let (cluster, senders) = Cluster::new(
        Status {
            node: id.clone(),
            cluster: name,
            role: Role::Follower,
            leader: None,
            members: vec![member.clone()],
            last_change: super::unix_now(),
            last_change_text: "joined as follower".into(),
            elections_won: 0,
            lease_losses: 0,
            lease_ttl_secs: ttl.as_secs(),
            etcd_endpoints: endpoints,
            last_compaction: None,
            configured_peers: config
                .cluster
                .peers
                .iter()
                .map(|p| Member {
                    id: p.name.to_string(),
                    address: p.address.to_string(),
                    federation: p.federation,
                    since: 0,
                })
                .collect(),
            tls: super::TlsInUse {
                cert: config.tls.cert.as_ref().map(|p| p.display().to_string()),
                key: config.tls.key.as_ref().map(|p| p.display().to_string()),
                trust_bundle: config
                    .tls
                    .trust_bundle
                    .as_ref()
                    .map(|p| p.display().to_string()),
                peer_verify: match config.cluster.tls_verify {
                    crate::config::PeerTlsVerify::Permissive => "permissive".into(),
                    crate::config::PeerTlsVerify::Enforce => "enforce".into(),
                },
            },
        },
        lease,
    );
    tracing::info!(node = %id, lease_ttl_secs = ttl.as_secs(), "joined the cluster");
    MEMBERS.set(1);
    IS_LEADER.set(0);
    let s = Session {
        client,
        keys,
        member,
        ttl,
        cluster: cluster.clone(),
        senders,
        alarms,
        shutdown,
        stand_aside,
    };
    cluster.set_session(tokio::spawn(s.run(lease)));
    Ok(cluster)
}

/// Grants a lease and writes the member key under it, after checking the limits. A key for
/// our id that is still alive (we were just killed and restarted) is waited out for one TTL.
async fn register(
    client: &Client,
    keys: &Keys,
    member: &Member,
    ttl: Duration,
) -> Result<i64, ClusterError> {
    let key = format!("{}{}", keys.members, member.id);
    let value = serde_json::to_vec(member).unwrap_or_default();
    let give_up = Instant::now() + ttl + Duration::from_secs(1);
    loop {
        let live = list_members(client, keys).await?;
        let others: Vec<&Member> = live.iter().filter(|m| m.id != member.id).collect();
        if others.len() >= MAX_PEERS {
            return Err(ClusterError::Full {
                members: others.iter().map(|m| m.id.clone()).collect(),
            });
        }
        if let Some(old) = live.iter().find(|m| m.id == member.id) {
            if Instant::now() >= give_up {
                return Err(ClusterError::DuplicateId {
                    id: member.id.clone(),
                    address: old.address.clone(),
                });
            }
            tracing::info!(
                node = %member.id,
                "waiting for the previous registration of this node id to expire"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        }
        let lease = grant(client, ttl).await?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        if kv_txn(client, txn).await?.succeeded() {
            return Ok(lease);
        }
        // Another process with our id registered in between: loop to wait it out.
        let mut lc = client.lease_client();
        let _ = deadline(lc.revoke(lease)).await;
    }
}

async fn grant(client: &Client, ttl: Duration) -> Result<i64, StoreError> {
    let secs = i64::try_from(ttl.as_secs()).unwrap_or(5);
    Ok(retrying(|| {
        let mut lc = client.lease_client();
        async move { lc.grant(secs, None).await }
    })
    .await?
    .id())
}

async fn list_members(client: &Client, keys: &Keys) -> Result<Vec<Member>, StoreError> {
    let resp = kv_get(
        client,
        keys.members.clone(),
        Some(GetOptions::new().with_prefix()),
    )
    .await?;
    Ok(resp
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice::<Member>(kv.value()).ok())
        .collect())
}

struct Session {
    client: Client,
    keys: Keys,
    member: Member,
    ttl: Duration,
    cluster: Cluster,
    senders: super::Senders,
    alarms: Alarms,
    shutdown: watch::Receiver<bool>,
    stand_aside: StandAside,
}

/// How a term ended.
enum TermEnd {
    LeaseLost(String),
    Shutdown,
    /// The node stands aside (draining): not a leader, not a candidate, lease kept.
    StoodAside,
    /// etcd names another leader than us: campaign again.
    Deposed,
}

/// How often a leader checks with etcd that it still is the leader.
const VERIFY_EVERY: Duration = Duration::from_secs(1);

/// How often a leader or candidate checks whether it should stand aside.
const STAND_ASIDE_POLL: Duration = Duration::from_millis(200);

/// Tells the session the node must not lead (it drains for maintenance).
pub type StandAside = std::sync::Arc<dyn Fn() -> bool + Send + Sync>;

impl Session {
    async fn run(mut self, first_lease: i64) {
        tokio::spawn(observe_leader(
            self.client.clone(),
            self.keys.election.clone(),
            self.cluster.clone(),
            self.shutdown.clone(),
        ));
        tokio::spawn(follow_members(
            self.client.clone(),
            self.keys.members.clone(),
            self.cluster.clone(),
            self.shutdown.clone(),
        ));
        let mut lease = first_lease;
        loop {
            match self.term(lease).await {
                // A term handles standing aside and deposition itself; it never ends with them.
                TermEnd::Shutdown | TermEnd::StoodAside | TermEnd::Deposed => {
                    self.leave(lease).await;
                    return;
                }
                TermEnd::LeaseLost(why) => {
                    EVENTS.with_label_values(&["lease_lost"]).inc();
                    tracing::warn!(reason = %why, "cluster: lost the etcd lease; this node is detached and serves traffic on cached state");
                    let _ = self.senders.lease.send(None);
                    self.set_role(Role::Detached, format!("lost the etcd lease: {why}"));
                    self.cluster.update(|s| s.lease_losses += 1);
                    self.alarms
                        .raise(AlarmName::ClusterStoreUnreachable, &self.member.id, &why);
                }
            }
            match self.rejoin().await {
                Some(l) => {
                    lease = l;
                    let _ = self.senders.lease.send(Some(l));
                    self.alarms
                        .clear(AlarmName::ClusterStoreUnreachable, &self.member.id);
                    self.set_role(Role::Follower, "joined again as follower".into());
                    tracing::info!("cluster: registered again with a new lease");
                }
                None => return,
            }
        }
    }

    fn set_role(&self, role: Role, text: String) {
        let was = *self.senders.role.borrow();
        if was == Role::Leader && role != Role::Leader {
            EVENTS.with_label_values(&["stepped_down"]).inc();
        }
        IS_LEADER.set(i64::from(role == Role::Leader));
        self.cluster.update(|s| {
            s.role = role;
            s.last_change = super::unix_now();
            s.last_change_text = text;
            if role == Role::Leader {
                s.leader = Some(self.member.id.clone());
            } else if s.leader.as_deref() == Some(self.member.id.as_str()) {
                s.leader = None;
            }
        });
        let _ = self.senders.role.send(role);
    }

    /// One term on `lease`: keep it alive, campaign, lead; returns why it ended.
    async fn term(&mut self, lease: i64) -> TermEnd {
        let (lost_tx, mut lost_rx) = watch::channel::<Option<String>>(None);
        let keeper = tokio::spawn(keep_alive(self.client.clone(), lease, self.ttl, lost_tx));
        let end = loop {
            match self.campaign_and_lead(lease, &mut lost_rx).await {
                TermEnd::Deposed => continue,
                TermEnd::StoodAside => {
                    // No candidacy may stay behind: etcd would elect it while nobody acts.
                    self.withdraw(lease).await;
                    if let Some(end) = self.wait_while_aside(&mut lost_rx).await {
                        break end;
                    }
                }
                end => break end,
            }
        };
        keeper.abort();
        end
    }

    /// Whether etcd names the holder of `lease` as the leader (None: etcd did not answer).
    async fn named_leader(&self, lease: i64) -> Option<bool> {
        let name = self.keys.election.clone();
        match retrying(|| {
            let mut ec = self.client.election_client();
            let name = name.clone();
            async move { ec.leader(name).await }
        })
        .await
        {
            Ok(resp) => Some(resp.kv().is_some_and(|kv| kv.lease() == lease)),
            // Nobody is elected: certainly not us.
            Err(StoreError::Unavailable(m)) if m.contains("election: no leader") => Some(false),
            Err(_) => None,
        }
    }

    /// Deletes our candidate key (etcd's election keys are `<name>/<lease in hex>`).
    async fn withdraw(&self, lease: i64) {
        let key = format!("{}/{lease:x}", self.keys.election);
        let _ = kv_delete(&self.client, key).await;
    }

    /// Waits while the node must stand aside; Some when the term ends meanwhile.
    async fn wait_while_aside(
        &mut self,
        lost: &mut watch::Receiver<Option<String>>,
    ) -> Option<TermEnd> {
        while (self.stand_aside)() {
            tokio::select! {
                _ = tokio::time::sleep(STAND_ASIDE_POLL) => {}
                _ = lost.changed() => {
                    if let Some(why) = lost.borrow().clone() {
                        return Some(TermEnd::LeaseLost(why));
                    }
                }
                _ = self.shutdown.changed() => return Some(TermEnd::Shutdown),
            }
        }
        None
    }

    async fn campaign_and_lead(
        &mut self,
        lease: i64,
        lost: &mut watch::Receiver<Option<String>>,
    ) -> TermEnd {
        let id = self.member.id.clone();
        if (self.stand_aside)() {
            return TermEnd::StoodAside;
        }
        let leader_key = loop {
            if let Some(why) = lost.borrow().clone() {
                return TermEnd::LeaseLost(why);
            }
            let mut ec = self.client.election_client();
            // `campaign` blocks until elected; it has no deadline on purpose. It is never
            // dropped while it waits unless the term ends: etcd's election server resigns a
            // campaign whose call is cancelled (it deletes the candidate key, which is keyed by
            // lease), so a campaign cancelled and sent again would race its own clean-up and
            // could be "elected" without a key. A broken connection (one etcd member going
            // away) ends it with an error: campaigning again on the same lease is idempotent,
            // so it is simply retried while the lease lives; the keeper says when it does not.
            let campaign = ec.campaign(self.keys.election.clone(), id.clone(), lease);
            tokio::pin!(campaign);
            let answered = loop {
                tokio::select! {
                    r = &mut campaign => break r,
                    _ = lost.changed() => {
                        if let Some(why) = lost.borrow().clone() {
                            return TermEnd::LeaseLost(why);
                        }
                    }
                    _ = self.shutdown.changed() => return TermEnd::Shutdown,
                    _ = tokio::time::sleep(STAND_ASIDE_POLL) => {
                        if (self.stand_aside)() {
                            return TermEnd::StoodAside;
                        }
                    }
                }
            };
            match answered {
                // A campaign answered across a broken connection or a quorum change is not
                // trusted alone: etcd must name us as the leader.
                Ok(mut resp) => match self.named_leader(lease).await {
                    Some(true) => break resp.take_leader(),
                    verdict => {
                        tracing::debug!(?verdict, "cluster: campaign answered but etcd names another leader; campaigning again");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Err(e) => {
                    tracing::debug!(error = %e, "cluster: campaign interrupted; campaigning again");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = self.shutdown.changed() => return TermEnd::Shutdown,
                    }
                }
            }
        };
        EVENTS.with_label_values(&["elected"]).inc();
        self.cluster.update(|s| s.elections_won += 1);
        self.set_role(Role::Leader, "elected leader".into());
        tracing::info!(node = %id, "cluster: elected leader");
        let mut compact = tokio::time::interval(COMPACT_EVERY);
        compact.tick().await;
        let mut verify = tokio::time::interval(VERIFY_EVERY);
        verify.tick().await;
        let end = loop {
            // Checked on every turn, not only when `changed` fires: a loss reported while a
            // branch below was busy (a verification can take the whole call deadline) must
            // end the leadership at the next turn.
            if let Some(why) = lost.borrow().clone() {
                break TermEnd::LeaseLost(why);
            }
            tokio::select! {
                biased;
                _ = lost.changed() => {
                    if let Some(why) = lost.borrow().clone() {
                        break TermEnd::LeaseLost(why);
                    }
                }
                _ = self.shutdown.changed() => break TermEnd::Shutdown,
                _ = compact.tick() => self.compact().await,
                _ = verify.tick() => {
                    if self.named_leader(lease).await == Some(false) {
                        tracing::warn!("cluster: etcd names another leader; stepping down");
                        self.set_role(Role::Follower, "deposed: etcd names another leader".into());
                        break TermEnd::Deposed;
                    }
                }
                _ = tokio::time::sleep(STAND_ASIDE_POLL) => {
                    if (self.stand_aside)() {
                        tracing::info!("cluster: draining; handing the leadership over");
                        self.set_role(Role::Follower, "stood aside: draining".into());
                        break TermEnd::StoodAside;
                    }
                }
            }
        };
        if let (TermEnd::Shutdown | TermEnd::StoodAside, Some(k)) = (&end, leader_key) {
            // Hand the leadership over now instead of after a TTL.
            let mut ec = self.client.election_client();
            let _ =
                deadline(ec.resign(Some(etcd_client::ResignOptions::new().with_leader(k)))).await;
        }
        end
    }

    /// The leader's duty: compact etcd's history older than [`KEEP_REVISIONS`].
    async fn compact(&self) {
        let mut kv = self.client.kv_client();
        let Ok(resp) = deadline(kv.get(self.keys.election.clone(), None)).await else {
            return;
        };
        let now = resp.header().map_or(0, |h| h.revision());
        let to = now - KEEP_REVISIONS;
        if to <= 0
            || self
                .cluster
                .status()
                .and_then(|s| s.last_compaction)
                .is_some_and(|(_, r)| r >= to)
        {
            return;
        }
        match deadline(kv.compact(to, None)).await {
            Ok(_) => {
                tracing::info!(revision = to, "cluster: etcd history compacted");
                self.cluster
                    .update(|s| s.last_compaction = Some((super::unix_now(), to)));
            }
            Err(e) => tracing::warn!(error = %e, "cluster: compaction failed"),
        }
    }

    /// A new lease and registration after a lost one; retries until etcd answers.
    async fn rejoin(&mut self) -> Option<i64> {
        let key = format!("{}{}", self.keys.members, self.member.id);
        // A member's `since` is when it (re)joined: the status shows the rejoin, not the start.
        self.member.since = super::unix_now();
        let value = serde_json::to_vec(&self.member).unwrap_or_default();
        let mut pause = Duration::from_millis(250);
        loop {
            let attempt = async {
                let lease = grant(&self.client, self.ttl).await?;
                // Our old key may still be there if we stepped down before the server let the
                // lease expire: it is ours, so it is simply written again under the new lease.
                kv_put(
                    &self.client,
                    key.clone(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await?;
                Ok::<i64, StoreError>(lease)
            };
            tokio::select! {
                r = attempt => match r {
                    Ok(l) => return Some(l),
                    Err(e) => tracing::debug!(error = %e, "cluster: rejoin failed; retrying"),
                },
                _ = self.shutdown.changed() => return None,
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.shutdown.changed() => return None,
            }
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// Leaves on shutdown: revoking the lease deletes the member key (and the election key if
    /// we led) at once, so the others do not wait a TTL.
    async fn leave(&self, lease: i64) {
        IS_LEADER.set(0);
        let mut lc = self.client.lease_client();
        match deadline(lc.revoke(lease)).await {
            Ok(_) => tracing::info!("cluster: left (lease revoked)"),
            Err(e) => {
                tracing::warn!(error = %e, "cluster: could not revoke the lease; it expires within its TTL")
            }
        }
    }
}

/// Keeps `lease` alive every TTL/3; reports on `lost` when it has not been renewed for
/// [`step_down_after`] or etcd says it is gone.
async fn keep_alive(
    client: Client,
    lease: i64,
    ttl: Duration,
    lost: watch::Sender<Option<String>>,
) {
    let every = ttl / 3;
    let limit = step_down_after(ttl);
    let mut last_ok = Instant::now();
    let mut stream: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)> = None;
    let mut last_err = String::from("no keep-alive answer");
    loop {
        if last_ok.elapsed() >= limit {
            tracing::debug!(
                lease,
                receivers = lost.receiver_count(),
                "cluster: keeper reports the lease lost"
            );
            let _ = lost.send(Some(format!(
                "no keep-alive for {} ms ({last_err})",
                last_ok.elapsed().as_millis()
            )));
            return;
        }
        if stream.is_none() {
            let mut lc = client.lease_client();
            match tokio::time::timeout(every, lc.keep_alive(lease)).await {
                Ok(Ok(s)) => stream = Some(s),
                Ok(Err(e)) => last_err = e.to_string(),
                Err(_) => last_err = "etcd did not answer".into(),
            }
        }
        let started = Instant::now();
        let mut renewed_now = false;
        if let Some((keeper, answers)) = stream.as_mut() {
            let renewed = tokio::time::timeout(every, async {
                keeper.keep_alive().await?;
                answers.message().await
            })
            .await;
            match renewed {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {
                    last_ok = Instant::now();
                    renewed_now = true;
                }
                Ok(Ok(Some(_))) => {
                    let _ = lost.send(Some("etcd says the lease has expired".into()));
                    return;
                }
                Ok(Ok(None)) => {
                    last_err = "keep-alive stream closed".into();
                    stream = None;
                }
                Ok(Err(e)) => {
                    last_err = e.to_string();
                    stream = None;
                }
                Err(_) => {
                    last_err = "etcd did not answer".into();
                    stream = None;
                }
            }
        }
        // After a failure, try again at once on a new stream (the balancer picks a live
        // member): waiting a whole period would spend the margin before stepping down.
        let pause = if renewed_now {
            every.saturating_sub(started.elapsed())
        } else {
            tracing::debug!(lease, error = %last_err, since_ok_ms = last_ok.elapsed().as_millis() as u64, "cluster: keep-alive failed");
            Duration::from_millis(100)
        };
        tokio::time::sleep(pause).await;
    }
}

/// Follows who leads (etcd's `observe`), for every node's status, reconnecting as needed.
async fn observe_leader(
    client: Client,
    election: String,
    cluster: Cluster,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let mut ec = client.election_client();
        let observed = tokio::select! {
            r = ec.observe(election.clone()) => r,
            _ = shutdown.changed() => return,
        };
        if let Ok(mut stream) = observed {
            loop {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    _ = shutdown.changed() => return,
                };
                match msg {
                    Ok(Some(resp)) => {
                        let leader = resp
                            .kv()
                            .and_then(|kv| std::str::from_utf8(kv.value()).ok())
                            .map(str::to_owned);
                        let mut changed = false;
                        cluster.update(|s| {
                            if s.leader != leader {
                                changed = true;
                                s.leader = leader.clone();
                            }
                        });
                        if changed {
                            EVENTS.with_label_values(&["leader_changed"]).inc();
                            tracing::info!(leader = ?leader, "cluster: leader observed");
                        }
                    }
                    _ => break,
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Keeps the member list current for the status and the duties that address the other
/// nodes: read again on every change etcd reports on the members' keys (a join or a death is
/// seen within a watch round trip), and every [`MEMBERS_EVERY`] as a fallback while the watch
/// is down. Forgets the leader when its member key is gone (it died; the observer sees the
/// next one).
async fn follow_members(
    client: Client,
    prefix: String,
    cluster: Cluster,
    mut shutdown: watch::Receiver<bool>,
) {
    let keys = Keys {
        members: prefix,
        election: String::new(),
    };
    let mut stream = None;
    loop {
        if let Ok(members) = list_members(&client, &keys).await {
            MEMBERS.set(i64::try_from(members.len()).unwrap_or(0));
            cluster.update(|s| {
                if let Some(l) = &s.leader {
                    if !members.iter().any(|m| &m.id == l) {
                        s.leader = None;
                    }
                }
                s.members = members;
            });
        }
        if stream.is_none() {
            stream = crate::store::etcd::open_watch(&client, &keys.members, 0)
                .await
                .ok();
        }
        tokio::select! {
            msg = async {
                match stream.as_mut() {
                    Some(s) => s.message().await,
                    None => std::future::pending().await,
                }
            } => {
                if !matches!(msg, Ok(Some(_))) {
                    stream = None;
                }
            }
            _ = tokio::time::sleep(MEMBERS_EVERY) => {}
            _ = shutdown.changed() => return,
        }
    }
}
