//! connect4/6 and sendmsg4/6. connect refuses with EPERM, so the job sees an immediate
//! error instead of a SYN timeout (TCP Fast Open's implicit connect passes here too).
//! Unconnected UDP (sendto, sendmsg, sendmmsg) names its destination per call and only
//! passes sendmsg4/6.

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use pipeguard_common::{Hook, PROTO_UDP, VERDICT_ALLOW};

use crate::{
    addr::Dest,
    fast, owner, reply,
    verdict::{self, Attempt, check},
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn pg_connect4(ctx: SockAddrContext) -> i32 {
    decide(ctx, Hook::Connect4)
}

#[cgroup_sock_addr(connect6)]
pub fn pg_connect6(ctx: SockAddrContext) -> i32 {
    decide(ctx, Hook::Connect6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn pg_sendmsg4(ctx: SockAddrContext) -> i32 {
    decide(ctx, Hook::Sendmsg4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn pg_sendmsg6(ctx: SockAddrContext) -> i32 {
    decide(ctx, Hook::Sendmsg6)
}

#[inline(always)]
fn decide(ctx: SockAddrContext, hook: Hook) -> i32 {
    let sa = ctx.sock_addr;
    // Context fields must be read with exactly-sized loads; the verifier rewrites them.
    let (dest, port, protocol) = unsafe {
        let dest = match hook {
            Hook::Connect6 | Hook::Sendmsg6 => Dest::v6([
                read_volatile(addr_of!((*sa).user_ip6[0])),
                read_volatile(addr_of!((*sa).user_ip6[1])),
                read_volatile(addr_of!((*sa).user_ip6[2])),
                read_volatile(addr_of!((*sa).user_ip6[3])),
            ]),
            _ => Dest::v4(read_volatile(addr_of!((*sa).user_ip4))),
        };
        let port = read_volatile(addr_of!((*sa).user_port));
        let protocol = read_volatile(addr_of!((*sa).protocol));
        let bound_ip4 = read_volatile(addr_of!((*(*sa).__bindgen_anon_1.sk).src_ip4));
        (kernel_destination(dest, bound_ip4), port, protocol)
    };
    let port = u16::from_be(port as u16);
    let protocol = protocol as u8;
    let state = owner::state(&ctx);
    let config = verdict::config();
    if let Some(pod) = fast::remembered(state, &config, &dest, port, protocol, false) {
        // The same destination this socket's pod was allowed under this generation.
        verdict::count(pod.counter_slot, VERDICT_ALLOW, hook, 0);
        return ALLOW;
    }
    let (pod, cgroup_id) = owner::of_state(state);
    let attempt = Attempt {
        dest,
        port,
        protocol,
        hook,
        bytes: 0,
        cgroup_id,
        ctx: sa.cast(),
        socket: state,
        destination: true,
        dns_judges: false,
    };
    // A UDP socket may answer (sendto, or connect then send) a peer it received from.
    let is_reply = |config: &_| {
        attempt.protocol == PROTO_UDP
            && reply::is_udp_reply(
                unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) },
                &attempt.dest,
                attempt.port,
                config,
            )
    };
    let judged = check(&attempt, pod, is_reply);
    // Only a socket `pg_sock_create` recorded remembers: its state names the pod that judged.
    fast::remember(state, &judged, &attempt);
    if judged.pass { ALLOW } else { DENY }
}

/// The destination the kernel will use: connecting or sending to the unspecified address
/// (0.0.0.0, ::) goes to the socket's own bound IPv4 address, or else to loopback
/// (127.0.0.1, ::1). Judging and reporting that address, not the one the caller wrote,
/// keeps the verdict and the event true (and an `except` of 127.0.0.0/8 honest).
#[inline(always)]
fn kernel_destination(dest: Dest, bound_ip4: u32) -> Dest {
    if dest.is_v4 {
        if dest.v4_bytes() != [0; 4] {
            return dest;
        }
        return Dest::v4(if bound_ip4 != 0 {
            bound_ip4
        } else {
            u32::from_ne_bytes([127, 0, 0, 1])
        });
    }
    if dest.addr != [0; 16] {
        return dest;
    }
    let mut loopback = [0u8; 16];
    loopback[15] = 1;
    Dest::from_v6_bytes(loopback)
}
