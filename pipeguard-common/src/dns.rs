//! DNS-aware egress: the name hash both sides compute, and the layouts of the DNS maps and
//! event record.
//!
//! How the kernel uses them: a query from a DNS-filtered pod is parsed, every suffix of its
//! question name is hashed (one pass over the name, from the right) and looked up in
//! `PG_DNS_NAMES_V1`; a hit is confirmed by comparing the stored name text, so a hash
//! collision can never allow a name. An allowed query is remembered in `PG_DNS_QUERIES_V2`;
//! the answer that matches it (same socket, resolver, query id and question) teaches its
//! A/AAAA addresses to `PG_DNS_LEARNED_V2`, which the socket and packet hooks consult after
//! the static tries.

use bytemuck::{Pod, Zeroable};

use crate::{Event, PortSet};

/// A DNS name in wire format is at most 255 bytes; the dotted form with a leading dot too.
pub const MAX_NAME_BYTES: usize = 256;
/// Labels in a name (each at least one byte plus its length byte).
pub const MAX_LABELS: usize = 128;
/// Answer records walked per answer; further records teach nothing.
pub const MAX_ANSWER_RECORDS: u32 = 32;
/// How long an allowed query waits for its answer.
pub const QUERY_TIMEOUT_NS: u64 = 30_000_000_000;
/// Longest TTL an entry is learned for, whatever the answer says (one day).
pub const MAX_TTL_S: u32 = 86_400;

/// Entries of the name map: (allowlist, pattern) pairs over all allowlists of a node.
pub const MAX_NAME_RULES: u32 = 65_536;
/// Outstanding queries: `QUERY_SETS` sets of `QUERY_WAYS` slots. A query takes a free or
/// expired slot of its set, else the one closest to expiry: a flood of queries overwrites
/// old ones (as an LRU would evict them) and never fails a query.
pub const MAX_QUERIES: u32 = 16_384;
/// Slots a query may take: only queries whose answers are all still due in one set compete.
pub const QUERY_WAYS: u32 = 4;
/// Sets of the query table (a power of two, so a set is found by masking).
pub const QUERY_SETS: u32 = MAX_QUERIES / QUERY_WAYS;
const _: () = assert!(QUERY_SETS.is_power_of_two());
/// Learned (allowlist, address) entries. LRU, and user space sweeps expired entries, so
/// eviction only happens under real pressure: 10,000 names × 13 addresses, or 1,000
/// addresses for each of 131 names, at once.
pub const MAX_LEARNED: u32 = 131_072;
/// Question hash → name text, for events and summaries.
pub const MAX_NAME_TEXTS: u32 = 16_384;

/// `NameKey::kind`: the pattern is the full name (`github.com`).
pub const NAME_EXACT: u32 = 1;
/// `NameKey::kind`: the pattern is a suffix; one or more labels must precede it
/// (`*.npmjs.org` is stored as `npmjs.org`).
pub const NAME_WILDCARD: u32 = 2;
/// `NameKey::kind` of a query slot of an observed query (a pod that is not DNS-filtered,
/// `DNS_LEARN_NAMES`): its answer names addresses in `PG_DNS_SEEN_V2`, never in the
/// learned table, and no name rule has this kind: it allows nothing.
pub const NAME_SEEN: u32 = 3;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Where the name hash starts.
pub const NAME_HASH_SEED: u64 = FNV_OFFSET;

#[inline(always)]
pub const fn ascii_lower(b: u8) -> u8 {
    if b.is_ascii_uppercase() { b + 32 } else { b }
}

/// One step of the name hash (FNV-1a, 64 bit, lowercase-folding). The name is fed from its
/// last byte to its first, dots included, so the hash after the bytes of a suffix is that
/// suffix's hash: one pass over a name yields the hash of every suffix.
#[inline(always)]
pub const fn name_hash_step(hash: u64, byte: u8) -> u64 {
    (hash ^ ascii_lower(byte) as u64).wrapping_mul(FNV_PRIME)
}

/// The hash of a dotted name (`registry.npmjs.org`, no trailing dot), as the kernel
/// computes it for the same name or suffix in a query.
pub fn name_hash(name: &[u8]) -> u64 {
    let mut hash = NAME_HASH_SEED;
    let mut i = name.len();
    while i > 0 {
        i -= 1;
        hash = name_hash_step(hash, name[i]);
    }
    hash
}

/// Key of `PG_DNS_NAMES_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct NameKey {
    pub policy_id: u32,
    /// `NAME_EXACT` or `NAME_WILDCARD`.
    pub kind: u32,
    /// `name_hash` of the pattern's name.
    pub hash: u64,
}
const _: () = assert!(core::mem::size_of::<NameKey>() == 16);

