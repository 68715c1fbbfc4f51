//! Server transactions: INVITE (RFC 3261 §17.2.1, Figure 7, with the RFC 6026 Accepted state)
//! and non-INVITE (§17.2.2, Figure 8).
//!
//! The machine absorbs retransmitted requests by re-sending the last response (§17.2.1,
//! §17.2.2), absorbs the ACK for a non-2xx final response (Completed → Confirmed), and sends
//! 100 Trying for an INVITE at once (§17.2.1: required unless the TU answers within 200 ms;
//! sending it always is simplest and allowed). Responses come from the TU as events.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use super::{due, min_deadline, Event, Kind, Retransmit, Timers, TuEvent, TxnError, TxnKey};
use crate::sip::message::SipMessage;

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Non-INVITE received, no response yet: retransmissions are absorbed silently.
    Trying,
    /// INVITE received (100 sent) or non-INVITE after a provisional.
    Proceeding,
    /// Final response sent. INVITE: Timer G (unreliable) and H, waiting for ACK. Non-INVITE:
    /// Timer J.
    Completed {
        retransmit: Option<Retransmit>,
        timeout: Option<Instant>,
        until: Option<Instant>,
    },
    /// INVITE: ACK received; Timer I absorbs further ACKs.
    Confirmed {
        until: Instant,
    },
    /// INVITE: 2xx sent (RFC 6026 §8.7): INVITE retransmissions absorbed, ACKs and the TU's
    /// 2xx retransmissions pass, until Timer L.
    Accepted {
        until: Instant,
    },
    Terminated,
}

/// A server transaction.
#[derive(Debug)]
pub struct ServerTransaction {
    kind: Kind,
    key: TxnKey,
    timers: Timers,
    state: State,
    last_response: Option<Bytes>,
    transmit: VecDeque<Bytes>,
    events: VecDeque<TuEvent>,
}

impl ServerTransaction {
    /// Creates the transaction for an incoming request (not ACK).
    pub fn new(request: &SipMessage, timers: Timers, now: Instant) -> Result<Self, TxnError> {
        if request.method() == Some("ACK") {
            return Err(TxnError::AckNotTransaction);
        }
        let key = TxnKey::server(request)?;
        Self::with_key(request, key, timers, now)
    }

