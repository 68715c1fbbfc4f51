//! Open federation across restarts: each domain whose component links were opened on demand
//! is written to the state store, and opened again at the next start.

use crate::config::Domain;
use crate::gateway::Hub;
use tokio::sync::watch;

/// Store prefix of the domains open federation opened (`federation/open/<domain>`).
const OPENED_PREFIX: &str = "federation/open/";

pub(super) async fn write_opened_domains(
    store: crate::store::SharedStore,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Domain>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let d = tokio::select! {
            d = rx.recv() => match d { Some(d) => d, None => return },
            _ = shutdown.changed() => return,
        };
        let key = format!("{OPENED_PREFIX}{d}");
        if let Err(e) = store.put(&key, Vec::new()).await {
            tracing::warn!(domain = %d, error = %e, "open federation: domain not persisted");
        }
    }
}

/// Opens again the components of the domains stored by [`write_opened_domains`] (those the
/// configuration still allows); how many.
pub(super) async fn reopen_domains(hub: &Hub, store: &crate::store::SharedStore) -> usize {
    let listing = match store.list(OPENED_PREFIX).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "open federation: earlier domains not read");
            return 0;
        }
    };
    listing
        .entries
        .iter()
        .filter_map(|e| e.key.strip_prefix(OPENED_PREFIX))
        .filter_map(|d| Domain::parse(d).ok())
        .filter(|d| hub.open_component_domain(d))
        .count()
}
