//! cgroup_skb egress: every IP packet that leaves a guarded pod. The backstop for what the
//! socket hooks cannot see: raw sockets, ICMP, and packets of connections opened before a
//! policy change (revocation takes effect on the next packet). Also the per-pod counters.
//! Replies to peers that talked to the socket first pass (`reply`).

use aya_ebpf::{
    helpers::generated::{bpf_get_socket_cookie, bpf_skb_cgroup_id},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use pipeguard_common::{
    CONFIG_FLOW_STATS, CONFIG_REPORT_ALLOWED, Config, Hook, MODE_AUDIT, POLICY_GENERATION_NONE, PROTO_TCP,
    PROTO_UDP, SocketState, VERDICT_ALLOW, VERDICT_ERROR,
};

use crate::{
    dns::{self, handoff::Handoff},
    fast, ingress_policy, listener,
    maps::DNS_EGRESS,
    packet::{self, Packet},
    pod, reply,
    verdict::{Attempt, check, config, count},
};

const PASS: i32 = 1;
const DROP: i32 = 0;

#[cgroup_skb(egress)]
pub fn pg_egress(ctx: SkBuffContext) -> i32 {
    let parsed = packet::parse(&ctx);
    // The sending socket's state: a remembered verdict for this very destination passes the
    // packet without the pod walk and the trie (see `fast`).
    let state = fast::of_skb(ctx.skb.skb);
    let config = config();
    if let Ok(packet) = &parsed {
        // Replies of a connection the pod accepted are remembered too (see `reply`).
        if let Some(pod) = fast::remembered(
            state,
            &config,
            &packet.dst,
            packet.dst_port,
            packet.protocol,
            true,
        ) {
            let dns = dns::is_dns(pod.flags, packet);
            let bytes = ctx.len() as u64;
            // A query the DNS program judges is counted there, with its verdict.
            if !dns {
                count(pod.counter_slot, VERDICT_ALLOW, Hook::Egress, bytes);
            }
            if config.flags & CONFIG_FLOW_STATS != 0 && pod.destination {
                fast::add_flow_pending(state, bytes);
            }
            ingress_policy::note_sent(&ctx, packet, pod.flags);
            if dns || dns::is_observed(pod.flags, packet) {
                return to_dns_program(
                    &ctx,
                    packet,
                    pod.cgroup_id,
                    pod.counter_slot,
                    pod.policy_id,
                    pod.mode,
                    pod.by_allowlist,
                    !dns,
                );
            }
            return PASS;
        }
        // A listener's SYN-ACK, counted for the pod that created the listener while it is in
        // the table (learning wants every packet's event; DNS its program).
        if config.flags & CONFIG_REPORT_ALLOWED == 0
            && !state.is_null()
            && !fast::is_dns_port(packet.protocol, packet.dst_port, packet.src_port)
            && reply::is_listener_syn_ack(&ctx, packet)
        {
            if let Some(pod) = listener::pod(state, fast::generation())
                .or_else(|| pod::by_id(unsafe { (*state).pod_cgroup_id }))
            {
                count(
                    pod.entry.counter_slot,
                    VERDICT_ALLOW,
                    Hook::Egress,
                    ctx.len() as u64,
                );
                return PASS;
            }
        }
    }
    // Before the pod lookup: a pod table write after it moves the generation past this, so
    // what a reply remembers is never older than what was read.
    let generation = fast::generation();
    // The two branches call `check` separately on purpose: passing one `Option<Pod>` down
    // lets LLVM spill the uninitialized payload of `None`, which the verifier rejects.
    match pod::of_skb(ctx.skb.skb) {
        Some(pod) => match parsed {
            Ok(packet) => {
                let dns = dns::is_dns(pod.entry.flags, &packet);
                let flags = pod.entry.flags;
                let attempt = Attempt {
                    dns_judges: dns,
                    ..attempt(&ctx, &packet, &config, state)
                };
                let judged = check(&attempt, Some(pod), |config| {
                    is_reply(&ctx, &packet, config, state)
                });
                if judged.pass {
                    ingress_policy::note_sent(&ctx, &packet, flags);
                }
                if judged.by_reply {
                    fast::remember_reply(state, &judged, generation, packet.src_port);
                } else if judged.generation != POLICY_GENERATION_NONE {
                    let state = if state.is_null() {
                        fast::of_skb_or_create(ctx.skb.skb, judged.pod_cgroup_id, attempt.cgroup_id)
                    } else {
                        state
                    };
                    fast::remember(state, &judged, &attempt);
                }
                if judged.pass && (dns || dns::is_observed(flags, &packet)) {
                    return to_dns_program(
                        &ctx,
                        &packet,
                        judged.pod_cgroup_id,
                        judged.counter_slot,
                        judged.policy_id,
                        judged.mode,
                        judged.by_allowlist,
                        !dns,
                    );
                }
                verdict(judged.pass)
            }
            Err(()) => {
                // Unparseable packet from a guarded pod: never let "something broke" mean allow.
                count(
                    pod.entry.counter_slot,
                    VERDICT_ERROR,
                    Hook::Egress,
                    ctx.len() as u64,
                );
                DROP
            }
        },
        // Not a guarded pod: only the unknown-pod policy applies, and it cannot judge what
        // it cannot parse.
        None => match parsed {
            Ok(packet) => verdict(
                check(&attempt(&ctx, &packet, &config, state), None, |config| {
                    is_reply(&ctx, &packet, config, state)
                })
                .pass,
            ),
            Err(()) => PASS,
        },
    }
}

/// DNS of a DNS-filtered pod the IP policy let through (`ip_allowed`: by its static
/// allowlist): judged by `pg_dns_query` (its own program, for its own stack), which is
/// handed what was found here. Should the tail call fail, nothing leaves. `observe`: a
/// query of another pod, only read for the report (`dns::is_observed`), which passes
/// whatever happens.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn to_dns_program(
    ctx: &SkBuffContext,
    packet: &Packet,
    pod_cgroup_id: u64,
    counter_slot: u32,
    policy_id: u32,
    mode: u32,
    ip_allowed: bool,
    observe: bool,
) -> i32 {
    Handoff {
        pod_cgroup_id,
        policy_id,
        audit: mode == MODE_AUDIT,
        ip_allowed,
        observe,
        from_dns_port: packet.src_port == dns::DNS_PORT,
        protocol: packet.protocol,
        l4: packet.l4,
        dst_port: packet.dst_port,
    }
    .write(ctx.skb.skb);
    unsafe { DNS_EGRESS.tail_call(ctx, 0) };
    if observe {
        return PASS;
    }
    count(counter_slot, VERDICT_ERROR, Hook::Egress, ctx.len() as u64);
    DROP
}

