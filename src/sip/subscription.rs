//! Presence subscriptions (RFC 6665, RFC 3856) as plain state: the notifier side (a foreign
//! watcher subscribed to a local user) and the subscriber side (a local user subscribed to a
//! foreign user), plus the pure rules both need: `Expires` clamping, content negotiation by
//! `Accept`, `Subscription-State` values and the conversion between NOTIFY bodies and the
//! core's `PresenceBody` through the mapping set.
//!
//! The sequencing (when to send which NOTIFY, what to submit to the core) lives in the edge
//! core; this module never sends anything and takes time as a parameter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::dialog::Dialog;
use super::header::{MediaType, TokenParams};
use crate::config::{Domain, PresenceFormat};
use crate::gateway::{Address, PresenceBody};
use crate::presence::codec;
use crate::presence::convert::SipBodyKind;
use crate::presence::map::{Facts, MappingSet};

/// Shortest subscription we accept; shorter requests get 423 with `Min-Expires` (RFC 6665
/// §4.2.1.1). One minute keeps a misbehaving peer from turning refreshes into a flood.
pub const MIN_EXPIRES: u32 = 60;
/// Longest subscription we grant; longer requests are shortened in the 200 (RFC 6665
/// §4.2.1.1 lets the notifier reduce it). Lync asks for 2 h and refreshes after ~1 h 45 min.
pub const MAX_EXPIRES: u32 = 7200;
/// Default when a SUBSCRIBE has no `Expires` (RFC 3856 §6.4).
pub const DEFAULT_EXPIRES: u32 = 3600;
/// What we ask for as subscriber.
pub const SUBSCRIBE_EXPIRES: u32 = 3600;

/// Outcome of reading a SUBSCRIBE's `Expires`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiresDecision {
    /// Grant this many seconds.
    Grant(u32),
    /// Below `MIN_EXPIRES`: answer 423.
    TooBrief,
    /// `Expires: 0`: unsubscribe (or a one-shot fetch, RFC 6665 §4.4.3).
    Zero,
}

/// Applies the bounds to a requested `Expires`.
pub fn clamp_expires(requested: Option<u32>) -> ExpiresDecision {
    match requested {
        None => ExpiresDecision::Grant(DEFAULT_EXPIRES),
        Some(0) => ExpiresDecision::Zero,
        Some(e) if e < MIN_EXPIRES => ExpiresDecision::TooBrief,
        Some(e) => ExpiresDecision::Grant(e.min(MAX_EXPIRES)),
    }
}

/// When a subscriber refreshes a subscription granted for `expires` seconds: a tenth before
/// the end (at least 5 s before, never earlier than half-way), like Lync's 1 h 45 of 2 h.
pub fn refresh_delay(expires: u32) -> Duration {
    let e = u64::from(expires);
    let margin = (e / 10).max(5).min(e / 2);
    Duration::from_secs(e.saturating_sub(margin).max(1))
}

/// Picks the NOTIFY body format: the domain's configured format when it is not `auto`, else
/// what `Accept` lists (msrtc first when both are acceptable, as Lync prefers its categories),
/// PIDF when there is no `Accept` (RFC 3856 §6.2). `None`: nothing acceptable (answer 406).
pub fn negotiate(format: PresenceFormat, accept: &[MediaType<'_>]) -> Option<SipBodyKind> {
    match format {
        PresenceFormat::Pidf => return Some(SipBodyKind::Pidf),
        PresenceFormat::Msrtc => return Some(SipBodyKind::Msrtc),
        PresenceFormat::Auto => {}
    }
    if accept.is_empty() {
        return Some(SipBodyKind::Pidf);
    }
    let has = |t: &str, s: &str| accept.iter().any(|m| m.is(t, s));
    if has("application", "msrtc-event-categories+xml") {
        Some(SipBodyKind::Msrtc)
    } else if has("application", "pidf+xml") || has("application", "*") || has("*", "*") {
        Some(SipBodyKind::Pidf)
    } else {
        None
    }
}

/// The notifier's view of one subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NotifierState {
    /// Waiting for the local user's decision (RFC 6665 §4.1.2.4 `pending`).
    Pending,
    /// Approved: NOTIFYs carry presence.
    Active,
}

