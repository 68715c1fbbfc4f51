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

/// A point in time as nanoseconds since a process-wide epoch: 8 bytes where an `Instant` is
/// 16 and an `Option<Instant>` 16 again. A `Notifier` holds two of them, one per foreign
/// watcher (issue 11 item 10); the conversions are exact (an `Instant` counts nanoseconds),
/// so a deadline kept as a `Mono` fires at the very instant it was set for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mono(u64);

impl Mono {
    /// "No time": later than any time converted (see [`Mono::of`]).
    pub const NEVER: Mono = Mono(u64::MAX);

    /// The epoch: the first conversion, less a year where the platform's clock can go back
    /// that far (on Linux it always can), so that instants taken a little before the first
    /// conversion (a caller's `now`) still convert exactly. 584 years of nanoseconds fit.
    fn epoch() -> Instant {
        static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *EPOCH.get_or_init(|| {
            let now = Instant::now();
            now.checked_sub(Duration::from_secs(365 * 86_400))
                .unwrap_or(now)
        })
    }

    /// `t` as a `Mono`; an instant before the epoch (none on Linux) is the epoch, and one
    /// past 584 years of it the last time before `NEVER`.
    pub fn of(t: Instant) -> Mono {
        let ns = t.saturating_duration_since(Self::epoch()).as_nanos();
        Mono(u64::try_from(ns).unwrap_or(u64::MAX).min(u64::MAX - 1))
    }

    /// The instant this stands for (`NEVER`: 584 years on, never reached).
    pub fn instant(self) -> Instant {
        let e = Self::epoch();
        e.checked_add(Duration::from_nanos(self.0)).unwrap_or(e)
    }
}

/// A foreign watcher and the local user it watches, both bare (a SIP address of record has
/// no resource; a GRUU is not kept for a watcher): the two localparts in one allocation,
/// cut at an offset, and the two shared domains. 56 bytes and one allocation, where two
/// `Address`es are 128 bytes and two allocations (issue 11 item 10: one per foreign watcher).
#[derive(Clone, PartialEq, Eq)]
pub struct Parties {
    locals: Box<str>,
    cut: u32,
    watcher_domain: Domain,
    presentity_domain: Domain,
}

impl Parties {
    /// The bare forms of `watcher` and `presentity` (resources are dropped: a notifier's
    /// addresses come from SIP URIs without GRUU, and records keep bare addresses).
    pub fn new(watcher: &Address, presentity: &Address) -> Self {
        let mut locals = String::with_capacity(watcher.local.len() + presentity.local.len());
        locals.push_str(&watcher.local);
        locals.push_str(&presentity.local);
        Parties {
            locals: locals.into_boxed_str(),
            // A localpart is at most 1023 bytes (`Address::parse`).
            cut: u32::try_from(watcher.local.len()).unwrap_or(u32::MAX),
            watcher_domain: watcher.domain.clone(),
            presentity_domain: presentity.domain.clone(),
        }
    }

    fn cut(&self) -> usize {
        (self.cut as usize).min(self.locals.len())
    }

    pub fn watcher_local(&self) -> &str {
        self.locals.get(..self.cut()).unwrap_or_default()
    }

    pub fn presentity_local(&self) -> &str {
        self.locals.get(self.cut()..).unwrap_or_default()
    }

    /// The watcher's domain: the foreign domain the subscription came from (the SIP core
    /// accepts a SUBSCRIBE only from the domain of its From URI, see `Core::permit`).
    pub fn watcher_domain(&self) -> &Domain {
        &self.watcher_domain
    }

    pub fn presentity_domain(&self) -> &Domain {
        &self.presentity_domain
    }

    /// The watcher as an `Address` (allocates its localpart).
    pub fn watcher(&self) -> Address {
        Address {
            local: self.watcher_local().to_owned(),
            domain: self.watcher_domain.clone(),
            resource: None,
        }
    }

    /// The local user as an `Address` (allocates its localpart).
    pub fn presentity(&self) -> Address {
        Address {
            local: self.presentity_local().to_owned(),
            domain: self.presentity_domain.clone(),
            resource: None,
        }
    }

    /// `local@domain` of the watcher.
    pub fn watcher_bare(&self) -> String {
        format!("{}@{}", self.watcher_local(), self.watcher_domain)
    }

    /// `local@domain` of the local user.
    pub fn presentity_bare(&self) -> String {
        format!("{}@{}", self.presentity_local(), self.presentity_domain)
    }

    /// (watcher, user) as bare strings: the key of the pair index.
    pub fn pair(&self) -> (String, String) {
        (self.watcher_bare(), self.presentity_bare())
    }
}

impl std::fmt::Debug for Parties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parties")
            .field("watcher", &self.watcher_bare())
            .field("presentity", &self.presentity_bare())
            .finish()
    }
}

/// A foreign watcher's subscription to a local user.
///
/// One is boxed per foreign watcher (a million at most, issue 11 item 10), so it is kept
/// within 192 bytes, an allocator size class: times as [`Mono`], the connection and the last
/// NOTIFY's fingerprint as plain words with a reserved "none" value, the two addresses as
/// [`Parties`], and no domain of its own (the watcher's domain is the peer's).
#[derive(Debug, Clone)]
pub struct Notifier {
    pub dialog: Dialog,
    /// The watcher and the watched local user.
    pub parties: Parties,
    pub state: NotifierState,
    pub format: SipBodyKind,
    pub expires_at: Mono,
    /// Last presence the core delivered for this pair (already in the domain's system);
    /// shared with the user's other watchers (see `presence::aggregate`).
    pub last: Option<Arc<PresenceBody>>,
    /// The connection the SUBSCRIBE came on (reused for NOTIFYs while it is open); see
    /// [`Notifier::conn`].
    conn: u64,
    /// Fingerprint of the state and body of the last NOTIFY sent on the dialog, 0 for none:
    /// a presence update that would send the same content again is not sent (not persisted:
    /// after a restart the first update is always sent).
    last_sent: u64,
    /// The earliest expiry timer queued for it (`Mono::NEVER`: none): a refresh that moves
    /// the expiry later queues nothing (the queued timer re-arms itself when it fires early).
    pub armed: Mono,
    /// What the state store holds for this dialog (the SIP core's persistence bookkeeping:
    /// kept here, not in a table beside `notifiers`, to cost no map entry per dialog).
    pub stored: StoreMark,
}

