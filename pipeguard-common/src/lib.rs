//! Memory layouts shared by the eBPF programs and user space.
//!
//! Every type is `#[repr(C)]` with explicit padding, so the two sides cannot disagree
//! about a layout; the size asserts below fail the build on both sides if one changes.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Map names are versioned: a new layout gets a new name, so an upgraded agent never
/// reads a pinned map with the old layout.
pub mod map_names {
    pub const PODS: &str = "PG_PODS_V2";
    pub const ALLOW_V4: &str = "PG_ALLOW4_V1";
    pub const ALLOW_V6: &str = "PG_ALLOW6_V1";
    pub const COUNTERS: &str = "PG_COUNTERS_V2";
    pub const FLOWS: &str = "PG_FLOWS_V1";
    pub const EVENTS: &str = "PG_EVENTS_V1";
    pub const EVENT_DROPS: &str = "PG_EVENT_DROPS_V1";
    pub const EVENT_LIMIT: &str = "PG_EVENT_LIMIT_V1";
    pub const CONFIG: &str = "PG_CONFIG_V2";
    pub const REPLIES: &str = "PG_REPLIES_V1";
    pub const SOCKETS: &str = "PG_SOCKETS_V8";
    pub const POLICY_GENERATION: &str = "PG_POLICY_GENERATION_V1";
    pub const DNS_NAMES: &str = "PG_DNS_NAMES_V1";
    pub const DNS_QUERIES: &str = "PG_DNS_QUERIES_V2";
    pub const DNS_LEARNED: &str = "PG_DNS_LEARNED_V2";
    pub const DNS_NAME_TEXT: &str = "PG_DNS_NAME_TEXT_V1";
    pub const DNS_CONFIG: &str = "PG_DNS_CONFIG_V1";
    pub const DNS_SCRATCH: &str = "PG_DNS_SCRATCH_V2";
    pub const DNS_EGRESS: &str = "PG_DNS_EGRESS_V2";
    pub const DNS_INGRESS: &str = "PG_DNS_INGRESS_V1";
    pub const SENT: &str = "PG_SENT_V1";
    pub const DNS_REPORTED: &str = "PG_DNS_REPORTED_V1";
    pub const DNS_REPORT_BUDGET: &str = "PG_DNS_REPORT_BUDGET_V1";
    pub const DNS_SEEN: &str = "PG_DNS_SEEN_V2";
    pub const HANDSHAKE: &str = "PG_HANDSHAKE_V2";
    /// Every map, for pinning.
    pub const ALL: [&str; 25] = [
        PODS,
        ALLOW_V4,
        ALLOW_V6,
        COUNTERS,
        FLOWS,
        EVENTS,
        EVENT_DROPS,
        EVENT_LIMIT,
        CONFIG,
        REPLIES,
        SOCKETS,
        POLICY_GENERATION,
        DNS_NAMES,
        DNS_QUERIES,
        DNS_LEARNED,
        DNS_NAME_TEXT,
        DNS_CONFIG,
        DNS_SCRATCH,
        DNS_EGRESS,
        DNS_INGRESS,
        SENT,
        DNS_REPORTED,
        DNS_REPORT_BUDGET,
        DNS_SEEN,
        HANDSHAKE,
    ];
}

/// Program names as they appear in the object file.
pub mod program_names {
    pub const CONNECT4: &str = "pg_connect4";
    pub const CONNECT6: &str = "pg_connect6";
    pub const SENDMSG4: &str = "pg_sendmsg4";
    pub const SENDMSG6: &str = "pg_sendmsg6";
    pub const EGRESS: &str = "pg_egress";
    pub const INGRESS: &str = "pg_ingress";
    /// Not attached: tail-called by pg_egress / pg_ingress for DNS of DNS-filtered pods.
    pub const DNS_QUERY: &str = "pg_dns_query";
    pub const DNS_ANSWER: &str = "pg_dns_answer";
    pub const SOCK_OPS: &str = "pg_sock_ops";
    pub const SOCK_CREATE: &str = "pg_sock_create";
    pub const SOCK_RELEASE: &str = "pg_sock_release";
    pub const SOCKET_CREATE_LSM: &str = "pg_socket_create_lsm";
}

