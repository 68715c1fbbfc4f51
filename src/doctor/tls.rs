//! Step 4: the TLS handshake with the partner, as our client side runs it (our certificate
//! presented, SNI = the partner's domain), but *recording* instead of refusing: the chain is
//! verified by rustls' webpki verifier against `tls.trust_bundle` and the outcome is kept, the
//! handshake continues, and the leaf is then judged by [`assess`] — chain, names (RFC 6125
//! through `tls::matches_domain` / `matches_xmpp_domain`), EKU (RFC 5280 §4.2.1.12: serverAuth,
//! plus clientAuth when the partner must present the same certificate to us, as Lync edges
//! do), expiry (fail when expired, warn under 30 days). A failed verdict stops the run before
//! any protocol byte is sent over the unverified connection.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::policy::Plan;
use super::{Budget, Protocol, Step, StepKind};
use crate::config::{Config, Domain};
use crate::tls::{
    load_trust_bundle, matches_domain, matches_xmpp_domain, server_name, ClientTls, HandshakeError,
    PeerCert, TlsFailure, TlsSettings,
};

/// Below this many days of validity left, the step warns.
pub const EXPIRY_WARN_DAYS: i64 = 30;

/// The chain verdict as webpki gave it, and the chain the partner sent.
#[derive(Debug, Default)]
struct Seen {
    chain: Vec<CertificateDer<'static>>,
    /// `None`: valid chain (names aside: those are judged with our own RFC 6125 matching,
    /// which also knows XMPP SRV-IDs and xmppAddrs).
    chain_error: Option<CertificateError>,
}

