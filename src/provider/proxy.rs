//! The operator's egress proxy (`COPILOT_PROVIDER_PROXY`): provider connections are opened
//! as HTTP `CONNECT` tunnels through it, for networks whose only way out is a proxy.
//!
//! The tunnel carries the provider's TLS end to end, so the proxy sees the host and port,
//! never the request or the key. The endpoint guard still decides: the provider's name is
//! resolved here and refused when *any* of its addresses is refused, since the proxy dials
//! it by name and may pick any of them (`guard::resolve_strict`). The hosts of
//! `COPILOT_PROVIDER_NO_PROXY` are reached directly.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use base64::Engine as _;
use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The longest answer head a proxy may send to `CONNECT`.
const MAX_HEAD: usize = 8 * 1024;

/// Where the tunnels go, and which hosts skip it.
#[derive(Clone)]
pub struct Proxy {
    host: String,
    port: u16,
    /// `Basic …` from the URL's user and password, if any.
    authorization: Option<SecretString>,
    /// The hosts reached directly.
    bypass: Vec<Direct>,
}

/// One entry of `COPILOT_PROVIDER_NO_PROXY`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Direct {
    /// `*`: every host.
    All,
    /// A name, lower case, covering its subdomains.
    Name(String),
    /// An address, or a network (`10.0.0.0/8`, `fd00::/8`): the addresses in it, written as
    /// addresses in the provider's URL (a name is not resolved for this).
    Network(IpAddr, u8),
}

impl Direct {
    fn parse(entry: &str) -> Result<Direct, String> {
        let entry = entry.trim().to_ascii_lowercase();
        if entry == "*" {
            return Ok(Direct::All);
        }
        let (address, prefix) = match entry.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (entry.as_str(), None),
        };
        let unbracketed = address.trim_start_matches('[').trim_end_matches(']');
        let widest = |ip: IpAddr| if ip.is_ipv4() { 32 } else { 128 };
        match (unbracketed.parse::<IpAddr>(), prefix) {
            (Ok(ip), None) => Ok(Direct::Network(ip, widest(ip))),
            (Ok(ip), Some(prefix)) => match prefix.parse::<u8>() {
                Ok(bits) if bits <= widest(ip) => Ok(Direct::Network(ip, bits)),
                _ => Err(format!(
                    "provider_no_proxy: {entry:?} has a prefix length that does not fit its address"
                )),
            },
            (Err(_), Some(_)) => Err(format!(
                "provider_no_proxy: {entry:?} is not an address/prefix network"
            )),
            (Err(_), None) => Ok(Direct::Name(
                entry
                    .trim_start_matches("*.")
                    .trim_start_matches('.')
                    .trim_end_matches('.')
                    .to_owned(),
            )),
        }
    }

    /// Whether `host` (lower case, no brackets, no final dot) is this entry's.
    fn covers(&self, host: &str, address: Option<IpAddr>) -> bool {
        match (self, address) {
            (Direct::All, _) => true,
            (Direct::Network(network, bits), Some(ip)) => within(ip, *network, *bits),
            (Direct::Name(name), None) => {
                host == name
                    || host
                        .strip_suffix(name.as_str())
                        .is_some_and(|rest| rest.ends_with('.'))
            }
            _ => false,
        }
    }
}

/// Whether `ip` is in `network`/`bits` (the same family only).
fn within(ip: IpAddr, network: IpAddr, bits: u8) -> bool {
    match (ip, network) {
        (IpAddr::V4(ip), IpAddr::V4(network)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(network) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(network)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(network) & mask
        }
        _ => false,
    }
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("authorization", &self.authorization.as_ref().map(|_| "…"))
            .field("bypass", &self.bypass)
            .finish()
    }
}

/// Why a tunnel could not be had. Says nothing of the credentials.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("the proxy cannot be reached")]
    Unreachable,
    #[error("the proxy answered {0} to CONNECT")]
    Refused(u16),
    #[error("the proxy's answer to CONNECT is not HTTP")]
    Garbled,
}

