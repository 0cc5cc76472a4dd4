//! Counter slots: each pod's row in the per-CPU counter array (`PodCounters`). The kernel
//! counts by slot (an array lookup per packet, no hashing); the engine hands slots out and
//! keeps the pod → slot map that reading the counters back needs.

use std::collections::{HashMap, VecDeque};

use pipeguard_common::{COUNTER_SLOT_NONE, COUNTER_SLOT_OVERFLOW};

#[derive(Debug)]
pub struct CounterSlots {
    by_pod: HashMap<u64, u32>,
    /// First in, first out: a released slot is the last to be handed out again, so a
    /// packet still counted under it (judged just before the pod went) lands long before.
    free: VecDeque<u32>,
}

/// A pod's slot, as `assign` found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assigned {
    pub slot: u32,
    /// Newly handed out: its row still holds the counts of the pod that had it before.
    pub fresh: bool,
}

impl CounterSlots {
    /// Every slot free but `COUNTER_SLOT_NONE` and `COUNTER_SLOT_OVERFLOW`, minus those of
    /// `pods` (adopted from a pinned pod table: their rows keep counting across restarts).
    pub fn adopt(pods: impl IntoIterator<Item = (u64, u32)>) -> Self {
        let mut by_pod = HashMap::new();
        let mut taken = std::collections::HashSet::new();
        for (pod, slot) in pods {
            // A slot two entries claim (or none) is given out again on the pod's next write.
            if slot != COUNTER_SLOT_NONE && slot != COUNTER_SLOT_OVERFLOW && taken.insert(slot) {
                by_pod.insert(pod, slot);
            }
        }
        let free = (COUNTER_SLOT_NONE + 1..COUNTER_SLOT_OVERFLOW)
            .filter(|slot| !taken.contains(slot))
            .collect();
        Self { by_pod, free }
    }

    /// The slot of `pod`, handing one out when it has none. Past the last free slot, pods
    /// share `COUNTER_SLOT_OVERFLOW` (counted, never attributed).
    pub fn assign(&mut self, pod: u64) -> Assigned {
        if let Some(&slot) = self.by_pod.get(&pod) {
            return Assigned { slot, fresh: false };
        }
        let Some(slot) = self.free.pop_front() else {
            tracing::warn!(
                pod_cgroup_id = pod,
                slots = COUNTER_SLOT_OVERFLOW - 1,
                "every counter slot is taken: this pod is enforced but its traffic is not counted per pod"
            );
            self.by_pod.insert(pod, COUNTER_SLOT_OVERFLOW);
            return Assigned {
                slot: COUNTER_SLOT_OVERFLOW,
                fresh: false,
            };
        };
        self.by_pod.insert(pod, slot);
        Assigned { slot, fresh: true }
    }

    pub fn release(&mut self, pod: u64) {
        if let Some(slot) = self.by_pod.remove(&pod)
            && slot != COUNTER_SLOT_OVERFLOW
        {
            self.free.push_back(slot);
        }
    }

    /// The slot whose counts are `pod`'s alone (`COUNTER_SLOT_NONE` for pod 0, attempts
    /// judged for no pod); `None` for a pod without one or in the shared overflow slot.
    pub fn of(&self, pod: u64) -> Option<u32> {
        if pod == 0 {
            return Some(COUNTER_SLOT_NONE);
        }
        self.by_pod
            .get(&pod)
            .copied()
            .filter(|slot| *slot != COUNTER_SLOT_OVERFLOW)
    }

    /// (pod, slot) of every pod with a slot of its own.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.by_pod
            .iter()
            .filter(|(_, slot)| **slot != COUNTER_SLOT_OVERFLOW)
            .map(|(pod, slot)| (*pod, *slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_keeps_its_slot_and_a_released_one_comes_back_last() {
        let mut slots = CounterSlots::adopt([]);
        let a = slots.assign(10);
        assert!(a.fresh);
        assert_ne!(a.slot, COUNTER_SLOT_NONE);
        assert_eq!(
            slots.assign(10),
            Assigned {
                slot: a.slot,
                fresh: false
            }
        );
        let b = slots.assign(11);
        assert_ne!(a.slot, b.slot);
        slots.release(10);
        assert_eq!(slots.of(10), None);
        // Every other free slot goes first.
        let mut handed = Vec::new();
        for pod in 100..100 + u64::from(COUNTER_SLOT_OVERFLOW) - 3 {
            handed.push(slots.assign(pod).slot);
        }
        assert!(
            !handed.contains(&a.slot),
            "a released slot was handed out before the rest"
        );
        assert_eq!(slots.assign(5000).slot, a.slot);
    }

    #[test]
    fn adopted_slots_stay_with_their_pods_and_conflicts_are_dropped() {
        let mut slots = CounterSlots::adopt([(1, 7), (2, 7), (3, COUNTER_SLOT_NONE), (4, 9)]);
        assert_eq!(slots.of(1), Some(7));
        assert_eq!(slots.of(4), Some(9));
        // The second claim of slot 7 and a claim of the no-pod slot are not adopted.
        assert_eq!(slots.of(2), None);
        assert_eq!(slots.of(3), None);
        let fresh = slots.assign(2);
        assert!(fresh.fresh);
        assert!(![7, 9, COUNTER_SLOT_NONE].contains(&fresh.slot));
        assert_eq!(slots.of(0), Some(COUNTER_SLOT_NONE));
    }

    #[test]
    fn pods_past_the_last_slot_share_the_overflow_slot_unattributed() {
        let mut slots = CounterSlots::adopt([]);
        let usable = u64::from(COUNTER_SLOT_OVERFLOW) - 1;
        for pod in 1..=usable {
            assert_ne!(slots.assign(pod).slot, COUNTER_SLOT_OVERFLOW);
        }
        let over = slots.assign(usable + 1);
        assert_eq!(
            over,
            Assigned {
                slot: COUNTER_SLOT_OVERFLOW,
                fresh: false
            }
        );
        assert_eq!(slots.of(usable + 1), None);
        assert_eq!(slots.iter().count() as u64, usable);
        // Releasing the overflow pod frees nothing; releasing a real one does.
        slots.release(usable + 1);
        slots.release(1);
        assert!(slots.assign(usable + 2).fresh);
    }
}
