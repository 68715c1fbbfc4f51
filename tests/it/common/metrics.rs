//! Counters of the process-wide Prometheus registry, for the in-process tests.
//!
//! Every module of the integration binary shares one process, so one registry: a test may only
//! assert on a change it caused. Each metric family has a lock. Every test that starts an
//! in-process edge of a family holds it shared (`moves`) for its whole run; a test that asserts
//! on the family's counters holds it exclusive (`asserts`) and reads each counter before and
//! after what it does, so the difference is its own. (Tests of the `legate` binary scrape that
//! process's own `/metrics` instead, see `common::legate`.)
//!
//! Take the guard first thing in the test, before its time limit starts (waiting for another
//! test is not this test's time), and exactly once (a second shared guard behind a queued
//! exclusive one would wait for itself). A test holding two families takes them in the order
//! of `Family`.

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The metric families tests assert on, one lock each.
#[derive(Clone, Copy, Debug)]
pub enum Family {
    /// `legate_s2s_*`: every test that starts an in-process s2s edge.
    S2s,
    /// `legate_component_*`: every test that starts in-process component links.
    Component,
    /// `legate_sip_*`: every test that starts an in-process SIP edge.
    Sip,
}

static S2S: RwLock<()> = RwLock::const_new(());
static COMPONENT: RwLock<()> = RwLock::const_new(());
static SIP: RwLock<()> = RwLock::const_new(());

fn lock(family: Family) -> &'static RwLock<()> {
    match family {
        Family::S2s => &S2S,
        Family::Component => &COMPONENT,
        Family::Sip => &SIP,
    }
}

/// Held by a test that moves `family`'s counters without asserting on them.
pub async fn moves(family: Family) -> RwLockReadGuard<'static, ()> {
    lock(family).read().await
}

/// Held by a test that asserts on `family`'s counters: no other test of the family runs.
pub async fn asserts(family: Family) -> RwLockWriteGuard<'static, ()> {
    lock(family).write().await
}

/// The sum of every series of counter `name` whose labels include all of `labels` (each
/// `key="value"`), read from the registry now.
pub fn counter(name: &str, labels: &[&str]) -> u64 {
    sum(&legate::metrics::render(), name, labels)
}

/// `counter` over a given Prometheus text.
pub fn sum(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.trim().rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let have: Vec<&str> = rest.split(',').collect();
            (n == name && labels.iter().all(|w| have.contains(w)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .map(|v| v as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::sum;

    #[test]
    fn series_are_matched_by_name_and_every_label() {
        let t = "# TYPE x_total counter\nx_total{a=\"1\",b=\"2\"} 3\nx_total{a=\"1\",b=\"3\"} 4\nx_total_other{a=\"1\"} 9\ny 5\n";
        assert_eq!(sum(t, "x_total", &["a=\"1\""]), 7);
        assert_eq!(sum(t, "x_total", &["a=\"1\"", "b=\"3\""]), 4);
        assert_eq!(sum(t, "x_total", &["a=\"2\""]), 0);
        assert_eq!(sum(t, "y", &[]), 5);
    }
}
