//! Routing over the intercluster link (issue 13 §3): one forwarder per listed peer cluster,
//! draining that peer's hub outbox in batches into `Forward`, and the asker that, before an
//! unplaced local user is refused, asks every peer (`Lookup`).
//!
//! Each peer has one long-lived gRPC channel (HTTP/2, reconnected on demand through the same
//! dialler as the sync, so mutual TLS is checked as there). A peer that cannot be reached, or
//! does not answer within [`FORWARD_TIMEOUT`], has the batch bounced to its senders
//! (`remote-server-timeout` or `service-unavailable`; SIP senders get the late-error notice):
//! nothing waits behind a dead peer for longer than that.

use super::link::proto::{self, intercluster_client::InterclusterClient};
use super::routes::{Routing, Way};
use super::tls::IcTls;
use super::{keys, FORWARDED, FORWARD_SECONDS, LOOKUPS};
use crate::cluster::peer::wire;
use crate::config::{Config, HostPort};
use crate::gateway::envelope::{Envelope, ErrorCondition};
use crate::gateway::hub::{Delivery, PeerAsker, Submitted};
use crate::gateway::{Hub, Origin};
use crate::store::SharedStore;
use dashmap::DashMap;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Semaphore};
use tonic::transport::{Channel, Endpoint};

/// Envelopes per `Forward` call at most.
pub const BATCH: usize = 256;
/// Longest wait for a peer's answer to `Forward` (it waits for room in its outboxes up to its
/// `limits.delivery_timeout_secs`, so this is above the default of that).
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for a peer's answer to `Lookup`.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Peers asked at once about one user.
const LOOKUP_CONCURRENCY: usize = 8;
/// Users being asked about at once (beyond: routed as if nobody had them).
const MAX_ASKING: usize = 1_000;
/// Envelopes held per user while the peers are asked (beyond: bounced).
const MAX_HELD: usize = 64;
/// Outbox of a forwarder.
pub const QUEUE: usize = 4_096;
/// Dialling a peer for the forwarding channel.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The metric label of a `ForwardResult`.
pub fn result_label(r: i32) -> &'static str {
    match proto::ForwardResult::try_from(r) {
        Ok(proto::ForwardResult::Delivered) => "delivered",
        Ok(proto::ForwardResult::Refused) => "refused",
        Ok(proto::ForwardResult::Unavailable) => "unavailable",
        Ok(proto::ForwardResult::Invalid) | Err(_) => "invalid",
    }
}

/// One channel per listed peer.
#[derive(Clone)]
pub struct Peers {
    me: String,
    channels: Arc<HashMap<Arc<str>, Channel>>,
}

fn channel(peer: &HostPort, tls: Option<IcTls>) -> Channel {
    let peer = peer.clone();
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let (peer, tls) = (peer.clone(), tls.clone());
        async move {
            // The certificate's description is for the sync's status; the forwarder only
            // needs the handshake to succeed.
            let mut certificate = String::new();
            super::link::dial(&peer, tls.as_ref(), &mut certificate)
                .await
                .map(hyper_util::rt::TokioIo::new)
                .map_err(std::io::Error::other)
        }
    });
    Endpoint::from_static("http://intercluster.invalid")
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector_lazy(connector)
}

impl Peers {
    pub fn new(cfg: &Config, tls: Option<&IcTls>) -> Self {
        let channels = cfg
            .intercluster
            .peers
            .iter()
            .map(|p| {
                (
                    Arc::from(p.name.as_str()),
                    channel(&p.address, tls.cloned()),
                )
            })
            .collect();
        Peers {
            me: cfg.intercluster.name.clone().unwrap_or_default(),
            channels: Arc::new(channels),
        }
    }

    fn client(&self, peer: &str) -> Option<InterclusterClient<Channel>> {
        self.channels
            .get(peer)
            .map(|c| InterclusterClient::new(c.clone()).max_decoding_message_size(16 << 20))
    }

    pub fn names(&self) -> Vec<Arc<str>> {
        self.channels.keys().cloned().collect()
    }
}

/// Sends `env`'s error back to its sender, as if `peer` had answered it: the router finds the
/// sender's link (our home node, or the foreign SIP/s2s peer our edge took it from).
fn bounce(hub: &Hub, peer: &Arc<str>, env: &Envelope, condition: ErrorCondition, text: String) {
    if let Some(b) = env.bounce(condition, text) {
        hub.submit(
            &Origin::Intercluster {
                cluster: peer.clone(),
            },
            b,
        );
    }
}