/// Value of `PG_DNS_NAMES_V1`: the ports the addresses of a matching name may be reached
/// on (already the union of every pattern that matches the names this one matches, so the
/// most specific match decides), and the pattern's name text, compared on every hit.
/// Empty ports: the name may be queried, its answers teach nothing (the cluster domain).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct NameRule {
    pub ports: PortSet,
    /// Bytes of `name` in use.
    pub len: u32,
    pub _pad: u32,
    /// Lowercase dotted name, no trailing dot.
    pub name: [u8; MAX_NAME_BYTES],
}
const _: () = assert!(core::mem::size_of::<NameRule>() == 136 + 8 + MAX_NAME_BYTES);

impl Default for NameRule {
    fn default() -> Self {
        Zeroable::zeroed()
    }
}

/// Identity of one query as it left, seen again in its answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct QueryKey {
    /// The socket that sent the query (and must receive the answer).
    pub cookie: u64,
    /// The resolver, IPv6 or IPv4-mapped IPv6.
    pub addr: [u8; 16],
    /// The resolver's port, host order.
    pub port: u16,
    /// The query id, as on the wire (network order bytes read as u16).
    pub id: u16,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<QueryKey>() == 32);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct QueryState {
    /// `name_hash` of the full question name.
    pub question_hash: u64,
    /// `bpf_ktime_get_coarse_ns` after which the answer is no longer accepted.
    pub expires_ns: u64,
    /// The rule that allowed the question (key of `PG_DNS_NAMES_V1`).
    pub rule: NameKey,
}
const _: () = assert!(core::mem::size_of::<QueryState>() == 32);

/// A slot of `PG_DNS_QUERIES_V2` (an array, `QUERY_WAYS` slots per set, the set chosen by
/// `query_set`). A plain array slot is written without a lock, so `seal` (`query_seal` of
/// key and state, never 0) tells a whole entry from a torn or empty one; 0 is free.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct QuerySlot {
    pub key: QueryKey,
    pub state: QueryState,
    pub seal: u64,
}
const _: () = assert!(core::mem::size_of::<QuerySlot>() == 72);

#[inline(always)]
const fn mix(hash: u64, word: u64) -> u64 {
    let h = (hash ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^ (h >> 29)
}

#[inline(always)]
fn key_words(key: &QueryKey) -> [u64; 4] {
    let a = &key.addr;
    [
        key.cookie,
        u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
        u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
        key.port as u64 | (key.id as u64) << 16,
    ]
}

/// Index of the first slot of `key`'s set.
#[inline(always)]
pub fn query_set(key: &QueryKey) -> u32 {
    let w = key_words(key);
    let h = mix(mix(mix(mix(FNV_OFFSET, w[0]), w[1]), w[2]), w[3]);
    ((h >> 32) as u32 & (QUERY_SETS - 1)) * QUERY_WAYS
}

/// The seal of a slot holding `key` and `state`; never 0.
#[inline(always)]
pub fn query_seal(key: &QueryKey, state: &QueryState) -> u64 {
    let w = key_words(key);
    let mut h = mix(mix(mix(mix(FNV_PRIME, w[0]), w[1]), w[2]), w[3]);
    h = mix(mix(h, state.question_hash), state.expires_ns);
    h = mix(
        mix(h, state.rule.policy_id as u64 | (state.rule.kind as u64) << 32),
        state.rule.hash,
    );
    h | 1
}

/// The same query: every field of the key (compared word by word, no memcmp in BPF).
#[inline(always)]
pub fn same_query(a: &QueryKey, b: &QueryKey) -> bool {
    let (a, b) = (key_words(a), key_words(b));
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

/// Key of `PG_DNS_LEARNED_V2`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct LearnedKey {
    pub policy_id: u32,
    /// IPv6, or IPv4-mapped IPv6 for IPv4.
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<LearnedKey>() == 20);

/// Rules one learned address holds at once: names on a shared address (a CDN) taught under
/// different rules (other ports) each keep their own. A further rule takes the place of the
/// one that expires first.
pub const LEARNED_RULES: usize = 2;
const _: () = assert!(LEARNED_RULES.is_power_of_two());

/// One rule's hold on a learned address: its ports (the rule is looked up at every use, so
/// a policy change takes effect at once) until `expires_ns`. Unused: all zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct LearnedRule {
    pub expires_ns: u64,
    /// `name_hash` of the question that taught it (the name events show).
    pub name_hash: u64,
    pub rule: NameKey,
}
const _: () = assert!(core::mem::size_of::<LearnedRule>() == 32);

/// A learned address: allowed while one of its rules lives, for that rule's ports. A new
/// rule replaces the whole value (an LRU update), so a reader never sees a rule with
/// another's expiry; only a rule taught again has its time moved in place.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct LearnedAddr {
    pub rules: [LearnedRule; LEARNED_RULES],
}
const _: () = assert!(core::mem::size_of::<LearnedAddr>() == 32 * LEARNED_RULES);

