//! XEP-0114 (Jabber Component Protocol) handshake, component side, as a sans-IO machine.
//!
//! Legate connects to each home node as an external component named after the foreign domain it
//! serves (`partner.com`). This machine owns only the opening: it writes our stream header,
//! reads the server's (which carries the stream id), answers with
//! `<handshake>hex(SHA-1(stream id ‖ secret))</handshake>` (XEP-0114 §3) and reports success on
//! the server's empty `<handshake/>`, or failure with the reason. Bytes come in as framer
//! events, bytes and verdicts go out as actions; the driver owns the socket, the framer and the
//! clock (time is passed in). After `Connected` the driver routes stanzas itself.

use std::time::{Duration, Instant};

use sha1::{Digest, Sha1};

use super::error::{parse_stream_error, StreamErrorCondition};
use super::stanza::{root_text, NS_COMPONENT_ACCEPT, NS_STREAMS};
use super::stream::{StreamError, StreamEvent};

/// `hex(SHA-1(stream_id ‖ secret))`, lowercase (XEP-0114 §3).
pub fn handshake_digest(stream_id: &str, secret: &str) -> String {
    let mut h = Sha1::new();
    h.update(stream_id.as_bytes());
    h.update(secret.as_bytes());
    hex::encode(h.finalize())
}

/// What the component needs to open its link.
#[derive(Debug, Clone)]
pub struct ComponentConfig {
    /// The component's JID domain, as the home node lists it (e.g. `partner.com`).
    pub domain: String,
    /// Shared secret from the home node's component configuration.
    pub secret: String,
    /// Time allowed from `start` to the server's `<handshake/>`.
    pub handshake_timeout: Duration,
}

