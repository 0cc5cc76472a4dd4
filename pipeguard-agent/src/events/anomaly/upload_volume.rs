//! `upload_volume`: bytes sent to one destination above a threshold (exfiltration to an
//! allowed host). Fed running byte totals per destination; raises once per destination.

use std::collections::HashSet;

/// Default threshold: 100 MiB to one destination in one job is worth a look.
pub const DEFAULT_BYTES: u64 = 100 << 20;
/// Destinations remembered as raised (more are still checked, but may raise again).
const MAX_RAISED: usize = 16_384;

pub struct UploadVolume<K> {
    threshold: u64,
    raised: HashSet<K>,
}

impl<K: std::hash::Hash + Eq + Clone> UploadVolume<K> {
    pub fn new(threshold: u64) -> Self {
        Self {
            threshold,
            raised: HashSet::new(),
        }
    }

    /// `total` bytes sent to `dest` so far. True the first time it is above the threshold.
    pub fn observe(&mut self, dest: &K, total: u64) -> bool {
        if total <= self.threshold || self.raised.contains(dest) {
            return false;
        }
        if self.raised.len() >= MAX_RAISED {
            self.raised.clear();
        }
        self.raised.insert(dest.clone());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raises_once_per_destination_above_the_threshold() {
        let mut u = UploadVolume::new(1000);
        assert!(!u.observe(&"a", 1000), "at the threshold is fine");
        assert!(u.observe(&"a", 1001));
        assert!(!u.observe(&"a", 5000), "once");
        assert!(!u.observe(&"b", 10));
        assert!(u.observe(&"b", 2000));
    }
}
