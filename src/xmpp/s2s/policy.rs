//! Per-peer federation policy for s2s streams (issue 4 item 4), read from one configuration
//! snapshot: whether a domain may federate at all (`Config::xmpp_federation_allowed`, the same
//! rule the router applies to every envelope), whether TLS is required and which
//! authentication methods it may use. Refusals carry the stream condition and a text that says
//! why, so the peer's administrator can read it in their log (RFC 6120 §4.9.3, `<text/>`).

use crate::config::{Config, Domain, S2sAuth, TlsPolicy};
use crate::xmpp::error::StreamErrorCondition;
use crate::xmpp::s2s_negotiate::{PolicyAnswer, PolicyLookup, S2sPolicy};
use std::sync::Arc;

/// Default for domains without an entry (deny-list mode): TLS required, both methods.
const DEFAULT_POLICY: S2sPolicy = S2sPolicy {
    tls_required: true,
    sasl_external_allowed: true,
    dialback_allowed: true,
};

/// The policy for `domain` (as claimed by a peer, not yet normalised), or why it is refused.
pub fn policy_for(cfg: &Config, domain: &str) -> PolicyAnswer {
    let d = match Domain::parse(domain) {
        Ok(d) => d,
        Err(e) => {
            return Err((
                StreamErrorCondition::NotAuthorized,
                format!("'{domain}' is not a valid domain: {e}"),
            ))
        }
    };
    if !cfg.xmpp_federation_allowed(&d) {
        super::metrics::REFUSED
            .with_label_values(&["domain_not_allowed"])
            .inc();
        return Err((
            StreamErrorCondition::PolicyViolation,
            format!("federation with {d} is not allowed by this server's policy"),
        ));
    }
    Ok(match cfg.xmpp_domain(&d) {
        Some(e) => S2sPolicy {
            tls_required: e.tls == TlsPolicy::Required,
            sasl_external_allowed: e.auth != S2sAuth::DialbackOnly,
            dialback_allowed: e.auth != S2sAuth::ExternalOnly,
        },
        None => DEFAULT_POLICY,
    })
}

/// The lookup handed to receiving negotiators: reads the configuration the hub holds *now*, so
/// a reload applies to the next stream (and the next `<db:result/>`) without a restart.
pub fn lookup(hub: Arc<crate::gateway::Hub>) -> PolicyLookup {
    PolicyLookup(Arc::new(move |d: &str| policy_for(&hub.config(), d)))
}

/// The mapping system in which presence from/to `domain` is expressed: its entry's `system`,
/// or `fed-xmpp` for an unlisted domain in deny-list mode.
pub fn system_for(cfg: &Config, domain: &Domain) -> String {
    cfg.xmpp_domain(domain)
        .map_or_else(|| "fed-xmpp".to_string(), |e| e.system.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{from_toml, BUILTIN_SYSTEMS};
    use std::path::Path;

    fn cfg(mode: &str, entries: &str) -> Config {
        let toml = format!(
            "[[local_domain]]\nname = \"example.com\"\n[[sip.federated_domain]]\nname = \"partner.com\"\n\
             [xmpp.federation]\nmode = \"{mode}\"\n{entries}"
        );
        from_toml(&toml, Path::new("t.toml"), BUILTIN_SYSTEMS).unwrap_or_else(|d| panic!("{d}"))
    }

    const ENTRIES: &str = "[[xmpp.federation.domain]]\nname = \"ext.test\"\nauth = \"external_only\"\n\
        [[xmpp.federation.domain]]\nname = \"db.test\"\nauth = \"dialback_only\"\ntls = \"optional\"\n\
        [[xmpp.federation.domain]]\nname = \"evil.test\"\ndeny = true\n";

    #[test]
    fn allow_list_entries_and_their_auth() {
        let c = cfg("allow_list", ENTRIES);
        assert_eq!(
            policy_for(&c, "ext.test"),
            Ok(S2sPolicy {
                tls_required: true,
                sasl_external_allowed: true,
                dialback_allowed: false
            })
        );
        assert_eq!(
            policy_for(&c, "DB.test."),
            Ok(S2sPolicy {
                tls_required: false,
                sasl_external_allowed: false,
                dialback_allowed: true
            })
        );
        for refused in [
            "other.test",
            "evil.test",
            "sub.ext.test",
            "example.com",
            "partner.com",
        ] {
            let (c, text) = policy_for(&c, refused).expect_err(refused);
            assert_eq!(c, StreamErrorCondition::PolicyViolation);
            assert!(text.contains("not allowed"), "{text}");
        }
        let (c, _) = policy_for(&c, "not a domain").expect_err("invalid");
        assert_eq!(c, StreamErrorCondition::NotAuthorized);
    }

    #[test]
    fn deny_list_lets_unlisted_domains_in_with_the_default() {
        let c = cfg("deny_list", ENTRIES);
        assert_eq!(policy_for(&c, "anyone.test"), Ok(DEFAULT_POLICY));
        assert!(policy_for(&c, "evil.test").is_err());
        assert!(
            policy_for(&c, "partner.com").is_err(),
            "SIP domains never over XMPP"
        );
        assert_eq!(
            system_for(
                &c,
                &Domain::parse("anyone.test").unwrap_or_else(|e| panic!("{e}"))
            ),
            "fed-xmpp"
        );
    }
}
