//! cgroup_skb ingress: every IP packet a socket of a guarded pod receives. Inbound traffic
//! is not judged here (ingress rules are a later stage); this hook only learns from it, so
//! the entry always passes the packet. A failure to learn never opens anything: it only
//! means a reply is judged as new egress.

use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};

use pipeguard_common::POD_DNS_FILTERED;

use crate::{dns, maps::DNS_INGRESS, packet, pod, reply, verdict::config};

const PASS: i32 = 1;

#[cgroup_skb(ingress)]
pub fn pg_ingress(ctx: SkBuffContext) -> i32 {
    let Ok(packet) = packet::parse(&ctx) else {
        return PASS;
    };
    let config = config();
    reply::learn(&ctx, &packet, &config);
    // A DNS answer to a DNS-filtered pod: `pg_dns_answer` learns from it (its own program,
    // for its own stack). Should the tail call fail, nothing is learned: closed, not open.
    if packet.src_port == dns::DNS_PORT
        && dns::is_tcp_or_udp(&packet)
        && pod::of_skb(ctx.skb.skb).is_some_and(|pod| pod.entry.flags & POD_DNS_FILTERED != 0)
    {
        unsafe { DNS_INGRESS.tail_call(&ctx, 0) };
    }
    PASS
}
