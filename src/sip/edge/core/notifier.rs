//! The notifier role (RFC 6665 §4.2, RFC 3856): a foreign watcher subscribes to a local
//! user. SUBSCRIBE handling (new, refresh, `Expires: 0`), the NOTIFYs and the end of a
//! subscription. What the home side decides arrives through `handle_delivery`.
//!
//! Consent (requirements §3) is polite: a watcher the user's lists block, or whom the user
//! refused, gets a live subscription whose NOTIFYs say offline (closed PIDF / msrtc
//! offline), never `terminated;reason=rejected`. Its request never reaches the home node.
//! The end of a subscription (un-SUBSCRIBE, expiry) is told to the home node as unavailable
//! presence, not `unsubscribe` (RFC 8048 §5.3.3), so the user's approval outlives it.

use super::*;
use crate::gateway::policy;
use crate::gateway::{Denied, Link};

/// Points the domains of a notifier's addresses at the strings the node already holds (the
/// peer's domain, the configured local domain), so a million watchers of a few domains hold
/// a few domain strings, not three each (see `Domain`).
pub(super) fn share_domains(
    cfg: &Config,
    domain: &Domain,
    watcher: &mut Address,
    presentity: &mut Address,
) {
    if watcher.domain == *domain {
        watcher.domain = domain.clone();
    }
    if let Some(l) = cfg
        .local_domains
        .iter()
        .find(|l| l.name == presentity.domain)
    {
        presentity.domain = l.name.clone();
    }
}

