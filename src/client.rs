//! Client identity: which address a request is counted under.
//!
//! The TCP peer is the client unless the peer is a trusted proxy, in which case
//! the configured forwarding header is believed. A client therefore cannot pick
//! its own identity: headers from untrusted peers are ignored.
//!
//! IPv6 clients are counted per prefix (a /64 by default), since one host
//! commonly holds a whole /64; IPv4-mapped IPv6 addresses count as IPv4.

use http::HeaderMap;
use ipnet::IpNet;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The header a trusted proxy names the client in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardHeader {
    CfConnectingIp,
    XRealIp,
    /// Read right to left, past every hop that is itself trusted.
    XForwardedFor,
}

impl ForwardHeader {
    pub fn name(self) -> &'static str {
        match self {
            ForwardHeader::CfConnectingIp => "cf-connecting-ip",
            ForwardHeader::XRealIp => "x-real-ip",
            ForwardHeader::XForwardedFor => "x-forwarded-for",
        }
    }
}

/// How client addresses are found and counted.
#[derive(Debug, Clone)]
pub struct ClientPolicy {
    pub header: Option<ForwardHeader>,
    pub trusted: Vec<IpNet>,
    /// IPv6 clients are counted per this prefix length (0..=128).
    pub ipv6_prefix: u8,
    /// Clients exempt from per-client limits; route totals still apply.
    pub exempt: Vec<IpNet>,
}

impl Default for ClientPolicy {
    fn default() -> Self {
        Self {
            header: None,
            trusted: Vec::new(),
            ipv6_prefix: 64,
            exempt: Vec::new(),
        }
    }
}

/// A client as admission sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    /// The client's own address, for logs.
    pub addr: IpAddr,
    /// The address it is counted under: IPv6 masked to the prefix.
    pub key: IpAddr,
    pub exempt: bool,
}

impl ClientPolicy {
    /// Identifies the client of a request that arrived from `peer`.
    pub fn identify(&self, peer: IpAddr, headers: &HeaderMap) -> Client {
        let peer = canonical(peer);
        let addr = match self.header {
            Some(header) if self.is_trusted(peer) => {
                self.read_header(header, peer, headers).unwrap_or(peer)
            }
            _ => peer,
        };

        Client {
            addr,
            key: self.count_key(addr),
            exempt: self.exempt.iter().any(|net| net.contains(&addr)),
        }
    }

    /// The address a connection from `peer` is counted under for the cap on
    /// open connections, or `None` when it is not capped: a trusted proxy
    /// carries many clients' connections, and exempt clients are exempt.
    pub fn connection_key(&self, peer: IpAddr) -> Option<IpAddr> {
        let peer = canonical(peer);
        let capped = !self.is_trusted(peer) && !self.exempt.iter().any(|n| n.contains(&peer));
        capped.then(|| self.count_key(peer))
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    fn read_header(
        &self,
        header: ForwardHeader,
        peer: IpAddr,
        headers: &HeaderMap,
    ) -> Option<IpAddr> {
        match header {
            ForwardHeader::CfConnectingIp | ForwardHeader::XRealIp => {
                // More than one value is ambiguous: believe none of them.
                let mut values = headers.get_all(header.name()).iter();
                let value = values.next()?;
                if values.next().is_some() {
                    return None;
                }
                parse_addr(value.to_str().ok()?)
            }
            ForwardHeader::XForwardedFor => {
                let mut nearest_trusted = peer;
                let mut hops: Vec<&str> = Vec::new();
                for value in headers.get_all(header.name()) {
                    hops.extend(value.to_str().ok()?.split(','));
                }
                for hop in hops.iter().rev() {
                    let Some(ip) = parse_addr(hop) else {
                        // A hop we cannot read: the last address we can vouch
                        // for is the proxy that handed it to us.
                        return Some(nearest_trusted);
                    };
                    if !self.is_trusted(ip) {
                        return Some(ip);
                    }
                    nearest_trusted = ip;
                }
                // Every hop is trusted: the leftmost is the origin.
                Some(nearest_trusted)
            }
        }
    }

    /// The address a client is counted under.
    pub fn count_key(&self, addr: IpAddr) -> IpAddr {
        match canonical(addr) {
            IpAddr::V4(v4) => IpAddr::V4(v4),
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                let prefix = u32::from(self.ipv6_prefix.min(128));
                let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(bits & mask))
            }
        }
    }
}

