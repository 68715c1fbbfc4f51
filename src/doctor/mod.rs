//! `legate doctor DOMAIN`: the federation self-test. It answers "why does federation with this
//! partner fail?" in one run, step by step — our policy for the domain, DNS (static route and
//! address map first), TCP reach, the TLS handshake (version, suite, chain against
//! `tls.trust_bundle`, RFC 6125 names, EKU, expiry) and the protocol itself (a SIP OPTIONS
//! presenting our certificate, or an XMPP s2s stream: STARTTLS, SASL EXTERNAL / dialback).
//!
//! This module owns the step model ([`Step`], [`Verdict`]), the order of the steps (a failed
//! step skips the ones after it) and the rendering (text and JSON). Each step family has its
//! own file; the verdict logic of each is a pure function of what was observed, the I/O beside
//! it is thin and bounded by the run's deadline. It reuses the gateway's resolver (`[dns]`),
//! TLS configuration (`[tls]`, our certificate), RFC 6125 matching and the s2s negotiator; it
//! must never change state anywhere (it sends an OPTIONS and opens a stream, nothing else).

pub mod net;
pub mod policy;
pub mod sip;
pub mod tls;
pub mod xmpp;

use serde_json::json;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::config::{Config, Domain};

/// Outcome of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Federation works, but something should be fixed (expiring certificate, fallback used).
    Warn,
    Fail,
    /// Not run because an earlier step failed.
    Skipped,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "fail",
            Verdict::Skipped => "skipped",
        }
    }
}

/// The step families, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    Policy,
    Dns,
    Tcp,
    Tls,
    Protocol,
}

impl StepKind {
    pub const ALL: [StepKind; 5] = [
        StepKind::Policy,
        StepKind::Dns,
        StepKind::Tcp,
        StepKind::Tls,
        StepKind::Protocol,
    ];

    pub fn label(self) -> &'static str {
        match self {
            StepKind::Policy => "policy",
            StepKind::Dns => "dns",
            StepKind::Tcp => "tcp",
            StepKind::Tls => "tls",
            StepKind::Protocol => "protocol",
        }
    }

    fn title(self) -> &'static str {
        match self {
            StepKind::Policy => "our policy",
            StepKind::Dns => "DNS",
            StepKind::Tcp => "TCP reach",
            StepKind::Tls => "TLS handshake",
            StepKind::Protocol => "protocol",
        }
    }
}

/// One checked step: what was seen (`details`) and, for every non-ok verdict, what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub kind: StepKind,
    pub verdict: Verdict,
    /// One line summary of the finding.
    pub summary: String,
    pub details: Vec<String>,
    /// The fix in plain words; present exactly when the verdict is not `Ok`.
    pub fix: Option<String>,
}

impl Step {
    pub fn ok(kind: StepKind, summary: impl Into<String>) -> Self {
        Step {
            kind,
            verdict: Verdict::Ok,
            summary: summary.into(),
            details: Vec::new(),
            fix: None,
        }
    }

    pub fn warn(kind: StepKind, summary: impl Into<String>, fix: impl Into<String>) -> Self {
        Step {
            verdict: Verdict::Warn,
            fix: Some(fix.into()),
            ..Step::ok(kind, summary)
        }
    }

    pub fn fail(kind: StepKind, summary: impl Into<String>, fix: impl Into<String>) -> Self {
        Step {
            verdict: Verdict::Fail,
            fix: Some(fix.into()),
            ..Step::ok(kind, summary)
        }
    }

    fn skipped(kind: StepKind, after: StepKind) -> Self {
        Step {
            kind,
            verdict: Verdict::Skipped,
            summary: format!("not run: the {} step failed", after.label()),
            details: Vec::new(),
            fix: Some(format!("fix the {} step first", after.label())),
        }
    }

    pub fn with_details(mut self, details: Vec<String>) -> Self {
        self.details.extend(details);
        self
    }

    /// Turns an ok step into a warning (keeps a worse verdict), adding to its fix.
    pub fn downgrade(&mut self, why: String, fix: String) {
        self.details.push(why);
        if self.verdict == Verdict::Ok {
            self.verdict = Verdict::Warn;
        }
        self.fix = Some(match self.fix.take() {
            Some(f) => format!("{f}; {fix}"),
            None => fix,
        });
    }
}

