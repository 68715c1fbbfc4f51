//! Routing and federation policy: the *decide* stage. Given where an envelope came from
//! (which link, authenticated as which domain or home node) and the current configuration,
//! mapping set and directory, it answers where the envelope goes — with its presence already
//! translated into the destination's system — or why it goes nowhere. Pure: no I/O, no clock.
//!
//! Who may send as whom: an s2s or SIP peer only as users of the domain it authenticated; a
//! home node only as local users it hosts — listed in its `users`, learned from its own user
//! traffic, or unclaimed in a domain it may host (see [`Directory::admit_sender`]). The only
//! state it touches is the [`Directory`], which it teaches from user traffic.

use super::envelope::{Address, Body, Envelope, ErrorCondition, PresenceBody};
use crate::config::{Config, Domain};
use crate::presence::map::MappingSet;
use dashmap::DashMap;
use std::sync::Arc;

/// The link an envelope arrived on, as authenticated by that link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The XEP-0114 link to a home node (by home node name).
    Component { home_node: Arc<str> },
    /// An s2s stream authenticated (SASL EXTERNAL or dialback) for `domain`.
    S2s { domain: Domain },
    /// A SIP connection whose peer was verified as `domain` (certificate or static route).
    Sip { domain: Domain },
    /// The intercluster link from peer cluster `cluster` (a listed peer, authenticated by its
    /// certificate): envelopes it routed to this cluster (issue 13 §3).
    Intercluster { cluster: Arc<str> },
}

/// Where an envelope leaves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Link {
    Component {
        home_node: Arc<str>,
    },
    S2s {
        domain: Domain,
    },
    Sip {
        domain: Domain,
    },
    /// The intercluster link to peer cluster `cluster`, which routes the envelope on.
    Intercluster {
        cluster: Arc<str>,
    },
}

impl Link {
    pub fn label(&self) -> &'static str {
        match self {
            Link::Component { .. } => "component",
            Link::S2s { .. } => "s2s",
            Link::Sip { .. } => "sip",
            Link::Intercluster { .. } => "intercluster",
        }
    }
}

impl Origin {
    pub fn label(&self) -> &'static str {
        match self {
            Origin::Component { .. } => "component",
            Origin::S2s { .. } => "s2s",
            Origin::Sip { .. } => "sip",
            Origin::Intercluster { .. } => "intercluster",
        }
    }

    /// The link that reaches back to this origin.
    /// Whether a refusal at submit time is told to the sender as an error envelope. The SIP
    /// core is not: it answers each request from the `Submitted` outcome (a SIP status), and an
    /// error envelope would reach the SIP sender a second time, as a late-error notice.
    /// Nor is the intercluster link: its answerer reports each refusal in the `Forward`
    /// outcome, and the sending cluster bounces to the sender it knows (one error, not two).
    pub fn wants_bounces(&self) -> bool {
        !matches!(self, Origin::Sip { .. } | Origin::Intercluster { .. })
    }

    pub fn reply_link(&self) -> Link {
        match self {
            Origin::Component { home_node } => Link::Component {
                home_node: home_node.clone(),
            },
            Origin::S2s { domain } => Link::S2s {
                domain: domain.clone(),
            },
            Origin::Sip { domain } => Link::Sip {
                domain: domain.clone(),
            },
            Origin::Intercluster { cluster } => Link::Intercluster {
                cluster: cluster.clone(),
            },
        }
    }
}

/// Why an envelope is not delivered. Every variant has a fixed metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("federation with {0} is not allowed by policy")]
    DomainNotAllowed(Domain),
    #[error("sender {from} does not belong to the authenticated {origin} peer")]
    Spoofed { from: String, origin: &'static str },
    /// A home node sent as a local user it does not host (RFC 6120 §8.3.3.4 `<forbidden/>`:
    /// the link is authenticated, it is not authorised to speak for that user).
    #[error("{from} is not a user of home node {home_node}")]
    NotOwnUser { from: String, home_node: Arc<str> },
    #[error("{0} is not a local domain")]
    NotLocal(Domain),
    #[error("traffic between local users does not cross the gateway")]
    LocalToLocal,
    #[error("no home node is known for {0} and no routing node is configured")]
    NoHomeNode(String),
    /// Not a refusal yet: nobody here or in the intercluster index knows the local user `0`,
    /// and peer clusters are listed. The hub asks them (`Lookup`) before routing again; only
    /// when none has the user is the envelope routed as before (routing node, or refused).
    #[error("{0} is not placed yet: the peer clusters are asked")]
    AskPeers(String),
    /// An envelope from a peer cluster speaks for a local user that cluster does not host
    /// (intercluster anti-spoofing: the index places the user elsewhere, or nowhere).
    #[error("{from} is not a user of peer cluster {cluster}")]
    NotPeerUser { from: String, cluster: Arc<str> },
    /// Polite blocking (requirements §3): the local user's lists block this watcher. Never
    /// answered: the watcher must not learn it was blocked.
    #[error("the local user's consent lists block this watcher")]
    Blocked,
    #[error("{0} stanzas cannot be carried over SIP")]
    NotForSip(&'static str),
    #[error("nothing to deliver over SIP (a message without text, such as a chat state)")]
    NothingToDeliver,
    /// A group-chat room is addressed from or toward SIP federation: Lync and Skype for
    /// Business do not federate multi-party IM (seed 004), so rooms are offered over XMPP only.
    #[error(
        "group chat {0} is offered to XMPP federation only (SIP federation has no multi-party IM)"
    )]
    GroupChatNotForSip(Domain),
    #[error("presence from {system} state {state} cannot be translated: {why}")]
    Untranslatable {
        system: String,
        state: String,
        why: String,
    },
}

impl Denied {
    pub fn label(&self) -> &'static str {
        match self {
            Denied::DomainNotAllowed(_) => "domain_not_allowed",
            Denied::Spoofed { .. } => "spoofed_sender",
            Denied::NotOwnUser { .. } => "not_own_user",
            Denied::NotLocal(_) => "not_local",
            Denied::LocalToLocal => "local_to_local",
            Denied::NoHomeNode(_) => "no_home_node",
            Denied::AskPeers(_) => "asking_peers",
            Denied::NotPeerUser { .. } => "not_peer_user",
            Denied::Untranslatable { .. } => "untranslatable",
            Denied::NotForSip(_) => "not_for_sip",
            Denied::NothingToDeliver => "nothing_to_deliver",
            Denied::Blocked => "blocked",
            Denied::GroupChatNotForSip(_) => "group_chat_not_for_sip",
        }
    }

    pub fn condition(&self) -> ErrorCondition {
        match self {
            Denied::DomainNotAllowed(_) => ErrorCondition::NotAllowed,
            // Forbidden, not not-authorized: RFC 6120 §8.3.3.14 keeps `<not-authorized/>` for
            // missing or bad credentials (authentication); the component link did authenticate,
            // it lacks the permission to send as this user (§8.3.3.4, authorisation).
            Denied::Spoofed { .. } | Denied::NotOwnUser { .. } | Denied::NotPeerUser { .. } => {
                ErrorCondition::Forbidden
            }
            Denied::NotLocal(_) | Denied::NoHomeNode(_) | Denied::AskPeers(_) => {
                ErrorCondition::ItemNotFound
            }
            Denied::LocalToLocal | Denied::Blocked => ErrorCondition::NotAllowed,
            Denied::GroupChatNotForSip(_) => ErrorCondition::NotAllowed,
            Denied::Untranslatable { .. } | Denied::NotForSip(_) | Denied::NothingToDeliver => {
                ErrorCondition::ServiceUnavailable
            }
        }
    }

    /// Whether the sender is told (an error stanza or SIP response). A spoofed sender is not:
    /// the answer would go to someone else; a chat state is not worth an error. A home node
    /// sending as a local user it does not host is told, on its own link, so its operator sees
    /// why nothing arrived.
    pub fn answered(&self) -> bool {
        !matches!(
            self,
            Denied::Spoofed { .. }
                | Denied::NothingToDeliver
                | Denied::Blocked
                | Denied::NotPeerUser { .. }
        )
    }
}