impl Core {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_subscribe(
        &mut self,
        hub: &dyn HubPort,
        cfg: &Config,
        peer: &PeerInfo,
        key: &TxnKey,
        req: &SipMessage,
        domain: &Domain,
        now: Instant,
    ) {
        let is_presence =
            matches!(req.event(), Ok(Some(e)) if e.value.eq_ignore_ascii_case("presence"));
        if !is_presence {
            m::refused("bad_event");
            let tag = random_token(10);
            return self.reply(
                key,
                req,
                489,
                "Bad Event",
                Some(&tag),
                &[("Allow-Events", "presence")],
                None,
                now,
            );
        }
        let decision = clamp_expires(req.expires().ok().flatten());
        let min = subscription::MIN_EXPIRES.to_string();
        if decision == ExpiresDecision::TooBrief {
            let tag = random_token(10);
            return self.reply(
                key,
                req,
                423,
                "Interval Too Brief",
                Some(&tag),
                &[("Min-Expires", &min)],
                None,
                now,
            );
        }
        if req.to().ok().and_then(|t| t.tag()).is_some() {
            return self.on_resubscribe(hub, peer, key, req, decision, now);
        }
        let (Some(mut watcher), Some(mut presentity)) = (
            req.from().ok().and_then(|f| address_of_uri(&f.uri)),
            req.request_uri()
                .and_then(Result::ok)
                .and_then(|u| address_of_uri(&u)),
        ) else {
            return self.reply(key, req, 400, "Bad Addresses", None, &[], None, now);
        };
        share_domains(cfg, domain, &mut watcher, &mut presentity);
        let format = cfg
            .sip_federated(domain)
            .map_or(crate::config::PresenceFormat::Auto, |f| f.presence_format);
        let accept = req.accept().unwrap_or_default();
        let Some(kind) = negotiate(format, &accept) else {
            let tag = random_token(10);
            return self.reply(
                key,
                req,
                406,
                "Not Acceptable",
                Some(&tag),
                &[(
                    "Accept",
                    "application/pidf+xml, application/msrtc-event-categories+xml",
                )],
                None,
                now,
            );
        };
        let pair = (watcher.bare_string(), presentity.bare_string());
        // Bound: foreign watchers on the node, then of one foreign domain
        // (limits.foreign_watchers_per_domain), so one partner subscribing for any number of
        // localparts cannot take every slot.
        if self.notifiers.len() >= self.caps.foreign_watchers {
            m::refused("too_many_watchers");
            let tag = random_token(10);
            return self.reply(
                key,
                req,
                503,
                "Service Unavailable (Overloaded)",
                Some(&tag),
                &[("Retry-After", RETRY_AFTER_BUSY)],
                None,
                now,
            );
        }
        if count_of(&self.notifier_domains, domain) >= cfg.limits.foreign_watchers_per_domain {
            m::refused("domain_watchers_full");
            tracing::info!(domain = %domain, "per-domain foreign watcher bound reached");
            let tag = random_token(10);
            return self.reply(
                key,
                req,
                503,
                "Service Unavailable (Too Many Watchers From Your Domain)",
                Some(&tag),
                &[("Retry-After", RETRY_AFTER_BUSY)],
                None,
                now,
            );
        }
        // Bound: foreign watchers per local user (limits.max_subscriptions_per_user), counted
        // by `pair_add`/`pair_remove`.
        let watchers = self.notifier_watchers.get(&pair.1).copied().unwrap_or(0);
        if !self.notifier_pairs.contains_key(&pair)
            && watchers >= cfg.limits.max_subscriptions_per_user
        {
            m::refused("too_many_subscriptions");
            let tag = random_token(10);
            return self.reply(
                key,
                req,
                503,
                "Service Unavailable (Too Many Watchers)",
                Some(&tag),
                &[("Retry-After", "3600")],
                None,
                now,
            );
        }
        let grant = match decision {
            ExpiresDecision::Grant(g) => g,
            _ => 0,
        };
        // A fetch (Expires 0, RFC 6665 §4.4.3) asks the home side for presence, not consent.
        let ask = if grant == 0 {
            Subscription::Probe
        } else {
            Subscription::Subscribe
        };
        let submitted = hub.submit(
            domain,
            Envelope {
                from: watcher.clone(),
                to: presentity.clone(),
                body: Body::Subscription(ask),
                stanza_id: None,
                via_cluster: None,
            },
        );
        // A block is accepted like any subscription and shown offline (see `notify`).
        let blocked = matches!(submitted, Submitted::Denied(Denied::Blocked));
        if let Some((code, reason)) = status_for_submit(&submitted).filter(|_| !blocked) {
            let tag = random_token(10);
            return self.reply(key, req, code, reason, Some(&tag), &[], None, now);
        }
        let tag = self.dialog_tag();
        let dialog = match Dialog::uas(req, &tag) {
            Ok(d) => d,
            Err(_) => return self.reply(key, req, 400, "Bad Dialog Headers", None, &[], None, now),
        };
        // Another dialog of the same pair already approved (Lync re-subscribing after our
        // 481, or from a second endpoint): the consent is the user's, not the dialog's.
        let sibling = self
            .notifier_pairs
            .get(&pair)
            .and_then(|ids| {
                ids.iter()
                    .filter_map(|fp| self.notifiers.by_fingerprint(*fp))
                    .find(|n| n.state == NotifierState::Active)
            })
            .map(|n| n.last.clone());
        let (state, last) = match sibling {
            Some(last) => (NotifierState::Active, last),
            None if blocked => (NotifierState::Active, None),
            None => (NotifierState::Pending, None),
        };
        let id = dialog.id.clone();
        let expires_s = grant.to_string();
        let contact = format!("<{}>", self.contact_for(&presentity, Some(peer.conn)));
        // 200, not 202: RFC 6665 §8.3.1 deprecates 202 for SUBSCRIBE (the pending state is told
        // by the NOTIFY that follows), and Lync edges answer 200 themselves.
        self.reply(
            key,
            req,
            200,
            "OK",
            Some(&tag),
            &[("Expires", &expires_s), ("Contact", &contact)],
            None,
            now,
        );
        let n = Notifier::new(
            dialog,
            Parties::new(&watcher, &presentity),
            state,
            kind,
            now + Duration::from_secs(u64::from(grant)),
            last,
            Some(peer.conn),
        );
        self.notifier_insert(id.clone(), n);
        if grant == 0 {
            // A fetch: the terminated NOTIFY is all it gets; the notifier ends with it (the
            // NOTIFY's client transaction carries what it needs).
            self.send_notify(hub, &id, Some(TerminationReason::Timeout), now);
            self.notifier_remove(&id);
            return;
        }
        // Bound: dialogs per (watcher, presentity). Beyond it the oldest dialog ends with
        // `deactivated`, not the new SUBSCRIBE with a 503: a peer that lost its dialog state
        // (restart, failover) re-subscribes with a new Call-ID, and the newest dialog is the
        // one it still knows; its old ones would otherwise live on until they expire while
        // every presence change is multiplied by them.
        let oldest = Some(self.pair_ids(&pair))
            .filter(|ids| ids.len() >= MAX_DIALOGS_PER_PAIR)
            .and_then(|ids| ids.into_iter().next());
        if let Some(old) = oldest {
            m::refused("too_many_dialogs_per_pair");
            self.end_notifier(hub, &old, TerminationReason::Deactivated, false, now);
        }
        self.pair_add(pair, id.clone());
        self.arm_notifier(&id, now + Duration::from_secs(u64::from(grant)));
        self.dirty = true;
        self.send_notify(hub, &id, None, now);
    }

