//! The per-socket fast path: a socket remembers the last destination its pod's static
//! allowlist allowed it, with the policy generation of that verdict (`SocketState`). The
//! next connect/sendmsg or packet of that socket to the same destination, port and protocol
//! is allowed with one socket-table lookup and a generation compare: no ancestor walk,
//! no pod lookup, no trie.
//!
//! Why it is the same verdict: the slow path's allow depends only on the pod's entry, the
//! allowlist and {destination, port, protocol}. The first two are covered by the
//! generation, which user space moves after every write to the pod table or an allowlist
//! (so a revoked allow cuts an established connection at its next packet); the third is
//! compared against the packet's own headers, so a raw socket or ICMP gains nothing. Only
//! allows by the static allowlist, or by the socket's pass to a learned DNS destination
//! (which outlives the address's entry and so depends on the allowlist alone, see
//! `dns::learned`), are remembered, and the replies of a connection the pod accepted, which
//! depend on nothing but the connection (`REMEMBERED_REPLY`, see `reply`; the generation
//! then only dates the pod): UDP replies, addresses merely learned, and audited or denied
//! attempts take the slow path every time, with their events. DNS (port 53, either
//! direction) of a DNS-filtered pod skips only the walk and the trie: the packet hook still
//! hands it to the DNS program, with the pod's allowlist and mode the socket remembered.
//! Counters are bumped exactly as the slow path does (the pod's row of the counter array),
//! flow statistics go into the socket's record until it changes destination or goes
//! (`settle_flow`), and the ingress side's record of peers sent to
//! (`ingress_policy::note_sent`) is written too. What the slow path learned about the
//! packets besides the verdict (whether the peer is a destination of the pod's, for flow
//! statistics) is remembered with it, so a remembered packet asks no other table.

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    ptr::null_mut,
};

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock},
    helpers::generated::{bpf_get_socket_cookie, bpf_sk_fullsock},
};
use pipeguard_common::{
    CONFIG_REPORT_ALLOWED, Config, Counter, FlowKey, Hook, POLICY_GENERATION_NONE, PROTO_TCP, PROTO_UDP,
    REMEMBERED_BY_ALLOWLIST, REMEMBERED_DESTINATION, REMEMBERED_LISTENER, REMEMBERED_REPLY, SocketState,
    VERDICT_ALLOW,
};

use crate::{
    addr::Dest,
    maps::{POLICY_GENERATION, SOCKETS},
    socket_table,
    verdict::{self, Attempt, Judged},
};

const DNS_PORT: u16 = 53;
const IPPROTO_TCP: u32 = 6;

/// The policy generation now. Read before the lookups a remembered verdict is based on.
#[inline(always)]
pub fn generation() -> u64 {
    POLICY_GENERATION
        .get(0)
        .copied()
        .unwrap_or(POLICY_GENERATION_NONE)
}

/// The state of the socket whose cookie is `cookie`; null when it has none.
#[inline(always)]
pub fn by_cookie(cookie: u64) -> *mut SocketState {
    socket_table::find(&SOCKETS, cookie)
}

/// The state of the socket that sent `skb`; null when it has none. Not asked whether it is
/// a full socket (a helper call per packet): the kernel runs cgroup_skb programs only for
/// full sockets and hands them the full one (a listener for its SYN-ACKs), see
/// `__cgroup_bpf_run_filter_skb`.
#[inline(always)]
pub fn of_skb(skb: *mut __sk_buff) -> *mut SocketState {
    if unsafe { (*skb).__bindgen_anon_2.sk }.is_null() {
        return null_mut();
    }
    by_cookie(unsafe { bpf_get_socket_cookie(skb.cast()) })
}

#[inline(always)]
fn full_socket(skb: *mut __sk_buff) -> *mut bpf_sock {
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return null_mut();
    }
    unsafe { bpf_sk_fullsock(sk) }
}

/// The pod a remembered verdict was judged for, as it was under the remembered generation.
pub struct Remembered {
    pub cgroup_id: u64,
    pub counter_slot: u32,
    /// Its `POD_*` flags.
    pub flags: u32,
    pub policy_id: u32,
    pub mode: u32,
    /// The pod's static allowlist allowed it (not the socket's learned pass).
    pub by_allowlist: bool,
    /// The peer is a destination of the pod's (see `Attempt::destination`).
    pub destination: bool,
}

