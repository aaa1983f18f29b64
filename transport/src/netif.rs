//! The machine's network interfaces: which address other hosts can reach a
//! listener on when it is bound to all interfaces (0.0.0.0).

use std::net::{IpAddr, Ipv4Addr};

/// IPv4 addresses of interfaces that are up, by interface name, loopback
/// last. Empty when they cannot be read.
pub fn interface_addresses() -> Vec<(String, Ipv4Addr)> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we only read and then free
    // with freeifaddrs; every pointer is checked for null before use.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let ifa = &*cur;
            cur = ifa.ifa_next;
            if ifa.ifa_addr.is_null() || (*ifa.ifa_addr).sa_family as i32 != libc::AF_INET {
                continue;
            }
            if ifa.ifa_flags & libc::IFF_UP as u32 == 0 {
                continue;
            }
            let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            let name = std::ffi::CStr::from_ptr(ifa.ifa_name).to_string_lossy().into_owned();
            out.push((name, ip));
        }
        libc::freeifaddrs(head);
    }
    out.sort_by_key(|(_, ip)| ip.is_loopback());
    out
}

/// The IPv4 address of network interface `name` (`ib0`, `eth0`, `lo`).
pub fn interface_ip(name: &str) -> Option<Ipv4Addr> {
    interface_addresses().into_iter().find(|(n, _)| n == name).map(|(_, ip)| ip)
}

/// The address to advertise for a listener bound to all interfaces: the
/// first non-loopback IPv4 address of an interface that is up (what a
/// worker on another node of the cluster can reach), else loopback.
pub fn contact_ip() -> IpAddr {
    interface_addresses()
        .into_iter()
        .map(|(_, ip)| ip)
        .find(|ip| !ip.is_loopback() && !ip.is_link_local())
        .map(IpAddr::V4)
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}
