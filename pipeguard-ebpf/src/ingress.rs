//! cgroup_skb ingress: every IP packet a socket of a guarded pod receives. Inbound traffic
//! is not judged here (ingress rules are a later stage); this hook only learns from it, so
//! the entry always passes the packet. A failure to learn never opens anything: it only
//! means a reply is judged as new egress.

use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};

use crate::{packet, reply, verdict::config};

const PASS: i32 = 1;

#[cgroup_skb(ingress)]
pub fn pg_ingress(ctx: SkBuffContext) -> i32 {
    let Ok(packet) = packet::parse(&ctx) else {
        return PASS;
    };
    let config = config();
    reply::learn(&ctx, &packet, &config);
    PASS
}
