//! Which pod a socket belongs to, for the socket hooks.
//!
//! The kernel runs the socket hooks of the socket's cgroup, but the only cgroup helpers it
//! offers cgroup/connect and cgroup/sendmsg programs are about the calling task
//! (bpf_sk_ancestor_cgroup_id is refused for this program type on Linux 6.18). So
//! `pg_sock_create`, which runs in the creating task, records the creator's pod in the
//! socket's local storage, and the socket hooks judge by that: a task in another cgroup
//! acting on a guarded pod's socket (a thread moved elsewhere, a process the fd was handed
//! to) is judged as the pod, like the packet hook does. Sockets created before the programs
//! were attached have no record and are judged by the calling task, as before.

use core::ptr::null_mut;

use aya_ebpf::{
    bindings::{__sk_buff, BPF_SK_STORAGE_GET_F_CREATE, bpf_sock},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{bpf_get_current_cgroup_id, bpf_sk_storage_get},
    },
    programs::SockAddrContext,
};
use pipeguard_common::{Event, POLICY_GENERATION_NONE, SocketState};

use crate::{
    fast::sockets_map,
    maps::SOCKETS,
    pod::{self, Pod},
};

/// In `pg_sock_create`: `sk` (the program's context) was created by a task of `pod`, the
/// current one, which is remembered too: a listener's creator is the process ingress
/// events name (the listening process in the usual case; see `receiver_fields`).
#[inline(always)]
pub fn remember(sk: *mut bpf_sock, pod: &Pod) {
    // aya-ebpf's `SkStorage` only offers its accessors to sock_addr programs; the helper is
    // called with the map's address directly.
    let stored = unsafe {
        bpf_sk_storage_get(
            sockets_map(),
            sk.cast(),
            null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE as u64,
        )
    }
    .cast::<SocketState>();
    if stored.is_null() {
        // No memory: the socket hooks fall back to the calling task's pod.
        return;
    }
    unsafe {
        (*stored).pod_cgroup_id = pod.cgroup_id;
        (*stored).cgroup_id = bpf_get_current_cgroup_id();
        (*stored).generation = POLICY_GENERATION_NONE;
        (*stored).owner_pid_tgid = bpf_get_current_pid_tgid();
        (*stored).owner_comm = bpf_get_current_comm().unwrap_or_default();
    }
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
    unsafe { SOCKETS.get_ptr_mut(ctx) }
}

/// The pod whose policy judges this socket-hook call, and the cgroup to report.
#[inline(always)]
pub fn of_state(state: *const SocketState) -> (Option<Pod>, u64) {
    if state.is_null() {
        return (pod::of_current_task(), unsafe { bpf_get_current_cgroup_id() });
    }
    let (pod_cgroup_id, cgroup_id) = unsafe { ((*state).pod_cgroup_id, (*state).cgroup_id) };
    (pod::by_id(pod_cgroup_id), cgroup_id)
}