/// Which federation protocol the domain is reached by (from our policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Sip,
    Xmpp,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Sip => "sip",
            Protocol::Xmpp => "xmpp",
        }
    }
}

/// The whole run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub domain: String,
    pub protocol: Option<Protocol>,
    pub steps: Vec<Step>,
}

impl Report {
    /// Federation would work: every step ran and none failed (warnings allowed).
    pub fn passed(&self) -> bool {
        self.steps.len() == StepKind::ALL.len()
            && self
                .steps
                .iter()
                .all(|s| matches!(s.verdict, Verdict::Ok | Verdict::Warn))
    }

    /// The first failing step, if any.
    pub fn failed_step(&self) -> Option<&Step> {
        self.steps.iter().find(|s| s.verdict == Verdict::Fail)
    }

    /// Process exit code: 0 when federation would work, 1 when a step fails.
    pub fn exit_code(&self) -> u8 {
        if self.passed() {
            0
        } else {
            1
        }
    }

    /// Adds `step`; after a failure, the remaining step kinds are added as skipped by
    /// [`Report::finish`].
    fn push(&mut self, step: Step) -> bool {
        let go_on = step.verdict != Verdict::Fail;
        self.steps.push(step);
        go_on
    }

    /// Fills in every step kind not run as skipped after the failed one.
    fn finish(mut self) -> Self {
        let after = self
            .failed_step()
            .map(|s| s.kind)
            .unwrap_or(StepKind::Policy);
        for k in StepKind::ALL {
            if !self.steps.iter().any(|s| s.kind == k) {
                self.steps.push(Step::skipped(k, after));
            }
        }
        self
    }

    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let proto = self.protocol.map(|p| p.label()).unwrap_or("unknown");
        let _ = writeln!(out, "legate doctor {} ({proto})", self.domain);
        for (i, s) in self.steps.iter().enumerate() {
            let _ = writeln!(
                out,
                "{}. {:<14} {:<7} {}",
                i + 1,
                s.kind.title(),
                s.verdict.label().to_uppercase(),
                s.summary
            );
            for d in &s.details {
                let _ = writeln!(out, "     - {d}");
            }
            if let Some(f) = &s.fix {
                let _ = writeln!(out, "     fix: {f}");
            }
        }
        let _ = match self.failed_step() {
            None if self.passed() => {
                writeln!(out, "result: federation with {} should work", self.domain)
            }
            None => writeln!(out, "result: incomplete"),
            Some(s) => writeln!(
                out,
                "result: FAIL at step {} ({})",
                s.kind.label(),
                s.summary
            ),
        };
        out
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "domain": self.domain,
            "protocol": self.protocol.map(|p| p.label()),
            "passed": self.passed(),
            "failed_step": self.failed_step().map(|s| s.kind.label()),
            "steps": self.steps.iter().map(|s| json!({
                "step": s.kind.label(),
                "verdict": s.verdict.label(),
                "summary": s.summary,
                "details": s.details,
                "fix": s.fix,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Bounds of one run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// The whole run; each network step gets what is left (and at most `per_step`).
    pub timeout: Duration,
    pub per_step: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout: Duration::from_secs(30),
            per_step: Duration::from_secs(10),
        }
    }
}

/// The remaining time of a run.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    deadline: Instant,
    per_step: Duration,
}

impl Budget {
    pub fn new(opts: Options) -> Self {
        Budget {
            deadline: Instant::now() + opts.timeout,
            per_step: opts.per_step,
        }
    }

    /// Time for the next network operation: what is left of the run, at most `per_step`.
    pub fn step(&self) -> Duration {
        self.deadline
            .saturating_duration_since(Instant::now())
            .min(self.per_step)
    }
}

