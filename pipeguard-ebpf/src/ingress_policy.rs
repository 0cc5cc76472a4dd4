//! NetworkPolicy ingress rules for pods that a policy isolates for ingress
//! (`POD_INGRESS_ISOLATED`): a new inbound connection or datagram passes only if the pod's
//! ingress allowlist (`PodEntry::ingress_policy_id`, keyed by the source address, ports are
//! the pod's own) allows it.
//!
//! What is new inbound, and what is not (never judged as ingress):
//! - TCP: a packet whose socket is a listener (the SYN, and the handshake's last ACK, which
//!   the kernel also filters on the listener, so SYN cookies do not step around it). Dropped,
//!   the connection never reaches accept(). Packets of connections the pod opened itself, or
//!   accepted before, belong to a connected socket and pass.
//! - UDP, SCTP: a datagram to a socket that is not connected (a connected UDP socket only
//!   receives from the peer its connect() was judged for), unless the socket sent to that
//!   peer within the reply window (`SENT`, written by the egress hook).
//! - Everything else (ICMP to ping and raw sockets) passes: those sockets only receive
//!   answers and copies; an echo request is answered by the kernel without any socket, so
//!   no cgroup hook can see it.
//!
//! Traffic from the pod to itself passes: the source socket is looked up and, when it is
//! local and belongs to the same pod, the packet is the pod's own (a job connecting to the
//! test server it started). A failed lookup only means the packet is judged by the rules.

use core::{
    mem::{MaybeUninit, size_of_val},
    ptr::{addr_of, addr_of_mut, read_volatile},
};

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, BPF_TCP_ESTABLISHED, BPF_TCP_LISTEN, bpf_sock_tuple},
    helpers::generated::{
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_sk_ancestor_cgroup_id, bpf_sk_lookup_tcp,
        bpf_sk_lookup_udp, bpf_sk_release, bpf_skb_cgroup_id,
    },
    programs::SkBuffContext,
};
use pipeguard_common::{
    CONFIG_REPORT_ALLOWED, Config, Hook, MAX_CGROUP_DEPTH, POD_INGRESS_ISOLATED, PROTO_SCTP, PROTO_TCP,
    PROTO_UDP, SocketState, VERDICT_ALLOW, VERDICT_DENY,
};

use crate::{
    listener,
    maps::SENT,
    packet::{self, Packet},
    pod::Pod,
    reply,
    verdict::{Attempt, allows, count, decide, report},
};

/// True when the packet may reach the pod's socket, whose state (`receiver`) is `socket`.
/// `listener`: the receiving listener's record when it holds the pod's entry under
/// `generation` (read before the pod lookup), else null.
#[inline(always)]
pub fn admits(
    ctx: &SkBuffContext,
    packet: &Packet,
    socket: Option<u32>,
    pod: &Pod,
    config: &Config,
    listener: *mut SocketState,
    generation: u64,
) -> bool {
    if pod.entry.flags & POD_INGRESS_ISOLATED == 0 || !is_new_inbound(ctx, packet, socket, config) {
        return true;
    }
    // Learning wants every admitted packet's event (`report`).
    let remembers = config.flags & CONFIG_REPORT_ALLOWED == 0;
    if remembers && listener::admitted(listener, &packet.src, packet.dst_port, generation) {
        count(
            pod.entry.counter_slot,
            VERDICT_ALLOW,
            Hook::Ingress,
            ctx.len() as u64,
        );
        return true;
    }
    // Ingress is judged by addresses only: nothing learned applies.
    let by_allowlist = allows(
        pod.entry.ingress_policy_id,
        &packet.src,
        packet.protocol,
        packet.dst_port,
    );
    if by_allowlist && remembers {
        listener::remember_admitted(listener, &packet.src, packet.dst_port, generation);
    }
    let verdict = decide(by_allowlist || from_same_pod(ctx, packet, pod), pod.entry.mode);
    let attempt = Attempt {
        dest: packet.src,
        port: packet.dst_port,
        protocol: packet.protocol,
        hook: Hook::Ingress,
        bytes: ctx.len() as u64,
        // Only events name it: an admitted packet is just counted (unless allowed attempts
        // are reported too).
        cgroup_id: if verdict != VERDICT_ALLOW || config.flags & CONFIG_REPORT_ALLOWED != 0 {
            unsafe { bpf_skb_cgroup_id(ctx.skb.skb) }
        } else {
            0
        },
        ctx: ctx.skb.skb.cast(),
        socket: core::ptr::null_mut(),
        destination: true,
        dns_judges: false,
    };
    report(
        &attempt,
        pod.cgroup_id,
        pod.entry.counter_slot,
        pod.entry.ingress_policy_id,
        verdict,
        config,
        0,
        u32::from(packet.src_port),
    );
    verdict != VERDICT_DENY
}

