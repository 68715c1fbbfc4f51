//! SIP URIs ⇄ core addresses (XMPP JIDs), RFC 7247 §6.
//!
//! The core's [`Address`] is a JID: its localpart is what the home node sees. So:
//!
//! - **SIP → XMPP** (RFC 7247 §6.4): the user part is percent-decoded (RFC 3261 §19.1.4 compares
//!   unescaped), then every character a JID localpart forbids (RFC 7622 §3.3.1) is escaped as
//!   XEP-0106 §4 says ([`JID_ESCAPES`]): `sip:o'malley@x` is `o\27malley@x`. The host becomes the
//!   domainpart as it is. A GRUU (`gr` URI parameter, RFC 5627 §3.2) becomes the resource
//!   (RFC 7247 §6.3, instance-specific mapping); so does Lync's form of one, `opaque=user:epid:
//!   <id>;gruu` ([MS-SIPRE]), whose `opaque` value is the resource.
//! - **XMPP → SIP** (RFC 7247 §6.5): the reverse: XEP-0106 unescaping, then percent-encoding of
//!   what a SIP user part cannot carry (RFC 3261 §25.1 `user`); a resource becomes `;gr=`, or
//!   `;opaque=…;gruu` when it came from a Lync GRUU ([`is_lync_opaque`]), so the Lync edge
//!   routes to the endpoint it named.
//! - **`sips:` is never translated**: RFC 7247 §8 — the gateway cannot promise the end-to-end
//!   TLS a `sips:` URI demands once the request becomes XMPP; such requests are refused with 416
//!   ([`SIPS_REFUSED`]).
//! - **Case**: localparts fold to lowercase on the way in (the home node case-folds them, RFC 7622
//!   §3.3.1 UsernameCaseMapped, and so does Lync); the SIP user part built back is that folded
//!   form. Resources (GRUUs) keep their case: RFC 5627 GRUUs are case-sensitive tokens.

use crate::gateway::envelope::{Address, AddressError};
use crate::sip::uri::SipUri;

/// The SIP answer to a request naming a `sips:` URI (RFC 7247 §8).
pub const SIPS_REFUSED: (u16, &str) = (416, "Unsupported URI Scheme (SIPS Is Not Translated)");

/// XEP-0106 §4.2: the characters a JID localpart cannot carry and their escape sequences.
pub const JID_ESCAPES: &[(char, &str)] = &[
    (' ', "\\20"),
    ('"', "\\22"),
    ('&', "\\26"),
    ('\'', "\\27"),
    ('/', "\\2f"),
    (':', "\\3a"),
    ('<', "\\3c"),
    ('>', "\\3e"),
    ('@', "\\40"),
    ('\\', "\\5c"),
];

/// Why a SIP URI has no core address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("sips: URIs are not translated to XMPP (RFC 7247 §8)")]
    Sips,
    #[error("the URI has no user part")]
    NoUser,
    #[error("the user part is not valid percent-encoded UTF-8")]
    Encoding,
    #[error(transparent)]
    Address(#[from] AddressError),
}

impl UriError {
    /// The SIP answer to a request whose address cannot be read.
    pub fn sip_status(&self) -> (u16, &'static str) {
        match self {
            UriError::Sips => SIPS_REFUSED,
            UriError::NoUser => (404, "Not Found (No User)"),
            UriError::Encoding | UriError::Address(_) => (400, "Bad Request (Address)"),
        }
    }
}

/// XEP-0106 §4.3 escaping. A backslash is escaped only where it would otherwise start one of the
/// escape sequences (§4.2), so `a\b` stays `a\b` and [`unescape_localpart`] always undoes this.
pub fn escape_localpart(raw: &str) -> String {
    // Nearly every user part has nothing to escape: one scan instead of a table search per
    // character (this runs for every message and subscription).
    if !raw
        .chars()
        .any(|c| JID_ESCAPES.iter().any(|(e, _)| *e == c))
    {
        return raw.to_owned();
    }
    let mut out = String::with_capacity(raw.len());
    for (i, c) in raw.char_indices() {
        let starts_sequence = || sequence_at(raw.get(i..).unwrap_or("")).is_some();
        match JID_ESCAPES.iter().find(|(ch, _)| *ch == c) {
            Some(('\\', seq)) if starts_sequence() => out.push_str(seq),
            Some(('\\', _)) => out.push('\\'),
            Some((_, seq)) => out.push_str(seq),
            None => out.push(c),
        }
    }
    out
}

