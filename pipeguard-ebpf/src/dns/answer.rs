//! Ingress: an answer teaches the allowlist its A/AAAA addresses only if it answers a query
//! the egress hook let out (same socket, resolver address and port, query id and question),
//! and only once (the query is consumed). It runs before the socket is given the packet,
//! so an address is allowed before the job can read it. CNAME chains: the question decides.

use aya_ebpf::{
    helpers::generated::{bpf_get_socket_cookie, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    programs::SkBuffContext,
};
use pipeguard_common::{
    LEARNED_RULES, LearnedAddr, LearnedKey, LearnedRule, MAX_ANSWER_RECORDS, MAX_NAME_BYTES, MAX_TTL_S,
    NAME_SEEN, NameKey, QueryKey,
};

use super::{FLAG_RESPONSE, HEADER_BYTES, RCODE_MASK, header, message, name, queries};
use crate::{
    addr::Dest,
    maps::{DNS_CONFIG, DNS_LEARNED, DNS_NAME_TEXT, DNS_SEEN, SCRATCH_ANSWER},
    packet::Packet,
};

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;

/// Learns from a packet from port 53 to a DNS-filtered pod. Never changes the packet's
/// fate: an answer that teaches nothing is an answer like any other.
#[inline(always)]
pub fn learn(ctx: &SkBuffContext, t: &Packet) -> Result<(), ()> {
    let Some(msg) = message(ctx, t.protocol, t.l4)? else {
        return Ok(());
    };
    let (id, flags, questions, answers) = header(ctx, msg)?;
    if flags & FLAG_RESPONSE == 0 || questions != 1 {
        return Ok(());
    }
    let key = QueryKey {
        cookie: unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) },
        addr: t.src.addr,
        port: t.src_port,
        id,
        _pad: 0,
    };
    let Some((slot, query)) = queries::find(&key) else {
        return Ok(());
    };
    let name = name::read(ctx, msg + HEADER_BYTES, SCRATCH_ANSWER)?;
    if name.hash != query.question_hash || !name::undisturbed(&name) {
        return Ok(());
    }
    // Consumed: a replayed or duplicated answer finds nothing.
    queries::consume(slot);
    // Query slots live by the coarse clock (see `query`); learned addresses by the precise
    // one, which user space's sweep compares with CLOCK_MONOTONIC.
    if unsafe { bpf_ktime_get_coarse_ns() } > query.expires_ns || flags & RCODE_MASK != 0 {
        return Ok(());
    }
    let now = unsafe { bpf_ktime_get_ns() };
    remember_name(&name);
    let min_ttl = DNS_CONFIG.get(0).map(|c| c.min_ttl_s).unwrap_or(0);
    let mut offset = msg + HEADER_BYTES + name.wire_len() + 4;
    let mut record = 0;
    while record < MAX_ANSWER_RECORDS {
        if record >= answers as u32 {
            break;
        }
        offset = skip_name(ctx, offset)?;
        let rr: [u8; 10] = ctx.load(offset).map_err(|_| ())?;
        let rtype = u16::from_be_bytes([rr[0], rr[1]]);
        let class = u16::from_be_bytes([rr[2], rr[3]]);
        let ttl = u32::from_be_bytes([rr[4], rr[5], rr[6], rr[7]]);
        let rdlen = u16::from_be_bytes([rr[8], rr[9]]) as usize;
        offset += 10;
        let dest = if class == CLASS_IN && rtype == TYPE_A && rdlen == 4 {
            let a: [u8; 4] = ctx.load(offset).map_err(|_| ())?;
            Some(Dest::v4(u32::from_ne_bytes(a)))
        } else if class == CLASS_IN && rtype == TYPE_AAAA && rdlen == 16 {
            let a: [u8; 16] = ctx.load(offset).map_err(|_| ())?;
            Some(Dest::from_v6_bytes(a))
        } else {
            None
        };
        if let Some(dest) = dest {
            let mut ttl = if ttl < min_ttl { min_ttl } else { ttl };
            if ttl > MAX_TTL_S {
                ttl = MAX_TTL_S;
            }
            let held = LearnedRule {
                expires_ns: now + ttl as u64 * 1_000_000_000,
                name_hash: query.question_hash,
                rule: query.rule,
            };
            let key = LearnedKey {
                policy_id: query.rule.policy_id,
                addr: dest.addr,
            };
            // Names for learning go to a table of their own: they allow nothing, and never
            // push out an entry enforcement needs.
            let table = if query.rule.kind == NAME_SEEN {
                &DNS_SEEN
            } else {
                &DNS_LEARNED
            };
            match table.get_ptr_mut(&key) {
                Some(old) => {
                    if let Some(replacement) = unsafe { teach(old, &held) } {
                        let _ = table.insert(&key, &replacement, 0);
                    }
                }
                None => {
                    let mut entry = LearnedAddr::default();
                    entry.rules[0] = held;
                    let _ = table.insert(&key, &entry, 0);
                }
            }
        }
        offset += rdlen;
        record += 1;
    }
    Ok(())
}

