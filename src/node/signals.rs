//! Process signals of `legate run`: SIGHUP reloads ([`super::reload`]); SIGTERM or Ctrl-C
//! drains ([`super::drain`]) for at most `limits.drain_grace_secs`, then stops the node (its
//! XMPP streams close with `<system-shutdown/>`) and the process exits 0. A second SIGTERM or
//! Ctrl-C during the drain stops at once; SIGHUP still reloads while draining.

use super::{drain, reload, Control, Node, NodeError};
use crate::gateway::Hub;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

/// Runs `node` until it is told to stop by a signal (see the module doc).
pub async fn run_until_signalled(node: Node) -> Result<(), NodeError> {
    // Handlers are installed before anything binds: a SIGHUP sent as soon as the `listening`
    // lines appear must reload, not kill the process (SIGHUP's default action).
    let hup = signal(SignalKind::hangup());
    let term = signal(SignalKind::terminate());
    let (tx, rx) = watch::channel(false);
    let hub = node.hub().clone();
    let control = node.control().clone();
    let handler = tokio::spawn(async move {
        handle(hub, control, hup.ok(), term.ok()).await;
        let _ = tx.send(true);
    });
    let result = node.run(rx).await;
    handler.abort();
    result
}

async fn recv(s: &mut Option<Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

async fn handle(
    hub: Arc<Hub>,
    control: Arc<Control>,
    mut hup: Option<Signal>,
    mut term: Option<Signal>,
) {
    loop {
        tokio::select! {
            _ = recv(&mut hup) => sighup(&hub, &control).await,
            _ = recv(&mut term) => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    let grace = Duration::from_secs(hub.config().limits.drain_grace_secs);
    tracing::info!(
        grace_secs = grace.as_secs(),
        "stopping: draining first (a second SIGTERM stops at once)"
    );
    let drained = drain::drain_within(&hub, &control, grace);
    tokio::pin!(drained);
    loop {
        tokio::select! {
            _ = &mut drained => return,
            // A certificate or policy fix still applies while the node drains.
            _ = recv(&mut hup) => sighup(&hub, &control).await,
            _ = recv(&mut term) => {
                tracing::warn!("second SIGTERM: stopping without waiting");
                return;
            }
            _ = tokio::signal::ctrl_c() => {
                tracing::warn!("second interrupt: stopping without waiting");
                return;
            }
        }
    }
}

async fn sighup(hub: &Arc<Hub>, control: &Arc<Control>) {
    let (h, c) = (hub.clone(), control.clone());
    // File reads and certificate parsing: off the runtime's worker threads.
    let _ =
        tokio::task::spawn_blocking(move || reload::reload(&h, &c, reload::Trigger::Sighup)).await;
}
