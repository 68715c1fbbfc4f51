//! The bounded wait queue of one component link: what the core delivered for a foreign domain
//! while its component connection is down (connecting, handshaking, backing off). An entry
//! leaves it by being written once the link is up, or is handed back to be bounced when it
//! waited longer than `max_age` — a sender learns about an outage within bounded time instead
//! of waiting forever. The link stops taking deliveries while it [`is_full`](WaitQueue::is_full)
//! (the hub's outbox then fills and its readers wait), so `push` refusing is a caller's bug,
//! not a policy. Pure: time is an argument.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct WaitQueue<T> {
    items: VecDeque<(Instant, T)>,
    capacity: usize,
    max_age: Duration,
}

impl<T> WaitQueue<T> {
    pub fn new(capacity: usize, max_age: Duration) -> Self {
        WaitQueue {
            items: VecDeque::new(),
            capacity: capacity.max(1),
            max_age,
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.items.len() >= self.capacity
    }

    /// Queues `item`, or gives it back when the queue is full (the caller bounces it).
    pub fn push(&mut self, now: Instant, item: T) -> Result<(), T> {
        if self.items.len() >= self.capacity {
            return Err(item);
        }
        self.items.push_back((now, item));
        Ok(())
    }

    /// When the oldest entry expires.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.items.front().map(|(t, _)| *t + self.max_age)
    }

    /// Removes and returns every entry older than `max_age` at `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<T> {
        let mut out = Vec::new();
        while let Some((t, _)) = self.items.front() {
            if now < *t + self.max_age {
                break;
            }
            if let Some((_, item)) = self.items.pop_front() {
                out.push(item);
            }
        }
        out
    }

    /// Removes the oldest entry (to write it once the link is up).
    pub fn pop(&mut self) -> Option<T> {
        self.items.pop_front().map(|(_, item)| item)
    }

    /// Takes up to `n` of the oldest entries with the time each was queued (a batch handed
    /// to another node, which may have to come back with [`Self::restore`]).
    pub fn take_timed(&mut self, n: usize) -> Vec<(Instant, T)> {
        let n = n.min(self.items.len());
        self.items.drain(..n).collect()
    }

    /// Puts entries taken with [`Self::take_timed`] back at the front, in their order and
    /// with their original times (so they still expire when they would have). May exceed the
    /// capacity by what was taken out, never more.
    pub fn restore(&mut self, taken: Vec<(Instant, T)>) {
        for e in taken.into_iter().rev() {
            self.items.push_front(e);
        }
    }

    /// Takes everything (shutdown).
    pub fn drain(&mut self) -> Vec<T> {
        self.items.drain(..).map(|(_, item)| item).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_fifo_with_expiry() {
        let t0 = Instant::now();
        let mut q = WaitQueue::new(2, Duration::from_secs(30));
        assert_eq!(q.push(t0, 1), Ok(()));
        assert_eq!(q.push(t0 + Duration::from_secs(10), 2), Ok(()));
        assert!(q.is_full());
        assert_eq!(q.push(t0, 3), Err(3));
        assert_eq!(q.next_expiry(), Some(t0 + Duration::from_secs(30)));
        assert!(q.expire(t0 + Duration::from_secs(29)).is_empty());
        assert_eq!(q.expire(t0 + Duration::from_secs(30)), vec![1]);
        assert_eq!(q.len(), 1);
        assert_eq!(q.pop(), Some(2));
        assert!(q.is_empty());
        assert_eq!(q.next_expiry(), None);
        q.push(t0, 4).ok();
        assert_eq!(q.drain(), vec![4]);
    }

    #[test]
    fn a_batch_taken_and_restored_keeps_its_order_and_times() {
        let t0 = Instant::now();
        let mut q = WaitQueue::new(3, Duration::from_secs(30));
        for (i, n) in [1, 2, 3].into_iter().enumerate() {
            q.push(t0 + Duration::from_secs(i as u64), n).ok();
        }
        let taken = q.take_timed(2);
        assert_eq!(taken.iter().map(|(_, n)| *n).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(q.len(), 1);
        // Room was made: a new delivery comes in behind the batch that is out.
        q.push(t0 + Duration::from_secs(5), 4).ok();
        q.restore(taken);
        assert_eq!(q.len(), 4);
        assert_eq!(q.next_expiry(), Some(t0 + Duration::from_secs(30)));
        assert_eq!(q.expire(t0 + Duration::from_secs(31)), vec![1, 2]);
        assert_eq!(q.drain(), vec![3, 4]);
        assert!(q.take_timed(5).is_empty());
    }
}
