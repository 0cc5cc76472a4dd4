//! Egress: a DNS query from a DNS-filtered pod leaves only if a name rule of its allowlist
//! allows the question. Allowed queries to a resolver the pod's IP policy allows are
//! remembered, so their answers (and only those) may teach addresses. Those a wildcard
//! rule allows may be reported to user space (`report`). Queries of other guarded pods are
//! only read (`observe`): reported, and recorded so their answers name addresses.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{bpf_get_socket_cookie, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_skb_cgroup_id},
    },
    programs::SkBuffContext,
};
use pipeguard_common::{
    DNS_EVENT_MALFORMED, DNS_LEARN_NAMES, DnsEvent, Hook, NAME_SEEN, NAME_WILDCARD, NameKey,
    QUERY_TIMEOUT_NS, QueryKey, QueryState, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY, VERDICT_ERROR,
};

use super::{
    FLAG_RESPONSE, HEADER_BYTES, OPCODE_MASK, handoff::Handoff, header, message, name, queries, report,
};
use crate::{
    addr::Dest,
    maps::{DNS_SCRATCH, EVENTS, SCRATCH_QUERY},
    verdict::{count_event_drop, count_for_pod},
};

enum Outcome {
    /// Not a DNS message (a TCP segment without data).
    NoData,
    /// `report`: (qtype, the name's end in the scratch buffer) when the query is reported.
    Allowed { report: Option<(u16, usize)> },
    /// (qtype, the name is in the scratch buffer up to `end`)
    Refused { qtype: u16, end: usize },
}

/// Whether a packet to port 53 of a DNS-filtered pod may leave.
#[inline(always)]
pub fn check(ctx: &SkBuffContext, h: &Handoff) -> bool {
    let bytes = ctx.len() as u64;
    match inspect(ctx, h) {
        Ok(Outcome::NoData) => {
            // No query in it (a TCP handshake or ACK): counted as the packet it is.
            count_for_pod(h.pod_cgroup_id, VERDICT_ALLOW, Hook::Egress, bytes);
            true
        }
        Ok(Outcome::Allowed { report }) => {
            count_for_pod(h.pod_cgroup_id, VERDICT_ALLOW, Hook::Dns, bytes);
            if let Some((qtype, end)) = report {
                emit(ctx, h, VERDICT_ALLOW, qtype, end as u16, 0);
            }
            true
        }
        outcome => {
            // Fail closed: a query that cannot be read cannot be allowed.
            let (qtype, end, flags, counted) = match outcome {
                Ok(Outcome::Refused { qtype, end }) => (qtype, end, 0, None),
                _ => (0, 0, DNS_EVENT_MALFORMED, Some(VERDICT_ERROR)),
            };
            let verdict = if h.audit { VERDICT_AUDIT } else { VERDICT_DENY };
            count_for_pod(h.pod_cgroup_id, counted.unwrap_or(verdict), Hook::Dns, bytes);
            emit(ctx, h, verdict, qtype, end as u16, flags);
            h.audit
        }
    }
}

#[inline(always)]
fn inspect(ctx: &SkBuffContext, h: &Handoff) -> Result<Outcome, ()> {
    let Some(msg) = message(ctx, h.protocol, h.l4)? else {
        return Ok(Outcome::NoData);
    };
    let (id, flags, questions, _) = header(ctx, msg)?;
    // Only standard queries with one question: responses, NOTIFY, UPDATE and friends
    // could carry anything to the resolver.
    if flags & FLAG_RESPONSE != 0 || flags & OPCODE_MASK != 0 || questions != 1 {
        return Err(());
    }
    let (name, allowed) = name::check(ctx, msg + HEADER_BYTES, h.policy_id)?;
    let qtype = name.qtype.ok_or(())?;
    let Some(allowed) = allowed else {
        return Ok(Outcome::Refused { qtype, end: name.end });
    };
    // A rule without ports (the cluster domain) lets the query out but teaches nothing.
    // Only a resolver the pod's IP policy allows (not merely audited, not a reply) may
    // teach it addresses: a job's own "resolver" teaches nothing.
    let teaches = unsafe { (*allowed.rule).ports.flags != 0 || (*allowed.rule).ports.count != 0 };
    if h.ip_allowed && teaches {
        // Never fails for lack of room. Should the slot be overwritten before the answer,
        // the answer teaches nothing and the connection is refused: closed, not open.
        remember(ctx, h, id, name.hash, allowed.key, true)?;
    }
    // Rules without ports are the cluster domain's: its names are answered inside the
    // cluster. The report reads the name from the scratch buffer, so only while it holds it.
    let report = allowed.key.kind == NAME_WILDCARD
        && teaches
        && report::enabled()
        && name::undisturbed(&name)
        && report::due(h.pod_cgroup_id, name.hash);
    Ok(Outcome::Allowed {
        report: report.then_some((qtype, name.end)),
    })
}