/// Drains `peer`'s outbox into `Forward` calls until shutdown.
pub async fn run(
    hub: Weak<Hub>,
    routing: Arc<Routing>,
    peers: Peers,
    peer: Arc<str>,
    mut rx: mpsc::Receiver<Delivery>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(mut client) = peers.client(&peer) else {
        return;
    };
    loop {
        let first = tokio::select! {
            d = rx.recv() => match d {
                Some(d) => d,
                None => return,
            },
            _ = shutdown.changed() => if *shutdown.borrow() { return } else { continue },
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(d) => batch.push(d),
                Err(_) => break,
            }
        }
        let Some(hub) = hub.upgrade() else { return };
        let request = proto::ForwardBatch {
            from_cluster: peers.me.clone(),
            envelopes: batch.iter().map(|d| wire::to_wire(&d.envelope)).collect(),
        };
        let started = Instant::now();
        let answer = tokio::time::timeout(FORWARD_TIMEOUT, client.forward(request)).await;
        let seconds = started.elapsed().as_secs_f64();
        let (condition, why) = match answer {
            Ok(Ok(r)) => {
                FORWARD_SECONDS
                    .with_label_values(&["answered"])
                    .observe(seconds);
                let outcomes = r.into_inner().outcomes;
                for (i, d) in batch.into_iter().enumerate() {
                    let delivered = settle(&hub, &peer, d, outcomes.get(i));
                    routing.count(&peer, Way::Out, delivered);
                }
                continue;
            }
            Ok(Err(s)) => {
                FORWARD_SECONDS
                    .with_label_values(&["failed"])
                    .observe(seconds);
                tracing::warn!(peer = %peer, code = ?s.code(), error = %s.message(), "intercluster: Forward failed; the batch is bounced");
                (
                    ErrorCondition::ServiceUnavailable,
                    format!(
                        "peer cluster `{peer}` could not be reached: {}",
                        s.message().chars().take(200).collect::<String>()
                    ),
                )
            }
            Err(_) => {
                FORWARD_SECONDS
                    .with_label_values(&["failed"])
                    .observe(seconds);
                tracing::warn!(peer = %peer, "intercluster: no answer to Forward in time; the batch is bounced");
                (
                    ErrorCondition::RemoteServerTimeout,
                    format!("peer cluster `{peer}` did not answer within {FORWARD_TIMEOUT:?}"),
                )
            }
        };
        // Not acknowledged: no definite answer (the handed-over envelope stays its
        // sender's, which bounces it below).
        FORWARDED
            .with_label_values(&["out", "failed"])
            .inc_by(batch.len() as u64);
        for d in batch {
            routing.count(&peer, Way::Out, false);
            bounce(&hub, &peer, &d.envelope, condition, why.clone());
            // Answered with an error its sender sees: done, as a component link says then.
            d.handled.done();
        }
    }
}

/// What the peer answered for one envelope; whether it was delivered.
fn settle(hub: &Hub, peer: &Arc<str>, d: Delivery, o: Option<&proto::ForwardOutcome>) -> bool {
    let Some(o) = o else {
        FORWARDED.with_label_values(&["out", "invalid"]).inc();
        bounce(
            hub,
            peer,
            &d.envelope,
            ErrorCondition::ServiceUnavailable,
            format!("peer cluster `{peer}` gave no outcome for it"),
        );
        d.handled.done();
        return false;
    };
    // A definite answer: the hand-over is done whatever it says.
    d.handled.done();
    let label = result_label(o.result);
    FORWARDED.with_label_values(&["out", label]).inc();
    if label == "delivered" {
        return true;
    }
    if !o.answered {
        return false;
    }
    let condition =
        ErrorCondition::from_name(&o.condition).unwrap_or(ErrorCondition::ServiceUnavailable);
    let reason: String = o.reason.chars().take(300).collect();
    bounce(
        hub,
        peer,
        &d.envelope,
        condition,
        format!("{peer}: {reason}"),
    );
    false
}

/// Envelopes waiting while the peers are asked about their recipient.
type Held = Vec<(Origin, Envelope)>;

/// Asks the peers about unplaced users (see [`PeerAsker`]).
pub struct Asker {
    pub hub: Weak<Hub>,
    pub peers: Peers,
    pub routing: Arc<Routing>,
    pub store: SharedStore,
    pub index: Arc<super::index::Index>,
    held: Arc<DashMap<String, Held>>,
}

