//! Consent: who may see a local user's presence (requirements §3, RFC 6121 §3, RFC 8048
//! §5.3.3). Sans-IO: an in-memory cache read synchronously by the decide stage and the SIP
//! core (which must never wait), changed by the user's answers and by the admin, and written
//! through to the state store by whoever installs a [`Policies::set_sink`].
//!
//! The model, in order:
//! 1. the foreign domain must be allowed by federation policy (the router's check: refused,
//!    the user is not contacted);
//! 2. the local user's own lists: allow or block a bare JID or a whole domain; the most
//!    specific entry wins (a JID beats its domain);
//! 3. nothing decided: the request reaches the user through their home node (pending), and
//!    the user's answer (`subscribed` / `unsubscribed` from the home node) is stored in their
//!    list.
//!
//! A block is *polite*: the watcher sees the user offline and is never told. No
//! `unsubscribed` from a home node leaves Legate (it becomes unavailable presence), a blocked
//! watcher's request never reaches the home node, and the SIP edge keeps a blocked watcher's
//! subscription alive with offline NOTIFYs. What this module must not do: I/O, clock reads,
//! anything that waits.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use dashmap::{DashMap, DashSet};

use super::envelope::{Address, Body, Envelope, PresenceBody, Subscription};
use super::router::{link_system, Denied, Link, Origin, Refusal};
use crate::config::{Config, Domain};
use crate::presence::map::MappingSet;

pub mod admin;
pub mod persist;
#[cfg(test)]
mod tests;

/// The presence state every mapping system has for "not there" (the PIDF `closed` / XMPP
/// `unavailable` of a blocked watcher's view).
pub const OFFLINE: &str = "offline";

/// What a list entry is about: one watcher (bare JID) or every watcher of a domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Jid(String),
    Domain(Domain),
}

/// Why an admin's user or target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("`{input}` is not a user address: {why}")]
    BadUser { input: String, why: String },
    #[error("`{input}` is neither a bare JID (user@domain) nor a domain: {why}")]
    BadTarget { input: String, why: String },
    #[error("{0} is not a user of a local domain of this node")]
    NotLocalUser(String),
    #[error("`{0}` has a resource: lists hold bare JIDs (user@domain) or domains")]
    HasResource(String),
}

fn clip(s: &str) -> String {
    s.chars().take(200).collect()
}

impl Target {
    /// `user@domain` (a bare JID) or `domain`.
    pub fn parse(input: &str) -> Result<Self, PolicyError> {
        let bad = |why: String| PolicyError::BadTarget {
            input: clip(input),
            why,
        };
        if input.contains('@') {
            let a = Address::parse(input).map_err(|e| bad(e.reason))?;
            if a.resource.is_some() {
                return Err(PolicyError::HasResource(clip(input)));
            }
            Ok(Target::Jid(a.bare_string()))
        } else {
            Domain::parse(input).map(Target::Domain).map_err(bad)
        }
    }

    /// The store key segment: `jid:alice@example.com` or `domain:example.com`.
    pub fn key(&self) -> String {
        match self {
            Target::Jid(j) => format!("jid:{j}"),
            Target::Domain(d) => format!("domain:{d}"),
        }
    }

    /// Reads a key segment written by [`Target::key`].
    pub fn from_key(key: &str) -> Option<Self> {
        if let Some(j) = key.strip_prefix("jid:") {
            return match Target::parse(j) {
                Ok(t @ Target::Jid(_)) => Some(t),
                _ => None,
            };
        }
        key.strip_prefix("domain:")
            .and_then(|d| Domain::parse(d).ok())
            .map(Target::Domain)
    }

    /// The address the SIP core is told about when this entry changes: the watcher, or for a
    /// whole domain an address with an empty localpart (which no parsed address has).
    pub fn address(&self) -> Option<Address> {
        match self {
            Target::Jid(j) => Address::parse(j).ok(),
            Target::Domain(d) => Some(domain_wide(d)),
        }
    }

    pub fn domain(&self) -> Option<Domain> {
        match self {
            Target::Jid(j) => j.rsplit_once('@').and_then(|(_, d)| Domain::parse(d).ok()),
            Target::Domain(d) => Some(d.clone()),
        }
    }
}

