//! Step 1: what our own configuration says about the domain (requirements §1; the same
//! questions the SIP edge and the s2s policy ask: `sip_federated`, `xmpp_federation_allowed`).
//! Pure: configuration in, verdict and plan out.

use super::{Protocol, Step, StepKind};
use crate::config::{Config, Domain, FederationMode, HostPort, S2sAuth, TlsPolicy};

/// What the later steps need from our policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub protocol: Protocol,
    /// SIP: the configured static route, tried instead of DNS.
    pub route: Option<HostPort>,
    /// SIP: a certificate without clientAuth is accepted from this partner.
    pub tolerate_no_client_auth_eku: bool,
    /// XMPP: how we may authenticate with this partner.
    pub auth: S2sAuth,
    pub tls_required: bool,
}

/// Step 1. `None` plan: federation with the domain is refused by our own policy (or the domain
/// is ours), and the step says which key to change.
pub fn check(cfg: &Config, domain: &Domain) -> (Step, Option<Plan>) {
    let k = StepKind::Policy;
    let d = domain.as_str();
    if cfg.is_local_domain(domain) || cfg.chat_node(domain).is_some() {
        return (
            Step::fail(
                k,
                format!("{d} is one of our own domains, not a partner"),
                "run legate doctor with the partner's domain",
            ),
            None,
        );
    }
    if let Some(f) = cfg.sip_federated(domain) {
        let mut details = vec![format!("SIP federated domain (system {})", f.system)];
        match &f.route {
            Some(r) => details.push(format!("static route {r} (used instead of DNS)")),
            None => details.push("no static route: found through DNS".into()),
        }
        if f.tolerate_no_client_auth_eku {
            details.push("tolerate_no_client_auth_eku = true".into());
        }
        let plan = Plan {
            protocol: Protocol::Sip,
            route: f.route.clone(),
            tolerate_no_client_auth_eku: f.tolerate_no_client_auth_eku,
            auth: S2sAuth::ExternalOnly,
            tls_required: true,
        };
        return (
            Step::ok(k, format!("{d} is a SIP federated domain")).with_details(details),
            Some(plan),
        );
    }
    let entry = cfg.xmpp_domain(domain);
    let mode = cfg.xmpp.federation.mode;
    if !cfg.xmpp_federation_allowed(domain) {
        let fix = match (mode, entry) {
            (_, Some(e)) if e.deny => format!(
                "remove `deny = true` from the [[xmpp.federation.domain]] entry for {d} \
                 (or the entry itself in deny_list mode)"
            ),
            _ => format!(
                "add {d} to [[xmpp.federation.domain]] (XMPP) or to [[sip.federated_domain]] \
                 (SIP), or set [xmpp.federation] mode = \"deny_list\" for open federation"
            ),
        };
        let why = match (mode, entry) {
            (_, Some(e)) if e.deny => format!("{d} is denied (deny = true)"),
            (FederationMode::AllowList, _) => format!(
                "{d} is not a SIP federated domain and not on the XMPP allow list \
                 (mode = allow_list)"
            ),
            (FederationMode::DenyList, _) => format!("{d} is not allowed"),
        };
        return (Step::fail(k, why, fix), None);
    }
    let (auth, tls_required, how) = match entry {
        Some(e) => (
            e.auth,
            e.tls == TlsPolicy::Required,
            format!("listed XMPP domain (system {})", e.system),
        ),
        None => (
            S2sAuth::ExternalOrDialback,
            true,
            "open federation (mode = deny_list, not listed)".to_string(),
        ),
    };
    let details = vec![
        how,
        format!(
            "authentication: {}; TLS {}",
            match auth {
                S2sAuth::ExternalOrDialback => "SASL EXTERNAL or dialback",
                S2sAuth::ExternalOnly => "SASL EXTERNAL only",
                S2sAuth::DialbackOnly => "dialback only",
            },
            if tls_required { "required" } else { "optional" }
        ),
    ];
    let plan = Plan {
        protocol: Protocol::Xmpp,
        route: None,
        tolerate_no_client_auth_eku: false,
        auth,
        tls_required,
    };
    (
        Step::ok(k, format!("{d} may federate over XMPP")).with_details(details),
        Some(plan),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{from_toml, BUILTIN_SYSTEMS};
    use crate::doctor::Verdict;

    fn cfg(extra: &str) -> Config {
        let text = format!("[[local_domain]]\nname = \"example.test\"\n{extra}");
        from_toml(&text, std::path::Path::new("t.toml"), BUILTIN_SYSTEMS)
            .unwrap_or_else(|d| panic!("{d}"))
    }

    fn dom(s: &str) -> Domain {
        Domain::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn unlisted_domain_in_allow_list_mode_fails_with_the_key_to_add() {
        let (s, plan) = check(&cfg(""), &dom("xmpp.test"));
        assert_eq!(s.verdict, Verdict::Fail);
        assert!(plan.is_none());
        assert!(s
            .fix
            .as_deref()
            .is_some_and(|f| f.contains("[[xmpp.federation.domain]]")));
    }

    #[test]
    fn our_own_domain_is_not_a_partner() {
        let (s, _) = check(&cfg(""), &dom("example.test"));
        assert_eq!(s.verdict, Verdict::Fail);
        assert!(s.summary.contains("our own"));
    }

    #[test]
    fn sip_domain_with_route_plans_sip() {
        let c = cfg(
            "[[sip.federated_domain]]\nname = \"lync.test\"\nsystem = \"lync\"\nroute = \"127.0.0.1:5061\"\n",
        );
        let (s, plan) = check(&c, &dom("lync.test"));
        assert_eq!(s.verdict, Verdict::Ok, "{s:?}");
        let plan = plan.unwrap_or_else(|| panic!("plan"));
        assert_eq!(plan.protocol, Protocol::Sip);
        assert!(plan.route.is_some());
    }

    #[test]
    fn denied_domain_says_remove_deny() {
        let c = cfg(
            "[xmpp.federation]\nmode = \"deny_list\"\n[[xmpp.federation.domain]]\nname = \"bad.test\"\ndeny = true\n",
        );
        let (s, _) = check(&c, &dom("bad.test"));
        assert_eq!(s.verdict, Verdict::Fail);
        assert!(s.fix.as_deref().is_some_and(|f| f.contains("deny = true")));
        let (s, plan) = check(&c, &dom("open.test"));
        assert_eq!(s.verdict, Verdict::Ok);
        assert_eq!(plan.map(|p| p.protocol), Some(Protocol::Xmpp));
    }
}
