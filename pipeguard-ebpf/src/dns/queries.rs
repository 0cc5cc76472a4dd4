//! The outstanding-query table: sets of `QUERY_WAYS` slots in an array, read and written
//! with plain loads and stores. A hash map update (bucket lock, LRU lists) cost more than
//! the rest of the query check; a slot costs a few stores. Nothing locks a slot, so a slot
//! counts only when its seal matches what it holds: a torn write is an empty slot.

use pipeguard_common::{QUERY_WAYS, QueryKey, QuerySlot, QueryState, query_seal, query_set, same_query};

use crate::maps::DNS_QUERIES;

/// Remembers an allowed query: in the slot it already holds (a retransmission), else in a
/// free or expired slot of its set, else (`overwrite`) over the query of its set closest to
/// expiry.
#[inline(always)]
pub fn record(key: &QueryKey, state: &QueryState, now: u64, overwrite: bool) {
    let set = query_set(key);
    let mut pick = set;
    let mut soonest = u64::MAX;
    let mut way = 0;
    while way < QUERY_WAYS {
        let Some(slot) = DNS_QUERIES.get_ptr(set + way) else {
            return;
        };
        let slot = unsafe { &*slot };
        if slot.seal == 0 || slot.state.expires_ns <= now || same_query(&slot.key, key) {
            pick = set + way;
            break;
        }
        if slot.state.expires_ns < soonest {
            soonest = slot.state.expires_ns;
            pick = set + way;
        }
        way += 1;
    }
    if way == QUERY_WAYS && !overwrite {
        return;
    }
    let Some(slot) = DNS_QUERIES.get_ptr_mut(pick) else {
        return;
    };
    unsafe {
        // In order, the seal last (volatile stores keep their order): a reader that sees
        // the seal sees what it seals; one that reads between the stores sees a mismatch.
        core::ptr::write_volatile(&raw mut (*slot).key, *key);
        core::ptr::write_volatile(&raw mut (*slot).state, *state);
        core::ptr::write_volatile(&raw mut (*slot).seal, query_seal(key, state));
    }
}

/// The query `key` still waiting, and its slot for `consume`.
#[inline(always)]
pub fn find(key: &QueryKey) -> Option<(u32, QueryState)> {
    let set = query_set(key);
    let mut way = 0;
    while way < QUERY_WAYS {
        let slot: QuerySlot = unsafe { *DNS_QUERIES.get_ptr(set + way)? };
        if slot.seal != 0 && same_query(&slot.key, key) && slot.seal == query_seal(&slot.key, &slot.state) {
            return Some((set + way, slot.state));
        }
        way += 1;
    }
    None
}

/// Frees the slot of an answered query: a replayed or duplicated answer finds nothing.
#[inline(always)]
pub fn consume(index: u32) {
    if let Some(slot) = DNS_QUERIES.get_ptr_mut(index) {
        unsafe { core::ptr::write_volatile(&raw mut (*slot).seal, 0) };
    }
}
