//! The subscriber role (RFC 6665 §4.1, RFC 8048 §5.2.2): a local user subscribes to a foreign
//! user, one dialog per local watcher (requirements §3). SUBSCRIBE sending and refresh, the
//! answers to it, and incoming NOTIFYs turned into envelopes for the home side.

use super::*;

impl Core {
    pub(super) fn on_notify(
        &mut self,
        hub: &dyn HubPort,
        peer: &PeerInfo,
        key: Option<&TxnKey>,
        req: &SipMessage,
        domain: &Domain,
        now: Instant,
    ) {
        let call_id = req.call_id().unwrap_or("").to_owned();
        let local_tag = req.to().ok().and_then(|t| t.tag()).unwrap_or("").to_owned();
        let remote_tag = req
            .from()
            .ok()
            .and_then(|f| f.tag())
            .unwrap_or("")
            .to_owned();
        let Some(&sid) = self.subscriber_calls.get(&(call_id, local_tag)) else {
            if let Some(k) = key {
                m::refused("unknown_dialog");
                self.reply(
                    k,
                    req,
                    481,
                    "Subscription Does Not Exist",
                    None,
                    &[],
                    None,
                    now,
                );
            }
            return;
        };
        let state = match req
            .subscription_state()
            .ok()
            .flatten()
            .and_then(|t| NotifyState::from_header(&t))
        {
            Some(s) => s,
            None => {
                if let Some(k) = key {
                    self.reply(k, req, 400, "Bad Subscription-State", None, &[], None, now);
                }
                return;
            }
        };
        let seq = req.cseq().map(|c| c.seq).unwrap_or(0);
        let Some(s) = self.subscribers.get_mut(&sid) else {
            return;
        };
        s.conn = Some(peer.conn);
        match &mut s.dialog {
            Some(d) => {
                if !d.accept_remote_cseq(seq) {
                    if let Some(k) = key {
                        self.reply(k, req, 500, "CSeq Out Of Order", None, &[], None, now);
                    }
                    return;
                }
                d.refresh_target(req);
            }
            None => {
                // RFC 6665 §4.1.2.4: the NOTIFY may overtake the 2xx and create the dialog.
                let local_uri = interwork::address::sip_aor_of(&s.watcher);
                let remote_uri = interwork::address::sip_aor_of(&s.presentity);
                if let Ok(d) = Dialog::uac(
                    &s.call_id,
                    &s.local_tag,
                    &local_uri,
                    &remote_uri,
                    s.cseq,
                    req,
                    &remote_tag,
                ) {
                    s.dialog = Some(d);
                }
                if s.state == SubscriberState::Subscribing {
                    s.state = SubscriberState::Established { approved: false };
                }
                self.touch_subscriber(sid);
            }
        }
        if let Some(k) = key {
            self.reply(k, req, 200, "OK", None, &[], None, now);
        }
        let cfg = hub.config();
        let system = cfg
            .sip_federated(domain)
            .map_or("lync", |f| f.system.as_str())
            .to_owned();
        let Some(s) = self.subscribers.get(&sid) else {
            return;
        };
        let (watcher, presentity, dom) =
            (s.watcher.clone(), s.presentity.clone(), s.domain.clone());
        let unsubscribing = s.state == SubscriberState::Unsubscribing;
        let approved = matches!(s.state, SubscriberState::Established { approved: true });
        let tell = |body: Body| Envelope {
            from: presentity.clone(),
            to: watcher.clone(),
            body,
            stanza_id: None,
            via_cluster: None,
        };
        let presence = if req.body().is_empty() {
            None
        } else {
            let ct = req
                .header(HeaderName::ContentType)
                .map(|h| h.value)
                .unwrap_or("");
            match subscription::decode_body(&hub.maps(), &system, ct, req.body()) {
                Ok(p) => p,
                Err(e) => {
                    tracing::info!(error = %crate::net::LogSafe(&e.to_string()), "NOTIFY body ignored");
                    None
                }
            }
        };
        match state {
            NotifyState::Pending => {}
            NotifyState::Active { .. } => {
                if !approved && !unsubscribing {
                    if let Some(s) = self.subscribers.get_mut(&sid) {
                        s.state = SubscriberState::Established { approved: true };
                    }
                    self.touch_subscriber(sid);
                    hub.submit(&dom, tell(Body::Subscription(Subscription::Subscribed)));
                }
                if let Some(p) = presence {
                    if let Some(s) = self.subscribers.get_mut(&sid) {
                        s.last = Some(p.clone());
                    }
                    hub.submit(&dom, tell(Body::Presence(p)));
                }
            }
            NotifyState::Terminated { reason } => {
                self.remove_subscriber(sid);
                if unsubscribing {
                    return;
                }
                match reason.as_deref() {
                    // RFC 8048 §5.2.2: rejected / noresource mean the subscription is refused.
                    Some("rejected") | Some("noresource") => {
                        hub.submit(&dom, tell(Body::Subscription(Subscription::Unsubscribed)));
                    }
                    // RFC 6665 §4.1.3: deactivated / timeout: re-subscribe at once; probation /
                    // giveup: later (the subscriber record is re-created by the retry).
                    Some("probation") | Some("giveup") => {
                        let id = self.new_subscriber(watcher, presentity, dom);
                        if let Some(s) = self.subscribers.get_mut(&id) {
                            s.state = SubscriberState::Retrying;
                            s.next_at = Some(now + RETRY_AFTER);
                        }
                        self.schedule(TimerKey::Subscriber(id), now + RETRY_AFTER);
                    }
                    _ => {
                        let id = self.new_subscriber(watcher, presentity, dom);
                        self.send_subscribe(id, now);
                    }
                }
            }
        }
    }

