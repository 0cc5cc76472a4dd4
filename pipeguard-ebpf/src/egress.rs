//! cgroup_skb egress: every IP packet that leaves a guarded pod. The backstop for what the
//! socket hooks cannot see: raw sockets, ICMP, and packets of connections opened before a
//! policy change (revocation takes effect on the next packet). Also the per-pod counters.
//! Replies to peers that talked to the socket first pass (`reply`).

use aya_ebpf::{
    helpers::generated::{bpf_get_socket_cookie, bpf_skb_cgroup_id},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use pipeguard_common::{Config, Hook, PROTO_UDP, VERDICT_ERROR};

use crate::{
    packet::{self, Packet},
    pod, reply,
    verdict::{Attempt, check, count},
};

const PASS: i32 = 1;
const DROP: i32 = 0;

#[cgroup_skb(egress)]
pub fn pg_egress(ctx: SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    let pod = pod::of_skb(skb);
    let Ok(packet) = packet::parse(&ctx) else {
        let Some(pod) = pod else {
            // Not a guarded pod: only the unknown-pod policy applies, and it cannot judge
            // what it cannot parse.
            return PASS;
        };
        // Unparseable packet from a guarded pod: never let "something broke" mean allow.
        count(pod.cgroup_id, VERDICT_ERROR, Hook::Egress, ctx.len() as u64);
        return DROP;
    };
    let attempt = Attempt {
        dest: packet.dst,
        port: packet.dst_port,
        protocol: packet.protocol,
        hook: Hook::Egress,
        bytes: ctx.len() as u64,
        cgroup_id: unsafe { bpf_skb_cgroup_id(skb) },
    };
    verdict(check(&attempt, pod, |config| is_reply(&ctx, &packet, config)))
}

#[inline(always)]
fn is_reply(ctx: &SkBuffContext, packet: &Packet, config: &Config) -> bool {
    if packet.protocol == PROTO_UDP {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
        return reply::is_udp_reply(cookie, &packet.dst, packet.dst_port, config);
    }
    false
}

#[inline(always)]
fn verdict(pass: bool) -> i32 {
    if pass { PASS } else { DROP }
}
