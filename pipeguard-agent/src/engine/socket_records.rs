//! The kernel's per-socket tables (`PG_SOCKETS_*`, `PG_ACCEPTED_*`: mmapable arrays of
//! `SocketRecord`s), read in place: a scan of the mapping instead of a lookup syscall per
//! slot. The kernel writes the slots meanwhile, so a record read here may be torn; what is
//! read (counts, flow statistics not yet settled, accepted connections' pods) is a sample
//! anyway.

use std::{
    io,
    marker::PhantomData,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
};

use aya::maps::MapData;
use pipeguard_common::{MAX_SOCKETS, SocketRecord};

pub struct SocketRecords<T: SocketRecord> {
    slots: NonNull<T>,
    // The map stays open while it is mapped.
    _map: MapData,
    _records: PhantomData<T>,
}

// SAFETY: a read-only shared mapping, read with volatile loads only.
unsafe impl<T: SocketRecord> Send for SocketRecords<T> {}
unsafe impl<T: SocketRecord> Sync for SocketRecords<T> {}

impl<T: SocketRecord> SocketRecords<T> {
    // The array's slots are the value size rounded to 8, which a `SocketRecord` already is.
    const BYTES: usize = MAX_SOCKETS as usize * size_of::<T>();

    pub fn map(map: MapData) -> io::Result<Self> {
        // SAFETY: a fresh read-only mapping of the array's values, unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::BYTES,
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let slots = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self {
            slots,
            _map: map,
            _records: PhantomData,
        })
    }

    /// Sockets with a record.
    pub fn count(&self) -> usize {
        (0..MAX_SOCKETS as usize).filter(|&i| self.taken(i)).count()
    }

    /// Every record, copied out.
    pub fn records(&self) -> impl Iterator<Item = T> + '_ {
        (0..MAX_SOCKETS as usize).filter(|&i| self.taken(i)).map(|i| {
            // SAFETY: in the mapping, aligned; a `SocketRecord` is plain data.
            unsafe { self.slots.as_ptr().add(i).read_volatile() }
        })
    }

    /// Slot `i` holds a socket's record (its cookie, the first 8 bytes, is not 0).
    fn taken(&self, i: usize) -> bool {
        // SAFETY: in the mapping; one aligned volatile load.
        unsafe { self.slots.as_ptr().add(i).cast::<u64>().read_volatile() != 0 }
    }
}

impl<T: SocketRecord> Drop for SocketRecords<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, not used after this.
        unsafe { libc::munmap(self.slots.as_ptr().cast(), Self::BYTES) };
    }
}