    /// [`ServerTransaction::new`] with the request's key already computed (the core has it
    /// from the request's decoded routing headers).
    pub fn with_key(
        request: &SipMessage,
        key: TxnKey,
        timers: Timers,
        _now: Instant,
    ) -> Result<Self, TxnError> {
        let method = request.method().ok_or(TxnError::WrongMessage)?;
        if method == "ACK" {
            return Err(TxnError::AckNotTransaction);
        }
        let mut t = ServerTransaction {
            kind: if method == "INVITE" {
                Kind::Invite
            } else {
                Kind::NonInvite
            },
            key,
            timers,
            state: State::Trying,
            last_response: None,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
        };
        if t.kind == Kind::Invite {
            t.state = State::Proceeding;
            if let Ok(trying) = request.build_response(100, "Trying", None) {
                let b = trying.to_bytes();
                t.last_response = Some(b.clone());
                t.transmit.push_back(b);
            }
        }
        Ok(t)
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
            State::Trying => "Trying",
            State::Proceeding => "Proceeding",
            State::Completed { .. } => "Completed",
            State::Confirmed { .. } => "Confirmed",
            State::Accepted { .. } => "Accepted",
            State::Terminated => "Terminated",
        }
    }

    /// The response a retransmitted request would get again (the latest one sent).
    pub fn last_response(&self) -> Option<&Bytes> {
        self.last_response.as_ref()
    }

    /// Next bytes to send.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.transmit.pop_front()
    }

    /// Next event for the TU.
    pub fn poll_event(&mut self) -> Option<TuEvent> {
        self.events.pop_front()
    }

    /// Earliest deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Completed {
                retransmit,
                timeout,
                until,
            } => min_deadline(min_deadline(retransmit.map(|r| r.at), *timeout), *until),
            State::Confirmed { until } | State::Accepted { until } => Some(*until),
            _ => None,
        }
    }

    fn terminate(&mut self) {
        if self.state != State::Terminated {
            self.state = State::Terminated;
            self.events.push_back(TuEvent::Terminated);
        }
    }

    /// Feeds one event.
    pub fn handle(&mut self, event: Event, now: Instant) {
        match event {
            Event::Message(req) => self.on_request(&req, now),
            Event::TuResponse(resp) => self.on_tu_response(&resp, now),
            Event::TransportError => {
                if self.state != State::Terminated {
                    self.events.push_back(TuEvent::TransportError);
                    self.terminate();
                }
            }
            Event::Timer => self.on_timer(now),
        }
    }

    fn on_request(&mut self, req: &SipMessage, now: Instant) {
        // §17.2.3: only requests that match (ACK keys as INVITE).
        if TxnKey::server(req).ok().as_ref() != Some(&self.key) {
            return;
        }
        let is_ack = req.method() == Some("ACK");
        match &self.state {
            State::Accepted { .. } => {
                if is_ack {
                    self.events
                        .push_back(TuEvent::Request(Box::new(req.clone())));
                }
                // INVITE retransmissions are absorbed: the TU retransmits the 2xx.
            }
            State::Completed { .. } if is_ack && self.kind == Kind::Invite => {
                // §17.2.1: Completed → Confirmed; Timer G stops, Timer I starts.
                let i = self.timers.timer_i_k();
                if i.is_zero() {
                    self.terminate();
                } else {
                    self.state = State::Confirmed { until: now + i };
                }
            }
            _ if is_ack => {}
            State::Proceeding | State::Completed { .. } => {
                // A retransmitted request: re-send the most recent response.
                if let Some(r) = &self.last_response {
                    self.transmit.push_back(r.clone());
                }
            }
            State::Trying | State::Confirmed { .. } | State::Terminated => {}
        }
    }

    fn on_tu_response(&mut self, resp: &SipMessage, now: Instant) {
        let Some(code) = resp.status() else { return };
        let bytes = resp.to_bytes();
        match (self.kind, &self.state) {
            (Kind::Invite, State::Proceeding) => {
                self.transmit.push_back(bytes.clone());
                if code < 200 {
                    self.last_response = Some(bytes);
                } else if code < 300 {
                    // RFC 6026 §8.7: Accepted for Timer L; the TU retransmits the 2xx
                    // (§13.3.1.4) through us.
                    self.state = State::Accepted {
                        until: now + self.timers.timer_l_m(),
                    };
                } else {
                    self.last_response = Some(bytes);
                    let retransmit =
                        (!self.timers.reliable).then(|| Retransmit::start(now, self.timers.t1));
                    self.state = State::Completed {
                        retransmit,
                        timeout: Some(now + self.timers.timeout()),
                        until: None,
                    };
                }
            }
            (Kind::NonInvite, State::Trying | State::Proceeding) => {
                self.transmit.push_back(bytes.clone());
                self.last_response = Some(bytes);
                if code < 200 {
                    self.state = State::Proceeding;
                } else {
                    let j = self.timers.timer_j();
                    if j.is_zero() {
                        self.terminate();
                    } else {
                        self.state = State::Completed {
                            retransmit: None,
                            timeout: None,
                            until: Some(now + j),
                        };
                    }
                }
            }
            (Kind::Invite, State::Accepted { .. }) if (200..300).contains(&code) => {
                self.transmit.push_back(bytes);
            }
            // Responses after the final one are TU bugs; nothing is sent.
            _ => {}
        }
    }

    fn on_timer(&mut self, now: Instant) {
        let t2 = self.timers.t2;
        match &mut self.state {
            State::Completed {
                retransmit,
                timeout,
                until,
            } => {
                if due(*timeout, now) {
                    // Timer H: no ACK (§17.2.1).
                    self.events.push_back(TuEvent::Timeout);
                    self.terminate();
                    return;
                }
                if due(*until, now) {
                    self.terminate();
                    return;
                }
                if let Some(r) = retransmit {
                    if r.at <= now {
                        // Timer G: double up to T2.
                        r.rearm(now, (r.interval * 2).min(t2));
                        if let Some(b) = &self.last_response {
                            self.transmit.push_back(b.clone());
                        }
                    }
                }
            }
            State::Confirmed { until } | State::Accepted { until } if *until <= now => {
                self.terminate()
            }
            _ => {}
        }
    }
}