/// An address standing for every user of `d` (see [`Target::address`]).
pub fn domain_wide(d: &Domain) -> Address {
    Address {
        local: String::new(),
        domain: d.clone(),
        resource: None,
    }
}

/// Whether `watcher` is covered by `target` as the SIP core receives it (a JID, or a
/// domain-wide address from [`domain_wide`]).
pub fn covers(target: &Address, watcher: &Address) -> bool {
    target.domain == watcher.domain && (target.local.is_empty() || target.local == watcher.local)
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Jid(j) => f.write_str(j),
            Target::Domain(d) => write!(f, "{d}"),
        }
    }
}

/// A list entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Block,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Block => "block",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "allow" => Some(Verdict::Allow),
            "block" => Some(Verdict::Block),
            _ => None,
        }
    }
}

/// The decision for one (local user, watcher) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consent {
    Allowed,
    Blocked,
    /// Nobody decided: the user is asked.
    Undecided,
}

/// One user's lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserLists {
    jids: JidList,
    domains: HashMap<Domain, Verdict>,
}

/// One user's JID entries, sorted by JID: one per approved watcher (issue 11 item 10). All
/// of a user's entries share one byte buffer — each a verdict byte, the JID's length (two
/// bytes) and the JID — and a sorted vector of where each starts (4 bytes): ~26 bytes for a
/// 20-byte JID, where a vector of boxed keys cost 24 bytes per entry plus the key's own
/// allocation, and a hash table more. A lookup is a binary search over at most
/// `MAX_ENTRIES_PER_USER`. A removed entry leaves its bytes behind until they are half the
/// buffer, which is then rebuilt.
#[derive(Debug, Clone, Default)]
struct JidList {
    bytes: Vec<u8>,
    /// Where each entry starts in `bytes`, in JID order.
    starts: Vec<u32>,
    /// Bytes of removed entries still in `bytes`.
    dead: usize,
}

/// Bytes before an entry's JID: the verdict, then the JID's length.
const ENTRY_HEAD: usize = 3;

impl PartialEq for JidList {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for JidList {}

impl JidList {
    /// The entry starting at `at`: its verdict and JID (None only for a corrupt start, which
    /// this type never makes).
    fn entry(&self, at: u32) -> Option<(Verdict, &str)> {
        let at = at as usize;
        let head = self.bytes.get(at..at + ENTRY_HEAD)?;
        let verdict = if head.first() == Some(&1) {
            Verdict::Block
        } else {
            Verdict::Allow
        };
        let len = usize::from(u16::from_le_bytes([*head.get(1)?, *head.get(2)?]));
        let jid = self.bytes.get(at + ENTRY_HEAD..at + ENTRY_HEAD + len)?;
        Some((verdict, std::str::from_utf8(jid).ok()?))
    }

    fn find(&self, jid: &str) -> Result<usize, usize> {
        self.starts
            .binary_search_by(|&at| self.entry(at).map_or("", |(_, j)| j).cmp(jid))
    }

    fn get(&self, jid: &str) -> Option<&Verdict> {
        let at = *self.starts.get(self.find(jid).ok()?)?;
        match self.entry(at)?.0 {
            Verdict::Allow => Some(&Verdict::Allow),
            Verdict::Block => Some(&Verdict::Block),
        }
    }

    fn contains_key(&self, jid: &str) -> bool {
        self.find(jid).is_ok()
    }

    fn verdict_byte(v: Verdict) -> u8 {
        match v {
            Verdict::Allow => 0,
            Verdict::Block => 1,
        }
    }

