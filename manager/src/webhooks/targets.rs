//! Where deliveries may go. A tenant names a webhook's URL, and the manager sends from
//! inside the operator's network: left open, a webhook could reach the manager's own
//! ports, the pod network or a cloud metadata service, and read their answers back in
//! a delivery's `last_error`. So unless the operator allows private targets
//! (`--webhook-private-targets`), a delivery goes only to public addresses. This is
//! checked twice:
//! - when a webhook is created ([`check_url`]): a URL whose host is a non-public
//!   address, or `localhost`, is refused by field;
//! - at every attempt: an address in the URL is checked again ([`check_url`], for
//!   webhooks stored while a replica allowed them), and a host name is resolved by
//!   [`PublicResolver`], which keeps only public addresses — a name can point anywhere,
//!   and somewhere else tomorrow, so what it resolves to when the connection is made is
//!   what counts.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::Host;

/// Why a refused target is refused: appended to every refusal.
const HOW_TO_ALLOW: &str =
    "webhooks reach only public addresses unless the manager runs with --webhook-private-targets";

/// Non-public IPv4 ranges: (network, prefix length, what it is).
const V4_RANGES: &[(Ipv4Addr, u8, &str)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8, "an unspecified address"),
    (Ipv4Addr::new(10, 0, 0, 0), 8, "a private address"),
    (
        Ipv4Addr::new(100, 64, 0, 0),
        10,
        "a shared (carrier-grade NAT) address",
    ),
    (Ipv4Addr::new(127, 0, 0, 0), 8, "a loopback address"),
    (Ipv4Addr::new(169, 254, 0, 0), 16, "a link-local address"),
    (Ipv4Addr::new(172, 16, 0, 0), 12, "a private address"),
    (Ipv4Addr::new(192, 0, 0, 0), 24, "a reserved address"),
    (Ipv4Addr::new(192, 0, 2, 0), 24, "a documentation address"),
    (Ipv4Addr::new(192, 168, 0, 0), 16, "a private address"),
    (Ipv4Addr::new(198, 18, 0, 0), 15, "a benchmarking address"),
    (
        Ipv4Addr::new(198, 51, 100, 0),
        24,
        "a documentation address",
    ),
    (Ipv4Addr::new(203, 0, 113, 0), 24, "a documentation address"),
    (Ipv4Addr::new(224, 0, 0, 0), 4, "a multicast address"),
    (Ipv4Addr::new(240, 0, 0, 0), 4, "a reserved address"),
];

/// Non-public IPv6 ranges besides those that embed an IPv4 address (checked as that).
const V6_RANGES: &[(Ipv6Addr, u8, &str)] = &[
    (Ipv6Addr::UNSPECIFIED, 128, "an unspecified address"),
    (Ipv6Addr::LOCALHOST, 128, "a loopback address"),
    (
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0),
        32,
        "a documentation address",
    ),
    (
        Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0),
        7,
        "a private (unique local) address",
    ),
    (
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
        10,
        "a link-local address",
    ),
    (
        Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0),
        8,
        "a multicast address",
    ),
];

/// What `ip` is when it is not a public address; `None` for a public one.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => range_of(V4_RANGES, v4, |a| a.to_bits().into(), 32),
        IpAddr::V6(v6) => range_of(V6_RANGES, v6, Ipv6Addr::to_bits, 128).or_else(|| {
            // IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d) and NAT64
            // (64:ff9b::a.b.c.d) addresses reach the IPv4 address they carry.
            let embedded = v6.to_ipv4().or_else(|| {
                let [a, b, c, d, e, f, ..] = v6.segments();
                (a == 0x64 && b == 0xff9b && c == 0 && d == 0 && e == 0 && f == 0)
                    .then(|| Ipv4Addr::from_bits(v6.to_bits() as u32))
            });
            embedded.and_then(|v4| non_public(IpAddr::V4(v4)))
        }),
    }
}

