//! Drain (maintenance mode; `legate drain`, `POST /drain`, and the first step of SIGTERM): the
//! node stops taking new work while what runs finishes.
//!
//! The refusals live in the edges, which ask [`Hub::draining`] for each new piece of work: the
//! SIP core answers a new INVITE or an out-of-dialog SUBSCRIBE `503 Service Unavailable` with
//! `Retry-After` (RFC 3261 §21.5.4), the s2s edge closes a new inbound stream with
//! `<system-shutdown/>` (RFC 6120 §4.9.3.17). Requests inside existing dialogs (refreshes, BYE,
//! NOTIFY), pager MESSAGEs and stanzas on streams already up still flow, so nothing accepted is
//! lost. Here: when the drain started, and what is left (SIP IM sessions and subscriptions,
//! as the SIP edge counts them for `/status`), so "done" means nothing is left.

use super::Control;
use crate::gateway::Hub;
use serde::Serialize;
use std::time::{Duration, Instant};

/// What is still running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Remaining {
    pub sip_im_sessions: u64,
    /// Foreign SIP watchers of local users (subscriptions they hold on us).
    pub sip_foreign_watchers: u64,
    /// Our subscriptions to foreign SIP users on behalf of local users.
    pub sip_local_subscriptions: u64,
}

impl Remaining {
    pub fn total(&self) -> u64 {
        self.sip_im_sessions + self.sip_foreign_watchers + self.sip_local_subscriptions
    }
}

/// The answer of `POST /drain` and `GET /drain`, and the `drain` section of `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DrainReport {
    pub draining: bool,
    /// Unix seconds when the drain started.
    pub since: Option<u64>,
    pub elapsed_secs: Option<u64>,
    pub remaining: Remaining,
    pub remaining_total: u64,
    /// Draining and nothing left: the node may be stopped without loss.
    pub done: bool,
}

/// When the drain started (monotonic for progress, Unix for display).
#[derive(Debug, Clone, Copy)]
pub(super) struct Since {
    at: Instant,
    unix: u64,
}

/// Enters maintenance mode (once; later calls only report).
pub fn start(hub: &Hub, control: &Control) -> DrainReport {
    if let Ok(mut since) = control.drain_since.lock() {
        if since.is_none() {
            *since = Some(Since {
                at: Instant::now(),
                unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            });
        }
    }
    if hub.start_draining() {
        tracing::warn!(
            "draining: new SIP sessions and subscriptions and new s2s streams are refused; \
             existing ones go on"
        );
    }
    status(hub, control)
}

/// Where the drain stands now.
pub fn status(hub: &Hub, control: &Control) -> DrainReport {
    let since = control.drain_since.lock().ok().and_then(|s| *s);
    let remaining = remaining(hub);
    let draining = hub.draining();
    DrainReport {
        draining,
        since: since.map(|s| s.unix),
        elapsed_secs: since.map(|s| s.at.elapsed().as_secs()),
        remaining,
        remaining_total: remaining.total(),
        done: draining && remaining.total() == 0,
    }
}

/// What is left, from the SIP edge's `/status` counters (zero when SIP is off).
fn remaining(hub: &Hub) -> Remaining {
    let sip = hub.status_section("sip");
    let n = |key: &str| {
        sip.as_ref()
            .and_then(|v| v.get(key))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    };
    Remaining {
        sip_im_sessions: n("im_sessions"),
        sip_foreign_watchers: n("foreign_watchers"),
        sip_local_subscriptions: n("local_subscriptions"),
    }
}

/// Drains, then waits until nothing is left or `grace` passed; whether it finished.
pub async fn drain_within(hub: &Hub, control: &Control, grace: Duration) -> bool {
    let deadline = Instant::now() + grace;
    let mut last_total = None;
    loop {
        let r = start(hub, control);
        if r.done {
            tracing::info!("drain done: no session or subscription left");
            return true;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                left = r.remaining_total,
                grace_secs = grace.as_secs(),
                "drain grace period over; closing what is left"
            );
            return false;
        }
        if last_total != Some(r.remaining_total) {
            tracing::info!(left = r.remaining_total, remaining = ?r.remaining, "draining");
            last_total = Some(r.remaining_total);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, BUILTIN_SYSTEMS};
    use crate::presence::map::MappingStore;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    fn hub() -> Arc<Hub> {
        let cfg = config::from_toml(
            "[[local_domain]]\nname = \"example.com\"\n",
            std::path::Path::new("t.toml"),
            BUILTIN_SYSTEMS,
        )
        .expect("config");
        Hub::new(cfg, MappingStore::open(None).expect("maps"))
    }

    fn control() -> Control {
        Control {
            source: Default::default(),
            server_tls: None,
            client_tls: None,
            last_reload: Mutex::new(None),
            drain_since: Mutex::new(None),
            replication: Default::default(),
            intercluster: Default::default(),
        }
    }

    #[test]
    fn done_only_while_draining_with_nothing_left() {
        let (h, c) = (hub(), control());
        let left = Arc::new(AtomicU64::new(2));
        let shown = left.clone();
        h.add_status(
            "sip",
            Arc::new(move || {
                serde_json::json!({
                    "im_sessions": 0,
                    "foreign_watchers": shown.load(Ordering::Relaxed),
                    "local_subscriptions": 0,
                })
            }),
        );
        let r = status(&h, &c);
        assert!(!r.draining && !r.done && r.since.is_none(), "{r:?}");
        let r = start(&h, &c);
        assert!(r.draining && !r.done && r.since.is_some(), "{r:?}");
        assert_eq!(r.remaining.sip_foreign_watchers, 2);
        assert!(h.draining());
        left.store(0, Ordering::Relaxed);
        assert!(status(&h, &c).done);
        // A second start changes nothing (same start time).
        assert_eq!(start(&h, &c).since, r.since);
    }

    #[test]
    fn the_admin_operations_need_a_node() {
        let h = hub();
        assert_eq!(crate::node::api::post_drain(&h).0, 503);
        assert_eq!(crate::node::api::post_reload(&h).0, 503);
        assert!(!h.draining(), "no drain without a node to report it");
        h.set_node_control(Arc::new(control()));
        assert_eq!(crate::node::api::get_drain(&h).0, 200);
        let (code, doc) = crate::node::api::post_drain(&h);
        assert_eq!((code, &doc["draining"]), (200, &serde_json::json!(true)));
        // No SIP edge: nothing can be left.
        assert_eq!(doc["done"], true);
    }
}