    fn insert(&mut self, jid: &str, v: Verdict) {
        match self.find(jid) {
            Ok(i) => {
                if let Some(b) = self
                    .starts
                    .get(i)
                    .and_then(|&at| self.bytes.get_mut(at as usize))
                {
                    *b = Self::verdict_byte(v);
                }
            }
            Err(i) => {
                // Callers pass JIDs of at most 3 071 bytes (RFC 7622 §3.1); a longer one
                // could not be stored and is not.
                let (Ok(len), Ok(at)) = (u16::try_from(jid.len()), u32::try_from(self.bytes.len()))
                else {
                    return;
                };
                // Grown by an eighth, not doubled: the list lives as long as the user's
                // watchers, and a doubled buffer would be up to half empty.
                let need = ENTRY_HEAD + jid.len();
                if self.bytes.capacity() - self.bytes.len() < need {
                    self.bytes.reserve_exact(need.max(self.bytes.len() / 8));
                }
                if self.starts.len() == self.starts.capacity() {
                    self.starts.reserve_exact((self.starts.len() / 8).max(1));
                }
                self.bytes.push(Self::verdict_byte(v));
                self.bytes.extend_from_slice(&len.to_le_bytes());
                self.bytes.extend_from_slice(jid.as_bytes());
                self.starts.insert(i, at);
            }
        }
    }

    fn remove(&mut self, jid: &str) {
        let Ok(i) = self.find(jid) else { return };
        self.starts.remove(i);
        self.dead += ENTRY_HEAD + jid.len();
        if self.starts.is_empty() {
            *self = JidList::default();
        } else if self.dead * 2 > self.bytes.len() {
            self.rebuild();
        }
    }

    /// Copies the live entries into a new buffer, dropping the removed ones' bytes.
    fn rebuild(&mut self) {
        let mut fresh = JidList {
            bytes: Vec::with_capacity(self.bytes.len() - self.dead),
            starts: Vec::with_capacity(self.starts.len()),
            dead: 0,
        };
        for (jid, v) in self.iter() {
            fresh.insert(jid, *v);
        }
        *self = fresh;
    }

    fn len(&self) -> usize {
        self.starts.len()
    }

    fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = (&str, &Verdict)> {
        self.starts.iter().filter_map(|&at| {
            let (v, j) = self.entry(at)?;
            let v = match v {
                Verdict::Allow => &Verdict::Allow,
                Verdict::Block => &Verdict::Block,
            };
            Some((j, v))
        })
    }
}

impl UserLists {
    fn is_empty(&self) -> bool {
        self.jids.is_empty() && self.domains.is_empty()
    }

    /// Every entry, JIDs first, each group sorted.
    pub fn entries(&self) -> Vec<(Target, Verdict)> {
        let mut out: Vec<(Target, Verdict)> = self
            .jids
            .iter()
            .map(|(j, v)| (Target::Jid(j.to_string()), *v))
            .chain(
                self.domains
                    .iter()
                    .map(|(d, v)| (Target::Domain(d.clone()), *v)),
            )
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// A change of one entry (`verdict: None` removes it), as written to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub user: String,
    pub target: Target,
    pub verdict: Option<Verdict>,
    /// A block set by the admin (`legate policy block`): stored as `block-admin`, and no
    /// answer from the home node lifts it (see [`Policies::admin_set`]).
    pub by_admin: bool,
}

/// Where changes go to be persisted (the driver's store writer). Called synchronously: it
/// must not block (a `try_send` into the writer's queue).
pub type Sink = Box<dyn Fn(Change) + Send + Sync>;

/// Most users with lists, and entries per user: the cache is bounded like every table.
pub const MAX_USERS: usize = 1_000_000;
pub const MAX_ENTRIES_PER_USER: usize = 10_000;
/// Pending requests remembered (to tell a user's refusal from a home node's answer to a
/// stranger's probe).
pub const MAX_PENDING: usize = 1_000_000;

/// The consent cache: every user's lists and the requests waiting for an answer.
#[derive(Default)]
pub struct Policies {
    users: DashMap<String, UserLists>,
    /// (user, watcher) requests forwarded to the home node and not answered yet, as a hash
    /// of the pair (16 bytes or so each, not two strings: every undecided SUBSCRIBE adds one).
    pending: DashSet<u64>,
    /// Entries (user, target) the admin blocked, as hashes: only the admin lifts them.
    admin_blocks: DashSet<u64>,
    pair_hasher: std::hash::RandomState,
    sink: OnceLock<Sink>,
}

impl fmt::Debug for Policies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policies")
            .field("users", &self.users.len())
            .field("pending", &self.pending.len())
            .finish()
    }
}

