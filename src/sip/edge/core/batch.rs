//! The batched notifier ([MS-PRES] §2.2.2.4, [MS-SIP] §3.3.4.1, RFC 4662): a Lync / Skype for
//! Business edge subscribes once, to the watcher's own URI, for a list of contacts
//! (`Require: adhoclist, categoryList`, an `application/msrtc-adrl-categorylist+xml` body).
//! One SIP dialog carries one member per listed contact; each member asks the contact's home
//! node exactly like a single SUBSCRIBE does, and a contact that is not ours is terminated
//! (`noresource`) in the list at once.
//!
//! NOTIFYs are RLMI (RFC 4662 §5): `multipart/related` with the `application/rlmi+xml` list and
//! one `application/msrtc-event-categories+xml` part per active member. The first one is full
//! state — in the 200 OK itself when the SUBSCRIBE says `Supported: ms-piggyback-first-notify`
//! ([MS-PRES] §4.11) — later ones partial (`fullState="false"`), listing the members that
//! changed. Changes are coalesced for [`COALESCE`] so a home node answering three contacts
//! at once gives one NOTIFY, not three (RFC 4662 §6 lets a list server throttle).
//!
//! Members read the user's aggregate from the per-presentity resource table
//! (`presence::aggregate`). Un-SUBSCRIBE (`Expires: 0`) and expiry end the dialog as for a
//! single subscription; a refresh carrying a `batchSub` adds or removes contacts. The state is plain data ([`PersistedBatch`]) so the store can keep it.

use serde::{Deserialize, Serialize};

use super::*;
use crate::gateway::policy::{self, Consent};
use crate::gateway::{Denied, Link};
use crate::presence::codec::rlmi::{self, Instance, InstanceState, Part};
use crate::sip::uri::{parse_uri, UriContext};

/// Contacts one batched subscription may list. Skype for Business Server caps a user's contact
/// list at 1 000 (the `MaxContacts` ceiling of its user services policy), so a real client
/// never needs more; beyond, the SUBSCRIBE is refused with 413 and this number in the reason
/// phrase (written out there: change both together).
pub(crate) const MAX_BATCH_RESOURCES: usize = 1000;
/// Batched dialogs per watcher at most; beyond, the oldest ends with `deactivated` (a client
/// that lost its dialog state re-subscribes with a new Call-ID, as for single dialogs).
pub(crate) const MAX_BATCHES_PER_WATCHER: usize = 4;
/// How long changes wait to be sent together.
pub(crate) const COALESCE: Duration = Duration::from_millis(200);

/// What a member (one listed contact) is at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// Asked the home node; no answer yet.
    Pending,
    /// Approved: its presence is sent.
    Active,
    /// Refused by federation policy before any user was asked (RFC 6665 `rejected`); a user's
    /// own refusal or block is polite instead: the member stays active and shows offline.
    Rejected,
    /// Not a user we serve (foreign domain, bad URI, no home node: `noresource`).
    NoResource,
}

impl MemberState {
    fn instance(self) -> (InstanceState, Option<&'static str>) {
        match self {
            Self::Pending => (InstanceState::Pending, None),
            Self::Active => (InstanceState::Active, None),
            Self::Rejected => (InstanceState::Terminated, Some("rejected")),
            Self::NoResource => (InstanceState::Terminated, Some("noresource")),
        }
    }
}

/// One listed contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Member {
    /// As the watcher wrote it (RLMI names resources by the URI the subscriber used).
    pub uri: String,
    /// The local user it stands for (`None` when it is not one).
    pub presentity: Option<Address>,
    pub state: MemberState,
    /// Changed since the last NOTIFY.
    pub changed: bool,
    /// Fingerprint of what the last NOTIFY said about it: a partial NOTIFY leaves out members
    /// whose content would be the same again (a home node repeating a presence, or answering
    /// a second dialog's subscription), and is not sent when none is left.
    pub sent: Option<u64>,
}

/// One batched subscription dialog.
#[derive(Debug, Clone)]
pub(crate) struct Batch {
    pub dialog: Dialog,
    pub watcher: Address,
    pub domain: Domain,
    pub expires_at: Instant,
    pub conn: Option<ConnId>,
    /// RLMI `version` of the next document (RFC 4662 §5.2: starts at 0, +1 per document).
    pub version: u32,
    pub members: Vec<Member>,
    /// When the coalesced changes go out.
    pub flush_at: Option<Instant>,
    /// Earliest timer queued for it.
    pub armed: Option<Instant>,
}

/// The persisted form of a batched subscription (plain data; the store keeps it as it keeps
/// [`PersistedNotifier`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedBatch {
    pub dialog: Dialog,
    pub watcher: String,
    pub domain: String,
    pub expires_unix: u64,
    pub version: u32,
    pub members: Vec<(String, MemberState)>,
}

impl Batch {
    /// The persisted form, expiry as Unix seconds given `now` and the Unix time of `now`.
    pub(crate) fn persisted(&self, now: Instant, unix_now: u64) -> PersistedBatch {
        PersistedBatch {
            dialog: self.dialog.clone(),
            watcher: self.watcher.bare_string(),
            domain: self.domain.to_string(),
            expires_unix: unix_now
                .saturating_add(self.expires_at.saturating_duration_since(now).as_secs()),
            version: self.version,
            members: self
                .members
                .iter()
                .map(|m| (m.uri.clone(), m.state))
                .collect(),
        }
    }
}

