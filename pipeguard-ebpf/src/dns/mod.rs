//! DNS-aware egress for DNS-filtered pods: queries are checked against the allowlist's
//! names before they leave (`query`), answers to allowed queries teach the allowlist their
//! addresses before the socket sees them (`answer`), and the hooks consult what was learned
//! after the static tries (`learned`).

pub mod answer;
pub mod handoff;
pub mod learned;
mod name;
mod queries;
pub mod query;
mod report;

use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};
use handoff::Handoff;
use pipeguard_common::{
    DNS_LEARN_NAMES, DNS_REPORT_QUERIES, Hook, POD_DNS_FILTERED, PROTO_TCP, PROTO_UDP, VERDICT_AUDIT,
    VERDICT_DENY,
};

use crate::{
    maps::DNS_CONFIG,
    packet::{self, Packet},
    verdict::count_for_pod,
};

pub const DNS_PORT: u16 = 53;
/// Header: id, flags, and the four section counts.
const HEADER_BYTES: usize = 12;
const PASS: i32 = 1;
const DROP: i32 = 0;

#[inline(always)]
pub fn is_tcp_or_udp(packet: &Packet) -> bool {
    packet.protocol == PROTO_UDP || packet.protocol == PROTO_TCP
}

/// `DnsConfig::flags`: what user space asked of the DNS programs beyond filtering.
#[inline(always)]
pub fn config_flags() -> u32 {
    DNS_CONFIG.get(0).map_or(0, |c| c.flags)
}

/// A query the DNS program only reads (for the report, or to learn its answer's names): to
/// port 53, from a guarded pod that is not DNS-filtered, while user space asks for either.
#[inline(always)]
pub fn is_observed(pod_flags: u32, packet: &Packet) -> bool {
    pod_flags & POD_DNS_FILTERED == 0
        && packet.dst_port == DNS_PORT
        && is_tcp_or_udp(packet)
        && config_flags() & (DNS_REPORT_QUERIES | DNS_LEARN_NAMES) != 0
}

/// A packet from port 53 the answer program reads: to a DNS-filtered pod (its answers
/// teach the allowlist), or to another guarded pod while names are learned.
#[inline(always)]
pub fn is_answer_read(pod_flags: u32, packet: &Packet) -> bool {
    packet.src_port == DNS_PORT
        && is_tcp_or_udp(packet)
        && (pod_flags & POD_DNS_FILTERED != 0 || config_flags() & DNS_LEARN_NAMES != 0)
}

/// A packet the DNS program judges: DNS to or from port 53 of a DNS-filtered pod.
#[inline(always)]
pub fn is_dns(pod_flags: u32, packet: &Packet) -> bool {
    pod_flags & POD_DNS_FILTERED != 0
        && is_tcp_or_udp(packet)
        && (packet.dst_port == DNS_PORT || packet.src_port == DNS_PORT)
}

/// Tail-called by `pg_egress` for a DNS packet of a DNS-filtered pod the IP policy let
/// through, and for a query of another guarded pod to read (`is_observed`: passed, whatever
/// it holds). Queries are judged by name; answers never leave a DNS-filtered pod, so only a
/// resolver outside it can teach it addresses (a job cannot forge one from a socket or raw
/// socket of its own, on loopback or anywhere else).
#[cgroup_skb(egress)]
pub fn pg_dns_query(ctx: SkBuffContext) -> i32 {
    // What `pg_egress` found (pod, transport header, the resolver's IP verdict).
    let Some(handoff) = Handoff::read(ctx.skb.skb) else {
        return DROP;
    };
    if handoff.observe {
        query::observe(&ctx, &handoff);
        return PASS;
    }
    if handoff.from_dns_port {
        let verdict = if handoff.audit {
            VERDICT_AUDIT
        } else {
            VERDICT_DENY
        };
        count_for_pod(handoff.pod_cgroup_id, verdict, Hook::Dns, ctx.len() as u64);
        return if handoff.audit { PASS } else { DROP };
    }
    if query::check(&ctx, &handoff) { PASS } else { DROP }
}

/// Tail-called by `pg_ingress` for a packet from port 53 to a guarded pod (`is_answer_read`).
#[cgroup_skb(ingress)]
pub fn pg_dns_answer(ctx: SkBuffContext) -> i32 {
    if let Ok(packet) = packet::parse(&ctx) {
        let _ = answer::learn(&ctx, &packet);
    }
    PASS
}

/// Where the DNS message starts: after the UDP header, or after the TCP header and the
/// 2-byte length. `Ok(None)`: a TCP segment without data (handshake, ACK, FIN). A TCP
/// segment must carry exactly one whole message, and so must a UDP packet; anything else is
/// refused by the caller, so a query can never be split or smuggled behind another.
#[inline(always)]
fn message(ctx: &SkBuffContext, protocol: u8, l4: usize) -> Result<Option<usize>, ()> {
    if protocol == PROTO_UDP {
        // One datagram, one message: a UDP GSO buffer (UDP_SEGMENT) is split into datagrams
        // after this hook, and all but the first would leave unread.
        if unsafe { (*ctx.skb.skb).gso_size } != 0 {
            return Err(());
        }
        return Ok(Some(l4 + 8));
    }
    let offset_byte: u8 = ctx.load(l4 + 12).map_err(|_| ())?;
    let doff = ((offset_byte >> 4) as usize) * 4;
    if doff < 20 {
        return Err(());
    }
    let data = l4 + doff;
    let len = ctx.len() as usize;
    if len <= data {
        return Ok(None);
    }
    let msg_len = u16::from_be(ctx.load::<u16>(data).map_err(|_| ())?) as usize;
    if data + 2 + msg_len != len {
        return Err(());
    }
    Ok(Some(data + 2))
}

/// (id as on the wire, flags, question count, answer count)
#[inline(always)]
fn header(ctx: &SkBuffContext, msg: usize) -> Result<(u16, u16, u16, u16), ()> {
    let h: [u8; HEADER_BYTES] = ctx.load(msg).map_err(|_| ())?;
    Ok((
        u16::from_ne_bytes([h[0], h[1]]),
        u16::from_be_bytes([h[2], h[3]]),
        u16::from_be_bytes([h[4], h[5]]),
        u16::from_be_bytes([h[6], h[7]]),
    ))
}

const FLAG_RESPONSE: u16 = 0x8000;
const OPCODE_MASK: u16 = 0x7800;
const RCODE_MASK: u16 = 0x000f;
