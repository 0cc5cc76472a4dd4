//! `deny_burst`: a pod's denials above a rate (default more than 20 in 10 s), e.g. a scan.
//! Exact sliding window: the last `limit` denial times per pod, so O(1) per denial and at
//! most `limit` timestamps per pod, for at most `MAX_PODS` pods.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenyBurstConfig {
    /// More denials than this inside `window` raise the signal.
    pub limit: u32,
    pub window: Duration,
}

impl Default for DenyBurstConfig {
    fn default() -> Self {
        Self {
            limit: 20,
            window: Duration::from_secs(10),
        }
    }
}

/// Pods tracked at once; beyond it, pods quiet for a window are forgotten first.
const MAX_PODS: usize = 4096;

struct PodWindow {
    /// The most recent denial times, at most `limit` of them, oldest first.
    recent: VecDeque<Instant>,
    /// Raised at this time: quiet until the window has passed, one signal per burst.
    raised: Option<Instant>,
}

pub struct DenyBurst {
    config: DenyBurstConfig,
    pods: HashMap<u64, PodWindow>,
}

impl DenyBurst {
    pub fn new(config: DenyBurstConfig) -> Self {
        Self {
            config,
            pods: HashMap::new(),
        }
    }

    /// `count` denials of pod `pod` at `now`. Returns the number of denials inside the
    /// window when this pushes the pod over the limit.
    pub fn observe(&mut self, pod: u64, count: u64, now: Instant) -> Option<u64> {
        let DenyBurstConfig { limit, window } = self.config;
        if !self.pods.contains_key(&pod) && self.pods.len() >= MAX_PODS {
            self.pods
                .retain(|_, w| w.recent.back().is_some_and(|t| now.duration_since(*t) < window));
            if self.pods.len() >= MAX_PODS {
                return None;
            }
        }
        let w = self.pods.entry(pod).or_insert_with(|| PodWindow {
            recent: VecDeque::with_capacity(limit as usize + 1),
            raised: None,
        });
        // An aggregated record stands for `count` denials; more than limit+1 add nothing.
        for _ in 0..count.min(u64::from(limit) + 1) {
            if w.recent.len() > limit as usize {
                w.recent.pop_front();
            }
            w.recent.push_back(now);
        }
        while w.recent.front().is_some_and(|t| now.duration_since(*t) >= window) {
            w.recent.pop_front();
        }
        if w.raised.is_some_and(|t| now.duration_since(t) < window) {
            return None;
        }
        (w.recent.len() > limit as usize).then(|| {
            w.raised = Some(now);
            w.recent.len() as u64
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raises_once_above_the_rate_and_not_at_it() {
        let mut d = DenyBurst::new(DenyBurstConfig::default());
        let t0 = Instant::now();
        for i in 0..20 {
            assert_eq!(d.observe(1, 1, t0 + Duration::from_millis(i * 100)), None);
        }
        assert_eq!(d.observe(1, 1, t0 + Duration::from_secs(3)), Some(21));
        assert_eq!(
            d.observe(1, 5, t0 + Duration::from_secs(4)),
            None,
            "one signal per burst"
        );
        assert_eq!(d.observe(2, 1, t0), None, "per pod");
        // A slow, steady stream never raises it: 20 denials per 10 s at most.
        let mut slow = DenyBurst::new(DenyBurstConfig::default());
        for i in 0..200 {
            assert_eq!(
                slow.observe(1, 1, t0 + Duration::from_millis(i * 510)),
                None,
                "denial {i}"
            );
        }
        // An aggregated record counts for all it stands for.
        let mut agg = DenyBurst::new(DenyBurstConfig::default());
        assert_eq!(agg.observe(1, 29, t0), Some(21));
    }

    #[test]
    fn memory_stays_bounded() {
        let mut d = DenyBurst::new(DenyBurstConfig {
            limit: 3,
            window: Duration::from_secs(1),
        });
        let t0 = Instant::now();
        for pod in 0..(MAX_PODS as u64 * 2) {
            d.observe(pod, 100, t0);
        }
        assert!(d.pods.len() <= MAX_PODS);
        assert!(d.pods.values().all(|w| w.recent.len() <= 4));
        d.observe(u64::MAX, 1, t0 + Duration::from_secs(2));
        assert!(
            d.pods.len() <= MAX_PODS && d.pods.contains_key(&u64::MAX),
            "quiet pods make room"
        );
    }
}
