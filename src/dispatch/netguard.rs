//! Which addresses an outbound attempt may connect to (the SSRF guard).
//!
//! Customers type endpoint URLs, and the engine runs inside their network: a URL must not be a
//! way to reach loopback, private or otherwise non-public addresses. [`AddressPolicy::check`]
//! is applied to every address a host resolves to — before connecting, to the very address that
//! is then connected to (see `client`), so a second DNS answer cannot slip past it. Addresses in
//! `delivery.private_network_allowlist` are exempt; a webhook's own `ip_allowlist` further pins
//! which addresses it may be called on.
//!
//! A [`Refusal`] names the address and why it was refused. That is for the operator's log only:
//! a tenant who saw it could map the internal network with webhook URLs, so `client` shows
//! tenants one fixed text for every refusal.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Why an address is not public, or `None` when it is.
pub fn non_public_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => v6_reason(v6),
    }
}

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    Some(match o {
        [127, ..] => "loopback",
        [10, ..] => "private (RFC 1918)",
        [172, b, ..] if (16..=31).contains(&b) => "private (RFC 1918)",
        [192, 168, ..] => "private (RFC 1918)",
        [100, b, ..] if (64..=127).contains(&b) => "shared address space (CGNAT)",
        [169, 254, ..] => "link-local",
        [0, ..] => "unspecified (\"this network\")",
        [255, 255, 255, 255] => "broadcast",
        [a, ..] if (224..=239).contains(&a) => "multicast",
        [a, ..] if a >= 240 => "reserved",
        [192, 0, 0, _] => "IETF protocol assignments",
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => "documentation",
        [198, b, ..] if b == 18 || b == 19 => "benchmarking",
        _ => return None,
    })
}

fn v6_reason(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = embedded_v4(ip) {
        return v4_reason(v4);
    }
    if is_local_nat64(ip) {
        // Not the /96 form: where the IPv4 address sits depends on a prefix length only the
        // operator's translator knows, so it cannot be checked and is not called.
        return Some("local-use NAT64 (RFC 8215) with an unknown prefix length");
    }
    let s = ip.segments();
    Some(match s {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_unspecified() => "unspecified",
        [a, ..] if a & 0xfe00 == 0xfc00 => "unique local (ULA)",
        [a, ..] if a & 0xffc0 == 0xfe80 => "link-local",
        [a, ..] if a & 0xffc0 == 0xfec0 => "site-local",
        [a, ..] if a & 0xff00 == 0xff00 => "multicast",
        [0x2001, 0x0db8, ..] => "documentation",
        [0x2001, 0, ..] => "Teredo",
        [0x0100, 0, 0, 0, ..] => "discard-only",
        _ => return None,
    })
}

/// The IPv4 address inside an IPv6 address that reaches one: IPv4-mapped (`::ffff:0:0/96`),
/// IPv4-translated (`::ffff:0:0:0/96`, SIIT), IPv4-compatible, the well-known NAT64 prefix
/// (`64:ff9b::/96`), the /96 form of the local-use NAT64 prefix (`64:ff9b:1::/48`, RFC 8215)
/// and 6to4. A translator on the path turns each into a connection to that IPv4 address, so
/// that address is what must be public.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let from = |hi: u16, lo: u16| Ipv4Addr::from(((hi as u32) << 16) | lo as u32);
    match s {
        [0, 0, 0, 0, 0, 0xffff, hi, lo] => Some(from(hi, lo)),
        [0, 0, 0, 0, 0xffff, 0, hi, lo] => Some(from(hi, lo)),
        // IPv4-compatible (deprecated), but not :: and ::1.
        [0, 0, 0, 0, 0, 0, hi, lo] if hi != 0 => Some(from(hi, lo)),
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(from(hi, lo)),
        [0x64, 0xff9b, 1, 0, 0, 0, hi, lo] => Some(from(hi, lo)),
        [0x2002, hi, lo, ..] => Some(from(hi, lo)),
        _ => None,
    }
}

