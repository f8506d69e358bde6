//! The client's address when rtpay runs behind reverse proxies (a load balancer, an ingress).
//! Without them named, the address is the connection's and `X-Forwarded-For` is ignored: a client
//! could write any address there. With `--trusted-proxy`, a connection from a trusted proxy
//! names its client in `X-Forwarded-For`: read from the right (each proxy appends the address it
//! was reached from), skipping trusted proxies, the first other address is the client. The
//! failed-authentication throttle counts per client, and the audit log records it as the source.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use axum::http::HeaderMap;

/// An address range: `10.0.0.0/8`, `2001:db8::/32`, or a single address (`192.0.2.7`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Cidr, String> {
        let bad = || format!("`{text}` is not an address range like 10.0.0.0/8, 2001:db8::/32 or 192.0.2.7");
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= bits).ok_or_else(bad)?,
        };
        if prefix == 0 {
            return Err(format!("`{text}` trusts every address: any client could name itself in X-Forwarded-For"));
        }
        // IPv4 mapped into IPv6 (`::ffff:10.0.0.0/104`) is the IPv4 range: peers are compared as IPv4.
        let (network, prefix) = match network {
            IpAddr::V6(v6) if prefix >= 96 && v6.to_ipv4_mapped().is_some() => {
                (IpAddr::V4(v6.to_ipv4_mapped().expect("mapped")), prefix - 96)
            }
            _ => (network, prefix),
        };
        if prefix == 0 {
            return Err(format!("`{text}` trusts every IPv4 address: any client could name itself in X-Forwarded-For"));
        }
        let cidr = Cidr { network, prefix };
        if cidr.mask(network) != network {
            return Err(format!(
                "`{text}` has bits set past its prefix length (its network is {})",
                cidr.mask(network)
            ));
        }
        Ok(cidr)
    }
}

impl Cidr {
    fn mask(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let m = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(v4) & m).into())
            }
            IpAddr::V6(v6) => {
                let m = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(v6) & m).into())
            }
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.network.is_ipv4() && self.mask(ip) == self.network
    }
}

/// The proxies whose `X-Forwarded-For` is believed; none by default.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    pub fn new(ranges: Vec<Cidr>) -> TrustedProxies {
        TrustedProxies(ranges)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// The client of a request that came over a connection from `peer`. An address read from the
    /// header has port 0: the client's port is not known.
    pub fn client(&self, peer: SocketAddr, headers: &HeaderMap) -> SocketAddr {
        if !self.trusts(peer.ip()) {
            return peer;
        }
        // Split before decoding: a client's own bytes (not even UTF-8) on the left must not spoil
        // the hops its proxies appended on the right.
        let hops: Vec<&[u8]> =
            headers.get_all("x-forwarded-for").iter().flat_map(|v| v.as_bytes().split(|b| *b == b',')).collect();
        for hop in hops.iter().rev() {
            // What a trusted proxy passed on cannot be read: the proxy is the client.
            let Some(ip) = hop_address(hop) else { return peer };
            if !self.trusts(ip) {
                return SocketAddr::new(ip.to_canonical(), 0);
            }
        }
        peer
    }
}

/// One hop of `X-Forwarded-For`: an address, with a port or in brackets as some proxies write it.
fn hop_address(hop: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(hop).ok()?.trim();
    let bare = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')).unwrap_or(text);
    bare.parse::<IpAddr>().ok().or_else(|| text.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append("x-forwarded-for", v.parse().unwrap());
        }
        map
    }

    fn proxies(ranges: &[&str]) -> TrustedProxies {
        TrustedProxies::new(ranges.iter().map(|r| r.parse().unwrap()).collect())
    }

    #[test]
    fn ranges_parse_and_contain_what_they_should() {
        let net: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.255.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()), "IPv4 mapped into IPv6");
        let one: Cidr = "192.0.2.7".parse().unwrap();
        assert!(one.contains("192.0.2.7".parse().unwrap()) && !one.contains("192.0.2.8".parse().unwrap()));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()) && !v6.contains("2001:db9::1".parse().unwrap()));
        assert!(!v6.contains("10.1.0.1".parse().unwrap()));
        let mapped: Cidr = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(mapped, "10.0.0.0/8".parse().unwrap());
        assert!(mapped.contains("10.9.8.7".parse().unwrap()) && mapped.contains("::ffff:10.9.8.7".parse().unwrap()));
        for bad in [
            "10.0.0.0/33",
            "10.0.0.1/8",
            "example.com",
            "10.0.0.0/",
            "::/129",
            "",
            "0.0.0.0/0",
            "::/0",
            "::ffff:0:0/96",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_client_is_the_first_untrusted_hop_from_the_right() {
        let p = proxies(&["10.0.0.0/8"]);
        let lb: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        let client = |h: &[&str]| p.client(lb, &headers(h)).to_string();
        assert_eq!(client(&["203.0.113.7"]), "203.0.113.7:0");
        // A client writing its own header cannot choose its address: the proxy appended the real one.
        assert_eq!(client(&["198.51.100.1, 203.0.113.7"]), "203.0.113.7:0");
        // Two trusted proxies in a row, and the header split over two lines.
        assert_eq!(client(&["198.51.100.1, 203.0.113.7", "10.0.0.9"]), "203.0.113.7:0");
        assert_eq!(client(&["[2001:db8::1]:443"]), "[2001:db8::1]:0");
        assert_eq!(client(&["[2001:db8::2]"]), "[2001:db8::2]:0");
        assert_eq!(client(&["203.0.113.8:5060"]), "203.0.113.8:0");
        // A client's own bytes, not even UTF-8, ahead of what its proxy appended change nothing.
        let mut raw = HeaderMap::new();
        raw.append("x-forwarded-for", axum::http::HeaderValue::from_bytes(b"\xe9t\xe9, 203.0.113.7").unwrap());
        assert_eq!(p.client(lb, &raw).to_string(), "203.0.113.7:0");
        // Nothing usable: the proxy itself.
        assert_eq!(client(&[]), "10.0.0.2:40000");
        assert_eq!(client(&["garbage"]), "10.0.0.2:40000");
        assert_eq!(client(&["10.0.0.5"]), "10.0.0.2:40000");
        // From a connection that is no trusted proxy the header is ignored.
        let direct: SocketAddr = "203.0.113.50:1234".parse().unwrap();
        assert_eq!(p.client(direct, &headers(&["198.51.100.1"])), direct);
        assert_eq!(TrustedProxies::default().client(lb, &headers(&["198.51.100.1"])), lb);
    }
}
