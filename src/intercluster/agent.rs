//! The sync agent's decisions (sans-IO: time comes in, actions go out; the driver in
//! `run.rs` dials, writes the store and raises the alarm). Requirements §5, seed 002:
//!
//! - each peer is synced once at start, then every `sync_interval_mins`; a change of the
//!   interval takes effect at the next sync (the sync already scheduled keeps its time);
//! - a forced sync (`legate intercluster force-sync [PEER] [--full]`) starts at once, or right
//!   after the one running;
//! - a sync that has not succeeded for `stuck_after_secs` since it started (running too long,
//!   or failing again and again) raises `InterClusterSyncAgentPeerPeriodicSyncingFailure`; with
//!   `auto_recovery` the agent is restarted for that peer (the running attempt is cancelled and
//!   a new one starts at once), at most once per `stuck_after_secs`;
//! - a sync that failed four periods in a row restarts the agent for that peer too (seed 002:
//!   "restarts following the completion of four sync periods");
//! - the alarm is cleared by the next sync that succeeds; a failed sync changes nothing of what
//!   was learned from the peer (split brain: its users stay routable).

use super::changelog::Cursor;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Failed periods in a row after which the agent is restarted (seed 002).
pub const FAILED_PERIODS_BEFORE_RESTART: u32 = 4;

/// What the agent is configured with (from `[intercluster]`, read again at each decision).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub interval: Duration,
    pub stuck_after: Duration,
    pub auto_recovery: bool,
}

/// Why the agent was restarted for a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartReason {
    /// No success for `stuck_after` (auto-recovery).
    Stuck,
    /// Four failed periods in a row.
    Failing,
}

impl RestartReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartReason::Stuck => "stuck",
            RestartReason::Failing => "failing",
        }
    }
}

/// What the driver does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Sync with `peer`: incremental from `cursor` unless `full` (or no cursor).
    Start {
        peer: Arc<str>,
        attempt: u64,
        cursor: Option<Cursor>,
        full: bool,
    },
    /// Abandon the running attempt with `peer` (its result will be ignored).
    Cancel {
        peer: Arc<str>,
        attempt: u64,
    },
    /// The agent was restarted for `peer` (a `Start` follows).
    Restarted {
        peer: Arc<str>,
        why: RestartReason,
    },
    /// No success with `peer` for `for_secs`: raise the alarm.
    RaiseAlarm {
        peer: Arc<str>,
        for_secs: u64,
    },
    ClearAlarm {
        peer: Arc<str>,
    },
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The peer answered; its users are stored and `cursor` is where we now stand.
    Synced {
        cursor: Cursor,
    },
    Failed,
}

#[derive(Debug, Clone)]
struct Peer {
    next_due: Instant,
    running: Option<(u64, Instant)>,
    cursor: Option<Cursor>,
    /// When the first attempt since the last success started.
    pending_since: Option<Instant>,
    failures: u32,
    alarm: bool,
    /// A forced sync waiting: `Some(full)`.
    forced: Option<bool>,
    last_restart: Option<Instant>,
}

/// The agent: one schedule per peer.
#[derive(Debug)]
pub struct Agent {
    settings: Settings,
    peers: BTreeMap<Arc<str>, Peer>,
    attempts: u64,
    queued: Vec<Action>,
}

/// A peer name that is not configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a listed intercluster peer")]
pub struct UnknownPeer(pub String);

impl Agent {
    /// Every peer is due at `now` (the first sync after start or after becoming leader).
    pub fn new(settings: Settings, peers: &[Arc<str>], now: Instant) -> Agent {
        Agent {
            settings,
            peers: peers
                .iter()
                .map(|p| {
                    (
                        p.clone(),
                        Peer {
                            next_due: now,
                            running: None,
                            cursor: None,
                            pending_since: None,
                            failures: 0,
                            alarm: false,
                            forced: None,
                            last_restart: None,
                        },
                    )
                })
                .collect(),
            attempts: 0,
            queued: Vec::new(),
        }
    }

