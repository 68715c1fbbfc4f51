//! Steps 4 and 5 for XMPP partners: STARTTLS on an `_xmpp-server` target (or direct TLS on an
//! `_xmpps-server` one, XEP-0368), the handshake judged as for SIP, then an s2s stream opened
//! as our outbound edge opens it — the gateway's own sans-IO [`S2sNegotiator`] writes our
//! headers and decides STARTTLS, SASL EXTERNAL (XEP-0178) or dialback (XEP-0220); this file is
//! only its thin driver plus the verdict ([`protocol_verdict`]) on what the partner offered
//! and how authentication ended. Dialback is only tried when `dialback_secret` is configured:
//! the partner asks our running node to confirm the key, and only a shared secret lets that
//! node confirm a key the doctor made.

use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::policy::Plan;
use super::tls::{assess, handshake, now_secs};
use super::{Budget, Step, StepKind, Verdict};
use crate::config::{Config, Domain, S2sAuth, Secret};
use crate::dns::{Target, Transport};
use crate::tls::{matches_xmpp_domain, TlsSettings};
use crate::xmpp::s2s::io::{BoxIo, Rewind};
use crate::xmpp::s2s_negotiate::{
    AuthMethod, Features, Phase, S2sAction, S2sConfig, S2sNegotiator, S2sPolicy,
};
use crate::xmpp::stream::{Limits, StreamEvent, StreamFramer};

/// How the stream ended for the doctor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Authenticated(AuthMethod),
    /// The negotiator or the partner ended the stream (stream error, refused STARTTLS, ...).
    Failed(String),
    /// Dialback would be next, but without a configured secret our node could not confirm it.
    DialbackNotTried,
    /// No answer in time; the phase we were waiting in.
    TimedOut(Phase),
    Io(String),
}

/// What the partner showed on the stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    pub before_tls: Option<Features>,
    pub after_tls: Option<Features>,
    /// TLS was established (the partner may end the stream instead of offering nothing:
    /// Prosody sends `undefined-condition` "No stream features to offer").
    pub tls: bool,
}

fn describe(f: &Features) -> String {
    let mut parts = Vec::new();
    match f.starttls {
        Some(true) => parts.push("STARTTLS (required)".to_string()),
        Some(false) => parts.push("STARTTLS".to_string()),
        None => {}
    }
    if !f.mechanisms.is_empty() {
        parts.push(format!("SASL {}", f.mechanisms.join(" ")));
    }
    if f.dialback {
        parts.push("dialback".into());
    }
    if parts.is_empty() {
        "nothing".into()
    } else {
        parts.join(", ")
    }
}

