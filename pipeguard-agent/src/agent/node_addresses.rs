//! The node's own addresses, for `--ingress-from-node auto`: every address of every
//! interface of the agent's network namespace (the agent runs with hostNetwork). Traffic
//! the node sends to a pod (the kubelet's probes) comes from one of them.

use std::net::IpAddr;

use ipnet::IpNet;

/// Every interface address, as a host prefix (/32, /128), sorted and without repeats.
pub fn node_addresses() -> std::io::Result<Vec<IpNet>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: a node of the list getifaddrs returned; its address, when present, is a
        // sockaddr of the family it names.
        let ip = unsafe {
            let addr = (*cursor).ifa_addr;
            cursor = (*cursor).ifa_next;
            if addr.is_null() {
                continue;
            }
            match i32::from((*addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*addr.cast::<libc::sockaddr_in>();
                    IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes())
                }
                libc::AF_INET6 => {
                    let sin6 = &*addr.cast::<libc::sockaddr_in6>();
                    IpAddr::from(sin6.sin6_addr.s6_addr)
                }
                _ => continue,
            }
        };
        out.push(IpNet::from(ip));
    }
    // SAFETY: the list getifaddrs allocated, freed once.
    unsafe { libc::freeifaddrs(list) };
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_among_the_nodes_addresses() {
        let addresses = node_addresses().unwrap();
        assert!(
            addresses.contains(&"127.0.0.1/32".parse().unwrap()),
            "{addresses:?}"
        );
        assert!(addresses.iter().all(|n| n.prefix_len() == n.max_prefix_len()));
    }
}