/// Runs every step for `domain` with `cfg`. Must be called inside a tokio runtime.
pub async fn run(cfg: &Config, domain: &Domain, opts: Options) -> Report {
    let budget = Budget::new(opts);
    let (step, plan) = policy::check(cfg, domain);
    let mut report = Report {
        domain: domain.as_str().to_string(),
        protocol: plan.as_ref().map(|p| p.protocol),
        steps: Vec::new(),
    };
    let go_on = report.push(step);
    let Some(plan) = plan.filter(|_| go_on) else {
        return report.finish();
    };
    let (step, targets) = net::dns_step(cfg, domain, &plan, &budget).await;
    if !report.push(step) {
        return report.finish();
    }
    let (step, reached) = net::tcp_step(&targets, &budget).await;
    if !report.push(step) {
        return report.finish();
    }
    let Some((target, stream)) = reached else {
        return report.finish();
    };
    let local = cfg.local_domains.first().map(|l| l.name.clone());
    match plan.protocol {
        Protocol::Sip => {
            let (step, conn) =
                tls::sip_handshake(cfg, local.as_ref(), domain, &plan, stream, &budget).await;
            if !report.push(step) {
                return report.finish();
            }
            if let Some(conn) = conn {
                report
                    .push(sip::options_step(conn, local.as_ref(), domain, &target, &budget).await);
            }
        }
        Protocol::Xmpp => {
            for s in xmpp::steps(cfg, local.as_ref(), domain, &plan, &target, stream, &budget).await
            {
                if !report.push(s) {
                    break;
                }
            }
        }
    }
    report.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(steps: Vec<Step>) -> Report {
        Report {
            domain: "partner.test".into(),
            protocol: Some(Protocol::Sip),
            steps,
        }
        .finish()
    }

    #[test]
    fn a_failure_skips_the_rest_and_exits_1() {
        let r = report(vec![
            Step::ok(StepKind::Policy, "federated"),
            Step::fail(StepKind::Dns, "no SRV", "publish it"),
        ]);
        assert_eq!(r.steps.len(), 5);
        assert_eq!(r.exit_code(), 1);
        assert_eq!(r.failed_step().map(|s| s.kind), Some(StepKind::Dns));
        for s in &r.steps[2..] {
            assert_eq!(s.verdict, Verdict::Skipped);
            assert_eq!(s.fix.as_deref(), Some("fix the dns step first"));
        }
    }

    #[test]
    fn warnings_still_pass() {
        let r = report(vec![
            Step::ok(StepKind::Policy, "a"),
            Step::warn(StepKind::Dns, "b", "c"),
            Step::ok(StepKind::Tcp, "d"),
            Step::ok(StepKind::Tls, "e"),
            Step::ok(StepKind::Protocol, "f"),
        ]);
        assert!(r.passed());
        assert_eq!(r.exit_code(), 0);
        let text = r.render_text();
        assert!(text.contains("2. DNS            WARN    b"), "{text}");
        assert!(text.contains("fix: c"), "{text}");
        assert!(text.contains("should work"), "{text}");
    }

    #[test]
    fn incomplete_runs_do_not_pass() {
        let mut r = report(vec![Step::ok(StepKind::Policy, "a")]);
        r.steps.truncate(1);
        assert!(!r.passed());
    }

    #[test]
    fn json_has_every_step_with_verdict_and_fix() {
        let r = report(vec![Step::fail(StepKind::Policy, "denied", "allow it")]);
        let j = r.to_json();
        assert_eq!(j["passed"], false);
        assert_eq!(j["failed_step"], "policy");
        assert_eq!(j["steps"].as_array().map(Vec::len), Some(5));
        assert_eq!(j["steps"][0]["fix"], "allow it");
        assert_eq!(j["steps"][4]["verdict"], "skipped");
    }

    #[test]
    fn downgrade_keeps_fail_and_joins_fixes() {
        let mut s = Step::ok(StepKind::Tls, "x");
        s.downgrade("expires soon".into(), "renew".into());
        assert_eq!(s.verdict, Verdict::Warn);
        s.downgrade("y".into(), "z".into());
        assert_eq!(s.fix.as_deref(), Some("renew; z"));
        let mut f = Step::fail(StepKind::Tls, "x", "a");
        f.downgrade("w".into(), "b".into());
        assert_eq!(f.verdict, Verdict::Fail);
    }
}
