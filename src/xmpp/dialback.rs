//! Server dialback: XEP-0185 keys and the XEP-0220 `<db:result/>` / `<db:verify/>` elements.
//!
//! Pure functions and value types; the negotiation machine decides when to send what. Keys are
//! derived statelessly (XEP-0185 §3) so any node of a cluster can verify a key another node
//! generated, given the shared secret.

use ring::hmac;

use super::error::{parse_stanza_error, StanzaErrorCondition, NS_STANZAS_ERRORS};
use super::stanza::{root_text, Stanza, NS_DIALBACK};

/// Longest key we accept from a peer: XEP-0185 keys are 64 hex digits; be lenient, but bounded.
pub const MAX_KEY_LEN: usize = 512;

/// XEP-0185 §3: `HMAC-SHA256(key = hex(SHA-256(secret)), text = "receiving originating id")`,
/// lowercase hex. The HMAC key is the *hex string* of the digest, not the raw 32 bytes (using the
/// raw digest is a known interoperability bug).
pub fn dialback_key(secret: &str, receiving: &str, originating: &str, stream_id: &str) -> String {
    let secret_hex = hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        secret.as_bytes(),
    ));
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret_hex.as_bytes());
    let msg = format!("{receiving} {originating} {stream_id}");
    hex::encode(hmac::sign(&key, msg.as_bytes()))
}

