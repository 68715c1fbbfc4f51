//! One component connection task: for a (home node, foreign domain) pair, connect to the home
//! node's targets in order, run the XEP-0114 handshake machine, then relay stanzas both ways
//! until the stream ends; back off and start over. The task owns the socket, the framer, the
//! machine, the wait queue and the backoff; it decides nothing about routing (the hub does).

use super::placement::{Handed, Holder, Placement};
use super::queue::WaitQueue;
use super::{
    bounce, read_secret, BounceReason, LinkError, LinkSettings, LinkStatus, CONNECTS, DISCONNECTS,
    LINKS_UP, QUEUE_DEPTH, STANZAS,
};
use crate::config::{Domain, HomeEndpoint, HomeNode, Host};
use crate::dns::{Resolver, Transport};
use crate::gateway::envelope::Envelope;
use crate::gateway::hub::{Delivery, Handled};
use crate::gateway::{Hub, Origin};
use crate::net::LogSafe;
use crate::net::{connect_bounded, write_bounded, Backoff, ConnectError, WriteError};
use crate::xmpp::component::{ComponentAction, ComponentConfig, ComponentHandshake};
use crate::xmpp::convert::{envelope_to_stanza, stanza_to_envelope};
use crate::xmpp::error::{stanza_error_bounce, StanzaErrorCondition};
use crate::xmpp::stanza::{Stanza, StanzaKind};
use crate::xmpp::stream::{StreamEvent, StreamFramer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, watch};

/// What a component link writes when the node stops (after a drain, on SIGTERM).
const SYSTEM_SHUTDOWN: &[u8] = b"<stream:error><system-shutdown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/><text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>the gateway is shutting down</text></stream:error></stream:stream>";

/// Pause before handing deliveries again to a holder that could not take them.
const RELAY_RETRY: Duration = Duration::from_millis(200);

/// Most deliveries written in one batch (one syscall) before the task looks at reads again.
const WRITE_BATCH: usize = 64;

pub(crate) struct Component {
    pub hub: Arc<Hub>,
    pub home_node: Arc<str>,
    pub node: HomeNode,
    /// The sender domain whose traffic this link carries (its outbox key).
    pub domain: Domain,
    /// The component's name at the home node: `domain` itself, or a local domain's
    /// `mesh_component` (the home node serves the local domain and cannot also be a component
    /// of it).
    pub name: Domain,
    pub settings: LinkSettings,
    pub resolver: Option<Resolver>,
    pub status: LinkStatus,
    /// In a cluster, who holds this link; `None` on a single node (it holds every link).
    pub placement: Option<Arc<dyn Placement>>,
}

/// How one connection ended.
enum End {
    /// Before the handshake completed.
    Failed(LinkError),
    /// An established stream ended after `lasted`.
    Dropped {
        error: LinkError,
        lasted: Duration,
    },
    Shutdown,
    /// The link moved to another node (cluster): the connection was closed on purpose.
    Released,
}

/// The per-link state that survives reconnections.
struct Pending {
    /// What waits for the link, each with whoever waits to hear it is done with.
    queue: WaitQueue<(Envelope, Handled)>,
    rx: mpsc::Receiver<Delivery>,
    /// The hub dropped the outbox: no more deliveries will come.
    rx_closed: bool,
}

impl Pending {
    /// Whether to take a delivery while the link is down: only while the wait queue has room,
    /// so a link that stays down leaves its outbox full and the readers feeding it wait.
    fn can_hold(&self) -> bool {
        !self.rx_closed && !self.queue.is_full()
    }
}

