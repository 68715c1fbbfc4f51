//! The mapping-directory watcher (`[mappings] reload = true`): polls the files and swaps in a
//! valid edit; an invalid one keeps the last good set and raises `MappingReloadRefused`.

use crate::gateway::Hub;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

static RELOADS: std::sync::LazyLock<prometheus::IntCounterVec> = std::sync::LazyLock::new(|| {
    crate::metrics::counter_vec(
        "legate_mapping_reloads_total",
        "Edits of the mapping directory seen by the reloader, by outcome (ok, refused)",
        &["outcome"],
    )
});

/// What the admin `/status` shows about the mapping files in use.
#[derive(Debug, Default)]
struct ReloadState {
    reloads: u64,
    refused: u64,
    /// The problems of the last refused edit, `file:line:col: message` each.
    last_refused: Vec<String>,
}

/// Polls the mapping directory and swaps in a valid edit; an invalid edit is logged and the
/// last good set stays in use. Polling (not inotify) because editors save by rename and
/// network file systems do not deliver events; one `stat` per file every 2 s is cheap.
pub(super) async fn watch_mappings(
    hub: Arc<Hub>,
    dir: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) {
    let state = Arc::new(std::sync::Mutex::new(ReloadState::default()));
    {
        let (state, hub2, dir) = (state.clone(), hub.clone(), dir.clone());
        hub.add_status(
            "mappings",
            Arc::new(move || {
                let st = state
                    .lock()
                    .map(|s| (s.reloads, s.refused, s.last_refused.clone()))
                    .unwrap_or_default();
                serde_json::json!({
                    "dir": dir.display().to_string(),
                    "digest": hub2.maps().current().digest,
                    "reloads": st.0,
                    "refused": st.1,
                    "last_refused": st.2,
                })
            }),
        );
    }
    let mut last = fingerprint(&dir);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        let now = fingerprint(&dir);
        if now == last {
            continue;
        }
        last = now;
        if hub.maps().is_pinned() {
            // A cluster subordinate runs its primary's mapping files, not these.
            continue;
        }
        match hub.maps().reload() {
            Ok(()) => {
                if let Some(r) = hub.node_control().and_then(|c| c.replication()) {
                    r.mappings_reloaded();
                }
                RELOADS.with_label_values(&["ok"]).inc();
                if let Ok(mut s) = state.lock() {
                    s.reloads += 1;
                }
                tracing::info!(dir = %dir.display(), digest = %hub.maps().current().digest, "mapping files reloaded");
                hub.alarms().clear(
                    crate::ops::alarms::AlarmName::MappingReloadRefused,
                    &dir.display().to_string(),
                );
            }
            Err(d) => {
                RELOADS.with_label_values(&["refused"]).inc();
                if let Ok(mut s) = state.lock() {
                    s.refused += 1;
                    s.last_refused = d.0.iter().map(|x| x.to_string()).collect();
                }
                tracing::error!(dir = %dir.display(), problems = %d, "mapping edit refused; keeping the last good set");
                hub.alarms().raise(
                    crate::ops::alarms::AlarmName::MappingReloadRefused,
                    &dir.display().to_string(),
                    &d.to_string(),
                );
            }
        }
    }
}

fn fingerprint(dir: &std::path::Path) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    let mut out = Vec::new();
    for sub in ["", "systems", "tables"] {
        let Ok(rd) = std::fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for e in rd.flatten() {
            let meta = e.metadata().ok();
            out.push((
                e.path(),
                meta.as_ref().and_then(|m| m.modified().ok()),
                meta.map_or(0, |m| m.len()),
            ));
        }
    }
    out.sort();
    out
}