/// Step 5's verdict for XMPP.
pub fn protocol_verdict(
    seen: &Seen,
    outcome: &Outcome,
    domain: &str,
    local: &str,
    plan: &Plan,
) -> Step {
    let k = StepKind::Protocol;
    let mut details = Vec::new();
    if let Some(f) = &seen.before_tls {
        details.push(format!("offered before TLS: {}", describe(f)));
    }
    if let Some(f) = &seen.after_tls {
        details.push(format!("offered after TLS: {}", describe(f)));
    }
    let external = seen
        .after_tls
        .as_ref()
        .is_some_and(|f| f.mechanisms.iter().any(|m| m == "EXTERNAL"));
    let dialback = seen.after_tls.as_ref().is_some_and(|f| f.dialback);
    let trust_us = format!(
        "ask {domain} to trust the CA of our certificate (so that it offers SASL EXTERNAL to \
         {local}) or to enable server dialback"
    );
    let dialback_fix = format!(
        "{domain} could not verify our dialback key: it must resolve {local} and reach our s2s \
         listener, and every node must share xmpp.federation.dialback_secret; or {trust_us}"
    );
    let step = match outcome {
        Outcome::Authenticated(AuthMethod::SaslExternal) => Step::ok(
            k,
            format!("s2s stream authenticated {local} -> {domain} by SASL EXTERNAL with our certificate"),
        ),
        Outcome::Authenticated(AuthMethod::Dialback) => Step::ok(
            k,
            format!("s2s stream authenticated {local} -> {domain} by dialback"),
        ),
        Outcome::DialbackNotTried => {
            let mut s = Step::ok(
                k,
                format!("{domain} offers dialback (not SASL EXTERNAL for our certificate)"),
            );
            s.downgrade(
                "dialback not tried: without xmpp.federation.dialback_secret the running node \
                 could not confirm a key made here"
                    .into(),
                format!(
                    "{domain} must reach our s2s listener to verify dialback; for certificate \
                     authentication, {trust_us}"
                ),
            );
            s
        }
        Outcome::Failed(text) if !external && !dialback && seen.tls => Step::fail(
            k,
            format!(
                "{domain} offers no way to authenticate us: no SASL EXTERNAL for our \
                 certificate and no dialback ({text})"
            ),
            trust_us.clone(),
        ),
        Outcome::Failed(text) if text.contains("dialback") => Step::fail(
            k,
            format!("{domain} refused dialback: {text}"),
            dialback_fix.clone(),
        ),
        Outcome::TimedOut(Phase::AwaitDialbackResult) => Step::fail(
            k,
            format!("{domain} did not confirm our dialback key in time (dialback not completed)"),
            dialback_fix.clone(),
        ),
        Outcome::Failed(text) if text.contains("SASL EXTERNAL") => Step::fail(
            k,
            format!("{domain} refused SASL EXTERNAL with our certificate: {text}"),
            format!("ask {domain} to accept our certificate for {local} (its name and CA)"),
        ),
        Outcome::Failed(text) if text.contains("does not offer") || text.contains("STARTTLS") => {
            Step::fail(
                k,
                format!("{domain}: {text}"),
                format!(
                    "ask {domain} to enable TLS on s2s, or set tls = \"optional\" for {domain} \
                     in [[xmpp.federation.domain]] (not recommended)"
                ),
            )
        }
        Outcome::Failed(text) => Step::fail(
            k,
            format!("the s2s stream failed: {text}"),
            format!("read the reason above; {domain}'s server log names it too"),
        ),
        Outcome::TimedOut(p) => Step::fail(
            k,
            format!("{domain} did not answer in time (waiting in phase {p:?})"),
            format!("{domain}'s server accepts TCP but does not speak s2s in time: ask them to check it"),
        ),
        Outcome::Io(e) => Step::fail(
            k,
            format!("the connection broke: {e}"),
            format!("{domain} closed the stream: it may have refused our certificate or our domain; check its log"),
        ),
    };
    let mut step = step.with_details(details);
    if plan.auth == S2sAuth::ExternalOnly
        && matches!(
            outcome,
            Outcome::Authenticated(AuthMethod::Dialback) | Outcome::DialbackNotTried
        )
    {
        step = Step::fail(
            k,
            format!("{domain} does not accept our certificate, and our policy is external_only"),
            trust_us,
        )
        .with_details(step.details);
    }
    step
}

/// The thin driver: transport, framer and negotiator.
struct Drive {
    io: BoxIo,
    framer: StreamFramer,
    m: S2sNegotiator,
    seen: Seen,
    tls: bool,
    dialback_ok: bool,
}

enum Stop {
    StartTls,
    Done(Outcome),
}

impl Drive {
    /// Carries out the machine's actions; `Some` when the run must stop.
    async fn act(&mut self, acts: Vec<S2sAction>) -> Option<Stop> {
        for a in acts {
            match a {
                S2sAction::SendBytes(b) => {
                    let w = async {
                        self.io.write_all(&b).await?;
                        self.io.flush().await
                    };
                    if let Err(e) = w.await {
                        return Some(Stop::Done(Outcome::Io(e.to_string())));
                    }
                }
                S2sAction::ResetFramer => self.framer.reset(),
                S2sAction::StartTls => return Some(Stop::StartTls),
                S2sAction::Authenticated { method, .. } => {
                    return Some(Stop::Done(Outcome::Authenticated(method)))
                }
                S2sAction::Fail { text, .. } => return Some(Stop::Done(Outcome::Failed(text))),
                S2sAction::Closed => {
                    return Some(Stop::Done(Outcome::Failed(
                        "the partner closed the stream".into(),
                    )))
                }
                S2sAction::Deliver(_)
                | S2sAction::VerifyAnswer(_)
                | S2sAction::VerifyDialback { .. } => {}
            }
        }
        None
    }

