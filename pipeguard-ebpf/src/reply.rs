//! Replies pass, like NetworkPolicy's stateful semantics: what a guarded socket sends back to
//! a peer that talked to it first is not new egress.
//!
//! UDP: the ingress hook records {receiving socket, sender address, sender port} with the
//! time of the datagram; the egress and socket hooks let the same socket send to that peer
//! within the reply window. Keyed by socket cookie, so no other socket gains anything, and
//! by the exact sender, so no other address does.

use aya_ebpf::{
    helpers::generated::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    programs::SkBuffContext,
};
use pipeguard_common::{Config, PROTO_UDP, ReplyKey, UNKNOWN_DENY};

use crate::{addr::Dest, maps::REPLIES, packet::Packet, pod};

/// Called for every packet a socket under the attached cgroup receives. Only sockets that
/// are judged at egress (guarded pods, or every socket under `--unknown-pods deny`) record
/// anything, so unguarded traffic never churns the table.
#[inline(always)]
pub fn learn(ctx: &SkBuffContext, packet: &Packet, config: &Config) {
    if packet.protocol != PROTO_UDP || packet.src_port == 0 {
        return;
    }
    if config.unknown_pods != UNKNOWN_DENY && pod::of_skb(ctx.skb.skb).is_none() {
        return;
    }
    let key = key(
        unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) },
        &packet.src,
        packet.src_port,
    );
    let now = unsafe { bpf_ktime_get_ns() };
    // A full table evicts the oldest entry (LRU); a failed update only means the reply
    // will be judged as egress.
    let _ = REPLIES.insert(&key, &now, 0);
}

/// True when the socket `cookie` received a UDP datagram from `dest`:`port` within the
/// reply window.
#[inline(always)]
pub fn is_udp_reply(cookie: u64, dest: &Dest, port: u16, config: &Config) -> bool {
    if cookie == 0 {
        return false;
    }
    let Some(seen) = (unsafe { REPLIES.get(&key(cookie, dest, port)) }) else {
        return false;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    now.wrapping_sub(*seen) < config.reply_window_ns
}

#[inline(always)]
fn key(cookie: u64, peer: &Dest, port: u16) -> ReplyKey {
    ReplyKey {
        cookie,
        addr: peer.addr,
        port,
        protocol: PROTO_UDP,
        _pad: [0; 5],
    }
}
