//! Outbound s2s (issue 4 item 3): one manager task owns the hub's s2s outbox and hands each
//! envelope to the task of its (local domain, remote domain) pair — one connection per pair,
//! RFC 6120 §4.1 streams being one-way (the peer opens its own stream toward us for the other
//! direction; XEP-0288 is not used).
//!
//! A pair task connects on demand: targets in order (failover), STARTTLS or direct TLS, SASL
//! EXTERNAL with our certificate or dialback with our secret. Once a pair task runs, it
//! registers its own outbox at the hub (`limits.outbound_queue_per_domain`), so deliveries for
//! that pair skip the manager: a slow foreign server fills only its own outbox, and only the
//! readers feeding it wait (`Hub::submit_wait`); other domains are not held up. The manager
//! starts pairs and hands them what arrived before their outbox existed. When every target
//! fails, each waiting stanza is bounced to its sender with `remote-server-not-found` or
//! `remote-server-timeout`, and new ones are bounced at once until the backoff has passed: the
//! edge kit's `net::Backoff`, 1 s doubling to 60 s with jitter (so the pairs toward a domain
//! that came back do not all redial in the same second), forgotten only once a stream stayed up
//! `STABLE_AFTER` (30 s; a peer that authenticates and drops at once is not redialled at full
//! rate). Established streams send whitespace keepalives (RFC 6120 §4.6.1) and XEP-0199 pings
//! when quiet, and close after `limits.idle_timeout_secs` without a stanza.

use super::conn::{Conn, Up};
use super::dial::{open, step, targets, DialError};
use super::metrics::{BOUNCES, QUEUE, STANZAS, STREAMS};
use super::Shared;
use crate::config::Domain;
use crate::gateway::hub::Delivery;
use crate::gateway::{Envelope, ErrorCondition, Link, Origin};
use crate::net::{Backoff, LogSafe};
use crate::xmpp::convert::envelope_to_stanza;
use crate::xmpp::error::StreamErrorCondition;
use crate::xmpp::s2s_negotiate::{AuthMethod, S2sConfig};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Ids of our XEP-0199 pings; the answers arrive on the peer's inbound stream and are dropped
/// there by this prefix.
pub const PING_ID_PREFIX: &str = "legate-ping-";

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A stream that stayed up this long forgets the pair's failures (as the SIP dialer and the
/// component links do).
const STABLE_AFTER: Duration = Duration::from_secs(30);

type PairKey = (Domain, Domain);

/// What a pair task sends: an envelope from the hub, or bytes the edge itself writes (answers
/// to XEP-0199 pings, which are addressed to a domain and so are no envelope).
#[derive(Debug)]
// Envelopes are nearly all of the traffic and move by value through one channel per pair;
// boxing them would cost an allocation per stanza to save bytes on the rare `Raw`.
#[allow(clippy::large_enum_variant)]
pub enum Out {
    Env(Envelope),
    Raw(Vec<u8>),
}

/// A raw write request: (local domain, remote domain, bytes).
pub type RawOut = (Domain, Domain, Vec<u8>);

/// The manager: routes outbox deliveries to pair tasks, starting them as needed.
pub async fn manager(
    shared: Arc<Shared>,
    mut outbox: mpsc::Receiver<Delivery>,
    mut raw: mpsc::Receiver<RawOut>,
    shutdown: watch::Receiver<bool>,
) {
    let mut pairs: HashMap<PairKey, mpsc::Sender<Out>> = HashMap::new();
    let mut sd = shutdown.clone();
    loop {
        let (local, remote, out) = tokio::select! {
            _ = sd.changed() => return,
            d = outbox.recv() => match d {
                Some(Delivery { link: Link::S2s { domain }, envelope, .. }) => {
                    (envelope.from.domain.clone(), domain, Out::Env(envelope))
                }
                Some(_) => continue,
                None => return,
            },
            r = raw.recv() => match r {
                Some((l, r, b)) => (l, r, Out::Raw(b)),
                None => continue,
            },
        };
        let cfg = shared.hub.config();
        if !cfg.serves_xmpp_domain(&local) {
            tracing::warn!(%local, "s2s outbox: sender is not from a domain we serve; dropped");
            continue;
        }
        pairs.retain(|_, tx| !tx.is_closed());
        let key = (local.clone(), remote.clone());
        let mut env = out;
        // Twice at most: a pair task may have just ended (idle) between `retain` and the send.
        for attempt in 0..2 {
            let tx = pairs.entry(key.clone()).or_insert_with(|| {
                let cap = cfg.limits.outbound_queue_per_domain.max(1);
                let (tx, rx) = mpsc::channel(cap);
                // From now on the hub hands this pair's deliveries to the pair itself: a slow
                // foreign server then holds up only the readers feeding it, not this manager.
                let hub = shared.hub.register_s2s_pair(&local, &remote, cap);
                tokio::spawn(pair_task(
                    shared.clone(),
                    local.clone(),
                    remote.clone(),
                    Inbox { out: rx, hub },
                    shutdown.clone(),
                ));
                tx
            });
            let tx = tx.clone();
            // Only what reached the manager before the pair's own hub outbox existed (and raw
            // writes) comes this way, so waiting here is rare and short; a pair that takes
            // nothing for `delivery_timeout_secs` is stuck: what waited is bounced.
            let limit = Duration::from_secs(cfg.limits.delivery_timeout_secs);
            match tx.send_timeout(env, limit).await {
                Ok(()) => {
                    QUEUE.inc();
                    break;
                }
                Err(mpsc::error::SendTimeoutError::Timeout(e)) => {
                    bounce_out(
                        &shared,
                        &remote,
                        &e,
                        ErrorCondition::RemoteServerTimeout,
                        "the link toward this domain did not take the stanza in time",
                    );
                    break;
                }
                Err(mpsc::error::SendTimeoutError::Closed(e)) => {
                    pairs.remove(&key);
                    if attempt == 1 {
                        bounce_out(
                            &shared,
                            &remote,
                            &e,
                            ErrorCondition::ServiceUnavailable,
                            "the s2s link toward this domain stopped",
                        );
                        break;
                    }
                    env = e;
                }
            }
        }
    }
}

