//! Replies pass, like NetworkPolicy's stateful semantics: what a guarded socket sends back to
//! a peer that talked to it first is not new egress.
//!
//! TCP: `pg_sock_ops` records the peer of every connection the pod accepted under the child
//! socket's cookie (`ACCEPTED`, removed with the socket's other records, see `owner`);
//! packets of that socket to that peer are replies. The record carries the pod the replies
//! are counted for, handed over by the ingress hook, which found it for the handshake's
//! last ACK just before (`note_handshake`), so no reply walks the cgroup tree. A
//! listener's SYN-ACKs are replies too: the kernel hands the egress hook the listener (the
//! full socket of the request socket), in state LISTEN. Sockets the pod opened with
//! connect() carry no mark, so their packets stay judged (revocation keeps working). Last,
//! the reset a connection sends when close() aborts it (linger 0, unread data) after its
//! records are gone: TCP sends one only from a connection that was established, and only
//! to its peer.
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
    bindings::{BPF_TCP_CLOSE, BPF_TCP_LISTEN, bpf_sock},
    helpers::generated::{bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_sk_fullsock},
    programs::{SkBuffContext, SockOpsContext},
};
use pipeguard_common::{
    AcceptedPeer, Config, POLICY_GENERATION_NONE, PROTO_TCP, PROTO_UDP, ReplyKey, UNKNOWN_DENY,
};

use crate::{
    addr::Dest,
    fast,
    maps::{ACCEPTED, HANDSHAKE, REPLIES},
    packet::Packet,
    pod::Pod,
    socket_table, verdict, zeroed,
};

const AF_INET: u32 = 2;
const TCP_FLAGS_OFFSET: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// In `pg_sock_ops`, on BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: the child socket of an accepted
/// connection remembers its peer.
#[inline(always)]
pub fn mark_accepted(ctx: &SockOpsContext) {
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
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ops.cast()) };
    let r = socket_table::claim(&ACCEPTED, cookie);
    if r.is_null() {
        return;
    }
    // SAFETY: the slot this socket claimed, its other fields zeroed.
    unsafe {
        (*r).addr = peer.addr;
        (*r).port = port;
        (*r).generation = POLICY_GENERATION_NONE;
        take_handshake(&mut *r, &peer, local_port);
    }
}

/// In the ingress hook, for a TCP packet to a listener of `pod` that passed, `generation`
/// read before the pod lookup: should it be the handshake's last ACK, `mark_accepted` runs
/// next on this CPU and takes the pod from here.
#[inline(always)]
pub fn note_handshake(packet: &Packet, pod: &Pod, generation: u64) {
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
        (*h).counter_slot = pod.entry.counter_slot;
        (*h).pod_cgroup_id = pod.cgroup_id;
        (*h).generation = generation;
    }
}

/// Fills the pod of the new connection's record from `note_handshake` when its packet was
/// this connection's (peer and local port). Taken, so it serves no other connection. When
/// it does not match (the ACK waited in the listener's backlog), the first reply finds the
/// pod itself.
#[inline(always)]
fn take_handshake(record: &mut AcceptedPeer, peer: &Dest, local_port: u16) {
    let Some(h) = HANDSHAKE.get_ptr_mut(0) else {
        return;
    };
    let h = unsafe { &mut *h };
    if h.generation == POLICY_GENERATION_NONE
        || h.port != record.port
        || h.local_port != local_port
        || !peer.is(&h.addr)
    {
        return;
    }
    record.pod_cgroup_id = h.pod_cgroup_id;
    record.counter_slot = h.counter_slot;
    record.generation = h.generation;
    h.generation = POLICY_GENERATION_NONE;
}

