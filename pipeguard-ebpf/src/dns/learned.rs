//! Enforcement with learned addresses: after the static trie, a DNS-filtered pod may reach
//! an address an allowed answer taught its allowlist, on the ports of a rule that allowed
//! a question answered with it, while that rule's hold on the address lives. A socket that
//! reached it then keeps reaching it after expiry (its `LearnedPass`, in the socket's own
//! record, which lives and goes with the socket: see `owner`); new ones are refused.
//!
//! An allow by the socket's pass depends, like a static allow, only on the allowlist (the
//! rule's ports) and the destination: the socket may remember it for the fast path, so the
//! packets of a connection to a named host skip the pod walk and these lookups.

use core::{mem::MaybeUninit, ptr::addr_of_mut};

use aya_ebpf::helpers::generated::bpf_ktime_get_ns;
use pipeguard_common::{LEARNED_RULES, LearnedKey, LearnedPass, NameKey, SocketState};

use crate::{
    maps::{DNS_LEARNED, DNS_NAMES},
    verdict::Attempt,
    zeroed,
};

pub struct Verdict {
    pub allowed: bool,
    /// The name the address was learned from; 0 when it was not learned.
    pub name_hash: u64,
    /// Allowed with the socket holding a pass for exactly this attempt: as lasting as a
    /// static allow (see `fast`).
    pub by_pass: bool,
}

const REFUSED: Verdict = Verdict {
    allowed: false,
    name_hash: 0,
    by_pass: false,
};

/// `socket`: the state of the attempt's socket (null when it has none). `remember`: a
/// socket hook, where a connection or datagram starts; the socket then keeps a pass for
/// this destination that outlives the rule's hold.
#[inline(always)]
pub fn check(policy_id: u32, attempt: &Attempt, socket: *mut SocketState, remember: bool) -> Verdict {
    let key = LearnedKey {
        policy_id,
        addr: attempt.dest.addr,
    };
    // One place after the loop allows: the verifier then walks the rest of the program once,
    // not once per rule.
    let mut allowing: Option<(NameKey, u64)> = None;
    // Refused with the name of a live rule, when one taught the address for other ports.
    let mut refused = REFUSED;
    if let Some(learned) = DNS_LEARNED.get_ptr(&key) {
        let now = unsafe { bpf_ktime_get_ns() };
        let mut i = 0;
        while i < LEARNED_RULES {
            // SAFETY: the entry in the map; each field is read once, whole.
            let held = unsafe { &(*learned).rules[i] };
            let expires_ns = unsafe { core::ptr::read_volatile(&held.expires_ns) };
            if now < expires_ns {
                let (rule, name_hash) = (held.rule, held.name_hash);
                if rule_allows(&rule, attempt) {
                    allowing = Some((rule, name_hash));
                    break;
                }
                if refused.name_hash == 0 {
                    refused.name_hash = name_hash;
                }
            }
            i += 1;
        }
    }
    if let Some((rule, name_hash)) = allowing {
        return allow(&rule, name_hash, policy_id, attempt, socket, remember);
    }
    // No live rule allows: only the socket's own pass, for exactly this destination.
    if socket.is_null() || !holds_pass(socket, policy_id, attempt) {
        return refused;
    }
    let pass = unsafe { &(*socket).learned };
    let allowed = rule_allows(&pass.rule, attempt);
    Verdict {
        allowed,
        name_hash: pass.name_hash,
        by_pass: allowed,
    }
}

/// A live rule allows the attempt. At a socket hook, the socket takes a pass for it.
#[inline(always)]
fn allow(
    rule: &NameKey,
    name_hash: u64,
    policy_id: u32,
    attempt: &Attempt,
    socket: *mut SocketState,
    remember: bool,
) -> Verdict {
    let by_pass = !socket.is_null() && (remember || holds_pass(socket, policy_id, attempt));
    if remember && !socket.is_null() {
        // SAFETY: the socket's record in the map; its pass is rewritten in place.
        unsafe {
            let pass = zeroed::zero(&mut *addr_of_mut!((*socket).learned).cast::<MaybeUninit<LearnedPass>>());
            (*pass).addr = attempt.dest.addr;
            (*pass).rule = *rule;
            (*pass).name_hash = name_hash;
            (*pass).port = attempt.port;
            (*pass).protocol = attempt.protocol;
        }
    }
    Verdict {
        allowed: true,
        name_hash,
        by_pass,
    }
}

/// The non-null `socket` holds a pass of allowlist `policy_id` for exactly this attempt.
#[inline(always)]
fn holds_pass(socket: *const SocketState, policy_id: u32, attempt: &Attempt) -> bool {
    let pass = unsafe { &(*socket).learned };
    pass.protocol != 0
        && pass.rule.policy_id == policy_id
        && pass.port == attempt.port
        && pass.protocol == attempt.protocol
        && attempt.dest.is(&pass.addr)
}

/// The rule is looked up at every use: a policy change that drops the name or its ports
/// takes effect at once.
#[inline(always)]
fn rule_allows(rule: &NameKey, attempt: &Attempt) -> bool {
    unsafe { DNS_NAMES.get(rule) }.is_some_and(|r| r.ports.allows(attempt.protocol, attempt.port))
}