/// XEP-0106 §4.3 unescaping: each escape sequence becomes its character; other backslashes stay.
pub fn unescape_localpart(local: &str) -> String {
    let mut out = String::with_capacity(local.len());
    let mut rest = local;
    while let Some(at) = rest.find('\\') {
        out.push_str(rest.get(..at).unwrap_or(""));
        let tail = rest.get(at..).unwrap_or("");
        match sequence_at(tail) {
            Some(c) => {
                out.push(c);
                rest = tail.get(3..).unwrap_or("");
            }
            None => {
                out.push('\\');
                rest = tail.get(1..).unwrap_or("");
            }
        }
    }
    out.push_str(rest);
    out
}

/// The character whose escape sequence `s` starts with (hex digits in either case).
fn sequence_at(s: &str) -> Option<char> {
    let head = s.get(..3)?;
    JID_ESCAPES
        .iter()
        .find(|(_, seq)| head.eq_ignore_ascii_case(seq))
        .map(|(c, _)| *c)
}

/// RFC 3986 §2.1 percent-decoding into UTF-8 (borrowed when there is nothing to decode).
fn percent_decode(s: &str) -> Result<std::borrow::Cow<'_, str>, UriError> {
    if !s.contains('%') {
        return Ok(s.into());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or(UriError::Encoding)?;
            let hex = std::str::from_utf8(hex).map_err(|_| UriError::Encoding)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| UriError::Encoding)?);
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map(Into::into)
        .map_err(|_| UriError::Encoding)
}

/// Percent-encodes every byte of `s` not in `keep` (plus ASCII alphanumerics).
fn percent_encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || keep.contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// RFC 3261 §25.1 `user`: unreserved (mark) and user-unreserved characters stay as they are.
/// `;`, `?` and `/` are allowed there too but are encoded: peers split URIs on them.
const SIP_USER_KEEP: &[u8] = b"-_.!~*'()&=+$,";
/// RFC 3261 §25.1 `paramchar` (param-unreserved and unreserved).
const SIP_PARAM_KEEP: &[u8] = b"-_.!~*'()[]/:&+$";

/// The core address of a SIP URI's user at its host (no resource): the form subscriptions
/// and directory keys use.
pub fn address_of_sip(uri: &SipUri<'_>) -> Result<Address, UriError> {
    if uri.is_secure() {
        return Err(UriError::Sips);
    }
    let user = uri
        .user()
        .filter(|u| !u.is_empty())
        .ok_or(UriError::NoUser)?;
    let local = escape_localpart(&percent_decode(user)?);
    let host = uri.host().as_str();
    // Assembled by hand (one allocation, no formatting machinery): once per message.
    let mut jid = String::with_capacity(local.len() + 1 + host.len());
    jid.push_str(&local);
    jid.push('@');
    jid.push_str(host);
    Ok(Address::parse(&jid)?)
}

/// [`address_of_sip`] plus the GRUU: a `gr` parameter with a value becomes the resource
/// (RFC 7247 §6.3, RFC 5627 §3.2). A `gr` flag without value (a temporary GRUU) names no
/// instance the XMPP side could address again, so it is ignored. Lync and Skype for Business
/// write their GRUUs as `opaque=user:epid:<id>;gruu` ([MS-SIPRE]): with the `gruu` flag,
/// the `opaque` value is the instance.
pub fn instance_of_sip(uri: &SipUri<'_>) -> Result<Address, UriError> {
    let mut a = address_of_sip(uri)?;
    let instance = match uri.param("gr") {
        Some(Some(gr)) => Some(gr),
        _ if uri.param("gruu").is_some() => uri.param("opaque").flatten(),
        _ => None,
    };
    if let Some(gr) = instance {
        let gr = percent_decode(gr)?;
        if !gr.is_empty() {
            // Checked as a whole JID so the resource meets the same rules as any other.
            a = Address::parse(&format!("{}/{gr}", a.bare_string()))?;
        }
    }
    Ok(a)
}

