//! Enforcement with learned addresses: after the static trie, a DNS-filtered pod may reach
//! an address an allowed answer taught its allowlist, on the ports of the rule that allowed
//! the question, while the entry lives. A socket that reached it while it lived keeps
//! reaching it after expiry; new ones are refused.

use aya_ebpf::helpers::generated::bpf_ktime_get_ns;
use pipeguard_common::{ConnKey, ConnPass, LearnedKey};

use crate::{
    maps::{DNS_CONNS, DNS_LEARNED, DNS_NAMES},
    verdict::Attempt,
};

pub struct Verdict {
    pub allowed: bool,
    /// The name the address was learned from; 0 when it was not learned.
    pub name_hash: u64,
}

/// `cookie`: the socket (0 when unknown). `remember`: a socket hook, where a connection or
/// datagram starts; it records the socket so its later packets outlive the entry.
#[inline(always)]
pub fn check(policy_id: u32, attempt: &Attempt, cookie: u64, remember: bool) -> Verdict {
    let key = LearnedKey {
        policy_id,
        addr: attempt.dest.addr,
    };
    let Some(learned) = (unsafe { DNS_LEARNED.get(&key) }).copied() else {
        return Verdict {
            allowed: false,
            name_hash: 0,
        };
    };
    let refused = Verdict {
        allowed: false,
        name_hash: learned.name_hash,
    };
    // The rule is looked up at every use: a policy change that drops the name or its ports
    // takes effect at once.
    let Some(rule) = (unsafe { DNS_NAMES.get(&learned.rule) }) else {
        return refused;
    };
    if !rule.ports.allows(attempt.protocol, attempt.port) {
        return refused;
    }
    let conn = ConnKey {
        cookie,
        addr: attempt.dest.addr,
        port: attempt.port,
        protocol: attempt.protocol,
        _pad: [0; 5],
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if now < learned.expires_ns {
        if remember && cookie != 0 {
            let pass = ConnPass {
                policy_id,
                _pad: 0,
                name_hash: learned.name_hash,
            };
            let _ = DNS_CONNS.insert(&conn, &pass, 0);
        }
        return Verdict {
            allowed: true,
            name_hash: learned.name_hash,
        };
    }
    let opened_while_alive =
        cookie != 0 && unsafe { DNS_CONNS.get(&conn) }.is_some_and(|pass| pass.policy_id == policy_id);
    Verdict {
        allowed: opened_while_alive,
        name_hash: learned.name_hash,
    }
}