/// A server-certificate verifier that asks webpki, remembers the answer and lets the
/// handshake finish so that the certificate can be explained.
#[derive(Debug)]
struct Recording {
    inner: Arc<WebPkiServerVerifier>,
    seen: Arc<Mutex<Seen>>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let r = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        let chain_error = match r {
            Ok(_) => None,
            // webpki checks the name last: a name error means the chain itself is good.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => None,
            Err(rustls::Error::InvalidCertificate(c)) => Some(c),
            Err(_) => Some(CertificateError::BadEncoding),
        };
        if let Ok(mut s) = self.seen.lock() {
            s.chain = std::iter::once(end_entity.clone().into_owned())
                .chain(intermediates.iter().map(|c| c.clone().into_owned()))
                .collect();
            s.chain_error = chain_error;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Everything the TLS verdict is decided from (no I/O).
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub version: String,
    pub suite: String,
    pub chain_error: Option<CertificateError>,
    pub leaf: Option<PeerCert>,
    /// Leaf validity end, seconds since the Unix epoch.
    pub not_after: Option<i64>,
    pub chain_len: usize,
}

/// Step 4's verdict. `now` in seconds since the Unix epoch.
pub fn assess(obs: &Observed, domain: &Domain, plan: &Plan, now: i64) -> Step {
    let k = StepKind::Tls;
    let d = domain.as_str();
    let mut details = vec![
        format!("{} with {}", obs.version, obs.suite),
        format!("chain of {} certificate(s)", obs.chain_len),
    ];
    let Some(leaf) = &obs.leaf else {
        return Step::fail(
            k,
            "the partner sent no readable certificate",
            format!("ask {d} to install a certificate for {d} issued by a CA we trust"),
        )
        .with_details(details);
    };
    let names: Vec<&str> = leaf.xmpp_ids().collect();
    details.push(format!("certificate names: {}", names.join(", ")));
    let days_left = obs.not_after.map(|t| (t - now).div_euclid(86_400));
    if let Some(days) = days_left {
        details.push(format!("expires in {days} day(s)"));
    }
    match &obs.chain_error {
        None => details.push("chain verified against tls.trust_bundle".into()),
        Some(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            return Step::fail(
                k,
                format!("the certificate of {d} has expired"),
                format!("ask {d} to renew their certificate"),
            )
            .with_details(details)
        }
        Some(CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }) => {
            return Step::fail(
                k,
                format!("the certificate of {d} is not valid yet"),
                "check the clock of this host and of the partner",
            )
            .with_details(details)
        }
        Some(CertificateError::UnknownIssuer) => {
            return Step::fail(
                k,
                format!("the certificate of {d} does not chain to our trust bundle"),
                format!(
                    "add the CA that issued {d}'s certificate to tls.trust_bundle, or ask {d} \
                     to send its intermediate certificates"
                ),
            )
            .with_details(details)
        }
        Some(CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }) => {
            return Step::fail(
                k,
                format!("the certificate of {d} is not valid for TLS servers (no serverAuth EKU)"),
                format!("ask {d} for a certificate with the serverAuth extended key usage"),
            )
            .with_details(details)
        }
        Some(e) => {
            return Step::fail(
                k,
                format!("the certificate of {d} was refused: {e:?}"),
                format!("ask {d} for a valid certificate issued by a CA in tls.trust_bundle"),
            )
            .with_details(details)
        }
    }
    let name_ok = match plan.protocol {
        Protocol::Sip => matches_domain(leaf, domain),
        Protocol::Xmpp => matches_xmpp_domain(leaf, domain),
    };
    if !name_ok {
        return Step::fail(
            k,
            format!(
                "the certificate does not name {d} (it names {})",
                names.join(", ")
            ),
            format!(
                "ask {d} to present a certificate whose subjectAltName contains {d} (RFC 6125; \
                 the SRV target host does not count)"
            ),
        )
        .with_details(details);
    }
    if !leaf.server_auth_eku {
        return Step::fail(
            k,
            "the certificate lacks the serverAuth extended key usage",
            format!("ask {d} for a certificate with serverAuth"),
        )
        .with_details(details);
    }
    if days_left.is_some_and(|n| n < 0) {
        return Step::fail(
            k,
            format!("the certificate of {d} has expired"),
            format!("ask {d} to renew their certificate"),
        )
        .with_details(details);
    }
    let mut step = Step::ok(
        k,
        format!("{} {}, certificate valid for {d}", obs.version, obs.suite),
    )
    .with_details(details);
    // Lync/Skype edges connect to us with the same certificate: without clientAuth our inbound
    // edge refuses it (tls::check_peer), unless the domain tolerates it.
    if plan.protocol == Protocol::Sip && !leaf.client_auth_eku {
        if plan.tolerate_no_client_auth_eku {
            step.downgrade(
                "no clientAuth EKU; accepted because tolerate_no_client_auth_eku = true".into(),
                format!("ask {d} for a certificate with clientAuth as well"),
            );
        } else {
            return Step::fail(
                k,
                format!(
                    "the certificate of {d} lacks the clientAuth extended key usage: our edge \
                     will refuse it when {d} connects to us"
                ),
                format!(
                    "ask {d} for a certificate with both serverAuth and clientAuth, or set \
                     tolerate_no_client_auth_eku = true for {d} in [[sip.federated_domain]]"
                ),
            )
            .with_details(step.details);
        }
    }
    if plan.protocol == Protocol::Xmpp && !leaf.client_auth_eku {
        // Our s2s edge accepts a serverAuth-only certificate from a connecting server (see
        // tls::verify); other servers may not, when this partner connects to them.
        step.details
            .push("no clientAuth EKU (accepted by our s2s edge, refused by some servers)".into());
    }
    if let Some(days) = days_left.filter(|n| *n < EXPIRY_WARN_DAYS) {
        step.downgrade(
            format!("the certificate expires in {days} day(s)"),
            format!("ask {d} to renew their certificate soon"),
        );
    }
    step
}

/// Why a handshake did not finish, as a step.
pub fn handshake_failed(e: &HandshakeError, domain: &Domain) -> Step {
    let d = domain.as_str();
    let fix = match e.failure {
        TlsFailure::NoSharedCipher | TlsFailure::ProtocolVersion => format!(
            "{d} ended the handshake: either we share no TLS 1.2/1.3 ECDHE-GCM suite (ask them \
             to enable TLS 1.2 with ECDHE AES-GCM; check tls.min_version too), or it has no \
             certificate for the name we asked for (SNI = {d}) on that port"
        ),
        TlsFailure::NotTls => format!(
            "the target does not speak TLS: it is a plain-TCP port, or the SRV record points at \
             the wrong port; ask {d} to check it"
        ),
        TlsFailure::Timeout => format!(
            "{d} did not finish the handshake in time: check the partner's load and firewall"
        ),
        TlsFailure::Eof | TlsFailure::BadCertificate => format!(
            "{d} closed the handshake: it probably refused our certificate (make sure {d} \
             trusts the CA of our certificate and that it carries clientAuth)"
        ),
        _ => format!("check the partner's TLS configuration ({})", e.source),
    };
    Step::fail(
        StepKind::Tls,
        format!("TLS handshake failed: {} ({})", e.failure, e.source),
        fix,
    )
}