/// Inside `64:ff9b:1::/48`, the local-use NAT64 prefix.
fn is_local_nat64(ip: Ipv6Addr) -> bool {
    matches!(ip.segments(), [0x64, 0xff9b, 1, ..])
}

/// Compares an address in its IPv4 form when it is an IPv4-mapped IPv6 address, so an
/// allowlist of `127.0.0.0/8` covers `::ffff:127.0.0.1` as well.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn contains(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = canonical(ip);
    nets.iter().any(|n| n.contains(&ip))
}

/// The rules for one webhook's attempts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct AddressPolicy {
    /// `delivery.private_network_allowlist`: non-public addresses that may be called anyway.
    pub private_allowlist: Vec<IpNet>,
    /// The webhook's `ip_allowlist`: when non-empty, the only addresses it may be called on.
    pub pin: Vec<IpNet>,
}

/// Why an address may not be called. The text names the address: operator log only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("address {0} is not in the webhook's ip_allowlist")]
    NotPinned(IpAddr),
    #[error("address {ip} is {reason} and not in delivery.private_network_allowlist")]
    NonPublic { ip: IpAddr, reason: &'static str },
}

impl AddressPolicy {
    pub fn check(&self, ip: IpAddr) -> Result<(), Refusal> {
        if !self.pin.is_empty() && !contains(&self.pin, ip) {
            return Err(Refusal::NotPinned(ip));
        }
        if let Some(reason) = non_public_reason(canonical(ip)) {
            if !contains(&self.private_allowlist, ip) {
                return Err(Refusal::NonPublic { ip, reason });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn non_public_ranges_are_refused() {
        for s in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "192.0.2.5",
            "198.18.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
            "2001:db8::1",
            "2001::1",
            "::ffff:169.254.169.254",
            // IPv4-translated (SIIT) and local-use NAT64 forms of private addresses.
            "::ffff:0:10.0.0.1",
            "::ffff:0:127.0.0.1",
            "::ffff:0:169.254.169.254",
            "64:ff9b:1::10.0.0.1",
            "64:ff9b:1::192.168.1.1",
            "64:ff9b:1::7f00:1",
            // Local-use NAT64 with a shorter prefix: the embedded address is not known.
            "64:ff9b:1:a00:1::",
            "64:ff9b:1:1:2:3:808:808",
        ] {
            assert!(
                non_public_reason(ip(s)).is_some(),
                "{s} should be non-public"
            );
        }
    }

    #[test]
    fn public_addresses_pass() {
        for s in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "2002:808:808::",
            "64:ff9b::8.8.8.8",
            "64:ff9b:1::8.8.8.8",
            "::ffff:0:8.8.8.8",
        ] {
            assert_eq!(non_public_reason(ip(s)), None, "{s}");
        }
    }

    #[test]
    fn allowlist_exempts_and_pin_restricts() {
        let open = AddressPolicy::default();
        assert!(open
            .check(ip("127.0.0.1"))
            .unwrap_err()
            .to_string()
            .contains("loopback"));
        let lo = AddressPolicy {
            private_allowlist: vec!["127.0.0.0/8".parse().unwrap()],
            pin: vec![],
        };
        assert!(lo.check(ip("127.0.0.1")).is_ok());
        assert!(lo.check(ip("::ffff:127.0.0.1")).is_ok());
        assert!(lo.check(ip("10.0.0.1")).is_err());
        let pinned = AddressPolicy {
            pin: vec!["192.0.2.0/24".parse().unwrap()],
            ..lo.clone()
        };
        assert_eq!(
            pinned.check(ip("127.0.0.1")),
            Err(Refusal::NotPinned(ip("127.0.0.1")))
        );
        let pinned_public = AddressPolicy {
            pin: vec!["8.8.8.0/24".parse().unwrap()],
            private_allowlist: vec![],
        };
        assert!(pinned_public.check(ip("8.8.8.8")).is_ok());
        assert!(pinned_public.check(ip("1.1.1.1")).is_err());
    }
}
