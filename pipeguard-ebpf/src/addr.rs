//! Destination addresses as the programs see them, canonicalized before any lookup.

/// A destination: IPv4 (stored as an IPv4-mapped IPv6 address) or IPv6, network order bytes.
/// 8-aligned and built from words, so it is written and compared a word at a time (at
/// byte alignment LLVM moves it a byte at a time, on every packet).
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct Dest {
    pub addr: [u8; 16],
    pub is_v4: bool,
}

/// The third word of an IPv4-mapped IPv6 address (::ffff:0:0/96), in memory order.
const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Dest {
    /// `ip` is in network byte order as the kernel hands it over (u32 read from memory).
    #[inline(always)]
    pub fn v4(ip: u32) -> Self {
        Self {
            addr: words_to_bytes([0, 0, V4_MAPPED, ip]),
            is_v4: true,
        }
    }

    /// `words` are the four network-order u32s of an IPv6 address. An IPv4-mapped address
    /// (::ffff:a.b.c.d) becomes IPv4: on the wire it is IPv4 traffic, and only IPv4 rules
    /// may allow it.
    #[inline(always)]
    pub fn v6(words: [u32; 4]) -> Self {
        Self {
            addr: words_to_bytes(words),
            is_v4: words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED,
        }
    }

    /// Whether `addr` is this destination, compared as two words. `addr` must be 8-aligned,
    /// as every address field of the map records is (a field at offset 8k of a u64-aligned
    /// `repr(C)` struct).
    #[inline(always)]
    pub fn is(&self, addr: &[u8; 16]) -> bool {
        let (a, b) = (self.addr.as_ptr().cast::<u64>(), addr.as_ptr().cast::<u64>());
        // SAFETY: both 16 bytes, 8-aligned (self: `align(8)`; addr: the caller's promise).
        unsafe { *a == *b && *a.add(1) == *b.add(1) }
    }

    #[inline(always)]
    pub fn from_v6_bytes(addr: [u8; 16]) -> Self {
        Self::v6(bytes_to_words(addr))
    }

    /// The address as four network-order u32s (what `bpf_sock_tuple` and the context hold).
    #[inline(always)]
    pub fn words(&self) -> [u32; 4] {
        bytes_to_words(self.addr)
    }

    #[inline(always)]
    pub fn v4_bytes(&self) -> [u8; 4] {
        [self.addr[12], self.addr[13], self.addr[14], self.addr[15]]
    }
}

#[inline(always)]
fn words_to_bytes(words: [u32; 4]) -> [u8; 16] {
    // SAFETY: same size, every bit pattern is valid for both.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) }
}

#[inline(always)]
fn bytes_to_words(addr: [u8; 16]) -> [u32; 4] {
    // SAFETY: same size, every bit pattern is valid for both.
    unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(addr) }
}