    pub(super) fn on_resubscribe(
        &mut self,
        hub: &dyn HubPort,
        peer: &PeerInfo,
        key: &TxnKey,
        req: &SipMessage,
        decision: ExpiresDecision,
        now: Instant,
    ) {
        let id = match DialogId::of_incoming_request(req) {
            Ok(id) if self.notifiers.contains_key(&id) => id,
            _ => {
                m::refused("unknown_dialog");
                return self.reply(
                    key,
                    req,
                    481,
                    "Subscription Does Not Exist",
                    None,
                    &[],
                    None,
                    now,
                );
            }
        };
        let seq = req.cseq().map(|c| c.seq).unwrap_or(0);
        let contact = match self.notifiers.get(&id) {
            Some(n) => format!(
                "<{}>",
                self.contact_for(&n.parties.presentity(), Some(peer.conn))
            ),
            None => return,
        };
        let Some(n) = self.notifiers.get_mut(&id) else {
            return;
        };
        if !n.dialog.accept_remote_cseq(seq) {
            return self.reply(key, req, 500, "CSeq Out Of Order", None, &[], None, now);
        }
        n.dialog.refresh_target(req);
        n.set_conn(Some(peer.conn));
        match decision {
            ExpiresDecision::Grant(g) => {
                n.expires_at = Mono::of(now + Duration::from_secs(u64::from(g)));
                let gs = g.to_string();
                self.reply(
                    key,
                    req,
                    200,
                    "OK",
                    None,
                    &[("Expires", &gs), ("Contact", &contact)],
                    None,
                    now,
                );
                self.arm_notifier(&id, now + Duration::from_secs(u64::from(g)));
                self.dirty = true;
                // RFC 6665 §4.2.1.2: a refresh is answered with a NOTIFY of the current state.
                self.send_notify(hub, &id, None, now);
            }
            _ => {
                self.reply(
                    key,
                    req,
                    200,
                    "OK",
                    None,
                    &[("Expires", "0"), ("Contact", &contact)],
                    None,
                    now,
                );
                self.end_notifier(hub, &id, TerminationReason::Unsubscribed, true, now);
            }
        }
    }

    /// Sends a terminated NOTIFY, forgets the subscription and, when the peer or time ended
    /// it, tells the home side.
    pub(super) fn end_notifier(
        &mut self,
        hub: &dyn HubPort,
        id: &DialogId,
        reason: TerminationReason,
        tell_home: bool,
        now: Instant,
    ) {
        self.send_notify(hub, id, Some(reason), now);
        if let Some(n) = self.notifier_remove(id) {
            let pair = n.parties.pair();
            self.pair_remove(&pair, id);
            // A batched dialog of the same pair still watching keeps the home side's consent.
            let others = self.notifier_pairs.contains_key(&pair) || self.batches.watches(&pair);
            // RFC 8048 §5.3.3: the end of a SIP subscription is unavailable presence of the
            // watcher, not `unsubscribe`, which would revoke the user's approval and make them
            // answer again at the next sign-in. A blocked watcher's end is not told at all.
            let (watcher, user) = (n.parties.watcher(), n.parties.presentity());
            let blocked = hub.consent(&user, &watcher) == Consent::Blocked;
            if tell_home && !others && !blocked {
                let cfg = hub.config();
                let link = Link::Sip {
                    domain: n.domain().clone(),
                };
                if let Some(p) = policy::offline_in(&cfg, &hub.maps(), &link) {
                    hub.submit(
                        n.domain(),
                        Envelope {
                            from: watcher,
                            to: user,
                            body: Body::Presence(p),
                            stanza_id: None,
                            via_cluster: None,
                        },
                    );
                }
            }
            self.dirty = true;
        }
    }

