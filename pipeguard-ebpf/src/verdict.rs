//! The decision shared by every hook: look the destination up in the pod's allowlist,
//! count it, report it, and say whether it may pass.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, generated::bpf_ktime_get_ns},
    maps::lpm_trie::Key,
};
use pipeguard_common::{
    AllowKeyV4, AllowKeyV6, CONFIG_FLOW_STATS, CONFIG_REPORT_ALLOWED, COUNTER_SLOT_NONE, Config, Counter,
    EVENT_INTERVAL_NS, Event, FlowKey, HOOK_COUNT, Hook, MODE_AUDIT, POD_DNS_FILTERED,
    POLICY_GENERATION_NONE, POLICY_ID_BITS, SocketState, UNKNOWN_DENY, VERDICT_ALLOW, VERDICT_AUDIT,
    VERDICT_COUNT, VERDICT_DENY,
};

use crate::{
    addr::Dest,
    dns::learned,
    fast,
    maps::{ALLOW_V4, ALLOW_V6, CONFIG, COUNTERS, EVENT_DROPS, EVENT_LIMIT, EVENTS, FLOWS},
    pod::Pod,
};

/// One attempt to send somewhere, as a hook saw it.
pub struct Attempt {
    pub dest: Dest,
    /// Host byte order; 0 for protocols without ports.
    pub port: u16,
    pub protocol: u8,
    pub hook: Hook,
    /// Packet length for the packet hook; 0 for socket hooks, which count attempts.
    pub bytes: u64,
    /// The socket's own cgroup (reported in events).
    pub cgroup_id: u64,
    /// The program's context (ingress events read the receiving socket's owner from it).
    pub ctx: *mut core::ffi::c_void,
    /// The socket's state (null when it has none): where a DNS-filtered pod's socket keeps
    /// its pass to a learned destination.
    pub socket: *mut SocketState,
    /// The pod chose this peer. False for packets of TCP connections it accepted: their
    /// peer is no destination of the pod's, so flow statistics (the job's destinations)
    /// leave them out; counters still count them.
    pub destination: bool,
    /// A DNS packet `pg_dns_query` judges next: allowed here, it is counted there (under
    /// `Hook::Dns`, with that program's verdict), so each packet is counted once.
    pub dns_judges: bool,
}

#[inline(always)]
pub fn config() -> Config {
    CONFIG.get(0).copied().unwrap_or_default()
}

/// What `check` decided.
pub struct Judged {
    pub pass: bool,
    /// The policy generation under which the pod's static allowlist (or the socket's pass to
    /// a learned destination) allowed the attempt, `POLICY_GENERATION_NONE` when anything
    /// else decided: what the socket may remember (see `fast`).
    pub generation: u64,
    /// The pod's static allowlist allowed the attempt (what a DNS query needs to teach).
    pub by_allowlist: bool,
    /// Nothing but being a reply (`is_reply`) allowed it.
    pub by_reply: bool,
    /// The pod that judged (0 for none), its counter slot, `POD_*` flags, allowlist and mode.
    pub pod_cgroup_id: u64,
    pub counter_slot: u32,
    pub pod_flags: u32,
    pub policy_id: u32,
    pub mode: u32,
}