/// A routing decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub link: Link,
    pub envelope: Envelope,
}

/// Most users the directory learns from traffic (a bound against growth; beyond it, users
/// are routed through the static lists and the routing node).
pub const MAX_LEARNED: usize = 1_000_000;

/// Which home node hosts which local user: the static `users` lists of the configuration
/// first (an operator's word outranks anything traffic suggests), then what was learned from
/// user traffic on each component link, then the routing node as last resort.
#[derive(Default)]
pub struct Directory {
    learned: DashMap<String, Arc<str>>,
    /// Where what is learned is written (the state store, through `directory_store`).
    sink: std::sync::OnceLock<DirectorySink>,
    /// Users a second home node sent as while the directory places them on another one
    /// (requirements §5: a user lives on one home node): reported, not resolved, because
    /// which node is right is the operator's call. Bounded by [`MAX_CONFLICTS`].
    conflicts: DashMap<String, (Arc<str>, Arc<str>)>,
    /// The intercluster peering, when this cluster has peers (see [`Mesh`]).
    mesh: std::sync::OnceLock<Arc<dyn Mesh>>,
}

/// What routing knows of the peer clusters of the same local domains (issue 13 §3): which
/// cluster a user lives in, and which cluster a conversation between one of our users and a
/// foreign user came through. Installed on the [`Directory`] by the peering; without it the
/// router behaves as a cluster without peers.
pub trait Mesh: Send + Sync {
    /// The peer cluster the local user `bare` lives in (synced, or learned by asking).
    fn cluster_of(&self, bare: &str) -> Option<Arc<str>>;
    /// The peer cluster that handed us traffic from `foreign` to our user `local` (both bare):
    /// the user's answers go back that way ("answers come back the same way"). Refreshes it.
    fn return_path(&self, local: &str, foreign: &str) -> Option<Arc<str>>;
    /// Remembers that traffic from `foreign` to our user `local` came from `cluster`.
    fn remember(&self, local: &str, foreign: &str, cluster: &Arc<str>);
    /// Whether the peers should be asked about the unplaced local user `bare`: peers are
    /// listed and no recent ask answered "nobody".
    fn should_ask(&self, bare: &str) -> bool;
}

/// Receives each user the directory learns (bare JID, home node).
pub type DirectorySink = Box<dyn Fn(&str, &Arc<str>) + Send + Sync>;

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory")
            .field("learned", &self.learned.len())
            .field("conflicts", &self.conflicts.len())
            .field("mesh", &self.mesh.get().is_some())
            .finish()
    }
}

/// Most conflicting users kept for `/status` (one is enough to show a misconfiguration; a
/// flood of them must not grow the node).
pub const MAX_CONFLICTS: usize = 100;

/// The home node whose `users` list names `user`, if any.
fn configured_home<'c>(config: &'c Config, user: &Address) -> Option<&'c str> {
    config
        .home_nodes
        .iter()
        .find(|h| {
            h.users
                .iter()
                .any(|u| u.localpart == user.local && u.domain == user.domain)
        })
        .map(|h| h.name.as_str())
}

/// Whether `home_node` may host users of `domain` it has not been seen or configured with.
/// Home nodes do not list their domains in the configuration, so a domain belongs to the nodes
/// whose `users` lists name it; a domain no list names may live anywhere. The routing node
/// receives every unknown user's traffic and so may host any local user; with one home node
/// there is nobody else to speak for.
fn may_host_domain(config: &Config, home_node: &str, domain: &Domain) -> bool {
    let lists = |h: &crate::config::HomeNode| h.users.iter().any(|u| u.domain == *domain);
    config.routing_node.as_deref() == Some(home_node)
        || config.home_nodes.len() == 1
        || config.home_node(home_node).is_some_and(lists)
        || !config.home_nodes.iter().any(lists)
}

impl Directory {
    /// User traffic from `user` arrived on `home_node`'s link, which may send as that user: that
    /// is where the user lives. Users of the static lists are not stored (the list wins anyway).
    pub fn learn(&self, config: &Config, user: &Address, home_node: &Arc<str>) {
        if configured_home(config, user).is_none() {
            self.remember(user, home_node);
        }
    }

    fn remember(&self, user: &Address, home_node: &Arc<str>) {
        let key = user.bare_string();
        if self.learned.len() >= MAX_LEARNED && !self.learned.contains_key(&key) {
            // Full: new users are still routed through the static lists and the routing
            // node; only the cache stops growing.
            return;
        }
        if self
            .learned
            .get(&key)
            .is_some_and(|h| Arc::ptr_eq(h.value(), home_node) || **h.value() == **home_node)
        {
            return;
        }
        if let Some(sink) = self.sink.get() {
            sink(&key, home_node);
        }
        self.learned.insert(key, home_node.clone());
    }

    /// Installs the intercluster peering (once).
    pub fn set_mesh(&self, mesh: Arc<dyn Mesh>) {
        let _ = self.mesh.set(mesh);
    }

    fn mesh(&self) -> Option<&Arc<dyn Mesh>> {
        self.mesh.get()
    }

    /// Remembers the way back of an envelope another node of this cluster routed from a peer
    /// cluster (its `via_cluster`), before it reaches the user's home node through our link:
    /// the user's answers come out of that link, on this node.
    pub fn remember_via(&self, env: &Envelope) {
        if let (Some(m), Some(cluster)) = (self.mesh(), env.via_cluster.as_ref()) {
            m.remember(&env.to.bare_string(), &env.from.bare_string(), cluster);
        }
    }

    /// The peer cluster a local user lives in, when no home node of ours is known to host
    /// them (ours first: a user listed or learned here is routed here).
    fn peer_cluster_of(&self, config: &Config, user: &Address) -> Option<Arc<str>> {
        let mesh = self.mesh()?;
        if self.known_home(config, user).is_some() {
            return None;
        }
        mesh.cluster_of(&user.bare_string())
    }

    /// Installs where learned users are written (once).
    pub fn set_sink(&self, sink: DirectorySink) {
        let _ = self.sink.set(sink);
    }

    /// Takes a user learned earlier (the state store at start, or another node through it)
    /// without writing it back. Ignored when the home node is no longer configured, the
    /// configuration lists the user (the list wins), or the directory is full.
    pub fn restore(&self, config: &Config, user: &Address, home_node: &str) -> bool {
        let Some(h) = config.home_node(home_node) else {
            return false;
        };
        if configured_home(config, user).is_some() {
            return false;
        }
        let key = user.bare_string();
        if self.learned.len() >= MAX_LEARNED && !self.learned.contains_key(&key) {
            return false;
        }
        self.learned.insert(key, Arc::from(h.name.as_str()));
        true
    }

    /// Forgets a learned user (an admin removed the entry from the store, `legate
    /// intercluster users remove`): routed again as an unknown user. A listed user stays.
    pub fn forget(&self, user: &Address) -> bool {
        self.learned.remove(&user.bare_string()).is_some()
    }