/// Why a change was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Full {
    #[error("too many users with consent lists (at most {MAX_USERS})")]
    Users,
    #[error("too many entries in this user's lists (at most {MAX_ENTRIES_PER_USER})")]
    Entries,
}

impl Policies {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Installs where changes are written (once; later calls are ignored).
    pub fn set_sink(&self, sink: Sink) {
        let _ = self.sink.set(sink);
    }

    /// The decision for `watcher` asking to see `user`: the watcher's JID entry, else its
    /// domain's, else undecided.
    pub fn consent(&self, user: &Address, watcher: &Address) -> Consent {
        if self.users.is_empty() {
            return Consent::Undecided;
        }
        let Some(lists) = self.users.get(&user.bare_string()) else {
            return Consent::Undecided;
        };
        let v = lists
            .jids
            .get(watcher.bare_string().as_str())
            .or_else(|| lists.domains.get(&watcher.domain));
        match v {
            Some(Verdict::Allow) => Consent::Allowed,
            Some(Verdict::Block) => Consent::Blocked,
            None => Consent::Undecided,
        }
    }

    /// Sets (or with `None` removes) an entry and writes it through to the sink.
    pub fn set(&self, user: &str, target: Target, verdict: Option<Verdict>) -> Result<(), Full> {
        self.set_as(user, target, verdict, false)
    }

    /// The admin's change (`legate policy`). A block set this way holds against every answer
    /// the home node sends afterwards: an XMPP server re-sends `subscribed` on its own for a
    /// roster entry approved long ago, and a request in flight when the admin blocked would
    /// otherwise read as the user's approval and lift the block. Only the admin's allow or
    /// unblock lifts it.
    pub fn admin_set(
        &self,
        user: &str,
        target: Target,
        verdict: Option<Verdict>,
    ) -> Result<(), Full> {
        if let Target::Jid(w) = &target {
            // Whatever was asked before the admin decided is no longer the user's to answer.
            self.pending.remove(&self.pair_key(user, w));
        }
        self.set_as(user, target, verdict, true)
    }

    fn set_as(
        &self,
        user: &str,
        target: Target,
        verdict: Option<Verdict>,
        by_admin: bool,
    ) -> Result<(), Full> {
        self.apply_as(user, &target, verdict, by_admin)?;
        if let Some(sink) = self.sink.get() {
            sink(Change {
                user: user.to_string(),
                target,
                verdict,
                by_admin: by_admin && verdict == Some(Verdict::Block),
            });
        }
        Ok(())
    }

    /// [`Policies::apply`] remembering whether the admin set a block.
    pub fn apply_as(
        &self,
        user: &str,
        target: &Target,
        verdict: Option<Verdict>,
        by_admin: bool,
    ) -> Result<(), Full> {
        self.apply(user, target, verdict)?;
        let k = self.target_key(user, target);
        if by_admin && verdict == Some(Verdict::Block) {
            self.admin_blocks.insert(k);
        } else {
            self.admin_blocks.remove(&k);
        }
        Ok(())
    }

    fn target_key(&self, user: &str, target: &Target) -> u64 {
        self.pair_key(user, &target.key())
    }

    /// Whether an admin's block covers `watcher` for `user` (its JID, or its domain when no
    /// JID entry decides).
    fn admin_held(&self, user: &str, watcher: &Address) -> bool {
        if self.admin_blocks.is_empty() {
            return false;
        }
        let jid = Target::Jid(watcher.bare_string());
        if self.entry_of(user, &watcher.bare_string()).is_some() {
            return self.admin_blocks.contains(&self.target_key(user, &jid));
        }
        let dom = Target::Domain(watcher.domain.clone());
        self.admin_blocks.contains(&self.target_key(user, &dom))
    }

