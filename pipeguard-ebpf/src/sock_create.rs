//! Refuse raw IP and packet sockets in guarded pods: their packets never pass the socket
//! hooks, and AF_PACKET frames never pass the IP packet hook either. IPv6 ping sockets
//! (SOCK_DGRAM, IPPROTO_ICMPV6) are refused with them: they pass no socket hook on sendto,
//! and the kernel ignores the result of their sends (ping_v6_sendmsg drops the error of
//! icmpv6_push_pending_frames), so a packet-hook drop would look like success to the job.
//! IPv4 ping sockets stay: their sends report the packet hook's EPERM.
//!
//! `pg_sock_create` also records which pod created each socket (`owner`).
//!
//! Two hooks, because cgroup/sock_create only runs for AF_INET/AF_INET6 sockets:
//! - `pg_sock_create` (cgroup/sock_create): SOCK_RAW inet sockets, on every kernel;
//! - `pg_socket_create_lsm` (lsm_cgroup/socket_create): every family, AF_PACKET included;
//!   needs the BPF LSM (Linux 6.0+, `bpf` in the active LSMs). Optional in user space.

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    helpers::generated::{bpf_get_current_cgroup_id, bpf_ktime_get_ns},
    macros::{cgroup_sock, lsm_cgroup},
    programs::{LsmContext, SockContext},
};
use pipeguard_common::{Event, Hook, MODE_AUDIT, POD_DENY_RAW_SOCKETS, VERDICT_AUDIT, VERDICT_DENY};

use crate::{
    owner,
    pod::{self, Pod},
    verdict::{count, emit_event, task_fields},
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const AF_INET6: u32 = 10;
const AF_PACKET: u32 = 17;
const SOCK_DGRAM: u32 = 2;
const SOCK_RAW: u32 = 3;
const IPPROTO_ICMPV6: u32 = 58;

#[cgroup_sock(sock_create)]
pub fn pg_sock_create(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    let (family, sock_type, protocol) = unsafe {
        (
            read_volatile(addr_of!((*sk).family)),
            read_volatile(addr_of!((*sk).type_)),
            read_volatile(addr_of!((*sk).protocol)),
        )
    };
    let Some(pod) = pod::of_current_task() else {
        return ALLOW;
    };
    owner::remember(sk, &pod);
    let ping6 = family == AF_INET6 && sock_type == SOCK_DGRAM && protocol == IPPROTO_ICMPV6;
    if sock_type != SOCK_RAW && !ping6 {
        return ALLOW;
    }
    judge(&pod, family, sock_type, protocol)
}

/// `int socket_create(int family, int type, int protocol, int kern)`
#[lsm_cgroup(hook = "socket_create")]
pub fn pg_socket_create_lsm(ctx: LsmContext) -> i32 {
    let family: i32 = ctx.arg(0);
    let sock_type: i32 = ctx.arg(1);
    let protocol: i32 = ctx.arg(2);
    let kern: i32 = ctx.arg(3);
    // Kernel-internal sockets are not the job's; inet raw sockets are judged by sock_create.
    if kern != 0 || family as u32 != AF_PACKET {
        return ALLOW;
    }
    // The type argument carries SOCK_CLOEXEC/SOCK_NONBLOCK in its high bits.
    let Some(pod) = pod::of_current_task() else {
        return ALLOW;
    };
    judge(&pod, family as u32, (sock_type & 0xf) as u32, protocol as u32)
}

#[inline(always)]
fn judge(pod: &Pod, family: u32, sock_type: u32, protocol: u32) -> i32 {
    if pod.entry.flags & POD_DENY_RAW_SOCKETS == 0 {
        return ALLOW;
    }
    let verdict = if pod.entry.mode == MODE_AUDIT {
        VERDICT_AUDIT
    } else {
        VERDICT_DENY
    };
    count(pod.entry.counter_slot, verdict, Hook::SockCreate, 0);
    emit_event(Event {
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        pod_cgroup_id: pod.cgroup_id,
        policy_id: pod.entry.policy_id,
        protocol: protocol as u8,
        family: family as u8,
        sock_type: sock_type as u8,
        hook: Hook::SockCreate as u8,
        verdict,
        ..task_fields()
    });
    if verdict == VERDICT_DENY { DENY } else { ALLOW }
}
