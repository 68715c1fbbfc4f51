//! Persistence of presence subscriptions (requirements §1: a restart loses none), both roles:
//! foreign watchers' subscriptions to local users (notifier dialogs, RFC 6665 §4.2) and local
//! users' subscriptions to foreign users (subscriber dialogs, RFC 6665 §4.1).
//!
//! Sans-IO like the rest of the core: the core turns its tables into store operations
//! ([`Core::take_store_ops`], one record per subscription, written only when it changed) and
//! rebuilds them from records ([`Core::restore_record`]); the driver talks to the store.
//! Restoring never talks to either side: the home node's component link may not exist yet
//! (at start it never does). What a restored subscription owes — a probe for an approved
//! watcher, the pending request again, the last presence of a foreign contact, the refresh of
//! a local user's subscription — is sent when that domain's link comes up
//! ([`Core::handle_link_up`]), paced by [`Core::pump_link_up`] so a large table does not
//! overflow the link's queue.
//!
//! Record keys: `sip/n/<local tag>/<remote tag>/<Call-ID>` (tags are tokens, so the key
//! splits unambiguously) and `sip/s/<watcher>/<presentity>`. Values are positional JSON arrays
//! (no field names: a Lync watcher's record stays well under 1 KiB).

use std::collections::{HashSet, VecDeque};

use super::*;

/// Store key prefix of notifier records.
pub const NOTIFIER_PREFIX: &str = "sip/n/";
/// Store key prefix of subscriber records.
pub const SUBSCRIBER_PREFIX: &str = "sip/s/";
/// Store key prefix of batched (Lync `adhoclist`) subscription records.
pub const BATCH_PREFIX: &str = "sip/b/";
/// Prefix of every record the SIP edge owns.
pub const SIP_PREFIX: &str = "sip/";
/// Record layout version (the first element of every value).
const RECORD_VERSION: u8 = 1;

/// One change for the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

/// What [`Core::restore_record`] did with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restored {
    Notifier,
    Subscriber,
    Batch,
    /// An established IM session (`im_persist`).
    Session,
    /// Expired, for a domain no longer federated, or unreadable (logged); the record is
    /// deleted at the next write.
    Dropped,
}

/// A dialog, positionally.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct DialogRec(
    String,      // call id
    String,      // local tag
    String,      // remote tag
    String,      // local uri
    String,      // remote uri
    String,      // remote target
    Vec<String>, // route set
    u32,         // local cseq
    Option<u32>, // remote cseq
);

impl From<&Dialog> for DialogRec {
    fn from(d: &Dialog) -> Self {
        DialogRec(
            d.id.call_id().to_owned(),
            d.id.local_tag().to_owned(),
            d.id.remote_tag().to_owned(),
            d.local_uri().to_owned(),
            d.remote_uri().to_owned(),
            d.remote_target().to_owned(),
            d.route_set.iter().map(|r| r.to_string()).collect(),
            d.local_cseq,
            d.remote_cseq,
        )
    }
}

impl From<DialogRec> for Dialog {
    fn from(r: DialogRec) -> Self {
        Dialog::new(
            DialogId::new(&r.0, &r.1, &r.2),
            &r.3,
            &r.4,
            &r.5,
            r.6,
            r.7,
            r.8,
        )
    }
}

/// A notifier: version, dialog, watcher, presentity, domain, active, msrtc, expiry (Unix s).
#[derive(Debug, Serialize, Deserialize)]
struct NotifierRec(u8, DialogRec, String, String, String, bool, bool, u64);

/// A subscriber: version, watcher, presentity, domain, Call-ID, local tag, CSeq, approved,
/// Expires asked, dialog (once established).
#[derive(Debug, Serialize, Deserialize)]
struct SubscriberRec(
    u8,
    String,
    String,
    String,
    String,
    String,
    u32,
    bool,
    u32,
    Option<DialogRec>,
);

fn notifier_key(id: &DialogId) -> String {
    format!(
        "{NOTIFIER_PREFIX}{}/{}/{}",
        id.local_tag(),
        id.remote_tag(),
        id.call_id()
    )
}