    /// Applies a change without writing it (loading from the store, or a change another node
    /// made seen through the store's watch).
    pub fn apply(&self, user: &str, target: &Target, verdict: Option<Verdict>) -> Result<(), Full> {
        match verdict {
            Some(v) => {
                if self.users.len() >= MAX_USERS && !self.users.contains_key(user) {
                    return Err(Full::Users);
                }
                let mut lists = self.users.entry(user.to_string()).or_default();
                let present = match target {
                    Target::Jid(j) => lists.jids.contains_key(j.as_str()),
                    Target::Domain(d) => lists.domains.contains_key(d),
                };
                if !present && lists.jids.len() + lists.domains.len() >= MAX_ENTRIES_PER_USER {
                    return Err(Full::Entries);
                }
                match target {
                    Target::Jid(j) => lists.jids.insert(j, v),
                    Target::Domain(d) => {
                        lists.domains.insert(d.clone(), v);
                    }
                };
            }
            None => {
                let empty = match self.users.get_mut(user) {
                    Some(mut lists) => {
                        match target {
                            Target::Jid(j) => lists.jids.remove(j),
                            Target::Domain(d) => {
                                lists.domains.remove(d);
                            }
                        };
                        lists.is_empty()
                    }
                    None => false,
                };
                if empty {
                    self.users.remove_if(user, |_, l| l.is_empty());
                }
            }
        }
        Ok(())
    }

    /// A user's lists (empty when they have none).
    pub fn lists(&self, user: &str) -> UserLists {
        self.users
            .get(user)
            .map(|l| l.value().clone())
            .unwrap_or_default()
    }

    /// Every (user, target) with an entry.
    pub fn all_entries(&self) -> Vec<(String, Target)> {
        self.users
            .iter()
            .flat_map(|u| {
                let user = u.key().clone();
                u.value()
                    .entries()
                    .into_iter()
                    .map(move |(t, _)| (user.clone(), t))
            })
            .collect()
    }

