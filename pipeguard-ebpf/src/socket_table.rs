//! The per-socket table (`SOCKETS`): records by socket cookie in an array,
//! open addressing. A record takes the first free of its cookie's `SOCKET_PROBES` slots
//! (`socket_slot`), claimed by a compare-and-swap of the slot's cookie (its first
//! field, see `SocketRecord`), and frees it by zeroing that cookie. A lookup is a few
//! inlined array reads; an LRU hash map's insert and delete (bucket lock, LRU lists, a cold
//! element) were half of a socket's hooks.
//!
//! A record is written only by its own socket's hooks after the claim, so no other socket's
//! write tears it, and a free slot is all zeros (`free` zeroes the fields before the
//! cookie), so a hook that finds a record being written reads zeros, never another
//! socket's fields: no pod, nothing remembered. When every probed slot is taken the socket
//! gets no record: as for a socket older than the programs, its hooks judge it without one.

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg},
    ptr::{null_mut, read_volatile, write_volatile},
};

use aya_ebpf::maps::Array;
use pipeguard_common::{SOCKET_PROBES, SocketRecord, socket_slot};

use crate::zeroed;

/// The record of the socket with `cookie` in `table`; null when it has none.
#[inline(always)]
pub fn find<T: SocketRecord>(table: &Array<T>, cookie: u64) -> *mut T {
    let mut probe = 0;
    while probe < SOCKET_PROBES {
        if let Some(slot) = table.get_ptr_mut(socket_slot(cookie, probe)) {
            // SAFETY: a slot of the array; its cookie is read once, whole.
            if unsafe { read_volatile(slot.cast::<u64>()) } == cookie {
                return slot;
            }
        }
        probe += 1;
    }
    null_mut()
}

/// Claims a free slot of `table` for the socket with `cookie` (not 0) and returns it, its
/// other fields zeroed, for the caller to fill; null when all probed slots are taken.
/// Two hooks of one socket claiming at once (the packet hook on two CPUs, for a UDP socket
/// older than the programs) meet at the first free slot, where the loser finds the cookie
/// and shares the record. Only a slot freed between their two walks can give the socket a
/// second record, which would then outlive it: a leak of one slot, not a wrong verdict.
#[inline(always)]
pub fn claim<T: SocketRecord>(table: &Array<T>, cookie: u64) -> *mut T {
    let mut probe = 0;
    while probe < SOCKET_PROBES {
        if let Some(slot) = table.get_ptr_mut(socket_slot(cookie, probe)) {
            // SAFETY: a slot of the array. The swap makes the slot this socket's alone.
            let (held, claimed) = unsafe {
                atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                    slot.cast::<u64>(),
                    0,
                    cookie,
                )
            };
            if claimed {
                // Zero already, unless a hook of the slot's last socket wrote after `free`
                // (its last packet on another CPU): nothing of that socket may carry over.
                // SAFETY: the slot this socket just claimed.
                unsafe { zeroed::words_from(slot, 1) };
                return slot;
            }
            if held == cookie {
                return slot;
            }
        }
        probe += 1;
    }
    null_mut()
}

/// Frees a record `find` or `claim` returned (null: nothing to free): its fields are
/// zeroed, then its cookie.
#[inline(always)]
pub fn free<T: SocketRecord>(record: *mut T) {
    if record.is_null() {
        return;
    }
    // SAFETY: a slot of an array of `T`, whose first field is the cookie: the fields
    // first, then the cookie.
    unsafe {
        zeroed::words_from(record, 1);
        write_volatile(record.cast::<u64>(), 0);
    }
}