/// A TCP packet at the egress hook is a reply when its socket is a listener sending a
/// SYN-ACK, an accepted connection sending to the peer it was accepted from, or a closed
/// connection's reset.
#[inline(always)]
pub fn is_tcp_reply(ctx: &SkBuffContext, packet: &Packet) -> bool {
    let full = sending_tcp_socket(ctx, packet);
    if full.is_null() {
        return false;
    }
    match unsafe { read_volatile(addr_of!((*full).state)) } {
        BPF_TCP_LISTEN => is_syn_ack(ctx, packet),
        BPF_TCP_CLOSE => is_reset(ctx, packet),
        _ => !peer_of(ctx, packet).is_null(),
    }
}

/// A listener's SYN-ACK: the handshake answer, the only packet a listener sends of its own.
#[inline(always)]
pub fn is_listener_syn_ack(ctx: &SkBuffContext, packet: &Packet) -> bool {
    let full = sending_tcp_socket(ctx, packet);
    !full.is_null() && is_listening(full) && is_syn_ack(ctx, packet)
}

/// The accepted-peer record of the socket that sent this TCP packet, when the packet goes
/// to that peer (a reply); null for anything else.
#[inline(always)]
pub fn accepted_peer(ctx: &SkBuffContext, packet: &Packet) -> *mut AcceptedPeer {
    let full = sending_tcp_socket(ctx, packet);
    // A listener has no record: the lookup is spared for its SYN-ACKs.
    if full.is_null() || is_listening(full) {
        return null_mut();
    }
    peer_of(ctx, packet)
}

/// The full socket that sent a TCP packet with a port; null for anything else.
#[inline(always)]
fn sending_tcp_socket(ctx: &SkBuffContext, packet: &Packet) -> *mut bpf_sock {
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() || packet.protocol != PROTO_TCP || packet.dst_port == 0 {
        return null_mut();
    }
    unsafe { bpf_sk_fullsock(sk) }
}

#[inline(always)]
fn is_listening(full: *mut bpf_sock) -> bool {
    (unsafe { read_volatile(addr_of!((*full).state)) }) == BPF_TCP_LISTEN
}

#[inline(always)]
fn is_reset(ctx: &SkBuffContext, packet: &Packet) -> bool {
    ctx.load::<u8>(packet.l4 + TCP_FLAGS_OFFSET)
        .is_ok_and(|flags| flags & TCP_RST != 0)
}

#[inline(always)]
fn is_syn_ack(ctx: &SkBuffContext, packet: &Packet) -> bool {
    let Ok(flags) = ctx.load::<u8>(packet.l4 + TCP_FLAGS_OFFSET) else {
        return false;
    };
    flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN | TCP_ACK
}

/// The sending (full) socket's accepted-peer record when the packet goes to that peer;
/// null otherwise.
#[inline(always)]
fn peer_of(ctx: &SkBuffContext, packet: &Packet) -> *mut AcceptedPeer {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let peer = socket_table::find(&ACCEPTED, cookie);
    if peer.is_null() || unsafe { (*peer).port != packet.dst_port || !packet.dst.is(&(*peer).addr) } {
        return null_mut();
    }
    peer
}

/// The counter slot of the pod a reply of this accepted connection is counted for without
/// the pod walk: the one the handshake handed over (`take_handshake`) or the last reply was
/// counted for, while the policy generation has not moved (a pod table write moves it, so a
/// pod that left the table is looked up again).
#[inline(always)]
pub fn counted_pod(peer: *const AcceptedPeer) -> Option<u32> {
    if peer.is_null() {
        return None;
    }
    let p = unsafe { &*peer };
    (p.generation != POLICY_GENERATION_NONE && p.pod_cgroup_id != 0 && p.generation == fast::generation())
        .then_some(p.counter_slot)
}

/// After the slow path counted a reply for `pod_cgroup_id`, found under `generation` (read
/// before the pod lookup).
#[inline(always)]
pub fn remember_pod(peer: *mut AcceptedPeer, pod_cgroup_id: u64, counter_slot: u32, generation: u64) {
    if peer.is_null() {
        return;
    }
    unsafe {
        (*peer).pod_cgroup_id = pod_cgroup_id;
        (*peer).counter_slot = counter_slot;
        (*peer).generation = generation;
    }
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