/// Checks a received key in constant time.
pub fn verify_key(
    secret: &str,
    receiving: &str,
    originating: &str,
    stream_id: &str,
    key: &str,
) -> bool {
    let want = dialback_key(secret, receiving, originating, stream_id);
    let (a, b) = (want.as_bytes(), key.trim().as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `type` of a dialback element (XEP-0220 §2.1.1, §2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbType {
    Valid,
    Invalid,
    Error,
}

impl DbType {
    pub fn as_str(self) -> &'static str {
        match self {
            DbType::Valid => "valid",
            DbType::Invalid => "invalid",
            DbType::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    /// `<db:result/>`: key from the initiating server, or the verdict back to it.
    Result,
    /// `<db:verify/>`: question to the authoritative server, or its answer.
    Verify,
}

/// A dialback element (XEP-0220 §2.1–§2.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dialback {
    pub kind: DbKind,
    pub from: String,
    pub to: String,
    /// Stream id: required on `<db:verify/>`, absent on `<db:result/>`.
    pub id: Option<String>,
    pub ty: Option<DbType>,
    /// The key (a request); `None` on answers.
    pub key: Option<String>,
    /// The stanza error condition of a `type='error'` answer.
    pub error: Option<StanzaErrorCondition>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialbackError {
    #[error("not a dialback element")]
    NotDialback,
    #[error("missing attribute '{0}'")]
    MissingAttr(&'static str),
    #[error("bad type '{0}'")]
    BadType(String),
    #[error("bad key")]
    BadKey,
}

impl Dialback {
    /// Reads a framed `<db:result/>` or `<db:verify/>`.
    pub fn parse(s: &Stanza) -> Result<Dialback, DialbackError> {
        if s.namespace() != NS_DIALBACK {
            return Err(DialbackError::NotDialback);
        }
        let kind = match s.name() {
            "result" => DbKind::Result,
            "verify" => DbKind::Verify,
            _ => return Err(DialbackError::NotDialback),
        };
        let from = s
            .from()
            .ok_or(DialbackError::MissingAttr("from"))?
            .into_owned();
        let to = s.to().ok_or(DialbackError::MissingAttr("to"))?.into_owned();
        let id = s.id().map(|c| c.into_owned());
        if kind == DbKind::Verify && id.is_none() {
            return Err(DialbackError::MissingAttr("id"));
        }
        let ty = match s.stanza_type().as_deref() {
            None => None,
            Some("valid") => Some(DbType::Valid),
            Some("invalid") => Some(DbType::Invalid),
            Some("error") => Some(DbType::Error),
            Some(other) => return Err(DialbackError::BadType(other.to_owned())),
        };
        let (key, error) = match ty {
            None => {
                let k = root_text(s);
                if k.is_empty()
                    || k.len() > MAX_KEY_LEN
                    || !k.bytes().all(|b| b.is_ascii_alphanumeric())
                {
                    return Err(DialbackError::BadKey);
                }
                (Some(k), None)
            }
            Some(DbType::Error) => (None, parse_stanza_error(s).and_then(|(_, c)| c)),
            Some(_) => (None, None),
        };
        Ok(Dialback {
            kind,
            from,
            to,
            id,
            ty,
            key,
            error,
        })
    }

    /// A key request: `<db:result from to>key</db:result>` (step 1) or
    /// `<db:verify from to id>key</db:verify>` (step 2).
    pub fn request(kind: DbKind, from: &str, to: &str, id: Option<&str>, key: &str) -> Dialback {
        Dialback {
            kind,
            from: from.into(),
            to: to.into(),
            id: id.map(Into::into),
            ty: None,
            key: Some(key.into()),
            error: None,
        }
    }

    /// The answer to this request: from/to swapped, id kept, the given verdict.
    pub fn answer(&self, ty: DbType, error: Option<StanzaErrorCondition>) -> Dialback {
        Dialback {
            kind: self.kind,
            from: self.to.clone(),
            to: self.from.clone(),
            id: self.id.clone(),
            ty: Some(ty),
            key: None,
            error: if ty == DbType::Error {
                error.or(Some(StanzaErrorCondition::ItemNotFound))
            } else {
                None
            },
        }
    }

    /// Wire form, using the `db:` prefix our stream headers declare (XEP-0220 §2.1.1).
    pub fn to_xml(&self) -> Vec<u8> {
        use quick_xml::escape::escape;
        let name = match self.kind {
            DbKind::Result => "db:result",
            DbKind::Verify => "db:verify",
        };
        let mut s = format!(
            "<{name} from='{}' to='{}'",
            escape(&self.from),
            escape(&self.to)
        );
        if let Some(id) = &self.id {
            s.push_str(&format!(" id='{}'", escape(id)));
        }
        if let Some(t) = self.ty {
            s.push_str(&format!(" type='{}'", t.as_str()));
        }
        match (&self.key, self.ty, self.error) {
            (Some(k), _, _) => s.push_str(&format!(">{}</{name}>", escape(k))),
            (None, Some(DbType::Error), Some(c)) => s.push_str(&format!(
                "><error type='{}'><{} xmlns='{NS_STANZAS_ERRORS}'/></error></{name}>",
                c.default_type().as_str(),
                c.as_str()
            )),
            _ => s.push_str("/>"),
        }
        s.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xmpp::stream::{StreamEvent, StreamFramer};

    #[test]
    fn xep_0185_vector() {
        let k = dialback_key(
            "s3cr3tf0rd14lb4ck",
            "xmpp.example.com",
            "example.org",
            "D60000229F",
        );
        assert_eq!(
            k,
            "37c69b1cf07a3f67c04a5ef5902fa5114f2c76fe4a2686482ba5b89323075643"
        );
        // The raw-digest variant is the known bug; we must not compute it.
        assert!(!k.starts_with("4530485c"));
        let raw = ring::digest::digest(&ring::digest::SHA256, b"s3cr3tf0rd14lb4ck");
        let bad = hex::encode(hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, raw.as_ref()),
            b"xmpp.example.com example.org D60000229F",
        ));
        assert!(bad.starts_with("4530485c"));
        assert_ne!(k, bad);
        assert!(verify_key(
            "s3cr3tf0rd14lb4ck",
            "xmpp.example.com",
            "example.org",
            "D60000229F",
            &format!("\n  {k}\n")
        ));
        assert!(!verify_key(
            "s3cr3tf0rd14lb4ck",
            "xmpp.example.com",
            "example.org",
            "D60000229G",
            &k
        ));
    }

    fn frame(payload: &str) -> Stanza {
        let mut f = StreamFramer::default();
        f.push(b"<stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' xmlns:stream='http://etherx.jabber.org/streams'>");
        f.push(payload.as_bytes());
        let _ = f.next_event();
        match f.next_event() {
            Ok(Some(StreamEvent::Stanza(s))) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parse_and_build_xep_0220_examples() {
        let r = Dialback::parse(&frame(
            "<db:result\n from='capulet.example'\n to='montague.example'>\n b4835385f37fe2895af6c196b59097b16862406db80559900d96bf6fa7d23df3\n </db:result>",
        ));
        let r = r.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.kind, DbKind::Result);
        assert_eq!(
            r.key.as_deref(),
            Some("b4835385f37fe2895af6c196b59097b16862406db80559900d96bf6fa7d23df3")
        );
        assert_eq!(
            String::from_utf8_lossy(&r.answer(DbType::Valid, None).to_xml()),
            "<db:result from='montague.example' to='capulet.example' type='valid'/>"
        );
        let v = Dialback::parse(&frame(
            "<db:verify from='montague.example' id='417GAF25' to='capulet.example' type='error'><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></db:verify>",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v.kind, DbKind::Verify);
        assert_eq!(v.ty, Some(DbType::Error));
        assert_eq!(v.id.as_deref(), Some("417GAF25"));
        assert_eq!(v.error, Some(StanzaErrorCondition::ItemNotFound));
        // Build, frame, parse: same value.
        let req = Dialback::request(
            DbKind::Verify,
            "capulet.example",
            "montague.example",
            Some("417GAF25"),
            "225cc5aa",
        );
        let back = Dialback::parse(&frame(&String::from_utf8_lossy(&req.to_xml())))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, req);
        let err = req.answer(DbType::Error, None);
        let back = Dialback::parse(&frame(&String::from_utf8_lossy(&err.to_xml())))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, err);
        assert_eq!(
            Dialback::parse(&frame("<db:verify from='a' to='b'>k</db:verify>")),
            Err(DialbackError::MissingAttr("id"))
        );
        assert_eq!(
            Dialback::parse(&frame("<db:result from='a' to='b'>k k</db:result>")),
            Err(DialbackError::BadKey)
        );
        assert_eq!(
            Dialback::parse(&frame("<message from='a' to='b'/>")),
            Err(DialbackError::NotDialback)
        );
    }
}