/// Capacity of the allow tries (per family). 100k CIDRs is the benchmark target.
pub const MAX_ALLOW_ENTRIES: u32 = 262_144;
pub const MAX_PODS: u32 = 65_536;
/// Capacity of the socket table (`SocketState` by socket cookie): live sockets of guarded
/// pods on one node. LRU: past it, the least recently used socket loses its record and is
/// judged like a socket older than the programs.
pub const MAX_SOCKETS: u32 = 65_536;
/// Pods a node can count at once: slots of the per-CPU counter array (`PodCounters`), which
/// the engine hands out to pods. A node runs a few hundred pods at most (kubelet's default
/// is 110); slot 0 counts what no pod owns and the last slot takes pods past the rest.
pub const MAX_COUNTER_SLOTS: u32 = 1024;
/// `PodEntry::counter_slot` of attempts judged for no pod (unknown pods under `deny`).
pub const COUNTER_SLOT_NONE: u32 = 0;
/// Shared by the pods that found every other slot taken: counted, never attributed.
pub const COUNTER_SLOT_OVERFLOW: u32 = MAX_COUNTER_SLOTS - 1;
pub const MAX_FLOWS: u32 = 16_384;
pub const EVENT_RING_BYTES: u32 = 1 << 22;
/// Capacity of the UDP reply table (LRU: under pressure the oldest reply state goes, and
/// a reply without state is judged as new egress, never let through).
pub const MAX_REPLIES: u32 = 65_536;
/// How long a UDP socket may answer a peer after the last datagram it received from that
/// peer, like conntrack's UDP timeout. `EngineConfig::reply_window` overrides it.
pub const REPLY_WINDOW_NS: u64 = 30_000_000_000;
/// How many ancestors of a socket's cgroup the programs walk to find the pod cgroup.
pub const MAX_CGROUP_DEPTH: u32 = 12;
/// Port ranges one trie entry can hold; the compiler rejects anything larger rather than
/// truncating, so a prefix never silently loses an allowed port.
pub const MAX_PORT_RANGES: usize = 16;
/// Per-flow event rate limit for the packet hook: one event per flow per this interval.
pub const EVENT_INTERVAL_NS: u64 = 1_000_000_000;

pub const MODE_ENFORCE: u32 = 0;
pub const MODE_AUDIT: u32 = 1;

/// `PodEntry::flags`
pub const POD_DENY_RAW_SOCKETS: u32 = 1 << 0;
/// At least one domain policy selects the pod: its DNS queries are checked against the
/// names of its allowlist, and the answers teach the allowlist their addresses.
pub const POD_DNS_FILTERED: u32 = 1 << 1;
/// A policy with Ingress in its policyTypes selects the pod (or `--default-deny-ingress`):
/// new inbound connections and datagrams are judged against the allowlist
/// `PodEntry::ingress_policy_id`. Without the flag inbound traffic is not judged.
pub const POD_INGRESS_ISOLATED: u32 = 1 << 2;

/// Value of the pod table, keyed by the pod-level cgroup id (u64).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PodEntry {
    /// Selects the allowlist in the tries.
    pub policy_id: u32,
    /// `MODE_ENFORCE` or `MODE_AUDIT`.
    pub mode: u32,
    /// `POD_*` flags.
    pub flags: u32,
    /// Selects the ingress allowlist in the same tries (keyed by source address, ports are
    /// the pod's own); only read when `POD_INGRESS_ISOLATED` is set. Was padding before
    /// ingress enforcement: entries of older agents hold 0 and no flag.
    pub ingress_policy_id: u32,
    /// The pod's row in the counter array (`PodCounters`). Assigned by the engine: callers
    /// leave it 0 and never see it.
    pub counter_slot: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<PodEntry>() == 24);

/// Data of the IPv4 LPM trie key (the map key is `{u32 prefix_len, AllowKeyV4}`, as in
/// `struct bpf_lpm_trie_key_u8`). The prefix length counts the 32 bits of `policy_id` plus
/// the address prefix, so every lookup matches its own policy id exactly.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AllowKeyV4 {
    /// Big-endian, so the trie's bitwise prefix covers it the same on every host.
    pub policy_id: [u8; 4],
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<AllowKeyV4>() == 8);

/// Data of the IPv6 LPM trie key; same scheme as `AllowKeyV4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AllowKeyV6 {
    pub policy_id: [u8; 4],
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<AllowKeyV6>() == 20);

/// Bits of the key's prefix length taken by the policy id.
pub const POLICY_ID_BITS: u32 = 32;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// One allowed port range for one protocol, inclusive.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<PortRange>() == 8);

