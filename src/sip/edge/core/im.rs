//! Lync-style IM sessions (requirements §1): inbound INVITE/MESSAGE/BYE, pager-mode MESSAGE
//! (RFC 3428), outbound sessions opened on the first message and reused, idle BYE.
//!
//! The RFC 7572 mapping of each message: a pager MESSAGE is a single message (`normal`, §4),
//! a MESSAGE inside a session a `chat` line; the Call-ID is the `<thread/>` (§4), and an XMPP
//! thread opens the SIP session with it as Call-ID (§5) so replies find the same thread;
//! `Subject` ⇄ `<subject/>`; `Content-Language` ⇄ `xml:lang`. RFC 7572 §5's 1300-byte rule
//! (RFC 3428 §6: a larger MESSAGE needs a congestion-controlled transport or a session) holds
//! by construction: XMPP text always goes out inside an INVITE session, over TCP or TLS only.
//! An XMPP error that comes back after a pager MESSAGE was answered 200 (it is answered once
//! queued) reaches the SIP sender as a MESSAGE carrying a failure notice (§5 allows it).

use super::*;
use crate::gateway::envelope::{ErrorOf, MessageKind};
use crate::gateway::interwork::address::{sip_aor_of, sip_uri_of};

impl Core {
    pub(super) fn on_invite(
        &mut self,
        hub: &dyn HubPort,
        peer: &PeerInfo,
        key: &TxnKey,
        req: &SipMessage,
        domain: &Domain,
        now: Instant,
    ) {
        let host = self
            .me
            .sent_by
            .split(':')
            .next()
            .unwrap_or("legate")
            .to_owned();
        if req.to().ok().and_then(|t| t.tag()).is_some() {
            // re-INVITE (a session refresh): answer with the same SDP if we know the dialog.
            let known = DialogId::of_incoming_request(req)
                .ok()
                .and_then(|id| self.session_dialogs.get(&id).copied());
            return match known {
                Some(sid) => {
                    if let Some(s) = self.sessions.get_mut(&sid) {
                        s.last_activity = now;
                        s.conn = Some(peer.conn);
                    }
                    let sdp = im_session::sdp(&host, sid);
                    self.reply(
                        key,
                        req,
                        200,
                        "OK",
                        None,
                        &[],
                        Some(("application/sdp", &sdp)),
                        now,
                    )
                }
                None => self.reply(
                    key,
                    req,
                    481,
                    "Call/Transaction Does Not Exist",
                    None,
                    &[],
                    None,
                    now,
                ),
            };
        }
        let is_sdp = matches!(req.content_type(), Ok(Some(ct)) if ct.is("application", "sdp"));
        if !is_sdp || !im_session::sdp_offers_im(req.body()) {
            m::refused("not_im_session");
            let tag = random_token(10);
            return self.reply(
                key,
                req,
                488,
                "Not Acceptable Here (IM Sessions Only)",
                Some(&tag),
                &[],
                None,
                now,
            );
        }
        let from = req.from().ok();
        let ruri = req.request_uri().and_then(Result::ok);
        let (remote, local) = match im_addresses(from.as_ref().map(|f| &f.uri), ruri.as_ref()) {
            Ok(p) => p,
            Err((code, reason)) => {
                return self.reply(key, req, code, reason, None, &[], None, now);
            }
        };
        let pair = (local.bare_string(), remote.bare_string());
        // A new INVITE for a pair that has a session replaces it (below), so it does not count
        // against the domain's bound.
        let replaces = self.session_pairs.get(&pair).copied();
        if replaces.is_none()
            && (self.sessions_of(domain) >= hub.config().limits.im_sessions_per_domain
                || self.sessions.len() >= self.caps.im_sessions)
        {
            m::refused("too_many_sessions");
            let tag = random_token(10);
            return self.reply(
                key,
                req,
                503,
                "Service Unavailable (Too Many Sessions)",
                Some(&tag),
                &[("Retry-After", "60")],
                None,
                now,
            );
        }
        if let Some(text) = im_session::first_message(req) {
            let env = Envelope {
                from: remote.clone(),
                to: local.clone(),
                body: Body::Message(message_of(req, MessageKind::Chat, text)),
                stanza_id: None,
                via_cluster: None,
            };
            if let Some((code, reason)) = status_for_submit(&hub.submit(domain, env)) {
                let tag = random_token(10);
                return self.reply(key, req, code, reason, Some(&tag), &[], None, now);
            }
        }
        let tag = self.dialog_tag();
        let Ok(dialog) = Dialog::uas(req, &tag) else {
            return self.reply(key, req, 400, "Bad Dialog Headers", None, &[], None, now);
        };
        let sid = self.id();
        let did = dialog.id.clone();
        let contact = format!("<{}>", self.contact_for(&local, Some(peer.conn)));
        let sdp = im_session::sdp(&host, sid);
        self.reply(
            key,
            req,
            200,
            "OK",
            Some(&tag),
            &[("Contact", &contact)],
            Some(("application/sdp", &sdp)),
            now,
        );
        // The pair's previous session is replaced: the peer opened a new one (Lync does after
        // losing its own), so the old dialog gets a BYE and whatever still waited on it (an
        // outbound INVITE crossing this one) goes out on the new dialog instead.
        let carried = match replaces {
            Some(old) => self.end_session_replaced(old, now),
            None => VecDeque::new(),
        };
        let s = ImSession {
            id: sid,
            local: local.bare(),
            // With its GRUU, if it sent one: what the XMPP side answers goes to that instance.
            remote: remote.clone(),
            domain: domain.clone(),
            state: SessionState::Established,
            dialog: Some(dialog),
            call_id: did.call_id().to_owned(),
            local_tag: tag,
            invite_cseq: 0,
            queue: VecDeque::new(),
            last_activity: now,
            conn: Some(peer.conn),
        };
        self.insert_session(s);
        self.session_dialogs.insert(did, sid);
        self.session_owned(&pair, true);
        self.session_pairs.insert(pair, sid);
        self.store_session(sid);
        self.schedule(TimerKey::Session(sid), now + self.im_idle);
        for b in carried {
            self.send_session_message(hub, sid, b, now);
        }
    }