/// A recording client configuration: ours (our certificate for `local`), with the verifier
/// swapped for [`Recording`].
fn connector(
    cfg: &Config,
    local: Option<&Domain>,
) -> Result<(TlsConnector, Arc<Mutex<Seen>>), String> {
    let settings = TlsSettings::from_config(cfg);
    let client = ClientTls::new(&settings).map_err(|e| e.to_string())?;
    let bundle = settings
        .trust_bundle
        .as_ref()
        .ok_or_else(|| "tls.trust_bundle is not set".to_string())?;
    let roots = load_trust_bundle(bundle).map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = WebPkiServerVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(|e| e.to_string())?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut config = (*client.config(local)).clone();
    config
        .dangerous()
        .set_certificate_verifier(Arc::new(Recording {
            inner,
            seen: seen.clone(),
        }));
    Ok((TlsConnector::from(Arc::new(config)), seen))
}

/// What a finished handshake showed, with the stream.
pub struct Handshake<IO> {
    pub stream: TlsStream<IO>,
    pub observed: Observed,
}

/// Runs the handshake toward `domain` over `io` (TCP, or the stream after `<proceed/>`).
/// `Err` is the failed step.
pub async fn handshake<IO>(
    cfg: &Config,
    local: Option<&Domain>,
    domain: &Domain,
    io: IO,
    budget: &Budget,
) -> Result<Handshake<IO>, Step>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let (conn, seen) = connector(cfg, local).map_err(|e| {
        Step::fail(
            StepKind::Tls,
            format!("our TLS configuration is not usable: {e}"),
            "set tls.trust_bundle (and tls.cert/tls.key) so that `legate check` passes",
        )
    })?;
    let limit = budget.step();
    let stream = match tokio::time::timeout(limit, conn.connect(server_name(domain), io)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(handshake_failed(&HandshakeError::from_io(e), domain)),
        Err(_) => {
            return Err(handshake_failed(
                &HandshakeError {
                    failure: TlsFailure::Timeout,
                    source: std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"),
                },
                domain,
            ))
        }
    };
    let c = stream.get_ref().1;
    let (chain, chain_error) = match seen.lock() {
        Ok(mut s) => (std::mem::take(&mut s.chain), s.chain_error.take()),
        Err(_) => (Vec::new(), None),
    };
    let leaf_der = chain.first();
    let observed = Observed {
        version: c
            .protocol_version()
            .map(|v| format!("{v:?}").replace('_', "."))
            .unwrap_or_else(|| "unknown version".into()),
        suite: c
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_else(|| "unknown suite".into()),
        chain_error,
        leaf: leaf_der.and_then(|l| PeerCert::from_der(l.as_ref()).ok()),
        not_after: leaf_der.and_then(|l| {
            x509_parser::parse_x509_certificate(l.as_ref())
                .ok()
                .map(|(_, c)| c.validity().not_after.timestamp())
        }),
        chain_len: chain.len(),
    };
    Ok(Handshake { stream, observed })
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64
}