/// [`bounce`] for an envelope; raw writes are best effort and just dropped.
fn bounce_out(shared: &Shared, remote: &Domain, out: &Out, c: ErrorCondition, text: &str) {
    if let Out::Env(env) = out {
        bounce(shared, remote, env, c, text);
    }
}

/// Sends the error for `env` back to its sender, through the hub as if `remote` answered
/// (RFC 6120 §8.3.1: errors are never answered with errors; `bounce` returns `None` then).
fn bounce(shared: &Shared, remote: &Domain, env: &Envelope, c: ErrorCondition, text: &str) {
    if let Some(b) = env.bounce(c, text) {
        BOUNCES.with_label_values(&[c.label()]).inc();
        shared.hub.submit(
            &Origin::S2s {
                domain: remote.clone(),
            },
            b,
        );
    }
}

/// What a pair task receives: from the manager (the first stanzas, raw writes) and from its
/// own hub outbox (every delivery once the pair is registered).
struct Inbox {
    out: mpsc::Receiver<Out>,
    hub: mpsc::Receiver<Delivery>,
}

impl Inbox {
    /// The next item; the manager's first, since those were submitted before the pair's hub
    /// outbox existed. `None` once both are closed.
    async fn recv(&mut self) -> Option<Out> {
        tokio::select! {
            biased;
            Some(o) = self.out.recv() => {
                QUEUE.dec();
                Some(o)
            }
            Some(d) = self.hub.recv() => Some(Out::Env(d.envelope)),
            else => None,
        }
    }

    fn try_recv(&mut self) -> Option<Out> {
        if let Ok(o) = self.out.try_recv() {
            QUEUE.dec();
            return Some(o);
        }
        self.hub.try_recv().ok().map(|d| Out::Env(d.envelope))
    }
}

async fn pair_task(
    shared: Arc<Shared>,
    local: Domain,
    remote: Domain,
    mut rx: Inbox,
    shutdown: watch::Receiver<bool>,
) {
    let stopping = pair_loop(&shared, &local, &remote, &mut rx, shutdown).await;
    // Unregister while the manager still sees this task alive (its sender is not closed until
    // `rx` drops below), so it cannot have registered a successor that this would remove.
    shared.hub.unregister_s2s_pair(&local, &remote);
    // Closed both ways before draining: what the manager or the hub hands over from now on
    // fails at once and goes to a new pair, never into this ending task.
    rx.hub.close();
    rx.out.close();
    if stopping {
        return;
    }
    // Deliveries that raced the idle end go back through the hub to the manager, which starts
    // the pair again; only if that is full are they answered.
    while let Some(out) = rx.try_recv() {
        if let Out::Env(envelope) = out {
            let d = Delivery::new(
                Link::S2s {
                    domain: remote.clone(),
                },
                envelope,
            );
            if !shared.hub.deliver(d.clone()) {
                bounce(
                    &shared,
                    &remote,
                    &d.envelope,
                    ErrorCondition::ServiceUnavailable,
                    "the s2s link toward this domain stopped",
                );
            }
        }
    }
}

