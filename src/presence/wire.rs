//! Protocol-level presence facts: what a codec reads off the wire and what it writes back,
//! before any system (lync, webex, ...) gives them a meaning. The mapping files under
//! `mappings/systems/` turn these facts into a system's state and back; codecs never decide
//! what a state *means*.

/// XMPP `<show/>` values (RFC 6121 §4.7.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Show {
    Chat,
    Away,
    Xa,
    Dnd,
}

impl Show {
    pub fn as_str(self) -> &'static str {
        match self {
            Show::Chat => "chat",
            Show::Away => "away",
            Show::Xa => "xa",
            Show::Dnd => "dnd",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "chat" => Some(Show::Chat),
            "away" => Some(Show::Away),
            "xa" => Some(Show::Xa),
            "dnd" => Some(Show::Dnd),
            _ => None,
        }
    }
}

/// An XMPP presence broadcast (not subscription management): `type` absent or `unavailable`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct XmppPresence {
    /// `type="unavailable"`.
    pub unavailable: bool,
    /// `<show/>`; `None` means plain available.
    pub show: Option<Show>,
    /// `<status/>` text (the first one without `xml:lang`, else the first one).
    pub status: Option<String>,
    /// `<priority/>`, -128..=127; `None` when absent.
    pub priority: Option<i8>,
}

/// PIDF `<basic/>` (RFC 3863 §4.1.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basic {
    Open,
    Closed,
}

/// A PIDF document reduced to what presence interworking uses (RFC 3863, RFC 4480, RFC 8048).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PidfPresence {
    /// `pres:` URI of the presentity (`entity` attribute).
    pub entity: String,
    /// Aggregated basic status: open when any tuple is open (RFC 8048 §4.3).
    pub basic: Option<Basic>,
    /// RPID `<activities/>` child element local names, in document order (`away`, `busy`,
    /// `on-the-phone`, `meeting`, `unknown`, ...). `<rpid:other>` text is carried as `other:TEXT`.
    pub activities: Vec<String>,
    /// The XMPP `<show/>` value embedded per RFC 8048 §4.3 (namespace `jabber:client`), if any.
    pub show: Option<Show>,
    /// The first presentity- or tuple-level `<note/>` (no `xml:lang` preferred).
    pub note: Option<String>,
}

/// The Microsoft `state` category (msrtc-event-categories / MS-PRES), reduced to what presence
/// interworking uses. Several `state` instances may be present; the codec picks the one that
/// decides the user's availability (aggregateState first, then the highest availability).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MsrtcPresence {
    /// `<availability>` number, if any state instance carries one.
    pub availability: Option<u32>,
    /// `<activity token="..."/>` of the same state instance.
    pub activity: Option<String>,
    /// Personal note (`note` category, `<body>` of the `personal` note), if present.
    pub note: Option<String>,
}