/// The socket's pod when its remembered verdict allows this attempt now. The packet hook
/// still hands a DNS-filtered pod's DNS to its DNS program. `replies`: whether an accepted
/// connection's peer counts, which only its packets are (a connect() to that peer is new).
#[inline(always)]
pub fn remembered(
    state: *const SocketState,
    config: &Config,
    dest: &Dest,
    port: u16,
    protocol: u8,
    replies: bool,
) -> Option<Remembered> {
    if state.is_null() || config.flags & CONFIG_REPORT_ALLOWED != 0 {
        return None;
    }
    let generation = generation();
    let s = unsafe { &*state };
    // A listener's pod entry (`listener`) is no destination.
    let not_remembered = if replies {
        REMEMBERED_LISTENER
    } else {
        REMEMBERED_LISTENER | REMEMBERED_REPLY
    };
    if s.generation == POLICY_GENERATION_NONE
        || s.generation != generation
        || s.remembered & not_remembered != 0
        || s.port != port
        || s.protocol != protocol
        || !dest.is(&s.addr)
    {
        return None;
    }
    Some(Remembered {
        cgroup_id: s.pod_cgroup_id,
        counter_slot: s.counter_slot,
        flags: s.pod_flags,
        policy_id: s.policy_id,
        mode: s.mode,
        by_allowlist: s.remembered & REMEMBERED_BY_ALLOWLIST != 0,
        destination: s.remembered & REMEMBERED_DESTINATION != 0,
    })
}

/// After the slow path judged `attempt`: when the pod's static allowlist allowed it,
/// remember that in `state` (null: nothing to write into), unless the state belongs to
/// another pod. An accepted connection's packets to its peer stay replies.
#[inline(always)]
pub fn remember(state: *mut SocketState, judged: &Judged, attempt: &Attempt) {
    if state.is_null() || judged.generation == POLICY_GENERATION_NONE {
        return;
    }
    let s = unsafe { &mut *state };
    if s.pod_cgroup_id != judged.pod_cgroup_id {
        return;
    }
    let same = attempt.dest.is(&s.addr) && s.port == attempt.port && s.protocol == attempt.protocol;
    let reply = if same && attempt.hook == Hook::Egress {
        s.remembered & REMEMBERED_REPLY
    } else {
        0
    };
    if !same {
        settle_flow(s);
    }
    s.addr = attempt.dest.addr;
    s.port = attempt.port;
    s.protocol = attempt.protocol;
    s.remembered = reply
        | if judged.by_allowlist {
            REMEMBERED_BY_ALLOWLIST
        } else {
            0
        }
        | if attempt.destination {
            REMEMBERED_DESTINATION
        } else {
            0
        };
    set_judged_pod(s, judged, judged.generation);
}

/// What a record remembers of the pod that judged (`Judged`'s pod fields, or the ones a
/// handshake handed over), under `generation`. A record without a pod yet (an accepted
/// connection's) takes this one, its cgroup standing in for the socket's own (no helper
/// names it where accepted connections get their record).
#[inline(always)]
pub fn set_pod(
    s: &mut SocketState,
    pod_cgroup_id: u64,
    counter_slot: u32,
    pod_flags: u32,
    policy_id: u32,
    mode: u32,
    generation: u64,
) {
    if s.pod_cgroup_id == 0 {
        s.pod_cgroup_id = pod_cgroup_id;
        s.cgroup_id = pod_cgroup_id;
    }
    s.counter_slot = counter_slot;
    s.pod_flags = pod_flags;
    s.policy_id = policy_id;
    s.mode = mode;
    s.generation = generation;
}

/// `set_pod` from the slow path's verdict.
#[inline(always)]
fn set_judged_pod(s: &mut SocketState, judged: &Judged, generation: u64) {
    set_pod(
        s,
        judged.pod_cgroup_id,
        judged.counter_slot,
        judged.pod_flags,
        judged.policy_id,
        judged.mode,
        generation,
    );
}

/// The record `state` (null: none) is an accepted connection's and `dest`:`port` its peer.
#[inline(always)]
pub fn is_accepted_peer(state: *const SocketState, dest: &Dest, port: u16) -> bool {
    if state.is_null() {
        return false;
    }
    let s = unsafe { &*state };
    s.remembered & REMEMBERED_REPLY != 0 && s.port == port && s.protocol == PROTO_TCP && dest.is(&s.addr)
}

