//! The running switchboard. Each link (a component connection per home node, the s2s manager,
//! the SIP edge) registers a bounded outbox; any link calls `submit` with what it received.
//! `submit` routes with a snapshot of the configuration and mapping set, delivers with
//! `try_send` (a full or missing outbox never blocks the caller: the sender gets an error
//! instead), and bounces refusals to where they came from.

use super::envelope::{Envelope, ErrorCondition};
use super::router::{self, Denied, Directory, Link, Origin};
use crate::config::{Config, Domain};
use crate::metrics;
use crate::presence::map::MappingStore;
use arc_swap::ArcSwap;
use dashmap::DashMap;
use prometheus::IntCounterVec;
use std::sync::{Arc, LazyLock};
use tokio::sync::mpsc;

/// What a link's outbox receives: the envelope and, for multi-domain links, which domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub link: Link,
    pub envelope: Envelope,
}

/// Outboxes are keyed by link kind; s2s and SIP each have one outbox for all their domains.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum OutboxKey {
    Component(Arc<str>),
    S2s,
    Sip,
}

impl From<&Link> for OutboxKey {
    fn from(l: &Link) -> Self {
        match l {
            Link::Component { home_node } => OutboxKey::Component(home_node.clone()),
            Link::S2s { .. } => OutboxKey::S2s,
            Link::Sip { .. } => OutboxKey::Sip,
        }
    }
}

static ROUTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        "legate_envelopes_total",
        "Envelopes submitted to the core, by origin link, destination link, kind and outcome",
        &["origin", "destination", "kind", "outcome"],
    )
});

static DENIED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        "legate_denied_total",
        "Envelopes refused by routing or policy, by reason",
        &["reason"],
    )
});

/// Outcome of one `submit`, for callers that answer synchronously (SIP requests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    Delivered(Link),
    Denied(Denied),
    /// The destination link is not up or its queue is full.
    Unavailable(Link),
}

/// A function an edge registers to show its state in the admin `/status` document.
pub type StatusProvider = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

pub struct Hub {
    status: DashMap<&'static str, StatusProvider>,
    config: ArcSwap<Config>,
    maps: MappingStore,
    directory: Directory,
    outboxes: DashMap<OutboxKey, mpsc::Sender<Delivery>>,
}

impl Hub {
    pub fn new(config: Config, maps: MappingStore) -> Arc<Self> {
        Arc::new(Hub {
            status: DashMap::new(),
            config: ArcSwap::from_pointee(config),
            maps,
            directory: Directory::default(),
            outboxes: DashMap::new(),
        })
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn maps(&self) -> &MappingStore {
        &self.maps
    }

    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// Adds (or replaces) the section `name` of the admin `/status` document.
    pub fn add_status(&self, name: &'static str, provider: StatusProvider) {
        self.status.insert(name, provider);
    }

    /// Every registered status section, rendered now, sorted by name.
    pub fn status_sections(&self) -> Vec<(&'static str, serde_json::Value)> {
        let providers: Vec<(&'static str, StatusProvider)> = self
            .status
            .iter()
            .map(|e| (*e.key(), e.value().clone()))
            .collect();
        let mut out: Vec<_> = providers.into_iter().map(|(k, f)| (k, f())).collect();
        out.sort_by_key(|(k, _)| *k);
        out
    }

    /// Registers the outbox of a component link; returns its receiver.
    pub fn register_component(&self, home_node: &str, capacity: usize) -> mpsc::Receiver<Delivery> {
        self.register(OutboxKey::Component(Arc::from(home_node)), capacity)
    }

    pub fn register_s2s(&self, capacity: usize) -> mpsc::Receiver<Delivery> {
        self.register(OutboxKey::S2s, capacity)
    }

    pub fn register_sip(&self, capacity: usize) -> mpsc::Receiver<Delivery> {
        self.register(OutboxKey::Sip, capacity)
    }

    fn register(&self, key: OutboxKey, capacity: usize) -> mpsc::Receiver<Delivery> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.outboxes.insert(key, tx);
        rx
    }

    /// Routes `env` received on `origin` and hands it to the destination link.
    pub fn submit(&self, origin: &Origin, env: Envelope) -> Submitted {
        let config = self.config.load();
        let maps = self.maps.current();
        let kind = env.kind_label();
        match router::route(&config, &maps, &self.directory, origin, env) {
            Ok(route) => {
                let link = route.link.clone();
                let delivery = Delivery {
                    link: route.link,
                    envelope: route.envelope,
                };
                if self.deliver(delivery.clone()) {
                    ROUTED
                        .with_label_values(&[origin.label(), link.label(), kind, "delivered"])
                        .inc();
                    Submitted::Delivered(link)
                } else {
                    ROUTED
                        .with_label_values(&[origin.label(), link.label(), kind, "unavailable"])
                        .inc();
                    tracing::warn!(
                        destination = link.label(),
                        "destination link unavailable or full"
                    );
                    let text = format!("the {} link is unavailable", link.label());
                    if let Some(b) = delivery
                        .envelope
                        .bounce(ErrorCondition::ServiceUnavailable, text)
                    {
                        self.deliver(Delivery {
                            link: origin.reply_link(),
                            envelope: b,
                        });
                    }
                    Submitted::Unavailable(link)
                }
            }
            Err(router::Refusal {
                denied,
                envelope: env,
            }) => {
                ROUTED
                    .with_label_values(&[origin.label(), "none", kind, "denied"])
                    .inc();
                DENIED.with_label_values(&[denied.label()]).inc();
                tracing::info!(from = %env.from, to = %env.to, reason = %denied, "refused");
                if denied.answered() {
                    if let Some(b) = env.bounce(denied.condition(), denied.to_string()) {
                        self.deliver(Delivery {
                            link: origin.reply_link(),
                            envelope: b,
                        });
                    }
                }
                Submitted::Denied(denied)
            }
        }
    }

    /// Sends directly to a link (used for bounces and by edges answering on their own link).
    pub fn deliver(&self, d: Delivery) -> bool {
        let key = OutboxKey::from(&d.link);
        let tx = match self.outboxes.get(&key) {
            Some(tx) => tx.value().clone(),
            None => return false,
        };
        tx.try_send(d).is_ok()
    }

    /// The domains the SIP edge may talk to right now.
    pub fn sip_domain_allowed(&self, d: &Domain) -> bool {
        self.config.load().sip_federated(d).is_some()
    }
}