/// IPv4-mapped IPv6 (`::ffff:192.0.2.1`) is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Parses `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1` or `[2001:db8::1]:80`.
fn parse_addr(raw: &str) -> Option<IpAddr> {
    let raw = raw.trim();
    if let Ok(ip) = raw.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    raw.parse::<SocketAddr>().ok().map(|s| canonical(s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn policy(header: ForwardHeader) -> ClientPolicy {
        ClientPolicy {
            header: Some(header),
            trusted: vec![
                "10.0.0.0/8".parse().unwrap(),
                "2001:db8:ffff::/48".parse().unwrap(),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn untrusted_peers_cannot_choose_their_identity() {
        let p = policy(ForwardHeader::XForwardedFor);
        let h = headers(&[("x-forwarded-for", "203.0.113.9")]);
        assert_eq!(p.identify(ip("198.51.100.1"), &h).addr, ip("198.51.100.1"));

        let p = ClientPolicy::default();
        let h = headers(&[("cf-connecting-ip", "203.0.113.9")]);
        assert_eq!(p.identify(ip("10.1.1.1"), &h).addr, ip("10.1.1.1"));
    }

    #[test]
    fn forwarded_for_is_read_right_to_left_past_trusted_hops() {
        let p = policy(ForwardHeader::XForwardedFor);
        let h = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.9, 10.0.0.2")]);
        assert_eq!(p.identify(ip("10.0.0.1"), &h).addr, ip("203.0.113.9"));

        // Split over two header lines, with ports and brackets.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "[2001:db8::5]:443, 10.9.9.9:80"),
        ]);
        assert_eq!(p.identify(ip("10.0.0.1"), &h).addr, ip("2001:db8::5"));

        // All hops trusted: the leftmost is the origin.
        let h = headers(&[("x-forwarded-for", "10.0.0.3, 10.0.0.2")]);
        assert_eq!(p.identify(ip("10.0.0.1"), &h).addr, ip("10.0.0.3"));

        // Garbage stops the walk at the last trusted hop.
        let h = headers(&[("x-forwarded-for", "1.1.1.1, garbage, 10.0.0.2")]);
        assert_eq!(p.identify(ip("10.0.0.1"), &h).addr, ip("10.0.0.2"));

        // No header: the peer.
        assert_eq!(
            p.identify(ip("10.0.0.1"), &HeaderMap::new()).addr,
            ip("10.0.0.1")
        );
    }

    #[test]
    fn single_value_headers_from_trusted_peers() {
        let p = policy(ForwardHeader::CfConnectingIp);
        let h = headers(&[("cf-connecting-ip", "203.0.113.9")]);
        assert_eq!(p.identify(ip("10.0.0.1"), &h).addr, ip("203.0.113.9"));

        let twice = headers(&[
            ("cf-connecting-ip", "1.1.1.1"),
            ("cf-connecting-ip", "2.2.2.2"),
        ]);
        assert_eq!(p.identify(ip("10.0.0.1"), &twice).addr, ip("10.0.0.1"));

        let bad = headers(&[("cf-connecting-ip", "nonsense")]);
        assert_eq!(p.identify(ip("10.0.0.1"), &bad).addr, ip("10.0.0.1"));

        // Only the configured header counts.
        let other = headers(&[("x-real-ip", "203.0.113.9")]);
        assert_eq!(p.identify(ip("10.0.0.1"), &other).addr, ip("10.0.0.1"));
    }

    #[test]
    fn ipv6_is_counted_per_prefix_and_mapped_ipv4_as_ipv4() {
        let p = ClientPolicy::default();
        let a = p.identify(ip("2001:db8:1:2:aaaa::1"), &HeaderMap::new());
        let b = p.identify(ip("2001:db8:1:2:bbbb::9"), &HeaderMap::new());
        assert_eq!(a.key, b.key);
        assert_eq!(a.key, ip("2001:db8:1:2::"));
        assert_ne!(a.addr, b.addr);

        let mapped = p.identify(ip("::ffff:192.0.2.7"), &HeaderMap::new());
        assert_eq!(mapped.key, ip("192.0.2.7"));

        let p48 = ClientPolicy {
            ipv6_prefix: 48,
            ..Default::default()
        };
        assert_eq!(p48.count_key(ip("2001:db8:1:2::1")), ip("2001:db8:1::"));
        let p128 = ClientPolicy {
            ipv6_prefix: 128,
            ..Default::default()
        };
        assert_eq!(p128.count_key(ip("2001:db8::1")), ip("2001:db8::1"));
        let p0 = ClientPolicy {
            ipv6_prefix: 0,
            ..Default::default()
        };
        assert_eq!(p0.count_key(ip("2001:db8::1")), ip("::"));
    }

    #[test]
    fn connections_are_capped_per_address_except_proxies_and_exempt() {
        let mut p = policy(ForwardHeader::XForwardedFor);
        p.exempt = vec!["198.51.100.0/24".parse().unwrap()];
        assert_eq!(p.connection_key(ip("10.0.0.1")), None);
        assert_eq!(p.connection_key(ip("198.51.100.7")), None);
        assert_eq!(p.connection_key(ip("203.0.113.9")), Some(ip("203.0.113.9")));
        assert_eq!(
            p.connection_key(ip("::ffff:203.0.113.9")),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(
            p.connection_key(ip("2001:db8:1:2:3:4:5:6")),
            Some(ip("2001:db8:1:2::"))
        );
    }

    #[test]
    fn exempt_clients_are_marked() {
        let p = ClientPolicy {
            exempt: vec!["192.0.2.0/24".parse().unwrap()],
            ..Default::default()
        };
        assert!(p.identify(ip("192.0.2.50"), &HeaderMap::new()).exempt);
        assert!(!p.identify(ip("192.0.3.50"), &HeaderMap::new()).exempt);
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            /// For any chain of hops, the client is the rightmost hop that is
            /// not a trusted proxy, or the leftmost when every hop is trusted.
            #[test]
            fn forwarded_for_names_the_rightmost_untrusted_hop(
                hops in prop::collection::vec((any::<bool>(), any::<u8>()), 1..8),
            ) {
                let p = ClientPolicy {
                    header: Some(ForwardHeader::XForwardedFor),
                    trusted: vec!["10.0.0.0/8".parse().unwrap()],
                    ..Default::default()
                };
                let addrs: Vec<IpAddr> = hops
                    .iter()
                    .map(|(trusted, n)| {
                        let first = if *trusted { 10 } else { 203 };
                        IpAddr::from([first, 0, 113, *n])
                    })
                    .collect();
                let value: Vec<String> = addrs.iter().map(IpAddr::to_string).collect();
                let mut h = HeaderMap::new();
                h.insert("x-forwarded-for", value.join(", ").parse().unwrap());

                let want = addrs
                    .iter()
                    .rev()
                    .find(|a| !p.is_trusted(**a))
                    .copied()
                    .unwrap_or(addrs[0]);
                prop_assert_eq!(p.identify("10.9.9.9".parse().unwrap(), &h).addr, want);
                // The same header from an untrusted peer changes nothing.
                let peer: IpAddr = "198.51.100.1".parse().unwrap();
                prop_assert_eq!(p.identify(peer, &h).addr, peer);
            }

            #[test]
            fn ipv6_clients_in_one_prefix_share_a_key(a in any::<u64>(), b in any::<u64>(), prefix in any::<u64>()) {
                let p = ClientPolicy::default();
                let one = IpAddr::V6(Ipv6Addr::from((u128::from(prefix) << 64) | u128::from(a)));
                let two = IpAddr::V6(Ipv6Addr::from((u128::from(prefix) << 64) | u128::from(b)));
                prop_assert_eq!(p.count_key(one), p.count_key(two));
            }
        }
    }
}
