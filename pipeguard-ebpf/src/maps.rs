//! Every map the programs use. Layouts are in pipeguard-common; names are versioned there.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use pipeguard_common::{
    AllowKeyV4, AllowKeyV6, Config, Counter, DnsConfig, DnsScratch, EVENT_RING_BYTES, FlowKey, Handshake,
    LearnedAddr, LearnedKey, MAX_ALLOW_ENTRIES, MAX_COUNTER_SLOTS, MAX_FLOWS, MAX_LEARNED, MAX_NAME_RULES,
    MAX_NAME_TEXTS, MAX_PODS, MAX_QUERIES, MAX_REPLIES, MAX_REPORTED, MAX_SEEN, MAX_SOCKETS, NameKey,
    NameRule, NameText, PodCounters, PodEntry, PortSet, QuerySlot, ReplyKey, ReportBudget, ReportedKey,
    SocketState,
};

/// Pod-level cgroup id → the pod's policy id, mode and flags.
#[map(name = "PG_PODS_V2")]
pub static PODS: HashMap<u64, PodEntry> = HashMap::with_max_entries(MAX_PODS, 0);

/// {policy id, IPv4 prefix} → ports allowed there. An empty port set is a hole (an except).
#[map(name = "PG_ALLOW4_V1")]
pub static ALLOW_V4: LpmTrie<AllowKeyV4, PortSet> = LpmTrie::with_max_entries(MAX_ALLOW_ENTRIES, 0);

/// {policy id, IPv6 prefix} → ports allowed there.
#[map(name = "PG_ALLOW6_V1")]
pub static ALLOW_V6: LpmTrie<AllowKeyV6, PortSet> = LpmTrie::with_max_entries(MAX_ALLOW_ENTRIES, 0);

/// Pod counter slot (`PodEntry::counter_slot`) → packets and bytes by hook and verdict.
#[map(name = "PG_COUNTERS_V2")]
pub static COUNTERS: PerCpuArray<PodCounters> = PerCpuArray::with_max_entries(MAX_COUNTER_SLOTS, 0);

/// {pod cgroup, destination, port, protocol, verdict} → packets and bytes; only written when
/// `CONFIG_FLOW_STATS` is set. LRU, so it can never fill up and fail an update.
#[map(name = "PG_FLOWS_V1")]
pub static FLOWS: LruPerCpuHashMap<FlowKey, Counter> = LruPerCpuHashMap::with_max_entries(MAX_FLOWS, 0);

/// Denied and audited attempts (`pipeguard_common::Event`).
#[map(name = "PG_EVENTS_V1")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENT_RING_BYTES, 0);

/// Index 0: events lost because the ring buffer was full.
#[map(name = "PG_EVENT_DROPS_V1")]
pub static EVENT_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Flow (verdict field = hook) → time of the last event the packet hook sent for it, so a
/// stream of dropped packets yields one event per flow per interval, not one per packet.
#[map(name = "PG_EVENT_LIMIT_V1")]
pub static EVENT_LIMIT: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

/// {receiving socket cookie, sender, sender port} → time of the last UDP datagram from that
/// sender (see `reply`). LRU: losing an entry only makes a reply be judged as egress.
#[map(name = "PG_REPLIES_V1")]
pub static REPLIES: LruHashMap<ReplyKey, u64> = LruHashMap::with_max_entries(MAX_REPLIES, 0);

/// Index 0: global `Config`.
#[map(name = "PG_CONFIG_V2")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Index 0, per CPU: the pod (or none) of the handshake packet the ingress hook just let
/// in, for `pg_sock_ops` to put into the accepted connection's record (see `reply`).
#[map(name = "PG_HANDSHAKE_V2")]
pub static HANDSHAKE: PerCpuArray<Handshake> = PerCpuArray::with_max_entries(1, 0);

/// The records of guarded pods' sockets by cookie (see `socket_table`): the pod and task
/// that created the socket (written by `pg_sock_create`, read by the socket hooks and
/// ingress events; see `owner`) and the verdict the socket remembers (see `fast`); for a
/// connection the pod accepted, the peer its replies go to (written by `pg_sock_ops`, see
/// `reply`). An
/// array rather than socket storage (two accounted allocations and an RCU free per socket)
/// or a hash map (a locked insert and delete per socket). Mmapable: user space reads it in
/// place (counts, flow statistics) instead of a lookup per slot.
#[map(name = "PG_SOCKETS_V8")]
pub static SOCKETS: Array<SocketState> = Array::with_max_entries(MAX_SOCKETS, BPF_F_MMAPABLE);