    /// Users with at least one entry.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    fn entry_of(&self, user: &str, jid: &str) -> Option<Verdict> {
        self.users.get(user).and_then(|l| l.jids.get(jid).copied())
    }

    /// Records the user's answer to `watcher` (the home node sent `subscribed` or
    /// `unsubscribed`). A refusal is recorded only for a request that was pending or a
    /// watcher the user had allowed: a home node also answers `unsubscribed` to a stranger's
    /// probe, which is no decision of the user's.
    fn record_answer(&self, user: &Address, watcher: &Address, approved: bool) {
        let (u, w) = (user.bare_string(), watcher.bare_string());
        let was_pending = self.pending.remove(&self.pair_key(&u, &w)).is_some();
        if self.admin_held(&u, watcher) {
            tracing::debug!(user = %u, watcher = %w, "home node's answer ignored: the admin blocked this watcher");
            return;
        }
        let verdict = if approved {
            Verdict::Allow
        } else if was_pending || self.entry_of(&u, &w) == Some(Verdict::Allow) {
            Verdict::Block
        } else {
            return;
        };
        if self.entry_of(&u, &w) == Some(verdict) {
            return;
        }
        if let Err(e) = self.set(&u, Target::Jid(w), Some(verdict)) {
            tracing::warn!(error = %e, "user's consent answer not recorded");
        }
    }

    fn mark_pending(&self, user: &Address, watcher: &Address) {
        if self.pending.len() < MAX_PENDING {
            let k = self.pair_key(&user.bare_string(), &watcher.bare_string());
            self.pending.insert(k);
        }
    }

    fn pair_key(&self, user: &str, watcher: &str) -> u64 {
        use std::hash::BuildHasher;
        self.pair_hasher.hash_one((user, watcher))
    }

    /// The consent stage, after routing decided `link`: may refuse politely, rewrite a
    /// refusal into offline presence, and learns the user's answers.
    ///
    /// - A foreign watcher's `subscribe` or `probe` to a blocked user stops here
    ///   ([`Denied::Blocked`], never answered); an undecided `subscribe` is remembered as
    ///   pending.
    /// - A home node's `subscribed` is stored as allow; its `unsubscribed` as block (see
    ///   `record_answer`) and leaves over XMPP as offline presence, so no refusal ever
    ///   reaches a watcher (the SIP core turns it into offline NOTIFYs itself).
    /// - Presence of a user toward a blocked s2s watcher leaves as offline. Toward a SIP
    ///   watcher it passes: the SIP core keeps the real state and shows offline while blocked
    ///   (so an unblock shows the current state at once).
    pub fn screen(
        &self,
        config: &Config,
        maps: &MappingSet,
        origin: &Origin,
        link: &Link,
        env: Envelope,
    ) -> Result<Envelope, Refusal> {
        // A peer cluster's forwarded foreign traffic is screened here, where the user lives
        // (issue 13: the policies live with the user); the peer screens nothing of it.
        let foreign_in = match origin {
            Origin::S2s { .. } | Origin::Sip { .. } => true,
            Origin::Intercluster { .. } => !config.is_local_domain(&env.from.domain),
            Origin::Component { .. } => false,
        };
        let inbound = foreign_in && matches!(link, Link::Component { .. });
        let outbound =
            matches!(origin, Origin::Component { .. }) && !matches!(link, Link::Component { .. });
        // A peer's user answering a foreign watcher through us: its cluster recorded the
        // answer; here a refusal only has to leave over XMPP as offline presence.
        let relayed_out = matches!(origin, Origin::Intercluster { .. })
            && config.is_local_domain(&env.from.domain)
            && matches!(link, Link::S2s { .. });
        let blocked = |env: Envelope| Refusal {
            denied: Denied::Blocked,
            envelope: Box::new(env),
        };
        // What a watcher who may not see the user gets instead (dropped, silently, in a
        // system without an offline state).
        let offline = |mut env: Envelope| match offline_in(config, maps, link) {
            Some(p) => {
                env.body = Body::Presence(p);
                Ok(env)
            }
            None => Err(blocked(env)),
        };
        match &env.body {
            Body::Subscription(s @ (Subscription::Subscribe | Subscription::Probe)) if inbound => {
                match self.consent(&env.to, &env.from) {
                    Consent::Blocked => return Err(blocked(env)),
                    Consent::Undecided if *s == Subscription::Subscribe => {
                        self.mark_pending(&env.to, &env.from)
                    }
                    _ => {}
                }
            }
            Body::Subscription(Subscription::Subscribed) if outbound => {
                self.record_answer(&env.from, &env.to, true);
            }
            Body::Subscription(Subscription::Unsubscribed) if outbound => {
                self.record_answer(&env.from, &env.to, false);
                // The SIP core reads a refusal as a consent change: the subscription stays and
                // shows offline. Over XMPP it would be the refusal itself: offline instead.
                // Toward a peer cluster it goes as is: that cluster's edge does the same.
                if !matches!(link, Link::Sip { .. } | Link::Intercluster { .. }) {
                    return offline(env);
                }
            }
            Body::Subscription(Subscription::Unsubscribed) if relayed_out => {
                return offline(env);
            }
            Body::Presence(_)
                if outbound
                    && matches!(link, Link::S2s { .. })
                    && self.consent(&env.from, &env.to) == Consent::Blocked =>
            {
                return offline(env);
            }
            Body::Presence(p)
                if outbound
                    && matches!(link, Link::Intercluster { .. })
                    && self.consent(&env.from, &env.to) == Consent::Blocked =>
            {
                // The peer cluster does not know this user's lists: offline in the presence's
                // own system (the peer translates it for its link).
                let system = p.system.clone();
                let mut env = env;
                env.body = Body::Presence(PresenceBody {
                    system,
                    state: Arc::from(OFFLINE),
                    note: None,
                    priority: None,
                });
                return Ok(env);
            }
            _ => {}
        }
        Ok(env)
    }
}

/// Offline presence in the system of `link` (`None` when its system has no offline state,
/// which the mapping checks make impossible for shipped systems).
pub fn offline_in(config: &Config, maps: &MappingSet, link: &Link) -> Option<PresenceBody> {
    let system = link_system(config, link)?;
    let id = maps.system_id(system)?;
    maps.system(id).state_id(OFFLINE)?;
    Some(PresenceBody {
        system: Arc::from(system),
        state: Arc::from(OFFLINE),
        note: None,
        priority: None,
    })
}