/// `Notifier::conn` when there is no connection: connection numbers count up from 0 and
/// never reach it.
const NO_CONN: u64 = u64::MAX;

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
    /// A new subscription of `parties` in `dialog`, on connection `conn`, nothing sent yet,
    /// no timer queued, no record stored.
    pub fn new(
        dialog: Dialog,
        parties: Parties,
        state: NotifierState,
        format: SipBodyKind,
        expires_at: Instant,
        last: Option<Arc<PresenceBody>>,
        conn: Option<u64>,
    ) -> Self {
        Notifier {
            dialog,
            parties,
            state,
            format,
            expires_at: Mono::of(expires_at),
            last,
            conn: conn.unwrap_or(NO_CONN),
            last_sent: 0,
            armed: Mono::NEVER,
            stored: StoreMark::ABSENT,
        }
    }

    /// The foreign domain the subscription came from (always the watcher's: see
    /// [`Parties::watcher_domain`]).
    pub fn domain(&self) -> &Domain {
        self.parties.watcher_domain()
    }

    /// The connection the SUBSCRIBE (or its last refresh) came on, if any.
    pub fn conn(&self) -> Option<u64> {
        (self.conn != NO_CONN).then_some(self.conn)
    }

    pub fn set_conn(&mut self, conn: Option<u64>) {
        self.conn = conn.unwrap_or(NO_CONN);
    }

    /// Whether the last NOTIFY sent had fingerprint `print`.
    pub fn last_sent_is(&self, print: u64) -> bool {
        self.last_sent != 0 && self.last_sent == Self::sent_mark(print)
    }

    /// Records the fingerprint of the NOTIFY being sent.
    pub fn set_last_sent(&mut self, print: u64) {
        self.last_sent = Self::sent_mark(print);
    }

    /// A fingerprint with 0 (the "none" value) folded onto 1.
    fn sent_mark(print: u64) -> u64 {
        print.max(1)
    }

    /// Seconds left, for `Subscription-State: active;expires=N`.
    pub fn remaining(&self, now: Instant) -> u32 {
        u32::try_from(
            self.expires_at
                .instant()
                .saturating_duration_since(now)
                .as_secs(),
        )
        .unwrap_or(u32::MAX)
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

    /// One `Notifier` is boxed per foreign watcher: past 192 bytes the allocator gives it 224
    /// (issue 11 item 10 counts every byte of a million of them).
    #[test]
    fn a_notifier_fits_the_192_byte_size_class() {
        assert!(
            std::mem::size_of::<Notifier>() <= 192,
            "{}",
            std::mem::size_of::<Notifier>()
        );
        assert_eq!(std::mem::size_of::<Parties>(), 56);
        assert_eq!(std::mem::size_of::<Mono>(), 8);
    }

    #[test]
    fn mono_times_convert_exactly_and_keep_their_order() {
        let t0 = Instant::now();
        for d in [0, 1, 999_999_999, 3_600_000_000_123] {
            let t = t0 + Duration::from_nanos(d);
            assert_eq!(Mono::of(t).instant(), t, "{d} ns");
        }
        assert!(Mono::of(t0) < Mono::of(t0 + Duration::from_nanos(1)));
        assert!(Mono::of(t0 + Duration::from_secs(86_400 * 365 * 100)) < Mono::NEVER);
    }

    #[test]
    fn parties_keep_both_bare_addresses() {
        let w = Address::parse("o\\27malley@partner.test/ignored").expect("watcher");
        let u = Address::parse("alice@example.com").expect("user");
        let p = Parties::new(&w, &u);
        assert_eq!(p.watcher_local(), w.local);
        assert_eq!(p.presentity_local(), "alice");
        assert_eq!(
            p.watcher(),
            Address {
                resource: None,
                ..w.clone()
            }
        );
        assert_eq!(p.presentity(), u);
        assert_eq!(p.pair(), (w.bare_string(), u.bare_string()));
        assert_eq!(p.watcher_domain().as_str(), "partner.test");
    }

    #[test]
    fn a_notifier_keeps_none_apart_from_every_connection_and_fingerprint() {
        let d = Dialog::new(
            super::super::dialog::DialogId::new("c", "l", "r"),
            "sip:u@example.com",
            "sip:w@partner.test",
            "sip:w@192.0.2.1",
            Vec::new(),
            1,
            None,
        );
        let a = |s: &str| Address::parse(s).expect("address");
        let mut n = Notifier::new(
            d,
            Parties::new(&a("w@partner.test"), &a("u@example.com")),
            NotifierState::Pending,
            SipBodyKind::Pidf,
            Instant::now(),
            None,
            Some(0),
        );
        assert_eq!(n.conn(), Some(0));
        n.set_conn(None);
        assert_eq!(n.conn(), None);
        assert!(!n.last_sent_is(0) && !n.last_sent_is(7));
        n.set_last_sent(0);
        assert!(n.last_sent_is(0));
        n.set_last_sent(7);
        assert!(n.last_sent_is(7) && !n.last_sent_is(0));
        assert_eq!(n.armed, Mono::NEVER);
        assert_eq!(n.domain().as_str(), "partner.test");
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