/// `PortSet::flags`: every protocol and port is allowed (a rule without ports).
pub const PORTS_ALL: u32 = 1 << 0;

/// Trie value: what the longest matching prefix allows. An entry with no flags and no
/// ranges is a hole (an `except`): the prefix is denied.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct PortSet {
    pub flags: u32,
    /// Number of valid entries in `ranges`.
    pub count: u32,
    pub ranges: [PortRange; MAX_PORT_RANGES],
}
const _: () = assert!(core::mem::size_of::<PortSet>() == 8 + 8 * MAX_PORT_RANGES);

impl PortSet {
    /// The verdict for one destination. `port` 0 with a port-less protocol (ICMP, raw)
    /// only passes `PORTS_ALL`, because NetworkPolicy ports only name TCP, UDP and SCTP.
    #[inline(always)]
    pub fn allows(&self, protocol: u8, port: u16) -> bool {
        if self.flags & PORTS_ALL != 0 {
            return true;
        }
        let mut i = 0;
        while i < MAX_PORT_RANGES {
            if i as u32 >= self.count {
                break;
            }
            let r = &self.ranges[i];
            if r.protocol == protocol && r.start <= port && port <= r.end {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// Hooks, as reported in counters and events.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Connect4 = 0,
    Connect6 = 1,
    Sendmsg4 = 2,
    Sendmsg6 = 3,
    Egress = 4,
    SockCreate = 5,
    /// A DNS query checked in the packet hook (counters: queries, not packets of other kinds).
    Dns = 6,
    /// A new inbound connection (TCP SYN to a listener) or datagram, judged against the
    /// pod's ingress allowlist. Events carry the source as `addr`, the pod's own port as
    /// `port` and the source port in `flags` (see `Event::flags`).
    Ingress = 7,
}
pub const HOOK_COUNT: usize = 8;

impl Hook {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Connect4,
            1 => Self::Connect6,
            2 => Self::Sendmsg4,
            3 => Self::Sendmsg6,
            4 => Self::Egress,
            5 => Self::SockCreate,
            6 => Self::Dns,
            7 => Self::Ingress,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Connect4 => "connect4",
            Self::Connect6 => "connect6",
            Self::Sendmsg4 => "sendmsg4",
            Self::Sendmsg6 => "sendmsg6",
            Self::Egress => "egress",
            Self::SockCreate => "sock_create",
            Self::Dns => "dns",
            Self::Ingress => "ingress",
        }
    }
}

/// Verdicts, as reported in counters and events.
pub const VERDICT_ALLOW: u8 = 0;
pub const VERDICT_DENY: u8 = 1;
/// Would have been denied; let through because the pod is in audit mode.
pub const VERDICT_AUDIT: u8 = 2;
/// The program could not decide (malformed packet, failed helper); the packet was dropped
/// in a guarded pod and an error counted.
pub const VERDICT_ERROR: u8 = 3;

/// Verdicts a counter is kept for: `VERDICT_ALLOW` to `VERDICT_ERROR`.
pub const VERDICT_COUNT: usize = 4;

/// One pod's row of the per-CPU counter array (`PG_COUNTERS_V2`, indexed by
/// `PodEntry::counter_slot`): packets and bytes by hook and verdict (connect/sendmsg count
/// attempts). An array, not a hash keyed by pod: every packet counts with an inlined
/// lookup and no hashing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PodCounters {
    pub by_hook: [[Counter; VERDICT_COUNT]; HOOK_COUNT],
}
const _: () = assert!(core::mem::size_of::<PodCounters>() == 512);

/// A counter as user space reports it: per pod cgroup, verdict and hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CounterKey {
    pub cgroup_id: u64,
    pub verdict: u8,
    pub hook: u8,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<CounterKey>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

/// Per-destination flow statistics (LRU, per CPU), used for the exec summary and for
/// the packet hook's event rate limit. Addresses are IPv6 or IPv4-mapped IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey {
    pub cgroup_id: u64,
    pub addr: [u8; 16],
    pub port: u16,
    pub protocol: u8,
    pub verdict: u8,
    pub _pad: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 32);