/// In the egress hook, for a packet that passed (`pod_flags`: its pod's): a UDP or SCTP
/// socket of an ingress-isolated pod sent to this peer, so the peer's answers are replies.
#[inline(always)]
pub fn note_sent(ctx: &SkBuffContext, packet: &Packet, pod_flags: u32) {
    if pod_flags & POD_INGRESS_ISOLATED == 0
        || !(packet.protocol == PROTO_UDP || packet.protocol == PROTO_SCTP)
        || packet.dst_port == 0
    {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let now = unsafe { bpf_ktime_get_ns() };
    // LRU: a lost entry only means the answer is judged as new inbound.
    let mut key = MaybeUninit::uninit();
    let _ = SENT.insert(
        reply::fill_key(&mut key, cookie, &packet.dst, packet.dst_port, packet.protocol),
        &now,
        0,
    );
}

#[inline(always)]
fn is_new_inbound(ctx: &SkBuffContext, packet: &Packet, socket: Option<u32>, config: &Config) -> bool {
    match packet.protocol {
        PROTO_TCP => socket == Some(BPF_TCP_LISTEN),
        PROTO_UDP | PROTO_SCTP => {
            if packet.protocol == PROTO_UDP && socket == Some(BPF_TCP_ESTABLISHED) {
                return false;
            }
            !sent_to(ctx, packet, config)
        }
        _ => false,
    }
}

/// What the ingress hook reads of the receiving socket, and of the packet.
pub struct Receiver {
    /// `BPF_TCP_*` (UDP uses ESTABLISHED for connected).
    pub state: u32,
    /// The packet's IP protocol (IPv6: its first next header). A socket only receives its own
    /// protocol's packets, so for TCP it is the socket's (a raw socket of protocol TCP, like
    /// before: its copies are not judged).
    pub protocol: u8,
    /// The peer's port, host order (0 when not connected).
    pub peer_port: u16,
}

impl Receiver {
    /// A TCP socket that is not listening: part of a connection the pod opened or already
    /// accepted, so what it receives is never new inbound (see the module comment), and it
    /// can only be TCP from its peer.
    #[inline(always)]
    pub fn is_connected_tcp(&self) -> bool {
        self.protocol == PROTO_TCP && self.state != BPF_TCP_LISTEN
    }
}

/// The receiving socket; None without one. Its state and peer port are in the part every
/// socket shares, so no `bpf_sk_fullsock` call (a helper call on every received packet);
/// the protocol is the packet's, one byte of its header.
#[inline(always)]
pub fn receiver(ctx: &SkBuffContext) -> Option<Receiver> {
    let sk = unsafe { read_volatile(addr_of!((*ctx.skb.skb).__bindgen_anon_2.sk)) };
    if sk.is_null() {
        return None;
    }
    // SAFETY: a socket the verifier checked for null; each field read once, whole.
    let (state, peer_port) = unsafe {
        (
            read_volatile(addr_of!((*sk).state)),
            u16::from_be(read_volatile(addr_of!((*sk).dst_port)) as u16),
        )
    };
    Some(Receiver {
        state,
        protocol: packet::ip_protocol(ctx),
        peer_port,
    })
}

#[inline(always)]
fn sent_to(ctx: &SkBuffContext, packet: &Packet, config: &Config) -> bool {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    if cookie == 0 {
        return false;
    }
    let mut key = MaybeUninit::uninit();
    let Some(seen) = (unsafe {
        SENT.get(reply::fill_key(
            &mut key,
            cookie,
            &packet.src,
            packet.src_port,
            packet.protocol,
        ))
    }) else {
        return false;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    now.wrapping_sub(*seen) < config.reply_window_ns
}

/// The packet comes from a local socket of the same pod (looked up by the packet's own
/// addresses: the sender is the socket bound to the source and connected, or sending, to
/// the destination).
#[inline(always)]
fn from_same_pod(ctx: &SkBuffContext, packet: &Packet, pod: &Pod) -> bool {
    if packet.src_port == 0 || !(packet.protocol == PROTO_TCP || packet.protocol == PROTO_UDP) {
        return false;
    }
    // Not zeroed: the lookup reads the `size` bytes of the variant written below, all of
    // them set (zeroing it would be a byte-at-a-time `memset`, see `zeroed`).
    let mut tuple = MaybeUninit::<bpf_sock_tuple>::uninit();
    let tuple = tuple.as_mut_ptr();
    let size = unsafe {
        if packet.src.is_v4 {
            // The sender's view: its peer is our destination, its own address our source.
            let t = addr_of_mut!((*tuple).__bindgen_anon_1.ipv4);
            (*t).saddr = u32::from_ne_bytes(packet.dst.v4_bytes());
            (*t).daddr = u32::from_ne_bytes(packet.src.v4_bytes());
            (*t).sport = packet.dst_port.to_be();
            (*t).dport = packet.src_port.to_be();
            size_of_val(&*t)
        } else {
            let t = addr_of_mut!((*tuple).__bindgen_anon_1.ipv6);
            (*t).saddr = packet.dst.words();
            (*t).daddr = packet.src.words();
            (*t).sport = packet.dst_port.to_be();
            (*t).dport = packet.src_port.to_be();
            size_of_val(&*t)
        }
    };
    let netns = BPF_F_CURRENT_NETNS as u64;
    let skb = ctx.skb.skb.cast();
    let sk = unsafe {
        if packet.protocol == PROTO_TCP {
            bpf_sk_lookup_tcp(skb, tuple, size as u32, netns, 0)
        } else {
            bpf_sk_lookup_udp(skb, tuple, size as u32, netns, 0)
        }
    };
    if sk.is_null() {
        return false;
    }
    let mut same = false;
    let mut level = 1;
    while level <= MAX_CGROUP_DEPTH as i32 {
        let id = unsafe { bpf_sk_ancestor_cgroup_id(sk.cast(), level) };
        if id == 0 {
            break;
        }
        if id == pod.cgroup_id {
            same = true;
            break;
        }
        level += 1;
    }
    unsafe { bpf_sk_release(sk.cast()) };
    same
}
