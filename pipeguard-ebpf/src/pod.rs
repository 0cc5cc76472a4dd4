//! Finds the pod-level cgroup of the current task or of a packet's socket.

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::generated::{bpf_get_current_ancestor_cgroup_id, bpf_skb_ancestor_cgroup_id},
};
use pipeguard_common::{MAX_CGROUP_DEPTH, PodEntry};

use crate::maps::PODS;

pub struct Pod {
    pub cgroup_id: u64,
    pub entry: PodEntry,
}

/// The shallowest ancestor cgroup that is in the pod table, so cgroups a job nests inside
/// its own cgroup stay under the job's policy.
#[inline(always)]
pub fn of_current_task() -> Option<Pod> {
    find(|level| unsafe { bpf_get_current_ancestor_cgroup_id(level) })
}

/// Same, for the socket that owns `skb` (packets can be sent from softirq context).
#[inline(always)]
pub fn of_skb(skb: *mut __sk_buff) -> Option<Pod> {
    find(|level| unsafe { bpf_skb_ancestor_cgroup_id(skb, level) })
}

/// The pod whose pod-level cgroup is `cgroup_id`, if it is (still) in the pod table.
#[inline(always)]
pub fn by_id(cgroup_id: u64) -> Option<Pod> {
    let entry = unsafe { PODS.get(&cgroup_id) }?;
    Some(Pod {
        cgroup_id,
        entry: *entry,
    })
}

#[inline(always)]
fn find(ancestor: impl Fn(i32) -> u64) -> Option<Pod> {
    let mut level = 1;
    while level <= MAX_CGROUP_DEPTH as i32 {
        let id = ancestor(level);
        // 0: the cgroup is shallower than `level`.
        if id == 0 {
            return None;
        }
        if let Some(entry) = unsafe { PODS.get(&id) } {
            return Some(Pod {
                cgroup_id: id,
                entry: *entry,
            });
        }
        level += 1;
    }
    None
}