    /// The user `user`'s consent for `target` (a watcher, or a whole domain as
    /// [`policy::domain_wide`]) changed: their pending subscriptions become active and every
    /// one is notified with what it may now see (offline when blocked).
    pub(super) fn consent_changed(
        &mut self,
        hub: &dyn HubPort,
        user: &Address,
        target: &Address,
        now: Instant,
    ) {
        let ids: Vec<DialogId> = if target.local.is_empty() {
            self.notifiers
                .iter()
                .filter(|(_, n)| {
                    n.parties.presentity_local() == user.local
                        && *n.parties.presentity_domain() == user.domain
                        && *n.parties.watcher_domain() == target.domain
                        && (target.local.is_empty() || target.local == n.parties.watcher_local())
                })
                .map(|(id, _)| id.clone())
                .collect()
        } else {
            let pair = (target.bare_string(), user.bare_string());
            self.pair_ids(&pair)
        };
        for id in ids {
            let activated = match self.notifiers.get_mut(&id) {
                Some(n) if n.state == NotifierState::Pending => {
                    n.state = NotifierState::Active;
                    true
                }
                _ => false,
            };
            if activated {
                // Pending → active is a state change (RFC 6665 §4.2.2): always sent.
                self.dirty = true;
                self.send_notify(hub, &id, None, now);
            } else {
                self.notify_change(hub, &id, now);
            }
        }
    }

    /// Adds a notifier dialog, counted for its domain's bound.
    pub(super) fn notifier_insert(&mut self, id: DialogId, mut n: Notifier) {
        self.touch_notifier(&id);
        // A record already stored under this id belongs to the dialog now living there.
        let dead = self.persisted.dead_notifiers.remove(&id);
        if n.stored == StoreMark::ABSENT {
            if dead {
                n.stored = StoreMark::UNKNOWN;
            } else if let Some(old) = self.notifiers.get(&id) {
                n.stored = old.stored;
            }
        }
        *self.notifier_domains.entry(n.domain().clone()).or_default() += 1;
        if let Some(old) = self.notifiers.insert(Box::new(n)) {
            count_down(&mut self.notifier_domains, old.domain());
        }
    }

    /// Removes a notifier dialog and its count.
    pub(super) fn notifier_remove(&mut self, id: &DialogId) -> Option<Notifier> {
        self.touch_notifier(id);
        let n = self.notifiers.remove(id)?;
        if n.stored != StoreMark::ABSENT {
            // Its record is deleted by the next `take_store_ops`.
            self.persisted.dead_notifiers.insert(id.clone());
        }
        count_down(&mut self.notifier_domains, n.domain());
        Some(*n)
    }

    /// A NOTIFY for a presence update: not sent when its state and body equal the last
    /// NOTIFY of the dialog (a home node repeating the same presence must not make every
    /// watcher's edge process it again). NOTIFYs RFC 6665 requires — after each SUBSCRIBE
    /// or refresh (§4.2.1.2), on state changes and on termination (§4.2.2) — go through
    /// [`Core::send_notify`], which always sends.
    pub(super) fn notify_change(&mut self, hub: &dyn HubPort, id: &DialogId, now: Instant) {
        self.notify(hub, id, None, now, true);
    }

    /// A NOTIFY transaction on connection `c` ended (answered, timed out or failed): the
    /// presence updates waiting for room there go out, oldest first, with the state they have
    /// now, until the window is full again. One that turns out unchanged (or whose dialog is
    /// gone, or moved to another connection) sends nothing and the next one is taken, so the
    /// queue never waits for an answer no NOTIFY will bring.
    pub(super) fn notify_ended(&mut self, hub: &dyn HubPort, c: ConnId, now: Instant) {
        if let Some(n) = self.notifies_in_flight.get_mut(&c) {
            *n = n.saturating_sub(1);
        }
        let in_flight = |core: &Self| core.notifies_in_flight.get(&c).copied().unwrap_or(0);
        while in_flight(self) < NOTIFY_WINDOW {
            let Some(id) = self.deferred.get_mut(&c).and_then(VecDeque::pop_front) else {
                break;
            };
            self.deferred_ids.remove(&id);
            self.notify_change(hub, &id, now);
        }
        if self.deferred.get(&c).is_some_and(VecDeque::is_empty) {
            self.deferred.remove(&c);
        }
        if in_flight(self) == 0 && !self.deferred.contains_key(&c) {
            self.notifies_in_flight.remove(&c);
        }
    }