    /// A local user subscribes to a foreign user with no subscription yet: bounded per user
    /// (`limits.max_subscriptions_per_user`), then a new SUBSCRIBE.
    pub(super) fn start_subscriber(
        &mut self,
        hub: &dyn HubPort,
        domain: &Domain,
        env: Envelope,
        now: Instant,
    ) {
        let watcher = env.from.bare_string();
        let n = self
            .subscriber_pairs
            .keys()
            .filter(|(w, _)| *w == watcher)
            .count();
        if n >= hub.config().limits.max_subscriptions_per_user {
            m::refused("too_many_subscriptions");
            if let Some(b) = env.bounce(
                ErrorCondition::ResourceConstraint,
                "too many presence subscriptions for this user",
            ) {
                hub.submit(domain, b);
            }
            return;
        }
        let id = self.new_subscriber(env.from, env.to, domain.clone());
        self.send_subscribe(id, now);
    }

    /// The home server probes a foreign contact (RFC 6121 §4.3: the user holds a subscription
    /// to it, typically at sign-in). Answered with the last presence the contact's NOTIFYs
    /// gave; with none yet, the SIP subscription is refreshed, or created when it is missing
    /// (lost before this node persisted it, or refused by the peer since): its NOTIFY then
    /// brings the presence. A probe never loses the contact, even with an empty state store.
    pub(super) fn on_probe(
        &mut self,
        hub: &dyn HubPort,
        domain: &Domain,
        env: Envelope,
        now: Instant,
    ) {
        let pair = (env.from.bare_string(), env.to.bare_string());
        let Some(id) = self.subscriber_pairs.get(&pair).copied() else {
            self.start_subscriber(hub, domain, env, now);
            return;
        };
        let Some(s) = self.subscribers.get(&id) else {
            return;
        };
        match (&s.last, &s.state) {
            (Some(p), _) => {
                hub.submit(
                    domain,
                    Envelope {
                        from: env.to,
                        to: env.from,
                        body: Body::Presence(p.clone()),
                        stanza_id: None,
                        via_cluster: None,
                    },
                );
            }
            (None, SubscriberState::Established { .. }) => self.send_subscribe(id, now),
            // A SUBSCRIBE is in flight, a retry is scheduled, or an un-SUBSCRIBE is on its way.
            (None, _) => {}
        }
    }

