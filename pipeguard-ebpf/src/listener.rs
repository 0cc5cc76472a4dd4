//! A listener's record in the socket table keeps its pod's entry under the policy
//! generation (`REMEMBERED_LISTENER`), so the packets the ingress hook judges on a listener
//! (a connection's SYN and last ACK) and the listener's SYN-ACKs at the egress hook find the
//! pod with the lookup of the listener's record instead of the walk up the cgroup tree and
//! the pod table. A change of the pod table or of an allowlist moves the generation, and the
//! next packet walks and writes the entry again.
//!
//! A listener accepts on several CPUs at once, so its record has many writers: a writer
//! takes it by swapping the stale generation for `WRITING` (which no reader trusts), writes
//! the entry, then the generation it read before its walk. A reader reads the generation
//! again after the fields and walks when it moved. A record that remembers a destination (a
//! SYN-ACK the slow path judged, under learning) gets no entry, and the fast path never
//! takes an entry for a destination (`fast::remembered`).
//!
//! With the entry, the record keeps the last IPv4 source and local port the pod's ingress
//! allowlist admitted, with the generation's low 16 bits, in one 8-byte word (the first
//! half of `addr`: a record with an entry remembers no destination). A handshake's last
//! ACK, and any SYN from the same source, skip the trie. The word is written and read
//! whole; writing the entry clears it, and the generation bits turn away a word that an
//! admission judged under the previous generation writes after that.

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg},
    ptr::{addr_of, addr_of_mut, read_volatile, write_volatile},
};

use pipeguard_common::{POLICY_GENERATION_NONE, PodEntry, REMEMBERED_LISTENER, SocketState};

use crate::{addr::Dest, pod::Pod};

/// The generation of a record being written: never the current one.
const WRITING: u64 = u64::MAX;

/// The pod whose entry the listener's record (`state`, null: none) holds under the current
/// `generation`.
#[inline(always)]
pub fn pod(state: *const SocketState, generation: u64) -> Option<Pod> {
    if state.is_null() || generation == POLICY_GENERATION_NONE {
        return None;
    }
    // SAFETY: a slot of the socket table, each field read once, whole.
    unsafe {
        if read_volatile(addr_of!((*state).generation)) != generation
            || read_volatile(addr_of!((*state).remembered)) != REMEMBERED_LISTENER
            || read_volatile(addr_of!((*state).protocol)) != 0
        {
            return None;
        }
        let pod = Pod {
            cgroup_id: read_volatile(addr_of!((*state).pod_cgroup_id)),
            entry: PodEntry {
                policy_id: read_volatile(addr_of!((*state).policy_id)),
                mode: read_volatile(addr_of!((*state).mode)),
                flags: read_volatile(addr_of!((*state).pod_flags)),
                ingress_policy_id: read_volatile(addr_of!((*state).ingress_policy_id)),
                counter_slot: read_volatile(addr_of!((*state).counter_slot)),
                _pad: 0,
            },
        };
        (read_volatile(addr_of!((*state).generation)) == generation).then_some(pod)
    }
}

/// After the walk found `pod` for a packet of the listener whose record is `state` (null:
/// none), `generation` read before the walk: the record keeps the pod's entry, if it is
/// this pod's and remembers no destination.
#[inline(always)]
pub fn remember(state: *mut SocketState, pod: &Pod, generation: u64) {
    if state.is_null() || generation == POLICY_GENERATION_NONE {
        return;
    }
    // SAFETY: a slot of the socket table; the swap makes this CPU its only writer.
    unsafe {
        let held = read_volatile(addr_of!((*state).generation));
        let cookie = read_volatile(addr_of!((*state).cookie));
        if held == generation
            || held == WRITING
            || read_volatile(addr_of!((*state).pod_cgroup_id)) != pod.cgroup_id
            || read_volatile(addr_of!((*state).protocol)) != 0
            || read_volatile(addr_of!((*state).remembered)) & !REMEMBERED_LISTENER != 0
        {
            return;
        }
        let (_, taken) = atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            addr_of_mut!((*state).generation),
            held,
            WRITING,
        );
        if !taken {
            return;
        }
        write_volatile(addr_of_mut!((*state).remembered), REMEMBERED_LISTENER);
        write_volatile(addr_of_mut!((*state).policy_id), pod.entry.policy_id);
        write_volatile(addr_of_mut!((*state).mode), pod.entry.mode);
        write_volatile(addr_of_mut!((*state).pod_flags), pod.entry.flags);
        write_volatile(
            addr_of_mut!((*state).ingress_policy_id),
            pod.entry.ingress_policy_id,
        );
        write_volatile(addr_of_mut!((*state).counter_slot), pod.entry.counter_slot);
        // Admitted under an older generation: forgotten, not merely outdated (the key keeps
        // only the generation's low bits).
        write_volatile(addr_of_mut!((*state).addr).cast::<u64>(), 0);
        // The listener closed meanwhile and another socket took the slot: its record stays
        // `WRITING` (nothing trusts it) until its own hooks write it.
        if read_volatile(addr_of!((*state).cookie)) == cookie {
            write_volatile(addr_of_mut!((*state).generation), generation);
        }
    }
}

/// The listener whose record (`state`, null: none) `pod` just read under `generation` last
/// admitted `source` on `port` by its pod's ingress allowlist under this generation.
#[inline(always)]
pub fn admitted(state: *const SocketState, source: &Dest, port: u16, generation: u64) -> bool {
    if state.is_null() {
        return false;
    }
    let Some(key) = source_key(source, port, generation) else {
        return false;
    };
    // SAFETY: a slot of the socket table; `addr` is 8-aligned (asserted in common).
    unsafe { read_volatile(addr_of!((*state).addr).cast::<u64>()) == key }
}

/// After the ingress allowlist of the listener's pod admitted `source` on `port`, judged
/// under `generation` (read before the lookups), with the pod's entry from the listener's
/// record (`state`, null: none).
#[inline(always)]
pub fn remember_admitted(state: *mut SocketState, source: &Dest, port: u16, generation: u64) {
    if state.is_null() {
        return;
    }
    if let Some(key) = source_key(source, port, generation) {
        // SAFETY: as in `admitted`; one 8-byte store.
        unsafe { write_volatile(addr_of_mut!((*state).addr).cast::<u64>(), key) };
    }
}

/// Never 0 (no listener is on port 0), so a record without a source matches nothing.
#[inline(always)]
fn source_key(source: &Dest, port: u16, generation: u64) -> Option<u64> {
    if !source.is_v4 {
        return None;
    }
    let v4 = u32::from_be_bytes(source.v4_bytes());
    Some((u64::from(v4) << 32) | (u64::from(port) << 16) | (generation & 0xffff))
}