/// A query of a guarded pod that is not DNS-filtered, which its IP policy let through: its
/// name is reported (`report`), never judged, and while names are learned its answer may
/// name the addresses it carries (a `NAME_SEEN` rule: no allow). One the parser cannot read
/// as one plain question goes unreported (a DNS-filtered pod's would be refused).
#[inline(always)]
pub fn observe(ctx: &SkBuffContext, h: &Handoff) {
    let Ok(Some(msg)) = message(ctx, h.protocol, h.l4) else {
        return;
    };
    let Ok((id, flags, questions, _)) = header(ctx, msg) else {
        return;
    };
    if flags & FLAG_RESPONSE != 0 || flags & OPCODE_MASK != 0 || questions != 1 {
        return;
    }
    let Ok(name) = name::read(ctx, msg + HEADER_BYTES, SCRATCH_QUERY) else {
        return;
    };
    let Some(qtype) = name.qtype else {
        return;
    };
    if super::config_flags() & DNS_LEARN_NAMES != 0 {
        let seen = NameKey {
            policy_id: h.policy_id,
            kind: NAME_SEEN,
            hash: 0,
        };
        // Only into a free slot: names for learning never push out a query whose answer
        // must teach a DNS-filtered pod's allowlist.
        let _ = remember(ctx, h, id, name.hash, seen, false);
    }
    if report::enabled() && name::undisturbed(&name) && report::due(h.pod_cgroup_id, name.hash) {
        emit(ctx, h, VERDICT_ALLOW, qtype, name.end as u16, 0);
    }
}

/// Records the query for its answer (`queries`): the same socket, resolver, port, id and
/// question find it, and teach under `rule`.
#[inline(always)]
fn remember(
    ctx: &SkBuffContext,
    h: &Handoff,
    id: u16,
    question_hash: u64,
    rule: NameKey,
    overwrite: bool,
) -> Result<(), ()> {
    let key = QueryKey {
        cookie: unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) },
        addr: h.resolver(ctx)?.addr,
        port: h.dst_port,
        id,
        _pad: 0,
    };
    // Query slots live by the coarse clock (a tick's precision on a 30 s timeout): it costs
    // a load where the precise one reads the TSC (~20 ns in a VM).
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let state = QueryState {
        question_hash,
        expires_ns: now + QUERY_TIMEOUT_NS,
        rule,
    };
    queries::record(&key, &state, now, overwrite);
    Ok(())
}

/// The event of a refused (or reported) query, with its name (`name_len` bytes of dotted
/// name with a leading dot, left in the scratch record by the parser; 0 when it could not
/// be parsed).
#[inline(always)]
fn emit(ctx: &SkBuffContext, h: &Handoff, verdict: u8, qtype: u16, name_len: u16, flags: u32) {
    // An unreadable address is reported as ::, not left out: the refusal is what counts.
    let resolver = h.resolver(ctx).unwrap_or(Dest {
        addr: [0; 16],
        is_v4: false,
    });
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
        (*e).cgroup_id = bpf_skb_cgroup_id(ctx.skb.skb);
        (*e).pod_cgroup_id = h.pod_cgroup_id;
        (*e).addr = resolver.addr;
        (*e).pid = pid_tgid as u32;
        (*e).tgid = (pid_tgid >> 32) as u32;
        (*e).comm = bpf_get_current_comm().unwrap_or_default();
        (*e).policy_id = h.policy_id;
        (*e).flags = flags;
        (*e).port = h.dst_port;
        (*e).protocol = h.protocol;
        (*e).family = if resolver.is_v4 { 4 } else { 6 };
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
