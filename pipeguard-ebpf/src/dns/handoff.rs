//! What `pg_egress` already knows about a DNS packet, handed to `pg_dns_query` in the skb's
//! control buffer instead of being found again (a second ancestor walk, pod lookup, header
//! parse and trie lookup cost more than the rest of the query check).
//!
//! Why `__sk_buff.cb` is a safe channel: cgroup_skb programs may read and write its five
//! words, and for a program that touches them the kernel saves the skb's control buffer,
//! zeroes it, runs the program and restores it (`__bpf_prog_run_save_cb`), so within one
//! run, tail calls included, only the program itself writes it. It is per packet, so a
//! softirq that runs `pg_egress` for another packet on the same CPU cannot overwrite it (a
//! per-CPU map could be). `pg_dns_query` is reached only through `PG_DNS_EGRESS_V2`, which
//! only this `pg_egress` jumps through (V1 held a program that found everything again; an
//! old agent's `pg_egress` must never land in this one), and it still refuses a buffer
//! without the tag below: fail closed.

use aya_ebpf::{bindings::__sk_buff, programs::SkBuffContext};

use crate::{addr::Dest, packet::ETH_P_IP};

/// Upper half of `cb[4]`: written by `pg_egress`, nothing else puts it there by chance.
const TAG: u32 = 0x5047 << 16;
const TAG_MASK: u32 = 0xffff << 16;
const AUDIT: u32 = 1 << 8;
/// The pod's static allowlist allows the resolver (so its answers may teach).
const IP_ALLOWED: u32 = 1 << 9;
/// The pod is not DNS-filtered: the query is only read (report, names), never judged.
const OBSERVE: u32 = 1 << 10;
/// The packet comes from port 53: an answer leaving the pod.
const FROM_DNS_PORT: u32 = 1 << 11;
const PROTOCOL_MASK: u32 = 0xff;

/// A DNS packet of a DNS-filtered pod that the IP policy let through (or, `observe`, a
/// query of another guarded pod, to be read).
pub struct Handoff {
    pub pod_cgroup_id: u64,
    pub policy_id: u32,
    pub audit: bool,
    pub ip_allowed: bool,
    pub observe: bool,
    pub from_dns_port: bool,
    pub protocol: u8,
    /// Offset of the transport header.
    pub l4: usize,
    /// The resolver's port, host order.
    pub dst_port: u16,
}

impl Handoff {
    /// Written by `pg_egress` right before the tail call.
    #[inline(always)]
    pub fn write(&self, skb: *mut __sk_buff) {
        let mut bits = TAG | self.protocol as u32;
        if self.audit {
            bits |= AUDIT;
        }
        if self.ip_allowed {
            bits |= IP_ALLOWED;
        }
        if self.observe {
            bits |= OBSERVE;
        }
        if self.from_dns_port {
            bits |= FROM_DNS_PORT;
        }
        unsafe {
            (*skb).cb[0] = self.pod_cgroup_id as u32;
            (*skb).cb[1] = (self.pod_cgroup_id >> 32) as u32;
            (*skb).cb[2] = self.policy_id;
            (*skb).cb[3] = (self.l4 as u32) << 16 | self.dst_port as u32;
            (*skb).cb[4] = bits;
        }
    }

    /// Read by `pg_dns_query`; `None` if `pg_egress` did not write it.
    #[inline(always)]
    pub fn read(skb: *mut __sk_buff) -> Option<Handoff> {
        let cb = unsafe { (*skb).cb };
        let bits = cb[4];
        if bits & TAG_MASK != TAG {
            return None;
        }
        Some(Handoff {
            pod_cgroup_id: cb[0] as u64 | (cb[1] as u64) << 32,
            policy_id: cb[2],
            audit: bits & AUDIT != 0,
            ip_allowed: bits & IP_ALLOWED != 0,
            observe: bits & OBSERVE != 0,
            from_dns_port: bits & FROM_DNS_PORT != 0,
            protocol: (bits & PROTOCOL_MASK) as u8,
            l4: (cb[3] >> 16) as usize,
            dst_port: cb[3] as u16,
        })
    }

    /// The resolver's address, read from the IP header: only needed to remember a query
    /// or report a refusal, so only then worth a load.
    #[inline(always)]
    pub fn resolver(&self, ctx: &SkBuffContext) -> Result<Dest, ()> {
        // The header's family, not the address's: an IPv6 header may carry a mapped one.
        if u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16) == ETH_P_IP {
            let addr: [u8; 4] = ctx.load(16).map_err(|_| ())?;
            Ok(Dest::v4(u32::from_ne_bytes(addr)))
        } else {
            let addr: [u8; 16] = ctx.load(24).map_err(|_| ())?;
            Ok(Dest::from_v6_bytes(addr))
        }
    }
}