/// Ring buffer record for a denied or audited attempt.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Event {
    /// bpf_ktime_get_ns (CLOCK_MONOTONIC)
    pub timestamp_ns: u64,
    /// The socket's own cgroup.
    pub cgroup_id: u64,
    /// The pod-level cgroup that selected the policy.
    pub pod_cgroup_id: u64,
    /// IPv6, or IPv4-mapped IPv6 when `family` is 4.
    pub addr: [u8; 16],
    pub pid: u32,
    pub tgid: u32,
    pub comm: [u8; 16],
    pub policy_id: u32,
    /// Hook-specific: DNS events' `DNS_EVENT_*` flags; for `Hook::Ingress` the source port
    /// (host order). Zero otherwise.
    pub flags: u32,
    pub port: u16,
    pub protocol: u8,
    pub family: u8,
    pub hook: u8,
    pub verdict: u8,
    /// For sock_create: socket type (SOCK_RAW = 3) and family (AF_PACKET = 17).
    pub sock_type: u8,
    pub _pad: u8,
    /// `name_hash` of the name the destination was learned from; 0 when none.
    pub name_hash: u64,
}
const _: () = assert!(core::mem::size_of::<Event>() == 88);

/// Key of the UDP reply table: one peer that sent a datagram to one socket. Its value is the
/// time (bpf_ktime_get_ns) of the last datagram from that peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ReplyKey {
    /// bpf_get_socket_cookie of the receiving socket: other sockets gain nothing.
    pub cookie: u64,
    /// The sender: IPv6, or IPv4-mapped IPv6 for IPv4 (canonical, as in `FlowKey`).
    pub addr: [u8; 16],
    /// The sender's port, host byte order.
    pub port: u16,
    pub protocol: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<ReplyKey>() == 32);

/// Per CPU: the listener's pod (or none: 0) for the handshake packet the ingress hook just
/// let in, with the packet's peer and local port. The handshake's last ACK reaches
/// `pg_sock_ops` (passive established, on the new connection) right after the ingress hook,
/// on the same CPU, and sock_ops has no helper to find a socket's cgroup: this is how the
/// accepted connection's record learns its pod without a walk at its first reply, and how
/// a connection of a pod nothing judges is spared a record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Handshake {
    /// The peer, as in `SocketState::addr`.
    pub addr: [u8; 16],
    /// Host byte order, both.
    pub port: u16,
    pub local_port: u16,
    /// The pod's entry as the ingress hook found it (`PodEntry`), under `generation`.
    pub counter_slot: u32,
    pub pod_cgroup_id: u64,
    /// Read before the pod lookup; `POLICY_GENERATION_NONE`: taken, or never written.
    pub generation: u64,
    pub pod_flags: u32,
    pub policy_id: u32,
    pub mode: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Handshake>() == 56);

/// The socket table's record of a guarded pod's socket. Written when the pod creates it: the
/// socket hooks judge the socket by the pod that created it (as the packet hook does), not
/// by whichever task happens to call connect() or sendmsg() on it. Then the fast path: the
/// last destination the static allowlist allowed for this socket, under which policy
/// generation (see `POLICY_GENERATION`), so the next attempt or packet to the same
/// destination skips the pod lookup and the trie until the generation moves. A TCP
/// connection the pod accepted gets its record from `pg_sock_ops` instead, with the peer
/// it was accepted from as its destination (`REMEMBERED_REPLY`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SocketState {
    /// The socket's cookie; 0: a free slot of the table (see `socket_slot`).
    pub cookie: u64,
    /// The pod-level cgroup (key of the pod table).
    pub pod_cgroup_id: u64,
    /// The socket's own cgroup (reported in events).
    pub cgroup_id: u64,
    /// Policy generation the remembered verdict (or a listener's pod entry) was judged
    /// under; 0: nothing remembered; `u64::MAX`: a listener's entry being written.
    pub generation: u64,
    /// The allowed destination (IPv4 as ::ffff:a.b.c.d), network order.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub protocol: u8,
    /// `REMEMBERED_*` flags of that verdict.
    pub remembered: u8,
    /// The pod's `POD_*` flags under that generation.
    pub pod_flags: u32,
    /// The task that created the socket (`bpf_get_current_pid_tgid`: tgid in the high half),
    /// 0 when unknown: ingress events name it as the receiving process, since the packet is
    /// judged in softirq where no process of the pod is current.
    pub owner_pid_tgid: u64,
    /// That task's comm.
    pub owner_comm: [u8; 16],
    /// DNS-filtered pods: a learned destination this socket may keep reaching.
    pub learned: LearnedPass,
    /// The pod's allowlist and `MODE_*` under the remembered generation: what the DNS
    /// program is handed for a remembered query.
    pub policy_id: u32,
    pub mode: u32,
    /// The pod's `counter_slot` under the remembered generation.
    pub counter_slot: u32,
    /// The pod's `ingress_policy_id` under that generation (`REMEMBERED_LISTENER` only; it
    /// was padding before, so older records hold 0 and no flag).
    pub ingress_policy_id: u32,
    /// Packets and bytes the fast path let through to the remembered destination and has
    /// not yet added to the flow statistics (`CONFIG_FLOW_STATS` only): they are added when
    /// the socket remembers another destination or goes, and user space adds what is still
    /// here when it reads the flows. Updated atomically (a UDP socket may send from two
    /// CPUs at once).
    pub flow_pending: Counter,
}
const _: () = assert!(core::mem::size_of::<SocketState>() == 160);
// A listener's record keeps one 8-byte word in the first half of `addr` (see `REMEMBERED_LISTENER`).
const _: () = assert!(core::mem::offset_of!(SocketState, addr).is_multiple_of(8));