/// After the slow path let a reply of an accepted connection through (`judged.by_reply`):
/// its record remembers the pod under `generation`, read before the pod lookup, so the
/// next replies skip the walk. DNS ports are not remembered (see `reply::take_pod`).
#[inline(always)]
pub fn remember_reply(state: *mut SocketState, judged: &Judged, generation: u64, src_port: u16) {
    if state.is_null() || judged.pod_cgroup_id == 0 || generation == POLICY_GENERATION_NONE {
        return;
    }
    let s = unsafe { &mut *state };
    if s.remembered & REMEMBERED_REPLY == 0
        || (s.pod_cgroup_id != 0 && s.pod_cgroup_id != judged.pod_cgroup_id)
        || is_dns_port(PROTO_TCP, s.port, src_port)
    {
        return;
    }
    set_judged_pod(s, judged, generation);
}

/// A remembered packet's share of the flow statistics (`CONFIG_FLOW_STATS`), kept in the
/// socket's record instead of a per-packet update of the flow table.
#[inline(always)]
pub fn add_flow_pending(state: *mut SocketState, bytes: u64) {
    let pending = unsafe { &mut (*state).flow_pending };
    atomic_add(&mut pending.packets, 1);
    atomic_add(&mut pending.bytes, bytes);
}

/// An atomic add whose result is unused: one BPF_ATOMIC instruction. `core`'s atomics
/// offer no `fetch_add` on this target (it has no compare-and-swap).
#[inline(always)]
fn atomic_add(counter: &mut u64, value: u64) {
    // SAFETY: `counter` is a valid, aligned u64 in a map value.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, value) };
}

/// Moves what the fast path counted for the remembered destination into the flow table:
/// before the socket remembers another destination, and before its record goes.
#[inline(always)]
pub fn settle_flow(s: &mut SocketState) {
    let packets = unsafe { core::ptr::read_volatile(&s.flow_pending.packets) };
    if packets == 0 {
        return;
    }
    let bytes = unsafe { core::ptr::read_volatile(&s.flow_pending.bytes) };
    // Taken out by subtraction, so what another CPU adds meanwhile stays.
    atomic_add(&mut s.flow_pending.packets, packets.wrapping_neg());
    atomic_add(&mut s.flow_pending.bytes, bytes.wrapping_neg());
    let key = FlowKey {
        cgroup_id: s.pod_cgroup_id,
        addr: s.addr,
        port: s.port,
        protocol: s.protocol,
        verdict: VERDICT_ALLOW,
        _pad: [0; 4],
    };
    verdict::add_flow(&key, Counter { packets, bytes });
}

/// In the packet hook: the state of the sending socket, created for pod `pod_cgroup_id`
/// when the socket has none (a UDP socket older than the programs); null when not. Nothing
/// frees a slot but the socket's end, so TCP sockets get theirs only where their CLOSE is
/// asked for: at socket() or, accepted, from `pg_sock_ops`.
#[inline(always)]
pub fn of_skb_or_create(skb: *mut __sk_buff, pod_cgroup_id: u64, cgroup_id: u64) -> *mut SocketState {
    let full = full_socket(skb);
    if full.is_null()
        || unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*full).protocol)) } == IPPROTO_TCP
    {
        return null_mut();
    }
    let cookie = unsafe { bpf_get_socket_cookie(skb.cast()) };
    // A record written meanwhile (another CPU) is kept.
    let existing = by_cookie(cookie);
    if !existing.is_null() {
        return existing;
    }
    let state = socket_table::claim(&SOCKETS, cookie);
    if !state.is_null() {
        // It belongs to the pod the packet hook found; the creator is unknown (0).
        unsafe {
            (*state).pod_cgroup_id = pod_cgroup_id;
            (*state).cgroup_id = cgroup_id;
        }
    }
    state
}

#[inline(always)]
pub fn is_dns_port(protocol: u8, port: u16, src_port: u16) -> bool {
    (protocol == PROTO_UDP || protocol == PROTO_TCP) && (port == DNS_PORT || src_port == DNS_PORT)
}