impl Proxy {
    /// Reads `http://[user:password@]host[:port]` (port 80 when not given) and a
    /// comma-separated list of hosts to reach directly. Every problem is said; none
    /// repeats the password.
    pub fn parse(url: &str, no_proxy: &str) -> Result<Proxy, String> {
        let parsed =
            url::Url::parse(url).map_err(|err| format!("provider_proxy is not a URL ({err})"))?;
        if parsed.scheme() != "http" {
            return Err(format!(
                "provider_proxy must be an http:// URL (the tunnel itself carries TLS), not \
                 {}://",
                parsed.scheme()
            ));
        }
        if !matches!(parsed.path(), "" | "/") || parsed.query().is_some() {
            return Err("provider_proxy must be only http://[user:password@]host:port".into());
        }
        let host = match parsed.host() {
            Some(url::Host::Domain(name)) => name.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err("provider_proxy has no host".into()),
        };
        let decode = |part: &str| {
            percent_encoding::percent_decode_str(part)
                .decode_utf8()
                .map(|text| text.into_owned())
                .map_err(|_| "provider_proxy's user or password is not UTF-8".to_owned())
        };
        let authorization = if parsed.username().is_empty() && parsed.password().is_none() {
            None
        } else {
            let user = decode(parsed.username())?;
            let password = decode(parsed.password().unwrap_or_default())?;
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            Some(SecretString::from(format!("Basic {token}")))
        };
        let bypass = no_proxy
            .split(',')
            .filter(|entry| !entry.trim().is_empty())
            .map(Direct::parse)
            .collect::<Result<Vec<Direct>, String>>()?;
        Ok(Proxy {
            host,
            port: parsed.port().unwrap_or(80),
            authorization,
            bypass,
        })
    }

    /// The proxy's address, for logs: never its credentials.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Whether connections to `host` go straight there: a host the operator listed (a name
    /// covers its subdomains, a network the addresses in it). Nothing else is implied,
    /// loopback included, as with curl.
    pub fn bypasses(&self, host: &str) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let address = host.parse::<IpAddr>().ok();
        self.bypass.iter().any(|entry| entry.covers(&host, address))
    }

    /// A tunnel to `host:port` (`host` as the URL has it: a name, or an address, which is
    /// put in brackets when it is IPv6), ready for the provider's TLS or HTTP.
    pub async fn tunnel(&self, host: &str, port: u16) -> Result<TcpStream, TunnelError> {
        let addresses: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|_| TunnelError::Unreachable)?
            .collect();
        let mut stream = super::http::dial(&addresses)
            .await
            .map_err(|_| TunnelError::Unreachable)?;
        let _ = stream.set_nodelay(true);
        let authority = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
            _ => format!("{host}:{port}"),
        };
        let mut head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some(authorization) = &self.authorization {
            head.push_str("Proxy-Authorization: ");
            head.push_str(authorization.expose_secret());
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(|_| TunnelError::Unreachable)?;
        match read_status(&mut stream).await? {
            200..=299 => Ok(stream),
            status => Err(TunnelError::Refused(status)),
        }
    }
}