    /// Reads and feeds the machine until it stops or `deadline`.
    async fn until_stop(&mut self, deadline: Instant) -> Stop {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            loop {
                let ev = match self.framer.next_event() {
                    Ok(Some(ev)) => ev,
                    Ok(None) => break,
                    Err(e) => {
                        let acts = self.m.handle_framing_error(&e);
                        let _ = self.act(acts).await;
                        return Stop::Done(Outcome::Failed(format!(
                            "bad XML from the partner: {e}"
                        )));
                    }
                };
                if let StreamEvent::Stanza(s) = &ev {
                    if s.name() == "features" {
                        let f = Features::parse(s);
                        if self.tls {
                            self.seen.after_tls.get_or_insert(f);
                        } else {
                            self.seen.before_tls.get_or_insert(f);
                        }
                    }
                }
                let acts = self.m.handle_event(&ev);
                if self.m.phase() == Phase::AwaitDialbackResult && !self.dialback_ok {
                    return Stop::Done(Outcome::DialbackNotTried);
                }
                if let Some(stop) = self.act(acts).await {
                    return stop;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.io.read(&mut buf)).await {
                Err(_) => return Stop::Done(Outcome::TimedOut(self.m.phase())),
                Ok(Ok(0)) => {
                    return Stop::Done(Outcome::Io("the partner closed the connection".into()))
                }
                Ok(Ok(n)) => self.framer.push(buf.get(..n).unwrap_or(&[])),
                Ok(Err(e)) => return Stop::Done(Outcome::Io(e.to_string())),
            }
        }
    }
}

fn secret(cfg: &Config) -> Option<String> {
    match &cfg.xmpp.federation.dialback_secret {
        Some(Secret::Inline(s)) => Some(s.clone()),
        Some(Secret::File(p)) => std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string()),
        None => None,
    }
}

