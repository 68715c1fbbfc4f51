//! Steps 2 and 3: where the partner is (the static route and the cluster address map first,
//! then `_sipfederationtls._tcp` for SIP, `_xmpps-server._tcp` / `_xmpp-server._tcp` for XMPP,
//! then A/AAAA — through the gateway's own [`Resolver`], so `[dns] nameservers` applies) and
//! whether its targets accept a TCP connection. The verdicts are pure functions of the lookups
//! ([`dns_verdict`], [`tcp_verdict`]); the lookups and connects are bounded by the run budget.

use std::time::Duration;

use tokio::net::TcpStream;

use super::policy::Plan;
use super::{Budget, Protocol, Step, StepKind};
use crate::config::{Config, Domain};
use crate::dns::{DnsError, Resolver, Target, TargetSource, Transport};

/// What the SRV lookups of the domain said, for the report (the target list itself comes from
/// the resolver's own selection, the one the gateway uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvSeen {
    pub name: String,
    pub answer: Result<Vec<String>, String>,
}

/// Step 2's verdict from what was looked up.
pub fn dns_verdict(
    domain: &Domain,
    plan: &Plan,
    srv: &[SrvSeen],
    targets: &Result<Vec<Target>, DnsError>,
) -> Step {
    let k = StepKind::Dns;
    let d = domain.as_str();
    let mut details: Vec<String> = srv
        .iter()
        .map(|s| match &s.answer {
            Ok(recs) => format!("{}: {}", s.name, recs.join(", ")),
            Err(e) => format!("{}: {e}", s.name),
        })
        .collect();
    let publish = match plan.protocol {
        Protocol::Sip => format!(
            "ask {d} to publish `_sipfederationtls._tcp.{d}. SRV 0 0 5061 <their edge>` and \
             an A record for that edge, or configure a static `route` for {d} in \
             [[sip.federated_domain]]"
        ),
        Protocol::Xmpp => format!(
            "ask {d} to publish `_xmpp-server._tcp.{d}. SRV 0 0 5269 <their server>` \
             (or `_xmpps-server._tcp` for direct TLS) and an A record for that server"
        ),
    };
    let targets = match targets {
        Ok(t) => t,
        Err(e) => {
            let fix = match e {
                DnsError::Timeout { .. } | DnsError::Io { .. } | DnsError::ServerFailure { .. } => {
                    "our DNS server does not answer properly: check [dns] nameservers (or \
                     /etc/resolv.conf) from this host"
                        .to_string()
                }
                DnsError::ServiceNotOffered { .. } => format!(
                    "{d} says it does not offer this service (SRV target `.`): ask them to \
                     enable federation and publish real SRV records"
                ),
                _ => publish,
            };
            return Step::fail(k, format!("cannot find where {d} is: {e}"), fix)
                .with_details(details);
        }
    };
    for t in targets {
        details.push(format!("target {t} via {}", t.source.label()));
    }
    let tls_targets = targets
        .iter()
        .filter(|t| plan.protocol == Protocol::Xmpp || t.transport == Transport::Tls)
        .count();
    if tls_targets == 0 {
        return Step::fail(
            k,
            format!("{d} publishes only plain-TCP SIP targets; federation needs TLS"),
            publish,
        )
        .with_details(details);
    }
    let source = targets.first().map(|t| t.source);
    let summary = format!(
        "{} target(s), first {}",
        targets.len(),
        targets.first().map(|t| t.to_string()).unwrap_or_default()
    );
    let step = Step::ok(k, summary).with_details(details);
    match source {
        Some(TargetSource::AddressFallback) => {
            let mut s = step;
            s.downgrade(
                format!(
                    "no SRV record for {d}: using the address of {d} itself on the default port"
                ),
                publish,
            );
            s
        }
        Some(TargetSource::Naptr) | Some(TargetSource::Srv)
            if plan.protocol == Protocol::Sip && srv.first().is_none_or(|s| s.answer.is_err()) =>
        {
            let mut s = step;
            s.downgrade(
                format!("no _sipfederationtls._tcp.{d} record: found by the RFC 3263 fallback"),
                publish,
            );
            s
        }
        _ => step,
    }
}