/// The batched dialogs and their indexes, kept together so every lookup the core makes per
/// event is a map access, never a scan of all batches.
#[derive(Debug, Default)]
pub(crate) struct Batches {
    by_id: HashMap<DialogId, Batch>,
    /// (watcher, presentity) → the batches with a member for that pair.
    by_pair: HashMap<(String, String), Vec<DialogId>>,
    by_watcher: HashMap<String, Vec<DialogId>>,
    /// Pairs in `by_pair` per presentity (is anyone's batch watching this user?).
    per_presentity: HashMap<String, usize>,
    /// Members over all batches (counted with single watchers for the node's bound).
    pub(super) members: usize,
}

impl Batches {
    /// Whether some batch has a member for (watcher, presentity).
    pub(crate) fn watches(&self, pair: &(String, String)) -> bool {
        self.by_pair.contains_key(pair)
    }

    fn watched(&self, presentity: &str) -> bool {
        self.per_presentity.contains_key(presentity)
    }

    fn index(&mut self, id: &DialogId, pair: (String, String)) {
        let v = self.by_pair.entry(pair.clone()).or_default();
        if v.is_empty() {
            *self.per_presentity.entry(pair.1).or_default() += 1;
        }
        if !v.contains(id) {
            v.push(id.clone());
        }
    }

    fn unindex(&mut self, id: &DialogId, pair: &(String, String)) {
        let Some(v) = self.by_pair.get_mut(pair) else {
            return;
        };
        v.retain(|d| d != id);
        if v.is_empty() {
            self.by_pair.remove(pair);
            if let Some(c) = self.per_presentity.get_mut(&pair.1) {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    self.per_presentity.remove(&pair.1);
                }
            }
        }
    }

    fn insert(&mut self, id: DialogId, b: Batch) {
        let watcher = b.watcher.bare_string();
        for m in &b.members {
            if let Some(p) = &m.presentity {
                self.index(&id, (watcher.clone(), p.bare_string()));
            }
        }
        self.by_watcher.entry(watcher).or_default().push(id.clone());
        self.members += b.members.len();
        if let Some(old) = self.by_id.insert(id, b) {
            self.members = self.members.saturating_sub(old.members.len());
        }
    }

    fn remove(&mut self, id: &DialogId) -> Option<Batch> {
        let b = self.by_id.remove(id)?;
        let watcher = b.watcher.bare_string();
        for m in &b.members {
            if let Some(p) = &m.presentity {
                self.unindex(id, &(watcher.clone(), p.bare_string()));
            }
        }
        if let Some(v) = self.by_watcher.get_mut(&watcher) {
            v.retain(|d| d != id);
            if v.is_empty() {
                self.by_watcher.remove(&watcher);
            }
        }
        self.members = self.members.saturating_sub(b.members.len());
        Some(b)
    }

    /// Adds members to a live batch (an in-dialog `subscribe` action).
    fn add_members(&mut self, id: &DialogId, new: Vec<Member>) {
        let Some(b) = self.by_id.get_mut(id) else {
            return;
        };
        let watcher = b.watcher.bare_string();
        let pairs: Vec<(String, String)> = new
            .iter()
            .filter_map(|m| m.presentity.as_ref())
            .map(|p| (watcher.clone(), p.bare_string()))
            .collect();
        self.members += new.len();
        b.members.extend(new);
        for pair in pairs {
            self.index(id, pair);
        }
    }

    /// Removes the members listed by `uris` from a live batch (an in-dialog `unsubscribe`
    /// action) and returns them.
    fn remove_members(&mut self, id: &DialogId, uris: &[String]) -> Vec<Member> {
        let Some(b) = self.by_id.get_mut(id) else {
            return Vec::new();
        };
        let watcher = b.watcher.bare_string();
        let (gone, kept): (Vec<Member>, Vec<Member>) = std::mem::take(&mut b.members)
            .into_iter()
            .partition(|m| uris.contains(&m.uri));
        b.members = kept;
        self.members = self.members.saturating_sub(gone.len());
        for m in &gone {
            if let Some(p) = &m.presentity {
                self.unindex(id, &(watcher.clone(), p.bare_string()));
            }
        }
        gone
    }
}

/// A batched SUBSCRIBE body (`Content-Type: application/msrtc-adrl-categorylist+xml`).
pub(crate) fn is_adrl(req: &SipMessage) -> bool {
    req.header(HeaderName::ContentType).is_some_and(|h| {
        h.value
            .split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case(rlmi::ADRL_CONTENT_TYPE))
    })
}

/// Whether a header list (`Supported`, `Require`) names `tag`.
fn names(req: &SipMessage, name: HeaderName, tag: &str) -> bool {
    req.headers_named(name)
        .flat_map(|h| h.value.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(tag))
}

/// `user@host` of a SIP URI string (a listed contact), `None` for anything else.
fn address_of(uri: &str) -> Option<Address> {
    parse_uri(uri.trim(), UriContext::AddrSpec)
        .ok()
        .and_then(|u| address_of_uri(&u))
}