    /// The home node `user` lives on, if it is known (configured or learned).
    fn known_home(&self, config: &Config, user: &Address) -> Option<Arc<str>> {
        if let Some(h) = configured_home(config, user) {
            return Some(Arc::from(h));
        }
        self.learned
            .get(&user.bare_string())
            .map(|h| h.value().clone())
    }

    pub fn lookup(&self, config: &Config, user: &Address) -> Option<Arc<str>> {
        if let Some(h) = self.known_home(config, user) {
            return Some(h);
        }
        if let Some(r) = &config.routing_node {
            return Some(Arc::from(r.as_str()));
        }
        // A single home node needs no directory.
        match config.home_nodes.as_slice() {
            [only] => Some(Arc::from(only.name.as_str())),
            _ => None,
        }
    }

    /// Whether `home_node` may send as the local user `from`: a user a `users` list or the
    /// directory places on it, or a user nobody claims in a domain it may host. A user placed
    /// on another node is refused, so one home node cannot speak for another's users. When it
    /// may and `user_traffic` is set, an unclaimed user is learned as living on `home_node`
    /// (one pass over the static lists for both decisions: this runs for every stanza a home
    /// node sends).
    // A user who really moved to another home node is refused there until the learned entry
    // goes (restart), unless the operator lists them; learned entries do not expire today.
    pub fn admit_sender(
        &self,
        config: &Config,
        home_node: &Arc<str>,
        from: &Address,
        user_traffic: bool,
    ) -> bool {
        if config.home_node(home_node).is_none() {
            // A link whose node a reload removed speaks for nobody.
            return false;
        }
        match self.known_home(config, from) {
            Some(h) if *h == **home_node => true,
            Some(h) => {
                self.conflict(from, &h, home_node);
                false
            }
            None => {
                let may = may_host_domain(config, home_node, &from.domain);
                if may && user_traffic {
                    self.remember(from, home_node);
                }
                may
            }
        }
    }

    fn conflict(&self, user: &Address, placed: &Arc<str>, sender: &Arc<str>) {
        let key = user.bare_string();
        if self.conflicts.contains_key(&key) || self.conflicts.len() >= MAX_CONFLICTS {
            return;
        }
        tracing::warn!(
            user = %crate::net::LogSafe(&key),
            placed_on = %placed,
            sent_from = %sender,
            "a user is on two home nodes: traffic from the second is refused until the \
             operator lists the user under one home node's `users` (or removes the account)"
        );
        self.conflicts.insert(key, (placed.clone(), sender.clone()));
    }

    /// Users seen on two home nodes: (user, the node the directory places them on, the other
    /// node that sent as them), sorted by user.
    pub fn conflicts(&self) -> Vec<(String, Arc<str>, Arc<str>)> {
        let mut v: Vec<_> = self
            .conflicts
            .iter()
            .map(|e| (e.key().clone(), e.value().0.clone(), e.value().1.clone()))
            .collect();
        v.sort();
        v
    }

    pub fn len(&self) -> usize {
        self.learned.len()
    }

    pub fn is_empty(&self) -> bool {
        self.learned.is_empty()
    }
}

/// The mapping system presence is expressed in on a given link.
pub fn link_system<'c>(config: &'c Config, link: &Link) -> Option<&'c str> {
    match link {
        Link::Component { home_node } => config
            .home_node(home_node)
            .map(|h| h.default_system.as_str()),
        Link::S2s { domain } => Some(
            config
                .xmpp_domain(domain)
                .map_or("fed-xmpp", |d| d.system.as_str()),
        ),
        Link::Sip { domain } => config.sip_federated(domain).map(|d| d.system.as_str()),
        // The answering cluster translates for its own destination (see `finish`).
        Link::Intercluster { .. } => None,
    }
}

/// Translates `body` into `target` system through the mapping set.
pub fn translate_presence(
    maps: &MappingSet,
    body: &PresenceBody,
    target: &str,
) -> Result<PresenceBody, Denied> {
    let untranslatable = |why: String| Denied::Untranslatable {
        system: body.system.to_string(),
        state: body.state.to_string(),
        why,
    };
    let from = maps
        .system_id(&body.system)
        .ok_or_else(|| untranslatable("unknown source system".into()))?;
    let to = maps
        .system_id(target)
        .ok_or_else(|| untranslatable(format!("unknown target system {target}")))?;
    let state = maps
        .system(from)
        .state_id(&body.state)
        .ok_or_else(|| untranslatable("unknown state".into()))?;
    let t = maps.translate(from, to, state, body.note.as_deref());
    Ok(PresenceBody {
        system: maps.system(to).name.clone(),
        state: maps.system(to).state(t.state).name.clone(),
        note: t.note.map(|n| n.into_owned()),
        priority: body.priority,
    })
}

/// An envelope the router will not deliver, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub denied: Denied,
    pub envelope: Box<Envelope>,
}

fn refuse(denied: Denied, env: Envelope) -> Refusal {
    Refusal {
        denied,
        envelope: Box::new(env),
    }
}

