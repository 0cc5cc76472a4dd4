//! cgroup_skb egress: every IP packet that leaves a guarded pod. The backstop for what the
//! socket hooks cannot see: raw sockets, ICMP, and packets of connections opened before a
//! policy change (revocation takes effect on the next packet). Also the per-pod counters.

use aya_ebpf::{helpers::generated::bpf_skb_cgroup_id, macros::cgroup_skb, programs::SkBuffContext};
use pipeguard_common::{Hook, PROTO_SCTP, PROTO_TCP, PROTO_UDP, VERDICT_ERROR};

use crate::{
    addr::Dest,
    pod,
    verdict::{Attempt, check, count},
};

const PASS: i32 = 1;
const DROP: i32 = 0;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// IPv6 extension headers walked before giving up on finding the transport header.
const MAX_EXT_HEADERS: usize = 4;

#[cgroup_skb(egress)]
pub fn pg_egress(ctx: SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    let Some(pod) = pod::of_skb(skb) else {
        // Not a guarded pod: only the unknown-pod policy applies.
        return match parse(&ctx) {
            Ok(attempt) => verdict(check(&attempt, None)),
            Err(()) => PASS,
        };
    };
    match parse(&ctx) {
        Ok(attempt) => verdict(check(&attempt, Some(pod))),
        Err(()) => {
            // Unparseable packet from a guarded pod: never let "something broke" mean allow.
            count(pod.cgroup_id, VERDICT_ERROR, Hook::Egress, ctx.len() as u64);
            DROP
        }
    }
}

#[inline(always)]
fn verdict(pass: bool) -> i32 {
    if pass { PASS } else { DROP }
}

#[inline(always)]
fn parse(ctx: &SkBuffContext) -> Result<Attempt, ()> {
    let proto = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    let (dest, protocol, l4, first_fragment) = match proto {
        ETH_P_IP => parse_v4(ctx)?,
        ETH_P_IPV6 => parse_v6(ctx)?,
        // Neither IPv4 nor IPv6 cannot leave through an IP cgroup hook; nothing to judge.
        _ => return Err(()),
    };
    // Non-first fragments carry no transport header: they are judged as port 0, which
    // only a rule without ports allows.
    let port = if first_fragment && matches!(protocol, PROTO_TCP | PROTO_UDP | PROTO_SCTP) {
        u16::from_be(ctx.load::<u16>(l4 + 2).map_err(|_| ())?)
    } else {
        0
    };
    Ok(Attempt {
        dest,
        port,
        protocol,
        hook: Hook::Egress,
        bytes: ctx.len() as u64,
        cgroup_id: unsafe { bpf_skb_cgroup_id(ctx.skb.skb) },
    })
}

/// (destination, protocol, transport header offset, is first fragment)
#[inline(always)]
fn parse_v4(ctx: &SkBuffContext) -> Result<(Dest, u8, usize, bool), ()> {
    let hdr: [u8; 20] = ctx.load(0).map_err(|_| ())?;
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(());
    }
    let frag_offset = u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff;
    let daddr = u32::from_ne_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]);
    Ok((Dest::v4(daddr), hdr[9], ihl, frag_offset == 0))
}

#[inline(always)]
fn parse_v6(ctx: &SkBuffContext) -> Result<(Dest, u8, usize, bool), ()> {
    let hdr: [u8; 40] = ctx.load(0).map_err(|_| ())?;
    let mut daddr = [0u8; 16];
    daddr.copy_from_slice(&hdr[24..40]);
    let mut next = hdr[6];
    let mut offset = 40usize;
    let mut first_fragment = true;
    let mut i = 0;
    while i < MAX_EXT_HEADERS {
        match next {
            // hop-by-hop, routing, destination options: {next, len in 8-octet units - 1}
            0 | 43 | 60 => {
                let ext: [u8; 2] = ctx.load(offset).map_err(|_| ())?;
                next = ext[0];
                offset += (ext[1] as usize + 1) * 8;
            }
            // fragment: {next, reserved, offset<<3 | flags}
            44 => {
                let frag: [u8; 4] = ctx.load(offset).map_err(|_| ())?;
                next = frag[0];
                first_fragment = u16::from_be_bytes([frag[2], frag[3]]) >> 3 == 0;
                offset += 8;
            }
            _ => break,
        }
        i += 1;
    }
    Ok((Dest::from_v6_bytes(daddr), next, offset, first_fragment))
}
