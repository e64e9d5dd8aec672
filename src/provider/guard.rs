//! The endpoint guard: which addresses a provider URL may reach.
//!
//! Link-local, cloud-metadata, unspecified, broadcast and multicast addresses are always
//! refused; loopback and private ranges only when the operator allows them. The check runs on
//! the URL text (literal addresses, metadata host names) *and* on every address the host name
//! resolves to at connect time, through [`resolve`], so a DNS name pointing at a forbidden
//! address is refused too: the HTTP client (`http.rs`) dials only what these functions
//! allow. Redirects are never followed (see `client.rs`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::EndpointPolicy;

/// Host names of cloud metadata services, refused whatever they resolve to.
const METADATA_HOSTS: &[&str] = &[
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "metadata.azure.internal",
    "instance-data",
    "instance-data.ec2.internal",
];

/// Why an endpoint was refused. Carries no secret: only the host and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointRefused {
    #[error("base URL is not a valid http(s) URL")]
    BadUrl,
    #[error("host {0} is a cloud metadata service and is always refused")]
    Metadata(String),
    #[error("address {0} is link-local, metadata, unspecified or multicast and is always refused")]
    Forbidden(IpAddr),
    #[error("address {0} is loopback; set COPILOT_ALLOW_LOOPBACK_PROVIDERS=true to allow it")]
    Loopback(IpAddr),
    #[error(
        "address {0} is in a private range; set COPILOT_ALLOW_PRIVATE_PROVIDERS=true to allow it"
    )]
    Private(IpAddr),
}

/// Where an address falls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Range {
    Public,
    Loopback,
    Private,
    Forbidden,
}

fn classify(ip: IpAddr) -> Range {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return classify_v4(v4);
            }
            let first = v6.segments()[0];
            if v6.is_loopback() {
                Range::Loopback
            } else if v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xffc0) == 0xfe80
                || v6 == Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254)
            {
                Range::Forbidden
            } else if (first & 0xfe00) == 0xfc00 {
                Range::Private
            } else {
                Range::Public
            }
        }
    }
}

fn classify_v4(ip: Ipv4Addr) -> Range {
    let [a, b, ..] = ip.octets();
    if ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip == Ipv4Addr::new(100, 100, 100, 200)
        || a == 0
    {
        Range::Forbidden
    } else if ip.is_loopback() {
        Range::Loopback
    } else if ip.is_private() || (a == 100 && (64..128).contains(&b)) {
        Range::Private
    } else {
        Range::Public
    }
}

/// Checks one address against the policy.
pub fn check_ip(ip: IpAddr, policy: EndpointPolicy) -> Result<(), EndpointRefused> {
    match classify(ip) {
        Range::Public => Ok(()),
        Range::Loopback if policy.allow_loopback => Ok(()),
        Range::Private if policy.allow_private => Ok(()),
        Range::Loopback => Err(EndpointRefused::Loopback(ip)),
        Range::Private => Err(EndpointRefused::Private(ip)),
        Range::Forbidden => Err(EndpointRefused::Forbidden(ip)),
    }
}

/// Checks what can be checked from the URL text alone: scheme, metadata host names and
/// literal addresses. Host names are checked again, resolved, when connecting.
pub fn check_url(url: &str, policy: EndpointPolicy) -> Result<url::Url, EndpointRefused> {
    let parsed = url::Url::parse(url).map_err(|_| EndpointRefused::BadUrl)?;
    // Credentials in the URL would be stored and shown in clear: the key has its own field.
    let credentials = !parsed.username().is_empty() || parsed.password().is_some();
    if !matches!(parsed.scheme(), "http" | "https") || credentials {
        return Err(EndpointRefused::BadUrl);
    }
    match parsed.host() {
        Some(url::Host::Ipv4(ip)) => check_ip(IpAddr::V4(ip), policy)?,
        Some(url::Host::Ipv6(ip)) => check_ip(IpAddr::V6(ip), policy)?,
        Some(url::Host::Domain(domain)) => check_host_name(domain)?,
        None => return Err(EndpointRefused::BadUrl),
    }
    Ok(parsed)
}

fn check_host_name(domain: &str) -> Result<(), EndpointRefused> {
    let host = domain.trim_end_matches('.').to_ascii_lowercase();
    if METADATA_HOSTS.contains(&host.as_str()) {
        return Err(EndpointRefused::Metadata(host));
    }
    Ok(())
}

/// Why a host name gave no address to dial.
#[derive(Debug)]
pub enum GuardError {
    /// Every address it resolved to is refused (the last refusal says why).
    Refused(EndpointRefused),
    /// It resolved to nothing.
    Unresolved,
}