    /// Turns on [`Action::SessionOwner`] (in a cluster).
    pub fn publish_sessions(&mut self, on: bool) {
        self.publish_sessions = on;
    }

    pub(super) fn session_owned(&mut self, pair: &(String, String), owned: bool) {
        if self.publish_sessions {
            self.actions.push_back(Action::SessionOwner {
                local: pair.0.clone(),
                remote: pair.1.clone(),
                owned,
            });
        }
    }

    /// Live sessions toward `domain`.
    pub(super) fn sessions_of(&self, domain: &Domain) -> usize {
        self.session_domains.get(domain).copied().unwrap_or(0)
    }

    pub(super) fn insert_session(&mut self, s: ImSession) {
        *self.session_domains.entry(s.domain.clone()).or_default() += 1;
        self.sessions.insert(s.id, s);
    }

    /// Ends session `sid` because a new INVITE replaces it: a BYE if it has a dialog; its
    /// queued messages are returned to go out on the new session.
    fn end_session_replaced(&mut self, sid: u64, now: Instant) -> VecDeque<MessageBody> {
        let via = self.via_on(self.sessions.get(&sid).and_then(|s| s.conn));
        let Some(mut s) = self.remove_session(sid) else {
            return VecDeque::new();
        };
        let queue = std::mem::take(&mut s.queue);
        if let Some(d) = &mut s.dialog {
            if let Ok(bye) = d.request(&InDialog {
                method: "BYE",
                via: &via,
                contact: None,
                extra: &[],
                body: None,
                cseq_override: None,
            }) {
                self.send_request(bye, s.conn, s.domain.clone(), Purpose::Bye, now);
            }
        }
        queue
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_message(
        &mut self,
        hub: &dyn HubPort,
        peer: &PeerInfo,
        key: &TxnKey,
        req: &SipMessage,
        r: &Routing<'_>,
        domain: &Domain,
        now: Instant,
    ) {
        let in_dialog = r.to_tag().is_some();
        let mut session = None;
        if in_dialog {
            let sid = DialogId::of_incoming_request(req)
                .ok()
                .and_then(|id| self.session_dialogs.get(&id).copied());
            let Some(sid) = sid else {
                m::refused("unknown_dialog");
                return self.reply(
                    key,
                    req,
                    481,
                    "Call/Transaction Does Not Exist",
                    None,
                    &[],
                    None,
                    now,
                );
            };
            let seq = r.cseq.map(|c| c.seq).unwrap_or(0);
            if let Some(s) = self.sessions.get_mut(&sid) {
                if let Some(d) = &mut s.dialog {
                    if !d.accept_remote_cseq(seq) {
                        return self.reply(
                            key,
                            req,
                            500,
                            "CSeq Out Of Order",
                            None,
                            &[],
                            None,
                            now,
                        );
                    }
                }
                s.last_activity = now;
                s.conn = Some(peer.conn);
                session = Some((s.remote.clone(), s.local.clone()));
            }
        }
        let ct = req.content_type().ok().flatten();
        let text = match im_session::text_of(ct.as_ref(), req.body()) {
            Content::Text(t) => t,
            Content::Ignore => {
                let tag = (!in_dialog).then(|| random_token(10));
                return self.reply(key, req, 200, "OK", tag.as_deref(), &[], None, now);
            }
            Content::Unsupported => {
                m::refused("unsupported_media_type");
                let tag = (!in_dialog).then(|| random_token(10));
                return self.reply(
                    key,
                    req,
                    415,
                    "Unsupported Media Type",
                    tag.as_deref(),
                    &[("Accept", im_session::ACCEPT_HEADER)],
                    None,
                    now,
                );
            }
        };
        let (from, to) = match session {
            Some(p) => p,
            None => match im_addresses(
                r.from.as_ref().ok().map(|f| &f.uri),
                r.request_uri.as_ref().and_then(|u| u.as_ref().ok()),
            ) {
                Ok(p) => p,
                Err((code, reason)) => {
                    return self.reply(key, req, code, reason, None, &[], None, now)
                }
            },
        };
        // RFC 7572 §4: a pager MESSAGE is a single message; inside a session, a chat line.
        let kind = if in_dialog {
            MessageKind::Chat
        } else {
            MessageKind::Normal
        };
        let env = Envelope {
            from,
            to,
            body: Body::Message(message_of(req, kind, text)),
            stanza_id: None,
            via_cluster: None,
        };
        let tag = (!in_dialog).then(|| random_token(10));
        let token = self.id();
        let (submitted, tells) = match &self.handover_tx {
            Some(tx) => hub.submit_handled(domain, env, Handled::channel(tx.clone(), token)),
            None => (hub.submit(domain, env), false),
        };
        match status_for_submit(&submitted) {
            // The 200 waits until the home node's link wrote the message: a node killed
            // before that must not have said 200 for it (see `Handover`).
            None if tells => {
                let a = Awaiting {
                    key: key.clone(),
                    req: req.clone(),
                    tag,
                };
                self.awaiting.insert(token, a);
                self.handover_deadlines
                    .push_back((now + HANDOVER_WAIT, token));
            }
            None => self.reply(key, req, 200, "OK", tag.as_deref(), &[], None, now),
            Some((code, reason)) => {
                self.reply(key, req, code, reason, tag.as_deref(), &[], None, now)
            }
        }
    }

    pub(super) fn on_bye(&mut self, key: &TxnKey, req: &SipMessage, now: Instant) {
        let sid = DialogId::of_incoming_request(req)
            .ok()
            .and_then(|id| self.session_dialogs.get(&id).copied());
        match sid {
            Some(sid) => {
                self.reply(key, req, 200, "OK", None, &[], None, now);
                self.remove_session(sid);
            }
            None => self.reply(
                key,
                req,
                481,
                "Call/Transaction Does Not Exist",
                None,
                &[],
                None,
                now,
            ),
        }
    }

    pub(super) fn remove_session(&mut self, sid: u64) -> Option<ImSession> {
        let s = self.sessions.remove(&sid)?;
        if let Some(d) = &s.dialog {
            self.session_dialogs.remove(&d.id);
            self.unstore_session(&d.id);
        }
        self.session_calls
            .remove(&(s.call_id.clone(), s.local_tag.clone()));
        let pair = (s.local.bare_string(), s.remote.bare_string());
        if self.session_pairs.get(&pair) == Some(&sid) {
            self.session_owned(&pair, false);
            self.session_pairs.remove(&pair);
        }
        if let Some(c) = self.session_domains.get_mut(&s.domain) {
            *c = c.saturating_sub(1);
            if *c == 0 {
                self.session_domains.remove(&s.domain);
            }
        }
        Some(s)
    }

    pub(super) fn open_session(
        &mut self,
        hub: &dyn HubPort,
        local: Address,
        remote: Address,
        domain: Domain,
        first: MessageBody,
        now: Instant,
    ) {
        if self.sessions_of(&domain) >= hub.config().limits.im_sessions_per_domain
            || self.sessions.len() >= self.caps.im_sessions
        {
            m::refused("too_many_sessions");
            self.bounce_message(hub, &domain, &local, &remote, &first, 503);
            return;
        }
        let sid = self.id();
        let host = self
            .me
            .sent_by
            .split(':')
            .next()
            .unwrap_or("legate")
            .to_owned();
        let call_id = first
            .thread
            .as_deref()
            .filter(|t| usable_call_id(t))
            .map_or_else(|| format!("{}@{host}", random_token(20)), str::to_owned);
        let s = ImSession {
            id: sid,
            // The writer's full JID: an error from the SIP side goes back to that resource
            // (a server drops a message error sent to a bare JID, RFC 6121 §8.5.2.1.1).
            local: local.clone(),
            // A full JID names one SIP instance: its GRUU (RFC 7247 §6.3) becomes the target.
            remote: remote.clone(),
            domain: domain.clone(),
            state: SessionState::Inviting,
            dialog: None,
            call_id,
            local_tag: self.dialog_tag(),
            invite_cseq: 1,
            queue: VecDeque::from([first]),
            last_activity: now,
            conn: None,
        };
        let via = self.via_on(None);
        let contact = self.contact_for(&s.local, None);
        let headers: Vec<(&str, String)> = vec![
            ("Via", via),
            ("Max-Forwards", "70".into()),
            (
                "From",
                format!("<{}>;tag={}", sip_aor_of(&s.local), s.local_tag),
            ),
            ("To", format!("<{}>", sip_uri_of(&s.remote))),
            ("Call-ID", s.call_id.clone()),
            ("CSeq", "1 INVITE".into()),
            ("Contact", format!("<{contact}>")),
            ("Supported", "ms-text-format".into()),
        ];
        let sdp = im_session::sdp(&host, sid);
        let req = build_request(
            "INVITE",
            &sip_uri_of(&s.remote),
            &headers,
            Some(("application/sdp", &sdp)),
        );
        let pair = (s.local.bare_string(), s.remote.bare_string());
        self.session_owned(&pair, true);
        self.session_pairs.insert(pair, sid);
        self.session_calls
            .insert((s.call_id.clone(), s.local_tag.clone()), sid);
        self.insert_session(s);
        match req {
            Ok(r) => self.send_request(r, None, domain, Purpose::Invite { session: sid }, now),
            Err(e) => tracing::error!(error = %e, "cannot build INVITE"),
        }
    }

    pub(super) fn send_session_message(
        &mut self,
        hub: &dyn HubPort,
        sid: u64,
        body: MessageBody,
        now: Instant,
    ) {
        let via = self.via_on(self.sessions.get(&sid).and_then(|s| s.conn));
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        s.last_activity = now;
        let (conn, domain, from, to) =
            (s.conn, s.domain.clone(), s.local.clone(), s.remote.clone());
        let Some(d) = &mut s.dialog else {
            if s.queue.len() >= MAX_SESSION_QUEUE {
                m::refused("session_queue_full");
                self.bounce_message(hub, &domain, &from, &to, &body, 503);
            } else {
                s.queue.push_back(body);
            }
            return;
        };
        let headers = headers_of(&body);
        let extra: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let req = d.request(&InDialog {
            method: "MESSAGE",
            via: &via,
            contact: None,
            extra: &extra,
            body: Some(("text/plain;charset=UTF-8", body.text.as_bytes())),
            cseq_override: None,
        });
        match req {
            Ok(r) => self.send_request(
                r,
                conn,
                domain,
                Purpose::Message {
                    session: Some(sid),
                    from,
                    to,
                    body: Box::new(body),
                    retried: false,
                },
                now,
            ),
            Err(e) => tracing::error!(error = %e, "cannot build MESSAGE"),
        }
    }

    pub(super) fn bounce_message(
        &self,
        hub: &dyn HubPort,
        domain: &Domain,
        from: &Address,
        to: &Address,
        body: &MessageBody,
        code: u16,
    ) {
        let condition = condition_for_status(code);
        let env = Envelope {
            from: to.clone(),
            to: from.clone(),
            body: Body::Error {
                id: body.id.clone(),
                condition,
                text: format!("the SIP peer answered {code}"),
                // RFC 7247 §7.2 via `condition_for_status`.
                kind: crate::gateway::envelope::ErrorOf::Message,
            },
            stanza_id: None,
            via_cluster: None,
        };
        hub.submit(domain, env);
    }

    pub(super) fn on_invite_ok(
        &mut self,
        hub: &dyn HubPort,
        sid: u64,
        resp: &SipMessage,
        conn: Option<ConnId>,
        now: Instant,
    ) {
        let via = self.via_on(conn);
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let Some(tag) = resp.to().ok().and_then(|t| t.tag()).map(str::to_owned) else {
            tracing::info!("2xx to INVITE without To tag");
            return self.fail_session(hub, sid, 502);
        };
        if s.dialog.is_none() {
            let local_uri = sip_aor_of(&s.local);
            let remote_uri = sip_uri_of(&s.remote);
            match Dialog::uac(
                &s.call_id,
                &s.local_tag,
                &local_uri,
                &remote_uri,
                s.invite_cseq,
                resp,
                &tag,
            ) {
                Ok(d) => s.dialog = Some(d),
                Err(e) => {
                    tracing::info!(error = %crate::net::LogSafe(&e.to_string()), "unusable 2xx to INVITE");
                    return self.fail_session(hub, sid, 502);
                }
            }
        }
        if conn.is_some() {
            s.conn = conn;
        }
        s.state = SessionState::Established;
        s.last_activity = now;
        let cseq = s.invite_cseq;
        let (sconn, domain) = (s.conn, s.domain.clone());
        let Some(d) = &mut s.dialog else { return };
        let did = d.id.clone();
        // §13.2.2.4: the ACK for a 2xx is sent by the dialog, outside any transaction.
        if let Ok(ack) = d.request(&InDialog {
            method: "ACK",
            via: &via,
            contact: None,
            extra: &[],
            body: None,
            cseq_override: Some(cseq),
        }) {
            m::request("out", "ACK");
            self.actions.push_back(Action::Send {
                conn: sconn,
                domain: Some(domain),
                bytes: ack.to_bytes(),
            });
        }
        let queue: Vec<MessageBody> = s.queue.drain(..).collect();
        self.session_dialogs.insert(did, sid);
        self.store_session(sid);
        self.schedule(TimerKey::Session(sid), now + self.im_idle);
        for b in queue {
            self.send_session_message(hub, sid, b, now);
        }
    }

    /// An outbound session that cannot be used: forgotten, its queued messages bounced.
    fn fail_session(&mut self, hub: &dyn HubPort, sid: u64, code: u16) {
        if let Some(s) = self.remove_session(sid) {
            for b in &s.queue {
                self.bounce_message(hub, &s.domain, &s.local, &s.remote, b, code);
            }
        }
    }

    /// Idle session: BYE (Lync closes idle IM sessions after 10 minutes as well).
    pub(super) fn close_session(&mut self, hub: &dyn HubPort, sid: u64, now: Instant) {
        let via = self.via_on(self.sessions.get(&sid).and_then(|s| s.conn));
        let Some(mut s) = self.remove_session(sid) else {
            return;
        };
        // Whatever still waits is returned to its sender as an error, never dropped silently.
        for b in s.queue.drain(..) {
            self.bounce_message(hub, &s.domain, &s.local, &s.remote, &b, 503);
        }
        let Some(d) = &mut s.dialog else { return };
        if let Ok(bye) = d.request(&InDialog {
            method: "BYE",
            via: &via,
            contact: None,
            extra: &[],
            body: None,
            cseq_override: None,
        }) {
            self.send_request(bye, s.conn, s.domain.clone(), Purpose::Bye, now);
        }
    }
}

impl Core {
    /// Text for a SIP user (the Message arm of `handle_delivery`): into the pair's session, or a
    /// new one.
    pub(super) fn deliver_message(
        &mut self,
        hub: &dyn HubPort,
        domain: &Domain,
        from: Address,
        to: Address,
        body: MessageBody,
        now: Instant,
    ) {
        let pair = (from.bare_string(), to.bare_string());
        match self.session_pairs.get(&pair).copied() {
            Some(sid) => {
                // The latest writer is who hears of a failure (see `open_session`).
                if let Some(s) = self.sessions.get_mut(&sid) {
                    if from.resource.is_some() {
                        s.local = from;
                    }
                }
                self.send_session_message(hub, sid, body, now)
            }
            None => self.open_session(hub, from, to, domain.clone(), body, now),
        }
    }