impl LearnedAddr {
    /// The rule that lives longest (whose name user space shows).
    pub fn longest(&self) -> &LearnedRule {
        let mut longest = &self.rules[0];
        for rule in &self.rules[1..] {
            if rule.expires_ns > longest.expires_ns {
                longest = rule;
            }
        }
        longest
    }

    /// When the last of its rules expires.
    pub fn expires_ns(&self) -> u64 {
        self.longest().expires_ns
    }
}

/// In a socket's `SocketState`: the learned destination the socket started a connection
/// or datagram to while the address's entry lived, and the rule that allowed it. The socket
/// may go on reaching it after the entry expired or was swept, while that rule (of the
/// socket's pod's allowlist, looked up at every use) still allows the port. One per
/// socket: the last one it started.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct LearnedPass {
    /// IPv4 as ::ffff:a.b.c.d, network order.
    pub addr: [u8; 16],
    /// Its `policy_id` is the allowlist the pass was earned under: a pod moved to another
    /// allowlist loses it like any other revoked destination.
    pub rule: NameKey,
    /// `name_hash` of the question that taught the address (the name events show).
    pub name_hash: u64,
    /// Host byte order; 0 with protocol 0: no pass.
    pub port: u16,
    pub protocol: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<LearnedPass>() == 48);

/// Value of `PG_DNS_NAME_TEXT_V1` (key: `name_hash` of the name).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct NameText {
    pub len: u32,
    pub _pad: u32,
    /// Dotted name as the query spelled it (case kept), no trailing dot.
    pub name: [u8; MAX_NAME_BYTES],
}
const _: () = assert!(core::mem::size_of::<NameText>() == 8 + MAX_NAME_BYTES);

impl Default for NameText {
    fn default() -> Self {
        Zeroable::zeroed()
    }
}

/// `PG_DNS_CONFIG_V1`, index 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DnsConfig {
    /// Learned entries live at least this long, whatever the answer's TTL.
    pub min_ttl_s: u32,
    /// `DNS_REPORT_*` flags.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<DnsConfig>() == 8);

/// `DnsConfig::flags`: report the queries whose names a job chooses freely (verdict `ALLOW`
/// DNS events) for user space's dns_tunnel detector: those a wildcard rule allows, the only
/// rule under which a DNS-filtered pod picks the labels, and every query of a guarded pod
/// that is not DNS-filtered (read, never judged).
pub const DNS_REPORT_QUERIES: u32 = 1 << 0;
/// `DnsConfig::flags`: the answers to the queries of guarded pods that are not DNS-filtered
/// name their addresses in `PG_DNS_SEEN_V2` (a table of its own, so these never push out
/// an entry enforcement needs): names for learning, never an allow.
pub const DNS_LEARN_NAMES: u32 = 1 << 1;

/// A reported name is not reported again for the same pod within this long.
pub const REPORT_AGAIN_AFTER_NS: u64 = 60_000_000_000;
/// At most this many allowed queries reported per pod per second: a tunnel is seen (the
/// detector needs 100 distinct names), and cannot fill the ring buffer refusals share.
pub const REPORTS_PER_SECOND: u32 = 200;
/// Addresses named for learning, across pods (LRU: a forgotten one goes unnamed).
pub const MAX_SEEN: u32 = 65_536;
/// Names remembered as reported, across pods (LRU: a forgotten one is reported again).
pub const MAX_REPORTED: u32 = 16_384;

/// Key of `PG_DNS_REPORTED_V1` (value: when the name was last reported, coarse clock ns).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ReportedKey {
    pub pod_cgroup_id: u64,
    pub name_hash: u64,
}

/// Value of `PG_DNS_REPORT_BUDGET_V1` (key: the pod's cgroup id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ReportBudget {
    /// Start of the current one-second window (coarse clock ns).
    pub window_start_ns: u64,
    /// Reports in it.
    pub count: u32,
    pub _pad: u32,
}

/// `Event::flags` of a DNS event: the query could not be parsed (refused, fail closed).
pub const DNS_EVENT_MALFORMED: u32 = 1 << 0;

/// Ring buffer record of a refused (or audited) DNS query, or of an allowed one reported
/// for the detectors (`DNS_REPORT_QUERIES`): the common event (hook `Dns`, the
/// resolver as destination) followed by the question. Longer than `Event`, which is
/// how the reader tells them apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct DnsEvent {
    pub event: Event,
    pub qtype: u16,
    /// Bytes of `name` in use, the leading dot included; the name is whatever the job sent:
    /// user space escapes it.
    pub name_len: u16,
    pub _pad: u32,
    /// The question name in dotted form with a leading dot (`.github.com`); the kernel
    /// parses the query right here (the scratch buffer is this record), so a refusal is
    /// reported without copying the name. Twice the name size, so masked indices never
    /// leave it.
    pub name: [u8; 2 * MAX_NAME_BYTES],
}
const _: () = assert!(core::mem::size_of::<DnsEvent>() == 88 + 8 + 2 * MAX_NAME_BYTES);

