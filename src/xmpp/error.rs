//! XMPP error conditions and their wire form.
//!
//! This module owns the one mapping from "what went wrong" to the XML a peer sees: the stream
//! error conditions of RFC 6120 §4.9.3 (`<stream:error>`, fatal to the stream) and the stanza
//! error conditions of RFC 6120 §8.3.3 (an `type="error"` bounce of one stanza). It writes bytes
//! and nothing else: deciding *which* condition applies is the job of the framer, the stanza
//! checks and the negotiation machines.

use super::stanza::Stanza;

/// Namespace of stream error conditions (RFC 6120 §4.9.2).
pub const NS_STREAMS_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
/// Namespace of stanza error conditions (RFC 6120 §8.3.2).
pub const NS_STANZAS_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";

macro_rules! conditions {
    ($(#[$m:meta])* $vis:vis enum $name:ident { $($(#[$vm:meta])* $var:ident => $wire:literal),+ $(,)? }) => {
        $(#[$m])*
        $vis enum $name { $($(#[$vm])* $var),+ }
        impl $name {
            /// Every condition, in RFC order.
            pub const ALL: &'static [$name] = &[$($name::$var),+];
            /// The element name used on the wire.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$var => $wire),+ }
            }
            /// Parses the element name of a condition.
            pub fn from_name(name: &str) -> Option<Self> {
                match name { $($wire => Some($name::$var),)+ _ => None }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

conditions! {
    /// Stream error conditions, RFC 6120 §4.9.3.1–§4.9.3.25.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum StreamErrorCondition {
        BadFormat => "bad-format",
        BadNamespacePrefix => "bad-namespace-prefix",
        Conflict => "conflict",
        ConnectionTimeout => "connection-timeout",
        HostGone => "host-gone",
        HostUnknown => "host-unknown",
        ImproperAddressing => "improper-addressing",
        InternalServerError => "internal-server-error",
        InvalidFrom => "invalid-from",
        InvalidNamespace => "invalid-namespace",
        InvalidXml => "invalid-xml",
        NotAuthorized => "not-authorized",
        NotWellFormed => "not-well-formed",
        PolicyViolation => "policy-violation",
        RemoteConnectionFailed => "remote-connection-failed",
        Reset => "reset",
        ResourceConstraint => "resource-constraint",
        RestrictedXml => "restricted-xml",
        SeeOtherHost => "see-other-host",
        SystemShutdown => "system-shutdown",
        UndefinedCondition => "undefined-condition",
        UnsupportedEncoding => "unsupported-encoding",
        UnsupportedFeature => "unsupported-feature",
        UnsupportedStanzaType => "unsupported-stanza-type",
        UnsupportedVersion => "unsupported-version",
    }
}

impl StreamErrorCondition {
    /// `<stream:error>` element for this condition, with an optional human-readable `<text>`
    /// (RFC 6120 §4.9.2). The `stream:` prefix is the one every stream header we accept binds
    /// (the framer refuses any other prefix, §4.8.5), so the element is valid inside our streams.
    pub fn to_xml(self, text: Option<&str>) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        out.extend_from_slice(b"<stream:error><");
        out.extend_from_slice(self.as_str().as_bytes());
        out.extend_from_slice(b" xmlns='");
        out.extend_from_slice(NS_STREAMS_ERRORS.as_bytes());
        out.extend_from_slice(b"'/>");
        if let Some(t) = text {
            out.extend_from_slice(b"<text xmlns='");
            out.extend_from_slice(NS_STREAMS_ERRORS.as_bytes());
            out.extend_from_slice(b"'>");
            // Error text may quote a peer: XML 1.0 characters only, or the error itself
            // would break the stream it is written to.
            crate::presence::codec::xmpp::write_text(&mut out, t);
            out.extend_from_slice(b"</text>");
        }
        out.extend_from_slice(b"</stream:error>");
        out
    }

    /// Same as [`to_xml`](Self::to_xml) followed by the stream close tag: what a server sends
    /// before closing the TCP connection (RFC 6120 §4.9.1.1).
    pub fn to_xml_and_close(self, text: Option<&str>) -> Vec<u8> {
        let mut out = self.to_xml(text);
        out.extend_from_slice(b"</stream:stream>");
        out
    }
}

/// A received `<stream:error>` (RFC 6120 §4.9.2), as far as we understand it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedStreamError {
    /// `None` when the peer sent a condition we do not know (treated as undefined-condition).
    pub condition: Option<StreamErrorCondition>,
    pub text: Option<String>,
}

/// Reads a `<stream:error>` element: the first child in the streams-errors namespace is the
/// condition, `<text>` the description. Bounded by the framer's stanza cap; never fails.
pub fn parse_stream_error(stanza: &Stanza) -> ReceivedStreamError {
    let mut out = ReceivedStreamError {
        condition: None,
        text: None,
    };
    for child in super::stanza::children(stanza) {
        if child.ns != NS_STREAMS_ERRORS {
            continue;
        }
        if child.name == "text" {
            out.text = Some(child.text.trim().to_owned());
        } else if out.condition.is_none() {
            out.condition = StreamErrorCondition::from_name(&child.name);
        }
    }
    out
}

/// Reads the `<error>` child of a stanza (RFC 6120 §8.3.2): type and condition.
pub fn parse_stanza_error(
    stanza: &Stanza,
) -> Option<(Option<StanzaErrorType>, Option<StanzaErrorCondition>)> {
    let err = super::stanza::children(stanza)
        .into_iter()
        .find(|c| c.name == "error")?;
    let ty = match err.attr_type.as_deref() {
        Some("auth") => Some(StanzaErrorType::Auth),
        Some("cancel") => Some(StanzaErrorType::Cancel),
        Some("continue") => Some(StanzaErrorType::Continue),
        Some("modify") => Some(StanzaErrorType::Modify),
        Some("wait") => Some(StanzaErrorType::Wait),
        _ => None,
    };
    let cond = err
        .children
        .iter()
        .find(|(_, ns, _)| ns == NS_STANZAS_ERRORS)
        .and_then(|(n, _, _)| StanzaErrorCondition::from_name(n));
    Some((ty, cond))
}

/// Stanza error types (RFC 6120 §8.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StanzaErrorType {
    Auth,
    Cancel,
    Continue,
    Modify,
    Wait,
}

impl StanzaErrorType {
    pub fn as_str(self) -> &'static str {
        match self {
            StanzaErrorType::Auth => "auth",
            StanzaErrorType::Cancel => "cancel",
            StanzaErrorType::Continue => "continue",
            StanzaErrorType::Modify => "modify",
            StanzaErrorType::Wait => "wait",
        }
    }
}

conditions! {
    /// Stanza error conditions, RFC 6120 §8.3.3.1–§8.3.3.22.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum StanzaErrorCondition {
        BadRequest => "bad-request",
        Conflict => "conflict",
        FeatureNotImplemented => "feature-not-implemented",
        Forbidden => "forbidden",
        Gone => "gone",
        InternalServerError => "internal-server-error",
        ItemNotFound => "item-not-found",
        JidMalformed => "jid-malformed",
        NotAcceptable => "not-acceptable",
        NotAllowed => "not-allowed",
        NotAuthorized => "not-authorized",
        PolicyViolation => "policy-violation",
        RecipientUnavailable => "recipient-unavailable",
        Redirect => "redirect",
        RegistrationRequired => "registration-required",
        RemoteServerNotFound => "remote-server-not-found",
        RemoteServerTimeout => "remote-server-timeout",
        ResourceConstraint => "resource-constraint",
        ServiceUnavailable => "service-unavailable",
        SubscriptionRequired => "subscription-required",
        UndefinedCondition => "undefined-condition",
        UnexpectedRequest => "unexpected-request",
    }
}

impl StanzaErrorCondition {
    /// RFC 6120 element name.
    pub fn xmpp_name(self) -> &'static str {
        self.as_str()
    }

    /// The RFC 6120 error type we send with it.
    pub fn xmpp_type(self) -> &'static str {
        self.default_type().as_str()
    }

    /// The SIP final response for a request refused with this condition (RFC 7247 §7.1).
    pub fn sip_status(self) -> (u16, &'static str) {
        crate::gateway::interwork::errors::sip_status_of(self)
    }

    /// Bounded metric label (22 values).
    pub fn label(self) -> &'static str {
        self.as_str()
    }

    /// The error type RFC 6120 §8.3.3 gives in its example for each condition; a sender may
    /// choose another, but these are what peers expect.
    pub fn default_type(self) -> StanzaErrorType {
        use StanzaErrorCondition as C;
        use StanzaErrorType as T;
        match self {
            C::BadRequest | C::JidMalformed | C::NotAcceptable | C::PolicyViolation => T::Modify,
            C::Redirect => T::Modify,
            C::Conflict | C::FeatureNotImplemented | C::Gone | C::InternalServerError => T::Cancel,
            C::ItemNotFound | C::NotAllowed | C::RemoteServerNotFound => T::Cancel,
            C::ServiceUnavailable | C::UndefinedCondition => T::Cancel,
            C::Forbidden | C::NotAuthorized | C::RegistrationRequired => T::Auth,
            C::SubscriptionRequired => T::Auth,
            C::RecipientUnavailable | C::RemoteServerTimeout | C::ResourceConstraint => T::Wait,
            C::UnexpectedRequest => T::Wait,
        }
    }
}

