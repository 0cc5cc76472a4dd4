//! Egress: a DNS query from a DNS-filtered pod leaves only if a name rule of its allowlist
//! allows the question. Allowed queries to a resolver the pod's IP policy allows are
//! remembered, so their answers (and only those) may teach addresses.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    },
    programs::SkBuffContext,
};
use pipeguard_common::{
    DNS_EVENT_MALFORMED, DnsEvent, Hook, MODE_AUDIT, QUERY_TIMEOUT_NS, QueryKey, QueryState, VERDICT_ALLOW,
    VERDICT_AUDIT, VERDICT_DENY, VERDICT_ERROR,
};

use super::{FLAG_RESPONSE, HEADER_BYTES, OPCODE_MASK, header, message, name, queries};
use crate::{
    maps::{DNS_SCRATCH, EVENTS, SCRATCH_QUERY},
    packet::Packet,
    pod::Pod,
    verdict::{Attempt, allowed, count, count_event_drop},
};

enum Outcome {
    /// Not a DNS message (a TCP segment without data).
    NoData,
    Allowed,
    /// (qtype, the name is in the scratch buffer up to `end`)
    Refused {
        qtype: u16,
        end: usize,
    },
}

/// Whether a packet to port 53 of a DNS-filtered pod may leave.
#[inline(always)]
pub fn check(ctx: &SkBuffContext, pod: &Pod, t: &Packet, cgroup_id: u64) -> bool {
    let audit = pod.entry.mode == MODE_AUDIT;
    // Only a resolver the pod's IP policy allows (not merely audited, not a reply) may
    // teach it addresses: a job's own "resolver" teaches nothing.
    let resolver = Attempt {
        dest: t.dst,
        port: t.dst_port,
        protocol: t.protocol,
        hook: Hook::Dns,
        bytes: 0,
        cgroup_id,
        ctx: ctx.skb.skb.cast(),
    };
    let ip_allowed = allowed(pod.entry.policy_id, &resolver);
    let bytes = ctx.len() as u64;
    match inspect(ctx, pod, t, ip_allowed) {
        Ok(Outcome::NoData) => true,
        Ok(Outcome::Allowed) => {
            count(pod.cgroup_id, VERDICT_ALLOW, Hook::Dns, bytes);
            true
        }
        outcome => {
            // Fail closed: a query that cannot be read cannot be allowed.
            let (qtype, end, flags, counted) = match outcome {
                Ok(Outcome::Refused { qtype, end }) => (qtype, end, 0, None),
                _ => (0, 0, DNS_EVENT_MALFORMED, Some(VERDICT_ERROR)),
            };
            let verdict = if audit { VERDICT_AUDIT } else { VERDICT_DENY };
            count(pod.cgroup_id, counted.unwrap_or(verdict), Hook::Dns, bytes);
            emit(pod, t, cgroup_id, verdict, qtype, end as u16, flags);
            audit
        }
    }
}

#[inline(always)]
fn inspect(ctx: &SkBuffContext, pod: &Pod, t: &Packet, ip_allowed: bool) -> Result<Outcome, ()> {
    let Some(msg) = message(ctx, t)? else {
        return Ok(Outcome::NoData);
    };
    let (id, flags, questions, _) = header(ctx, msg)?;
    // Only standard queries with one question: responses, NOTIFY, UPDATE and friends
    // could carry anything to the resolver.
    if flags & FLAG_RESPONSE != 0 || flags & OPCODE_MASK != 0 || questions != 1 {
        return Err(());
    }
    let (name, allowed) = name::check(ctx, msg + HEADER_BYTES, pod.entry.policy_id)?;
    let qtype = u16::from_be(
        ctx.load::<u16>(msg + HEADER_BYTES + name.wire_len())
            .map_err(|_| ())?,
    );
    let Some(allowed) = allowed else {
        return Ok(Outcome::Refused { qtype, end: name.end });
    };
    // A rule without ports (the cluster domain) lets the query out but teaches nothing.
    let teaches = unsafe { (*allowed.rule).ports.flags != 0 || (*allowed.rule).ports.count != 0 };
    if ip_allowed && teaches {
        let key = QueryKey {
            cookie: unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) },
            addr: t.dst.addr,
            port: t.dst_port,
            id,
            _pad: 0,
        };
        let now = unsafe { bpf_ktime_get_ns() };
        let state = QueryState {
            question_hash: name.hash,
            expires_ns: now + QUERY_TIMEOUT_NS,
            rule: allowed.key,
        };
        // Never fails for lack of room. Should the slot be overwritten before the answer,
        // the answer teaches nothing and the connection is refused: closed, not open.
        queries::record(&key, &state, now);
    }
    Ok(Outcome::Allowed)
}

/// The event of a refused query, with its name (`name_len` bytes of dotted name with a
/// leading dot, left in the scratch record by the parser; 0 when it could not be parsed).
#[inline(always)]
fn emit(pod: &Pod, t: &Packet, cgroup_id: u64, verdict: u8, qtype: u16, name_len: u16, flags: u32) {
    let Some(scratch) = DNS_SCRATCH.get_ptr_mut(SCRATCH_QUERY) else {
        count_event_drop();
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    // The scratch buffer is the record: the parser left the name in it.
    unsafe {
        let record = &raw mut (*scratch).event;
        let e = &raw mut (*record).event;
        (*e).timestamp_ns = bpf_ktime_get_ns();
        (*e).cgroup_id = cgroup_id;
        (*e).pod_cgroup_id = pod.cgroup_id;
        (*e).addr = t.dst.addr;
        (*e).pid = pid_tgid as u32;
        (*e).tgid = (pid_tgid >> 32) as u32;
        (*e).comm = bpf_get_current_comm().unwrap_or_default();
        (*e).policy_id = pod.entry.policy_id;
        (*e).flags = flags;
        (*e).port = t.dst_port;
        (*e).protocol = t.protocol;
        (*e).family = if t.dst.is_v4 { 4 } else { 6 };
        (*e).hook = Hook::Dns as u8;
        (*e).verdict = verdict;
        (*e).sock_type = 0;
        (*e)._pad = 0;
        (*e).name_hash = 0;
        (*record).qtype = qtype;
        (*record)._pad = 0;
        (*record).name_len = name_len;
        if EVENTS.output::<DnsEvent>(&*record, 0).is_err() {
            count_event_drop();
        }
    }
}