    pub(super) fn new_subscriber(
        &mut self,
        watcher: Address,
        presentity: Address,
        domain: Domain,
    ) -> u64 {
        let id = self.id();
        let host = self
            .me
            .sent_by
            .split(':')
            .next()
            .unwrap_or("legate")
            .to_owned();
        let s = Subscriber {
            id,
            watcher: watcher.bare(),
            presentity: presentity.bare(),
            domain,
            call_id: format!("{}@{host}", random_token(20)),
            local_tag: self.dialog_tag(),
            cseq: 0,
            state: SubscriberState::Subscribing,
            dialog: None,
            next_at: None,
            expires: subscription::SUBSCRIBE_EXPIRES,
            last: None,
            conn: None,
        };
        self.subscriber_pairs
            .insert((s.watcher.bare_string(), s.presentity.bare_string()), id);
        self.subscriber_calls
            .insert((s.call_id.clone(), s.local_tag.clone()), id);
        self.subscribers.insert(id, s);
        self.touch_subscriber(id);
        id
    }

    pub(super) fn remove_subscriber(&mut self, id: u64) {
        if let Some(s) = self.subscribers.remove(&id) {
            self.dirty = true;
            self.persisted
                .touched
                .gone_pairs
                .push((s.watcher.bare_string(), s.presentity.bare_string()));
            self.subscriber_calls.remove(&(s.call_id, s.local_tag));
            let pair = (s.watcher.bare_string(), s.presentity.bare_string());
            if self.subscriber_pairs.get(&pair) == Some(&id) {
                self.subscriber_pairs.remove(&pair);
            }
        }
    }

