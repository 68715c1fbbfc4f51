//! The running XMPP server-to-server edge: inbound listeners (`xmpp_s2s` with STARTTLS,
//! `xmpp_s2s_direct_tls` for XEP-0368), the outbound manager owning the hub's s2s outbox, and
//! dialback verification. Every connection is a thin driver ([`conn`]) over the sans-IO
//! [`S2sNegotiator`](crate::xmpp::s2s_negotiate::S2sNegotiator); federation policy is read
//! from the hub's live configuration ([`policy`]). Nothing here parses XML or decides routing:
//! authenticated stanzas become envelopes and go to [`Hub::submit`](crate::gateway::Hub).
//!
//! Layout: `io` (STARTTLS-able transport), `conn` (driver), `dial` (outbound connect and
//! failover), `inbound`, `outbound`, `verify` (XEP-0220 verification streams), `policy`,
//! `metrics`.

pub mod conn;
pub mod dial;
pub mod inbound;
pub mod io;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod verify;

use crate::config::{Config, Domain, Secret};
use crate::dns::{Resolver, Target};
use crate::gateway::Hub;
use crate::tls::{ClientTls, ServerTls, TlsError, TlsSettings};
use dashmap::DashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Why the s2s edge cannot start. Checked before any listener is bound.
#[derive(Debug, thiserror::Error)]
pub enum S2sError {
    #[error("s2s TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("s2s DNS resolver: {0}")]
    Dns(#[from] crate::dns::DnsError),
    #[error("cannot read xmpp.federation.dialback_secret_file {path}: {source}")]
    Secret {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the {what} listener needs a TLS certificate ([tls] cert/key or a local_domain cert)")]
    NeedsCertificate { what: &'static str },
    #[error("cannot bind the {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What every s2s task shares.
pub struct Shared {
    pub hub: Arc<Hub>,
    /// `None`: no certificate configured; STARTTLS is not offered (policy decides whether
    /// plaintext is acceptable, and by default it is not).
    pub server_tls: Option<ServerTls>,
    /// `None`: no trust bundle; outbound TLS is impossible.
    pub client_tls: Option<ClientTls>,
    pub have_client_cert: bool,
    pub resolver: Arc<Resolver>,
    /// XEP-0185 secret for dialback keys.
    pub secret: String,
    /// Targets that override DNS for a domain (tests; a static route).
    pub static_targets: Arc<DashMap<Domain, Vec<Target>>>,
    /// Bytes the edge itself sends toward a peer (XEP-0199 answers), via the outbound manager.
    pub raw_out: tokio::sync::mpsc::Sender<outbound::RawOut>,
    /// What `/status` shows about each outbound pair.
    pub pairs: Arc<DashMap<(Domain, Domain), PairStatus>>,
    /// Dialback verifications in flight, per foreign domain and in total (issue 10 item 4).
    pub verify_gate: Arc<verify::VerifyGate>,
}

/// The admin view of one outbound (local, remote) pair.
#[derive(Debug, Clone, Default)]
pub struct PairStatus {
    pub up: bool,
    /// `external` or `dialback` on the current (or last) stream.
    pub auth: Option<&'static str>,
    /// The target of the current (or last) stream.
    pub target: Option<String>,
    pub connects: u64,
    pub failures: u64,
    pub last_failure: Option<String>,
}

impl Shared {
    /// Updates the status of a pair in place.
    pub fn pair_status(&self, local: &Domain, remote: &Domain, f: impl FnOnce(&mut PairStatus)) {
        let mut e = self
            .pairs
            .entry((local.clone(), remote.clone()))
            .or_default();
        f(e.value_mut());
    }
}

impl Shared {
    pub fn stream_limits(&self) -> crate::xmpp::stream::Limits {
        crate::xmpp::stream::Limits {
            max_stanza_bytes: self.hub.config().limits.xmpp_max_stanza_bytes,
            ..Default::default()
        }
    }
}

/// Options not in the configuration file.
#[derive(Default, Clone)]
pub struct S2sOptions {
    /// A resolver to use instead of the system one (tests point it at a loopback dnsmasq).
    pub resolver: Option<Arc<Resolver>>,
    /// DNS overrides, consulted before the resolver; may be filled after `start`.
    pub static_targets: Arc<DashMap<Domain, Vec<Target>>>,
    /// The server TLS material the node built (shared with the SIP edge, rotated on reload);
    /// `None`: built here from the configuration.
    pub server_tls: Option<ServerTls>,
    /// Likewise for the client side (outbound streams, dialback verification).
    pub client_tls: Option<ClientTls>,
}

/// A started s2s edge: the addresses its listeners bound, to announce.
#[derive(Debug)]
pub struct S2sHandle {
    pub listeners: Vec<(&'static str, SocketAddr)>,
}

fn dialback_secret(cfg: &Config) -> Result<String, S2sError> {
    match &cfg.xmpp.federation.dialback_secret {
        Some(Secret::Inline(s)) => Ok(s.clone()),
        Some(Secret::File(p)) => std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .map_err(|source| S2sError::Secret {
                path: p.clone(),
                source,
            }),
        // XEP-0185 §3: a random secret per process is fine for a single node.
        None => Ok(hex::encode(rand::random::<[u8; 32]>())),
    }
}

/// Everything the edge needs, built and checked from the configuration before any port is
/// bound (style.md §6): TLS material, the dialback secret, the resolver.
pub struct Prepared {
    shared: Arc<Shared>,
    raw_rx: tokio::sync::mpsc::Receiver<outbound::RawOut>,
}

/// Builds the edge's shared state from the hub's configuration; binds nothing.
pub fn prepare(hub: Arc<Hub>, opts: S2sOptions) -> Result<Prepared, S2sError> {
    let cfg = hub.config();
    let settings = TlsSettings::from_config(&cfg);
    let have_cert = settings.default_cert.is_some() || !settings.domain_certs.is_empty();
    let server_tls = match opts.server_tls {
        Some(s) => Some(s),
        None if have_cert => Some(ServerTls::new(&settings)?),
        None => None,
    };
    let client_tls = if let Some(c) = opts.client_tls {
        Some(c)
    } else if settings.trust_bundle.is_some() {
        Some(ClientTls::new(&settings)?)
    } else {
        tracing::warn!(
            "tls.trust_bundle is not set: outbound s2s cannot verify peers, so it cannot use \
             TLS; domains whose policy requires TLS (the default) will be unreachable"
        );
        None
    };
    if !have_cert && cfg.listeners.xmpp_s2s.is_some() {
        tracing::warn!(
            "no certificate for the s2s listener: STARTTLS is not offered, so only domains \
             with tls = \"optional\" can federate inbound"
        );
    }
    if server_tls.is_none() && cfg.listeners.xmpp_s2s_direct_tls.is_some() {
        return Err(S2sError::NeedsCertificate {
            what: "xmpp_s2s_direct_tls",
        });
    }
    let resolver = match opts.resolver {
        Some(r) => r,
        None => Arc::new(Resolver::from_config(&cfg)?),
    };
    let (raw_out, raw_rx) = tokio::sync::mpsc::channel(256);
    Ok(Prepared {
        raw_rx,
        shared: Arc::new(Shared {
            hub: hub.clone(),
            server_tls,
            client_tls,
            have_client_cert: have_cert,
            resolver,
            secret: dialback_secret(&cfg)?,
            static_targets: opts.static_targets,
            raw_out,
            pairs: Arc::new(DashMap::new()),
            verify_gate: Arc::default(),
        }),
    })
}

impl Prepared {
    /// Binds the listeners, registers the hub's s2s outbox and starts the accept loops and the
    /// outbound manager as tasks in `tasks`, all stopping on `shutdown`.
    pub async fn spawn(
        self,
        shutdown: watch::Receiver<bool>,
        tasks: &mut JoinSet<()>,
    ) -> Result<S2sHandle, S2sError> {
        let Prepared { shared, raw_rx } = self;
        let cfg = shared.hub.config();
        let mut bound = Vec::new();
        for (what, addr, direct) in [
            ("xmpp_s2s", cfg.listeners.xmpp_s2s, false),
            (
                "xmpp_s2s_direct_tls",
                cfg.listeners.xmpp_s2s_direct_tls,
                true,
            ),
        ] {
            let Some(addr) = addr else { continue };
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| S2sError::Bind { what, addr, source })?;
            bound.push((what, l.local_addr().unwrap_or(addr), l, direct));
        }
        let pairs = shared.pairs.clone();
        let listening: Vec<String> = bound
            .iter()
            .map(|(w, a, _, _)| format!("{w} {a}"))
            .collect();
        shared.hub.add_status(
            "s2s",
            Arc::new(move || {
                let mut out: Vec<serde_json::Value> = pairs
                    .iter()
                    .map(|e| {
                        let ((local, remote), s) = (e.key(), e.value());
                        serde_json::json!({
                            "local": local.to_string(),
                            "remote": remote.to_string(),
                            "up": s.up,
                            "auth": s.auth,
                            "target": s.target,
                            "connects": s.connects,
                            "failures": s.failures,
                            "last_failure": s.last_failure,
                        })
                    })
                    .collect();
                out.sort_by_key(|v| (v["local"].to_string(), v["remote"].to_string()));
                serde_json::json!({ "listeners": listening, "outbound": out })
            }),
        );
        let mut listeners = Vec::new();
        for (what, addr, l, direct) in bound {
            listeners.push((what, addr));
            tasks.spawn(inbound::serve(shared.clone(), l, direct, shutdown.clone()));
        }
        // One outbox for all domains in front of the per-pair queues: the manager only
        // dispatches, so a few bursts' worth is enough; the per-domain bound is enforced by the
        // pair queues.
        let outbox = shared
            .hub
            .register_s2s(cfg.limits.outbound_queue_per_domain.clamp(1024, 65_536));
        tasks.spawn(outbound::manager(shared, outbox, raw_rx, shutdown));
        Ok(S2sHandle { listeners })
    }
}

/// [`prepare`] then [`Prepared::spawn`].
pub async fn start(
    hub: Arc<Hub>,
    opts: S2sOptions,
    shutdown: watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) -> Result<S2sHandle, S2sError> {
    prepare(hub, opts)?.spawn(shutdown, tasks).await
}
