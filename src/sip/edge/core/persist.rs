//! Persistence of the notifier subscriptions (requirements §1: a restart loses none): the
//! snapshot written to the state file and its reload.

use super::*;

impl Core {
    /// The state to write (notifier subscriptions; see `edge` module doc).
    pub fn snapshot(&self, now: Instant, wall: SystemTime) -> PersistedState {
        let base = wall
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut notifiers: Vec<PersistedNotifier> = self
            .notifiers
            .values()
            .map(|n| PersistedNotifier {
                dialog: n.dialog.clone(),
                watcher: n.watcher.bare_string(),
                presentity: n.presentity.bare_string(),
                domain: n.domain.to_string(),
                active: n.state == NotifierState::Active,
                msrtc: n.format == SipBodyKind::Msrtc,
                expires_unix: base + n.expires_at.saturating_duration_since(now).as_secs(),
            })
            .collect();
        notifiers.sort_by(|a, b| a.dialog.id.cmp(&b.dialog.id));
        PersistedState {
            version: 1,
            notifiers,
        }
    }

    /// Writes the same state as [`Core::snapshot`] as JSON into `out` without cloning the
    /// dialogs (a large table must not double its memory once a second).
    pub fn write_snapshot(
        &self,
        now: Instant,
        wall: SystemTime,
        out: &mut impl std::io::Write,
    ) -> serde_json::Result<()> {
        #[derive(Serialize)]
        struct NotifierRef<'a> {
            dialog: &'a Dialog,
            watcher: String,
            presentity: String,
            domain: &'a str,
            active: bool,
            msrtc: bool,
            expires_unix: u64,
        }
        #[derive(Serialize)]
        struct StateRef<'a> {
            version: u32,
            notifiers: Vec<NotifierRef<'a>>,
        }
        let base = wall
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut notifiers: Vec<NotifierRef<'_>> = self
            .notifiers
            .values()
            .map(|n| NotifierRef {
                dialog: &n.dialog,
                watcher: n.watcher.bare_string(),
                presentity: n.presentity.bare_string(),
                domain: n.domain.as_str(),
                active: n.state == NotifierState::Active,
                msrtc: n.format == SipBodyKind::Msrtc,
                expires_unix: base + n.expires_at.saturating_duration_since(now).as_secs(),
            })
            .collect();
        notifiers.sort_by(|a, b| a.dialog.id.cmp(&b.dialog.id));
        serde_json::to_writer(
            out,
            &StateRef {
                version: 1,
                notifiers,
            },
        )
    }

    /// Reloads notifier subscriptions written before a restart. Expired entries are dropped;
    /// active ones ask the home side for current presence (a Probe) so the next NOTIFY is right.
    pub fn restore(
        &mut self,
        hub: &dyn HubPort,
        state: PersistedState,
        now: Instant,
        wall: SystemTime,
    ) -> usize {
        let base = wall
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let cfg = hub.config();
        let mut n_restored = 0;
        for p in state.notifiers {
            if p.expires_unix <= base {
                continue;
            }
            let (Ok(watcher), Ok(presentity), Ok(domain)) = (
                Address::parse(&p.watcher),
                Address::parse(&p.presentity),
                Domain::parse(&p.domain),
            ) else {
                tracing::warn!("state entry with unparsable addresses skipped");
                continue;
            };
            if cfg.sip_federated(&domain).is_none() || !cfg.is_local_domain(&presentity.domain) {
                continue;
            }
            let mut dialog = p.dialog;
            dialog.local_cseq = dialog.local_cseq.saturating_add(RESTORE_CSEQ_MARGIN);
            let id = dialog.id.clone();
            // A hand-edited or corrupt file may say anything: never more than the longest
            // grant, and never an overflow.
            let remaining = p
                .expires_unix
                .saturating_sub(base)
                .min(u64::from(subscription::MAX_EXPIRES));
            let Some(expires_at) = now.checked_add(Duration::from_secs(remaining)) else {
                tracing::warn!(dialog = %crate::net::LogSafe(&id.call_id), "state entry with unusable expiry skipped");
                continue;
            };
            let active = p.active;
            let n = Notifier {
                dialog,
                watcher: watcher.clone(),
                presentity: presentity.clone(),
                domain: domain.clone(),
                state: if active {
                    NotifierState::Active
                } else {
                    NotifierState::Pending
                },
                format: if p.msrtc {
                    SipBodyKind::Msrtc
                } else {
                    SipBodyKind::Pidf
                },
                expires_at,
                last: None,
                conn: None,
                armed: None,
                last_sent: None,
            };
            self.pair_add(
                (watcher.bare_string(), presentity.bare_string()),
                id.clone(),
            );
            self.notifier_insert(id.clone(), n);
            self.arm_notifier(&id, expires_at);
            n_restored += 1;
            let ask = if active {
                Subscription::Probe
            } else {
                Subscription::Subscribe
            };
            hub.submit(
                &domain,
                Envelope {
                    from: watcher,
                    to: presentity,
                    body: Body::Subscription(ask),
                },
            );
        }
        n_restored
    }
}