    /// Sends SUBSCRIBE (initial, refresh or, in state Unsubscribing, `Expires: 0`).
    pub(super) fn send_subscribe(&mut self, id: u64, now: Instant) {
        // The CSeq, and for an un-SUBSCRIBE the record itself, change.
        self.touch_subscriber(id);
        // A SUBSCRIBE goes to the domain, on whichever connection the driver picks or opens:
        // the node's default transport (the one new connections use).
        let via = self.via_on(None);
        let Some(s) = self.subscribers.get(&id) else {
            return;
        };
        let contact = self.contact_for(&s.watcher, None);
        let expires = if s.state == SubscriberState::Unsubscribing {
            0
        } else {
            s.expires
        };
        let es = expires.to_string();
        let extra: [(&str, &str); 4] = [
            ("Event", "presence"),
            (
                "Accept",
                "application/msrtc-event-categories+xml, application/pidf+xml",
            ),
            ("Supported", "eventlist"),
            ("Expires", &es),
        ];
        let (conn, domain) = (s.conn, s.domain.clone());
        let Some(s) = self.subscribers.get_mut(&id) else {
            return;
        };
        let req = match &mut s.dialog {
            Some(d) => d.request(&InDialog {
                method: "SUBSCRIBE",
                via: &via,
                contact: Some(&contact),
                extra: &extra,
                body: None,
                cseq_override: None,
            }),
            None => {
                s.cseq += 1;
                let mut headers: Vec<(&str, String)> = vec![
                    ("Via", via.clone()),
                    ("Max-Forwards", "70".into()),
                    (
                        "From",
                        format!(
                            "<{}>;tag={}",
                            interwork::address::sip_aor_of(&s.watcher),
                            s.local_tag
                        ),
                    ),
                    (
                        "To",
                        format!("<{}>", interwork::address::sip_aor_of(&s.presentity)),
                    ),
                    ("Call-ID", s.call_id.clone()),
                    ("CSeq", format!("{} SUBSCRIBE", s.cseq)),
                    ("Contact", format!("<{contact}>")),
                ];
                headers.extend(extra.iter().map(|(n, v)| (*n, (*v).to_owned())));
                build_request(
                    "SUBSCRIBE",
                    &interwork::address::sip_aor_of(&s.presentity),
                    &headers,
                    None,
                )
            }
        };
        match req {
            Ok(r) => self.send_request(r, conn, domain, Purpose::Subscribe { id, expires }, now),
            Err(e) => tracing::error!(error = %e, "cannot build SUBSCRIBE"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_subscribe_response(
        &mut self,
        hub: &dyn HubPort,
        id: u64,
        asked: u32,
        resp: &SipMessage,
        code: u16,
        conn: Option<ConnId>,
        now: Instant,
    ) {
        let Some(s) = self.subscribers.get_mut(&id) else {
            return;
        };
        // Every answer may change what is stored (dialog, state, Expires, CSeq).
        self.persisted.touched.subscribers.insert(id);
        self.dirty = true;
        if conn.is_some() {
            s.conn = conn;
        }
        let tell = |s: &Subscriber, body: Body| {
            (
                s.domain.clone(),
                Envelope {
                    from: s.presentity.clone(),
                    to: s.watcher.clone(),
                    body,
                    stanza_id: None,
                    via_cluster: None,
                },
            )
        };
        if (200..300).contains(&code) {
            if asked == 0 || s.state == SubscriberState::Unsubscribing {
                self.remove_subscriber(id);
                return;
            }
            if s.dialog.is_none() {
                if let Some(tag) = resp.to().ok().and_then(|t| t.tag()) {
                    let local_uri = interwork::address::sip_aor_of(&s.watcher);
                    let remote_uri = interwork::address::sip_aor_of(&s.presentity);
                    if let Ok(d) = Dialog::uac(
                        &s.call_id,
                        &s.local_tag,
                        &local_uri,
                        &remote_uri,
                        s.cseq,
                        resp,
                        tag,
                    ) {
                        s.dialog = Some(d);
                    }
                }
            } else if let Some(d) = &mut s.dialog {
                d.refresh_target(resp);
            }
            if matches!(
                s.state,
                SubscriberState::Subscribing | SubscriberState::Retrying
            ) {
                s.state = SubscriberState::Established { approved: false };
            }
            let granted = resp
                .expires()
                .ok()
                .flatten()
                .unwrap_or(asked)
                .min(asked.max(1));
            let at = now + refresh_delay(granted.max(1));
            s.next_at = Some(at);
            self.schedule(TimerKey::Subscriber(id), at);
            return;
        }
        match code {
            423 => {
                // RFC 6665 §4.1.2.1: retry with at least Min-Expires.
                let min = resp
                    .header(HeaderName::MinExpires)
                    .and_then(|h| header::parse_u32(h.value).ok())
                    .unwrap_or(subscription::SUBSCRIBE_EXPIRES);
                if min <= s.expires || min > 86_400 {
                    tracing::info!(min, "unusable Min-Expires; giving up");
                    self.remove_subscriber(id);
                    return;
                }
                s.expires = min;
                self.send_subscribe(id, now);
            }
            481 if s.dialog.is_some() && s.state != SubscriberState::Unsubscribing => {
                // RFC 6665 §4.1.2.2: the dialog is gone; start a new subscription.
                let (w, p, d) = (s.watcher.clone(), s.presentity.clone(), s.domain.clone());
                self.remove_subscriber(id);
                let nid = self.new_subscriber(w, p, d);
                self.send_subscribe(nid, now);
            }
            489 => {
                tracing::warn!(code, "peer does not support the presence event; giving up");
                self.remove_subscriber(id);
            }
            408 | 480 | 500..=599 if s.state != SubscriberState::Unsubscribing => {
                s.state = SubscriberState::Retrying;
                s.dialog = None;
                s.next_at = Some(now + RETRY_AFTER);
                self.schedule(TimerKey::Subscriber(id), now + RETRY_AFTER);
            }
            _ => {
                // 403/603 (RFC 8048 §5.2.2) and every other refusal: the subscription is denied.
                let unsubscribing = s.state == SubscriberState::Unsubscribing;
                let (d, env) = tell(s, Body::Subscription(Subscription::Unsubscribed));
                self.remove_subscriber(id);
                if !unsubscribing {
                    hub.submit(&d, env);
                }
            }
        }
    }
}