/// A record of the per-socket table (`PG_SOCKETS_*`): an array whose slots
/// are claimed and freed by the socket cookie in their first 8 bytes (0: free).
///
/// # Safety
/// The type's first field is that cookie (`u64`), it is 8-byte aligned, and its size is a
/// multiple of 8.
pub unsafe trait SocketRecord: Copy {}

// SAFETY: `cookie` first (asserted), 8-byte aligned and sized (asserted).
unsafe impl SocketRecord for SocketState {}
const _: () = assert!(
    core::mem::offset_of!(SocketState, cookie) == 0
        && core::mem::align_of::<SocketState>() == 8
        && core::mem::size_of::<SocketState>().is_multiple_of(8)
);

/// Slots a socket's record may take in a per-socket table (`socket_slot`): a lookup reads
/// at most this many, a record finds no place when all of them are taken.
pub const SOCKET_PROBES: u32 = 4;
const _: () = assert!(MAX_SOCKETS.is_power_of_two());

/// Slot `probe` (below `SOCKET_PROBES`) of the socket with `cookie`. The first is the
/// cookie's own: cookies come in sequence, so sockets opened one after another sit side by
/// side, in warm cache lines and pages (slots spread by a hash made `sock_create` ~1.5×
/// slower in D2, a cold page per socket). The others are consecutive from a Fibonacci hash
/// of the cookie: a long-lived socket on a first slot sends the next cookie somewhere at
/// random instead of shifting every later one along (in a simulation with random closes,
/// the cookie's own slot and the three after it refused 23 % of new sockets half full;
/// these, none a tenth full, 0.16 % a quarter full, 5 % half full).
pub const fn socket_slot(cookie: u64, probe: u32) -> u32 {
    let slot = if probe == 0 {
        cookie as u32
    } else {
        (cookie.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - MAX_SOCKETS.trailing_zeros())) as u32 + probe - 1
    };
    slot & (MAX_SOCKETS - 1)
}

/// `SocketState::remembered`: the pod's static allowlist allowed the destination (else the
/// socket's learned pass did).
pub const REMEMBERED_BY_ALLOWLIST: u8 = 1 << 0;
/// `SocketState::remembered`: the destination chosen by the pod (flow statistics count it);
/// unset for the peer of a connection the pod accepted, whose packets are replies.
pub const REMEMBERED_DESTINATION: u8 = 1 << 1;
/// `SocketState::remembered`: the destination is the peer this TCP connection was accepted
/// from, so its packets there are replies, allowed whatever the allowlist says. The
/// generation then only dates the pod fields: an older one sends the packet to the pod
/// lookup, never to a refusal.
pub const REMEMBERED_REPLY: u8 = 1 << 2;
/// `SocketState::remembered`: a listener's record holding its pod's entry (the pod fields
/// and `ingress_policy_id`) under the generation, and no destination: its handshakes skip
/// the walk to the pod (see the eBPF crate's `listener`).
pub const REMEMBERED_LISTENER: u8 = 1 << 3;

/// Index 0 of the `POLICY_GENERATION` array: user space adds one after every write to the
/// pod table or an allowlist, so every remembered verdict is judged again on its next use.
/// 0 means "never written": nothing is remembered under it.
pub const POLICY_GENERATION_NONE: u64 = 0;

/// Global configuration, array map index 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Config {
    /// What a socket whose cgroup is not in the pod table gets: `UNKNOWN_ALLOW` or
    /// `UNKNOWN_DENY`.
    pub unknown_pods: u32,
    /// `CONFIG_*` flags.
    pub flags: u32,
    /// UDP reply window in ns (see `REPLY_WINDOW_NS`); 0 lets no reply through.
    pub reply_window_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Config>() == 16);