/// Teaches a known address: a rule taught again has only its time and name moved, in place
/// (single stores a reader sees whole, old or new; an LRU update would take a new node per
/// answer). A new rule takes a free or expired place, else the one that expires first if
/// it expires before the new one: returned as the whole new value, for an LRU update.
#[inline(always)]
unsafe fn teach(old: *mut LearnedAddr, held: &LearnedRule) -> Option<LearnedAddr> {
    let mut victim = 0;
    let mut victim_expires = u64::MAX;
    let mut i = 0;
    while i < LEARNED_RULES {
        let place = unsafe { &mut (*old).rules[i] };
        if same_rule(&place.rule, &held.rule) {
            if place.expires_ns < held.expires_ns {
                unsafe {
                    core::ptr::write_volatile(&raw mut place.name_hash, held.name_hash);
                    core::ptr::write_volatile(&raw mut place.expires_ns, held.expires_ns);
                }
            }
            return None;
        }
        if place.expires_ns < victim_expires {
            victim = i;
            victim_expires = place.expires_ns;
        }
        i += 1;
    }
    // All of its rules outlive this one.
    if victim_expires >= held.expires_ns {
        return None;
    }
    let mut replacement = unsafe { *old };
    replacement.rules[victim & (LEARNED_RULES - 1)] = *held;
    Some(replacement)
}

/// Unused places are all zero: no rule has kind 0, so they never match.
#[inline(always)]
fn same_rule(a: &NameKey, b: &NameKey) -> bool {
    a.policy_id == b.policy_id && a.kind == b.kind && a.hash == b.hash
}

/// Labels walked in an answer record's name before the pointer or the end; resolvers
/// compress owner names to one pointer. A longer name stops the walk: what follows teaches
/// nothing (closed, not open).
const MAX_OWNER_LABELS: usize = 16;

/// Skips a name in an answer record: labels, ended by a zero byte or a compression pointer.
#[inline(always)]
fn skip_name(ctx: &SkBuffContext, mut offset: usize) -> Result<usize, ()> {
    let mut i = 0;
    while i < MAX_OWNER_LABELS {
        let len: u8 = ctx.load(offset).map_err(|_| ())?;
        if len == 0 {
            return Ok(offset + 1);
        }
        if len & 0xc0 == 0xc0 {
            return Ok(offset + 2);
        }
        if len > 63 {
            return Err(());
        }
        offset += len as usize + 1;
        i += 1;
    }
    Err(())
}

/// Puts the question's text into the name table, for events and summaries.
#[inline(always)]
fn remember_name(name: &name::Name) {
    if unsafe { DNS_NAME_TEXT.get(&name.hash) }.is_some() {
        return;
    }
    let s = unsafe { &mut *name.scratch };
    let len = name::opaque(s, if name.end == 0 { 0 } else { name.end - 1 });
    let mut i = 0;
    while i < MAX_NAME_BYTES - 1 {
        if i >= len {
            break;
        }
        s.text.name[i & (MAX_NAME_BYTES - 1)] = s.event.name[(1 + i) & (2 * MAX_NAME_BYTES - 1)];
        i += 1;
    }
    s.text.len = i as u32;
    let _ = DNS_NAME_TEXT.insert(&name.hash, &s.text, 0);
}