impl ComponentConfig {
    pub fn new(domain: impl Into<String>, secret: impl Into<String>) -> Self {
        ComponentConfig {
            domain: domain.into(),
            secret: secret.into(),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Why the handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ComponentFailure {
    /// The server sent `<stream:error>` (typically `not-authorized` for a wrong secret,
    /// `conflict` when the component is already connected, `host-unknown` for an unknown name).
    #[error("home node sent stream error {condition:?}: {text:?}")]
    StreamError {
        condition: Option<StreamErrorCondition>,
        text: Option<String>,
    },
    /// The server's bytes were not acceptable XML for a stream.
    #[error("framing: {0}")]
    Framing(StreamError),
    /// The server broke XEP-0114 (no stream id, wrong namespace, unexpected element).
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("home node closed the stream")]
    Closed,
    #[error("handshake timed out")]
    Timeout,
}

impl ComponentFailure {
    /// Stream error we send before closing, if any (never answer the peer's own error).
    fn our_condition(&self) -> Option<StreamErrorCondition> {
        match self {
            ComponentFailure::Framing(e) => Some(e.condition()),
            ComponentFailure::Protocol(_) => Some(StreamErrorCondition::InvalidXml),
            ComponentFailure::Timeout => Some(StreamErrorCondition::ConnectionTimeout),
            ComponentFailure::StreamError { .. } | ComponentFailure::Closed => None,
        }
    }
}

/// Outputs of the machine, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ComponentAction {
    SendBytes(Vec<u8>),
    /// The home node accepted the handshake: stanzas may flow.
    Connected,
    /// Close the connection (any bytes to send were emitted just before).
    Fail(ComponentFailure),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ComponentState {
    Idle,
    AwaitHeader,
    /// The server's header had no stream id. RFC 6120 §4.9.1.2: a server refusing the stream
    /// sends its header and then `<stream:error>` (Prosody does this for `host-unknown`), so the
    /// error that follows is the reason to report; anything else is a protocol failure.
    HeaderWithoutId,
    AwaitHandshake {
        stream_id: String,
    },
    Connected {
        stream_id: String,
    },
    Failed(ComponentFailure),
}

/// The component side of the XEP-0114 handshake.
#[derive(Debug)]
pub struct ComponentHandshake {
    cfg: ComponentConfig,
    state: ComponentState,
    deadline: Option<Instant>,
}

impl ComponentHandshake {
    pub fn new(cfg: ComponentConfig) -> Self {
        ComponentHandshake {
            cfg,
            state: ComponentState::Idle,
            deadline: None,
        }
    }

    pub fn state(&self) -> &ComponentState {
        &self.state
    }

    /// Our stream header (XEP-0114 §3, example 1). Call once the TCP connection is up.
    pub fn start(&mut self, now: Instant) -> Vec<ComponentAction> {
        self.state = ComponentState::AwaitHeader;
        self.deadline = Some(now + self.cfg.handshake_timeout);
        let header = format!(
            "<?xml version='1.0'?><stream:stream xmlns='{NS_COMPONENT_ACCEPT}' xmlns:stream='{NS_STREAMS}' to='{}'>",
            quick_xml::escape::escape(&self.cfg.domain)
        );
        vec![ComponentAction::SendBytes(header.into_bytes())]
    }

    /// When the driver should call [`handle_timeout`](Self::handle_timeout).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            ComponentState::AwaitHeader
            | ComponentState::HeaderWithoutId
            | ComponentState::AwaitHandshake { .. } => self.deadline,
            _ => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Vec<ComponentAction> {
        match self.poll_timeout() {
            Some(d) if now >= d => self.fail(ComponentFailure::Timeout),
            _ => Vec::new(),
        }
    }

    /// Feed the framer's error.
    pub fn handle_framing_error(&mut self, e: &StreamError) -> Vec<ComponentAction> {
        if matches!(self.state, ComponentState::Failed(_)) {
            return Vec::new();
        }
        self.fail(ComponentFailure::Framing(e.clone()))
    }

    /// Feed one framer event. After `Connected`, stanzas are the driver's: this returns nothing
    /// for them, but still turns a stream error or close into `Fail`.
    pub fn handle_event(&mut self, ev: &StreamEvent) -> Vec<ComponentAction> {
        match (&self.state, ev) {
            (ComponentState::Failed(_), _) | (ComponentState::Idle, _) => Vec::new(),
            (_, StreamEvent::StreamClose) => self.fail(ComponentFailure::Closed),
            (ComponentState::AwaitHeader, StreamEvent::StreamOpen(h)) => {
                if h.default_ns() != NS_COMPONENT_ACCEPT {
                    return self.fail(ComponentFailure::Protocol(format!(
                        "server stream namespace '{}'",
                        h.default_ns()
                    )));
                }
                let Some(id) = h.id().filter(|id| !id.is_empty()) else {
                    self.state = ComponentState::HeaderWithoutId;
                    return Vec::new();
                };
                let id = id.to_owned();
                let digest = handshake_digest(&id, &self.cfg.secret);
                self.state = ComponentState::AwaitHandshake { stream_id: id };
                vec![ComponentAction::SendBytes(
                    format!("<handshake>{digest}</handshake>").into_bytes(),
                )]
            }
            (_, StreamEvent::StreamOpen(_)) => {
                self.fail(ComponentFailure::Protocol("second stream header".into()))
            }
            (_, StreamEvent::Stanza(s)) if s.namespace() == NS_STREAMS && s.name() == "error" => {
                let e = parse_stream_error(s);
                self.fail(ComponentFailure::StreamError {
                    condition: e.condition,
                    text: e.text,
                })
            }
            (ComponentState::HeaderWithoutId, StreamEvent::Stanza(_)) => self.fail(
                ComponentFailure::Protocol("server header has no stream id".into()),
            ),
            (ComponentState::AwaitHandshake { stream_id }, StreamEvent::Stanza(s)) => {
                if s.name() == "handshake" && s.namespace() == NS_COMPONENT_ACCEPT {
                    // XEP-0114 §3: success is an *empty* handshake element.
                    if !root_text(s).is_empty() {
                        return self.fail(ComponentFailure::Protocol(
                            "non-empty <handshake/> from server".into(),
                        ));
                    }
                    self.state = ComponentState::Connected {
                        stream_id: stream_id.clone(),
                    };
                    vec![ComponentAction::Connected]
                } else {
                    let name = s.qname().to_owned();
                    self.fail(ComponentFailure::Protocol(format!(
                        "<{name}> before the handshake completed"
                    )))
                }
            }
            (ComponentState::AwaitHeader, StreamEvent::Stanza(s)) => {
                let name = s.qname().to_owned();
                self.fail(ComponentFailure::Protocol(format!(
                    "<{name}> before the stream header"
                )))
            }
            (ComponentState::Connected { .. }, StreamEvent::Stanza(_)) => Vec::new(),
        }
    }

    fn fail(&mut self, f: ComponentFailure) -> Vec<ComponentAction> {
        let mut out = Vec::new();
        if let Some(c) = f.our_condition() {
            let text = f.to_string();
            // The header went out in `start`, so the error can be written inside our stream.
            out.push(ComponentAction::SendBytes(c.to_xml_and_close(Some(&text))));
        } else {
            // The peer ended things (error or close): just close our side (RFC 6120 §4.4).
            out.push(ComponentAction::SendBytes(b"</stream:stream>".to_vec()));
        }
        self.state = ComponentState::Failed(f.clone());
        out.push(ComponentAction::Fail(f));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xmpp::stream::StreamFramer;

    fn run(
        machine: &mut ComponentHandshake,
        framer: &mut StreamFramer,
        bytes: &[u8],
    ) -> Vec<ComponentAction> {
        framer.push(bytes);
        let mut out = Vec::new();
        loop {
            match framer.next_event() {
                Ok(Some(ev)) => out.extend(machine.handle_event(&ev)),
                Ok(None) => break,
                Err(e) => {
                    out.extend(machine.handle_framing_error(&e));
                    break;
                }
            }
        }
        out
    }

    #[test]
    fn xep_0114_vector_digest() {
        assert_eq!(
            handshake_digest("3BF96D32", "test"),
            "aaee83c26aeeafcbabeabfcbcd50df997e0a2a1e"
        );
    }

    #[test]
    fn handshake_success_and_failures() {
        let t0 = Instant::now();
        let mut m = ComponentHandshake::new(ComponentConfig::new("plays.shakespeare.lit", "test"));
        let mut f = StreamFramer::default();
        let a = m.start(t0);
        let ComponentAction::SendBytes(h) = &a[0] else {
            panic!()
        };
        let h = String::from_utf8_lossy(h);
        assert!(
            h.contains("xmlns='jabber:component:accept'")
                && h.contains("to='plays.shakespeare.lit'")
        );
        let a = run(
            &mut m,
            &mut f,
            b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:component:accept' from='plays.shakespeare.lit' id='3BF96D32'>",
        );
        assert_eq!(
            a,
            vec![ComponentAction::SendBytes(
                b"<handshake>aaee83c26aeeafcbabeabfcbcd50df997e0a2a1e</handshake>".to_vec()
            )]
        );
        assert!(m.poll_timeout().is_some());
        assert_eq!(
            run(&mut m, &mut f, b"<handshake/>"),
            vec![ComponentAction::Connected]
        );
        assert!(m.poll_timeout().is_none());

        // Wrong secret: not-authorized.
        let mut m = ComponentHandshake::new(ComponentConfig::new("partner.com", "nope"));
        let mut f = StreamFramer::default();
        m.start(t0);
        run(&mut m, &mut f, b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:component:accept' id='x'>");
        let a = run(&mut m, &mut f, b"<stream:error><not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/><text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>bad secret</text></stream:error></stream:stream>");
        assert_eq!(
            a.last(),
            Some(&ComponentAction::Fail(ComponentFailure::StreamError {
                condition: Some(StreamErrorCondition::NotAuthorized),
                text: Some("bad secret".into())
            }))
        );

        // Conflict straight after the header.
        let mut m = ComponentHandshake::new(ComponentConfig::new("partner.com", "s"));
        let mut f = StreamFramer::default();
        m.start(t0);
        let a = run(&mut m, &mut f, b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:component:accept' id='x'><stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>");
        assert!(matches!(
            a.last(),
            Some(ComponentAction::Fail(ComponentFailure::StreamError {
                condition: Some(StreamErrorCondition::Conflict),
                ..
            }))
        ));

        // No id; timeout.
        let mut m = ComponentHandshake::new(ComponentConfig::new("partner.com", "s"));
        let mut f = StreamFramer::default();
        m.start(t0);
        let a = run(&mut m, &mut f, b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:component:accept'>");
        assert!(a.is_empty(), "{a:?}");
        let a = run(&mut m, &mut f, b"<handshake/>");
        assert!(matches!(
            a.last(),
            Some(ComponentAction::Fail(ComponentFailure::Protocol(_)))
        ));
        // No id because the server refuses the stream: its error is the reason (Prosody's
        // `host-unknown` for a component it does not declare).
        let mut m = ComponentHandshake::new(ComponentConfig::new("other.com", "s"));
        let mut f = StreamFramer::default();
        m.start(t0);
        let a = run(&mut m, &mut f, b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:component:accept'><stream:error><host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error></stream:stream>");
        assert!(matches!(
            a.last(),
            Some(ComponentAction::Fail(ComponentFailure::StreamError {
                condition: Some(StreamErrorCondition::HostUnknown),
                ..
            }))
        ));
        let mut m = ComponentHandshake::new(ComponentConfig::new("partner.com", "s"));
        m.start(t0);
        assert!(m.handle_timeout(t0 + Duration::from_secs(1)).is_empty());
        let a = m.handle_timeout(t0 + Duration::from_secs(11));
        assert_eq!(
            a.last(),
            Some(&ComponentAction::Fail(ComponentFailure::Timeout))
        );
    }
}