impl Core {
    /// Whether a SUBSCRIBE is for the batched notifier: a new one by its body, a refresh by
    /// its dialog.
    pub(super) fn is_batch_subscribe(&self, req: &SipMessage) -> bool {
        if is_adrl(req) {
            return true;
        }
        req.to().ok().and_then(|t| t.tag()).is_some()
            && DialogId::of_incoming_request(req)
                .is_ok_and(|id| self.batches.by_id.contains_key(&id))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_batch_subscribe(
        &mut self,
        hub: &dyn HubPort,
        cfg: &Config,
        peer: &PeerInfo,
        key: &TxnKey,
        req: &SipMessage,
        domain: &Domain,
        now: Instant,
    ) {
        let tag = self.dialog_tag();
        let is_presence =
            matches!(req.event(), Ok(Some(e)) if e.value.eq_ignore_ascii_case("presence"));
        if !is_presence {
            m::refused("bad_event");
            let extra = [("Allow-Events", "presence")];
            return self.reply(key, req, 489, "Bad Event", Some(&tag), &extra, None, now);
        }
        let decision = clamp_expires(req.expires().ok().flatten());
        if decision == ExpiresDecision::TooBrief {
            let min = subscription::MIN_EXPIRES.to_string();
            let extra = [("Min-Expires", min.as_str())];
            return self.reply(
                key,
                req,
                423,
                "Interval Too Brief",
                Some(&tag),
                &extra,
                None,
                now,
            );
        }
        if req.to().ok().and_then(|t| t.tag()).is_some() {
            return self.on_batch_resubscribe(hub, cfg, peer, key, req, domain, decision, now);
        }
        let watcher = req.from().ok().and_then(|f| address_of_uri(&f.uri));
        let target = req
            .request_uri()
            .and_then(Result::ok)
            .and_then(|u| address_of_uri(&u));
        let Some(watcher) = watcher else {
            return self.reply(key, req, 400, "Bad From", Some(&tag), &[], None, now);
        };
        // [MS-SIP] §3.3.4.1: the batch goes to the watcher's own URI; anything else is not a
        // batch a Lync edge would send (and screening let it through only as one).
        if target.map(|t| t.bare_string()) != Some(watcher.bare_string()) {
            m::refused("batch_not_self");
            let reason = "Forbidden (Batched Subscription Must Target The Watcher's Own URI)";
            return self.reply(key, req, 403, reason, Some(&tag), &[], None, now);
        }
        // RFC 4662 §4.3 (and §5: RLMI only to subscribers that support it): a list
        // subscription without `eventlist` gets 421 naming it. Lync sends `Supported: eventlist`.
        let eventlist = names(req, HeaderName::Supported, "eventlist")
            || names(req, HeaderName::Require, "eventlist");
        if !eventlist {
            m::refused("batch_without_eventlist");
            let extra = [("Require", "eventlist")];
            let reason = "Extension Required";
            return self.reply(key, req, 421, reason, Some(&tag), &extra, None, now);
        }
        let accepts_related = req.accept().unwrap_or_default().iter().any(|m| {
            m.is("multipart", "related") || m.is("application", "rlmi+xml") || m.is("*", "*")
        });
        if !accepts_related {
            let extra = [("Accept", "multipart/related, application/rlmi+xml")];
            return self.reply(
                key,
                req,
                406,
                "Not Acceptable",
                Some(&tag),
                &extra,
                None,
                now,
            );
        }
        let batch = match rlmi::decode_batch_sub(req.body()) {
            Ok(b) => b,
            Err(e) => {
                m::refused("bad_batch_body");
                tracing::info!(error = %LogSafe(&e.to_string()), "batched SUBSCRIBE body refused");
                let reason = "Bad Request (Malformed batchSub Body)";
                return self.reply(key, req, 400, reason, Some(&tag), &[], None, now);
            }
        };
        if !matches!(batch.action, Some((rlmi::BatchAction::Subscribe, _))) {
            let reason = "Bad Request (Only A subscribe Action Opens A Batched Subscription)";
            return self.reply(key, req, 400, reason, Some(&tag), &[], None, now);
        }
        let mut seen = std::collections::HashSet::with_capacity(batch.resources.len());
        let uris: Vec<String> = batch
            .resources
            .into_iter()
            .filter(|u| seen.insert(u.clone()))
            .collect();
        if uris.is_empty() {
            let reason = "Bad Request (Empty adhocList)";
            return self.reply(key, req, 400, reason, Some(&tag), &[], None, now);
        }
        if uris.len() > MAX_BATCH_RESOURCES {
            m::refused("batch_too_large");
            let reason =
                "Request Entity Too Large (At Most 1000 Contacts Per Batched Subscription)";
            return self.reply(key, req, 413, reason, Some(&tag), &[], None, now);
        }
        if self.notifiers.len() + self.batches.members + uris.len() > self.caps.foreign_watchers {
            m::refused("too_many_watchers");
            let extra = [("Retry-After", RETRY_AFTER_BUSY)];
            let reason = "Service Unavailable (Overloaded)";
            return self.reply(key, req, 503, reason, Some(&tag), &extra, None, now);
        }
        let dialog = match Dialog::uas(req, &tag) {
            Ok(d) => d,
            Err(_) => return self.reply(key, req, 400, "Bad Dialog Headers", None, &[], None, now),
        };
        let grant = match decision {
            ExpiresDecision::Grant(g) => g,
            _ => 0,
        };
        // Each member asks its home node as a single SUBSCRIBE would (a fetch asks for
        // presence only, RFC 6665 §4.4.3).
        let ask = if grant == 0 {
            Subscription::Probe
        } else {
            Subscription::Subscribe
        };
        let members = self.new_members(hub, cfg, domain, &watcher, uris, ask);
        let id = dialog.id.clone();
        let mut b = Batch {
            dialog,
            watcher: watcher.clone(),
            domain: domain.clone(),
            expires_at: now + Duration::from_secs(u64::from(grant)),
            conn: Some(peer.conn),
            version: 0,
            members,
            flush_at: None,
            armed: None,
        };
        let expires_s = grant.to_string();
        let contact = format!("<{}>", self.contact_for(&watcher, Some(peer.conn)));
        let piggyback = names(req, HeaderName::Supported, "ms-piggyback-first-notify");
        if piggyback && grant > 0 {
            // [MS-PRES] §4.11: the first NOTIFY rides in the 200 OK; its CSeq is consumed
            // so the next NOTIFY of the dialog follows it.
            // A full document always has something to say (`batch_document` answers `None`
            // only for partial ones); an empty body would be a bug, not a peer's doing.
            let body = self
                .batch_document(hub, &mut b, true, None)
                .unwrap_or_default();
            b.dialog.local_cseq = b.dialog.local_cseq.saturating_add(1);
            let cseq = b.dialog.local_cseq.to_string();
            let state = format!("active;expires={grant}");
            let extra = [
                ("Expires", expires_s.as_str()),
                ("Contact", contact.as_str()),
                ("Event", "presence"),
                ("Subscription-State", state.as_str()),
                ("Require", "eventlist"),
                ("Supported", "ms-piggyback-first-notify"),
                ("ms-piggyback-cseq", cseq.as_str()),
            ];
            self.reply(
                key,
                req,
                200,
                "OK",
                Some(&tag),
                &extra,
                Some((&body.0, &body.1)),
                now,
            );
        } else {
            let extra = [
                ("Expires", expires_s.as_str()),
                ("Contact", contact.as_str()),
                ("Require", "eventlist"),
            ];
            self.reply(key, req, 200, "OK", Some(&tag), &extra, None, now);
        }
        let piggybacked = piggyback && grant > 0;
        self.batch_insert(hub, id.clone(), b, now);
        if grant == 0 {
            // A fetch: one terminated full-state NOTIFY, then nothing is kept.
            self.send_batch_notify(hub, &id, true, Some(TerminationReason::Timeout), now);
            self.batch_remove(&id);
            return;
        }
        self.arm_batch(&id, now + Duration::from_secs(u64::from(grant)));
        self.dirty = true;
        if !piggybacked {
            self.send_batch_notify(hub, &id, true, None, now);
        }
    }

    /// One member per listed contact: each local contact's home node is asked (`ask`) as a
    /// single SUBSCRIBE would ask it; a contact that is not ours is `noresource` at once.
    fn new_members(
        &mut self,
        hub: &dyn HubPort,
        cfg: &Config,
        domain: &Domain,
        watcher: &Address,
        uris: Vec<String>,
        ask: Subscription,
    ) -> Vec<Member> {
        let mut members = Vec::with_capacity(uris.len());
        for uri in uris {
            let presentity = address_of(&uri).filter(|a| cfg.is_local_domain(&a.domain));
            let state = match &presentity {
                None => MemberState::NoResource,
                Some(p) => {
                    let sub = hub.submit(
                        domain,
                        Envelope {
                            from: watcher.clone(),
                            to: p.clone(),
                            body: Body::Subscription(ask),
                            stanza_id: None,
                            via_cluster: None,
                        },
                    );
                    match &sub {
                        // Already approved through another dialog of the pair: the consent
                        // is the user's, not the dialog's.
                        Submitted::Delivered(_)
                            if self.pair_is_active(&(watcher.bare_string(), p.bare_string())) =>
                        {
                            MemberState::Active
                        }
                        Submitted::Delivered(_) => MemberState::Pending,
                        // Polite blocking: accepted, shown offline (see `batch_visible`).
                        Submitted::Denied(Denied::Blocked) => MemberState::Active,
                        Submitted::Denied(d) if d.condition() == ErrorCondition::Forbidden => {
                            MemberState::Rejected
                        }
                        _ => MemberState::NoResource,
                    }
                }
            };
            members.push(Member {
                uri,
                presentity,
                state,
                changed: true,
                sent: None,
            });
        }
        members
    }

    /// Whether a single notifier dialog of `pair` is already approved.
    fn pair_is_active(&self, pair: &(String, String)) -> bool {
        let single = self.notifier_pairs.get(pair).is_some_and(|ids| {
            ids.iter()
                .filter_map(|fp| self.notifiers.by_fingerprint(*fp))
                .any(|n| n.state == NotifierState::Active)
        });
        single
            || self.batches.by_pair.get(pair).is_some_and(|ids| {
                ids.iter()
                    .filter_map(|i| self.batches.by_id.get(i))
                    .any(|b| {
                        b.members.iter().any(|m| {
                            m.state == MemberState::Active
                                && m.presentity
                                    .as_ref()
                                    .is_some_and(|p| p.bare_string() == pair.1)
                        })
                    })
            })
    }

    /// Adds a batch, indexes its members by pair, and ends the watcher's oldest batch when
    /// it has too many.
    fn batch_insert(&mut self, hub: &dyn HubPort, id: DialogId, b: Batch, now: Instant) {
        self.persisted.batches_dirty = true;
        let watcher = b.watcher.bare_string();
        let mine = self.batches.by_watcher.get(&watcher);
        if mine.is_some_and(|v| v.len() >= MAX_BATCHES_PER_WATCHER) {
            let oldest = mine.and_then(|v| {
                v.iter()
                    .min_by_key(|i| self.batches.by_id.get(*i).map(|x| x.expires_at))
                    .cloned()
            });
            if let Some(old) = oldest {
                m::refused("too_many_batches_per_watcher");
                self.end_batch(hub, &old, TerminationReason::Deactivated, false, now);
            }
        }
        self.batches.insert(id, b);
    }

    /// Removes a batch and its pair index entries; forgets the resources of users nobody
    /// watches any more.
    pub(super) fn batch_remove(&mut self, id: &DialogId) -> Option<Batch> {
        let b = self.batches.remove(id)?;
        self.persisted.batches_dirty = true;
        for m in &b.members {
            if let Some(p) = &m.presentity {
                self.forget_if_unwatched(&p.bare_string());
            }
        }
        self.dirty = true;
        Some(b)
    }

    /// Drops the resource table entry of a user no subscription (single or batched) watches.
    pub(super) fn forget_if_unwatched(&mut self, presentity: &str) {
        if !self.notifier_watchers.contains_key(presentity) && !self.batches.watched(presentity) {
            self.resources.forget(presentity);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_batch_resubscribe(
        &mut self,
        hub: &dyn HubPort,
        cfg: &Config,
        peer: &PeerInfo,
        key: &TxnKey,
        req: &SipMessage,
        domain: &Domain,
        decision: ExpiresDecision,
        now: Instant,
    ) {
        let id = match DialogId::of_incoming_request(req) {
            Ok(id) if self.batches.by_id.contains_key(&id) => id,
            _ => {
                m::refused("unknown_dialog");
                let reason = "Subscription Does Not Exist";
                return self.reply(key, req, 481, reason, None, &[], None, now);
            }
        };
        let seq = req.cseq().map(|c| c.seq).unwrap_or(0);
        let Some(watcher) = self.batches.by_id.get(&id).map(|b| b.watcher.clone()) else {
            return;
        };
        let contact = format!("<{}>", self.contact_for(&watcher, Some(peer.conn)));
        let Some(b) = self.batches.by_id.get_mut(&id) else {
            return;
        };
        if !b.dialog.accept_remote_cseq(seq) {
            return self.reply(key, req, 500, "CSeq Out Of Order", None, &[], None, now);
        }
        b.dialog.refresh_target(req);
        b.conn = Some(peer.conn);
        let change = if is_adrl(req) {
            match rlmi::decode_batch_sub(req.body()) {
                Ok(c) => c.action.map(|(a, _)| (a, c.resources)),
                Err(e) => {
                    m::refused("bad_batch_body");
                    tracing::info!(error = %LogSafe(&e.to_string()), "batched SUBSCRIBE body refused");
                    let reason = "Bad Request (Malformed batchSub Body)";
                    return self.reply(key, req, 400, reason, None, &[], None, now);
                }
            }
        } else {
            None
        };
        if let (Some(change), ExpiresDecision::Grant(_)) = (change, decision) {
            if let Err((code, reason)) = self.change_batch(hub, cfg, domain, &id, change) {
                return self.reply(key, req, code, reason, None, &[], None, now);
            }
        }
        let Some(b) = self.batches.by_id.get_mut(&id) else {
            return;
        };
        match decision {
            ExpiresDecision::Grant(g) => {
                b.expires_at = now + Duration::from_secs(u64::from(g));
                self.persisted.batches_dirty = true;
                let gs = g.to_string();
                let extra = [("Expires", gs.as_str()), ("Contact", contact.as_str())];
                self.reply(key, req, 200, "OK", None, &extra, None, now);
                self.arm_batch(&id, now + Duration::from_secs(u64::from(g)));
                self.dirty = true;
                // RFC 6665 §4.2.1.2 and RFC 4662 §5.3: a refresh gets the full state.
                self.send_batch_notify(hub, &id, true, None, now);
            }
            _ => {
                let extra = [("Expires", "0"), ("Contact", contact.as_str())];
                self.reply(key, req, 200, "OK", None, &extra, None, now);
                self.end_batch(hub, &id, TerminationReason::Unsubscribed, true, now);
            }
        }
    }

    /// An in-dialog `batchSub`: a `subscribe` action adds the listed contacts that are not
    /// members yet, an `unsubscribe` action removes the listed ones (their home nodes told as
    /// when a subscription ends). The refresh's full-state NOTIFY reports the new list.
    fn change_batch(
        &mut self,
        hub: &dyn HubPort,
        cfg: &Config,
        domain: &Domain,
        id: &DialogId,
        (action, uris): (rlmi::BatchAction, Vec<String>),
    ) -> Result<(), (u16, &'static str)> {
        let Some(b) = self.batches.by_id.get(id) else {
            return Ok(());
        };
        // Contacts added or removed: the stored record follows.
        self.persisted.batches_dirty = true;
        let watcher = b.watcher.clone();
        match action {
            rlmi::BatchAction::Subscribe => {
                let mut add: Vec<String> = Vec::new();
                for u in uris {
                    if !b.members.iter().any(|m| m.uri == u) && !add.contains(&u) {
                        add.push(u);
                    }
                }
                if b.members.len() + add.len() > MAX_BATCH_RESOURCES {
                    m::refused("batch_too_large");
                    return Err((
                        413,
                        "Request Entity Too Large (At Most 1000 Contacts Per Batched Subscription)",
                    ));
                }
                if self.notifiers.len() + self.batches.members + add.len()
                    > self.caps.foreign_watchers
                {
                    m::refused("too_many_watchers");
                    return Err((503, "Service Unavailable (Overloaded)"));
                }
                let new =
                    self.new_members(hub, cfg, domain, &watcher, add, Subscription::Subscribe);
                self.batches.add_members(id, new);
            }
            rlmi::BatchAction::Unsubscribe => {
                let gone = self.batches.remove_members(id, &uris);
                self.dirty = true;
                for m in gone {
                    let Some(p) = m.presentity else { continue };
                    self.forget_if_unwatched(&p.bare_string());
                    self.tell_home_gone(hub, domain, &watcher, p);
                }
            }
        }
        Ok(())
    }

    /// A watcher no longer watches `presentity` through this edge: unless another dialog of
    /// the pair remains, the home node is told (what `end_notifier` sends).
    fn tell_home_gone(
        &self,
        hub: &dyn HubPort,
        domain: &Domain,
        watcher: &Address,
        presentity: Address,
    ) {
        let pair = (watcher.bare_string(), presentity.bare_string());
        if self.notifier_pairs.contains_key(&pair) || self.batches.watches(&pair) {
            return;
        }
        // RFC 8048 §5.3.3, as `end_notifier`: unavailable presence of the watcher (the user's
        // approval outlives the subscription); a blocked watcher's end is not told at all.
        if hub.consent(&presentity, watcher) == Consent::Blocked {
            return;
        }
        let link = Link::Sip {
            domain: domain.clone(),
        };
        if let Some(p) = policy::offline_in(&hub.config(), &hub.maps(), &link) {
            hub.submit(
                domain,
                Envelope {
                    from: watcher.clone(),
                    to: presentity,
                    body: Body::Presence(p),
                    stanza_id: None,
                    via_cluster: None,
                },
            );
        }
    }

    /// Sends the terminated NOTIFY, forgets the batch and, when the peer or time ended it,
    /// tells each member's home node (unless another dialog still watches that user).
    pub(super) fn end_batch(
        &mut self,
        hub: &dyn HubPort,
        id: &DialogId,
        reason: TerminationReason,
        tell_home: bool,
        now: Instant,
    ) {
        self.send_batch_notify(hub, id, true, Some(reason), now);
        let Some(b) = self.batch_remove(id) else {
            return;
        };
        if !tell_home {
            return;
        }
        for m in b.members {
            if let Some(p) = m.presentity {
                self.tell_home_gone(hub, &b.domain, &b.watcher, p);
            }
        }
    }

    /// The user's presence as batch members of `watcher` see it: polite blocking (requirements
    /// §3) shows a blocked watcher offline, as `notify` does for single notifiers.
    fn batch_visible(
        &self,
        hub: &dyn HubPort,
        watcher: &Address,
        presentity: &Address,
    ) -> Option<PresenceBody> {
        match hub.consent(presentity, watcher) {
            Consent::Blocked => None,
            _ => self
                .resources
                .aggregate(&presentity.bare_string())
                .as_deref()
                .cloned(),
        }
    }

    /// A presence for `pair` (watcher, presentity) reached the edge: the pair's members in
    /// every batch of the watcher change (and a pending one becomes active: an XMPP server
    /// only sends presence to approved subscribers).
    pub(super) fn batch_presence(&mut self, pair: &(String, String), now: Instant) {
        self.batch_mark(pair, None, now);
    }

    /// The user's consent for a watcher (or, with an empty localpart, a whole domain) changed
    /// — the home node answered, or the admin changed the lists: the members concerned become
    /// active and are sent again with what they may now see (offline when blocked; a refusal
    /// never terminates a member, as it never ends a single subscription).
    pub(super) fn batch_delivery(&mut self, env: &Envelope, now: Instant) {
        if !matches!(
            env.body,
            Body::Subscription(Subscription::Subscribed | Subscription::Unsubscribed)
        ) {
            return;
        }
        let (user, target) = (env.from.bare_string(), &env.to);
        let pairs: Vec<(String, String)> = if target.local.is_empty() {
            self.batches
                .by_watcher
                .keys()
                .filter(|w| Address::parse(w).is_ok_and(|w| policy::covers(target, &w)))
                .map(|w| (w.clone(), user.clone()))
                .filter(|pair| self.batches.watches(pair))
                .collect()
        } else {
            vec![(target.bare_string(), user)]
        };
        for pair in pairs {
            if self.batches.watches(&pair) {
                self.batch_mark(&pair, Some(MemberState::Active), now);
            }
        }
    }

    /// Marks the members of `pair` changed (moving them to `to`, or pending ones to active)
    /// and schedules the coalesced NOTIFY.
    fn batch_mark(&mut self, pair: &(String, String), to: Option<MemberState>, now: Instant) {
        let ids = self.batches.by_pair.get(pair).cloned().unwrap_or_default();
        for id in ids {
            let Some(b) = self.batches.by_id.get_mut(&id) else {
                continue;
            };
            let mut any = false;
            for m in b.members.iter_mut() {
                if m.presentity.as_ref().map(|p| p.bare_string()).as_ref() != Some(&pair.1) {
                    continue;
                }
                let state = match (to, m.state) {
                    (Some(s), _) => s,
                    (None, MemberState::Pending) => MemberState::Active,
                    (None, s) => s,
                };
                // A member's state is what the store keeps (its presence is not).
                self.persisted.batches_dirty |= state != m.state;
                m.state = state;
                m.changed = true;
                any = true;
            }
            if any && b.flush_at.is_none() {
                let at = now + COALESCE;
                b.flush_at = Some(at);
                self.arm_batch(&id, at);
            }
        }
    }

    /// Queues the timer of batch `id` at `at` unless one at or before it is queued.
    fn arm_batch(&mut self, id: &DialogId, at: Instant) {
        let Some(b) = self.batches.by_id.get_mut(id) else {
            return;
        };
        if b.armed.is_some_and(|a| a <= at) {
            return;
        }
        b.armed = Some(at);
        self.schedule(TimerKey::Batch(id.clone()), at);
    }

    /// Batch `id`'s timer fired (queued for `at`): expiry, or the coalesced NOTIFY.
    pub(super) fn batch_timer(
        &mut self,
        hub: &dyn HubPort,
        id: &DialogId,
        at: Instant,
        now: Instant,
    ) {
        let Some(b) = self.batches.by_id.get_mut(id) else {
            return;
        };
        if b.armed == Some(at) {
            b.armed = None;
        }
        if b.expires_at <= now {
            return self.end_batch(hub, id, TerminationReason::Timeout, true, now);
        }
        if b.flush_at.is_some_and(|f| f <= now) {
            b.flush_at = None;
            self.send_batch_notify(hub, id, false, None, now);
        }
        let next = self
            .batches
            .by_id
            .get(id)
            .map(|b| b.flush_at.map_or(b.expires_at, |f| f.min(b.expires_at)));
        if let Some(next) = next {
            self.arm_batch(id, next);
        }
    }

    /// The RLMI multipart body: the list (all members when `full`, else the changed ones whose
    /// content differs from what was last sent) and a state part per active member. `ended`
    /// terminates every instance (the final NOTIFY). Clears the members' `changed` flags and
    /// advances the version; `None` (nothing to say) for a partial with no member left.
    fn batch_document(
        &self,
        hub: &dyn HubPort,
        b: &mut Batch,
        full: bool,
        ended: Option<TerminationReason>,
    ) -> Option<(String, Vec<u8>)> {
        let maps = hub.maps();
        let cfg = hub.config();
        let system = cfg
            .sip_federated(&b.domain)
            .map_or("lync", |f| f.system.as_str())
            .to_string();
        let mut list = rlmi::List {
            uri: format!("sip:{}", b.watcher.bare_string()),
            version: b.version,
            full_state: full,
            resources: Vec::new(),
        };
        let mut parts = vec![Part {
            content_id: rlmi::RLMI_CID.into(),
            content_type: rlmi::RLMI_CONTENT_TYPE.into(),
            body: Vec::new(),
        }];
        for m in b.members.iter_mut() {
            if !full && !m.changed {
                continue;
            }
            m.changed = false;
            let (state, reason) = match ended {
                Some(r) => (InstanceState::Terminated, Some(r.token())),
                None => m.state.instance(),
            };
            let mut cid = None;
            if state == InstanceState::Active {
                if let Some(p) = &m.presentity {
                    let entity = format!("sip:{}", p.bare_string());
                    let presence = self.batch_visible(hub, &b.watcher, p);
                    let body = subscription::encode_body(
                        &maps,
                        &system,
                        presence.as_ref(),
                        SipBodyKind::Msrtc,
                        &entity,
                    );
                    if let Some(body) = body {
                        let c = p.bare_string();
                        parts.push(Part {
                            content_id: c.clone(),
                            content_type: SipBodyKind::Msrtc.content_type().into(),
                            body,
                        });
                        cid = Some(c);
                    }
                }
            }
            let fingerprint = {
                use std::hash::{Hash, Hasher};
                let mut h = std::hash::DefaultHasher::new();
                state.as_str().hash(&mut h);
                reason.hash(&mut h);
                if cid.is_some() {
                    parts.last().map(|p| &p.body).hash(&mut h);
                }
                h.finish()
            };
            if !full && m.sent == Some(fingerprint) {
                if cid.is_some() {
                    parts.pop();
                }
                continue;
            }
            m.sent = Some(fingerprint);
            list.resources.push(rlmi::Resource {
                uri: m.uri.clone(),
                instances: vec![Instance {
                    id: "0".into(),
                    state,
                    reason: reason.map(str::to_string),
                    cid,
                }],
            });
        }
        if !full && list.resources.is_empty() {
            m::NOTIFY_UNCHANGED.with_label_values(&["unchanged"]).inc();
            return None;
        }
        b.version = b.version.saturating_add(1);
        let mut doc = Vec::with_capacity(256 + 128 * list.resources.len());
        rlmi::encode_rlmi(&list, &mut doc);
        if let Some(first) = parts.first_mut() {
            first.body = doc;
        }
        let boundary = rlmi::pick_boundary(&random_token(12), &parts);
        let mut out = Vec::with_capacity(parts.iter().map(|p| p.body.len() + 128).sum());
        rlmi::encode_related(&boundary, &parts, &mut out);
        Some((rlmi::related_content_type(&boundary), out))
    }

    /// Sends an RLMI NOTIFY on batch `id` (RFC 4662 §5: `Require: eventlist`).
    fn send_batch_notify(
        &mut self,
        hub: &dyn HubPort,
        id: &DialogId,
        full: bool,
        ended: Option<TerminationReason>,
        now: Instant,
    ) {
        let on = self.batches.by_id.get(id).and_then(|b| b.conn);
        let via = self.via_on(on);
        let Some(mut b) = self.batches.by_id.remove(id) else {
            return;
        };
        if !full && !b.members.iter().any(|m| m.changed) {
            self.batches.by_id.insert(id.clone(), b);
            return;
        }
        let contact = self.contact_for(&b.watcher, on);
        let state = match ended {
            Some(r) => format!("terminated;reason={}", r.token()),
            None => format!(
                "active;expires={}",
                b.expires_at.saturating_duration_since(now).as_secs()
            ),
        };
        let Some((ct, body)) = self.batch_document(hub, &mut b, full, ended) else {
            self.batches.by_id.insert(id.clone(), b);
            return;
        };
        let req = b.dialog.request(&InDialog {
            method: "NOTIFY",
            via: &via,
            contact: Some(&contact),
            extra: &[
                ("Event", "presence"),
                ("Subscription-State", &state),
                ("Require", "eventlist"),
            ],
            body: Some((&ct, &body)),
            cseq_override: None,
        });
        let (conn, domain) = (b.conn, b.domain.clone());
        self.batches.by_id.insert(id.clone(), b);
        match req {
            Ok(r) => {
                self.send_request(r, conn, domain, Purpose::Notify { dialog: id.clone() }, now)
            }
            Err(e) => tracing::error!(error = %e, "cannot build batched NOTIFY"),
        }
    }

    /// Persisted form of every batch (for the store; `unix_now` is the Unix time of `now`).
    pub fn persisted_batches(&self, now: Instant, unix_now: u64) -> Vec<PersistedBatch> {
        self.batches
            .by_id
            .values()
            .map(|b| b.persisted(now, unix_now))
            .collect()
    }

    /// Live batched dialogs (tests, status).
    /// Rebuilds a batched subscription from its store record (see `persist`): the dialog with
    /// a CSeq margin (NOTIFYs sent after the last write must not be reused, RFC 3261
    /// §12.2.1.1), the RLMI version likewise (RFC 4662 §5.2: a version must not go back), the
    /// members and their states. Nothing is sent: the home side is asked when its link comes
    /// up (`batch_link_up`), and the next NOTIFY carries the members' current state.
    pub(super) fn restore_batch(
        &mut self,
        hub: &dyn HubPort,
        p: PersistedBatch,
        now: Instant,
        base: u64,
    ) -> Option<DialogId> {
        if p.expires_unix <= base {
            return None;
        }
        let (Ok(watcher), Ok(domain)) = (Address::parse(&p.watcher), Domain::parse(&p.domain))
        else {
            tracing::warn!("stored batched subscription with unparsable addresses skipped");
            return None;
        };
        hub.config().sip_federated(&domain)?;
        let remaining = p
            .expires_unix
            .saturating_sub(base)
            .min(u64::from(subscription::MAX_EXPIRES));
        let expires_at = now.checked_add(Duration::from_secs(remaining))?;
        let mut dialog = p.dialog;
        dialog.local_cseq = dialog.local_cseq.saturating_add(RESTORE_CSEQ_MARGIN);
        let id = dialog.id.clone();
        if self.batches.by_id.contains_key(&id) {
            return None;
        }
        let members = p
            .members
            .into_iter()
            .take(MAX_BATCH_RESOURCES)
            .map(|(uri, state)| Member {
                presentity: match state {
                    MemberState::NoResource => None,
                    _ => address_of(&uri),
                },
                uri,
                state,
                changed: false,
                sent: None,
            })
            .collect();
        let b = Batch {
            dialog,
            watcher,
            domain,
            expires_at,
            conn: None,
            version: p.version.saturating_add(RESTORE_CSEQ_MARGIN),
            members,
            flush_at: None,
            armed: None,
        };
        self.batches.insert(id.clone(), b);
        self.arm_batch(&id, expires_at);
        Some(id)
    }

    /// What the home side must hear when the component link of foreign `domain` comes up: a
    /// probe for each approved member of its watchers' batches (the answer refreshes the
    /// batch's NOTIFY) and the pending requests again.
    pub(super) fn batch_link_up(&self, domain: &Domain) -> Vec<(Domain, Envelope)> {
        let mut out = Vec::new();
        for b in self.batches.by_id.values() {
            if b.domain != *domain && b.watcher.domain != *domain {
                continue;
            }
            for m in &b.members {
                let ask = match m.state {
                    MemberState::Active => Subscription::Probe,
                    MemberState::Pending => Subscription::Subscribe,
                    _ => continue,
                };
                if let Some(p) = &m.presentity {
                    out.push((
                        b.domain.clone(),
                        Envelope {
                            from: b.watcher.clone(),
                            to: p.clone(),
                            body: Body::Subscription(ask),
                            stanza_id: None,
                            via_cluster: None,
                        },
                    ));
                }
            }
        }
        out
    }

    pub fn batch_count(&self) -> usize {
        self.batches.by_id.len()
    }
}
