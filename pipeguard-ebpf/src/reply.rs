//! Replies pass, like NetworkPolicy's stateful semantics: what a guarded socket sends back to
//! a peer that talked to it first is not new egress.
//!
//! TCP: `pg_sock_ops` gives every connection a judged pod accepted a record in the socket
//! table (`SOCKETS`) whose destination is the peer it was accepted from, marked
//! `REMEMBERED_REPLY`, removed with the socket at CLOSE (see `owner`); packets of that
//! socket to that peer are replies. The record carries the pod the replies are counted
//! for, handed over by the ingress hook, which found it for the handshake's last ACK just
//! before (`note_handshake`): while the policy generation holds, a reply passes on the fast
//! path like any remembered verdict (`fast::remembered`), with one table lookup and no
//! cgroup walk. A connection of a pod nothing judges (no pod, unknown pods allowed) gets no
//! record. A listener's SYN-ACKs are replies too: the kernel hands the egress hook the
//! listener (the full socket of the request socket), in state LISTEN. Sockets the pod
//! opened with connect() carry no mark, so their packets stay judged (revocation keeps
//! working). Last, the reset a connection sends when close() aborts it (linger 0, unread
//! data) after its record is gone: TCP sends one only from a connection that was
//! established, and only to its peer.
//!
//! UDP: the ingress hook records {receiving socket, sender address, sender port} with the
//! time of the datagram; the egress and socket hooks let the same socket send to that peer
//! within the reply window. Keyed by socket cookie, so no other socket gains anything, and
//! by the exact sender, so no other address does. A sender the pod's allowlist already
//! allows is not recorded: should a policy change revoke it, its datagrams earn nothing.

use core::{
    mem::MaybeUninit,
    ptr::{addr_of, null_mut, read_volatile},
};

use aya_ebpf::{
    bindings::{BPF_TCP_CLOSE, BPF_TCP_LISTEN},
    helpers::generated::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    programs::{SkBuffContext, SockOpsContext},
};
use pipeguard_common::{
    Config, Handshake, POLICY_GENERATION_NONE, PROTO_TCP, PROTO_UDP, REMEMBERED_REPLY, ReplyKey, SocketState,
    UNKNOWN_DENY,
};

use crate::{
    addr::Dest,
    fast,
    maps::{HANDSHAKE, REPLIES, SOCKETS},
    packet::{self, Packet},
    pod::Pod,
    socket_table, verdict, zeroed,
};

const AF_INET: u32 = 2;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// In `pg_sock_ops`, on BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: the child socket of an accepted
/// connection remembers its peer. False when it got no record: its pod is judged by
/// nothing, or the socket table had no place (its packets are then judged as egress:
/// closed, never opened).
#[inline(always)]
pub fn mark_accepted(ctx: &SockOpsContext) -> bool {
    let ops = ctx.ops;
    // Context fields must be read with exactly-sized loads at fixed offsets (the verifier
    // rewrites them), so every field is read before choosing: a branch would let LLVM
    // select between two context pointers, which the verifier rejects.
    let (sk, family, ip4, ip6, port, local_port) = unsafe {
        (
            read_volatile(addr_of!((*ops).__bindgen_anon_2.sk)),
            read_volatile(addr_of!((*ops).family)),
            read_volatile(addr_of!((*ops).remote_ip4)),
            [
                read_volatile(addr_of!((*ops).remote_ip6[0])),
                read_volatile(addr_of!((*ops).remote_ip6[1])),
                read_volatile(addr_of!((*ops).remote_ip6[2])),
                read_volatile(addr_of!((*ops).remote_ip6[3])),
            ],
            // remote_port comes in network order in the upper 16 bits.
            u32::from_be(read_volatile(addr_of!((*ops).remote_port))) as u16,
            // Host order.
            read_volatile(addr_of!((*ops).local_port)) as u16,
        )
    };
    // An AF_INET6 socket accepted from an IPv4 peer sees ::ffff:a.b.c.d: canonical IPv4.
    let peer = if family == AF_INET {
        Dest::v4(ip4)
    } else {
        Dest::v6(ip6)
    };
    if sk.is_null() {
        return false;
    }
    let handshake = handshake_of(&peer, port, local_port);
    // SAFETY: this CPU's slot (see `note_handshake`).
    if !handshake.is_null()
        && unsafe { (*handshake).pod_cgroup_id } == 0
        && verdict::config().unknown_pods != UNKNOWN_DENY
    {
        // Not a guarded pod's: nothing ever asks whether its packets are replies.
        unsafe { (*handshake).generation = POLICY_GENERATION_NONE };
        return false;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ops.cast()) };
    let r = socket_table::claim(&SOCKETS, cookie);
    if !r.is_null() {
        // SAFETY: the slot this socket claimed, its other fields zeroed.
        unsafe {
            (*r).addr = peer.addr;
            (*r).port = port;
            (*r).protocol = PROTO_TCP;
            (*r).remembered = REMEMBERED_REPLY;
        }
        if !handshake.is_null() {
            take_pod(unsafe { &mut *r }, unsafe { &*handshake }, local_port);
        }
    }
    if !handshake.is_null() {
        // Taken, so it serves no other connection.
        unsafe { (*handshake).generation = POLICY_GENERATION_NONE };
    }
    !r.is_null()
}

