//! Which client a request comes from, for the limits keyed on the client
//! (the per-client reservation cap, §7f), behind a reverse proxy or not.
//!
//! A request's peer is the client unless the peer is a trusted proxy
//! (`--trusted-proxy CIDR`). Then the client is the rightmost
//! `X-Forwarded-For` entry that is not itself a trusted proxy: each proxy
//! appends the address it received from, so entries to the right of the
//! first untrusted one were written by proxies we trust, and entries to its
//! left by whoever the client is (anything). From an untrusted peer the
//! header is ignored: a client cannot choose the address it is counted as.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use axum::http::HeaderMap;

/// `X-Forwarded-For` entries looked at, at most (a chain of proxies is
/// short; a header with more is read no further).
const MAX_HOPS: usize = 32;

/// An address block, `ADDR/BITS` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    bits: u8,
}

/// Why a `--trusted-proxy` value is refused.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not an address or CIDR block (e.g. 10.0.0.0/8, 192.0.2.7, fd00::/8)")]
pub struct BadCidr(String);

impl FromStr for Cidr {
    type Err = BadCidr;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadCidr(s.chars().take(64).collect());
        let s = s.trim();
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let addr = IpAddr::from_str(addr).map_err(|_| bad())?.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => b.parse::<u8>().ok().filter(|b| *b <= max).ok_or_else(bad)?,
        };
        Ok(Cidr { addr, bits })
    }
}

impl Cidr {
    /// Whether `ip` lies in the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(pub Vec<Cidr>);

impl TrustedProxies {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }
}

/// One `X-Forwarded-For` entry as an address: `IP`, `IP:PORT` or
/// `[IPv6]:PORT`.
fn entry_ip(e: &str) -> Option<IpAddr> {
    let e = e.trim();
    if let Ok(ip) = IpAddr::from_str(e) {
        return Some(ip.to_canonical());
    }
    if let Ok(sa) = SocketAddr::from_str(e) {
        return Some(sa.ip().to_canonical());
    }
    None
}

/// The client's address (see the module): the peer's, or, when the peer is
/// a trusted proxy, the rightmost `X-Forwarded-For` entry that is not a
/// trusted proxy. An entry that is not an address ends the walk at the
/// last trusted hop, so a garbled header never names someone else. `None`
/// when the peer is unknown.
pub fn client_ip(
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
    trusted: &TrustedProxies,
) -> Option<IpAddr> {
    let mut client = peer?.ip().to_canonical();
    if !trusted.contains(client) {
        return Some(client);
    }
    // Every X-Forwarded-For line, in order, as one list (RFC 9110 §5.3).
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    for e in entries.iter().rev().take(MAX_HOPS) {
        match entry_ip(e) {
            Some(ip) => {
                client = ip;
                if !trusted.contains(ip) {
                    break;
                }
            }
            None => break,
        }
    }
    Some(client)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn trusted(list: &[&str]) -> TrustedProxies {
        TrustedProxies(list.iter().map(|c| c.parse().unwrap()).collect())
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn peer(s: &str) -> Option<SocketAddr> {
        Some(SocketAddr::new(s.parse().unwrap(), 4000))
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.200.1.2".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.1.1".parse().unwrap()));
        let one: Cidr = "192.0.2.7".parse().unwrap();
        assert!(one.contains("192.0.2.7".parse().unwrap()));
        assert!(!one.contains("192.0.2.8".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
        for bad in [
            "",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "proxy",
            "10.0.0.1/x",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_header_is_believed_from_trusted_proxies_only() {
        let t = trusted(&["127.0.0.1", "10.0.0.0/8"]);
        // An untrusted peer: its address, whatever it claims.
        let h = xff(&["198.51.100.1"]);
        assert_eq!(client_ip(peer("203.0.113.5"), &h, &t), ip("203.0.113.5"));
        // A trusted proxy: the rightmost untrusted entry, past further
        // trusted hops; what the client wrote to its left is ignored.
        let h = xff(&["1.1.1.1, 198.51.100.1", "10.2.3.4"]);
        assert_eq!(client_ip(peer("127.0.0.1"), &h, &t), ip("198.51.100.1"));
        assert_eq!(
            client_ip(peer("127.0.0.1"), &xff(&["[2001:db8::5]:999"]), &t),
            ip("2001:db8::5")
        );
        // No header: the proxy itself; a garbled entry stops at the last
        // trusted hop.
        assert_eq!(
            client_ip(peer("127.0.0.1"), &HeaderMap::new(), &t),
            ip("127.0.0.1")
        );
        let h = xff(&["198.51.100.1, garbage, 10.0.0.9"]);
        assert_eq!(client_ip(peer("127.0.0.1"), &h, &t), ip("10.0.0.9"));
        assert_eq!(client_ip(None, &h, &t), None);
        // Nothing trusted: the header never counts.
        let h = xff(&["198.51.100.1"]);
        assert_eq!(
            client_ip(peer("127.0.0.1"), &h, &TrustedProxies::default()),
            ip("127.0.0.1")
        );
    }
}