pub const UNKNOWN_ALLOW: u32 = 0;
pub const UNKNOWN_DENY: u32 = 1;
/// Keep per-destination flow statistics (the slow path updates the LRU flow table; the fast
/// path adds to the socket's record, see `SocketState::flow_pending`).
pub const CONFIG_FLOW_STATS: u32 = 1 << 0;
/// Also report allowed attempts (verdict `VERDICT_ALLOW`), one event per flow per
/// `EVENT_INTERVAL_NS`: `exec --learn` needs the process behind every destination.
pub const CONFIG_REPORT_ALLOWED: u32 = 1 << 1;

pub mod dns;
pub use dns::*;

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are repr(C), padding-free (asserted above) and valid for any
    // bit pattern.
    unsafe impl aya::Pod for PodEntry {}
    unsafe impl aya::Pod for AllowKeyV4 {}
    unsafe impl aya::Pod for AllowKeyV6 {}
    unsafe impl aya::Pod for PortSet {}
    unsafe impl aya::Pod for CounterKey {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for PodCounters {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for ReplyKey {}
    unsafe impl aya::Pod for SocketState {}
    unsafe impl aya::Pod for NameKey {}
    unsafe impl aya::Pod for NameRule {}
    unsafe impl aya::Pod for QueryKey {}
    unsafe impl aya::Pod for QueryState {}
    unsafe impl aya::Pod for QuerySlot {}
    unsafe impl aya::Pod for LearnedKey {}
    unsafe impl aya::Pod for LearnedAddr {}
    unsafe impl aya::Pod for NameText {}
    unsafe impl aya::Pod for DnsConfig {}
    unsafe impl aya::Pod for DnsEvent {}
}

#[cfg(test)]
mod socket_table_tests {
    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;

    /// The socket table as the kernel fills it (`socket_table.rs`): a record takes the first
    /// free of its `SOCKET_PROBES` slots, in order. Cookies in sequence, a socket picked at
    /// random closing as each new one opens, `MAX_SOCKETS / live_share` open. Returns the
    /// share of new sockets that found no place.
    fn refused_under_churn(live_share: u32) -> f64 {
        let mut slots = vec![0u64; MAX_SOCKETS as usize];
        let mut live: Vec<u32> = Vec::new();
        let mut random = 0x2545_F491_4F6C_DD1Du64;
        let (mut refused, mut opened) = (0u64, 0u64);
        for cookie in 1..=4 * MAX_SOCKETS as u64 {
            if live.len() == (MAX_SOCKETS / live_share) as usize {
                random ^= random << 13;
                random ^= random >> 7;
                random ^= random << 17;
                let gone = live.swap_remove((random % live.len() as u64) as usize);
                slots[gone as usize] = 0;
            }
            let free = (0..SOCKET_PROBES)
                .map(|probe| socket_slot(cookie, probe))
                .find(|&slot| slots[slot as usize] == 0);
            opened += 1;
            match free {
                Some(slot) => {
                    slots[slot as usize] = cookie;
                    live.push(slot);
                }
                None => refused += 1,
            }
        }
        refused as f64 / opened as f64
    }

    /// None refused a tenth full, few a quarter full (a hash's lower bits as the first
    /// slot refused 4.5 %), a twentieth half full (the cookie's own slot and the three after
    /// it refused 23 %). A hash alone for every slot refused none a quarter full, but put
    /// each new socket on a cold page.
    #[test]
    fn sequential_cookies_under_churn_find_a_place() {
        let tenth = refused_under_churn(10);
        assert!(
            tenth == 0.0,
            "a tenth full: {tenth} of new sockets found no place"
        );
        let quarter = refused_under_churn(4);
        assert!(
            quarter < 0.005,
            "a quarter full: {quarter} of new sockets found no place"
        );
        let half = refused_under_churn(2);
        assert!(half < 0.1, "half full: {half} of new sockets found no place");
    }

    #[test]
    fn every_slot_is_in_the_table() {
        for cookie in [0, 1, u32::MAX as u64, u64::MAX, 0x1234_5678_9abc_def0] {
            for probe in 0..SOCKET_PROBES {
                assert!(socket_slot(cookie, probe) < MAX_SOCKETS);
            }
        }
    }
}