/// Decides where `env`, received from `origin`, goes.
pub fn route(
    config: &Config,
    maps: &MappingSet,
    directory: &Directory,
    origin: &Origin,
    mut env: Envelope,
) -> Result<Route, Refusal> {
    // Only the routing of a peer cluster's envelope says which cluster it came through.
    env.via_cluster = None;
    let link = match origin {
        Origin::Component { home_node } => {
            // A room (or an occupant's room JID) of a chat-room alias speaks through the home
            // node hosting that alias, and only that one; rooms are not users, so the
            // directory does not learn them.
            let room = config.chat_node(&env.from.domain);
            if let Some(chat) = room {
                if *chat.home_node != **home_node {
                    let d = Denied::NotOwnUser {
                        from: env.from.bare_string(),
                        home_node: home_node.clone(),
                    };
                    return Err(refuse(d, env));
                }
            } else if !config.is_local_domain(&env.from.domain) {
                let d = Denied::Spoofed {
                    from: env.from.bare_string(),
                    origin: "component",
                };
                return Err(refuse(d, env));
            } else {
                // A home node speaks only for its own users: the component secret
                // authenticates the node, not every address it writes in `from`. The directory
                // learns only from what a user sends: errors, iq results and subscription
                // refusals are the home node answering for addresses a foreign peer made up,
                // and must not fill it.
                let user_traffic = env.is_user_traffic();
                if !directory.admit_sender(config, home_node, &env.from, user_traffic) {
                    let d = Denied::NotOwnUser {
                        from: env.from.bare_string(),
                        home_node: home_node.clone(),
                    };
                    return Err(refuse(d, env));
                }
            }
            let d = &env.to.domain;
            if config.serves_xmpp_domain(d) {
                // The local side of the mesh: a user of ours writing to a user of the same
                // domain who lives in a peer cluster. Anyone else local stays between users.
                if room.is_none() && config.is_local_domain(d) {
                    if let Some(cluster) = directory.peer_cluster_of(config, &env.to) {
                        return finish(config, maps, Link::Intercluster { cluster }, env);
                    }
                    // Nobody placed them: the peers are asked first (the home node handed
                    // it on because it has no such account); when none has them, nobody does.
                    if let (None, Some(m)) =
                        (directory.known_home(config, &env.to), directory.mesh())
                    {
                        let bare = env.to.bare_string();
                        let d = if m.should_ask(&bare) {
                            Denied::AskPeers(bare)
                        } else {
                            Denied::NoHomeNode(bare)
                        };
                        return Err(refuse(d, env));
                    }
                }
                return Err(refuse(Denied::LocalToLocal, env));
            }
            let link = if config.sip_federated(d).is_some() {
                if room.is_some() {
                    let alias = env.from.domain.clone();
                    return Err(refuse(Denied::GroupChatNotForSip(alias), env));
                }
                Link::Sip { domain: d.clone() }
            } else if config.xmpp_federation_allowed(d) {
                Link::S2s { domain: d.clone() }
            } else {
                return Err(refuse(Denied::DomainNotAllowed(d.clone()), env));
            };
            // Answers come back the same way: when the foreign user's traffic reached this
            // user through a peer cluster, that cluster holds the SIP dialog or s2s stream the
            // foreign side expects, so the answer goes out there (our policy above applied).
            match directory
                .mesh()
                .filter(|_| room.is_none())
                .and_then(|m| m.return_path(&env.from.bare_string(), &env.to.bare_string()))
            {
                Some(cluster) => Link::Intercluster { cluster },
                None => link,
            }
        }
        Origin::Intercluster { cluster } => {
            let link = match from_peer_cluster(config, directory, cluster, &env) {
                Ok(l) => l,
                Err(d) => return Err(refuse(d, env)),
            };
            // A foreign user's envelope for one of ours: the node holding the user's link
            // (maybe another node of ours) remembers the way back too (see `Mesh`).
            if matches!(link, Link::Component { .. })
                && !config.is_local_domain(&env.from.domain)
                && !matches!(env.body, Body::Error { .. })
            {
                env.via_cluster = Some(cluster.clone());
            }
            link
        }
        Origin::S2s { domain } | Origin::Sip { domain } => {
            if env.from.domain != *domain {
                let d = Denied::Spoofed {
                    from: env.from.bare_string(),
                    origin: origin.label(),
                };
                return Err(refuse(d, env));
            }
            let allowed = match origin {
                Origin::Sip { .. } => config.sip_federated(domain).is_some(),
                _ => config.xmpp_federation_allowed(domain),
            };
            if !allowed {
                return Err(refuse(Denied::DomainNotAllowed(domain.clone()), env));
            }
            if let Some(chat) = config.chat_node(&env.to.domain) {
                if matches!(origin, Origin::Sip { .. }) {
                    let alias = chat.alias.clone();
                    return Err(refuse(Denied::GroupChatNotForSip(alias), env));
                }
                let home_node = Arc::from(chat.home_node.as_str());
                return finish(config, maps, Link::Component { home_node }, env);
            }
            if !config.is_local_domain(&env.to.domain) {
                return Err(refuse(Denied::NotLocal(env.to.domain.clone()), env));
            }
            // A user a home node of ours hosts first; then one a peer cluster hosts (issue
            // 13: forwarded there); then, before the routing node or a refusal, the peers
            // are asked about a user nobody placed yet.
            if let Some(home_node) = directory.known_home(config, &env.to) {
                Link::Component { home_node }
            } else if let Some(cluster) = directory.peer_cluster_of(config, &env.to) {
                Link::Intercluster { cluster }
            } else if directory
                .mesh()
                .is_some_and(|m| m.should_ask(&env.to.bare_string()))
            {
                return Err(refuse(Denied::AskPeers(env.to.bare_string()), env));
            } else {
                match directory.lookup(config, &env.to) {
                    Some(home_node) => Link::Component { home_node },
                    None => return Err(refuse(Denied::NoHomeNode(env.to.bare_string()), env)),
                }
            }
        }
    };
    finish(config, maps, link, env)
}

/// Where an envelope a peer cluster forwarded goes (see [`route`]). A peer is trusted for
/// what its own edge authenticated (the foreign sender), never for our users or for users of
/// a third cluster; it never makes us a transit to yet another cluster.
fn from_peer_cluster(
    config: &Config,
    directory: &Directory,
    cluster: &Arc<str>,
    env: &Envelope,
) -> Result<Link, Denied> {
    let from_local = config.is_local_domain(&env.from.domain);
    let to_local = config.is_local_domain(&env.to.domain);
    let not_peer_user = || Denied::NotPeerUser {
        from: env.from.bare_string(),
        cluster: cluster.clone(),
    };
    match (from_local, to_local) {
        // A foreign user writing to one of ours through the peer's edge: our federation policy
        // applies too (the policies live where the user lives), then our directory.
        (false, true) => {
            let d = &env.from.domain;
            if config.sip_federated(d).is_none() && !config.xmpp_federation_allowed(d) {
                return Err(Denied::DomainNotAllowed(d.clone()));
            }
            let home_node = directory
                .lookup(config, &env.to)
                .ok_or_else(|| Denied::NoHomeNode(env.to.bare_string()))?;
            // An error is not the foreign side writing: it must not keep alive (or create) a
            // way back, least of all the bounce of an answer the peer could not take.
            if let Some(m) = directory
                .mesh()
                .filter(|_| !matches!(env.body, Body::Error { .. }))
            {
                m.remember(&env.to.bare_string(), &env.from.bare_string(), cluster);
            }
            Ok(Link::Component { home_node })
        }
        // A user of the peer answering a foreign user whose dialog this cluster holds: sent
        // out as if a home node of ours had written it, provided the index places the user in
        // that very peer.
        (true, false) => {
            let placed = directory
                .mesh()
                .and_then(|m| m.cluster_of(&env.from.bare_string()));
            if placed.as_deref() != Some(&**cluster) {
                return Err(not_peer_user());
            }
            let d = &env.to.domain;
            if config.chat_node(d).is_some() {
                // Rooms are reached on the cluster that hosts them, not through a peer.
                return Err(Denied::NotLocal(d.clone()));
            }
            if config.sip_federated(d).is_some() {
                Ok(Link::Sip { domain: d.clone() })
            } else if config.xmpp_federation_allowed(d) {
                Ok(Link::S2s { domain: d.clone() })
            } else {
                Err(Denied::DomainNotAllowed(d.clone()))
            }
        }
        // Between users of the two clusters: the sender may not be one of ours, nor a user the
        // index places in a third cluster (a user not synced yet is taken on the peer's word).
        (true, true) => {
            let elsewhere = directory
                .mesh()
                .and_then(|m| m.cluster_of(&env.from.bare_string()))
                .is_some_and(|c| *c != **cluster);
            if elsewhere || directory.known_home(config, &env.from).is_some() {
                return Err(not_peer_user());
            }
            directory
                .lookup(config, &env.to)
                .map(|home_node| Link::Component { home_node })
                .ok_or_else(|| Denied::NoHomeNode(env.to.bare_string()))
        }
        (false, false) => Err(Denied::NotLocal(env.to.domain.clone())),
    }
}

