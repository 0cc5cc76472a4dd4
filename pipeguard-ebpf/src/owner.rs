//! Which pod a socket belongs to, for the socket hooks.
//!
//! The kernel runs the socket hooks of the socket's cgroup, but the only cgroup helpers it
//! offers cgroup/connect and cgroup/sendmsg programs are about the calling task
//! (bpf_sk_ancestor_cgroup_id is refused for this program type on Linux 6.18). So
//! `pg_sock_create`, which runs in the creating task, records the creator's pod in the
//! socket table, and the socket hooks judge by that: a task in another cgroup
//! acting on a guarded pod's socket (a thread moved elsewhere, a process the fd was handed
//! to) is judged as the pod, like the packet hook does. Sockets created before the programs
//! were attached have no record and are judged by the calling task, as before; so are
//! sockets that found no free slot in the socket table (`socket_table`).
//!
//! The record lives under the socket's cookie from `pg_sock_create` to `pg_sock_release`
//! (close()), or for a TCP connection to its CLOSE (`pg_sock_ops`).

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    bindings::{__sk_buff, BPF_TCP_CLOSE, BPF_TCP_LISTEN, BPF_TCP_SYN_SENT, bpf_sock},
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_current_comm as bpf_get_current_comm_raw,
            bpf_get_socket_cookie,
        },
    },
    macros::cgroup_sock,
    programs::{SockAddrContext, SockContext},
};
use pipeguard_common::{CONFIG_FLOW_STATS, Event, POLICY_GENERATION_NONE, SocketState};

use crate::{
    fast,
    maps::SOCKETS,
    pod::{self, Pod},
    socket_table,
};

const IPPROTO_TCP: u32 = 6;

/// In `pg_sock_create`: `sk` (the program's context) was created by a task of `pod`, the
/// current one, which is remembered too: a listener's creator is the process ingress
/// events name (the listening process in the usual case; see `receiver_fields`).
#[inline(always)]
pub fn remember(sk: *mut bpf_sock, pod: &Pod) {
    let cookie = unsafe { bpf_get_socket_cookie(sk.cast()) };
    // No place leaves no record: the socket hooks fall back to the calling task's pod.
    let r = socket_table::claim(&SOCKETS, cookie);
    if r.is_null() {
        return;
    }
    // SAFETY: the slot this socket claimed, its other fields zeroed.
    unsafe {
        (*r).pod_cgroup_id = pod.cgroup_id;
        (*r).cgroup_id = bpf_get_current_cgroup_id();
        (*r).generation = POLICY_GENERATION_NONE;
        (*r).owner_pid_tgid = bpf_get_current_pid_tgid();
        // Fills all 16 bytes (the name, then zeros) or zeroes them on failure.
        bpf_get_current_comm_raw((*r).owner_comm.as_mut_ptr().cast(), 16);
    }
}

/// The socket's record goes with it when close() releases it, unless it is a TCP
/// connection still to send its close (FIN, retransmissions): those packets are the
/// socket's own and keep its state (a learned destination's pass) until TCP reaches
/// CLOSE, where `pg_sock_ops` removes it (`forget`).
#[cgroup_sock(sock_release)]
pub fn pg_sock_release(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    let (protocol, state) = unsafe {
        (
            read_volatile(addr_of!((*sk).protocol)),
            read_volatile(addr_of!((*sk).state)),
        )
    };
    let tcp = protocol == IPPROTO_TCP;
    if tcp && !matches!(state, BPF_TCP_CLOSE | BPF_TCP_LISTEN | BPF_TCP_SYN_SENT) {
        return 1;
    }
    let cookie = unsafe { bpf_get_socket_cookie(sk.cast()) };
    forget(cookie);
    1
}

/// Removes the socket's record, if it has one (the agent's programs see every pod's
/// sockets), after moving what its fast path counted into the flow statistics (when they
/// are kept).
#[inline(always)]
pub fn forget(cookie: u64) {
    let state = fast::by_cookie(cookie);
    if state.is_null() {
        return;
    }
    if crate::verdict::config().flags & CONFIG_FLOW_STATS != 0 {
        fast::settle_flow(unsafe { &mut *state });
    }
    socket_table::free(state);
}

/// Event fields naming the process that created the socket receiving `skb` (for ingress
/// events, judged in softirq where the current task is not the pod's); empty when the
/// socket has no record (created before the programs were attached, or outside a pod).
#[inline(always)]
pub fn receiver_fields(skb: *mut __sk_buff) -> Event {
    let state = crate::fast::of_skb(skb);
    if state.is_null() {
        return Event::default();
    }
    let (pid_tgid, comm) = unsafe { ((*state).owner_pid_tgid, (*state).owner_comm) };
    Event {
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        comm,
        ..Event::default()
    }
}

/// The socket's state in a socket hook; null when `pg_sock_create` recorded nothing.
#[inline(always)]
pub fn state(ctx: &SockAddrContext) -> *mut SocketState {
    fast::by_cookie(unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) })
}

/// The pod whose policy judges this socket-hook call, and the cgroup to report.
#[inline(always)]
pub fn of_state(state: *const SocketState) -> (Option<Pod>, u64) {
    // No pod yet: a record being written on another CPU (see `socket_table::claim`).
    if state.is_null() || unsafe { (*state).pod_cgroup_id } == 0 {
        return (pod::of_current_task(), unsafe { bpf_get_current_cgroup_id() });
    }
    let (pod_cgroup_id, cgroup_id) = unsafe { ((*state).pod_cgroup_id, (*state).cgroup_id) };
    (pod::by_id(pod_cgroup_id), cgroup_id)
}
