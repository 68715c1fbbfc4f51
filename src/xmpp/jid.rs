//! JIDs (RFC 7622) as a checked newtype.
//!
//! A JID from the wire stays a string until [`Jid::parse`] accepts it; domains compare exactly
//! after normalisation (ASCII lowercase, one trailing dot removed), so `imp.example.com` is never
//! `example.com`. This is deliberately not full PRECIS: non-ASCII domains are kept as sent
//! (lowercased with Unicode rules) and localparts/resources are only length- and
//! character-checked; the gateway compares domains, it does not canonicalise user names.

use std::fmt;

/// RFC 7622 §3.1/§3.3.1/§3.4.1: each part is at most 1023 octets.
pub const MAX_PART_BYTES: usize = 1023;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JidError {
    #[error("empty domainpart")]
    EmptyDomain,
    #[error("empty localpart before '@'")]
    EmptyLocal,
    #[error("empty resourcepart after '/'")]
    EmptyResource,
    #[error("{0} longer than 1023 octets")]
    TooLong(&'static str),
    #[error("forbidden character {0:?} in {1}")]
    BadChar(char, &'static str),
}

/// A parsed JID `[localpart@]domainpart[/resourcepart]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Jid {
    local: Option<String>,
    domain: String,
    resource: Option<String>,
}

impl Jid {
    /// Parses and normalises a JID (RFC 7622 §3.1: split at the first '/', then the last '@'
    /// before it).
    pub fn parse(s: &str) -> Result<Jid, JidError> {
        let (bare, resource) = match s.split_once('/') {
            Some((b, r)) => {
                if r.is_empty() {
                    return Err(JidError::EmptyResource);
                }
                (b, Some(r))
            }
            None => (s, None),
        };
        let (local, domain) = match bare.rsplit_once('@') {
            Some((l, d)) => {
                if l.is_empty() {
                    return Err(JidError::EmptyLocal);
                }
                (Some(l), d)
            }
            None => (None, bare),
        };
        let domain = normalise_domain(domain)?;
        if let Some(l) = local {
            if l.len() > MAX_PART_BYTES {
                return Err(JidError::TooLong("localpart"));
            }
            // RFC 7622 §3.3.1: these characters are disallowed in a localpart.
            if let Some(c) = l.chars().find(|c| {
                matches!(c, '"' | '&' | '\'' | '/' | ':' | '<' | '>' | '@')
                    || c.is_control()
                    || c.is_whitespace()
            }) {
                return Err(JidError::BadChar(c, "localpart"));
            }
        }
        if let Some(r) = resource {
            if r.len() > MAX_PART_BYTES {
                return Err(JidError::TooLong("resourcepart"));
            }
            if let Some(c) = r.chars().find(|c| c.is_control()) {
                return Err(JidError::BadChar(c, "resourcepart"));
            }
        }
        Ok(Jid {
            local: local.map(str::to_owned),
            domain,
            resource: resource.map(str::to_owned),
        })
    }

    pub fn local(&self) -> Option<&str> {
        self.local.as_deref()
    }
    pub fn domain(&self) -> &str {
        &self.domain
    }
    pub fn resource(&self) -> Option<&str> {
        self.resource.as_deref()
    }
    /// The JID without its resource.
    pub fn to_bare(&self) -> Jid {
        Jid {
            local: self.local.clone(),
            domain: self.domain.clone(),
            resource: None,
        }
    }
    /// Exact comparison of the domainpart with an already-normalised domain.
    pub fn is_domain(&self, domain: &str) -> bool {
        self.domain == domain
    }
}

/// Normalises a domainpart (RFC 7622 §3.2): strips one trailing dot, lowercases, checks length
/// and refuses characters no hostname or IP literal contains.
pub fn normalise_domain(d: &str) -> Result<String, JidError> {
    let d = d.strip_suffix('.').unwrap_or(d);
    if d.is_empty() {
        return Err(JidError::EmptyDomain);
    }
    if d.len() > MAX_PART_BYTES {
        return Err(JidError::TooLong("domainpart"));
    }
    if let Some(c) = d.chars().find(|c| {
        c.is_whitespace() || c.is_control() || matches!(c, '@' | '/' | '<' | '>' | '\'' | '"' | '&')
    }) {
        return Err(JidError::BadChar(c, "domainpart"));
    }
    Ok(d.to_lowercase())
}

impl fmt::Display for Jid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(l) = &self.local {
            write!(f, "{l}@")?;
        }
        f.write_str(&self.domain)?;
        if let Some(r) = &self.resource {
            write!(f, "/{r}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_parts() {
        let j = Jid::parse("juliet@IM.Example.com./balcony/x@y").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(j.local(), Some("juliet"));
        assert_eq!(j.domain(), "im.example.com");
        assert_eq!(j.resource(), Some("balcony/x@y"));
        assert_eq!(j.to_string(), "juliet@im.example.com/balcony/x@y");
        assert!(j.is_domain("im.example.com"));
        assert!(!j.is_domain("example.com"));
        assert_eq!(
            Jid::parse("example.net").map(|j| j.local().is_none()),
            Ok(true)
        );
    }

    #[test]
    fn rejects() {
        assert_eq!(Jid::parse(""), Err(JidError::EmptyDomain));
        assert_eq!(Jid::parse("@x"), Err(JidError::EmptyLocal));
        assert_eq!(Jid::parse("a@x/"), Err(JidError::EmptyResource));
        assert!(Jid::parse("a b@x").is_err());
        assert!(Jid::parse(&format!("{}@x", "a".repeat(1024))).is_err());
        assert!(Jid::parse(&"a".repeat(1024)).is_err());
    }
}