/// Step 2: resolves the partner as the gateway would.
pub async fn dns_step(
    cfg: &Config,
    domain: &Domain,
    plan: &Plan,
    budget: &Budget,
) -> (Step, Vec<Target>) {
    let resolver = match Resolver::from_config(cfg) {
        Ok(r) => r,
        Err(e) => {
            return (
                Step::fail(
                    StepKind::Dns,
                    format!("cannot set up the resolver: {e}"),
                    "check [dns] nameservers",
                ),
                Vec::new(),
            )
        }
    };
    let d = domain.as_str();
    let mut extra = Vec::new();
    let in_map: Vec<String> = cfg
        .cluster
        .address_map
        .iter()
        .map(|(n, ip)| format!("address map: {n} -> {ip}"))
        .collect();
    let names: Vec<String> = match (plan.protocol, &plan.route) {
        (Protocol::Sip, Some(r)) => {
            extra.push(format!("static route {r}: DNS SRV not consulted"));
            Vec::new()
        }
        (Protocol::Sip, None) => vec![format!("_sipfederationtls._tcp.{d}")],
        (Protocol::Xmpp, _) => vec![
            format!("_xmpps-server._tcp.{d}"),
            format!("_xmpp-server._tcp.{d}"),
        ],
    };
    let mut srv = Vec::new();
    for name in names {
        let answer = bounded(budget, d, resolver.srv(&name)).await.map(|recs| {
            recs.iter()
                .map(|r| {
                    format!(
                        "{}:{} (priority {}, weight {})",
                        r.target, r.port, r.priority, r.weight
                    )
                })
                .collect::<Vec<_>>()
        });
        srv.push(SrvSeen {
            name,
            answer: answer.map_err(|e| e.to_string()),
        });
    }
    let targets = match plan.protocol {
        Protocol::Sip => {
            bounded(budget, d, resolver.sip_targets(domain, plan.route.as_ref())).await
        }
        Protocol::Xmpp => bounded(budget, d, resolver.xmpp_s2s_targets(domain)).await,
    };
    let mut step = dns_verdict(domain, plan, &srv, &targets);
    let mut front = extra;
    front.extend(in_map.into_iter().filter(|l| {
        targets
            .as_ref()
            .is_ok_and(|ts| ts.iter().any(|t| l.contains(&format!(" {} ->", t.host))))
    }));
    front.append(&mut step.details);
    step.details = front;
    (step, targets.unwrap_or_default())
}

/// A lookup bounded by the run budget; running out is a DNS timeout.
async fn bounded<T>(
    budget: &Budget,
    name: &str,
    fut: impl std::future::Future<Output = Result<T, DnsError>>,
) -> Result<T, DnsError> {
    match tokio::time::timeout(budget.step(), fut).await {
        Ok(r) => r,
        Err(_) => Err(DnsError::Timeout {
            name: name.to_string(),
        }),
    }
}

/// How one connect attempt went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    Answered,
    Refused(String),
    TimedOut(Duration),
}

/// Step 3's verdict: ok when every target answered, warn when one did, fail when none did.
pub fn tcp_verdict(results: &[(Target, Reach)]) -> Step {
    let k = StepKind::Tcp;
    let details: Vec<String> = results
        .iter()
        .map(|(t, r)| match r {
            Reach::Answered => format!("{} answered", t.addr),
            Reach::Refused(e) => format!("{} refused: {e}", t.addr),
            Reach::TimedOut(d) => format!("{} no answer within {} ms", t.addr, d.as_millis()),
        })
        .collect();
    let answered = results
        .iter()
        .filter(|(_, r)| *r == Reach::Answered)
        .count();
    let down: Vec<String> = results
        .iter()
        .filter(|(_, r)| *r != Reach::Answered)
        .map(|(t, _)| t.addr.to_string())
        .collect();
    if results.is_empty() {
        return Step::fail(k, "no target to connect to", "fix the DNS step first");
    }
    if answered == 0 {
        return Step::fail(
            k,
            format!("nothing answers at {}", down.join(", ")),
            "the partner's server is down or not listening there, or a firewall between us \
             blocks the port: ask the partner to check their listener, and allow outbound TCP \
             to that port from this host",
        )
        .with_details(details);
    }
    let summary = format!("{answered} of {} target(s) answered", results.len());
    if down.is_empty() {
        Step::ok(k, summary).with_details(details)
    } else {
        Step::warn(
            k,
            summary,
            format!(
                "no failover: {} do not answer; ask the partner to fix or unpublish them",
                down.join(", ")
            ),
        )
        .with_details(details)
    }
}