    /// Where the last good sync with `peer` left us (from the store, after a change of leader).
    pub fn set_cursor(&mut self, peer: &str, cursor: Option<Cursor>) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.cursor = cursor;
        }
    }

    pub fn cursor(&self, peer: &str) -> Option<Cursor> {
        self.peers.get(peer).and_then(|p| p.cursor)
    }

    /// New settings: the stuck threshold and auto-recovery apply at once, the interval when
    /// the next sync is scheduled (that is, after the sync already scheduled).
    pub fn configure(&mut self, settings: Settings) {
        self.settings = settings;
    }

    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// A forced sync of `peer` (`None`: every peer).
    pub fn force(&mut self, peer: Option<&str>, full: bool) -> Result<(), UnknownPeer> {
        match peer {
            Some(name) => {
                let p = self
                    .peers
                    .get_mut(name)
                    .ok_or_else(|| UnknownPeer(name.to_string()))?;
                p.forced = Some(p.forced.unwrap_or(false) || full);
            }
            None => {
                for p in self.peers.values_mut() {
                    p.forced = Some(p.forced.unwrap_or(false) || full);
                }
            }
        }
        Ok(())
    }

    /// The end of attempt `attempt` with `peer`; a cancelled or unknown attempt is ignored.
    pub fn finished(&mut self, peer: &str, attempt: u64, outcome: Outcome, now: Instant) {
        let interval = self.settings.interval;
        let Some((name, p)) = self.peers.iter_mut().find(|(n, _)| &***n == peer) else {
            return;
        };
        if p.running.map(|(a, _)| a) != Some(attempt) {
            return;
        }
        p.running = None;
        p.next_due = now + interval;
        match outcome {
            Outcome::Synced { cursor } => {
                p.cursor = Some(cursor);
                p.pending_since = None;
                p.failures = 0;
                p.last_restart = None;
                if p.alarm {
                    p.alarm = false;
                    self.queued.push(Action::ClearAlarm { peer: name.clone() });
                }
            }
            Outcome::Failed => {
                p.failures += 1;
                if p.failures >= FAILED_PERIODS_BEFORE_RESTART {
                    p.failures = 0;
                    p.last_restart = Some(now);
                    p.next_due = now;
                    self.queued.push(Action::Restarted {
                        peer: name.clone(),
                        why: RestartReason::Failing,
                    });
                }
            }
        }
    }

    /// What to do at `now`.
    pub fn poll(&mut self, now: Instant) -> Vec<Action> {
        let mut out = std::mem::take(&mut self.queued);
        let s = self.settings;
        for (name, p) in self.peers.iter_mut() {
            if let Some(since) = p.pending_since.filter(|t| now >= *t + s.stuck_after) {
                if !p.alarm {
                    p.alarm = true;
                    out.push(Action::RaiseAlarm {
                        peer: name.clone(),
                        for_secs: now.duration_since(since).as_secs(),
                    });
                }
                let may_restart = p.last_restart.is_none_or(|t| now >= t + s.stuck_after);
                if s.auto_recovery && may_restart {
                    if let Some((attempt, _)) = p.running.take() {
                        out.push(Action::Cancel {
                            peer: name.clone(),
                            attempt,
                        });
                    }
                    p.last_restart = Some(now);
                    p.next_due = now;
                    out.push(Action::Restarted {
                        peer: name.clone(),
                        why: RestartReason::Stuck,
                    });
                }
            }
            if p.running.is_none() && (now >= p.next_due || p.forced.is_some()) {
                self.attempts += 1;
                let full = p.forced.take().unwrap_or(false) || p.cursor.is_none();
                p.running = Some((self.attempts, now));
                p.pending_since.get_or_insert(now);
                out.push(Action::Start {
                    peer: name.clone(),
                    attempt: self.attempts,
                    cursor: if full { None } else { p.cursor },
                    full,
                });
            }
        }
        out
    }

    /// When [`Agent::poll`] has something to do next (`None`: nothing is scheduled).
    pub fn next_deadline(&self) -> Option<Instant> {
        let s = self.settings;
        self.peers
            .values()
            .flat_map(|p| {
                let due = if p.running.is_none() {
                    Some(p.next_due)
                } else {
                    None
                };
                let stuck = p.pending_since.and_then(|t| {
                    let at = t + s.stuck_after;
                    match p.last_restart {
                        _ if !p.alarm => Some(at),
                        // Raised: what comes next is a restart, if any.
                        _ if !s.auto_recovery => None,
                        Some(r) => Some((r + s.stuck_after).max(at)),
                        None => Some(at),
                    }
                });
                due.into_iter().chain(stuck)
            })
            .min()
    }

    /// The attempt running with `peer`, if any.
    pub fn running(&self, peer: &str) -> Option<u64> {
        self.peers.get(peer).and_then(|p| p.running.map(|(a, _)| a))
    }

    /// Whether the alarm is raised for `peer`.
    pub fn alarmed(&self, peer: &str) -> bool {
        self.peers.get(peer).is_some_and(|p| p.alarm)
    }

    /// Consecutive failed attempts with `peer` since its last success or restart.
    pub fn failures(&self, peer: &str) -> u32 {
        self.peers.get(peer).map_or(0, |p| p.failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn settings(interval_mins: u64, stuck_secs: u64, auto: bool) -> Settings {
        Settings {
            interval: MIN * interval_mins as u32,
            stuck_after: Duration::from_secs(stuck_secs),
            auto_recovery: auto,
        }
    }

    fn starts(actions: &[Action]) -> Vec<(String, u64, bool)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Start {
                    peer,
                    attempt,
                    full,
                    ..
                } => Some((peer.to_string(), *attempt, *full)),
                _ => None,
            })
            .collect()
    }

    fn cur(v: u64) -> Cursor {
        Cursor {
            epoch: 1,
            version: v,
        }
    }

    fn peers(names: &[&str]) -> Vec<Arc<str>> {
        names.iter().map(|n| Arc::from(*n)).collect()
    }

    #[test]
    fn every_peer_is_synced_at_start_then_every_interval() {
        let t0 = Instant::now();
        let mut a = Agent::new(settings(30, 7200, true), &peers(&["b", "c"]), t0);
        let s = starts(&a.poll(t0));
        assert_eq!(s.len(), 2);
        assert!(s.iter().all(|(_, _, full)| *full), "no cursor yet: full");
        assert!(a.poll(t0).is_empty(), "nothing twice");
        a.finished("b", s[0].1, Outcome::Synced { cursor: cur(5) }, t0 + MIN);
        a.finished("c", s[1].1, Outcome::Synced { cursor: cur(9) }, t0 + MIN);
        assert_eq!(a.next_deadline(), Some(t0 + MIN * 31));
        assert!(a.poll(t0 + MIN * 30).is_empty());
        let next = a.poll(t0 + MIN * 31);
        assert_eq!(
            next,
            vec![
                Action::Start {
                    peer: "b".into(),
                    attempt: 3,
                    cursor: Some(cur(5)),
                    full: false
                },
                Action::Start {
                    peer: "c".into(),
                    attempt: 4,
                    cursor: Some(cur(9)),
                    full: false
                },
            ],
            "each peer from its own cursor"
        );
    }

    #[test]
    fn a_new_interval_applies_from_the_next_sync() {
        let t0 = Instant::now();
        let mut a = Agent::new(settings(30, 7200, true), &peers(&["b"]), t0);
        let s = starts(&a.poll(t0));
        a.finished("b", s[0].1, Outcome::Synced { cursor: cur(1) }, t0);
        a.configure(settings(60, 7200, true));
        // The sync already scheduled keeps its time...
        assert_eq!(a.next_deadline(), Some(t0 + MIN * 30));
        let s = starts(&a.poll(t0 + MIN * 30));
        assert_eq!(s.len(), 1);
        a.finished(
            "b",
            s[0].1,
            Outcome::Synced { cursor: cur(2) },
            t0 + MIN * 30,
        );
        // ...and the one after it uses the new interval.
        assert_eq!(a.next_deadline(), Some(t0 + MIN * 90));
    }

    #[test]
    fn force_starts_at_once_or_after_the_running_one() {
        let t0 = Instant::now();
        let mut a = Agent::new(settings(30, 7200, true), &peers(&["b", "c"]), t0);
        let s = starts(&a.poll(t0));
        a.finished("b", s[0].1, Outcome::Synced { cursor: cur(1) }, t0);
        a.finished("c", s[1].1, Outcome::Synced { cursor: cur(1) }, t0);
        assert_eq!(a.force(Some("x"), false), Err(UnknownPeer("x".into())));
        a.force(Some("b"), false).ok();
        let s = starts(&a.poll(t0 + MIN));
        assert_eq!(s, vec![("b".to_string(), 3, false)], "incremental, b only");
        // Forced again while running: starts once that one ends, in full.
        a.force(None, true).ok();
        let s2 = starts(&a.poll(t0 + MIN));
        assert_eq!(s2, vec![("c".to_string(), 4, true)]);
        a.finished("b", 3, Outcome::Synced { cursor: cur(2) }, t0 + MIN);
        assert_eq!(starts(&a.poll(t0 + MIN)), vec![("b".to_string(), 5, true)]);
    }

    #[test]
    fn a_stuck_sync_raises_the_alarm_and_auto_recovery_restarts_it() {
        let t0 = Instant::now();
        let stuck = Duration::from_secs(7200);
        let mut a = Agent::new(settings(30, 7200, true), &peers(&["b"]), t0);
        let s = starts(&a.poll(t0));
        assert_eq!(a.next_deadline(), Some(t0 + stuck));
        assert!(a.poll(t0 + stuck - Duration::from_secs(1)).is_empty());
        let acts = a.poll(t0 + stuck);
        assert_eq!(
            acts,
            vec![
                Action::RaiseAlarm {
                    peer: "b".into(),
                    for_secs: 7200
                },
                Action::Cancel {
                    peer: "b".into(),
                    attempt: s[0].1
                },
                Action::Restarted {
                    peer: "b".into(),
                    why: RestartReason::Stuck
                },
                Action::Start {
                    peer: "b".into(),
                    attempt: 2,
                    cursor: None,
                    full: true
                },
            ]
        );
        assert!(a.alarmed("b"));
        // The cancelled attempt's result is ignored.
        a.finished("b", s[0].1, Outcome::Synced { cursor: cur(1) }, t0 + stuck);
        assert!(a.alarmed("b"));
        // Still stuck: restarted again after another stuck_after, never twice in between.
        assert!(a.poll(t0 + stuck + MIN).is_empty());
        let again = a.poll(t0 + stuck * 2);
        assert!(again.contains(&Action::Restarted {
            peer: "b".into(),
            why: RestartReason::Stuck
        }));
        assert!(!again.iter().any(|x| matches!(x, Action::RaiseAlarm { .. })));
        // A success clears the alarm.
        a.finished("b", 3, Outcome::Synced { cursor: cur(1) }, t0 + stuck * 2);
        assert_eq!(
            a.poll(t0 + stuck * 2),
            vec![Action::ClearAlarm { peer: "b".into() }]
        );
        assert!(!a.alarmed("b"));
    }

    #[test]
    fn without_auto_recovery_the_alarm_is_raised_but_nothing_restarted() {
        let t0 = Instant::now();
        let stuck = Duration::from_secs(7200);
        let mut a = Agent::new(settings(30, 7200, false), &peers(&["b"]), t0);
        a.poll(t0);
        let acts = a.poll(t0 + stuck);
        assert_eq!(
            acts,
            vec![Action::RaiseAlarm {
                peer: "b".into(),
                for_secs: 7200
            }]
        );
        assert!(
            a.poll(t0 + stuck * 3).is_empty(),
            "the attempt keeps running"
        );
    }

    #[test]
    fn failures_are_retried_each_period_and_stuck_after_the_threshold() {
        // A short stuck threshold, as the integration tests configure it.
        let t0 = Instant::now();
        let mut a = Agent::new(settings(30, 3, true), &peers(&["b"]), t0);
        let s = starts(&a.poll(t0));
        a.finished("b", s[0].1, Outcome::Failed, t0 + Duration::from_secs(1));
        assert_eq!(a.failures("b"), 1);
        // Failing since t0: after 3 s the alarm, and a restart that tries again at once.
        let acts = a.poll(t0 + Duration::from_secs(3));
        assert!(matches!(acts[0], Action::RaiseAlarm { .. }), "{acts:?}");
        assert!(
            matches!(acts.last(), Some(Action::Start { attempt: 2, .. })),
            "{acts:?}"
        );
        a.finished("b", 2, Outcome::Failed, t0 + Duration::from_secs(4));
        // The next restart comes one threshold after the last one.
        assert_eq!(a.next_deadline(), Some(t0 + Duration::from_secs(6)));
        let acts = a.poll(t0 + Duration::from_secs(6));
        assert!(acts
            .iter()
            .any(|x| matches!(x, Action::Start { attempt: 3, .. })));
        // The peer is back: the alarm clears, what was learned stays (cursor kept).
        a.finished(
            "b",
            3,
            Outcome::Synced { cursor: cur(4) },
            t0 + Duration::from_secs(7),
        );
        assert_eq!(
            a.poll(t0 + Duration::from_secs(7)),
            vec![Action::ClearAlarm { peer: "b".into() }]
        );
        assert_eq!(a.cursor("b"), Some(cur(4)));
    }

    #[test]
    fn four_failed_periods_restart_the_agent() {
        let t0 = Instant::now();
        // A stuck threshold longer than four periods, so only the failure rule acts.
        let mut a = Agent::new(settings(30, 86_400, false), &peers(&["b"]), t0);
        let mut now = t0;
        for i in 1..=4u64 {
            let s = starts(&a.poll(now));
            assert_eq!(s.len(), 1, "period {i}");
            a.finished("b", s[0].1, Outcome::Failed, now);
            now += MIN * 30;
        }
        let acts = a.poll(now - MIN * 30);
        assert_eq!(
            acts,
            vec![
                Action::Restarted {
                    peer: "b".into(),
                    why: RestartReason::Failing
                },
                Action::Start {
                    peer: "b".into(),
                    attempt: 5,
                    cursor: None,
                    full: true
                }
            ]
        );
        assert_eq!(a.failures("b"), 0);
    }

    #[test]
    fn a_failed_sync_keeps_the_cursor() {
        let t0 = Instant::now();
        let mut a = Agent::new(settings(30, 7200, true), &peers(&["b"]), t0);
        let s = starts(&a.poll(t0));
        a.finished("b", s[0].1, Outcome::Synced { cursor: cur(3) }, t0);
        let s = starts(&a.poll(t0 + MIN * 30));
        assert!(!s[0].2);
        a.finished("b", s[0].1, Outcome::Failed, t0 + MIN * 30);
        assert_eq!(a.cursor("b"), Some(cur(3)));
        let next = a.poll(t0 + MIN * 60);
        assert!(next.iter().any(|x| matches!(
            x,
            Action::Start {
                cursor: Some(c),
                full: false,
                ..
            } if *c == cur(3)
        )));
    }
}
