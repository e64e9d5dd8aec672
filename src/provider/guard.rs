//! The endpoint guard: which addresses a provider URL may reach.
//!
//! Link-local, cloud-metadata, unspecified, broadcast and multicast addresses are always
//! refused; loopback and private ranges only when the operator allows them. The check runs on
//! the URL text (literal addresses, metadata host names) *and* on every address the host name
//! resolves to at connect time, through [`GuardedResolver`], so a DNS name pointing at a
//! forbidden address is refused too. Redirects are never followed (see `client.rs`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

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
pub fn check_url(url: &str, policy: EndpointPolicy) -> Result<reqwest::Url, EndpointRefused> {
    let parsed = reqwest::Url::parse(url).map_err(|_| EndpointRefused::BadUrl)?;
    if !matches!(parsed.scheme(), "http" | "https") || !parsed.username().is_empty() {
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

/// A DNS resolver that drops every address the policy refuses and fails when none is left.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    policy: EndpointPolicy,
}

impl GuardedResolver {
    pub fn new(policy: EndpointPolicy) -> Arc<GuardedResolver> {
        Arc::new(GuardedResolver { policy })
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            check_host_name(&host)?;
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refusal = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|addr| match check_ip(addr.ip(), policy) {
                    Ok(()) => true,
                    Err(err) => {
                        refusal = Some(err);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let err: Box<dyn std::error::Error + Send + Sync> = match refusal {
                    Some(err) => Box::new(err),
                    None => format!("{host} did not resolve").into(),
                };
                return Err(err);
            }
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
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
    }

    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_refused_unless_allowed() {
        let strict = GuardedResolver::new(STRICT);
        let err = match strict.resolve("localhost".parse().unwrap()).await {
            Ok(_) => panic!("localhost must be refused"),
            Err(err) => err,
        };
        assert!(err.to_string().contains("loopback"), "{err}");
        let allowed = GuardedResolver::new(LOOPBACK);
        let addrs: Vec<SocketAddr> = match allowed.resolve("localhost".parse().unwrap()).await {
            Ok(addrs) => addrs.collect(),
            Err(err) => panic!("{err}"),
        };
        assert!(addrs.iter().all(|addr| addr.ip().is_loopback()));
        assert!(!addrs.is_empty());
        let metadata = allowed
            .resolve("metadata.google.internal".parse().unwrap())
            .await;
        assert!(metadata.is_err());
    }
}
