//! Error mapping between XMPP and SIP, RFC 7247 §7: one const row per line of the RFC's two
//! tables, so a reader can hold this file next to the RFC and tick the rows off.
//!
//! - [`XMPP_TO_SIP`] (RFC 7247 §7.1): the SIP final response a gateway sends when the XMPP side
//!   refused what a SIP peer asked for.
//! - [`SIP_TO_XMPP`] (RFC 7247 §7.2): the stanza error condition a gateway sends when a SIP peer
//!   refused what an XMPP entity asked for. Specific codes first, then the class rows (`4xx`,
//!   `5xx`, `6xx`) that catch every code the table does not name.
//!
//! Where the RFC offers a choice, the row says which one we take and why (`note`).

use crate::xmpp::error::StanzaErrorCondition as C;

/// One line of RFC 7247 §7.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XmppToSip {
    pub condition: C,
    pub status: u16,
    pub reason: &'static str,
    /// Why this choice, where the RFC leaves one.
    pub note: &'static str,
}

const fn x2s(condition: C, status: u16, reason: &'static str) -> XmppToSip {
    XmppToSip {
        condition,
        status,
        reason,
        note: "",
    }
}

/// RFC 7247 §7.1: XMPP stanza error condition → SIP response code. Every condition of RFC 6120
/// §8.3.3 has exactly one row (checked by a test).
pub const XMPP_TO_SIP: &[XmppToSip] = &[
    x2s(C::BadRequest, 400, "Bad Request"),
    x2s(C::Conflict, 400, "Bad Request"),
    XmppToSip {
        condition: C::FeatureNotImplemented,
        status: 501,
        reason: "Not Implemented",
        // The RFC's "405 or 501": 405 only when the missing feature is the SIP method itself;
        // a gateway relays messages and subscriptions whose methods it does implement.
        note: "405 or 501: 501, the SIP method is never the missing feature here",
    },
    x2s(C::Forbidden, 403, "Forbidden"),
    XmppToSip {
        condition: C::Gone,
        status: 410,
        reason: "Gone",
        // 301 needs the new address in a Contact; the core does not carry it.
        note: "301 or 410: 410, the new address is not carried",
    },
    x2s(C::InternalServerError, 500, "Server Internal Error"),
    x2s(C::ItemNotFound, 404, "Not Found"),
    x2s(C::JidMalformed, 400, "Bad Request"),
    x2s(C::NotAcceptable, 406, "Not Acceptable"),
    x2s(C::NotAllowed, 403, "Forbidden"),
    x2s(C::NotAuthorized, 401, "Unauthorized"),
    x2s(C::PolicyViolation, 403, "Forbidden"),
    x2s(C::RecipientUnavailable, 480, "Temporarily Unavailable"),
    x2s(C::Redirect, 302, "Moved Temporarily"),
    x2s(C::RegistrationRequired, 400, "Bad Request"),
    x2s(C::RemoteServerNotFound, 404, "Not Found"),
    x2s(C::RemoteServerTimeout, 408, "Request Timeout"),
    x2s(C::ResourceConstraint, 500, "Server Internal Error"),
    x2s(C::ServiceUnavailable, 503, "Service Unavailable"),
    x2s(C::SubscriptionRequired, 400, "Bad Request"),
    x2s(C::UndefinedCondition, 400, "Bad Request"),
    XmppToSip {
        condition: C::UnexpectedRequest,
        status: 400,
        reason: "Bad Request",
        // 491 means an INVITE/UPDATE glare (RFC 3261 §14.2); no XMPP error reports that.
        note: "491 or 400: 400, 491 is the SIP glare answer and no XMPP error means glare",
    },
];

/// Which SIP responses a §7.2 row matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Exactly this code.
    Code(u16),
    /// Every code of the class (`Class(4)` is `4xx`) no `Code` row names.
    Class(u16),
}

/// One line of RFC 7247 §7.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SipToXmpp {
    pub status: Status,
    pub condition: C,
}

const fn s2x(code: u16, condition: C) -> SipToXmpp {
    SipToXmpp {
        status: Status::Code(code),
        condition,
    }
}

const fn class(class: u16, condition: C) -> SipToXmpp {
    SipToXmpp {
        status: Status::Class(class),
        condition,
    }
}

/// RFC 7247 §7.2: SIP response code → XMPP stanza error condition.
pub const SIP_TO_XMPP: &[SipToXmpp] = &[
    class(3, C::Redirect),
    s2x(400, C::BadRequest),
    s2x(401, C::NotAuthorized),
    s2x(402, C::BadRequest),
    s2x(403, C::Forbidden),
    s2x(404, C::ItemNotFound),
    s2x(405, C::FeatureNotImplemented),
    s2x(406, C::NotAcceptable),
    s2x(407, C::NotAuthorized),
    s2x(408, C::RemoteServerTimeout),
    s2x(410, C::Gone),
    s2x(413, C::PolicyViolation),
    s2x(414, C::PolicyViolation),
    s2x(415, C::NotAcceptable),
    s2x(416, C::JidMalformed),
    s2x(420, C::FeatureNotImplemented),
    s2x(421, C::NotAcceptable),
    s2x(423, C::ResourceConstraint),
    s2x(480, C::RecipientUnavailable),
    s2x(481, C::ItemNotFound),
    s2x(482, C::NotAcceptable),
    s2x(483, C::NotAcceptable),
    s2x(484, C::ItemNotFound),
    s2x(485, C::ItemNotFound),
    s2x(486, C::RecipientUnavailable),
    s2x(487, C::ServiceUnavailable),
    s2x(488, C::NotAcceptable),
    s2x(491, C::UnexpectedRequest),
    s2x(493, C::ServiceUnavailable),
    class(4, C::ServiceUnavailable),
    s2x(500, C::InternalServerError),
    s2x(501, C::FeatureNotImplemented),
    s2x(502, C::RemoteServerNotFound),
    s2x(503, C::ServiceUnavailable),
    s2x(504, C::RemoteServerTimeout),
    s2x(505, C::NotAcceptable),
    s2x(513, C::PolicyViolation),
    class(5, C::InternalServerError),
    s2x(600, C::ServiceUnavailable),
    s2x(603, C::ServiceUnavailable),
    s2x(604, C::ItemNotFound),
    s2x(606, C::NotAcceptable),
    class(6, C::ServiceUnavailable),
];

