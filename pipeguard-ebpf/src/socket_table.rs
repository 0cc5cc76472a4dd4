//! The per-socket tables (`SOCKETS`, `ACCEPTED`): records by socket cookie in an array,
//! open addressing. A record takes the first free slot of the `SOCKET_PROBES` from its
//! cookie's `socket_home`, claimed by a compare-and-swap of the slot's cookie (its first
//! field, see `SocketRecord`), and frees it by zeroing that cookie. A lookup is a few
//! inlined array reads; an LRU hash map's insert and delete (bucket lock, LRU lists, a cold
//! element) were half of a socket's hooks.
//!
//! A record is written only by its own socket's hooks after the claim, so no other socket's
//! write tears it. When every probed slot is taken the socket gets no record: as for a
//! socket older than the programs, its hooks judge it without one.

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg},
    ptr::{null_mut, read_volatile, write_volatile},
};

use aya_ebpf::maps::Array;
use pipeguard_common::{MAX_SOCKETS, SOCKET_PROBES, SocketRecord, socket_home};

/// The record of the socket with `cookie` in `table`; null when it has none.
#[inline(always)]
pub fn find<T: SocketRecord>(table: &Array<T>, cookie: u64) -> *mut T {
    let home = socket_home(cookie);
    let mut probe = 0;
    while probe < SOCKET_PROBES {
        if let Some(slot) = table.get_ptr_mut((home + probe) & (MAX_SOCKETS - 1)) {
            // SAFETY: a slot of the array; its cookie is read once, whole.
            if unsafe { read_volatile(slot.cast::<u64>()) } == cookie {
                return slot;
            }
        }
        probe += 1;
    }
    null_mut()
}

/// Claims a free slot of `table` for the socket with `cookie` (not 0) and returns it with
/// every other field zeroed, for the caller to fill; null when all probed slots are taken.
/// Two hooks of one socket claiming at once (UDP sends from two CPUs) meet at the first
/// free slot, where the loser finds the cookie and shares the record; a slot freed between
/// their walks can still give the socket two, which `remove` frees together.
#[inline(always)]
pub fn claim<T: SocketRecord>(table: &Array<T>, cookie: u64) -> *mut T {
    let home = socket_home(cookie);
    let mut probe = 0;
    while probe < SOCKET_PROBES {
        if let Some(slot) = table.get_ptr_mut((home + probe) & (MAX_SOCKETS - 1)) {
            // SAFETY: a slot of the array. The swap makes the slot this socket's alone.
            let (held, claimed) = unsafe {
                atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                    slot.cast::<u64>(),
                    0,
                    cookie,
                )
            };
            if claimed {
                clear_fields(slot);
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

/// Frees every slot of `table` holding the socket with `cookie` (it is gone).
#[inline(always)]
pub fn remove<T: SocketRecord>(table: &Array<T>, cookie: u64) {
    let home = socket_home(cookie);
    let mut probe = 0;
    while probe < SOCKET_PROBES {
        if let Some(slot) = table.get_ptr_mut((home + probe) & (MAX_SOCKETS - 1)) {
            // SAFETY: a slot of the array, whose first field is the cookie.
            let words = slot.cast::<u64>();
            if unsafe { read_volatile(words) } == cookie {
                unsafe { write_volatile(words, 0) };
            }
        }
        probe += 1;
    }
}

/// Zeroes every field but the cookie, one 8-byte store per word (see `zeroed`).
#[inline(always)]
fn clear_fields<T: SocketRecord>(slot: *mut T) {
    let words = slot.cast::<u64>();
    let mut i = 1;
    while i < core::mem::size_of::<T>() / 8 {
        // SAFETY: in bounds; a `SocketRecord` is 8-byte aligned, its size a multiple of 8.
        unsafe { write_volatile(words.add(i), 0) };
        i += 1;
    }
}
