//! Client transactions: INVITE (RFC 3261 §17.1.1, Figure 5, with the RFC 6026 Accepted state)
//! and non-INVITE (§17.1.2, Figure 6).
//!
//! The machine owns the serialized request for retransmission and builds the ACK for a
//! non-2xx final response itself (§17.1.1.3); ACK for 2xx belongs to the dialog layer. It never
//! looks at the network: responses arrive as events already matched by [`super::TxnKey`].

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use super::{due, min_deadline, Event, Kind, Retransmit, Timers, TuEvent, TxnError, TxnKey};
use crate::sip::header::HeaderName;
use crate::sip::message::SipMessage;
use crate::sip::parse::parse_exact;
use crate::sip::uri::find_unquoted;

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// INVITE sent, nothing heard: Timer A (unreliable) and B.
    Calling {
        retransmit: Option<Retransmit>,
        timeout: Instant,
    },
    /// Non-INVITE sent, nothing heard: Timer E (unreliable) and F.
    Trying {
        retransmit: Option<Retransmit>,
        timeout: Instant,
    },
    /// A provisional response arrived. INVITE: no timer; non-INVITE: E (at T2) and F go on.
    Proceeding {
        retransmit: Option<Retransmit>,
        timeout: Option<Instant>,
    },
    /// A final response arrived (non-2xx for INVITE): absorb retransmissions until D/K.
    Completed {
        until: Instant,
    },
    /// INVITE got a 2xx (RFC 6026 §8.4): further 2xx go up until Timer M.
    Accepted {
        until: Instant,
    },
    Terminated,
}

/// A client transaction.
#[derive(Debug)]
pub struct ClientTransaction {
    kind: Kind,
    key: TxnKey,
    timers: Timers,
    request: SipMessage,
    wire: Bytes,
    ack: Option<Bytes>,
    state: State,
    transmit: VecDeque<Bytes>,
    events: VecDeque<TuEvent>,
}

impl ClientTransaction {
    /// Starts a transaction for `request`; the request is queued for transmission at once.
    pub fn new(request: SipMessage, timers: Timers, now: Instant) -> Result<Self, TxnError> {
        let method = request.method().ok_or(TxnError::WrongMessage)?;
        if method == "ACK" {
            return Err(TxnError::AckNotTransaction);
        }
        let key = TxnKey::client(&request)?;
        let kind = if method == "INVITE" {
            Kind::Invite
        } else {
            Kind::NonInvite
        };
        let retransmit = (!timers.reliable).then(|| Retransmit::start(now, timers.t1));
        let timeout = now + timers.timeout();
        let state = match kind {
            Kind::Invite => State::Calling {
                retransmit,
                timeout,
            },
            Kind::NonInvite => State::Trying {
                retransmit,
                timeout,
            },
        };
        let wire = request.to_bytes();
        Ok(ClientTransaction {
            kind,
            key,
            timers,
            request,
            wire: wire.clone(),
            ack: None,
            state,
            transmit: VecDeque::from([wire]),
            events: VecDeque::new(),
        })
    }

    /// The matching key.
    pub fn key(&self) -> &TxnKey {
        &self.key
    }

    /// INVITE or not.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// `true` once Terminated.
    pub fn is_terminated(&self) -> bool {
        self.state == State::Terminated
    }

