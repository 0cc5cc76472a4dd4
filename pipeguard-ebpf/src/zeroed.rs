//! Map keys and values built without `memset`. LLVM merges the zero bytes of a record
//! (`Default`, padding, zero fields next to each other) into a call to this target's
//! `memset`, which stores one byte at a time: five instructions a byte, on hot paths.

use core::mem::{MaybeUninit, align_of, size_of};

/// Zeroes `value` in place, one 8-byte store per word, and returns it for its fields to be
/// written in place. Use it where it lives: a copy of it may become a `memset` again.
#[inline(always)]
pub fn zero<T>(value: &mut MaybeUninit<T>) -> *mut T {
    // SAFETY: a valid, writable `T`.
    unsafe { words_from(value.as_mut_ptr(), 0) };
    value.as_mut_ptr()
}

/// Zeroes the 8-byte words of `*value` from word `first` on (a socket record keeps its
/// cookie, word 0, see `socket_table`).
///
/// # Safety
/// `value` points to a writable `T`.
#[inline(always)]
pub unsafe fn words_from<T>(value: *mut T, first: usize) {
    const { assert!(size_of::<T>() % 8 == 0 && align_of::<T>() >= 8) };
    let words = value.cast::<u64>();
    let mut i = first;
    while i < size_of::<T>() / 8 {
        // SAFETY: in bounds and aligned (asserted above). Volatile, so the stores stay
        // words instead of being merged into a `memset` call.
        unsafe { words.add(i).write_volatile(0) };
        i += 1;
    }
}
