//! Destination addresses as the programs see them, canonicalized before any lookup.

/// A destination: IPv4 (stored as an IPv4-mapped IPv6 address) or IPv6, network order bytes.
#[derive(Clone, Copy)]
pub struct Dest {
    pub addr: [u8; 16],
    pub is_v4: bool,
}

impl Dest {
    /// `ip` is in network byte order as the kernel hands it over (u32 read from memory).
    #[inline(always)]
    pub fn v4(ip: u32) -> Self {
        let b = ip.to_ne_bytes();
        Self {
            addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3]],
            is_v4: true,
        }
    }

    /// `words` are the four network-order u32s of an IPv6 address. An IPv4-mapped address
    /// (::ffff:a.b.c.d) becomes IPv4: on the wire it is IPv4 traffic, and only IPv4 rules
    /// may allow it.
    #[inline(always)]
    pub fn v6(words: [u32; 4]) -> Self {
        let mut addr = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = words[i].to_ne_bytes();
            addr[i * 4] = b[0];
            addr[i * 4 + 1] = b[1];
            addr[i * 4 + 2] = b[2];
            addr[i * 4 + 3] = b[3];
            i += 1;
        }
        Self::from_v6_bytes(addr)
    }

    #[inline(always)]
    pub fn from_v6_bytes(addr: [u8; 16]) -> Self {
        let mapped = addr[..10].iter().all(|b| *b == 0) && addr[10] == 0xff && addr[11] == 0xff;
        Self { addr, is_v4: mapped }
    }

    #[inline(always)]
    pub fn v4_bytes(&self) -> [u8; 4] {
        [self.addr[12], self.addr[13], self.addr[14], self.addr[15]]
    }
}