impl Asker {
    pub fn new(
        hub: Weak<Hub>,
        peers: Peers,
        routing: Arc<Routing>,
        store: SharedStore,
        index: Arc<super::index::Index>,
    ) -> Self {
        Asker {
            hub,
            peers,
            routing,
            store,
            index,
            held: Arc::new(DashMap::new()),
        }
    }
}

impl PeerAsker for Asker {
    fn ask(&self, user: String, origin: Origin, env: Envelope) -> bool {
        // Envelopes for a user being asked about wait behind the first, in order.
        if let Some(mut h) = self.held.get_mut(&user) {
            if h.len() >= MAX_HELD {
                return false;
            }
            h.push((origin, env));
            return true;
        }
        // Peers a reload removed are not asked (nor any, once none is listed).
        let listed: Vec<Arc<str>> = match self.hub.upgrade() {
            Some(h) => h
                .config()
                .intercluster
                .peers
                .iter()
                .map(|p| Arc::from(p.name.as_str()))
                .collect(),
            None => Vec::new(),
        };
        if self.held.len() >= MAX_ASKING || listed.is_empty() {
            self.routing.mark_absent(&user);
            return false;
        }
        self.held.insert(user.clone(), vec![(origin, env)]);
        let (hub, peers, routing, store, index, held) = (
            self.hub.clone(),
            self.peers.clone(),
            self.routing.clone(),
            self.store.clone(),
            self.index.clone(),
            self.held.clone(),
        );
        tokio::spawn(async move {
            match ask_peers(&peers, &listed, &user).await {
                Some(peer) => {
                    // Known at once here; every node learns it through the store.
                    let key = keys::user(&peer, &user);
                    index.apply(&key, Some(b""));
                    if let Err(e) = store.put(&key, Vec::new()).await {
                        tracing::warn!(error = %e, "intercluster: cannot store a user a peer said it hosts");
                    }
                    tracing::info!(user = %crate::net::LogSafe(&user), peer = %peer, "intercluster: a peer hosts an unplaced user");
                }
                None => routing.mark_absent(&user),
            }
            let waiting = held.remove(&user).map(|(_, v)| v).unwrap_or_default();
            let Some(hub) = hub.upgrade() else { return };
            for (origin, env) in waiting {
                resubmit(&hub, &origin, env);
            }
        });
        true
    }
}

/// Routes a held envelope again. Its submitter was told "accepted" long ago: a SIP sender
/// hears of a refusal now as a late error (the hub tells the others itself).
fn resubmit(hub: &Hub, origin: &Origin, env: Envelope) {
    let copy = matches!(origin, Origin::Sip { .. }).then(|| env.clone());
    let (condition, text) = match hub.submit(origin, env) {
        Submitted::Denied(d) if d.answered() => (d.condition(), d.to_string()),
        Submitted::Unavailable(l) => (
            ErrorCondition::ServiceUnavailable,
            format!("the {} link is unavailable", l.label()),
        ),
        _ => return,
    };
    if let Some(b) = copy.and_then(|e| e.bounce(condition, text)) {
        hub.deliver(Delivery::new(origin.reply_link(), b));
    }
}

/// The first peer that says `user` lives there, asking at most [`LOOKUP_CONCURRENCY`] at once,
/// each within [`LOOKUP_TIMEOUT`].
async fn ask_peers(peers: &Peers, listed: &[Arc<str>], user: &str) -> Option<Arc<str>> {
    let limit = Arc::new(Semaphore::new(LOOKUP_CONCURRENCY));
    let mut asks = tokio::task::JoinSet::new();
    for peer in peers.names().into_iter().filter(|p| listed.contains(p)) {
        let Some(mut client) = peers.client(&peer) else {
            continue;
        };
        let (limit, me, user) = (limit.clone(), peers.me.clone(), user.to_string());
        asks.spawn(async move {
            let _permit = limit.acquire_owned().await.ok()?;
            let req = proto::LookupRequest {
                from_cluster: me,
                user,
            };
            let r = tokio::time::timeout(LOOKUP_TIMEOUT, client.lookup(req)).await;
            let answer = match r {
                Ok(Ok(r)) if r.get_ref().lives_here => "yes",
                Ok(Ok(_)) => "no",
                Ok(Err(_)) | Err(_) => "failed",
            };
            LOOKUPS.with_label_values(&["out", answer]).inc();
            (answer == "yes").then_some(peer)
        });
    }
    while let Some(r) = asks.join_next().await {
        if let Ok(Some(peer)) = r {
            asks.abort_all();
            return Some(peer);
        }
    }
    None
}