/// Reads the proxy's answer head, a byte at a time so that nothing after it (the provider's
/// first bytes) is taken, and returns its status.
async fn read_status(stream: &mut TcpStream) -> Result<u16, TunnelError> {
    let mut head = Vec::with_capacity(128);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(TunnelError::Garbled);
        }
        let byte = stream
            .read_u8()
            .await
            .map_err(|_| TunnelError::Unreachable)?;
        head.push(byte);
    }
    let line = head.split(|&byte| byte == b'\r').next().unwrap_or_default();
    let line = std::str::from_utf8(line).map_err(|_| TunnelError::Garbled)?;
    let mut parts = line.split(' ');
    match (parts.next(), parts.next()) {
        (Some(version), Some(status)) if version.starts_with("HTTP/1.") => {
            status.parse().map_err(|_| TunnelError::Garbled)
        }
        _ => Err(TunnelError::Garbled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_url_is_read_and_its_password_never_shown() {
        let proxy = Proxy::parse("http://egress:s%40cret@proxy.internal:3128", "").unwrap();
        assert_eq!(proxy.address(), "proxy.internal:3128");
        let expected = base64::engine::general_purpose::STANDARD.encode("egress:s@cret");
        assert_eq!(
            proxy
                .authorization
                .as_ref()
                .map(|a| a.expose_secret().to_owned()),
            Some(format!("Basic {expected}"))
        );
        let shown = format!("{proxy:?}");
        assert!(
            !shown.contains("cret") && !shown.contains(&expected),
            "{shown}"
        );
        assert_eq!(
            Proxy::parse("http://10.0.0.9", "").unwrap().address(),
            "10.0.0.9:80"
        );
        for bad in [
            "https://proxy.internal:3128",
            "socks5://proxy.internal:1080",
            "http://proxy.internal:3128/path",
            "proxy.internal:3128",
        ] {
            let err = Proxy::parse(bad, "").unwrap_err();
            assert!(!err.contains("cret"), "{err}");
        }
        let err = Proxy::parse("https://u:s3cret@proxy.internal", "").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn listed_hosts_go_direct() {
        let proxy = Proxy::parse(
            "http://proxy.internal:3128",
            " .corp.example, ollama.lan ,10.1.2.3,[fd00::1],localhost,127.0.0.1,\
             192.168.0.0/16,fc00:0::/7",
        )
        .unwrap();
        for direct in [
            "localhost",
            "127.0.0.1",
            "192.168.4.20",
            "[fd12:3456::9]",
            "[fd00:0:0::1]",
            "corp.example",
            "llm.corp.example",
            "OLLAMA.lan",
            "ollama.lan.",
            "10.1.2.3",
            "[fd00::1]",
        ] {
            assert!(proxy.bypasses(direct), "{direct}");
        }
        for proxied in [
            "api.openai.com",
            "notcorp.example",
            "corp.example.evil.com",
            "10.1.2.4",
            "xollama.lan",
            "[::1]",
            "192.169.0.1",
            "[fe80::1]",
        ] {
            assert!(!proxy.bypasses(proxied), "{proxied}");
        }
        let all = Proxy::parse("http://proxy.internal:3128", "*").unwrap();
        assert!(all.bypasses("api.openai.com"));
        for bad in ["10.0.0.0/33", "fd00::/129", "corp.example/8", "10.0.0.0/x"] {
            let err = Proxy::parse("http://proxy.internal:3128", bad).unwrap_err();
            assert!(err.starts_with("provider_no_proxy"), "{bad}: {err}");
        }
    }

    /// A proxy that answers `status` to the first CONNECT and records what it was sent.
    async fn one_shot_proxy(status: &'static str) -> (u16, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                head.push(socket.read_u8().await.unwrap());
            }
            let answer = format!("HTTP/1.1 {status}\r\nVia: test\r\n\r\nprovider-bytes");
            socket.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8(head).unwrap()
        });
        (port, seen)
    }

    #[tokio::test]
    async fn a_tunnel_is_asked_for_by_name_with_the_credentials() {
        let (port, seen) = one_shot_proxy("200 Connection established").await;
        let proxy = Proxy::parse(&format!("http://u:p@127.0.0.1:{port}"), "").unwrap();
        let mut stream = proxy.tunnel("api.example.com", 443).await.unwrap();
        let head = seen.await.unwrap();
        assert!(
            head.starts_with(
                "CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n"
            ),
            "{head}"
        );
        assert!(
            head.contains("Proxy-Authorization: Basic dTpw\r\n"),
            "{head}"
        );
        // What follows the proxy's answer belongs to the provider and is left unread.
        let mut rest = [0u8; 14];
        stream.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"provider-bytes");

        let (port, seen) = one_shot_proxy("200 OK").await;
        let proxy = Proxy::parse(&format!("http://127.0.0.1:{port}"), "").unwrap();
        proxy.tunnel("2001:db8::1", 8443).await.unwrap();
        let head = seen.await.unwrap();
        assert!(
            head.starts_with("CONNECT [2001:db8::1]:8443 HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(!head.contains("Proxy-Authorization"), "{head}");
    }

    #[tokio::test]
    async fn a_refusal_by_the_proxy_is_said_with_its_status() {
        let (port, _seen) = one_shot_proxy("407 Proxy Authentication Required").await;
        let proxy = Proxy::parse(&format!("http://127.0.0.1:{port}"), "").unwrap();
        let err = proxy.tunnel("api.example.com", 443).await.unwrap_err();
        assert!(matches!(err, TunnelError::Refused(407)), "{err:?}");
    }
}
