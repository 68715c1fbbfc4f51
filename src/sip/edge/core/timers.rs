//! Compaction of the core's timer heap. Deadlines are queued lazily: a machine that moves its
//! deadline queues a new entry and leaves the old one to fire as a no-op, and an entry outlives
//! the transaction or dialog it was for (a NOTIFY's client transaction ends at its 200 over
//! TCP, Timer K = 0, RFC 3261 §17.1.2.2, yet its Timer F entry waits 64·T1). After a burst —
//! 100 000 subscriptions set up, each NOTIFY leaving such an entry that keeps its transaction
//! key alive — most of the heap is dead weight. So once the heap doubled since the last
//! compaction, the entries that can only fire as no-ops are dropped and the heap shrunk:
//! amortized O(1) per queued deadline, and the heap stays within twice the live deadlines.
//! The transaction tables give back the room of a past burst at the same time.
//!
//! Notifier expiries have a heap of their own: they are as many as the foreign watchers (a
//! million at most) and live for up to an hour, while transaction deadlines are few at any
//! moment but come and go by the hundred thousand. Apart, the transactions' heap is compacted
//! down to the few live ones after a burst instead of being kept at twice the watchers, and a
//! notifier's entry is a bare `(Instant, fingerprint)` (see `notifiers`).

use std::cmp::Reverse;
use std::time::Instant;

use super::{Core, DialogId, Mono, TimerKey};

/// Below this many entries the heap is never compacted.
const COMPACT_FLOOR: usize = 1024;

impl Core {
    /// Queues `key` at `at`, compacting the heap first when it doubled since the last time.
    pub(super) fn schedule(&mut self, key: TimerKey, at: Instant) {
        if let TimerKey::Notifier(id) = key {
            return self.schedule_notifier(&id, Mono::of(at));
        }
        if self.heap.len() >= self.compact_at.max(COMPACT_FLOOR) {
            self.compact_timers();
            self.compact_at = self.heap.len().saturating_mul(2);
        }
        self.heap.push(Reverse((at, key)));
    }

    /// Queues notifier `id`'s expiry timer at `at` in the notifier heap.
    pub(super) fn schedule_notifier(&mut self, id: &DialogId, at: Mono) {
        if self.notifier_heap.len() >= self.notifier_compact_at.max(COMPACT_FLOOR) {
            self.compact_notifier_timers();
            self.notifier_compact_at = self.notifier_heap.len().saturating_mul(2);
        }
        let fp = self.notifiers.fingerprint(id);
        self.notifier_heap.push(Reverse((at, fp)));
    }

    /// The earliest entry of either heap if it is due at `now` (a notifier entry whose
    /// notifier is gone is dropped on the way: it could only fire as a no-op).
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<(Instant, TimerKey)> {
        loop {
            let t = self.heap.peek().map(|Reverse((at, _))| *at);
            let n = self
                .notifier_heap
                .peek()
                .map(|Reverse((at, _))| at.instant());
            match (t, n) {
                (Some(t), n) if t <= now && n.is_none_or(|n| t <= n) => {
                    return self.heap.pop().map(|Reverse(e)| e);
                }
                (_, Some(n)) if n <= now => {
                    let Reverse((at, fp)) = self.notifier_heap.pop()?;
                    if let Some(n) = self.notifiers.by_fingerprint(fp) {
                        return Some((at.instant(), TimerKey::Notifier(n.dialog.id.clone())));
                    }
                }
                _ => return None,
            }
        }
    }

    /// `compact_timers` for the notifier heap.
    fn compact_notifier_timers(&mut self) {
        let mut heap = std::mem::take(&mut self.notifier_heap).into_vec();
        heap.retain(|Reverse((at, fp))| {
            self.notifiers
                .by_fingerprint(*fp)
                .is_some_and(|n| n.armed == Mono::NEVER || n.armed == *at)
        });
        heap.shrink_to_fit();
        self.notifier_heap = heap.into();
    }