/// A foreign watcher's subscription to a local user.
#[derive(Debug, Clone)]
pub struct Notifier {
    pub dialog: Dialog,
    pub watcher: Address,
    pub presentity: Address,
    pub domain: Domain,
    pub state: NotifierState,
    pub format: SipBodyKind,
    pub expires_at: Instant,
    /// Last presence the core delivered for this pair (already in the domain's system);
    /// shared with the user's other watchers (see `presence::aggregate`).
    pub last: Option<Arc<PresenceBody>>,
    /// The connection the SUBSCRIBE came on (reused for NOTIFYs while it is open).
    pub conn: Option<u64>,
    /// Fingerprint of the state and body of the last NOTIFY sent on the dialog: a presence
    /// update that would send the same content again is not sent (not persisted: after a
    /// restart the first update is always sent).
    pub last_sent: Option<u64>,
    /// The earliest expiry timer queued for it, if any: a refresh that moves the expiry
    /// later queues nothing (the queued timer re-arms itself when it fires early).
    pub armed: Option<Instant>,
    /// What the state store holds for this dialog (the SIP core's persistence bookkeeping:
    /// kept here, not in a table beside `notifiers`, to cost no map entry per dialog).
    pub stored: StoreMark,
}

/// What the state store holds for one subscription: no record, a record whose content is
/// not known to match (restored but unreadable, or a write the store refused: written again
/// at the next chance), or a record written with a given fingerprint of what it says.
///
/// One word, not an enum with a payload: it keeps a `Notifier` within 320 bytes, an
/// allocator size class (one of them per foreign watcher).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreMark(u64);

impl StoreMark {
    pub const ABSENT: Self = StoreMark(0);
    pub const UNKNOWN: Self = StoreMark(1);

    /// Written with fingerprint `print` (the two values above are folded onto another).
    pub fn written(print: u64) -> Self {
        StoreMark(print.max(2))
    }
}

impl Notifier {
    /// Seconds left, for `Subscription-State: active;expires=N`.
    pub fn remaining(&self, now: Instant) -> u32 {
        u32::try_from(self.expires_at.saturating_duration_since(now).as_secs()).unwrap_or(u32::MAX)
    }

    /// The `Subscription-State` value for a NOTIFY sent now (RFC 6665 §4.1.3).
    pub fn state_header(&self, now: Instant) -> String {
        let n = self.remaining(now);
        match self.state {
            NotifierState::Pending => format!("pending;expires={n}"),
            NotifierState::Active => format!("active;expires={n}"),
        }
    }
}

/// Why a subscription ended (RFC 6665 §4.1.3 reason codes we use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TerminationReason {
    /// The subscriber unsubscribed (`Expires: 0`).
    Unsubscribed,
    /// Not refreshed in time.
    Timeout,
    /// The local user refused.
    Rejected,
    /// We are shutting the subscription down for good.
    Noresource,
    /// Ended to make room (too many dialogs for one watcher and user); the watcher may
    /// subscribe again (RFC 6665 §4.1.3).
    Deactivated,
}

impl TerminationReason {
    pub fn token(self) -> &'static str {
        match self {
            // RFC 6665 §4.1.3 has no "unsubscribed" reason: a subscriber-initiated end is
            // answered with `timeout` semantics, which tells it re-subscribing is fine.
            Self::Unsubscribed | Self::Timeout => "timeout",
            Self::Rejected => "rejected",
            Self::Noresource => "noresource",
            Self::Deactivated => "deactivated",
        }
    }
}

/// What a NOTIFY's `Subscription-State` says (RFC 6665 §4.1.3, read as RFC 8048 §5.2.2 asks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyState {
    Pending,
    Active { expires: Option<u32> },
    Terminated { reason: Option<String> },
}