/// Step 3: connects to every target (bounded), keeps the first connection that answered.
pub async fn tcp_step(targets: &[Target], budget: &Budget) -> (Step, Option<(Target, TcpStream)>) {
    let mut results = Vec::new();
    let mut first = None;
    // Targets are tried one by one in the resolver's order; each gets at most 3 s so that one
    // black hole does not eat the run.
    for t in targets.iter().take(8) {
        let limit = budget.step().min(Duration::from_secs(3));
        let r = match tokio::time::timeout(limit, TcpStream::connect(t.addr)).await {
            Ok(Ok(s)) => {
                if first.is_none() {
                    first = Some((t.clone(), s));
                }
                Reach::Answered
            }
            Ok(Err(e)) => Reach::Refused(e.to_string()),
            Err(_) => Reach::TimedOut(limit),
        };
        results.push((t.clone(), r));
    }
    (tcp_verdict(&results), first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::S2sAuth;
    use crate::doctor::Verdict;

    fn target(addr: std::net::SocketAddr, transport: Transport, source: TargetSource) -> Target {
        Target {
            host: addr.ip().to_string(),
            addr,
            transport,
            source,
        }
    }

    fn plan(p: Protocol) -> Plan {
        Plan {
            protocol: p,
            route: None,
            tolerate_no_client_auth_eku: false,
            auth: S2sAuth::ExternalOrDialback,
            tls_required: true,
        }
    }

    fn dom() -> Domain {
        Domain::parse("partner.test").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn no_records_at_all_fails_with_the_srv_to_publish() {
        let s = dns_verdict(
            &dom(),
            &plan(Protocol::Sip),
            &[SrvSeen {
                name: "_sipfederationtls._tcp.partner.test".into(),
                answer: Err("no SRV records".into()),
            }],
            &Err(DnsError::NxDomain {
                name: "partner.test".into(),
            }),
        );
        assert_eq!(s.verdict, Verdict::Fail);
        assert!(s
            .fix
            .as_deref()
            .is_some_and(|f| f.contains("_sipfederationtls._tcp.partner.test")));
    }

    #[test]
    fn address_fallback_is_a_warning() {
        let t = target(
            "127.0.0.1:5269".parse().unwrap_or_else(|e| panic!("{e}")),
            Transport::Tcp,
            TargetSource::AddressFallback,
        );
        let s = dns_verdict(&dom(), &plan(Protocol::Xmpp), &[], &Ok(vec![t]));
        assert_eq!(s.verdict, Verdict::Warn);
        assert!(s
            .fix
            .as_deref()
            .is_some_and(|f| f.contains("_xmpp-server._tcp")));
    }

    #[test]
    fn tcp_verdicts() {
        let t = target(
            "127.0.0.1:1".parse().unwrap_or_else(|e| panic!("{e}")),
            Transport::Tls,
            TargetSource::Srv,
        );
        let none = tcp_verdict(&[(t.clone(), Reach::Refused("connection refused".into()))]);
        assert_eq!(none.verdict, Verdict::Fail);
        assert!(none.summary.contains("127.0.0.1:1"));
        let some = tcp_verdict(&[
            (t.clone(), Reach::Answered),
            (t.clone(), Reach::TimedOut(Duration::from_secs(3))),
        ]);
        assert_eq!(some.verdict, Verdict::Warn);
        assert_eq!(tcp_verdict(&[(t, Reach::Answered)]).verdict, Verdict::Ok);
    }
}