/// Why a stanza cannot be bounced (RFC 6120 §8.3.1: never answer an error with an error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BounceError {
    #[error("stanza is itself an error; errors are never bounced (RFC 6120 §8.3.1)")]
    IsError,
    #[error("an iq result is never answered (RFC 6120 §8.2.3)")]
    IsResult,
    #[error("stream-level element <{0}> is not a stanza")]
    NotAStanza(String),
}

/// Builds the error bounce of a received stanza (RFC 6120 §8.3.1): same element name, `to` and
/// `from` swapped, `id` kept, `type='error'`, and an `<error>` child carrying the condition.
/// The original payload is not echoed: RFC 6120 §8.3.1 makes that optional, and dropping it
/// keeps a bounce bounded in size and stops us reflecting a peer's bytes to a third party.
pub fn stanza_error_bounce(
    stanza: &Stanza,
    condition: StanzaErrorCondition,
    error_type: Option<StanzaErrorType>,
    text: Option<&str>,
) -> Result<Vec<u8>, BounceError> {
    let name = stanza.name();
    if !matches!(name, "message" | "presence" | "iq") {
        return Err(BounceError::NotAStanza(name.to_owned()));
    }
    match stanza.stanza_type().as_deref() {
        Some("error") => return Err(BounceError::IsError),
        Some("result") if name == "iq" => return Err(BounceError::IsResult),
        _ => {}
    }
    let ty = error_type.unwrap_or_else(|| condition.default_type());
    let mut out = Vec::with_capacity(256);
    out.push(b'<');
    out.extend_from_slice(name.as_bytes());
    // Raw attribute values are already escaped the way they arrived; re-use them verbatim
    // rather than unescape/escape.
    if let Some(from) = stanza.from_raw() {
        push_attr_raw(&mut out, "to", from);
    }
    if let Some(to) = stanza.to_raw() {
        push_attr_raw(&mut out, "from", to);
    }
    if let Some(id) = stanza.id_raw() {
        push_attr_raw(&mut out, "id", id);
    }
    out.extend_from_slice(b" type='error'><error type='");
    out.extend_from_slice(ty.as_str().as_bytes());
    out.extend_from_slice(b"'><");
    out.extend_from_slice(condition.as_str().as_bytes());
    out.extend_from_slice(b" xmlns='");
    out.extend_from_slice(NS_STANZAS_ERRORS.as_bytes());
    out.extend_from_slice(b"'/>");
    if let Some(t) = text {
        out.extend_from_slice(b"<text xmlns='");
        out.extend_from_slice(NS_STANZAS_ERRORS.as_bytes());
        out.extend_from_slice(b"'>");
        crate::presence::codec::xmpp::write_text(&mut out, t);
        out.extend_from_slice(b"</text>");
    }
    out.extend_from_slice(b"</error></");
    out.extend_from_slice(name.as_bytes());
    out.push(b'>');
    Ok(out)
}