/// Step 4 for SIP: direct TLS on the reached target; the stream when the verdict allows going on.
pub async fn sip_handshake<IO>(
    cfg: &Config,
    local: Option<&Domain>,
    domain: &Domain,
    plan: &Plan,
    io: IO,
    budget: &Budget,
) -> (Step, Option<TlsStream<IO>>)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    match handshake(cfg, local, domain, io, budget).await {
        Err(step) => (step, None),
        Ok(h) => {
            let step = assess(&h.observed, domain, plan, now_secs());
            let go_on = step.verdict != super::Verdict::Fail;
            (step, go_on.then_some(h.stream))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::S2sAuth;
    use crate::doctor::Verdict;

    fn plan(p: Protocol, tolerate: bool) -> Plan {
        Plan {
            protocol: p,
            route: None,
            tolerate_no_client_auth_eku: tolerate,
            auth: S2sAuth::ExternalOrDialback,
            tls_required: true,
        }
    }

    fn leaf(names: &[&str], client: bool) -> PeerCert {
        PeerCert {
            dns_ids: names.iter().map(|s| s.to_string()).collect(),
            srv_ids: Vec::new(),
            xmpp_addrs: Vec::new(),
            ip_addrs: Vec::new(),
            client_auth_eku: client,
            server_auth_eku: true,
            leaf_der: Vec::new(),
        }
    }

    fn obs(leaf: PeerCert, err: Option<CertificateError>, days: i64) -> Observed {
        Observed {
            version: "TLSv1.3".into(),
            suite: "TLS13_AES_256_GCM_SHA384".into(),
            chain_error: err,
            leaf: Some(leaf),
            not_after: Some(1_000_000_000 + days * 86_400 + 10),
            chain_len: 1,
        }
    }

    fn dom() -> Domain {
        Domain::parse("lync.test").unwrap_or_else(|e| panic!("{e}"))
    }

    const NOW: i64 = 1_000_000_000;

    #[test]
    fn healthy_certificate_is_ok() {
        let s = assess(
            &obs(leaf(&["lync.test"], true), None, 365),
            &dom(),
            &plan(Protocol::Sip, false),
            NOW,
        );
        assert_eq!(s.verdict, Verdict::Ok, "{s:?}");
        assert!(s.fix.is_none());
    }

    #[test]
    fn wrong_name_fails_naming_both() {
        let s = assess(
            &obs(leaf(&["other.test"], true), None, 365),
            &dom(),
            &plan(Protocol::Sip, false),
            NOW,
        );
        assert_eq!(s.verdict, Verdict::Fail);
        assert!(
            s.summary.contains("other.test") && s.summary.contains("lync.test"),
            "{s:?}"
        );
    }

    #[test]
    fn expired_and_expiring() {
        let s = assess(
            &obs(
                leaf(&["lync.test"], true),
                Some(CertificateError::Expired),
                -3,
            ),
            &dom(),
            &plan(Protocol::Sip, false),
            NOW,
        );
        assert_eq!(s.verdict, Verdict::Fail);
        assert!(s.fix.as_deref().is_some_and(|f| f.contains("renew")));
        let s = assess(
            &obs(leaf(&["lync.test"], true), None, 10),
            &dom(),
            &plan(Protocol::Sip, false),
            NOW,
        );
        assert_eq!(s.verdict, Verdict::Warn);
        assert!(
            s.details.iter().any(|d| d.contains("expires in 10 day")),
            "{s:?}"
        );
    }

    #[test]
    fn missing_client_auth_fails_unless_tolerated() {
        let s = assess(
            &obs(leaf(&["lync.test"], false), None, 365),
            &dom(),
            &plan(Protocol::Sip, false),
            NOW,
        );
        assert_eq!(s.verdict, Verdict::Fail);
        assert!(s
            .fix
            .as_deref()
            .is_some_and(|f| f.contains("tolerate_no_client_auth_eku")));
        let s = assess(
            &obs(leaf(&["lync.test"], false), None, 365),
            &dom(),
            &plan(Protocol::Sip, true),
            NOW,
        );
        assert_eq!(s.verdict, Verdict::Warn);
        // XMPP servers are not asked for clientAuth by this step.
        let s = assess(
            &obs(leaf(&["lync.test"], false), None, 365),
            &dom(),
            &plan(Protocol::Xmpp, false),
            NOW,
        );
        assert_eq!(s.verdict, Verdict::Ok);
    }

    #[test]
    fn unknown_ca_says_trust_bundle() {
        let s = assess(
            &obs(
                leaf(&["lync.test"], true),
                Some(CertificateError::UnknownIssuer),
                365,
            ),
            &dom(),
            &plan(Protocol::Sip, false),
            NOW,
        );
        assert_eq!(s.verdict, Verdict::Fail);
        assert!(s
            .fix
            .as_deref()
            .is_some_and(|f| f.contains("tls.trust_bundle")));
    }
}