/// The last stage of [`route`] once the link is chosen: presence translated into the
/// destination's system, and XMPP stanzas bound for SIP reduced to what SIP carries.
fn finish(
    config: &Config,
    maps: &MappingSet,
    link: Link,
    mut env: Envelope,
) -> Result<Route, Refusal> {
    if matches!(link, Link::Intercluster { .. }) {
        // The answering cluster routes it again and translates for the link it chooses (its
        // home node's system, or the foreign peer's): one translation, where the target is
        // known.
        return Ok(Route {
            link,
            envelope: env,
        });
    }
    if let Body::Presence(p) = &env.body {
        let target = match link_system(config, &link) {
            Some(t) => t,
            None => {
                let why = "no mapping system for the destination".to_string();
                let d = Denied::Untranslatable {
                    system: p.system.to_string(),
                    state: p.state.to_string(),
                    why,
                };
                return Err(refuse(d, env));
            }
        };
        match translate_presence(maps, p, target) {
            Ok(t) => env.body = Body::Presence(t),
            Err(d) => return Err(refuse(d, env)),
        }
    }
    if matches!(link, Link::Sip { .. }) {
        // SIP carries text only: a relayed XMPP message becomes its text; anything else stops.
        if let Body::Xmpp(raw) = &env.body {
            match (raw.name, crate::xmpp::convert::message_text(raw)) {
                ("message", Some(m)) => env.body = Body::Message(m),
                // RFC 7572 §5 maps one-to-one messages only; a room's traffic is RFC 7702's.
                ("message", None) if raw.facts().type_.as_deref() == Some("groupchat") => {
                    return Err(refuse(Denied::NotForSip("groupchat message"), env))
                }
                ("message", None) => return Err(refuse(Denied::NothingToDeliver, env)),
                (name, _) => return Err(refuse(Denied::NotForSip(name), env)),
            }
        }
    }
    Ok(Route {
        link,
        envelope: env,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, BUILTIN_SYSTEMS};
    use crate::gateway::envelope::{MessageBody, Subscription};
    use crate::presence::map;
    use std::path::Path;

    const CONFIG: &str = r#"
routing_node = "hn1"
[[local_domain]]
name = "example.com"
[[local_domain]]
name = "other.test"
[[sip.federated_domain]]
name = "partner.com"
system = "lync"
[xmpp.federation]
mode = "allow_list"
[[xmpp.federation.domain]]
name = "webex.test"
system = "webex"
[[home_node]]
name = "hn1"
addresses = ["127.0.0.1:5347"]
component_secret = "a-long-enough-secret-1"
users = ["erin@other.test"]
default_system = "xmpp"
[[home_node]]
name = "hn2"
addresses = ["127.0.0.1:5348"]
component_secret = "a-long-enough-secret-2"
users = ["carol@example.com"]
default_system = "jabber8"
[[chat_node]]
alias = "conference.example.com"
home_node = "hn2"
"#;

    fn setup() -> (Config, MappingSet, Directory) {
        let cfg = config::from_toml(CONFIG, Path::new("test.toml"), BUILTIN_SYSTEMS)
            .expect("valid config");
        (cfg, map::embedded().expect("maps"), Directory::default())
    }

    fn addr(s: &str) -> Address {
        Address::parse(s).expect("address")
    }

    fn presence(system: &str, state: &str, note: Option<&str>) -> Body {
        Body::Presence(PresenceBody {
            system: system.into(),
            state: state.into(),
            note: note.map(str::to_string),
            priority: None,
        })
    }

    fn env(from: &str, to: &str, body: Body) -> Envelope {
        Envelope {
            from: addr(from),
            to: addr(to),
            body,
            stanza_id: None,
            via_cluster: None,
        }
    }

    fn dom(s: &str) -> Domain {
        Domain::parse(s).expect("domain")
    }

    #[test]
    fn sip_presence_reaches_the_home_node_translated() {
        let (cfg, maps, dir) = setup();
        let origin = Origin::Sip {
            domain: dom("partner.com"),
        };
        let r = route(
            &cfg,
            &maps,
            &dir,
            &origin,
            env(
                "bob@partner.com",
                "alice@example.com",
                presence("lync", "busy", None),
            ),
        )
        .expect("routed");
        assert_eq!(
            r.link,
            Link::Component {
                home_node: "hn1".into()
            }
        );
        assert_eq!(r.envelope.body, presence("xmpp", "away", Some("Busy")));

        // carol is statically on hn2, whose users run Jabber 8: busy stays busy.
        let r = route(
            &cfg,
            &maps,
            &dir,
            &origin,
            env(
                "bob@partner.com",
                "carol@example.com",
                presence("lync", "busy", None),
            ),
        )
        .expect("routed");
        assert_eq!(
            r.link,
            Link::Component {
                home_node: "hn2".into()
            }
        );
        assert_eq!(r.envelope.body, presence("jabber8", "busy", None));
    }

    #[test]
    fn local_users_reach_foreign_domains_on_the_right_link_and_are_learned() {
        let (cfg, maps, dir) = setup();
        let hn2: Arc<str> = "hn2".into();
        let origin = Origin::Component {
            home_node: hn2.clone(),
        };
        let r = route(
            &cfg,
            &maps,
            &dir,
            &origin,
            env(
                "dave@example.com",
                "bob@partner.com",
                presence("jabber8", "busy", None),
            ),
        )
        .expect("routed");
        assert_eq!(
            r.link,
            Link::Sip {
                domain: dom("partner.com")
            }
        );
        assert_eq!(r.envelope.body, presence("lync", "busy", None));
        assert_eq!(dir.lookup(&cfg, &addr("dave@example.com")), Some(hn2));

        let r = route(
            &cfg,
            &maps,
            &dir,
            &origin,
            env(
                "dave@example.com",
                "x@webex.test",
                Body::Subscription(Subscription::Subscribe),
            ),
        )
        .expect("routed");
        assert_eq!(
            r.link,
            Link::S2s {
                domain: dom("webex.test")
            }
        );
    }

    fn err_of(r: Result<Route, Refusal>) -> Denied {
        match r {
            Ok(r) => panic!("routed to {:?}", r.link),
            Err(e) => e.denied,
        }
    }

    #[test]
    fn chat_aliases_route_to_their_home_node_and_only_over_xmpp() {
        let (cfg, maps, dir) = setup();
        let msg = || {
            Body::Message(MessageBody {
                id: Some("g1".into()),
                text: "hello room".into(),
                thread: None,
                ..Default::default()
            })
        };
        // A foreign XMPP user joining or talking in a room goes to the alias's home node
        // (hn2), whatever the directory or the routing node (hn1) would say of a user.
        let s2s = Origin::S2s {
            domain: dom("webex.test"),
        };
        let r = route(
            &cfg,
            &maps,
            &dir,
            &s2s,
            env("x@webex.test/pc", "lobby@conference.example.com/x", msg()),
        )
        .expect("routed");
        assert_eq!(
            r.link,
            Link::Component {
                home_node: "hn2".into()
            }
        );
        assert!(dir.is_empty(), "a room is not a user to learn");

        // The room answers through hn2, toward the foreign occupant.
        let hn2 = Origin::Component {
            home_node: "hn2".into(),
        };
        let r = route(
            &cfg,
            &maps,
            &dir,
            &hn2,
            env(
                "lobby@conference.example.com/alice",
                "x@webex.test/pc",
                msg(),
            ),
        )
        .expect("routed");
        assert_eq!(
            r.link,
            Link::S2s {
                domain: dom("webex.test")
            }
        );
        assert!(dir.is_empty(), "a room is not a user to learn");

        // Another home node may not speak for the rooms.
        let hn1 = Origin::Component {
            home_node: "hn1".into(),
        };
        let d = err_of(route(
            &cfg,
            &maps,
            &dir,
            &hn1,
            env(
                "lobby@conference.example.com/alice",
                "x@webex.test/pc",
                msg(),
            ),
        ));
        assert!(matches!(d, Denied::NotOwnUser { .. }), "{d:?}");

        // SIP federation gets a clear refusal both ways (no multi-party IM with Lync).
        let sip = Origin::Sip {
            domain: dom("partner.com"),
        };
        let d = err_of(route(
            &cfg,
            &maps,
            &dir,
            &sip,
            env("bob@partner.com", "lobby@conference.example.com", msg()),
        ));
        assert_eq!(d, Denied::GroupChatNotForSip(dom("conference.example.com")));
        assert!(d.answered());
        let d = err_of(route(
            &cfg,
            &maps,
            &dir,
            &hn2,
            env(
                "lobby@conference.example.com/alice",
                "bob@partner.com",
                msg(),
            ),
        ));
        assert_eq!(d, Denied::GroupChatNotForSip(dom("conference.example.com")));

        // A room never reaches a local user through the gateway.
        let d = err_of(route(
            &cfg,
            &maps,
            &dir,
            &hn2,
            env(
                "lobby@conference.example.com/alice",
                "carol@example.com",
                msg(),
            ),
        ));
        assert_eq!(d, Denied::LocalToLocal);
    }

    #[test]
    fn relayed_xmpp_messages_reach_sip_as_text_and_other_stanzas_stop() {
        let (cfg, maps, dir) = setup();
        let comp = Origin::Component {
            home_node: "hn1".into(),
        };
        let raw = |name: &'static str, xml: &'static str| {
            Body::Xmpp(crate::gateway::envelope::XmppRaw::new(
                name,
                bytes::Bytes::from_static(xml.as_bytes()),
            ))
        };
        let chat = raw("message", "<message type='chat' to='bob@partner.com' from='a@example.com/pc' id='m1'><body>hi &lt;3</body></message>");
        let r = route(
            &cfg,
            &maps,
            &dir,
            &comp,
            env("a@example.com/pc", "bob@partner.com", chat),
        )
        .expect("routed");
        assert_eq!(
            r.envelope.body,
            Body::Message(MessageBody {
                id: Some("m1".into()),
                text: "hi <3".into(),
                thread: None,
                ..Default::default()
            })
        );
        let typing = raw("message", "<message to='bob@partner.com' from='a@example.com/pc'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>");
        let d = route(
            &cfg,
            &maps,
            &dir,
            &comp,
            env("a@example.com/pc", "bob@partner.com", typing),
        )
        .expect_err("nothing to send")
        .denied;
        assert_eq!(d, Denied::NothingToDeliver);
        assert!(!d.answered());
        let iq = raw("iq", "<iq type='get' id='v1' to='bob@partner.com' from='a@example.com/pc'><query xmlns='jabber:iq:version'/></iq>");
        let d = route(
            &cfg,
            &maps,
            &dir,
            &comp,
            env("a@example.com/pc", "bob@partner.com", iq),
        )
        .expect_err("no iq over SIP")
        .denied;
        assert_eq!(d.label(), "not_for_sip");
        // Toward XMPP federation the stanza stays as it was.
        let chat = raw(
            "message",
            "<message to='x@webex.test' from='a@example.com'><body>hi</body></message>",
        );
        let r = route(
            &cfg,
            &maps,
            &dir,
            &comp,
            env("a@example.com", "x@webex.test", chat.clone()),
        )
        .expect("routed");
        assert_eq!(r.envelope.body, chat);
    }

    #[test]
    fn the_directory_learns_from_users_not_from_errors_and_folds_case() {
        let (cfg, maps, dir) = setup();
        let comp = Origin::Component {
            home_node: "hn2".into(),
        };
        let e = env(
            "ghost@example.com",
            "bob@partner.com",
            Body::Subscription(Subscription::Unsubscribed),
        );
        route(&cfg, &maps, &dir, &comp, e).expect("routed");
        assert!(dir.is_empty(), "a refusal taught the directory a user");
        let e = env(
            "Dave@example.com/pc",
            "bob@partner.com",
            Body::Subscription(Subscription::Subscribe),
        );
        route(&cfg, &maps, &dir, &comp, e).expect("routed");
        assert_eq!(
            dir.lookup(&cfg, &addr("dave@EXAMPLE.com")),
            Some(Arc::from("hn2"))
        );
    }

    #[test]
    fn policy_refusals_say_why() {
        let (cfg, maps, dir) = setup();
        let msg = || {
            Body::Message(MessageBody {
                id: None,
                text: "hi".into(),
                thread: None,
                ..Default::default()
            })
        };
        let comp = Origin::Component {
            home_node: "hn1".into(),
        };
        let cases = [
            (
                comp.clone(),
                env("a@example.com", "z@jabber.test", msg()),
                "domain_not_allowed",
            ),
            (
                comp.clone(),
                env("a@evil.test", "z@partner.com", msg()),
                "spoofed_sender",
            ),
            (
                comp,
                env("a@example.com", "b@example.com", msg()),
                "local_to_local",
            ),
            (
                Origin::Sip {
                    domain: dom("partner.com"),
                },
                env("x@other.com", "a@example.com", msg()),
                "spoofed_sender",
            ),
            (
                Origin::Sip {
                    domain: dom("stranger.com"),
                },
                env("x@stranger.com", "a@example.com", msg()),
                "domain_not_allowed",
            ),
            (
                Origin::S2s {
                    domain: dom("partner.com"),
                },
                env("x@partner.com", "a@example.com", msg()),
                "domain_not_allowed",
            ),
            (
                Origin::S2s {
                    domain: dom("webex.test"),
                },
                env("x@webex.test", "a@imp.example.com", msg()),
                "not_local",
            ),
        ];
        for (origin, e, label) in cases {
            let d = route(&cfg, &maps, &dir, &origin, e.clone())
                .expect_err("refused")
                .denied;
            assert_eq!(d.label(), label, "{e:?}: {d}");
        }
    }

    fn raw(name: &'static str, xml: &str) -> Body {
        Body::Xmpp(crate::gateway::envelope::XmppRaw::new(
            name,
            bytes::Bytes::copy_from_slice(xml.as_bytes()),
        ))
    }

    #[test]
    fn a_home_node_may_only_send_as_its_own_users() {
        let (cfg, maps, dir) = setup();
        let hn1 = Origin::Component {
            home_node: "hn1".into(),
        };
        let hn2 = Origin::Component {
            home_node: "hn2".into(),
        };
        let msg = |from: &str| {
            env(
                from,
                "bob@partner.com",
                raw(
                    "message",
                    &format!("<message from='{from}' to='bob@partner.com' id='s1'><body>hi</body></message>"),
                ),
            )
        };
        // carol is listed on hn2: hn2 may speak for her, hn1 (even the routing node) may not.
        route(&cfg, &maps, &dir, &hn2, msg("carol@example.com/pc")).expect("hn2's own user");
        let r = route(&cfg, &maps, &dir, &hn1, msg("carol@example.com/pc"))
            .expect_err("carol is not on hn1");
        assert_eq!(
            r.denied,
            Denied::NotOwnUser {
                from: "carol@example.com".into(),
                home_node: "hn1".into()
            }
        );
        assert_eq!(r.denied.label(), "not_own_user");
        assert_eq!(r.denied.condition(), ErrorCondition::Forbidden);
        assert!(r.denied.answered(), "the home node is told why");
        // other.test's users are listed on hn1 only: hn2 may not send as any of them, known
        // or not; hn1 may.
        for user in ["erin@other.test", "zed@other.test"] {
            let d = route(&cfg, &maps, &dir, &hn2, msg(user))
                .expect_err("another node's domain")
                .denied;
            assert_eq!(d.label(), "not_own_user", "{user}");
            route(&cfg, &maps, &dir, &hn1, msg(user)).expect("hn1 hosts other.test");
        }
        // dave is nobody's yet: hn2 serves example.com (it lists carol), sends as him, and from
        // then on he is hn2's; hn1 may no longer speak for him.
        route(&cfg, &maps, &dir, &hn2, msg("dave@example.com")).expect("unclaimed user");
        assert_eq!(
            dir.lookup(&cfg, &addr("dave@example.com")),
            Some(Arc::from("hn2"))
        );
        let d = route(&cfg, &maps, &dir, &hn1, msg("dave@example.com"))
            .expect_err("dave lives on hn2")
            .denied;
        assert_eq!(d.label(), "not_own_user");
        assert_eq!(
            dir.lookup(&cfg, &addr("dave@example.com")),
            Some(Arc::from("hn2")),
            "a refused stanza taught the directory"
        );
        // Each user a second node sent as is reported once, with both nodes.
        route(&cfg, &maps, &dir, &hn1, msg("dave@example.com")).expect_err("again");
        let c: Vec<(String, String, String)> = dir
            .conflicts()
            .into_iter()
            .map(|(u, a, b)| (u, a.to_string(), b.to_string()))
            .collect();
        let row = |u: &str, a: &str, b: &str| (u.to_string(), a.to_string(), b.to_string());
        assert_eq!(
            c,
            vec![
                row("carol@example.com", "hn2", "hn1"),
                row("dave@example.com", "hn2", "hn1"),
                row("erin@other.test", "hn1", "hn2"),
            ]
        );
        // A link whose node is not configured (removed by a reload) speaks for nobody.
        let gone = Origin::Component {
            home_node: "hn9".into(),
        };
        let d = route(&cfg, &maps, &dir, &gone, msg("frank@example.com"))
            .expect_err("unknown node")
            .denied;
        assert_eq!(d.label(), "not_own_user");
    }

    #[test]
    fn the_directory_does_not_learn_from_replies_of_a_home_node() {
        let (cfg, maps, dir) = setup();
        let comp = Origin::Component {
            home_node: "hn1".into(),
        };
        // What a home node sends back when a foreign peer probes random localparts.
        let replies = [
            raw("iq", "<iq type='error' id='q1' from='ghost1@example.com' to='bob@partner.com'><error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>"),
            raw("iq", "<iq type='result' id='q2' from='ghost2@example.com' to='bob@partner.com'/>"),
            raw("message", "<message type='error' id='q3' from='ghost3@example.com' to='bob@partner.com'><error type='cancel'><gone xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"),
            raw("presence", "<presence type='error' from='ghost4@example.com' to='bob@partner.com'><error type='cancel'><gone xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></presence>"),
            Body::Subscription(Subscription::Unsubscribed),
        ];
        for (i, body) in replies.into_iter().enumerate() {
            let from = format!("ghost{}@example.com", i + 1);
            // Relayed toward XMPP federation, where raw stanzas travel unchanged.
            let _ = route(&cfg, &maps, &dir, &comp, env(&from, "x@webex.test", body));
        }
        assert!(dir.is_empty(), "a reply taught the directory a user");
        // A request is user traffic.
        let get = raw(
            "iq",
            "<iq type='get' id='v1' from='gina@example.com/pc' to='x@webex.test'><ping xmlns='urn:xmpp:ping'/></iq>",
        );
        route(
            &cfg,
            &maps,
            &dir,
            &comp,
            env("gina@example.com/pc", "x@webex.test", get),
        )
        .expect("routed");
        assert_eq!(dir.len(), 1);
    }

    #[test]
    fn configured_users_win_over_learned_entries() {
        let (cfg, _, dir) = setup();
        let hn1: Arc<str> = "hn1".into();
        // Whatever traffic suggests, carol is listed on hn2.
        dir.learn(&cfg, &addr("carol@example.com"), &hn1);
        assert_eq!(
            dir.lookup(&cfg, &addr("Carol@example.com")),
            Some(Arc::from("hn2"))
        );
        assert!(dir.is_empty(), "a listed user was stored as learned");
        dir.learn(&cfg, &addr("dave@example.com"), &hn1);
        assert_eq!(dir.lookup(&cfg, &addr("dave@example.com")), Some(hn1));
    }
}

#[cfg(test)]
mod intercluster_tests {
    use super::*;
    use crate::config::{self, BUILTIN_SYSTEMS};
    use crate::gateway::envelope::{MessageBody, Subscription};
    use crate::intercluster::{index::Index, keys, routes::Routing};
    use crate::presence::map;
    use std::path::Path;

    const CONFIG: &str = r#"
[[local_domain]]
name = "example.com"
[[sip.federated_domain]]
name = "partner.com"
system = "lync"
[xmpp.federation]
mode = "allow_list"
[[xmpp.federation.domain]]
name = "webex.test"
[[home_node]]
name = "hn1"
addresses = ["127.0.0.1:5347"]
component_secret = "a-long-enough-secret-1"
users = ["alice@example.com"]
default_system = "xmpp"
"#;

    /// Cluster "here" with one home node (alice listed), and the index placing carol in "b".
    fn setup() -> (Config, map::MappingSet, Directory, Arc<Routing>) {
        let cfg = config::from_toml(CONFIG, Path::new("t.toml"), BUILTIN_SYSTEMS).expect("cfg");
        let index = Arc::new(Index::default());
        index.apply(&keys::user("b", "carol@example.com"), Some(b""));
        let routing = Arc::new(Routing::new(index, &[Arc::from("b"), Arc::from("c")]));
        let dir = Directory::default();
        dir.set_mesh(routing.clone());
        (cfg, map::embedded().expect("maps"), dir, routing)
    }

    fn env(from: &str, to: &str, body: Body) -> Envelope {
        Envelope {
            from: Address::parse(from).expect("from"),
            to: Address::parse(to).expect("to"),
            body,
            stanza_id: None,
            via_cluster: None,
        }
    }

    fn msg() -> Body {
        Body::Message(MessageBody {
            id: Some("m1".into()),
            text: "hi".into(),
            ..Default::default()
        })
    }

    fn dom(s: &str) -> Domain {
        Domain::parse(s).expect("domain")
    }

    fn peer(name: &str) -> Origin {
        Origin::Intercluster {
            cluster: Arc::from(name),
        }
    }

    fn ic(name: &str) -> Link {
        Link::Intercluster {
            cluster: Arc::from(name),
        }
    }

    #[test]
    fn foreign_traffic_for_a_user_of_a_peer_goes_to_that_peer_untranslated() {
        let (cfg, maps, dir, _) = setup();
        let sip = Origin::Sip {
            domain: dom("partner.com"),
        };
        let busy = Body::Presence(PresenceBody {
            system: "lync".into(),
            state: "busy".into(),
            note: None,
            priority: None,
        });
        let r = route(
            &cfg,
            &maps,
            &dir,
            &sip,
            env("bob@partner.com", "carol@example.com", busy.clone()),
        )
        .expect("routed");
        assert_eq!(r.link, ic("b"));
        assert_eq!(r.envelope.body, busy, "the peer translates, not us");
        // Our own user stays ours; the domain policy still applies on the receiving edge.
        let r = route(
            &cfg,
            &maps,
            &dir,
            &sip,
            env("bob@partner.com", "alice@example.com", msg()),
        )
        .expect("routed");
        assert_eq!(r.link.label(), "component");
        let s2s = Origin::S2s {
            domain: dom("jabber.test"),
        };
        let d = route(
            &cfg,
            &maps,
            &dir,
            &s2s,
            env("x@jabber.test", "carol@example.com", msg()),
        )
        .expect_err("not federated")
        .denied;
        assert_eq!(d.label(), "domain_not_allowed");
    }

    #[test]
    fn unplaced_users_are_asked_about_then_routed_as_before() {
        let (cfg, maps, dir, routing) = setup();
        let sip = Origin::Sip {
            domain: dom("partner.com"),
        };
        let d = route(
            &cfg,
            &maps,
            &dir,
            &sip,
            env("bob@partner.com", "zed@example.com", msg()),
        )
        .expect_err("asked first")
        .denied;
        assert_eq!(d, Denied::AskPeers("zed@example.com".into()));
        // Nobody has zed: the single home node takes it, as without peers.
        routing.mark_absent("zed@example.com");
        let r = route(
            &cfg,
            &maps,
            &dir,
            &sip,
            env("bob@partner.com", "zed@example.com", msg()),
        )
        .expect("routed");
        assert_eq!(r.link.label(), "component");
    }

    #[test]
    fn a_peer_delivers_to_our_users_and_our_answers_go_back_through_it() {
        let (cfg, maps, dir, routing) = setup();
        // b forwards bob's message to alice (ours): our directory, and b is remembered.
        let r = route(
            &cfg,
            &maps,
            &dir,
            &peer("b"),
            env("bob@partner.com/pc", "alice@example.com", msg()),
        )
        .expect("routed");
        assert_eq!(
            r.link,
            Link::Component {
                home_node: "hn1".into()
            }
        );
        assert_eq!(routing.return_paths(), 1);
        // The envelope says where it came from, for the node of ours holding hn1's link.
        assert_eq!(r.envelope.via_cluster.as_deref(), Some("b"));
        let (_, _, other_node, other) = setup();
        other_node.remember_via(&r.envelope);
        assert_eq!(
            other
                .return_path("alice@example.com", "bob@partner.com")
                .as_deref(),
            Some("b"),
            "the link holder learns the way back from the envelope"
        );
        // What a peer cluster claims in that field is not taken.
        let mut claimed = env("bob@partner.com/pc", "alice@example.com", msg());
        claimed.via_cluster = Some("c".into());
        let sip = Origin::Sip {
            domain: dom("partner.com"),
        };
        let r = route(&cfg, &maps, &dir, &sip, claimed).expect("routed");
        assert_eq!(r.envelope.via_cluster, None);
        // An error from bob's side (a bounce) reaches alice but opens no way back.
        let err = Body::Error {
            id: None,
            condition: ErrorCondition::ServiceUnavailable,
            text: "down".into(),
            kind: crate::gateway::envelope::ErrorOf::Message,
        };
        route(
            &cfg,
            &maps,
            &dir,
            &peer("c"),
            env("eve@partner.com", "alice@example.com", err),
        )
        .expect("routed");
        assert_eq!(routing.return_paths(), 1);
        // alice answers: through b, not on our own SIP link.
        let hn1 = Origin::Component {
            home_node: "hn1".into(),
        };
        let r = route(
            &cfg,
            &maps,
            &dir,
            &hn1,
            env("alice@example.com/pc", "bob@partner.com", msg()),
        )
        .expect("routed");
        assert_eq!(r.link, ic("b"));
        // To someone else she still writes on our own link.
        let r = route(
            &cfg,
            &maps,
            &dir,
            &hn1,
            env("alice@example.com/pc", "eve@partner.com", msg()),
        )
        .expect("routed");
        assert_eq!(
            r.link,
            Link::Sip {
                domain: dom("partner.com")
            }
        );
        // A foreign domain our policy does not allow is refused even through a peer.
        let d = route(
            &cfg,
            &maps,
            &dir,
            &peer("b"),
            env("x@jabber.test", "alice@example.com", msg()),
        )
        .expect_err("our policy")
        .denied;
        assert_eq!(d.label(), "domain_not_allowed");
    }

    #[test]
    fn a_peer_speaks_only_for_its_own_users_toward_foreign_domains() {
        let (cfg, maps, dir, _) = setup();
        // carol lives in b: b may send her answer out through our SIP edge.
        let r = route(
            &cfg,
            &maps,
            &dir,
            &peer("b"),
            env(
                "carol@example.com/pc",
                "bob@partner.com",
                Body::Subscription(Subscription::Subscribed),
            ),
        )
        .expect("routed");
        assert_eq!(
            r.link,
            Link::Sip {
                domain: dom("partner.com")
            }
        );
        // Not as alice (ours), not as a user the index places elsewhere or nowhere.
        for (cluster, from) in [
            ("b", "alice@example.com"),
            ("c", "carol@example.com"),
            ("b", "nobody@example.com"),
        ] {
            let d = route(
                &cfg,
                &maps,
                &dir,
                &peer(cluster),
                env(from, "bob@partner.com", msg()),
            )
            .expect_err("spoofed")
            .denied;
            assert_eq!(d.label(), "not_peer_user", "{cluster} {from}");
            assert!(!d.answered());
        }
    }

    #[test]
    fn users_of_two_clusters_reach_each_other_through_the_link() {
        let (cfg, maps, dir, routing) = setup();
        let hn1 = Origin::Component {
            home_node: "hn1".into(),
        };
        // alice (ours) to carol (b's): the link, not LocalToLocal.
        let r = route(
            &cfg,
            &maps,
            &dir,
            &hn1,
            env("alice@example.com/pc", "carol@example.com", msg()),
        )
        .expect("routed");
        assert_eq!(r.link, ic("b"));
        // To a local user nobody places: the peers are asked first; once they said nobody
        // has dan, nobody does.
        let d = route(
            &cfg,
            &maps,
            &dir,
            &hn1,
            env("alice@example.com/pc", "dan@example.com", msg()),
        )
        .expect_err("ask")
        .denied;
        assert_eq!(d, Denied::AskPeers("dan@example.com".into()));
        routing.mark_absent("dan@example.com");
        let d = route(
            &cfg,
            &maps,
            &dir,
            &hn1,
            env("alice@example.com/pc", "dan@example.com", msg()),
        )
        .expect_err("nobody")
        .denied;
        assert_eq!(d, Denied::NoHomeNode("dan@example.com".into()));
        // A user our home node hosts is never asked about.
        let d = route(
            &cfg,
            &maps,
            &dir,
            &hn1,
            env("alice@example.com/pc", "alice@example.com", msg()),
        )
        .expect_err("local")
        .denied;
        assert_eq!(d, Denied::LocalToLocal);
        // carol answers from b: to alice's home node. b may not write as alice.
        let r = route(
            &cfg,
            &maps,
            &dir,
            &peer("b"),
            env("carol@example.com/pc", "alice@example.com", msg()),
        )
        .expect("routed");
        assert_eq!(r.link.label(), "component");
        let d = route(
            &cfg,
            &maps,
            &dir,
            &peer("b"),
            env("alice@example.com", "alice@example.com", msg()),
        )
        .expect_err("ours")
        .denied;
        assert_eq!(d.label(), "not_peer_user");
        // Never a transit between two foreign ends.
        let d = route(
            &cfg,
            &maps,
            &dir,
            &peer("b"),
            env("bob@partner.com", "x@webex.test", msg()),
        )
        .expect_err("transit")
        .denied;
        assert_eq!(d.label(), "not_local");
    }
}