/// Writes ` name='raw'`; a raw value taken from a `"`-quoted attribute may contain `'`, which
/// must then be escaped for our single-quoted form.
fn push_attr_raw(out: &mut Vec<u8>, name: &str, raw: &str) {
    out.push(b' ');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"='");
    for b in raw.bytes() {
        if b == b'\'' {
            out.extend_from_slice(b"&apos;");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(StreamErrorCondition::ALL.len(), 25);
        for c in StreamErrorCondition::ALL {
            assert_eq!(StreamErrorCondition::from_name(c.as_str()), Some(*c));
        }
        assert_eq!(StanzaErrorCondition::ALL.len(), 22);
        for c in StanzaErrorCondition::ALL {
            assert_eq!(StanzaErrorCondition::from_name(c.as_str()), Some(*c));
        }
    }

    #[test]
    fn stream_error_xml() {
        let x = StreamErrorCondition::PolicyViolation.to_xml(Some("too <big>"));
        assert_eq!(
            String::from_utf8_lossy(&x),
            "<stream:error><policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>too &lt;big&gt;</text></stream:error>"
        );
        // Text quoting a peer: characters XML 1.0 forbids become U+FFFD.
        let x = StreamErrorCondition::BadFormat.to_xml(Some("x\u{1}y"));
        assert!(String::from_utf8_lossy(&x).contains(">x\u{FFFD}y</text>"));
        let x = StreamErrorCondition::HostUnknown.to_xml_and_close(None);
        assert!(x.ends_with(b"</stream:error></stream:stream>"));
    }
}
