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
        let ports = match direct::<Ports>(ctx, l4) {
            Some(ports) => unsafe { *ports },
            None => ctx.load(l4).map_err(|_| ())?,
        };
        (u16::from_be(ports.src), u16::from_be(ports.dst))
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

/// The flags byte of a TCP packet's header; 0 (no flag) when it cannot be read.
#[inline(always)]
pub fn tcp_flags(ctx: &SkBuffContext, packet: &Packet) -> u8 {
    const FLAGS_OFFSET: usize = 13;
    let at = packet.l4 + FLAGS_OFFSET;
    match direct::<u8>(ctx, at) {
        Some(flags) => unsafe { *flags },
        None => ctx.load(at).unwrap_or(0),
    }
}

/// The IP protocol of the packet (IPv6: its first next header, which an extension header
/// may stand in for); 0 when the header is not in the linear data.
#[inline(always)]
pub fn ip_protocol(ctx: &SkBuffContext) -> u8 {
    const V4_PROTOCOL: usize = 9;
    const V6_NEXT_HEADER: usize = 6;
    let offset = if u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16) == ETH_P_IP {
        V4_PROTOCOL
    } else {
        V6_NEXT_HEADER
    };
    direct::<u8>(ctx, offset).map_or(0, |p| unsafe { *p })
}

/// (source, destination, protocol, transport header offset, is first fragment)
#[inline(always)]
fn parse_v4(ctx: &SkBuffContext) -> Result<(Dest, Dest, u8, usize, bool), ()> {
    let hdr = match direct::<Ipv4Header>(ctx, 0) {
        Some(hdr) => unsafe { *hdr },
        None => ctx.load(0).map_err(|_| ())?,
    };
    let ihl = ((hdr.version_ihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(());
    }
    let frag_offset = u16::from_be(hdr.frag) & 0x1fff;
    Ok((
        Dest::v4(hdr.saddr),
        Dest::v4(hdr.daddr),
        hdr.protocol,
        ihl,
        frag_offset == 0,
    ))
}

#[inline(always)]
fn parse_v6(ctx: &SkBuffContext) -> Result<(Dest, Dest, u8, usize, bool), ()> {
    let hdr = match direct::<Ipv6Header>(ctx, 0) {
        Some(hdr) => unsafe { *hdr },
        None => ctx.load(0).map_err(|_| ())?,
    };
    let saddr = Dest::v6(hdr.saddr);
    let daddr = Dest::v6(hdr.daddr);
    let mut next = hdr.next_header;
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
    Ok((saddr, daddr, next, offset, first_fragment))
}

/// The header at `offset`, read in place (direct packet access: no helper call, no copy)
/// when the skb's linear part holds it; `None` sends the caller to `bpf_skb_load_bytes`.
/// Reads may be unaligned, as in C programs' `struct iphdr *` reads; the verifier allows
/// that on architectures with efficient unaligned access (x86-64, arm64).
#[inline(always)]
fn direct<T>(ctx: &SkBuffContext, offset: usize) -> Option<*const T> {
    let (data, end) = unsafe { ((*ctx.skb.skb).data as usize, (*ctx.skb.skb).data_end as usize) };
    let start = data + offset;
    if start + core::mem::size_of::<T>() > end {
        return None;
    }
    Some(start as *const T)
}

/// The fields of an IPv4 header the hooks read; the rest is padding. Fields in network
/// order, as the packet holds them.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Header {
    version_ihl: u8,
    _tos: u8,
    _total_len: u16,
    _id: u16,
    frag: u16,
    _ttl: u8,
    protocol: u8,
    _check: u16,
    saddr: u32,
    daddr: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Header {
    _version_flow: u32,
    _payload_len: u16,
    next_header: u8,
    _hop_limit: u8,
    saddr: [u32; 4],
    daddr: [u32; 4],
}

/// The first four bytes of a TCP, UDP or SCTP header.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ports {
    src: u16,
    dst: u16,
}