/// Whether the attempt may proceed. `is_reply` says whether the attempt answers a peer
/// that talked to the socket first (see `reply`); it is only asked when nothing else allows
/// the attempt, and a reply is counted as allowed.
#[inline(always)]
pub fn check(attempt: &Attempt, pod: Option<Pod>, is_reply: impl FnOnce(&Config) -> bool) -> Judged {
    let config = config();
    let Some(pod) = pod else {
        if config.unknown_pods != UNKNOWN_DENY {
            return Judged {
                pass: true,
                generation: POLICY_GENERATION_NONE,
                by_allowlist: false,
                by_reply: false,
                pod_cgroup_id: 0,
                counter_slot: COUNTER_SLOT_NONE,
                pod_flags: 0,
                policy_id: 0,
                mode: 0,
            };
        }
        let by_reply = is_reply(&config);
        let verdict = if by_reply { VERDICT_ALLOW } else { VERDICT_DENY };
        report(attempt, 0, COUNTER_SLOT_NONE, 0, verdict, &config, 0, 0);
        return Judged {
            pass: verdict == VERDICT_ALLOW,
            generation: POLICY_GENERATION_NONE,
            by_allowlist: false,
            by_reply,
            pod_cgroup_id: 0,
            counter_slot: COUNTER_SLOT_NONE,
            pod_flags: 0,
            policy_id: 0,
            mode: 0,
        };
    };
    // Read before the lookups: a write that lands after them moves it past this value.
    let generation = fast::generation();
    let by_allowlist = allowed(pod.entry.policy_id, attempt);
    let mut name_hash = 0;
    let mut by_pass = false;
    let by_reply = !by_allowlist && is_reply(&config);
    let verdict = decide(
        by_allowlist
            || by_reply
            || (pod.entry.flags & POD_DNS_FILTERED != 0 && {
                // The addresses the pod's allowed DNS answers taught its allowlist.
                // Socket hooks start connections and datagrams; the packet hook continues them.
                let learned = learned::check(
                    pod.entry.policy_id,
                    attempt,
                    attempt.socket,
                    attempt.hook != Hook::Egress,
                );
                name_hash = learned.name_hash;
                by_pass = learned.by_pass;
                learned.allowed
            }),
        pod.entry.mode,
    );
    report(
        attempt,
        pod.cgroup_id,
        pod.entry.counter_slot,
        pod.entry.policy_id,
        verdict,
        &config,
        name_hash,
        0,
    );
    Judged {
        pass: verdict != VERDICT_DENY,
        generation: if by_allowlist || by_pass {
            generation
        } else {
            POLICY_GENERATION_NONE
        },
        by_allowlist,
        by_reply,
        pod_cgroup_id: pod.cgroup_id,
        counter_slot: pod.entry.counter_slot,
        pod_flags: pod.entry.flags,
        policy_id: pod.entry.policy_id,
        mode: pod.entry.mode,
    }
}

/// The verdict on an attempt of a pod in `mode`: allowed passes; anything else is refused,
/// or in audit mode reported as a would-be refusal and let through.
#[inline(always)]
pub fn decide(allowed: bool, mode: u32) -> u8 {
    if allowed {
        VERDICT_ALLOW
    } else if mode == MODE_AUDIT {
        VERDICT_AUDIT
    } else {
        VERDICT_DENY
    }
}

/// The static allowlist (the tries) allows the attempt.
#[inline(always)]
pub fn allowed(policy_id: u32, attempt: &Attempt) -> bool {
    allows(policy_id, &attempt.dest, attempt.protocol, attempt.port)
}

/// Allowlist `policy_id` allows sending to `dest`:`port` over `protocol`.
#[inline(always)]
pub fn allows(policy_id: u32, dest: &Dest, protocol: u8, port: u16) -> bool {
    let policy_id = policy_id.to_be_bytes();
    let ports = if dest.is_v4 {
        let key = Key::new(
            POLICY_ID_BITS + 32,
            AllowKeyV4 {
                policy_id,
                addr: dest.v4_bytes(),
            },
        );
        ALLOW_V4.get(&key)
    } else {
        let key = Key::new(
            POLICY_ID_BITS + 128,
            AllowKeyV6 {
                policy_id,
                addr: dest.addr,
            },
        );
        ALLOW_V6.get(&key)
    };
    // No matching prefix: nothing allows it.
    ports.is_some_and(|p| p.allows(protocol, port))
}

/// A denied (or audited) verdict may also be for a pod with no entry (`pod_cgroup_id` 0,
/// `COUNTER_SLOT_NONE`). `flags` goes to `Event::flags` (the source port for `Hook::Ingress`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn report(
    attempt: &Attempt,
    pod_cgroup_id: u64,
    counter_slot: u32,
    policy_id: u32,
    verdict: u8,
    config: &Config,
    name_hash: u64,
    flags: u32,
) {
    if !(verdict == VERDICT_ALLOW && attempt.dns_judges) {
        count(counter_slot, verdict, attempt.hook, attempt.bytes);
    }

    // Packet hooks see every retransmission: their events are rate-limited per flow.
    let is_packet = attempt.hook == Hook::Egress || attempt.hook == Hook::Ingress;
    let flow = FlowKey {
        cgroup_id: pod_cgroup_id,
        addr: attempt.dest.addr,
        port: attempt.port,
        protocol: attempt.protocol,
        verdict,
        _pad: [0; 4],
    };
    // Allowed socket attempts are counted as packets by the packet hook; only refusals
    // of socket hooks are flows of their own. Flows are destinations (the exec summary):
    // an inbound source is none, its verdicts are counted and reported instead.
    if config.flags & CONFIG_FLOW_STATS != 0
        && attempt.hook != Hook::Ingress
        && attempt.destination
        && (is_packet || verdict != VERDICT_ALLOW)
    {
        add_flow(
            &flow,
            Counter {
                packets: 1,
                bytes: attempt.bytes,
            },
        );
    }
    if verdict == VERDICT_ALLOW {
        // Learning only (never set by the agent): rate-limited like packet events.
        if config.flags & CONFIG_REPORT_ALLOWED != 0 && packet_event_due(&flow) {
            emit(attempt, pod_cgroup_id, policy_id, verdict, name_hash, flags);
        }
        return;
    }
    if is_packet && !packet_event_due(&flow) {
        return;
    }
    emit(attempt, pod_cgroup_id, policy_id, verdict, name_hash, flags);
}