/// Resolves `host` and keeps only the addresses the policy allows; fails when none is left.
pub async fn resolve(
    host: &str,
    port: u16,
    policy: EndpointPolicy,
) -> Result<Vec<SocketAddr>, GuardError> {
    resolve_checked(host, port, policy, false).await
}

/// Resolves `host` and fails when the policy refuses any of its addresses: for a connection
/// that another party (an egress proxy) dials by name, and so to whichever address it picks.
pub async fn resolve_strict(
    host: &str,
    port: u16,
    policy: EndpointPolicy,
) -> Result<Vec<SocketAddr>, GuardError> {
    resolve_checked(host, port, policy, true).await
}

async fn resolve_checked(
    host: &str,
    port: u16,
    policy: EndpointPolicy,
    strict: bool,
) -> Result<Vec<SocketAddr>, GuardError> {
    check_host_name(host).map_err(GuardError::Refused)?;
    let resolved = tokio::net::lookup_host((host, port))
        .await
        .map_err(|_| GuardError::Unresolved)?;
    let mut refusal = None;
    let allowed: Vec<SocketAddr> = resolved
        .filter(|addr| match check_ip(addr.ip(), policy) {
            Ok(()) => true,
            Err(err) => {
                refusal = Some(err);
                false
            }
        })
        .collect();
    match refusal {
        Some(refused) if strict || allowed.is_empty() => Err(GuardError::Refused(refused)),
        None if allowed.is_empty() => Err(GuardError::Unresolved),
        _ => Ok(allowed),
    }
}

/// A literal address, if the policy allows it.
pub fn allowed(addr: SocketAddr, policy: EndpointPolicy) -> Result<SocketAddr, EndpointRefused> {
    check_ip(addr.ip(), policy).map(|()| addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: EndpointPolicy = EndpointPolicy {
        allow_loopback: false,
        allow_private: false,
    };
    const LOOPBACK: EndpointPolicy = EndpointPolicy {
        allow_loopback: true,
        allow_private: false,
    };

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn metadata_and_link_local_are_always_refused() {
        let all = EndpointPolicy {
            allow_loopback: true,
            allow_private: true,
        };
        for addr in [
            "169.254.169.254",
            "169.254.1.1",
            "fe80::1",
            "fd00:ec2::254",
            "0.0.0.0",
            "::ffff:169.254.169.254",
            "100.100.100.200",
        ] {
            assert!(
                matches!(check_ip(ip(addr), all), Err(EndpointRefused::Forbidden(_))),
                "{addr}"
            );
        }
        assert!(matches!(
            check_url("http://metadata.google.internal/v1", all),
            Err(EndpointRefused::Metadata(_))
        ));
        assert!(check_url("http://169.254.169.254/latest", all).is_err());
    }

    #[test]
    fn loopback_and_private_need_the_operator() {
        assert!(matches!(
            check_ip(ip("127.0.0.1"), STRICT),
            Err(EndpointRefused::Loopback(_))
        ));
        assert!(matches!(
            check_ip(ip("::1"), STRICT),
            Err(EndpointRefused::Loopback(_))
        ));
        assert!(check_ip(ip("127.0.0.1"), LOOPBACK).is_ok());
        for addr in [
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "fd12::1",
            "100.64.0.1",
        ] {
            assert!(
                matches!(
                    check_ip(ip(addr), LOOPBACK),
                    Err(EndpointRefused::Private(_))
                ),
                "{addr}"
            );
        }
        assert!(check_ip(ip("8.8.8.8"), STRICT).is_ok());
        assert!(check_url("https://api.openai.com/v1", STRICT).is_ok());
        assert!(check_url("ftp://api.openai.com/v1", STRICT).is_err());
        assert!(check_url("https://user:pw@api.openai.com/v1", STRICT).is_err());
        assert!(check_url("https://:sk-in-the-url@api.openai.com/v1", STRICT).is_err());
    }

    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_refused_unless_allowed() {
        match resolve("localhost", 80, STRICT).await {
            Err(GuardError::Refused(EndpointRefused::Loopback(_))) => {}
            other => panic!("localhost must be refused as loopback: {other:?}"),
        }
        let addrs = resolve("localhost", 80, LOOPBACK).await.unwrap();
        assert!(!addrs.is_empty());
        assert!(
            addrs
                .iter()
                .all(|addr| addr.ip().is_loopback() && addr.port() == 80)
        );
        assert!(matches!(
            resolve("metadata.google.internal", 80, LOOPBACK).await,
            Err(GuardError::Refused(EndpointRefused::Metadata(_)))
        ));
        assert!(allowed("127.0.0.1:1".parse().unwrap(), STRICT).is_err());
        assert!(allowed("127.0.0.1:1".parse().unwrap(), LOOPBACK).is_ok());
    }
}