/// Steps 4 and 5 for XMPP over the TCP connection of step 3.
pub async fn steps(
    cfg: &Config,
    local: Option<&Domain>,
    domain: &Domain,
    plan: &Plan,
    target: &Target,
    tcp: TcpStream,
    budget: &Budget,
) -> Vec<Step> {
    let Some(local) = local else {
        return vec![Step::fail(
            StepKind::Tls,
            "no [[local_domain]] configured: we have no domain to open a stream from",
            "add a [[local_domain]] with its certificate",
        )];
    };
    let settings = TlsSettings::from_config(cfg);
    let have_cert = settings.default_cert.is_some() || !settings.domain_certs.is_empty();
    let known_secret = secret(cfg);
    let mut mc = S2sConfig::initiating(
        local.as_str(),
        domain.as_str(),
        known_secret.as_deref().unwrap_or("doctor-unused"),
    );
    mc.policy = S2sPolicy {
        tls_required: plan.tls_required,
        sasl_external_allowed: plan.auth != S2sAuth::DialbackOnly,
        dialback_allowed: plan.auth != S2sAuth::ExternalOnly,
    };
    mc.have_client_certificate = have_cert;
    mc.timeout = budget.step();
    let mut d = Drive {
        io: Box::new(tcp),
        framer: StreamFramer::new(Limits::default()),
        m: S2sNegotiator::new(mc),
        seen: Seen::default(),
        tls: false,
        dialback_ok: known_secret.is_some(),
    };
    let deadline = Instant::now() + budget.step();
    let mut out = Vec::new();
    let direct = target.transport == Transport::Tls;
    let first = if direct {
        Stop::StartTls
    } else {
        let acts = d.m.start(Instant::now());
        match d.act(acts).await {
            Some(s) => s,
            None => d.until_stop(deadline).await,
        }
    };
    let stop = match first {
        Stop::Done(outcome) => {
            // Never got to TLS: the TLS step is where it failed when TLS was the question.
            if d.seen
                .before_tls
                .as_ref()
                .is_some_and(|f| f.starttls.is_none())
                && plan.tls_required
            {
                out.push(Step::fail(
                    StepKind::Tls,
                    format!("{domain} does not offer STARTTLS on {}", target.addr),
                    format!("ask {domain} to enable TLS for s2s (RFC 6120 requires it)"),
                ));
                return out;
            }
            // The stream never reached TLS: report why as the TLS step (the run stops there).
            let mut step =
                protocol_verdict(&d.seen, &outcome, domain.as_str(), local.as_str(), plan);
            if step.verdict == Verdict::Fail {
                step.kind = StepKind::Tls;
                step.summary = format!("no TLS: {}", step.summary);
                out.push(step);
            } else {
                // Only possible with tls = "optional": plaintext s2s that worked.
                out.push(Step::warn(
                    StepKind::Tls,
                    format!("the stream with {domain} runs without TLS"),
                    format!("ask {domain} to offer STARTTLS, then set tls = \"required\""),
                ));
                out.push(step);
            }
            return out;
        }
        Stop::StartTls => {
            let prefix = d.framer.take_buffered();
            d.framer.reset();
            let plain: BoxIo = d.io;
            let io = Rewind::new(prefix, plain);
            match handshake(cfg, Some(local), domain, io, budget).await {
                Err(step) => {
                    out.push(step);
                    return out;
                }
                Ok(h) => {
                    let mut step = assess(&h.observed, domain, plan, now_secs());
                    step.details.insert(
                        0,
                        if direct {
                            format!("direct TLS (XEP-0368) to {}", target.addr)
                        } else {
                            format!("STARTTLS on {}", target.addr)
                        },
                    );
                    let go_on = step.verdict != Verdict::Fail;
                    out.push(step);
                    if !go_on {
                        return out;
                    }
                    let names = h
                        .observed
                        .leaf
                        .as_ref()
                        .filter(|l| matches_xmpp_domain(l, domain))
                        .map(|_| vec![domain.as_str().to_string()])
                        .unwrap_or_default();
                    d.io = Box::new(h.stream);
                    d.tls = true;
                    d.seen.tls = true;
                    let acts = if direct {
                        d.m.start_direct_tls(Instant::now(), names)
                    } else {
                        d.m.handle_tls_established(names)
                    };
                    match d.act(acts).await {
                        Some(s) => s,
                        None => d.until_stop(deadline).await,
                    }
                }
            }
        }
    };
    let outcome = match stop {
        Stop::Done(o) => o,
        Stop::StartTls => Outcome::Failed("STARTTLS asked twice".into()),
    };
    let mut step = protocol_verdict(&d.seen, &outcome, domain.as_str(), local.as_str(), plan);
    if !have_cert && step.verdict == Verdict::Fail {
        step.details
            .push("we have no certificate to present, so SASL EXTERNAL was not tried".into());
        step.fix = Some(format!(
            "configure our certificate (tls.cert/tls.key or a cert on the [[local_domain]]); {}",
            step.fix.unwrap_or_default()
        ));
    }
    out.push(step);
    // Best effort: leave the partner a clean close.
    let _ = tokio::time::timeout(std::time::Duration::from_millis(200), async {
        let _ = d.io.write_all(b"</stream:stream>").await;
        let _ = d.io.shutdown().await;
    })
    .await;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(auth: S2sAuth) -> Plan {
        Plan {
            protocol: super::super::Protocol::Xmpp,
            route: None,
            tolerate_no_client_auth_eku: false,
            auth,
            tls_required: true,
        }
    }

    fn feats(mechs: &[&str], dialback: bool) -> Features {
        Features {
            starttls: None,
            mechanisms: mechs.iter().map(|s| s.to_string()).collect(),
            dialback,
            unknown_required: None,
        }
    }

    #[test]
    fn external_success_is_ok() {
        let seen = Seen {
            before_tls: Some(Features {
                starttls: Some(true),
                ..Features::default()
            }),
            after_tls: Some(feats(&["EXTERNAL"], true)),
            tls: true,
        };
        let s = protocol_verdict(
            &seen,
            &Outcome::Authenticated(AuthMethod::SaslExternal),
            "xmpp.test",
            "example.test",
            &plan(S2sAuth::ExternalOrDialback),
        );
        assert_eq!(s.verdict, Verdict::Ok);
        assert!(
            s.details
                .iter()
                .any(|d| d.contains("SASL EXTERNAL, dialback")),
            "{s:?}"
        );
    }

    #[test]
    fn nothing_offered_fails_with_trust_or_dialback() {
        let seen = Seen {
            before_tls: None,
            after_tls: Some(feats(&[], false)),
            tls: true,
        };
        let s = protocol_verdict(
            &seen,
            &Outcome::Failed("no authentication method both sides allow".into()),
            "xmpp.test",
            "example.test",
            &plan(S2sAuth::ExternalOrDialback),
        );
        assert_eq!(s.verdict, Verdict::Fail);
        assert!(s
            .fix
            .as_deref()
            .is_some_and(|f| f.contains("dialback") && f.contains("CA")));
    }

    #[test]
    fn dialback_only_partner_warns_or_fails_by_policy() {
        let seen = Seen {
            before_tls: None,
            after_tls: Some(feats(&[], true)),
            tls: true,
        };
        let w = protocol_verdict(
            &seen,
            &Outcome::DialbackNotTried,
            "x.test",
            "e.test",
            &plan(S2sAuth::ExternalOrDialback),
        );
        assert_eq!(w.verdict, Verdict::Warn);
        let f = protocol_verdict(
            &seen,
            &Outcome::DialbackNotTried,
            "x.test",
            "e.test",
            &plan(S2sAuth::ExternalOnly),
        );
        assert_eq!(f.verdict, Verdict::Fail);
        let r = protocol_verdict(
            &seen,
            &Outcome::Failed("dialback key rejected".into()),
            "x.test",
            "e.test",
            &plan(S2sAuth::ExternalOrDialback),
        );
        assert!(r.summary.contains("refused dialback"), "{r:?}");
    }
}