/// The life of one pair task; returns true on shutdown, false when it ended idle.
async fn pair_loop(
    shared: &Arc<Shared>,
    local: &Domain,
    remote: &Domain,
    rx: &mut Inbox,
    mut shutdown: watch::Receiver<bool>,
) -> bool {
    let (shared, local, remote) = (shared.clone(), local.clone(), remote.clone());
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    let mut retry_at: Option<(Instant, DialError)> = None;
    let idle = Duration::from_secs(shared.hub.config().limits.idle_timeout_secs);
    loop {
        // Wait for work; a pair with nothing to send for a whole idle period ends.
        let first = tokio::select! {
            _ = shutdown.changed() => return true,
            e = rx.recv() => match e { Some(e) => e, None => return true },
            _ = tokio::time::sleep(idle) => return false,
        };
        if let Some((at, why)) = &retry_at {
            if Instant::now() < *at {
                bounce_out(&shared, &remote, &first, why.condition(), &why.to_string());
                continue;
            }
        }
        match connect(&shared, &local, &remote).await {
            Ok((conn, auth, target)) => {
                retry_at = None;
                shared.hub.alarms().partner_connected(remote.as_str());
                let up_since = Instant::now();
                shared.pair_status(&local, &remote, |s| {
                    s.up = true;
                    s.auth = Some(auth);
                    s.target = Some(target);
                    s.connects += 1;
                });
                established(&shared, conn, &local, &remote, first, rx, &mut shutdown).await;
                if *shutdown.borrow() {
                    return true;
                }
                backoff.note_up(up_since, Instant::now(), STABLE_AFTER);
                shared.pair_status(&local, &remote, |s| s.up = false);
            }
            Err(e) => {
                shared.pair_status(&local, &remote, |s| {
                    s.up = false;
                    s.failures += 1;
                    s.last_failure = Some(e.to_string());
                });
                shared
                    .hub
                    .alarms()
                    .partner_failed_text(remote.as_str(), &e.to_string());
                // The error may quote the peer's stream-error text: escaped (net::LogSafe).
                tracing::warn!(%local, %remote, error = %LogSafe(&e.to_string()), "outbound s2s failed; bouncing queued stanzas");
                bounce_out(&shared, &remote, &first, e.condition(), &e.to_string());
                while let Some(out) = rx.try_recv() {
                    bounce_out(&shared, &remote, &out, e.condition(), &e.to_string());
                }
                let delay = backoff.next_delay(rand::random::<f64>());
                retry_at = Some((Instant::now() + delay, e));
            }
        }
    }
}

/// Connects and authenticates, failing over across targets.
/// Returns the authenticated connection, its auth method label and the target used.
async fn connect(
    shared: &Shared,
    local: &Domain,
    remote: &Domain,
) -> Result<(Conn, &'static str, String), DialError> {
    let ts = targets(shared, remote).await?;
    let mut last = DialError::NotFound(format!("{remote}: no targets"));
    for t in &ts {
        let mut mc = S2sConfig::initiating(local.as_str(), remote.as_str(), &shared.secret);
        match super::policy::policy_for(&shared.hub.config(), remote.as_str()) {
            Ok(p) => mc.policy = p,
            Err((_, text)) => return Err(DialError::NotFound(text)),
        }
        let (mut conn, mut ups) = match open(shared, mc, local, remote, t).await {
            Ok(x) => x,
            Err(e) => {
                tracing::info!(%remote, target = %t, error = %LogSafe(&e.to_string()), "s2s target failed");
                last = e;
                continue;
            }
        };
        let r = loop {
            let mut outcome = None;
            for u in std::mem::take(&mut ups) {
                match u {
                    Up::Authenticated { method, .. } => {
                        let m = match method {
                            AuthMethod::SaslExternal => "external",
                            AuthMethod::Dialback => "dialback",
                        };
                        STREAMS.with_label_values(&["outbound", m]).inc();
                        tracing::info!(%local, %remote, auth = m, target = %t, "outbound s2s authenticated");
                        outcome = Some(Ok(m));
                    }
                    Up::Ended { condition, text } => {
                        let msg = format!("{remote}: {text}");
                        outcome = Some(Err(
                            if condition == Some(StreamErrorCondition::ConnectionTimeout) {
                                DialError::Timeout(msg)
                            } else {
                                DialError::NotFound(msg)
                            },
                        ));
                    }
                    _ => {}
                }
            }
            if let Some(o) = outcome {
                break o;
            }
            if conn.done {
                break Err(DialError::NotFound(format!("{remote}: stream ended")));
            }
            match step(&mut conn).await {
                Ok(u) => ups = u,
                Err(e) => break Err(e),
            }
        };
        match r {
            Ok(m) => return Ok((conn, m, t.to_string())),
            Err(e) => {
                tracing::info!(%remote, target = %t, error = %LogSafe(&e.to_string()), "s2s negotiation failed");
                conn.shutdown().await;
                last = e;
            }
        }
    }
    Err(last)
}

static PING_SEQ: AtomicU64 = AtomicU64::new(1);