    /// An XMPP error for a SIP user. Requests are answered when the hub takes them, so an error
    /// the home node sends later (the user is offline, refuses, or does not exist) would vanish:
    /// RFC 7572 §5 lets the gateway tell the sender with a message instead. Only message
    /// errors are worth a notice; presence errors have no reader.
    pub(super) fn late_error(
        &mut self,
        hub: &dyn HubPort,
        domain: &Domain,
        env: Envelope,
        now: Instant,
    ) {
        let Body::Error {
            condition,
            text,
            kind,
            ..
        } = env.body
        else {
            return;
        };
        if kind != ErrorOf::Message {
            tracing::debug!(
                condition = condition.label(),
                "presence or iq error for a SIP peer dropped"
            );
            return;
        }
        tracing::info!(
            condition = condition.label(),
            "late XMPP error: failure notice to the SIP sender"
        );
        let (code, reason) = condition.sip_status();
        let why = if text.is_empty() {
            String::new()
        } else {
            format!(": {text}")
        };
        let notice = MessageBody {
            text: format!(
                "Message not delivered to {}: {} ({code} {reason}){why}",
                env.from.bare(),
                condition.xmpp_name()
            ),
            kind: MessageKind::Normal,
            ..Default::default()
        };
        self.deliver_message(hub, domain, env.from, env.to, notice, now);
    }
}

/// The sender (with its GRUU, RFC 7247 §6.3) and the local user of an IM request, or the SIP
/// answer saying which address could not be read and why.
fn im_addresses(
    from: Option<&crate::sip::Uri<'_>>,
    ruri: Option<&crate::sip::Uri<'_>>,
) -> Result<(Address, Address), (u16, &'static str)> {
    use crate::gateway::interwork::address::{address_of_sip, instance_of_sip};
    let bad = (400, "Bad Addresses");
    let sender = from.and_then(|u| u.as_sip()).ok_or(bad)?;
    let target = ruri.and_then(|u| u.as_sip()).ok_or(bad)?;
    let sender = instance_of_sip(sender).map_err(|e| e.sip_status())?;
    let target = address_of_sip(target).map_err(|e| e.sip_status())?;
    Ok((sender, target))
}

/// The RFC 7572 §4 facts of a SIP request carrying a message: the Call-ID as thread, the
/// `Subject`, the first `Content-Language` tag as `xml:lang`.
fn message_of(req: &SipMessage, kind: MessageKind, text: String) -> MessageBody {
    let value = |v: Option<&str>| {
        v.map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    MessageBody {
        id: None,
        text,
        thread: req.call_id().ok().map(str::to_owned),
        kind,
        subject: value(req.header(HeaderName::Subject).map(|h| h.value)),
        lang: value(
            req.header_value_by_raw_name("Content-Language")
                .and_then(|v| v.split(',').next())
                .filter(|t| language_tag(t.trim())),
        ),
    }
}

/// RFC 5646 `Language-Tag` as far as a header needs: ASCII letters, digits and `-`, bounded.
fn language_tag(t: &str) -> bool {
    !t.is_empty() && t.len() <= 64 && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// An XMPP thread usable as a Call-ID (RFC 3261 §25.1 `callid = word ["@" word]`, restricted
/// to the characters no peer mis-parses), long enough to be unique across sessions.
fn usable_call_id(t: &str) -> bool {
    (8..=128).contains(&t.len())
        && t.bytes().filter(|b| *b == b'@').count() <= 1
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._!%*+~@".contains(&b))
}

/// The headers RFC 7572 §5 gives an outgoing MESSAGE: `Subject` (XMPP text cannot hold CR or LF
/// in a header line: control characters become spaces) and `Content-Language`.
fn headers_of(body: &MessageBody) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(subject) = &body.subject {
        let clean: String = subject
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if !clean.trim().is_empty() {
            out.push(("Subject", clean.trim().to_owned()));
        }
    }
    if let Some(lang) = body.lang.as_deref().filter(|l| language_tag(l)) {
        out.push(("Content-Language", lang.to_owned()));
    }
    out
}
