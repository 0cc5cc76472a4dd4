//! cgroup_skb ingress: every IP packet a socket of a guarded pod receives. New inbound
//! connections and datagrams of ingress-isolated pods are judged here (`ingress_policy`);
//! what passes is learned from: UDP peers the pod may answer (`reply`), and DNS answers
//! (`pg_dns_answer`). A failure to learn never opens anything: it only means a reply is
//! judged as new egress.

use aya_ebpf::{
    bindings::BPF_TCP_LISTEN, helpers::generated::bpf_get_socket_cookie, macros::cgroup_skb,
    programs::SkBuffContext,
};
use core::ptr::null_mut;

use pipeguard_common::{Config, Hook, POD_INGRESS_ISOLATED, PROTO_TCP, SocketState, VERDICT_ERROR};

use crate::{
    dns, fast, ingress_policy, listener,
    maps::DNS_INGRESS,
    packet::{self, Packet},
    pod::{self, Pod},
    reply,
    verdict::{config, count},
};

const PASS: i32 = 1;
const DROP: i32 = 0;

#[cgroup_skb(ingress)]
pub fn pg_ingress(ctx: SkBuffContext) -> i32 {
    // Most received packets belong to a connected TCP socket: nothing to judge or learn, so
    // they pass before the packet is parsed (3 of the 5 packets of a short inbound connection).
    let receiver = ingress_policy::receiver(&ctx);
    if receiver
        .as_ref()
        .is_some_and(|r| r.is_connected_tcp() && r.peer_port != dns::DNS_PORT)
    {
        return PASS;
    }
    let socket = receiver.map(|r| r.state);
    let parsed = packet::parse(&ctx);
    let config = config();
    // Before the pod lookup (see `reply::note_handshake`, `listener`).
    let generation = fast::generation();
    let record = if socket == Some(BPF_TCP_LISTEN) {
        // A listener is a socket: no need to ask `fast::of_skb` (the verifier also refuses a
        // second read of the context's socket here).
        fast::by_cookie(unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) })
    } else {
        null_mut()
    };
    // Each pod found has its own branch: merging them into one `Option` lets LLVM spill the
    // uninitialized payload of `None`, which the verifier rejects.
    match listener::pod(record, generation) {
        // Only a record that holds the pod's entry keeps the sources it admitted.
        Some(pod) => judge(&ctx, parsed, socket, &pod, &config, record, generation),
        None => match walk(&ctx, record, generation) {
            Some(pod) => judge(&ctx, parsed, socket, &pod, &config, null_mut(), generation),
            None => match parsed {
                Ok(packet) => {
                    // So its accepted connection is spared a record (see
                    // `reply::mark_accepted`).
                    if packet.protocol == PROTO_TCP {
                        reply::note_handshake(&packet, None, generation);
                    }
                    learn(&ctx, &packet, &config, None)
                }
                Err(()) => PASS,
            },
        },
    }
}

/// A packet for a socket of `pod` (`listener`: see `ingress_policy::admits`).
#[inline(always)]
fn judge(
    ctx: &SkBuffContext,
    parsed: Result<Packet, ()>,
    socket: Option<u32>,
    pod: &Pod,
    config: &Config,
    listener: *mut SocketState,
    generation: u64,
) -> i32 {
    match parsed {
        Ok(packet) => {
            if !ingress_policy::admits(ctx, &packet, socket, pod, config, listener, generation) {
                return DROP;
            }
            // A listener's handshake packet (or DNS over TCP, which no new connection
            // matches).
            if packet.protocol == PROTO_TCP {
                reply::note_handshake(&packet, Some(pod), generation);
            }
            learn(ctx, &packet, config, Some(pod))
        }
        Err(()) if pod.entry.flags & POD_INGRESS_ISOLATED != 0 => {
            // What cannot be read cannot be admitted to an isolated pod.
            count(
                pod.entry.counter_slot,
                VERDICT_ERROR,
                Hook::Ingress,
                ctx.len() as u64,
            );
            DROP
        }
        Err(()) => PASS,
    }
}

/// The pod of the receiving socket, up the cgroup tree; a listener's record (`record`,
/// null: none) keeps its entry (`listener`).
#[inline(always)]
fn walk(ctx: &SkBuffContext, record: *mut SocketState, generation: u64) -> Option<Pod> {
    let pod = pod::of_skb(ctx.skb.skb)?;
    listener::remember(record, &pod, generation);
    Some(pod)
}

#[inline(always)]
fn learn(ctx: &SkBuffContext, packet: &Packet, config: &Config, pod: Option<&Pod>) -> i32 {
    reply::learn(ctx, packet, config, pod);
    // A DNS answer to a DNS-filtered pod (or any guarded pod while names are learned):
    // `pg_dns_answer` learns from it (its own program, for its own stack). Should the tail
    // call fail, nothing is learned: closed, not open.
    if pod.is_some_and(|pod| dns::is_answer_read(pod.entry.flags, packet)) {
        unsafe { DNS_INGRESS.tail_call(ctx, 0) };
    }
    PASS
}
