//! Queries whose names a job chooses freely are reported to user space (a DNS event with
//! verdict `ALLOW`) for its dns_tunnel detector: those a wildcard rule allows (under
//! `*.example.com` the job picks the labels, so data can leave in them through the allowed
//! resolver), and every query of a guarded pod that is not DNS-filtered. Each name once per
//! `REPORT_AGAIN_AFTER_NS` per pod, and at most `REPORTS_PER_SECOND` per pod.

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use pipeguard_common::{
    DNS_REPORT_QUERIES, REPORT_AGAIN_AFTER_NS, REPORTS_PER_SECOND, ReportBudget, ReportedKey,
};

use crate::maps::{DNS_REPORT_BUDGET, DNS_REPORTED};

const SECOND_NS: u64 = 1_000_000_000;

/// User space asked for the reports (its dns_tunnel detector is on).
#[inline(always)]
pub fn enabled() -> bool {
    super::config_flags() & DNS_REPORT_QUERIES != 0
}

/// Whether pod `pod_cgroup_id`'s query for the name hashed `name_hash` is reported now;
/// records it when so.
#[inline(always)]
pub fn due(pod_cgroup_id: u64, name_hash: u64) -> bool {
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let key = ReportedKey {
        pod_cgroup_id,
        name_hash,
    };
    if let Some(last) = unsafe { DNS_REPORTED.get(&key) } {
        if now.wrapping_sub(*last) < REPORT_AGAIN_AFTER_NS {
            return false;
        }
    }
    match DNS_REPORT_BUDGET.get_ptr_mut(&pod_cgroup_id) {
        // Racy across CPUs: the budget is a bound on volume, not an exact count.
        Some(budget) => unsafe {
            if now.wrapping_sub((*budget).window_start_ns) >= SECOND_NS {
                (*budget).window_start_ns = now;
                (*budget).count = 0;
            }
            if (*budget).count >= REPORTS_PER_SECOND {
                return false;
            }
            (*budget).count += 1;
        },
        None => {
            let fresh = ReportBudget {
                window_start_ns: now,
                count: 1,
                _pad: 0,
            };
            let _ = DNS_REPORT_BUDGET.insert(&pod_cgroup_id, &fresh, 0);
        }
    }
    let _ = DNS_REPORTED.insert(&key, &now, 0);
    true
}