/// Counts one packet (or attempt) of `bytes` for the pod in `counter_slot`.
#[inline(always)]
pub fn count(counter_slot: u32, verdict: u8, hook: Hook, bytes: u64) {
    if let Some(row) = COUNTERS.get_ptr_mut(counter_slot) {
        // Masked: always in bounds (HOOK_COUNT and VERDICT_COUNT are powers of two).
        let c = unsafe {
            (*row)
                .by_hook
                .get_unchecked_mut(hook as usize & (HOOK_COUNT - 1))
                .get_unchecked_mut(verdict as usize & (VERDICT_COUNT - 1))
        };
        // Per-CPU value: no other writer.
        c.packets += 1;
        c.bytes += bytes;
    }
}

/// Counts for the pod with pod-level cgroup `pod_cgroup_id`, if it is still in the pod
/// table: for programs handed only the pod's id (the DNS programs).
#[inline(always)]
pub fn count_for_pod(pod_cgroup_id: u64, verdict: u8, hook: Hook, bytes: u64) {
    if let Some(pod) = crate::pod::by_id(pod_cgroup_id) {
        count(pod.entry.counter_slot, verdict, hook, bytes);
    }
}

/// Adds `add` to the flow statistics of `key`.
#[inline(always)]
pub fn add_flow(key: &FlowKey, add: Counter) {
    match FLOWS.get_ptr_mut(key) {
        Some(c) => unsafe {
            (*c).packets += add.packets;
            (*c).bytes += add.bytes;
        },
        None => {
            let _ = FLOWS.insert(key, &add, BPF_NOEXIST as u64);
        }
    }
}

/// Packet events are limited to one per flow per interval; counters still see every packet.
#[inline(always)]
fn packet_event_due(flow: &FlowKey) -> bool {
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(last) = unsafe { EVENT_LIMIT.get(flow) } {
        if now.wrapping_sub(*last) < EVENT_INTERVAL_NS {
            return false;
        }
    }
    let _ = EVENT_LIMIT.insert(flow, &now, 0);
    true
}

#[inline(always)]
pub fn emit(attempt: &Attempt, pod_cgroup_id: u64, policy_id: u32, verdict: u8, name_hash: u64, flags: u32) {
    emit_event(Event {
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: attempt.cgroup_id,
        pod_cgroup_id,
        addr: attempt.dest.addr,
        port: attempt.port,
        protocol: attempt.protocol,
        family: if attempt.dest.is_v4 { 4 } else { 6 },
        hook: attempt.hook as u8,
        verdict,
        policy_id,
        name_hash,
        flags,
        // In softirq the current task is whoever was running (for loopback, the sender):
        // an ingress event names the process that created the receiving socket instead.
        ..if attempt.hook == Hook::Ingress {
            crate::owner::receiver_fields(attempt.ctx.cast())
        } else {
            task_fields()
        }
    });
}

/// pid and comm of the current task; in softirq context this is whatever task was running.
#[inline(always)]
pub fn task_fields() -> Event {
    let pid_tgid = bpf_get_current_pid_tgid();
    Event {
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        comm: bpf_get_current_comm().unwrap_or_default(),
        ..Event::default()
    }
}

#[inline(always)]
pub fn emit_event(event: Event) {
    match EVENTS.reserve::<Event>(0) {
        Some(mut slot) => {
            slot.write(event);
            slot.submit(0);
        }
        None => count_event_drop(),
    }
}

/// Never lose an event silently: user space reports this count.
#[inline(always)]
pub fn count_event_drop() {
    if let Some(drops) = EVENT_DROPS.get_ptr_mut(0) {
        unsafe { *drops += 1 };
    }
}