/// Index 0: the policy generation, which user space moves after every write to the pod
/// table or an allowlist; a remembered verdict of another generation is judged again.
#[map(name = "PG_POLICY_GENERATION_V1")]
pub static POLICY_GENERATION: Array<u64> = Array::with_max_entries(1, 0);

/// {policy id, exact or wildcard, name hash} → ports and the name's text (DNS-filtered pods
/// only). Written by user space; allocated on insert (values hold a 256-byte name).
#[map(name = "PG_DNS_NAMES_V1")]
pub static DNS_NAMES: HashMap<NameKey, NameRule> =
    HashMap::with_max_entries(MAX_NAME_RULES, BPF_F_NO_PREALLOC);

/// Allowed queries waiting for their answer, `QUERY_WAYS` slots per set (`dns::queries`):
/// {socket, resolver, port, query id} → question, rule, expiry.
#[map(name = "PG_DNS_QUERIES_V2")]
pub static DNS_QUERIES: Array<QuerySlot> = Array::with_max_entries(MAX_QUERIES, 0);

/// {policy id, address} → its rules: until when, through which rule, from which name.
#[map(name = "PG_DNS_LEARNED_V2")]
pub static DNS_LEARNED: LruHashMap<LearnedKey, LearnedAddr> = LruHashMap::with_max_entries(MAX_LEARNED, 0);

/// Question name hash → its text, for events and summaries.
#[map(name = "PG_DNS_NAME_TEXT_V1")]
pub static DNS_NAME_TEXT: LruHashMap<u64, NameText> = LruHashMap::with_max_entries(MAX_NAME_TEXTS, 0);

/// Index 0: `DnsConfig`.
#[map(name = "PG_DNS_CONFIG_V1")]
pub static DNS_CONFIG: Array<DnsConfig> = Array::with_max_entries(1, 0);

/// {policy id, address} → until when, from which name: the answers to observed queries
/// (`DNS_LEARN_NAMES`), for learning. Shaped like `DNS_LEARNED`; never consulted to allow.
#[map(name = "PG_DNS_SEEN_V2")]
pub static DNS_SEEN: LruHashMap<LearnedKey, LearnedAddr> = LruHashMap::with_max_entries(MAX_SEEN, 0);

/// {pod, question name hash} → when a query a wildcard rule allowed was last reported
/// (`dns::report`).
#[map(name = "PG_DNS_REPORTED_V1")]
pub static DNS_REPORTED: LruHashMap<ReportedKey, u64> = LruHashMap::with_max_entries(MAX_REPORTED, 0);

/// Pod → its reports in the current second (`dns::report`).
#[map(name = "PG_DNS_REPORT_BUDGET_V1")]
pub static DNS_REPORT_BUDGET: LruHashMap<u64, ReportBudget> = LruHashMap::with_max_entries(MAX_PODS, 0);

/// Scratch space to parse one name: `SCRATCH_QUERY` for the egress side, `SCRATCH_ANSWER`
/// for the ingress side, because an answer processed in softirq can interrupt a query check
/// on the same CPU and must not overwrite the name it is checking.
#[map(name = "PG_DNS_SCRATCH_V2")]
pub static DNS_SCRATCH: PerCpuArray<DnsScratch> = PerCpuArray::with_max_entries(2, 0);
pub const SCRATCH_QUERY: u32 = 0;
pub const SCRATCH_ANSWER: u32 = 1;

/// Index 0: `pg_dns_query`, tail-called by `pg_egress` for DNS of DNS-filtered pods, with
/// what `pg_egress` found in the skb's control buffer (`dns::handoff`; V2: V1's program
/// found it again).
#[map(name = "PG_DNS_EGRESS_V2")]
pub static DNS_EGRESS: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Index 0: `pg_dns_answer`, tail-called by `pg_ingress` for answers to DNS-filtered pods.
#[map(name = "PG_DNS_INGRESS_V1")]
pub static DNS_INGRESS: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// {sending socket cookie, peer, peer port, protocol} → time of the last UDP or SCTP packet
/// an ingress-isolated pod sent there: the peer's answers are replies, not new inbound
/// datagrams (see `ingress_policy`). LRU: a lost entry only makes an answer be judged.
#[map(name = "PG_SENT_V1")]
pub static SENT: LruHashMap<ReplyKey, u64> = LruHashMap::with_max_entries(MAX_REPLIES, 0);
