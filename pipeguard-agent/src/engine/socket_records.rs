//! The kernel's per-socket table (`PG_SOCKETS_*`: an mmapable array of
//! `SocketRecord`s), read in place: a scan of read-only mappings instead of a lookup
//! syscall per slot. Mapped a window (about a megabyte) at a time and unmapped after, so
//! the tables' pages (the kernel's memory, counted as BPF map memory) neither sit in the
//! agent's RSS nor raise its peak by the table's size. The kernel
//! writes the slots meanwhile, so a record read here may be torn; what is read (counts,
//! flow statistics not yet settled, accepted connections' pods) is a sample anyway.

use std::{
    io,
    marker::PhantomData,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
};

use aya::maps::MapData;
use pipeguard_common::{MAX_SOCKETS, SocketRecord};

pub struct SocketRecords<T: SocketRecord> {
    map: MapData,
    name: &'static str,
    _records: PhantomData<T>,
}

impl<T: SocketRecord> SocketRecords<T> {
    pub fn new(map: MapData, name: &'static str) -> Self {
        Self {
            map,
            name,
            _records: PhantomData,
        }
    }

    /// Sockets with a record; 0, with a warning, when the table cannot be mapped.
    pub fn count(&self) -> usize {
        let mut count = 0;
        self.scan(|w| count += (0..w.len).filter(|&i| w.taken(i)).count());
        count
    }

    /// Every record, copied out; those of the windows mapped, with a warning, when the
    /// table cannot be.
    pub fn records(&self) -> Vec<T> {
        let mut records = Vec::new();
        self.scan(|w| records.extend((0..w.len).filter(|&i| w.taken(i)).map(|i| w.record(i))));
        records
    }

    fn scan(&self, mut f: impl FnMut(&Window<T>)) {
        let mut first = 0;
        while first < MAX_SOCKETS as usize {
            match Window::map(&self.map, first) {
                Ok(w) => f(&w),
                Err(error) => {
                    tracing::warn!(map = self.name, %error, "cannot map the socket table to read it");
                    return;
                }
            }
            first += Window::<T>::SLOTS;
        }
    }
}

const fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// A read-only mapping of `SLOTS` slots of a table, from slot `first`; unmapped on drop.
struct Window<T: SocketRecord> {
    slots: NonNull<T>,
    len: usize,
}

impl<T: SocketRecord> Window<T> {
    const PAGE: usize = 4096;
    /// Whole pages of whole slots (the array's slots are the value size, a `SocketRecord`'s
    /// being a multiple of 8 already): a window starts at a page, as mmap's offset must.
    const BYTES: usize = {
        let unit = Self::PAGE / gcd(Self::PAGE, size_of::<T>()) * size_of::<T>();
        unit * (1usize << 20).div_ceil(unit)
    };
    const SLOTS: usize = Self::BYTES / size_of::<T>();

    fn map(map: &MapData, first: usize) -> io::Result<Self> {
        let len = Self::SLOTS.min(MAX_SOCKETS as usize - first);
        // SAFETY: a fresh read-only mapping of slots the array has, unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len * size_of::<T>(),
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                (first * size_of::<T>()) as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let slots = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { slots, len })
    }

    /// Slot `i` holds a socket's record (its cookie, the first 8 bytes, is not 0).
    fn taken(&self, i: usize) -> bool {
        // SAFETY: in the mapping; one aligned volatile load.
        unsafe { self.slots.as_ptr().add(i).cast::<u64>().read_volatile() != 0 }
    }

    fn record(&self, i: usize) -> T {
        // SAFETY: in the mapping, aligned; a `SocketRecord` is plain data.
        unsafe { self.slots.as_ptr().add(i).read_volatile() }
    }
}

impl<T: SocketRecord> Drop for Window<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, not used after this.
        unsafe { libc::munmap(self.slots.as_ptr().cast(), self.len * size_of::<T>()) };
    }
}
