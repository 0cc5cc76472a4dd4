//! The IP and transport headers of a packet at a cgroup_skb hook (the skb starts at the IP
//! header there), for both directions.

use aya_ebpf::programs::SkBuffContext;
use pipeguard_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use crate::addr::Dest;

pub const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// IPv6 extension headers walked before giving up on finding the transport header.
const MAX_EXT_HEADERS: usize = 4;

pub struct Packet {
    pub src: Dest,
    pub dst: Dest,
    pub protocol: u8,
    /// Offset of the transport header.
    pub l4: usize,
    /// Host byte order; 0 for protocols without ports and for non-first fragments, which
    /// carry no transport header (judged as port 0: only a rule without ports allows them).
    pub src_port: u16,
    pub dst_port: u16,
}

#[inline(always)]
pub fn parse(ctx: &SkBuffContext) -> Result<Packet, ()> {
    let proto = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    let (src, dst, protocol, l4, first_fragment) = match proto {
        ETH_P_IP => parse_v4(ctx)?,
        ETH_P_IPV6 => parse_v6(ctx)?,
        // Neither IPv4 nor IPv6 cannot pass an IP cgroup hook; nothing to judge.
        _ => return Err(()),
    };
    let (src_port, dst_port) = if first_fragment && matches!(protocol, PROTO_TCP | PROTO_UDP | PROTO_SCTP) {
        let ports: [u8; 4] = ctx.load(l4).map_err(|_| ())?;
        (
            u16::from_be_bytes([ports[0], ports[1]]),
            u16::from_be_bytes([ports[2], ports[3]]),
        )
    } else {
        (0, 0)
    };
    Ok(Packet {
        src,
        dst,
        protocol,
        l4,
        src_port,
        dst_port,
    })
}

/// (source, destination, protocol, transport header offset, is first fragment)
#[inline(always)]
fn parse_v4(ctx: &SkBuffContext) -> Result<(Dest, Dest, u8, usize, bool), ()> {
    let hdr: [u8; 20] = ctx.load(0).map_err(|_| ())?;
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(());
    }
    let frag_offset = u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff;
    let saddr = u32::from_ne_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);
    let daddr = u32::from_ne_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]);
    Ok((Dest::v4(saddr), Dest::v4(daddr), hdr[9], ihl, frag_offset == 0))
}

#[inline(always)]
fn parse_v6(ctx: &SkBuffContext) -> Result<(Dest, Dest, u8, usize, bool), ()> {
    let hdr: [u8; 40] = ctx.load(0).map_err(|_| ())?;
    let mut saddr = [0u8; 16];
    saddr.copy_from_slice(&hdr[8..24]);
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
    Ok((
        Dest::from_v6_bytes(saddr),
        Dest::from_v6_bytes(daddr),
        next,
        offset,
        first_fragment,
    ))
}