/// Runs an authenticated stream: writes queued and new stanzas, keeps it alive, closes it
/// when idle or on shutdown. Returns when the stream is gone.
async fn established(
    shared: &Shared,
    mut conn: Conn,
    local: &Domain,
    remote: &Domain,
    first: Out,
    rx: &mut Inbox,
    shutdown: &mut watch::Receiver<bool>,
) {
    let cfg = shared.hub.config();
    let idle = Duration::from_secs(cfg.limits.idle_timeout_secs);
    // Keepalive well inside common NAT/firewall timeouts and the peer's idle timer.
    let keepalive = (idle / 3).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut last_stanza = Instant::now();
    let mut last_write = Instant::now();
    // Keepalive ticks since the last stanza: whitespace each tick, an XEP-0199 ping on the
    // second quiet tick (two thirds into the idle period), close at the idle timeout.
    let mut quiet_ticks = 0u32;
    let mut pending = Some(first);
    loop {
        if let Some(env) = pending.take() {
            if !write_out(shared, &mut conn, remote, &env).await {
                bounce_out(
                    shared,
                    remote,
                    &env,
                    ErrorCondition::RemoteServerNotFound,
                    "the s2s stream broke",
                );
                break;
            }
            last_stanza = Instant::now();
            last_write = last_stanza;
            quiet_ticks = 0;
        }
        let next_ka = last_write + keepalive;
        let idle_at = last_stanza + idle;
        tokio::select! {
            e = rx.recv() => match e {
                Some(e) => pending = Some(e),
                None => break,
            },
            r = conn.read() => {
                let ups = match r {
                    Ok(()) => conn.pump().await.unwrap_or_default(),
                    Err(_) => break,
                };
                if ups.iter().any(|u| matches!(u, Up::Ended { .. })) || conn.done {
                    break;
                }
            }
            _ = tokio::time::sleep_until(next_ka.min(idle_at).into()) => {
                let now = Instant::now();
                if now >= idle_at {
                    // RFC 6120 §4.4: close cleanly; the peer answers with its close tag.
                    let a = conn.m.close();
                    let mut ups = Vec::new();
                    let _ = conn.run(a, &mut ups).await;
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while !conn.done {
                            if conn.read().await.is_err() { break; }
                            if conn.pump().await.is_err() { break; }
                        }
                    }).await;
                    break;
                }
                quiet_ticks += 1;
                // Whitespace keepalive (RFC 6120 §4.6.1), and once per quiet period an XEP-0199
                // ping: its answer comes back on the peer's stream (and is dropped there), a
                // dead peer shows as a failed or timed-out write here.
                let bytes = if quiet_ticks == 2 {
                    STANZAS.with_label_values(&["out", "iq"]).inc();
                    format!(
                        "<iq type='get' id='{PING_ID_PREFIX}{}' from='{}' to='{}'><ping xmlns='urn:xmpp:ping'/></iq>",
                        PING_SEQ.fetch_add(1, Ordering::Relaxed),
                        local,
                        remote
                    ).into_bytes()
                } else {
                    b" ".to_vec()
                };
                if conn.send(&bytes).await.is_err() {
                    break;
                }
                last_write = Instant::now();
            }
            _ = shutdown.changed() => {
                let a = conn.m.close_with_error(StreamErrorCondition::SystemShutdown, "the gateway is shutting down");
                let mut ups = Vec::new();
                let _ = conn.run(a, &mut ups).await;
                break;
            }
        }
    }
    conn.shutdown().await;
}

/// Bounded stanza-kind label of an envelope as written to XMPP.
fn stanza_kind(env: &Envelope) -> &'static str {
    use crate::gateway::envelope::ErrorOf;
    use crate::gateway::Body;
    match &env.body {
        Body::Presence(_) | Body::Subscription(_) => "presence",
        Body::Message(_) => "message",
        Body::Xmpp(x) => super::metrics::kind(x.name),
        Body::Error { kind, .. } => match kind {
            ErrorOf::Message => "message",
            ErrorOf::Presence => "presence",
            ErrorOf::Iq => "iq",
        },
    }
}

async fn write_out(shared: &Shared, conn: &mut Conn, remote: &Domain, out: &Out) -> bool {
    let env = match out {
        Out::Env(e) => e,
        Out::Raw(b) => {
            STANZAS.with_label_values(&["out", "iq"]).inc();
            return conn.send(b).await.is_ok();
        }
    };
    let maps = shared.hub.maps().current();
    let mut out = Vec::with_capacity(256);
    if let Err(e) = envelope_to_stanza(env, &maps, &mut out) {
        tracing::info!(%remote, error = %e, "envelope cannot be written as a stanza");
        return true;
    }
    STANZAS.with_label_values(&["out", stanza_kind(env)]).inc();
    conn.send(&out).await.is_ok()
}
