//! Who the client is, behind a load balancer or ingress: `server.trusted_proxies`.
//!
//! From a peer in that list, the right-most address of `X-Forwarded-For` that is not itself a
//! trusted proxy is the client (or, without `X-Forwarded-For`, the same walk over the `for=`
//! parameters of `Forwarded`, RFC 7239). From any other peer, both headers are ignored: a
//! client cannot choose the address it is logged, allowed and limited as.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;

const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// `server.trusted_proxies`.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<ipnet::IpNet>,
}

/// An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

impl TrustedProxies {
    pub fn new(nets: Vec<ipnet::IpNet>) -> TrustedProxies {
        TrustedProxies { nets }
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|net| net.contains(&ip))
    }

    /// The client's address: `peer`, or what a trusted `peer` forwarded for.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if self.nets.is_empty() || !self.trusts(peer) {
            return peer;
        }
        let xff: Vec<&str> = headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        if !xff.is_empty() {
            return self.walk(peer, xff.into_iter().map(parse_xff));
        }
        let forwarded: Vec<Option<IpAddr>> = headers
            .get_all(http::header::FORWARDED)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(forwarded_for)
            .collect();
        self.walk(peer, forwarded.into_iter())
    }

    /// Right to left: the first hop that is not a trusted proxy. A hop that does not parse
    /// (`unknown`, an obfuscated name, garbage) ends the walk at the last trusted one.
    fn walk(&self, peer: IpAddr, hops: impl DoubleEndedIterator<Item = Option<IpAddr>>) -> IpAddr {
        let mut client = peer;
        for hop in hops.rev() {
            let Some(ip) = hop.map(canonical) else {
                return client;
            };
            client = ip;
            if !self.trusts(ip) {
                return ip;
            }
        }
        client
    }
}

/// One `X-Forwarded-For` element: an address, perhaps with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_xff(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

/// The `for=` of one `Forwarded` element: `Some(None)` for a value that is not an address.
fn forwarded_for(element: &str) -> Option<Option<IpAddr>> {
    let value = element.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
    })?;
    let value = value.trim_matches('"');
    let ip = value
        .parse::<IpAddr>()
        .ok()
        .or_else(|| value.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            value
                .strip_prefix('[')
                .and_then(|v| v.strip_suffix(']'))
                .and_then(|v| v.parse().ok())
        });
    Some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies() -> TrustedProxies {
        TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()])
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_headers_from_an_untrusted_peer_are_ignored() {
        let h = headers(&[("x-forwarded-for", "1.2.3.4"), ("forwarded", "for=1.2.3.4")]);
        assert_eq!(proxies().client(ip("192.0.2.1"), &h), ip("192.0.2.1"));
        assert_eq!(
            TrustedProxies::default().client(ip("10.0.0.1"), &h),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn the_right_most_untrusted_address_is_the_client() {
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6, 1.2.3.4"),
            ("x-forwarded-for", "10.0.0.7"),
        ]);
        assert_eq!(proxies().client(ip("10.0.0.1"), &h), ip("1.2.3.4"));
        let h = headers(&[("x-forwarded-for", "10.1.1.1, 10.0.0.7")]);
        assert_eq!(proxies().client(ip("10.0.0.1"), &h), ip("10.1.1.1"));
        let h = headers(&[("x-forwarded-for", "1.2.3.4:555, garbage, 10.0.0.7")]);
        assert_eq!(proxies().client(ip("10.0.0.1"), &h), ip("10.0.0.7"));
        let h = headers(&[("x-forwarded-for", "[2001:db8::1]:80")]);
        assert_eq!(
            proxies().client(ip("::ffff:10.0.0.1"), &h),
            ip("2001:db8::1")
        );
    }

    #[test]
    fn forwarded_for_is_used_without_x_forwarded_for() {
        let h = headers(&[(
            "forwarded",
            "for=6.6.6.6, for=\"[2001:db8::7]:4711\";proto=https, For=10.0.0.9;by=10.0.0.1",
        )]);
        assert_eq!(proxies().client(ip("10.0.0.1"), &h), ip("2001:db8::7"));
        let h = headers(&[("forwarded", "for=unknown")]);
        assert_eq!(proxies().client(ip("10.0.0.1"), &h), ip("10.0.0.1"));
        assert_eq!(
            proxies().client(ip("10.0.0.1"), &HeaderMap::new()),
            ip("10.0.0.1")
        );
    }
}