impl Default for DnsEvent {
    fn default() -> Self {
        Zeroable::zeroed()
    }
}

/// Scratch space for parsing one name (per CPU): the bytes from the question on, made
/// into dotted form in place, in the event record a refusal sends as it is.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct DnsScratch {
    pub event: DnsEvent,
    /// Offset in `name` of each label's length byte.
    pub starts: [u8; MAX_LABELS],
    /// The parsing run's count (see `run`) at each label's length byte while a name is
    /// parsed (cleared as it is read). The full 64-bit count: a mark an interrupted run left
    /// behind can never be taken for a later run's own.
    pub marks: [u64; MAX_NAME_BYTES],
    /// At each label's length byte: the hash of the suffix after it.
    pub hashes: [u64; MAX_NAME_BYTES],
    /// Labels of the name just parsed.
    pub labels: u16,
    /// Loop bounds kept opaque to the compiler (see the parser).
    pub opaque: u16,
    pub _pad: u32,
    /// Counts the runs that parsed a name here. A softirq can run the same program on this
    /// CPU in the middle of a run in process context and overwrite the buffer: the
    /// interrupted run sees the count moved and fails closed, and every other run ignores
    /// marks that are not its own.
    pub run: u64,
    /// The name as the name table stores it, assembled here (too big for the BPF stack).
    pub text: NameText,
}
const _: () = assert!(
    core::mem::size_of::<DnsScratch>()
        == core::mem::size_of::<DnsEvent>() + MAX_LABELS + 16 * MAX_NAME_BYTES + 16 + 8 + MAX_NAME_BYTES
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_hashes_fall_out_of_one_pass_from_the_right() {
        let name = b"Registry.NPMJS.org";
        let mut hash = NAME_HASH_SEED;
        let mut seen = [0u64; 3];
        let mut n = 0;
        for i in (0..name.len()).rev() {
            if name[i] == b'.' {
                seen[n] = hash;
                n += 1;
            }
            hash = name_hash_step(hash, name[i]);
        }
        assert_eq!(seen[0], name_hash(b"org"));
        assert_eq!(seen[1], name_hash(b"npmjs.org"));
        assert_eq!(hash, name_hash(b"registry.npmjs.org"), "case folds");
        assert_ne!(name_hash(b"npmjs.org"), name_hash(b"npmjs.com"));
    }

    fn query() -> (QueryKey, QueryState) {
        let key = QueryKey {
            cookie: 77,
            addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 53, 1],
            port: 53,
            id: 0x4242,
            _pad: 0,
        };
        let state = QueryState {
            question_hash: name_hash(b"github.com"),
            expires_ns: 5_000_000_000,
            rule: NameKey {
                policy_id: 3,
                kind: NAME_EXACT,
                hash: name_hash(b"github.com"),
            },
        };
        (key, state)
    }

    #[test]
    fn a_query_set_is_a_whole_set_inside_the_table() {
        let (mut key, _) = query();
        for id in 0..4096u16 {
            key.id = id;
            let set = query_set(&key);
            assert_eq!(set % QUERY_WAYS, 0);
            assert!(set + QUERY_WAYS <= MAX_QUERIES);
        }
    }

    #[test]
    fn the_seal_changes_with_every_field_and_is_never_free() {
        let (key, state) = query();
        let seal = query_seal(&key, &state);
        assert_ne!(seal, 0);
        let mut k = key;
        k.cookie += 1;
        assert_ne!(query_seal(&k, &state), seal, "cookie");
        let mut k = key;
        k.addr[15] ^= 1;
        assert_ne!(query_seal(&k, &state), seal, "resolver address");
        let mut k = key;
        k.port = 5353;
        assert_ne!(query_seal(&k, &state), seal, "port");
        let mut k = key;
        k.id ^= 1;
        assert_ne!(query_seal(&k, &state), seal, "id");
        let mut s = state;
        s.question_hash ^= 1;
        assert_ne!(query_seal(&key, &s), seal, "question");
        let mut s = state;
        s.expires_ns += 1;
        assert_ne!(query_seal(&key, &s), seal, "expiry");
        let mut s = state;
        s.rule.policy_id += 1;
        assert_ne!(query_seal(&key, &s), seal, "rule's allowlist");
        let mut s = state;
        s.rule.kind = NAME_WILDCARD;
        assert_ne!(query_seal(&key, &s), seal, "rule's kind");
        assert!(same_query(&key, &key));
        let mut k = key;
        k.addr[0] = 1;
        assert!(!same_query(&key, &k));
    }
}