    /// A short state name (for logs and tests).
    pub fn state_name(&self) -> &'static str {
        match self.state {
            State::Calling { .. } => "Calling",
            State::Trying { .. } => "Trying",
            State::Proceeding { .. } => "Proceeding",
            State::Completed { .. } => "Completed",
            State::Accepted { .. } => "Accepted",
            State::Terminated => "Terminated",
        }
    }

    /// Next bytes to send.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.transmit.pop_front()
    }

    /// Next event for the TU.
    pub fn poll_event(&mut self) -> Option<TuEvent> {
        self.events.pop_front()
    }

    /// Earliest deadline; feed `Event::Timer` when it passes.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Calling {
                retransmit,
                timeout,
            }
            | State::Trying {
                retransmit,
                timeout,
            } => min_deadline(retransmit.map(|r| r.at), Some(*timeout)),
            State::Proceeding {
                retransmit,
                timeout,
            } => min_deadline(retransmit.map(|r| r.at), *timeout),
            State::Completed { until } | State::Accepted { until } => Some(*until),
            State::Terminated => None,
        }
    }

    fn terminate(&mut self) {
        if self.state != State::Terminated {
            self.state = State::Terminated;
            self.events.push_back(TuEvent::Terminated);
        }
    }

    /// Enters Completed for `linger`, or Terminated at once when it is zero (reliable).
    fn complete(&mut self, now: Instant, linger: std::time::Duration) {
        if linger.is_zero() {
            self.terminate();
        } else {
            self.state = State::Completed {
                until: now + linger,
            };
        }
    }

    /// Feeds one event.
    pub fn handle(&mut self, event: Event, now: Instant) {
        match event {
            Event::Message(resp) => self.on_response(*resp, now),
            Event::TransportError => {
                if self.state != State::Terminated {
                    self.events.push_back(TuEvent::TransportError);
                    self.terminate();
                }
            }
            Event::Timer => self.on_timer(now),
            // A client transaction never sends responses.
            Event::TuResponse(_) => {}
        }
    }

    fn on_response(&mut self, resp: SipMessage, now: Instant) {
        let Some(code) = resp.status() else { return };
        // §17.1.3: only responses that match this transaction.
        if TxnKey::client(&resp).ok().as_ref() != Some(&self.key) {
            return;
        }
        match (self.kind, &self.state) {
            (_, State::Terminated) => {}
            (Kind::Invite, State::Calling { .. } | State::Proceeding { .. }) => {
                if code < 200 {
                    self.state = State::Proceeding {
                        retransmit: None,
                        timeout: None,
                    };
                    self.events.push_back(TuEvent::Response(Box::new(resp)));
                } else if code < 300 {
                    // RFC 6026 §8.4: 2xx goes up, the TU ACKs, and the transaction waits in
                    // Accepted for Timer M so retransmitted and forked 2xx still reach the TU.
                    self.events.push_back(TuEvent::Response(Box::new(resp)));
                    self.state = State::Accepted {
                        until: now + self.timers.timer_l_m(),
                    };
                } else {
                    let ack = self.build_ack(&resp);
                    if let Some(a) = &ack {
                        self.transmit.push_back(a.clone());
                    }
                    self.ack = ack;
                    self.events.push_back(TuEvent::Response(Box::new(resp)));
                    self.complete(now, self.timers.timer_d());
                }
            }
            (Kind::Invite, State::Accepted { .. }) if (200..300).contains(&code) => {
                self.events.push_back(TuEvent::Response(Box::new(resp)));
            }
            // Retransmitted final response: re-send the ACK, tell nobody (§17.1.1.2).
            (Kind::Invite, State::Completed { .. }) if code >= 300 => {
                if let Some(a) = &self.ack {
                    self.transmit.push_back(a.clone());
                }
            }
            (
                Kind::NonInvite,
                State::Trying { timeout, .. }
                | State::Proceeding {
                    timeout: Some(timeout),
                    ..
                },
            ) => {
                let timeout = *timeout;
                if code < 200 {
                    // §17.1.2.2: in Proceeding, Timer E fires every T2.
                    let retransmit =
                        (!self.timers.reliable).then(|| Retransmit::start(now, self.timers.t2));
                    self.state = State::Proceeding {
                        retransmit,
                        timeout: Some(timeout),
                    };
                } else {
                    self.complete(now, self.timers.timer_i_k());
                }
                self.events.push_back(TuEvent::Response(Box::new(resp)));
            }
            // Completed absorbs retransmissions; other combinations cannot occur.
            _ => {}
        }
    }

    fn on_timer(&mut self, now: Instant) {
        let t2 = self.timers.t2;
        match &mut self.state {
            State::Calling {
                retransmit,
                timeout,
            }
            | State::Trying {
                retransmit,
                timeout,
            } => {
                if *timeout <= now {
                    self.events.push_back(TuEvent::Timeout);
                    self.terminate();
                    return;
                }
                if let Some(r) = retransmit {
                    if r.at <= now {
                        // Timer A doubles without bound; Timer E doubles up to T2.
                        let next = match self.kind {
                            Kind::Invite => r.interval * 2,
                            Kind::NonInvite => (r.interval * 2).min(t2),
                        };
                        r.rearm(now, next);
                        self.transmit.push_back(self.wire.clone());
                    }
                }
            }
            State::Proceeding {
                retransmit,
                timeout,
            } => {
                if due(*timeout, now) {
                    self.events.push_back(TuEvent::Timeout);
                    self.terminate();
                    return;
                }
                if let Some(r) = retransmit {
                    if r.at <= now {
                        r.rearm(now, t2);
                        self.transmit.push_back(self.wire.clone());
                    }
                }
            }
            State::Completed { until } | State::Accepted { until } => {
                if *until <= now {
                    self.terminate();
                }
            }
            State::Terminated => {}
        }
    }

    /// §17.1.1.3: ACK for a non-2xx final response: same Request-URI, Call-ID, From, top Via
    /// and Route as the request, To from the response, CSeq number with method ACK.
    fn build_ack(&self, resp: &SipMessage) -> Option<Bytes> {
        let req = &self.request;
        let ruri = req.request_uri_str()?;
        let cseq = req.cseq().ok()?;
        let mut v = Vec::with_capacity(512);
        v.extend_from_slice(format!("ACK {ruri} SIP/2.0\r\n").as_bytes());
        let via = req.header(HeaderName::Via)?.value;
        let top = find_unquoted(via.as_bytes(), b',')
            .and_then(|i| via.get(..i))
            .unwrap_or(via)
            .trim_end();
        v.extend_from_slice(format!("Via: {top}\r\nMax-Forwards: 70\r\n").as_bytes());
        for h in req.headers() {
            if matches!(
                h.name,
                HeaderName::From | HeaderName::CallId | HeaderName::Route
            ) {
                v.extend_from_slice(h.raw_line);
            }
        }
        let to = resp.header(HeaderName::To)?;
        v.extend_from_slice(to.raw_line);
        v.extend_from_slice(
            format!("CSeq: {} ACK\r\nContent-Length: 0\r\n\r\n", cseq.seq).as_bytes(),
        );
        // Parse once to be sure what we send is what we would accept.
        parse_exact(Bytes::from(v)).ok().map(|m| m.to_bytes())
    }
}