fn subscriber_key(pair: &(String, String)) -> String {
    format!("{SUBSCRIBER_PREFIX}{}/{}", pair.0, pair.1)
}

fn batch_key(id: &DialogId) -> String {
    format!(
        "{BATCH_PREFIX}{}/{}/{}",
        id.local_tag(),
        id.remote_tag(),
        id.call_id()
    )
}

/// What decides whether a batch record must be written again: its members and their states,
/// the peer's target and route, and the expiry to the minute (a refresh moves it; the clock
/// turning does not). The RLMI version is left out: it moves with every NOTIFY, and a restore
/// adds a margin to it instead.
fn batch_print(p: &PersistedBatch) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .build_hasher();
    for (uri, state) in &p.members {
        uri.hash(&mut h);
        (*state as u8).hash(&mut h);
    }
    p.dialog.remote_target().hash(&mut h);
    p.dialog.route_set.hash(&mut h);
    (p.expires_unix / 60).hash(&mut h);
    h.finish()
}

fn unix(wall: SystemTime) -> u64 {
    wall.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// What a change to a notifier's record looks like: state, format, expiry and the peer's
/// CSeq (a refresh moves both; its new target comes with it), hashed into the 8 bytes kept
/// in the notifier ([`StoreMark::written`]). NOTIFYs alone (our CSeq) are left out: restored
/// dialogs add `RESTORE_CSEQ_MARGIN` instead.
pub(super) fn notifier_print(n: &Notifier) -> u64 {
    use std::hash::BuildHasher;
    std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(
        (
            n.state == NotifierState::Active,
            n.format == SipBodyKind::Msrtc,
            n.expires_at,
            n.dialog.remote_cseq,
        ),
    )
}

/// The same for a subscriber: a new subscription for the pair has a new id; a dialog, an
/// approval, a (re)SUBSCRIBE (our CSeq) or a new Expires change the record.
type SubscriberPrint = (u64, bool, u32, u32, Option<u32>);

fn subscriber_print(s: &Subscriber) -> SubscriberPrint {
    (
        s.id,
        matches!(s.state, SubscriberState::Established { approved: true }),
        s.cseq,
        s.expires,
        s.dialog.as_ref().map(|d| d.local_cseq),
    )
}

/// One record as the store holds it: its print (None: a record to delete) and the pass of
/// `take_store_ops` that last saw it live.
struct Stored<P> {
    print: Option<P>,
    seen: u32,
}

impl<P> Stored<P> {
    /// A record whose content is not known to match anything live.
    const UNKNOWN: Self = Stored {
        print: None,
        seen: 0,
    };
}

/// Persistence bookkeeping kept by the core: what the store holds and what still has to be
/// told to the home side after a link came up.
#[derive(Default)]
pub(crate) struct Persisted {
    /// Notifiers gone whose record is still in the store (live ones carry their own
    /// [`StoreMark`]): deleted by the next `take_store_ops`.
    pub(super) dead_notifiers: HashSet<DialogId>,
    subscribers: HashMap<(String, String), Stored<SubscriberPrint>>,
    /// Pass counter of full `take_store_ops` scans (records not seen in one are gone).
    pass: u32,
    /// A change was flagged (`Core::dirty`) since the last full scan.
    scan_owed: bool,
    /// What changed since the last `take_store_ops`, for the cheap pass.
    pub(super) touched: Touched,
    /// Touched notifiers a cheap pass left for later (`take_store_ops_upto`), oldest first;
    /// one may be listed twice (encoded once: the second finds its record written).
    backlog: Vec<DialogId>,
    /// Envelopes owed to the home side after a link came up, sent a slice at a time.
    kicks: VecDeque<(Domain, Envelope)>,
    /// Restored subscribers waiting for their domain's link to refresh.
    unrefreshed: Vec<u64>,
    /// Batched subscriptions as stored: a fingerprint of what the record says.
    batches: HashMap<DialogId, u64>,
    /// A batch was created, changed or ended since the last `take_store_ops`.
    pub(super) batches_dirty: bool,
}

/// Subscriptions changed since the last write, noted where they change.
#[derive(Default)]
pub(crate) struct Touched {
    pub(super) notifiers: HashSet<DialogId>,
    pub(super) subscribers: HashSet<u64>,
    /// Pairs whose subscriber was removed (a new one for the pair is in `subscribers`).
    pub(super) gone_pairs: Vec<(String, String)>,
}

fn notifier_op(n: &mut Notifier, now: Instant, base: u64, ops: &mut Vec<StoreOp>) {
    let print = notifier_print(n);
    if n.stored == StoreMark::written(print) {
        return;
    }
    n.stored = StoreMark::written(print);
    let rec = NotifierRec(
        RECORD_VERSION,
        DialogRec::from(&n.dialog),
        n.parties.watcher_bare(),
        n.parties.presentity_bare(),
        n.domain().to_string(),
        n.state == NotifierState::Active,
        n.format == SipBodyKind::Msrtc,
        base + n
            .expires_at
            .instant()
            .saturating_duration_since(now)
            .as_secs(),
    );
    match serde_json::to_vec(&rec) {
        Ok(value) => ops.push(StoreOp::Put {
            key: notifier_key(&n.dialog.id),
            value,
        }),
        Err(e) => tracing::error!(error = %e, "cannot encode a notifier record"),
    }
}

fn subscriber_op(
    pair: &(String, String),
    s: &Subscriber,
    stored: &mut HashMap<(String, String), Stored<SubscriberPrint>>,
    pass: u32,
    ops: &mut Vec<StoreOp>,
) {
    // An un-SUBSCRIBE in flight is not worth restoring: its record goes.
    if s.state == SubscriberState::Unsubscribing {
        if stored.remove(pair).is_some() {
            ops.push(StoreOp::Delete {
                key: subscriber_key(pair),
            });
        }
        return;
    }
    let print = subscriber_print(s);
    match stored.get_mut(pair) {
        Some(st) => {
            st.seen = pass;
            if st.print == Some(print) {
                return;
            }
            st.print = Some(print);
        }
        None => {
            stored.insert(
                pair.clone(),
                Stored {
                    print: Some(print),
                    seen: pass,
                },
            );
        }
    }
    let rec = SubscriberRec(
        RECORD_VERSION,
        pair.0.clone(),
        pair.1.clone(),
        s.domain.to_string(),
        s.call_id.clone(),
        s.local_tag.clone(),
        s.cseq,
        matches!(s.state, SubscriberState::Established { approved: true }),
        s.expires,
        s.dialog.as_ref().map(DialogRec::from),
    );
    match serde_json::to_vec(&rec) {
        Ok(value) => ops.push(StoreOp::Put {
            key: subscriber_key(pair),
            value,
        }),
        Err(e) => tracing::error!(error = %e, "cannot encode a subscriber record"),
    }
}

/// Drops the records whose key the store would refuse (a peer's Call-ID or tag of a kilobyte):
/// such a subscription lives, but is not kept across a restart, and is not retried forever.
fn storable(mut ops: Vec<StoreOp>) -> Vec<StoreOp> {
    let before = ops.len();
    ops.retain(|op| {
        let (StoreOp::Put { key, .. } | StoreOp::Delete { key }) = op;
        key.len() <= crate::store::MAX_KEY
    });
    if ops.len() < before {
        tracing::info!(
            skipped = before - ops.len(),
            "subscriptions with overlong dialog identifiers not persisted"
        );
    }
    ops
}

impl Core {
    /// Notes that notifier `id` changed (or went): the next `take_store_ops` looks at it.
    pub(super) fn touch_notifier(&mut self, id: &DialogId) {
        if !self.persisted.touched.notifiers.contains(id) {
            self.persisted.touched.notifiers.insert(id.clone());
        }
    }

    /// Notes that subscriber `id` changed.
    pub(super) fn touch_subscriber(&mut self, id: u64) {
        self.persisted.touched.subscribers.insert(id);
        self.dirty = true;
    }

    /// The store operations that bring the store up to the core's tables: one put per
    /// subscription created or changed since the last call, one delete per one gone.
    ///
    /// The cheap pass (`full` false, every second) looks only at what was touched where
    /// subscriptions change (created, refreshed, notified, answered, removed): its cost
    /// follows the traffic, not the table. The full pass (`full` true: the driver asks once
    /// a minute and at shutdown) compares every entry, a safety net for a change made
    /// without a touch; it runs only when something was flagged (`Core::dirty`) since the
    /// last one.
    pub fn take_store_ops(&mut self, now: Instant, wall: SystemTime, full: bool) -> Vec<StoreOp> {
        self.take_store_ops_upto(now, wall, full, usize::MAX)
    }

    /// [`Core::take_store_ops`], encoding at most `chunk` of the touched notifiers (the cheap
    /// pass); the others wait in a backlog that [`Core::take_store_backlog`] encodes, a chunk
    /// at a time, as the driver writes the previous one. While 100 000 subscriptions are set
    /// up, a second's touched notifiers are ~20 000 records: encoded at once they were ~10 MB
    /// built and freed each second, room the allocator keeps (issue 11 item 10). A notifier
    /// touched again while it waits is encoded once, as it is then.
    pub fn take_store_ops_upto(
        &mut self,
        now: Instant,
        wall: SystemTime,
        full: bool,
        chunk: usize,
    ) -> Vec<StoreOp> {
        let base = unix(wall);
        let mut touched = std::mem::take(&mut self.persisted.touched);
        self.persisted.scan_owed |= self.take_dirty();
        let mut ops = self.take_session_ops();
        if full && self.persisted.scan_owed {
            self.persisted.scan_owed = false;
            let pass = self.persisted.pass.wrapping_add(1);
            self.persisted.pass = pass;
            for n in self.notifiers.values_mut() {
                notifier_op(n, now, base, &mut ops);
            }
            for id in self.persisted.dead_notifiers.drain() {
                ops.push(StoreOp::Delete {
                    key: notifier_key(&id),
                });
            }
            self.persisted.dead_notifiers.shrink_to_fit();
            let stored = &mut self.persisted.subscribers;
            for (pair, sid) in &self.subscriber_pairs {
                if let Some(s) = self.subscribers.get(sid) {
                    subscriber_op(pair, s, stored, pass, &mut ops);
                }
            }
            stored.retain(|pair, st| {
                let live = st.seen == pass;
                if !live {
                    ops.push(StoreOp::Delete {
                        key: subscriber_key(pair),
                    });
                }
                live
            });
            self.batch_ops(now, base, true, &mut ops);
            // Every notifier was compared: nothing waits.
            self.persisted.backlog = Vec::new();
            return storable(ops);
        }
        let pass = self.persisted.pass;
        // Oldest first: what waited since an earlier pass, then what was touched since.
        let backlog = &mut self.persisted.backlog;
        backlog.extend(touched.notifiers.drain());
        let now_ids: Vec<DialogId> = backlog.drain(..chunk.min(backlog.len())).collect();
        if backlog.is_empty() {
            // The room of a burst is not kept.
            *backlog = Vec::new();
        }
        self.notifier_ops(&now_ids, now, base, &mut ops);
        // The room of a burst of ends (a mass expiry) is not kept.
        let dead = &mut self.persisted.dead_notifiers;
        if dead.capacity() > 4 * dead.len() + 64 {
            dead.shrink_to_fit();
        }
        for pair in &touched.gone_pairs {
            if !self.subscriber_pairs.contains_key(pair)
                && self.persisted.subscribers.remove(pair).is_some()
            {
                ops.push(StoreOp::Delete {
                    key: subscriber_key(pair),
                });
            }
        }
        for sid in &touched.subscribers {
            if let Some(s) = self.subscribers.get(sid) {
                let pair = (s.watcher.bare_string(), s.presentity.bare_string());
                // Only the pair's current subscription is stored.
                if self.subscriber_pairs.get(&pair) == Some(sid) {
                    subscriber_op(&pair, s, &mut self.persisted.subscribers, pass, &mut ops);
                }
            }
        }
        self.batch_ops(now, base, false, &mut ops);
        storable(ops)
    }

    /// Whether touched notifiers wait to be encoded (see [`Core::take_store_ops_upto`]).
    pub fn has_store_backlog(&self) -> bool {
        !self.persisted.backlog.is_empty()
    }

    /// The next `chunk` of the notifiers waiting to be encoded, oldest first.
    pub fn take_store_backlog(
        &mut self,
        now: Instant,
        wall: SystemTime,
        chunk: usize,
    ) -> Vec<StoreOp> {
        let base = unix(wall);
        let backlog = &mut self.persisted.backlog;
        let ids: Vec<DialogId> = backlog.drain(..chunk.min(backlog.len())).collect();
        if backlog.is_empty() {
            *backlog = Vec::new();
        }
        let mut ops = Vec::new();
        self.notifier_ops(&ids, now, base, &mut ops);
        storable(ops)
    }

    /// Puts for `ids` created or changed since they were last written, deletes for those gone.
    fn notifier_ops(&mut self, ids: &[DialogId], now: Instant, base: u64, ops: &mut Vec<StoreOp>) {
        for id in ids {
            match self.notifiers.get_mut(id) {
                Some(n) => notifier_op(n, now, base, ops),
                None => {
                    if self.persisted.dead_notifiers.remove(id) {
                        ops.push(StoreOp::Delete {
                            key: notifier_key(id),
                        });
                    }
                }
            }
        }
    }

    /// Puts for the batches created or changed since they were last written, deletes for
    /// those gone. Runs when a batch changed (or on the full pass): batches are few (each
    /// holds up to a thousand contacts), so looking at all of them then is cheap.
    fn batch_ops(&mut self, now: Instant, base: u64, full: bool, ops: &mut Vec<StoreOp>) {
        if !(full || self.persisted.batches_dirty) {
            return;
        }
        self.persisted.batches_dirty = false;
        let mut live = HashSet::new();
        for p in self.persisted_batches(now, base) {
            let id = p.dialog.id.clone();
            let print = batch_print(&p);
            live.insert(id.clone());
            if self.persisted.batches.get(&id) == Some(&print) {
                continue;
            }
            match serde_json::to_vec(&p) {
                Ok(value) => {
                    self.persisted.batches.insert(id.clone(), print);
                    ops.push(StoreOp::Put {
                        key: batch_key(&id),
                        value,
                    });
                }
                Err(e) => tracing::error!(error = %e, "cannot encode a batched subscription"),
            }
        }
        let gone: Vec<DialogId> = self
            .persisted
            .batches
            .keys()
            .filter(|id| !live.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            self.persisted.batches.remove(&id);
            ops.push(StoreOp::Delete {
                key: batch_key(&id),
            });
        }
    }

    /// Rebuilds one subscription from its store record. A restored subscriber sends its
    /// SUBSCRIBE (in its dialog when it had one) at once: that needs only the SIP side. The
    /// home side hears about restored subscriptions when its link comes up.
    pub fn restore_record(
        &mut self,
        hub: &dyn HubPort,
        key: &str,
        value: &[u8],
        now: Instant,
        wall: SystemTime,
    ) -> Restored {
        let r = if key.starts_with(im_persist::SESSION_PREFIX) {
            self.restore_session(hub, key, value, now)
        } else if key.starts_with(NOTIFIER_PREFIX) {
            match serde_json::from_slice::<NotifierRec>(value) {
                Ok(NotifierRec(RECORD_VERSION, d, w, p, dom, active, msrtc, exp)) => {
                    let p = PersistedNotifier {
                        dialog: d.into(),
                        watcher: w,
                        presentity: p,
                        domain: dom,
                        active,
                        msrtc,
                        expires_unix: exp,
                    };
                    match self.restore_notifier(hub, p, now, unix(wall)) {
                        Some(_) => Restored::Notifier,
                        None => Restored::Dropped,
                    }
                }
                Ok(_) => Restored::Dropped,
                Err(e) => {
                    tracing::warn!(key = %LogSafe(key), error = %e, "unreadable notifier record dropped");
                    Restored::Dropped
                }
            }
        } else if key.starts_with(BATCH_PREFIX) {
            match serde_json::from_slice::<PersistedBatch>(value) {
                Ok(p) => match self.restore_batch(hub, p, now, unix(wall)) {
                    Some(id) => {
                        // As stored: the next pass writes it only when it changes.
                        if let Some(p) = self
                            .persisted_batches(now, unix(wall))
                            .into_iter()
                            .find(|p| p.dialog.id == id)
                        {
                            self.persisted.batches.insert(id, batch_print(&p));
                        }
                        Restored::Batch
                    }
                    None => Restored::Dropped,
                },
                Err(e) => {
                    tracing::warn!(key = %LogSafe(key), error = %e, "unreadable batch record dropped");
                    Restored::Dropped
                }
            }
        } else if key.starts_with(SUBSCRIBER_PREFIX) {
            match serde_json::from_slice::<SubscriberRec>(value) {
                Ok(rec) if rec.0 == RECORD_VERSION => self.restore_subscriber(hub, rec),
                Ok(_) => Restored::Dropped,
                Err(e) => {
                    tracing::warn!(key = %LogSafe(key), error = %e, "unreadable subscriber record dropped");
                    Restored::Dropped
                }
            }
        } else {
            Restored::Dropped
        };
        if r == Restored::Dropped {
            // The next write deletes it: it is remembered as stored with no live twin.
            self.forget_record(key);
        }
        r
    }

    /// Forgets what the store holds under `key`: the next `take_store_ops` writes the live
    /// subscription again, or deletes the record when there is none. For records that did not
    /// restore, and for writes the store refused.
    fn forget_record(&mut self, key: &str) {
        if let Some(rest) = key.strip_prefix(NOTIFIER_PREFIX) {
            let mut it = rest.splitn(3, '/');
            if let (Some(l), Some(r), Some(c)) = (it.next(), it.next(), it.next()) {
                let id = DialogId::new(c, l, r);
                self.persisted.touched.notifiers.insert(id.clone());
                match self.notifiers.get_mut(&id) {
                    Some(n) => n.stored = StoreMark::UNKNOWN,
                    None => {
                        self.persisted.dead_notifiers.insert(id);
                    }
                }
            }
        } else if let Some(rest) = key.strip_prefix(SUBSCRIBER_PREFIX) {
            if let Some((w, p)) = rest.split_once('/') {
                let pair = (w.to_string(), p.to_string());
                match self.subscriber_pairs.get(&pair) {
                    Some(id) => {
                        self.persisted.touched.subscribers.insert(*id);
                    }
                    None => self.persisted.touched.gone_pairs.push(pair.clone()),
                }
                self.persisted.subscribers.insert(pair, Stored::UNKNOWN);
            }
        }
        self.dirty = true;
    }

    /// The store did not take the writes of `keys` (a full disk, a key too long): they are
    /// tried again with the next `take_store_ops`.
    pub fn store_failed(&mut self, keys: &[String]) {
        for k in keys {
            self.forget_record(k);
        }
    }

    fn restore_subscriber(&mut self, hub: &dyn HubPort, r: SubscriberRec) -> Restored {
        let SubscriberRec(_, w, p, dom, call_id, local_tag, cseq, approved, expires, dialog) = r;
        let (Ok(watcher), Ok(presentity), Ok(domain)) =
            (Address::parse(&w), Address::parse(&p), Domain::parse(&dom))
        else {
            return Restored::Dropped;
        };
        let cfg = hub.config();
        if cfg.sip_federated(&domain).is_none() || !cfg.is_local_domain(&watcher.domain) {
            return Restored::Dropped;
        }
        let pair = (watcher.bare_string(), presentity.bare_string());
        if self.subscriber_pairs.contains_key(&pair) {
            return Restored::Dropped;
        }
        let id = self.new_subscriber(watcher, presentity, domain);
        let Some(s) = self.subscribers.get_mut(&id) else {
            return Restored::Dropped;
        };
        // The same Call-ID and tag: the peer's NOTIFYs in the old dialog still match.
        self.subscriber_calls
            .remove(&(s.call_id.clone(), s.local_tag.clone()));
        s.call_id = call_id;
        s.local_tag = local_tag;
        s.cseq = cseq.saturating_add(RESTORE_CSEQ_MARGIN);
        s.expires = expires.clamp(1, subscription::MAX_EXPIRES);
        s.dialog = dialog.map(|d| {
            let mut d = Dialog::from(d);
            d.local_cseq = d.local_cseq.saturating_add(RESTORE_CSEQ_MARGIN);
            d
        });
        s.state = if s.dialog.is_some() {
            SubscriberState::Established { approved }
        } else {
            SubscriberState::Subscribing
        };
        self.subscriber_calls
            .insert((s.call_id.clone(), s.local_tag.clone()), id);
        // Refreshed once the user's home link is up (`handle_link_up`): the NOTIFY it brings
        // must find a way to the user.
        self.persisted.unrefreshed.push(id);
        if let Some(s) = self.subscribers.get(&id) {
            let print = Some(subscriber_print(s));
            let seen = self.persisted.pass;
            self.persisted
                .subscribers
                .insert(pair, Stored { print, seen });
        }
        Restored::Subscriber
    }

    /// Reloads notifier subscriptions of the old state file (migration; see `edge`). They
    /// are written to the store by the next `take_store_ops`.
    pub fn restore(
        &mut self,
        hub: &dyn HubPort,
        state: PersistedState,
        now: Instant,
        wall: SystemTime,
    ) -> usize {
        let base = unix(wall);
        let mut n = 0;
        for p in state.notifiers {
            if self.restore_notifier(hub, p, now, base).is_some() {
                n += 1;
            }
        }
        // Recorded as not yet stored: the store gets them all.
        self.persisted.dead_notifiers.clear();
        for n in self.notifiers.values_mut() {
            n.stored = StoreMark::ABSENT;
        }
        self.dirty = true;
        n
    }

    /// Puts one notifier back; None when expired, no longer federated or unreadable.
    fn restore_notifier(
        &mut self,
        hub: &dyn HubPort,
        p: PersistedNotifier,
        now: Instant,
        base: u64,
    ) -> Option<DialogId> {
        if p.expires_unix <= base {
            return None;
        }
        let (Ok(mut watcher), Ok(mut presentity), Ok(domain)) = (
            Address::parse(&p.watcher),
            Address::parse(&p.presentity),
            Domain::parse(&p.domain),
        ) else {
            tracing::warn!("stored subscription with unparsable addresses skipped");
            return None;
        };
        // A notifier's domain is its watcher's (the core takes a SUBSCRIBE only from the
        // domain of its From URI) and is not kept apart any more: every build wrote them equal,
        // so a record saying otherwise was edited by hand and is not trusted.
        if watcher.domain != domain {
            tracing::warn!("stored subscription whose domain is not its watcher's skipped");
            return None;
        }
        let cfg = hub.config();
        let domain = cfg.sip_federated(&domain).map(|f| f.name.clone())?;
        if !cfg.is_local_domain(&presentity.domain) {
            return None;
        }
        super::notifier::share_domains(&cfg, &domain, &mut watcher, &mut presentity);
        let mut dialog = p.dialog;
        dialog.local_cseq = dialog.local_cseq.saturating_add(RESTORE_CSEQ_MARGIN);
        let id = dialog.id.clone();
        // A hand-edited or corrupt record may say anything: never more than the longest
        // grant, and never an overflow.
        let remaining = p
            .expires_unix
            .saturating_sub(base)
            .min(u64::from(subscription::MAX_EXPIRES));
        let Some(expires_at) = now.checked_add(Duration::from_secs(remaining)) else {
            tracing::warn!(dialog = %LogSafe(id.call_id()), "stored subscription with unusable expiry skipped");
            return None;
        };
        let mut n = Notifier::new(
            dialog,
            Parties::new(&watcher, &presentity),
            if p.active {
                NotifierState::Active
            } else {
                NotifierState::Pending
            },
            if p.msrtc {
                SipBodyKind::Msrtc
            } else {
                SipBodyKind::Pidf
            },
            expires_at,
            None,
            None,
        );
        n.stored = StoreMark::written(notifier_print(&n));
        self.pair_add(
            (watcher.bare_string(), presentity.bare_string()),
            id.clone(),
        );
        self.notifier_insert(id.clone(), n);
        self.arm_notifier(&id, expires_at);
        Some(id)
    }

    /// The component link serving foreign `domain` came up (at start, or again after a
    /// break): whatever the home side may have missed is queued for it — a probe for each
    /// approved watcher in `domain` (the answer refreshes the watcher's NOTIFY), the pending
    /// requests again (so they reach the user), and each local user's last known presence of
    /// their contacts in `domain`. Sent by [`Core::pump_link_up`]. Restored subscriptions to
    /// contacts in `domain` are refreshed now (a refresh in the old dialog; a 481 starts a new
    /// one, RFC 6665 §4.1.2.2): the peer's NOTIFY brings the contact's current state.
    pub fn handle_link_up(&mut self, domain: &Domain, now: Instant) {
        let waiting = std::mem::take(&mut self.persisted.unrefreshed);
        for id in waiting {
            match self.subscribers.get(&id) {
                Some(s) if s.presentity.domain == *domain || s.domain == *domain => {
                    self.send_subscribe(id, now)
                }
                Some(_) => self.persisted.unrefreshed.push(id),
                None => {}
            }
        }
        let mut seen: HashSet<(String, String)> = HashSet::new();
        let mut kicks = Vec::new();
        for n in self.notifiers.values() {
            if n.domain() != domain {
                continue;
            }
            if !seen.insert(n.parties.pair()) {
                continue;
            }
            let ask = match n.state {
                NotifierState::Active => Subscription::Probe,
                NotifierState::Pending => Subscription::Subscribe,
            };
            kicks.push((
                n.domain().clone(),
                Envelope {
                    from: n.parties.watcher(),
                    to: n.parties.presentity(),
                    body: Body::Subscription(ask),
                    stanza_id: None,
                    via_cluster: None,
                },
            ));
        }
        for s in self.subscribers.values() {
            if s.presentity.domain != *domain && s.domain != *domain {
                continue;
            }
            if let (Some(p), SubscriberState::Established { approved: true }) = (&s.last, &s.state)
            {
                kicks.push((
                    s.domain.clone(),
                    Envelope {
                        from: s.presentity.clone(),
                        to: s.watcher.clone(),
                        body: Body::Presence(p.clone()),
                        stanza_id: None,
                        via_cluster: None,
                    },
                ));
            }
        }
        kicks.extend(self.batch_link_up(domain));
        self.persisted.kicks.extend(kicks);
    }

    /// Sends up to `budget` of what `handle_link_up` queued; true while more wait.
    pub fn pump_link_up(&mut self, hub: &dyn HubPort, budget: usize) -> bool {
        for _ in 0..budget {
            let Some((domain, env)) = self.persisted.kicks.pop_front() else {
                return false;
            };
            hub.submit(&domain, env);
        }
        !self.persisted.kicks.is_empty()
    }

    /// Whether `handle_link_up` left envelopes to send.
    pub fn has_link_up_work(&self) -> bool {
        !self.persisted.kicks.is_empty()
    }

    /// The legacy state-file form of the notifier table (tests of the migration).
    #[cfg(test)]
    pub fn snapshot(&self, now: Instant, wall: SystemTime) -> PersistedState {
        let base = unix(wall);
        let mut notifiers: Vec<PersistedNotifier> = self
            .notifiers
            .values()
            .map(|n| PersistedNotifier {
                dialog: n.dialog.clone(),
                watcher: n.parties.watcher_bare(),
                presentity: n.parties.presentity_bare(),
                domain: n.domain().to_string(),
                active: n.state == NotifierState::Active,
                msrtc: n.format == SipBodyKind::Msrtc,
                expires_unix: base
                    + n.expires_at
                        .instant()
                        .saturating_duration_since(now)
                        .as_secs(),
            })
            .collect();
        notifiers.sort_by(|a, b| a.dialog.id.cmp(&b.dialog.id));
        PersistedState {
            version: 1,
            notifiers,
        }
    }
}