impl NotifyState {
    pub fn from_header(t: &TokenParams<'_>) -> Option<Self> {
        let expires = t.param("expires").and_then(|e| e.parse().ok());
        if t.value.eq_ignore_ascii_case("active") {
            Some(NotifyState::Active { expires })
        } else if t.value.eq_ignore_ascii_case("pending") {
            Some(NotifyState::Pending)
        } else if t.value.eq_ignore_ascii_case("terminated") {
            Some(NotifyState::Terminated {
                reason: t.param("reason").map(|r| r.to_ascii_lowercase()),
            })
        } else {
            None
        }
    }
}

/// Subscriber life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriberState {
    /// SUBSCRIBE sent, no dialog yet.
    Subscribing,
    /// Dialog exists; `approved` once a NOTIFY said `active`.
    Established { approved: bool },
    /// SUBSCRIBE with `Expires: 0` sent.
    Unsubscribing,
    /// Waiting to try again after a failure.
    Retrying,
}

/// A local user's subscription to a foreign user (one per local user, requirements §3).
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub id: u64,
    pub watcher: Address,
    pub presentity: Address,
    pub domain: Domain,
    pub call_id: String,
    pub local_tag: String,
    pub cseq: u32,
    pub state: SubscriberState,
    pub dialog: Option<Dialog>,
    /// Next refresh (or retry) time.
    pub next_at: Option<Instant>,
    /// Expires to ask for next (423 raises it).
    pub expires: u32,
    pub last: Option<PresenceBody>,
    pub conn: Option<u64>,
}

/// Why a NOTIFY body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("unsupported presence body type")]
    UnsupportedType,
    #[error("unknown mapping system {0}")]
    UnknownSystem(String),
    #[error("presence body does not decode: {0}")]
    Codec(String),
}

/// A NOTIFY body → the presence of the domain's `system`; `Ok(None)` when the body carries no
/// availability (contact cards, calendar data: they must not change what the watcher sees).
pub fn decode_body(
    maps: &MappingSet,
    system: &str,
    content_type: &str,
    body: &[u8],
) -> Result<Option<PresenceBody>, BodyError> {
    let kind = SipBodyKind::from_content_type(content_type).ok_or(BodyError::UnsupportedType)?;
    let sys = maps
        .system_id(system)
        .ok_or_else(|| BodyError::UnknownSystem(system.to_owned()))?;
    let (pidf, msrtc);
    let facts = match kind {
        SipBodyKind::Pidf => {
            pidf = codec::pidf::decode_pidf(body).map_err(|e| BodyError::Codec(e.to_string()))?;
            if pidf.basic.is_none() && pidf.activities.is_empty() && pidf.show.is_none() {
                return Ok(None);
            }
            Facts::from_pidf(&pidf)
        }
        SipBodyKind::Msrtc => {
            msrtc =
                codec::msrtc::decode_msrtc(body).map_err(|e| BodyError::Codec(e.to_string()))?;
            if msrtc.availability.is_none() && msrtc.activity.is_none() {
                return Ok(None);
            }
            Facts::from_msrtc(&msrtc)
        }
    };
    let d = maps.decode(sys, &facts);
    Ok(Some(PresenceBody {
        system: Arc::from(system),
        state: maps.system(sys).state(d.state).name.clone(),
        note: d.note.map(str::to_owned),
        priority: None,
    }))
}

/// The state every system has for "not there"; used before any presence is known and for
/// polite blocking (requirements §3: a blocked watcher sees offline, nothing else).
pub const OFFLINE: &str = "offline";