    pub(super) fn send_notify(
        &mut self,
        hub: &dyn HubPort,
        id: &DialogId,
        terminated: Option<TerminationReason>,
        now: Instant,
    ) {
        self.notify(hub, id, terminated, now, false);
    }

    fn notify(
        &mut self,
        hub: &dyn HubPort,
        id: &DialogId,
        terminated: Option<TerminationReason>,
        now: Instant,
        skip_unchanged: bool,
    ) {
        let Some(n) = self.notifiers.get(id) else {
            return;
        };
        let on = n.conn();
        // A presence update to a connection with a full window waits its turn (RFC 6665
        // §4.2.2); what RFC 6665 requires at once (`send_notify`) never waits.
        if let (true, None, Some(c)) = (skip_unchanged, terminated, on) {
            if self.notifies_in_flight.get(&c).copied().unwrap_or(0) >= NOTIFY_WINDOW {
                if self.deferred_ids.insert(id.clone()) {
                    self.deferred.entry(c).or_default().push_back(id.clone());
                }
                return;
            }
        }
        // A NOTIFY may follow a state change (pending → active), which changes the stored
        // record; the NOTIFY itself does not (its CSeq is covered by `RESTORE_CSEQ_MARGIN`), so
        // a presence storm queues no id per NOTIFY for the next pass to find unchanged.
        if n.stored != StoreMark::written(super::persist::notifier_print(n)) {
            self.touch_notifier(id);
        }
        let via = self.via_on(on);
        let maps = hub.maps();
        let cfg = hub.config();
        let Some(n) = self.notifiers.get(id) else {
            return;
        };
        let (watcher, user) = (n.parties.watcher(), n.parties.presentity());
        let contact = self.contact_for(&user, on);
        let state = match terminated {
            Some(r) => format!("terminated;reason={}", r.token()),
            None => n.state_header(now),
        };
        let system = cfg
            .sip_federated(n.domain())
            .map_or("lync", |f| f.system.as_str());
        // Polite blocking: a blocked watcher's view is offline whatever the user's state (kept
        // in `last`, so an unblock shows it at once).
        let shown = match hub.consent(&user, &watcher) {
            Consent::Blocked => None,
            _ => n.last.as_deref(),
        };
        let body = match (terminated, n.state) {
            (None, NotifierState::Active) => subscription::encode_body(
                &maps,
                system,
                shown,
                n.format,
                &interwork::address::sip_aor_of(&user),
            ),
            _ => None,
        };
        let ct = n.format.content_type();
        let (conn, domain) = (n.conn(), n.domain().clone());
        let fingerprint = {
            use std::hash::{Hash, Hasher};
            let mut h = std::hash::DefaultHasher::new();
            // The state without its `expires=` countdown, which differs on every NOTIFY.
            state.split(';').next().unwrap_or("").hash(&mut h);
            ct.hash(&mut h);
            body.hash(&mut h);
            h.finish()
        };
        let Some(n) = self.notifiers.get_mut(id) else {
            return;
        };
        if skip_unchanged && n.last_sent_is(fingerprint) {
            m::NOTIFY_UNCHANGED.with_label_values(&["unchanged"]).inc();
            tracing::debug!("NOTIFY content unchanged; not sent again");
            return;
        }
        n.set_last_sent(fingerprint);
        let req = n.dialog.request(&InDialog {
            method: "NOTIFY",
            via: &via,
            contact: Some(&contact),
            extra: &[("Event", "presence"), ("Subscription-State", &state)],
            body: body.as_deref().map(|b| (ct, b)),
            cseq_override: None,
        });
        // A NOTIFY alone does not mark the state dirty: restored dialogs add
        // RESTORE_CSEQ_MARGIN to the CSeq instead of persisting every increment.
        match req {
            Ok(r) => {
                self.send_request(r, conn, domain, Purpose::Notify { dialog: id.clone() }, now)
            }
            Err(e) => tracing::error!(error = %e, "cannot build NOTIFY"),
        }
    }
}
