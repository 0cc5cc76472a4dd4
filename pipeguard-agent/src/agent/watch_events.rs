//! How a watcher's events are read: which ones changed the cache (and so need a sync), which
//! ones prove the API answered, and the backoff between failed attempts.
//!
//! kube-runtime's watcher yields `Init` before it lists, and its `StreamBackoff` resets on
//! every `Ok`: a list that keeps failing (a CRD not installed: 404; RBAC missing: 403) was
//! retried every 0.8 s forever, and each retry woke the sync loop twice for a full sync of
//! every pod (3–4 a second on an idle node).

use std::time::{Duration, Instant};

use kube::runtime::{utils::Backoff, watcher};

/// The cache now differs from before this event: the store swaps in a relist at `InitDone`
/// and applies single changes at once; `Init` and `InitApply` only fill a buffer.
pub fn changed_cache<K>(event: &watcher::Event<K>) -> bool {
    matches!(
        event,
        watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone
    )
}

/// The API answered a list or a watch (`Init` is yielded before the list is even sent).
pub fn api_answered<K>(event: &watcher::Event<K>) -> bool {
    !matches!(event, watcher::Event::Init)
}

/// Delays between failed attempts: 0.8 s doubling to [`MAX_DELAY`], each stretched by a
/// random 0–100 % so a fleet of agents spreads out; restarted after [`RESET_AFTER`] without
/// an error, never by an `Ok` item (`Init` is one even when the list then fails). A CRD
/// installed later is found within about 2 × [`MAX_DELAY`].
pub struct WatchBackoff {
    next: Duration,
    last: Option<Instant>,
    random: std::collections::hash_map::RandomState,
    draws: u64,
}

const FIRST_DELAY: Duration = Duration::from_millis(800);
pub const MAX_DELAY: Duration = Duration::from_secs(10);
const RESET_AFTER: Duration = Duration::from_secs(120);

impl Default for WatchBackoff {
    fn default() -> Self {
        Self {
            next: FIRST_DELAY,
            last: None,
            random: Default::default(),
            draws: 0,
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) > RESET_AFTER)
        {
            self.next = FIRST_DELAY;
        }
        self.last = Some(now);
        let base = self.next;
        self.next = (base * 2).min(MAX_DELAY);
        self.draws += 1;
        let fraction = std::hash::BuildHasher::hash_one(&self.random, self.draws) as f64 / u64::MAX as f64;
        Some(base.mul_f64(1.0 + fraction))
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        // Only the time without errors restarts it (see above).
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_events_that_change_the_cache_count_as_changes() {
        let changed: Vec<bool> = [
            watcher::Event::Init,
            watcher::Event::InitApply(1),
            watcher::Event::InitDone,
            watcher::Event::Apply(1),
            watcher::Event::Delete(1),
        ]
        .iter()
        .map(changed_cache)
        .collect();
        assert_eq!(changed, [false, false, true, true, true]);
        assert!(!api_answered(&watcher::Event::<u8>::Init));
        assert!(api_answered(&watcher::Event::<u8>::InitDone));
    }

    #[tokio::test]
    async fn an_ok_item_does_not_restart_the_backoff() {
        let mut backoff = WatchBackoff::default();
        let first = backoff.next().expect("a delay");
        backoff.reset();
        let second = backoff.next().expect("a delay");
        backoff.reset();
        let third = backoff.next().expect("a delay");
        // Jittered, but each step doubles the base (0.8 s, 1.6 s, 3.2 s).
        assert!(first < Duration::from_millis(1600), "{first:?}");
        assert!(
            third > Duration::from_millis(1600),
            "{first:?} {second:?} {third:?}"
        );
    }
}