    /// Drops the entries that would fire as no-ops: their machine is gone, or it has another
    /// deadline queued (`armed`, always the earliest one queued for it; a handler that finds
    /// `armed` elsewhere only re-checks and re-arms). Subscriber and session entries stay
    /// while their machine exists; batch entries (few: one per Lync batch) always stay.
    fn compact_timers(&mut self) {
        let live = |armed: Option<Instant>, at: Instant| armed.is_none_or(|a| a == at);
        let mut heap = std::mem::take(&mut self.heap).into_vec();
        heap.retain(|Reverse((at, key))| match key {
            TimerKey::Server(k) => self.server.get(k).is_some_and(|e| live(e.armed, *at)),
            TimerKey::Client(k) => self.client.get(k).is_some_and(|e| live(e.armed, *at)),
            TimerKey::Notifier(id) => self
                .notifiers
                .get(id)
                .is_some_and(|n| n.armed == Mono::NEVER || n.armed == Mono::of(*at)),
            TimerKey::Batch(_) => true,
            TimerKey::Subscriber(id) => self.subscribers.contains_key(id),
            TimerKey::Session(id) => self.sessions.contains_key(id),
        });
        heap.shrink_to_fit();
        self.heap = heap.into();
        // A hash table keeps the room of its largest burst (a storm of NOTIFYs in flight);
        // give it back once three quarters of it stand empty.
        if self.client.capacity() > 4 * self.client.len() + 64 {
            self.client.shrink_to_fit();
        }
        if self.server.capacity() > 4 * self.server.len() + 64 {
            self.server.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::tests::{core, dom, env, hub, msg, peer, sent, subscribe_text};
    use super::*;
    use crate::gateway::{Body, PresenceBody, Subscription};

    /// Answers 200 to every request the core sent (the NOTIFYs), ending their client
    /// transactions; counts them.
    fn answer_all(c: &mut Core, h: &super::super::tests::FakeHub, now: Instant) -> usize {
        let mut n = 0;
        for m in sent(c).into_iter().filter(|m| m.is_request()) {
            let ok = m.build_response(200, "OK", None).expect("200");
            c.handle_message(h, &peer(), ok, now);
            n += 1;
        }
        n
    }

    /// Watchers set up, approved and sent presence three times: every NOTIFY's client
    /// transaction ended at its 200 but left its Timer F entry. The heap stays within twice
    /// the live deadlines, and every subscription still ends at its expiry.
    #[test]
    fn ended_transactions_do_not_pile_up_in_the_timer_heap() {
        const WATCHERS: usize = 1000;
        let h = hub();
        let mut c = core();
        let t0 = Instant::now();
        let watcher = |i: usize| format!("bob{i}@partner.com");
        let mut notifies = 0;
        for i in 0..WATCHERS {
            let text = subscribe_text(3600)
                .replace("bob@partner.com", &watcher(i))
                .replace("Call-ID: c1", &format!("Call-ID: c{i}"))
                .replace("z9hG4bKs1", &format!("z9hG4bKs{i}x"));
            c.handle_message(&h, &peer(), msg(&text), t0);
            notifies += answer_all(&mut c, &h, t0);
        }
        let approve = Body::Subscription(Subscription::Subscribed);
        for i in 0..WATCHERS {
            let e = env("alice@example.com", &watcher(i), approve.clone());
            c.handle_delivery(&h, &dom(), e, t0);
            notifies += answer_all(&mut c, &h, t0);
        }
        for state in ["busy", "away", "online"] {
            for i in 0..WATCHERS {
                let p = Body::Presence(PresenceBody {
                    system: "lync".into(),
                    state: state.into(),
                    note: None,
                    priority: None,
                });
                c.handle_delivery(&h, &dom(), env("alice@example.com/pc", &watcher(i), p), t0);
                notifies += answer_all(&mut c, &h, t0);
            }
        }
        assert_eq!(c.counts().0, WATCHERS);
        assert_eq!(c.txn_counts().1, 0, "every NOTIFY was answered");
        assert!(notifies >= 4 * WATCHERS, "{notifies} NOTIFYs");
        let entries = c.heap.len() + c.notifier_heap.len();
        assert!(
            entries <= 2 * WATCHERS + 1024,
            "{entries} timer entries for {WATCHERS} subscriptions after {notifies} NOTIFYs"
        );
        // The transactions' heap keeps no room of the burst: it holds what is live.
        assert!(c.heap.len() <= 1024, "{} transaction timers", c.heap.len());
        // Nothing live was dropped: each subscription still ends at its expiry.
        c.handle_timeout(&h, t0 + Duration::from_secs(3599));
        assert_eq!(c.counts().0, WATCHERS);
        c.handle_timeout(&h, t0 + Duration::from_secs(3601));
        assert_eq!(c.counts().0, 0);
    }
}