/// In the ingress hook, for a TCP packet to a listener that passed, of `pod` (None: a
/// socket of no pod), `generation` read before the pod lookup: should it be the handshake's
/// last ACK, `mark_accepted` runs next on this CPU and takes the pod from here.
#[inline(always)]
pub fn note_handshake(packet: &Packet, pod: Option<&Pod>, generation: u64) {
    let Some(h) = HANDSHAKE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot. A reader it interrupts (sock_ops on a listener's backlog, in
    // process context) may see a mix of two packets' fields: its whole-tuple compare turns
    // the mix away.
    unsafe {
        (*h).addr = packet.src.addr;
        (*h).port = packet.src_port;
        (*h).local_port = packet.dst_port;
        match pod {
            Some(pod) => {
                (*h).pod_cgroup_id = pod.cgroup_id;
                (*h).counter_slot = pod.entry.counter_slot;
                (*h).pod_flags = pod.entry.flags;
                (*h).policy_id = pod.entry.policy_id;
                (*h).mode = pod.entry.mode;
            }
            None => (*h).pod_cgroup_id = 0,
        }
        (*h).generation = generation;
    }
}

/// This CPU's handshake when its packet was this connection's (peer and local port); null
/// when it was not (the ACK waited in the listener's backlog: the first reply finds the pod
/// itself).
#[inline(always)]
fn handshake_of(peer: &Dest, port: u16, local_port: u16) -> *mut Handshake {
    let Some(h) = HANDSHAKE.get_ptr_mut(0) else {
        return null_mut();
    };
    let hs = unsafe { &*h };
    if hs.generation == POLICY_GENERATION_NONE
        || hs.port != port
        || hs.local_port != local_port
        || !peer.is(&hs.addr)
    {
        return null_mut();
    }
    h
}

/// The pod of an accepted connection's record, from its handshake: remembered under the
/// handshake's generation, so its replies skip the pod walk. DNS ports keep no generation
/// (their packets always go to the DNS program the slow path picks).
#[inline(always)]
fn take_pod(record: &mut SocketState, h: &Handshake, local_port: u16) {
    if h.pod_cgroup_id == 0 {
        return;
    }
    let generation = if fast::is_dns_port(PROTO_TCP, record.port, local_port) {
        POLICY_GENERATION_NONE
    } else {
        h.generation
    };
    fast::set_pod(
        record,
        h.pod_cgroup_id,
        h.counter_slot,
        h.pod_flags,
        h.policy_id,
        h.mode,
        generation,
    );
}

/// A TCP packet at the egress hook is a reply when its socket is a listener sending a
/// SYN-ACK, an accepted connection sending to the peer it was accepted from (`state`: the
/// sending socket's record, or null), or a closed connection's reset.
#[inline(always)]
pub fn is_tcp_reply(ctx: &SkBuffContext, packet: &Packet, state: *const SocketState) -> bool {
    match sending_tcp_state(ctx, packet) {
        None => false,
        Some(BPF_TCP_LISTEN) => is_syn_ack(ctx, packet),
        Some(BPF_TCP_CLOSE) => is_reset(ctx, packet),
        Some(_) => fast::is_accepted_peer(state, &packet.dst, packet.dst_port),
    }
}

/// A listener's SYN-ACK: the handshake answer, the only packet a listener sends of its own.
#[inline(always)]
pub fn is_listener_syn_ack(ctx: &SkBuffContext, packet: &Packet) -> bool {
    sending_tcp_state(ctx, packet) == Some(BPF_TCP_LISTEN) && is_syn_ack(ctx, packet)
}

/// The TCP state of the socket that sent a TCP packet with a port; None for anything
/// else. The state is in the part every socket shares: no `bpf_sk_fullsock` call (the
/// kernel runs the egress hook for full sockets only, a listener for its SYN-ACKs).
#[inline(always)]
fn sending_tcp_state(ctx: &SkBuffContext, packet: &Packet) -> Option<u32> {
    let sk = unsafe { read_volatile(addr_of!((*ctx.skb.skb).__bindgen_anon_2.sk)) };
    if sk.is_null() || packet.protocol != PROTO_TCP || packet.dst_port == 0 {
        return None;
    }
    // SAFETY: a socket the verifier checked for null; read once, whole.
    Some(unsafe { read_volatile(addr_of!((*sk).state)) })
}

#[inline(always)]
fn is_reset(ctx: &SkBuffContext, packet: &Packet) -> bool {
    packet::tcp_flags(ctx, packet) & TCP_RST != 0
}

#[inline(always)]
fn is_syn_ack(ctx: &SkBuffContext, packet: &Packet) -> bool {
    packet::tcp_flags(ctx, packet) & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN | TCP_ACK
}

/// Called for every packet a socket under the attached cgroup receives, with the receiving
/// socket's pod if it has one. Only sockets that are judged at egress (guarded pods, or
/// every socket under `--unknown-pods deny`) record anything, so unguarded traffic never
/// churns the table.
#[inline(always)]
pub fn learn(ctx: &SkBuffContext, packet: &Packet, config: &Config, pod: Option<&Pod>) {
    if packet.protocol != PROTO_UDP || packet.src_port == 0 {
        return;
    }
    match pod {
        // Sockets outside guarded pods are only judged when unknown pods are denied.
        None if config.unknown_pods != UNKNOWN_DENY => return,
        // The pod's allowlist lets it send to this peer anyway (a resolver, a service it
        // queried): nothing to learn, and a trie lookup costs far less than the LRU update
        // every answer to a fresh socket would pay.
        Some(pod) if verdict::allows(pod.entry.policy_id, &packet.src, PROTO_UDP, packet.src_port) => return,
        _ => {}
    }
    let mut key = MaybeUninit::uninit();
    let key = fill_key(
        &mut key,
        unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) },
        &packet.src,
        packet.src_port,
        PROTO_UDP,
    );
    let now = unsafe { bpf_ktime_get_ns() };
    // A full table evicts the oldest entry (LRU); a failed update only means the reply
    // will be judged as egress.
    let _ = REPLIES.insert(key, &now, 0);
}

/// True when the socket `cookie` received a UDP datagram from `dest`:`port` within the
/// reply window.
#[inline(always)]
pub fn is_udp_reply(cookie: u64, dest: &Dest, port: u16, config: &Config) -> bool {
    if cookie == 0 {
        return false;
    }
    let mut key = MaybeUninit::uninit();
    let Some(seen) = (unsafe { REPLIES.get(fill_key(&mut key, cookie, dest, port, PROTO_UDP)) }) else {
        return false;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    now.wrapping_sub(*seen) < config.reply_window_ns
}

/// The key of a {socket, peer, port, protocol} table (`REPLIES`, `SENT`), written into `key`.
#[inline(always)]
pub fn fill_key<'a>(
    key: &'a mut MaybeUninit<ReplyKey>,
    cookie: u64,
    peer: &Dest,
    port: u16,
    protocol: u8,
) -> &'a ReplyKey {
    let k = zeroed::zero(key);
    // SAFETY: zeroed, then its fields written in place.
    unsafe {
        (*k).cookie = cookie;
        (*k).addr = peer.addr;
        (*k).port = port;
        (*k).protocol = protocol;
        &*k
    }
}