#[inline(always)]
fn attempt(ctx: &SkBuffContext, packet: &Packet, config: &Config, socket: *mut SocketState) -> Attempt {
    Attempt {
        dest: packet.dst,
        port: packet.dst_port,
        protocol: packet.protocol,
        hook: Hook::Egress,
        bytes: ctx.len() as u64,
        cgroup_id: unsafe { bpf_skb_cgroup_id(ctx.skb.skb) },
        ctx: ctx.skb.skb.cast(),
        socket,
        // Asked only when flow statistics are kept: one table lookup per TCP packet.
        destination: config.flags & CONFIG_FLOW_STATS == 0
            || !(packet.protocol == PROTO_TCP && reply::is_tcp_reply(ctx, packet, socket)),
        dns_judges: false,
    }
}

#[inline(always)]
fn is_reply(ctx: &SkBuffContext, packet: &Packet, config: &Config, state: *const SocketState) -> bool {
    if packet.protocol == PROTO_UDP {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
        return reply::is_udp_reply(cookie, &packet.dst, packet.dst_port, config);
    }
    packet.protocol == PROTO_TCP && reply::is_tcp_reply(ctx, packet, state)
}

#[inline(always)]
fn verdict(pass: bool) -> i32 {
    if pass { PASS } else { DROP }
}
