//! Client addresses: address ranges, the forwarding header of a trusted proxy, and how clients
//! are grouped.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An address range (`10.0.0.0/8`, `2001:db8::/32`, or one address). IPv4-mapped IPv6
/// addresses and ranges are treated as IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The range of `addr` under its first `prefix` bits (the other bits are cleared).
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, String> {
        // An IPv4-mapped range of at least 96 bits is the IPv4 range of the rest.
        let (addr, prefix) = match addr.to_canonical() {
            v4 @ IpAddr::V4(_) if addr.is_ipv6() && prefix >= 96 => (v4, prefix - 96),
            _ => (addr, prefix),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("prefix must be <= {max} (got {prefix})"));
        }
        Ok(Cidr {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    /// True when `ip` is in the range (IPv4-mapped addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("not an IP address or CIDR range (got {s:?})"))?;
        let prefix = match prefix {
            None => {
                if addr.is_ipv4() {
                    32
                } else {
                    128
                }
            }
            Some(p) => p
                .parse::<u8>()
                .map_err(|_| format!("not a CIDR prefix length (got {s:?})"))?,
        };
        Cidr::new(addr, prefix)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Clears every bit after the first `prefix`.
pub(crate) fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix.min(32) as u32)
            };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix.min(128) as u32)
            };
            IpAddr::V6((bits & m).into())
        }
    }
}

/// Which header carries the client address when the peer is a trusted proxy. Only the one
/// your proxy sets: a header it passes through untouched would be the client's to forge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (default): the rightmost address that is not a
    /// trusted proxy is the client.
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for="[2001:db8::1]:4711"`: the same walk over the
    /// `for=` parameters.
    Forwarded,
    /// `X-Real-IP: client`, one address set by the proxy.
    XRealIp,
}

/// How the client address is found and grouped.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientIp {
    /// Peers whose forwarding header is believed. Empty (default): the TCP peer is the client.
    pub trusted_proxies: Vec<Cidr>,
    /// The forwarding header.
    pub header: ForwardedHeader,
    /// IPv6 clients are counted per prefix of this length (default 64: one site).
    pub ipv6_prefix: u8,
    /// IPv4 clients are counted per prefix of this length (default 32: one address).
    pub ipv4_prefix: u8,
}

impl Default for ClientIp {
    fn default() -> Self {
        ClientIp {
            trusted_proxies: Vec::new(),
            header: ForwardedHeader::default(),
            ipv6_prefix: 64,
            ipv4_prefix: 32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.200.1.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        let m: Cidr = "::ffff:192.168.0.0/112".parse().unwrap();
        assert_eq!(m.to_string(), "192.168.0.0/16");
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
        let one: Cidr = "192.0.2.7".parse().unwrap();
        assert!(one.contains("192.0.2.7".parse().unwrap()) && !one.contains("192.0.2.8".parse().unwrap()));
    }
}