/// What the first of `ranges` holding `addr` says it is: addresses compared as their
/// `width` leading bits (`bits`), over each range's prefix length.
fn range_of<A: Copy>(
    ranges: &[(A, u8, &'static str)],
    addr: A,
    bits: impl Fn(A) -> u128,
    width: u32,
) -> Option<&'static str> {
    ranges
        .iter()
        .find(|(net, len, _)| {
            // A /0 shifts every bit out (`checked_shr`: even all 128): it matches all.
            let shift = width - u32::from(*len);
            bits(addr).checked_shr(shift) == bits(*net).checked_shr(shift)
        })
        .map(|(_, _, what)| *what)
}

/// Refuses a URL whose host is a non-public address or a `localhost` name (RFC 6761:
/// always loopback); a message for the `url` field. Names are resolved at each attempt
/// by [`PublicResolver`].
pub fn check_url(url: &Url) -> Result<(), String> {
    let refused = match url.host() {
        Some(Host::Ipv4(v4)) => non_public(IpAddr::V4(v4)).map(|what| format!("{v4} is {what}")),
        Some(Host::Ipv6(v6)) => non_public(IpAddr::V6(v6)).map(|what| format!("{v6} is {what}")),
        Some(Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            (name == "localhost" || name.ends_with(".localhost"))
                .then(|| format!("{name} is a loopback name"))
        }
        None => None,
    };
    match refused {
        Some(reason) => Err(format!("{reason}; {HOW_TO_ALLOW}")),
        None => Ok(()),
    }
}

/// Resolves host names as the system does, keeping only public addresses; a name with
/// none left is an error naming what it resolved to.
#[derive(Debug, Default)]
pub struct PublicResolver;

impl Resolve for PublicResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let (public, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = resolved
                .into_iter()
                .partition(|addr| non_public(addr.ip()).is_none());
            if public.is_empty() && refused.is_empty() {
                return Err(format!("{host} resolves to no address").into());
            }
            if public.is_empty() {
                let what = refused
                    .iter()
                    .filter_map(|addr| {
                        non_public(addr.ip()).map(|w| format!("{} is {w}", addr.ip()))
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                let error =
                    format!("{host} resolves to no public address ({what}); {HOW_TO_ALLOW}");
                return Err(error.into());
            }
            let addrs: Addrs = Box::new(public.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn non_public_addresses_are_named_and_public_ones_pass() {
        for (addr, what) in [
            ("127.0.0.1", "a loopback address"),
            ("127.255.0.9", "a loopback address"),
            ("10.0.0.1", "a private address"),
            ("172.31.255.255", "a private address"),
            ("192.168.0.1", "a private address"),
            ("169.254.169.254", "a link-local address"),
            ("100.64.0.1", "a shared (carrier-grade NAT) address"),
            ("0.0.0.0", "an unspecified address"),
            ("255.255.255.255", "a reserved address"),
            ("::1", "a loopback address"),
            ("::", "an unspecified address"),
            ("fd12::1", "a private (unique local) address"),
            ("fe80::1", "a link-local address"),
            ("::ffff:10.0.0.1", "a private address"),
            ("::ffff:169.254.169.254", "a link-local address"),
            ("64:ff9b::7f00:1", "a loopback address"),
        ] {
            assert_eq!(non_public(ip(addr)), Some(what), "{addr}");
        }
        for addr in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "192.169.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert_eq!(non_public(ip(addr)), None, "{addr}");
        }
    }

    #[test]
    fn urls_naming_non_public_hosts_are_refused_with_the_setting_named() {
        for url in [
            "http://127.0.0.1:9/x",
            "http://2130706433/",
            "http://[::ffff:127.0.0.1]/",
            "http://LocalHost./",
            "http://api.localhost/",
        ] {
            let err = check_url(&Url::parse(url).unwrap()).unwrap_err();
            assert!(err.contains("--webhook-private-targets"), "{url}: {err}");
        }
        for url in [
            "https://hooks.example.com/x",
            "http://8.8.8.8/",
            "http://localhost.example.com/",
        ] {
            assert_eq!(check_url(&Url::parse(url).unwrap()), Ok(()), "{url}");
        }
    }

    /// `localhost` resolves (from the hosts file) to loopback only: nothing is left.
    #[tokio::test]
    async fn a_name_resolving_only_to_non_public_addresses_is_refused() {
        let err = match PublicResolver.resolve("localhost".parse().unwrap()).await {
            Ok(addrs) => panic!("resolved to {:?}", addrs.collect::<Vec<_>>()),
            Err(err) => err.to_string(),
        };
        assert!(
            err.starts_with("localhost resolves to no public address (")
                && err.contains("is a loopback address")
                && err.contains("--webhook-private-targets"),
            "{err}"
        );
    }
}