/// The SIP final response for an XMPP error condition (RFC 7247 §7.1).
pub fn sip_status_of(condition: C) -> (u16, &'static str) {
    XMPP_TO_SIP
        .iter()
        .find(|r| r.condition == condition)
        .map_or((500, "Server Internal Error"), |r| (r.status, r.reason))
}

/// The XMPP error condition for a SIP final response (RFC 7247 §7.2): the code's own row, else
/// its class row. Codes outside 3xx–6xx are not failures; they map to `undefined-condition` so a
/// caller that got one anyway still sends a well-formed error.
pub fn condition_of_status(code: u16) -> C {
    SIP_TO_XMPP
        .iter()
        .find(|r| r.status == Status::Code(code))
        .or_else(|| {
            SIP_TO_XMPP
                .iter()
                .find(|r| r.status == Status::Class(code / 100))
        })
        .map_or(C::UndefinedCondition, |r| r.condition)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each row of §7.1, written out again by hand: a table edit that changes a row fails here.
    #[test]
    fn xmpp_to_sip_rows() {
        let rows: &[(&str, u16)] = &[
            ("bad-request", 400),
            ("conflict", 400),
            ("feature-not-implemented", 501),
            ("forbidden", 403),
            ("gone", 410),
            ("internal-server-error", 500),
            ("item-not-found", 404),
            ("jid-malformed", 400),
            ("not-acceptable", 406),
            ("not-allowed", 403),
            ("not-authorized", 401),
            ("policy-violation", 403),
            ("recipient-unavailable", 480),
            ("redirect", 302),
            ("registration-required", 400),
            ("remote-server-not-found", 404),
            ("remote-server-timeout", 408),
            ("resource-constraint", 500),
            ("service-unavailable", 503),
            ("subscription-required", 400),
            ("undefined-condition", 400),
            ("unexpected-request", 400),
        ];
        for (name, code) in rows {
            let c = C::from_name(name).expect("an RFC 6120 condition");
            assert_eq!(sip_status_of(c).0, *code, "{name}");
        }
        // Every condition has exactly one row.
        assert_eq!(XMPP_TO_SIP.len(), C::ALL.len());
        for c in C::ALL {
            assert_eq!(
                XMPP_TO_SIP.iter().filter(|r| r.condition == *c).count(),
                1,
                "{c}"
            );
        }
    }

    /// Each row of §7.2, by hand; class rows checked with a code no specific row names.
    #[test]
    fn sip_to_xmpp_rows() {
        let rows: &[(u16, &str)] = &[
            (300, "redirect"),
            (301, "redirect"),
            (302, "redirect"),
            (380, "redirect"),
            (400, "bad-request"),
            (401, "not-authorized"),
            (402, "bad-request"),
            (403, "forbidden"),
            (404, "item-not-found"),
            (405, "feature-not-implemented"),
            (406, "not-acceptable"),
            (407, "not-authorized"),
            (408, "remote-server-timeout"),
            (410, "gone"),
            (413, "policy-violation"),
            (414, "policy-violation"),
            (415, "not-acceptable"),
            (416, "jid-malformed"),
            (420, "feature-not-implemented"),
            (421, "not-acceptable"),
            (423, "resource-constraint"),
            (480, "recipient-unavailable"),
            (481, "item-not-found"),
            (482, "not-acceptable"),
            (483, "not-acceptable"),
            (484, "item-not-found"),
            (485, "item-not-found"),
            (486, "recipient-unavailable"),
            (487, "service-unavailable"),
            (488, "not-acceptable"),
            (491, "unexpected-request"),
            (493, "service-unavailable"),
            (409, "service-unavailable"),
            (422, "service-unavailable"),
            (499, "service-unavailable"),
            (500, "internal-server-error"),
            (501, "feature-not-implemented"),
            (502, "remote-server-not-found"),
            (503, "service-unavailable"),
            (504, "remote-server-timeout"),
            (505, "not-acceptable"),
            (513, "policy-violation"),
            (580, "internal-server-error"),
            (600, "service-unavailable"),
            (603, "service-unavailable"),
            (604, "item-not-found"),
            (606, "not-acceptable"),
            (699, "service-unavailable"),
        ];
        for (code, name) in rows {
            assert_eq!(condition_of_status(*code).as_str(), *name, "{code}");
        }
        // Every specific row is reachable (no class row shadows it) and named once.
        for r in SIP_TO_XMPP {
            if let Status::Code(code) = r.status {
                assert_eq!(condition_of_status(code), r.condition, "{code}");
                let n = SIP_TO_XMPP.iter().filter(|o| o.status == r.status).count();
                assert_eq!(n, 1, "{code}");
            }
        }
        assert_eq!(condition_of_status(200), C::UndefinedCondition);
    }

    /// The round trip the RFC's tables allow: a condition sent to SIP and answered back with
    /// the same status lands on a condition with the same SIP status.
    #[test]
    fn tables_agree_on_the_status_they_share() {
        for r in XMPP_TO_SIP {
            let back = condition_of_status(r.status);
            assert_eq!(sip_status_of(back).0, r.status, "{}", r.condition);
        }
    }
}