/// Whether a resource is the `opaque` value of a Lync GRUU (`user:epid:<id>` for a user's
/// endpoint, `app:…` for a server application, [MS-SIPRE]) rather than an RFC 5627 `gr`
/// value: such a resource goes back to SIP in the form the Lync edge routes on.
pub fn is_lync_opaque(resource: &str) -> bool {
    resource.starts_with("user:epid:") || resource.starts_with("app:")
}

/// The SIP user part of a core address: XEP-0106 unescaped, then percent-encoded (RFC 7247 §6.5).
pub fn sip_user_of(a: &Address) -> String {
    percent_encode(&unescape_localpart(&a.local), SIP_USER_KEEP)
}

/// `sip:user@domain`, the address of record (no GRUU).
pub fn sip_aor_of(a: &Address) -> String {
    format!("sip:{}@{}", sip_user_of(a), a.domain)
}

/// `sip:user@domain[;gr=resource]`: the instance when the address names one (RFC 7247 §6.3).
pub fn sip_uri_of(a: &Address) -> String {
    match &a.resource {
        Some(r) if is_lync_opaque(r) => format!(
            "{};opaque={};gruu",
            sip_aor_of(a),
            percent_encode(r, SIP_PARAM_KEEP)
        ),
        Some(r) => format!("{};gr={}", sip_aor_of(a), percent_encode(r, SIP_PARAM_KEEP)),
        None => sip_aor_of(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::uri::{parse_uri, UriContext};

    fn sip(uri: &str) -> Result<Address, UriError> {
        let u = parse_uri(uri, UriContext::NameAddr).expect("a URI");
        instance_of_sip(u.as_sip().expect("a SIP URI"))
    }

    /// One row per XEP-0106 escape, through a SIP URI and back.
    #[test]
    fn each_escape_row_round_trips_through_sip() {
        let cases = [
            ("sip:o'malley@partner.test", "o\\27malley@partner.test"),
            ("sip:a%20b@partner.test", "a\\20b@partner.test"),
            ("sip:a%22b@partner.test", "a\\22b@partner.test"),
            ("sip:a&b@partner.test", "a\\26b@partner.test"),
            ("sip:a%2Fb@partner.test", "a\\2fb@partner.test"),
            ("sip:a%3Ab@partner.test", "a\\3ab@partner.test"),
            ("sip:a%3Cb@partner.test", "a\\3cb@partner.test"),
            ("sip:a%3Eb@partner.test", "a\\3eb@partner.test"),
            ("sip:a%40b@partner.test", "a\\40b@partner.test"),
            ("sip:a%5C27b@partner.test", "a\\5c27b@partner.test"),
        ];
        assert_eq!(cases.len(), JID_ESCAPES.len());
        for (uri, jid) in cases {
            let a = sip(uri).expect(uri);
            assert_eq!(a.to_string(), jid, "{uri}");
            let back = sip_uri_of(&a);
            assert_eq!(sip(&back).expect("again"), a, "{uri} → {back}");
        }
        assert_eq!(
            sip_uri_of(&Address::parse("o\\27malley@partner.test").expect("jid")),
            "sip:o'malley@partner.test"
        );
    }

    #[test]
    fn percent_decoding_and_utf8() {
        assert_eq!(
            sip("sip:j%C3%BCrgen@partner.test").expect("utf-8").local,
            "jürgen"
        );
        assert_eq!(
            sip_uri_of(&Address::parse("jürgen@partner.test").expect("jid")),
            "sip:j%C3%BCrgen@partner.test"
        );
        // Bad escapes are the URI parser's to refuse; what it lets through that is not UTF-8
        // or is a control character is refused here.
        assert!(parse_uri("sip:a%ZZ@x.test", UriContext::NameAddr).is_err());
        for bad in ["sip:a%C3@x.test", "sip:a%00@x.test", "sip:a%FF%FE@x.test"] {
            assert!(sip(bad).is_err(), "{bad}");
        }
        // A lone backslash is no escape sequence: kept, and kept on the way back.
        let a = sip("sip:a%5Cb@x.test").expect("backslash");
        assert_eq!(a.local, "a\\b");
        assert_eq!(sip_uri_of(&a), "sip:a%5Cb@x.test");
    }

    #[test]
    fn case_folds_in_the_localpart_but_not_in_the_gruu() {
        let a = sip("sip:O'Malley@Partner.Test;gr=urn:uuid:ABC").expect("ok");
        assert_eq!(a.to_string(), "o\\27malley@partner.test/urn:uuid:ABC");
    }

    #[test]
    fn a_lync_opaque_gruu_is_the_resource_both_ways() {
        let uri = "sip:alice@contoso.test;opaque=user:epid:AbCdEf01gHiJkLmNo_pqRsAA;gruu";
        let a = sip(uri).expect("lync gruu");
        assert_eq!(
            a.resource.as_deref(),
            Some("user:epid:AbCdEf01gHiJkLmNo_pqRsAA")
        );
        assert_eq!(sip_uri_of(&a), uri);
        assert_eq!(sip(&sip_uri_of(&a)).expect("back"), a);
        // `opaque` without the `gruu` flag is some other parameter, not an instance.
        let plain = sip("sip:alice@contoso.test;opaque=user:epid:X").expect("plain");
        assert_eq!(plain.resource, None);
        // `gr` wins when both are there (an RFC 5627 GRUU is the standard form).
        let both =
            sip("sip:alice@contoso.test;gr=urn:uuid:1;opaque=user:epid:X;gruu").expect("both");
        assert_eq!(both.resource.as_deref(), Some("urn:uuid:1"));
        // An application instance keeps Lync's form too; other resources use `gr`.
        let app = sip("sip:conf@contoso.test;opaque=app:conf:focus:id:K2;gruu").expect("app");
        assert_eq!(
            sip_uri_of(&app),
            "sip:conf@contoso.test;opaque=app:conf:focus:id:K2;gruu"
        );
        let mut xmpp = Address::parse("alice@contoso.test").expect("jid");
        xmpp.resource = Some("laptop".into());
        assert_eq!(sip_uri_of(&xmpp), "sip:alice@contoso.test;gr=laptop");
    }

    #[test]
    fn gruu_is_the_resource_both_ways() {
        let a = sip("sip:bob@partner.test;gr=urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6")
            .expect("gruu");
        assert_eq!(
            a.resource.as_deref(),
            Some("urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6")
        );
        assert_eq!(
            sip_uri_of(&a),
            "sip:bob@partner.test;gr=urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6"
        );
        assert_eq!(sip_aor_of(&a), "sip:bob@partner.test");
        // A temporary GRUU (flag) names no instance.
        assert_eq!(sip("sip:bob@partner.test;gr").expect("flag").resource, None);
        // A resource with characters a parameter cannot carry is percent-encoded.
        let mut b = Address::parse("bob@partner.test").expect("jid");
        b.resource = Some("desk top;1".into());
        assert_eq!(sip_uri_of(&b), "sip:bob@partner.test;gr=desk%20top%3B1");
        assert_eq!(sip(&sip_uri_of(&b)).expect("back"), b);
        // The subscription form drops it.
        let u = parse_uri("sip:bob@partner.test;gr=x", UriContext::NameAddr).expect("uri");
        assert_eq!(
            address_of_sip(u.as_sip().expect("sip"))
                .expect("ok")
                .resource,
            None
        );
    }

    #[test]
    fn sips_is_never_translated() {
        assert_eq!(sip("sips:bob@partner.test"), Err(UriError::Sips));
        assert_eq!(UriError::Sips.sip_status().0, 416);
        assert_eq!(sip("sip:partner.test"), Err(UriError::NoUser));
    }

    /// XEP-0106 escaping is undone by unescaping for every string; for the characters a SIP
    /// user part may name, SIP → address → SIP → address is the identity.
    #[test]
    fn escape_round_trips_property() {
        use proptest::prelude::*;
        proptest!(|(s in "\\PC{1,16}")| {
            prop_assert_eq!(unescape_localpart(&escape_localpart(&s)), s);
        });
        proptest!(|(s in "[a-z0-9 '\"&/:<>@\\\\_.%]{1,24}")| {
            let a = Address::parse(&format!("{}@x.test", escape_localpart(&s)))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(unescape_localpart(&a.local), s.clone());
            let uri = sip_uri_of(&a);
            prop_assert_eq!(sip(&uri).map_err(|e| TestCaseError::fail(e.to_string()))?, a);
        });
    }
}