/// A `PresenceBody` in `system` (the domain's) → NOTIFY body bytes. An unknown state falls back
/// to offline rather than leaking an error to the watcher.
pub fn encode_body(
    maps: &MappingSet,
    system: &str,
    presence: Option<&PresenceBody>,
    kind: SipBodyKind,
    entity: &str,
) -> Option<Vec<u8>> {
    let sys = maps.system_id(system)?;
    let s = maps.system(sys);
    let (state, note) = match presence.and_then(|p| s.state_id(&p.state).map(|id| (id, p))) {
        Some((id, p)) => (id, p.note.as_deref()),
        None => (s.state_id(OFFLINE)?, None),
    };
    let mut out = Vec::with_capacity(512);
    match kind {
        SipBodyKind::Pidf => {
            codec::pidf::encode_pidf(&maps.encode_pidf(sys, state, note, entity), &mut out)
        }
        SipBodyKind::Msrtc => {
            codec::msrtc::encode_msrtc(&maps.encode_msrtc(sys, state, note), &mut out)
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One `Notifier` is boxed per foreign watcher: past 320 bytes the allocator gives it 384
    /// (issue 11 item 10 counts every byte of a million of them).
    #[test]
    fn a_notifier_fits_the_320_byte_size_class() {
        assert!(
            std::mem::size_of::<Notifier>() <= 320,
            "{}",
            std::mem::size_of::<Notifier>()
        );
    }
    use crate::presence::map;
    use crate::sip::header::parse_accept;

    #[test]
    fn expires_bounds() {
        assert_eq!(clamp_expires(None), ExpiresDecision::Grant(3600));
        assert_eq!(clamp_expires(Some(0)), ExpiresDecision::Zero);
        assert_eq!(clamp_expires(Some(59)), ExpiresDecision::TooBrief);
        assert_eq!(clamp_expires(Some(60)), ExpiresDecision::Grant(60));
        assert_eq!(clamp_expires(Some(86_400)), ExpiresDecision::Grant(7200));
        assert_eq!(refresh_delay(3600), Duration::from_secs(3240));
        assert_eq!(refresh_delay(60), Duration::from_secs(54));
        assert_eq!(refresh_delay(6), Duration::from_secs(3));
    }

    #[test]
    fn negotiation_prefers_msrtc_for_lync() {
        let lync = parse_accept(
            "application/msrtc-event-categories+xml, application/xpidf+xml, application/pidf+xml",
        )
        .expect("accept");
        assert_eq!(
            negotiate(PresenceFormat::Auto, &lync),
            Some(SipBodyKind::Msrtc)
        );
        let pidf = parse_accept("application/pidf+xml").expect("accept");
        assert_eq!(
            negotiate(PresenceFormat::Auto, &pidf),
            Some(SipBodyKind::Pidf)
        );
        assert_eq!(
            negotiate(PresenceFormat::Auto, &[]),
            Some(SipBodyKind::Pidf)
        );
        let other = parse_accept("text/plain").expect("accept");
        assert_eq!(negotiate(PresenceFormat::Auto, &other), None);
        assert_eq!(
            negotiate(PresenceFormat::Msrtc, &other),
            Some(SipBodyKind::Msrtc)
        );
    }

    #[test]
    fn bodies_round_trip_through_the_lync_system() {
        let maps = map::embedded().expect("maps");
        let busy = PresenceBody {
            system: "lync".into(),
            state: "busy".into(),
            note: Some("Writing".into()),
            priority: None,
        };
        for kind in [SipBodyKind::Msrtc, SipBodyKind::Pidf] {
            let b = encode_body(&maps, "lync", Some(&busy), kind, "sip:alice@example.com")
                .expect("encodes");
            let back = decode_body(&maps, "lync", kind.content_type(), &b)
                .expect("decodes")
                .expect("has availability");
            assert_eq!(&*back.state, "busy", "{kind:?}");
        }
        let off = encode_body(&maps, "lync", None, SipBodyKind::Msrtc, "x").expect("encodes");
        assert!(String::from_utf8_lossy(&off).contains("<availability>18500</availability>"));
        assert_eq!(
            decode_body(&maps, "lync", "text/plain", b"x"),
            Err(BodyError::UnsupportedType)
        );
    }
}