impl Component {
    pub(crate) async fn run(
        self,
        rx: mpsc::Receiver<Delivery>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut pending = Pending {
            queue: WaitQueue::new(self.settings.queue_capacity, self.settings.queue_timeout),
            rx,
            rx_closed: false,
        };
        let mut backoff = Backoff::new(self.settings.backoff_min, self.settings.backoff_max);
        // A single node holds every link; the sender is kept so `changed` never fires.
        let (_single, single) = watch::channel(Holder::Me);
        let mut holder = match &self.placement {
            Some(p) => p.follow(&self.home_node, &self.domain),
            None => single,
        };
        'rounds: loop {
            if *shutdown.borrow() {
                break;
            }
            if *holder.borrow() != Holder::Me {
                if self.relay(&mut pending, &mut holder, &mut shutdown).await {
                    break;
                }
                // Now the holder: connect at once.
                backoff.reset();
                continue;
            }
            // A DNS lookup can take seconds; shutdown must not wait for it.
            let targets = tokio::select! {
                t = self.targets() => t,
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() {
                        break;
                    }
                    continue;
                }
            };
            // Read once per round (not per target): a missing file is one problem, not one per
            // address; read again every round so a fixed file is picked up without a restart.
            let round = targets.and_then(|t| Ok((t, read_secret(&self.node.component_secret)?)));
            match round {
                Err(e) => self.record_failure(&e, None),
                Ok((targets, secret)) => {
                    for addr in targets {
                        match self
                            .connect(addr, &secret, &mut pending, &mut holder, &mut shutdown)
                            .await
                        {
                            End::Shutdown => break 'rounds,
                            End::Released => continue 'rounds,
                            End::Failed(e) => self.record_failure(&e, Some(addr)),
                            End::Dropped { error, lasted } => {
                                self.record_drop(&error, addr, lasted);
                                if lasted >= self.settings.stable_after {
                                    backoff.reset();
                                }
                                // Start over from the first (preferred) target after a pause.
                                break;
                            }
                        }
                        if *shutdown.borrow() {
                            break 'rounds;
                        }
                    }
                }
            }
            let delay = backoff.next_delay(rand::random::<f64>());
            tracing::debug!(
                delay_ms = delay.as_millis() as u64,
                "reconnecting after backoff"
            );
            if self
                .wait(delay, &mut pending, &mut holder, &mut shutdown)
                .await
            {
                break;
            }
        }
        // Shutdown: whatever still waits is answered rather than dropped in silence. Closing the
        // outbox makes the hub answer anything submitted from now on.
        for (env, handled) in pending.queue.drain() {
            QUEUE_DEPTH.dec();
            bounce(&self.hub, &self.home_node, &env, BounceReason::Closed);
            handled.done();
        }
        pending.rx.close();
        while let Ok(d) = pending.rx.try_recv() {
            bounce(
                &self.hub,
                &self.home_node,
                &d.envelope,
                BounceReason::Closed,
            );
            d.handled.done();
        }
        self.status
            .update(&self.home_node, &self.domain, |s| s.queued = 0);
    }

    /// While another node holds the link (or nobody does yet): hands what the outbox receives
    /// to the holder, in order, in batches; what the holder cannot take stays queued (and
    /// expires as it would while a connection is down). Returns when this node becomes the
    /// holder (false) or on shutdown (true).
    async fn relay(
        &self,
        p: &mut Pending,
        holder: &mut watch::Receiver<Holder>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let mut announced = false;
        loop {
            let now_holding = holder.borrow_and_update().clone();
            if matches!(now_holding, Holder::Peer(_)) && !announced {
                // The home node is reachable through the holder: what restored SIP
                // subscriptions owe it may be sent now, as when a connection of our own is up.
                announced = true;
                self.hub.note_link_up(&self.domain);
            }
            self.status.update(&self.home_node, &self.domain, |s| {
                s.held_by = match &now_holding {
                    Holder::Me => None,
                    Holder::Peer(n) => Some(n.to_string()),
                    Holder::Unknown => Some(String::new()),
                };
            });
            let (peer, placement) = match (&now_holding, &self.placement) {
                (Holder::Me, _) | (_, None) => return false,
                (Holder::Peer(peer), Some(pl)) if !p.queue.is_empty() => (peer.clone(), pl),
                // Nothing to hand over, or nobody to hand it to: wait for either.
                _ => {
                    let expiry = p.queue.next_expiry().map(to_tokio);
                    tokio::select! {
                        r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return true; },
                        _ = holder.changed() => {}
                        d = p.rx.recv(), if p.can_hold() => {
                            self.enqueue(p, d);
                            while p.can_hold() {
                                match p.rx.try_recv() {
                                    Ok(d) => self.enqueue(p, Some(d)),
                                    Err(_) => break,
                                }
                            }
                        }
                        _ = sleep_opt(expiry) => self.expire(p),
                    }
                    continue;
                }
            };
            let batch = p.queue.take_timed(WRITE_BATCH);
            let envelopes: Vec<&Envelope> = batch.iter().map(|(_, (e, _))| e).collect();
            let call = placement.hand(peer.clone(), self.home_node.clone(), &envelopes);
            let answer = tokio::select! {
                a = call => a,
                r = shutdown.changed() => if r.is_err() || *shutdown.borrow() {
                    p.queue.restore(batch);
                    return true;
                } else {
                    p.queue.restore(batch);
                    continue;
                },
            };
            let mut kept = Vec::new();
            match answer {
                Ok(outcomes) => {
                    let mut outcomes = outcomes.into_iter();
                    for (at, (env, handled)) in batch {
                        match outcomes.next() {
                            Some(Handed::Accepted) => {
                                QUEUE_DEPTH.dec();
                                STANZAS
                                    .with_label_values(&["handed", env.kind_label()])
                                    .inc();
                                handled.done();
                            }
                            Some(Handed::Timeout) => {
                                QUEUE_DEPTH.dec();
                                bounce(
                                    &self.hub,
                                    &self.home_node,
                                    &env,
                                    BounceReason::QueueTimeout,
                                );
                                handled.done();
                            }
                            Some(Handed::Invalid) => {
                                QUEUE_DEPTH.dec();
                                bounce(&self.hub, &self.home_node, &env, BounceReason::Encode);
                                handled.done();
                            }
                            Some(Handed::NotHolder) | None => kept.push((at, (env, handled))),
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(peer = %peer, error = %LogSafe(&e), "cannot hand deliveries to the node holding the link; keeping them");
                    kept = batch;
                }
            }
            let stuck = !kept.is_empty();
            p.queue.restore(kept);
            let n = p.queue.len();
            self.status
                .update(&self.home_node, &self.domain, |s| s.queued = n);
            if stuck {
                // The holder is unreachable or has moved: wait for news, briefly.
                tokio::select! {
                    r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return true; },
                    _ = holder.changed() => {}
                    _ = tokio::time::sleep(RELAY_RETRY) => {}
                }
            }
        }
    }

    fn origin(&self) -> Origin {
        Origin::Component {
            home_node: self.home_node.clone(),
        }
    }

    /// The addresses to try, in order (RFC 2782 order for SRV).
    async fn targets(&self) -> Result<Vec<SocketAddr>, LinkError> {
        let mut out = Vec::new();
        let mut last_err = None;
        match &self.node.endpoint {
            HomeEndpoint::Addresses(list) => {
                for hp in list {
                    match (&hp.host, &self.resolver) {
                        (Host::Ip(ip), _) => out.push(SocketAddr::new(*ip, hp.port)),
                        (Host::Name(_), None) => last_err = Some(LinkError::NoResolver),
                        (Host::Name(_), Some(r)) => {
                            match r.host_port_targets(hp, Transport::Tcp).await {
                                Ok(ts) => out.extend(ts.into_iter().map(|t| t.addr)),
                                Err(e) => {
                                    tracing::warn!(address = %hp, error = %e, "home node address does not resolve; trying the next");
                                    last_err = Some(e.into());
                                }
                            }
                        }
                    }
                }
            }
            HomeEndpoint::Srv(d) => match &self.resolver {
                Some(r) => out.extend(r.component_targets(d).await?.into_iter().map(|t| t.addr)),
                None => return Err(LinkError::NoResolver),
            },
        }
        let mut seen = std::collections::HashSet::new();
        out.retain(|a| seen.insert(*a));
        if out.is_empty() {
            return Err(last_err.unwrap_or(LinkError::NoTargets));
        }
        Ok(out)
    }

    fn record_failure(&self, e: &LinkError, addr: Option<SocketAddr>) {
        CONNECTS.with_label_values(&[e.label()]).inc();
        let (label, text) = (e.label(), e.to_string());
        let mut loud = false;
        self.status.update(&self.home_node, &self.domain, |s| {
            // A home node that stays down would log a line per target per round: say it when
            // the reason changes and then at the 2nd, 4th, 8th... failure; the rest is debug.
            loud = s.last_failure.as_ref().map(|f| f.0) != Some(label)
                || s.failures.wrapping_add(1).is_power_of_two();
            s.up = false;
            s.failures += 1;
            s.peer = addr.or(s.peer);
            s.last_failure = Some((label, text));
            s.last_failure_at = Some(std::time::Instant::now());
        });
        let peer = addr.map(|a| a.to_string()).unwrap_or_default();
        match (loud, e.hint(&self.home_node)) {
            (true, Some(hint)) => {
                tracing::error!(peer, reason = label, error = %LogSafe(&e.to_string()), "component link to home node {} failed: {hint}", self.home_node)
            }
            (true, None) => {
                tracing::warn!(peer, reason = label, error = %LogSafe(&e.to_string()), "component link to home node {} failed", self.home_node)
            }
            (false, _) => {
                tracing::debug!(peer, reason = label, error = %LogSafe(&e.to_string()), "component link to home node {} failed again", self.home_node)
            }
        }
    }

    fn record_drop(&self, e: &LinkError, addr: SocketAddr, lasted: Duration) {
        DISCONNECTS.with_label_values(&[e.label()]).inc();
        tracing::warn!(peer = %addr, reason = e.label(), error = %LogSafe(&e.to_string()), lasted_s = lasted.as_secs(), "component link to home node {} lost", self.home_node);
        let (label, text) = (e.label(), e.to_string());
        self.status.update(&self.home_node, &self.domain, |s| {
            s.up = false;
            s.last_failure = Some((label, text));
            s.last_failure_at = Some(std::time::Instant::now());
        });
    }

    /// Sleeps `delay` while still taking deliveries into the queue and expiring old ones.
    /// Returns true on shutdown.
    async fn wait(
        &self,
        delay: Duration,
        p: &mut Pending,
        holder: &mut watch::Receiver<Holder>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let until = tokio::time::Instant::now() + delay;
        loop {
            let expiry = p.queue.next_expiry().map(to_tokio);
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return false,
                // The link moved to another node: stop waiting to reconnect.
                _ = holder.changed() => if *holder.borrow() != Holder::Me { return false; },
                r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return true; },
                d = p.rx.recv(), if p.can_hold() => self.enqueue(p, d),
                _ = sleep_opt(expiry) => self.expire(p),
            }
        }
    }

    fn enqueue(&self, p: &mut Pending, d: Option<Delivery>) {
        let Some(d) = d else {
            p.rx_closed = true;
            return;
        };
        // `can_hold` was checked before the delivery was taken, so there is room.
        if p.queue.push(now(), (d.envelope, d.handled)).is_ok() {
            QUEUE_DEPTH.inc();
        }
        let n = p.queue.len();
        self.status
            .update(&self.home_node, &self.domain, |s| s.queued = n);
    }

    fn expire(&self, p: &mut Pending) {
        for (env, handled) in p.queue.expire(now()) {
            QUEUE_DEPTH.dec();
            bounce(&self.hub, &self.home_node, &env, BounceReason::QueueTimeout);
            handled.done();
        }
        let n = p.queue.len();
        self.status
            .update(&self.home_node, &self.domain, |s| s.queued = n);
    }

    /// One connection to `addr`: TCP connect, handshake, then the relay loop.
    async fn connect(
        &self,
        addr: SocketAddr,
        secret: &str,
        p: &mut Pending,
        holder: &mut watch::Receiver<Holder>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> End {
        let timeout = self.settings.handshake_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        // The TCP connect counts against the handshake time; deliveries keep queueing meanwhile.
        let stream = {
            let fut = connect_bounded(addr, timeout);
            tokio::pin!(fut);
            loop {
                let expiry = p.queue.next_expiry().map(to_tokio);
                tokio::select! {
                    r = &mut fut => break match r {
                        Ok(s) => s,
                        Err(ConnectError::Io { source, .. }) => return End::Failed(LinkError::Connect { addr, source }),
                        Err(ConnectError::Timeout { .. }) => return End::Failed(LinkError::Handshake(crate::xmpp::component::ComponentFailure::Timeout)),
                    },
                    r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return End::Shutdown; },
                    _ = holder.changed() => if *holder.borrow() != Holder::Me { return End::Released; },
                    d = p.rx.recv(), if p.can_hold() => self.enqueue(p, d),
                    _ = sleep_opt(expiry) => self.expire(p),
                }
            }
        };
        let (mut rd, mut wr) = stream.into_split();
        let mut machine = ComponentHandshake::new(ComponentConfig {
            domain: self.name.to_string(),
            secret: secret.to_string(),
            handshake_timeout: deadline.saturating_duration_since(tokio::time::Instant::now()),
        });
        let mut framer = StreamFramer::new(self.settings.stream_limits);
        let mut buf = vec![0u8; 16 * 1024];
        let mut out: Vec<u8> = Vec::new();
        // Told once `out` is written; dropped untold if the write fails (the bytes are lost).
        let mut written: Vec<Handled> = Vec::new();
        let mut connected_at: Option<tokio::time::Instant> = None;
        let mut keepalive = tokio::time::Instant::now() + self.settings.keepalive;

        // Runs the machine's actions: bytes into `out`, the verdict into the return value.
        let start = machine.start(now());
        if let Some(e) = apply(start, &mut out) {
            return End::Failed(LinkError::Handshake(e));
        }
        let end: Result<(), LinkError> = 'conn: loop {
            if !out.is_empty() {
                if let Err(e) = self.write(&mut wr, &out).await {
                    break 'conn Err(e);
                }
                out.clear();
                for h in written.drain(..) {
                    h.done();
                }
                keepalive = tokio::time::Instant::now() + self.settings.keepalive;
            }
            let hs_deadline = machine.poll_timeout().map(to_tokio);
            let up = connected_at.is_some();
            let expiry = if up {
                None
            } else {
                p.queue.next_expiry().map(to_tokio)
            };
            tokio::select! {
                r = shutdown.changed() => if r.is_err() || *shutdown.borrow() {
                    // RFC 6120 §4.9.3.17: the gateway is going away, so the home node
                    // hears `system-shutdown` (not a plain close it could take for a routine
                    // reconnection), then §4.4: it answers by closing its own stream.
                    let _ = self.write(&mut wr, SYSTEM_SHUTDOWN).await;
                    let _ = wr.shutdown().await;
                    if up { self.mark_down(); }
                    return End::Shutdown;
                },
                _ = holder.changed() => if *holder.borrow() != Holder::Me {
                    // Another node holds the link now (this node lost its claim): close our
                    // stream so the home node accepts the holder's (Prosody takes one per
                    // component). What was written is the home node's; what waits here is
                    // handed to the holder.
                    tracing::info!("component link released: another gateway node holds it now");
                    let _ = self.write(&mut wr, b"</stream:stream>").await;
                    let _ = wr.shutdown().await;
                    if up { self.mark_down(); }
                    return End::Released;
                },
                n = rd.read(&mut buf) => {
                    let n = match n {
                        Ok(0) => break 'conn Err(LinkError::Handshake(crate::xmpp::component::ComponentFailure::Closed)),
                        Ok(n) => n,
                        Err(e) => break 'conn Err(LinkError::Io(e)),
                    };
                    framer.push(buf.get(..n).unwrap_or_default());
                    loop {
                        let ev = match framer.next_event() {
                            Ok(Some(ev)) => ev,
                            Ok(None) => break,
                            Err(e) => {
                                let actions = machine.handle_framing_error(&e);
                                apply(actions, &mut out);
                                let _ = self.write(&mut wr, &out).await;
                                break 'conn Err(LinkError::Framing(e));
                            }
                        };
                        let actions = machine.handle_event(&ev);
                        if actions.is_empty() {
                            if let (Some(_), StreamEvent::Stanza(s)) = (connected_at, &ev) {
                                if let Err(e) = self.inbound(s, &mut out).await {
                                    out.extend_from_slice(&e.to_xml_and_close(None));
                                    let _ = self.write(&mut wr, &out).await;
                                    break 'conn Err(LinkError::BadStanza(e));
                                }
                            }
                            continue;
                        }
                        let was_up = connected_at.is_some();
                        let connected = actions.iter().any(|a| matches!(a, ComponentAction::Connected));
                        if let Some(f) = apply(actions, &mut out) {
                            let _ = self.write(&mut wr, &out).await;
                            break 'conn Err(LinkError::Handshake(f));
                        }
                        if connected && !was_up {
                            connected_at = Some(tokio::time::Instant::now());
                            self.mark_up(addr);
                            // What waited for the link goes first, in order.
                            while let Some((env, handled)) = p.queue.pop() {
                                QUEUE_DEPTH.dec();
                                self.encode(&env, handled, &mut out, &mut written);
                            }
                            self.status.update(&self.home_node, &self.domain, |s| s.queued = 0);
                        }
                    }
                },
                // Up: taken only when the last write completed (it is awaited above), so a
                // slow home node leaves the outbox full. Down: only while the queue has room.
                d = p.rx.recv(), if (up && !p.rx_closed) || p.can_hold() => {
                    if up {
                        match d {
                            Some(d) => {
                                self.encode(&d.envelope, d.handled, &mut out, &mut written);
                                // Batch what is already waiting into the same write.
                                for _ in 1..WRITE_BATCH {
                                    match p.rx.try_recv() {
                                        Ok(d) => self.encode(&d.envelope, d.handled, &mut out, &mut written),
                                        Err(_) => break,
                                    }
                                }
                            }
                            None => p.rx_closed = true,
                        }
                    } else {
                        self.enqueue(p, d);
                    }
                },
                _ = sleep_opt(hs_deadline) => {
                    let actions = machine.handle_timeout(now());
                    if let Some(f) = apply(actions, &mut out) {
                        let _ = self.write(&mut wr, &out).await;
                        break 'conn Err(LinkError::Handshake(f));
                    }
                },
                _ = sleep_opt(expiry) => self.expire(p),
                _ = tokio::time::sleep_until(keepalive), if up => {
                    // RFC 6120 §4.6.1 whitespace keepalive.
                    out.push(b' ');
                },
            }
        };
        let Err(error) = end else {
            return End::Shutdown;
        };
        match connected_at {
            None => End::Failed(error),
            Some(t) => {
                self.mark_down();
                End::Dropped {
                    error: error.after_up(),
                    lasted: t.elapsed(),
                }
            }
        }
    }

    async fn write(&self, wr: &mut OwnedWriteHalf, bytes: &[u8]) -> Result<(), LinkError> {
        write_bounded(wr, bytes, self.settings.write_timeout)
            .await
            .map_err(|e| match e {
                WriteError::Io(e) => LinkError::Io(e),
                WriteError::Timeout(_) => LinkError::WriteTimeout,
            })
    }

    fn mark_up(&self, addr: SocketAddr) {
        LINKS_UP.inc();
        CONNECTS.with_label_values(&["connected"]).inc();
        tracing::info!(peer = %addr, "component {} connected to home node {}", self.name, self.home_node);
        self.status.update(&self.home_node, &self.domain, |s| {
            s.up = true;
            s.connects += 1;
            s.peer = Some(addr);
        });
        self.hub.note_link_up(&self.domain);
    }

    fn mark_down(&self) {
        LINKS_UP.dec();
        self.status
            .update(&self.home_node, &self.domain, |s| s.up = false);
    }

    /// Writes a delivery as a stanza into `out` (its `handled` then waits in `written` for the
    /// write), or bounces it when it cannot be encoded (done with at once).
    fn encode(
        &self,
        env: &Envelope,
        handled: Handled,
        out: &mut Vec<u8>,
        written: &mut Vec<Handled>,
    ) {
        let maps = self.hub.maps().current();
        let mark = out.len();
        match envelope_to_stanza(env, &maps, out) {
            Ok(()) => {
                STANZAS.with_label_values(&["out", env.kind_label()]).inc();
                written.push(handled);
            }
            Err(e) => {
                out.truncate(mark);
                tracing::warn!(error = %e, "cannot write delivery as a stanza");
                bounce(&self.hub, &self.home_node, env, BounceReason::Encode);
                handled.done();
            }
        }
    }

    /// A stanza from the home node: to the hub, or an error back when it cannot be read.
    /// `Err` is a stream-level violation (RFC 6120 §4.9.3) that ends the stream. Waits while
    /// the destination is full (the home node's stream is not read meanwhile).
    async fn inbound(
        &self,
        s: &Stanza,
        out: &mut Vec<u8>,
    ) -> Result<(), crate::xmpp::error::StreamErrorCondition> {
        match s.check_kind()? {
            StanzaKind::Other => {
                tracing::debug!(
                    element = %LogSafe(s.qname()),
                    "ignoring non-stanza element from home node"
                );
                return Ok(());
            }
            StanzaKind::Message | StanzaKind::Presence | StanzaKind::Iq => {}
        }
        // Addressed to the component itself (no localpart): nothing behind it answers.
        if s.to()
            .is_some_and(|t| t.eq_ignore_ascii_case(self.name.as_str()))
        {
            STANZAS.with_label_values(&["in", "to_component"]).inc();
            if s.name() != "presence" {
                if let Ok(b) =
                    stanza_error_bounce(s, StanzaErrorCondition::ServiceUnavailable, None, None)
                {
                    out.extend_from_slice(&b);
                }
            }
            return Ok(());
        }
        let maps = self.hub.maps().current();
        match stanza_to_envelope(s, &self.node.default_system, &maps) {
            Ok(env) => {
                STANZAS.with_label_values(&["in", env.kind_label()]).inc();
                self.hub.submit_wait(&self.origin(), env).await;
            }
            Err(e) => {
                STANZAS.with_label_values(&["in", "invalid"]).inc();
                tracing::info!(error = %LogSafe(&e.to_string()), element = s.name(), "stanza from home node refused");
                if let Ok(b) = stanza_error_bounce(s, e.condition(), None, Some(&e.to_string())) {
                    out.extend_from_slice(&b);
                }
            }
        }
        Ok(())
    }
}

/// Appends the machine's bytes to `out`; returns the failure if the machine gave up.
fn apply(
    actions: Vec<ComponentAction>,
    out: &mut Vec<u8>,
) -> Option<crate::xmpp::component::ComponentFailure> {
    let mut failed = None;
    for a in actions {
        match a {
            ComponentAction::SendBytes(b) => out.extend_from_slice(&b),
            ComponentAction::Connected => {}
            ComponentAction::Fail(f) => failed = Some(f),
        }
    }
    failed
}

/// Now, on tokio's clock (so tests with a paused clock see consistent deadlines).
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

fn to_tokio(i: Instant) -> tokio::time::Instant {
    tokio::time::Instant::from_std(i)
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
