//! The HTTP/1.1 client that reaches providers, on hyper's connection API with a pool of our
//! own: idle connections are kept per endpoint (scheme, host, port) and reused, most recently
//! used first.
//!
//! Every new connection goes through the endpoint guard first: a name is resolved here and
//! each address it resolves to is checked against the policy, and only an allowed address is
//! dialled, so a name that resolves to a metadata address is never connected to. TLS is
//! rustls (ring) against the system's root certificates, loaded at the first `https`
//! connection. Through the operator's egress proxy when one is set (`proxy.rs`: a `CONNECT`
//! tunnel). No redirects, no HTTP/2 (see `ProviderClient::new` for why).
//!
//! Why not a general client: one provider call went through reqwest's and hyper-util's
//! layers (redirect policy, pool keys built from the formatted URI, boxed futures, a timer
//! per body), which took ≈10 % of the worker's CPU at saturation (BENCHMARKS.md).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::guard::{self, EndpointRefused, GuardError};
use super::proxy::{Proxy, TunnelError};
use crate::config::EndpointPolicy;

/// How long connecting may take, all of a name's addresses together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one address is tried alone before the next is tried beside it.
const HEAD_START: Duration = Duration::from_millis(250);
/// An idle connection unused for this long is closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often idle connections past their time are swept out of the pool: on a checkin at
/// most this often, and by [`HttpClient::keep_swept`] when no call checks one in.
const SWEEP_EVERY: Duration = Duration::from_secs(15);

/// Why an exchange failed. Carries no URL, header or body: nothing that could hold a key.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(transparent)]
    Refused(#[from] EndpointRefused),
    #[error("the provider's host name did not resolve")]
    Unresolved,
    #[error("connection failed")]
    Connect,
    #[error("TLS: {0}")]
    Tls(String),
    #[error("timed out")]
    Timeout,
    #[error("request failed")]
    Request,
    #[error("answer larger than {0} bytes")]
    TooLarge(usize),
    #[error("egress proxy: {0}")]
    Proxy(#[from] TunnelError),
}

/// A provider's answer, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// Where connections go; the pool's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Endpoint {
    https: bool,
    host: Host,
    port: u16,
}

/// A URL's host: a name to resolve, or a literal address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Host {
    Name(String),
    Address(IpAddr),
}

impl Host {
    /// As a URL writes it (an IPv6 address without its brackets).
    fn text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Host::Name(name) => name.into(),
            Host::Address(ip) => ip.to_string().into(),
        }
    }
}

struct Idle {
    sender: SendRequest<Full<Bytes>>,
    since: Instant,
}

struct Pool {
    idle: HashMap<Endpoint, Vec<Idle>>,
    swept: Instant,
}

impl Pool {
    /// Drops the idle connections that closed or outlived [`IDLE_TIMEOUT`] at `now`; a
    /// connection's task ends, and its socket closes, once its sender is dropped. Returns how
    /// many were dropped.
    fn sweep(&mut self, now: Instant) -> usize {
        self.swept = now;
        let mut dropped = 0;
        self.idle.retain(|_, list| {
            let before = list.len();
            list.retain(|idle| {
                !idle.sender.is_closed() && now.duration_since(idle.since) < IDLE_TIMEOUT
            });
            dropped += before - list.len();
            !list.is_empty()
        });
        dropped
    }
}

/// The shared client. Cheap to clone.
#[derive(Clone)]
pub struct HttpClient {
    policy: EndpointPolicy,
    proxy: Option<Arc<Proxy>>,
    pool: Arc<Mutex<Pool>>,
    tls: Arc<OnceLock<Result<tokio_rustls::TlsConnector, String>>>,
}

impl HttpClient {
    pub fn new(policy: EndpointPolicy) -> HttpClient {
        HttpClient {
            policy,
            proxy: None,
            pool: Arc::new(Mutex::new(Pool {
                idle: HashMap::new(),
                swept: Instant::now(),
            })),
            tls: Arc::new(OnceLock::new()),
        }
    }

    /// The same client, opening its connections through `proxy` (the hosts it lists as
    /// direct aside).
    pub fn through(mut self, proxy: Option<Proxy>) -> HttpClient {
        self.proxy = proxy.map(Arc::new);
        self
    }

    /// Sends one request and reads the whole answer (at most `max_body` bytes), all within
    /// `timeout`. `headers` are sent as given, plus `host` and `content-length`.
    pub async fn send(
        &self,
        method: Method,
        url: &url::Url,
        headers: HeaderMap,
        body: Vec<u8>,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Reply, HttpError> {
        let exchange = self.exchange(method, url, headers, body, max_body);
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(HttpError::Timeout))
    }

    async fn exchange(
        &self,
        method: Method,
        url: &url::Url,
        headers: HeaderMap,
        body: Vec<u8>,
        max_body: usize,
    ) -> Result<Reply, HttpError> {
        let endpoint = endpoint_of(url)?;
        let mut request = Request::new(Full::new(Bytes::from(body)));
        *request.method_mut() = method;
        *request.uri_mut() = url[url::Position::BeforePath..url::Position::AfterQuery]
            .parse()
            .map_err(|_| HttpError::Refused(EndpointRefused::BadUrl))?;
        *request.headers_mut() = headers;
        let authority = &url[url::Position::BeforeHost..url::Position::AfterPort];
        let host = HeaderValue::from_str(authority)
            .map_err(|_| HttpError::Refused(EndpointRefused::BadUrl))?;
        request.headers_mut().insert(header::HOST, host);

        let (mut sender, reused) = match self.checkout(&endpoint).await {
            Some(sender) => (sender, true),
            None => (self.connect(&endpoint).await?, false),
        };
        let response = match sender.try_send_request(request).await {
            Ok(response) => response,
            Err(mut failed) => match failed.take_message() {
                // A reused connection that closed before the request was written: the
                // provider never saw it, so it goes once more on a new connection.
                Some(request) if reused => {
                    sender = self.connect(&endpoint).await?;
                    sender
                        .send_request(request)
                        .await
                        .map_err(|_| HttpError::Request)?
                }
                _ => return Err(HttpError::Request),
            },
        };
        let (parts, mut incoming) = response.into_parts();
        let expected = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<usize>().ok());
        if expected.is_some_and(|length| length > max_body) {
            return Err(HttpError::TooLarge(max_body));
        }
        let mut body = Vec::with_capacity(expected.unwrap_or(0));
        while let Some(frame) = incoming.frame().await {
            let frame = frame.map_err(|_| HttpError::Request)?;
            if let Ok(data) = frame.into_data() {
                if body.len() + data.len() > max_body {
                    return Err(HttpError::TooLarge(max_body));
                }
                body.extend_from_slice(&data);
            }
        }
        // Read to its end: the connection can carry the next request.
        self.checkin(endpoint, sender);
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// The most recently used idle connection to `endpoint` that is still open.
    async fn checkout(&self, endpoint: &Endpoint) -> Option<SendRequest<Full<Bytes>>> {
        loop {
            let candidate = {
                let mut pool = self.lock_pool();
                let list = pool.idle.get_mut(endpoint)?;
                loop {
                    let idle = list.pop()?;
                    if !idle.sender.is_closed() && idle.since.elapsed() < IDLE_TIMEOUT {
                        break idle.sender;
                    }
                }
            };
            let mut sender = candidate;
            // Ready at once unless the connection is finishing its last answer or closing.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    fn checkin(&self, endpoint: Endpoint, sender: SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut pool = self.lock_pool();
        if now.duration_since(pool.swept) > SWEEP_EVERY {
            pool.sweep(now);
        }
        pool.idle
            .entry(endpoint)
            .or_default()
            .push(Idle { sender, since: now });
    }

    /// Sweeps the pool every [`SWEEP_EVERY`] until `stop`. Without it, the connections left
    /// idle after a burst (thousands, each with its buffers) stay open until the provider
    /// closes them whenever calls stop altogether, since only a checkin sweeps.
    pub async fn keep_swept(self, stop: CancellationToken) {
        while crate::sleep_unless_stopped(SWEEP_EVERY, &stop).await {
            let dropped = self.lock_pool().sweep(Instant::now());
            if dropped > 0 {
                tracing::debug!(dropped, "idle provider connections closed");
            }
        }
    }

    fn lock_pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection: the guard's addresses only (directly, or through the proxy's
    /// tunnel), then TLS for `https`.
    async fn connect(&self, endpoint: &Endpoint) -> Result<SendRequest<Full<Bytes>>, HttpError> {
        let proxy = self
            .proxy
            .as_ref()
            .filter(|proxy| !proxy.bypasses(&endpoint.host.text()));
        let guarded = |err| match err {
            GuardError::Refused(refused) => HttpError::Refused(refused),
            GuardError::Unresolved => HttpError::Unresolved,
        };
        let tcp = match (&endpoint.host, proxy) {
            (Host::Name(name), None) => {
                let addresses = guard::resolve(name, endpoint.port, self.policy)
                    .await
                    .map_err(guarded)?;
                dial(&addresses).await?
            }
            (Host::Address(ip), None) => {
                let address = SocketAddr::new(*ip, endpoint.port);
                dial(&[guard::allowed(address, self.policy)?]).await?
            }
            (Host::Name(name), Some(proxy)) => {
                // The proxy dials the name itself: every address it may pick must pass.
                guard::resolve_strict(name, endpoint.port, self.policy)
                    .await
                    .map_err(guarded)?;
                proxy.tunnel(name, endpoint.port).await?
            }
            (Host::Address(ip), Some(proxy)) => {
                guard::allowed(SocketAddr::new(*ip, endpoint.port), self.policy)?;
                proxy.tunnel(&ip.to_string(), endpoint.port).await?
            }
        };
        // No Nagle delay: a request is written whole and waits for nothing.
        let _ = tcp.set_nodelay(true);
        if !endpoint.https {
            return start(tcp).await;
        }
        let tls = self
            .tls
            .get_or_init(tls_connector)
            .clone()
            .map_err(HttpError::Tls)?;
        let name = match &endpoint.host {
            Host::Name(name) => rustls::pki_types::ServerName::try_from(name.clone())
                .map_err(|_| HttpError::Refused(EndpointRefused::BadUrl))?,
            Host::Address(ip) => rustls::pki_types::ServerName::from(*ip),
        };
        let stream = tls
            .connect(name, tcp)
            .await
            .map_err(|err| HttpError::Tls(err.to_string()))?;
        start(stream).await
    }
}

fn endpoint_of(url: &url::Url) -> Result<Endpoint, HttpError> {
    let https = match url.scheme() {
        "https" => true,
        "http" => false,
        _ => return Err(HttpError::Refused(EndpointRefused::BadUrl)),
    };
    let host = match url.host() {
        Some(url::Host::Domain(name)) => Host::Name(name.to_owned()),
        Some(url::Host::Ipv4(ip)) => Host::Address(ip.into()),
        Some(url::Host::Ipv6(ip)) => Host::Address(ip.into()),
        None => return Err(HttpError::Refused(EndpointRefused::BadUrl)),
    };
    let port = url
        .port_or_known_default()
        .ok_or(HttpError::Refused(EndpointRefused::BadUrl))?;
    Ok(Endpoint { https, host, port })
}

/// Dials the addresses in the resolver's order, each with a head start of `HEAD_START` over
/// the next, and keeps the first that connects (the others are dropped): an address that
/// never answers (an unroutable IPv6 address, say) delays the call by the head start, not
/// by the connect timeout.
pub(super) async fn dial(addresses: &[SocketAddr]) -> Result<TcpStream, HttpError> {
    use futures_util::StreamExt as _;
    let mut waiting = addresses.iter();
    let Some(first) = waiting.next() else {
        return Err(HttpError::Connect);
    };
    let mut attempts = futures_util::stream::FuturesUnordered::new();
    attempts.push(TcpStream::connect(*first));
    let deadline = tokio::time::sleep(CONNECT_TIMEOUT);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            Some(attempt) = attempts.next() => match attempt {
                Ok(stream) => return Ok(stream),
                Err(_) => match waiting.next() {
                    Some(address) => attempts.push(TcpStream::connect(*address)),
                    None if attempts.is_empty() => return Err(HttpError::Connect),
                    None => {}
                },
            },
            () = tokio::time::sleep(HEAD_START), if waiting.len() > 0 => {
                if let Some(address) = waiting.next() {
                    attempts.push(TcpStream::connect(*address));
                }
            }
            () = &mut deadline => return Err(HttpError::Connect),
        }
    }
}

/// The HTTP/1.1 handshake on a connected stream; the connection is driven by a task of its
/// own, which ends when the connection closes.
async fn start<S>(stream: S) -> Result<SendRequest<Full<Bytes>>, HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|_| HttpError::Connect)?;
    tokio::spawn(async move {
        // Its end (closed by either side, or failed) is seen by the sender.
        let _ = connection.await;
    });
    Ok(sender)
}

/// rustls (ring) against the system's root certificates, HTTP/1.1 by ALPN.
fn tls_connector() -> Result<tokio_rustls::TlsConnector, String> {
    connector_with(crate::system_roots())
}

fn connector_with(roots: rustls::RootCertStore) -> Result<tokio_rustls::TlsConnector, String> {
    if roots.is_empty() {
        return Err("this system has no root certificates".into());
    }
    let mut config = crate::verifying_tls(roots).map_err(|err| err.to_string())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    const LOOPBACK: EndpointPolicy = EndpointPolicy {
        allow_loopback: true,
        allow_private: false,
    };

    /// A server that answers every request on a connection with `answer`, counting the
    /// connections it accepted.
    async fn server(answer: &'static str) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buffer = vec![0u8; 64 * 1024];
                    let mut seen = Vec::new();
                    loop {
                        let Ok(n) = socket.read(&mut buffer).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buffer[..n]);
                        // One answer per complete request (headers end, then the body).
                        while let Some(end) = request_end(&seen) {
                            seen.drain(..end);
                            if socket.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn request_end(seen: &[u8]) -> Option<usize> {
        let head = seen.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let text = String::from_utf8_lossy(&seen[..head]).to_ascii_lowercase();
        let length = text
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .map_or(0, |n| n.trim().parse::<usize>().unwrap_or(0));
        (seen.len() >= head + length).then_some(head + length)
    }

    async fn post(client: &HttpClient, addr: SocketAddr) -> Result<Reply, HttpError> {
        let url = url::Url::parse(&format!("http://{addr}/v1/chat?x=1")).unwrap();
        post_to(client, &url).await
    }

    /// POSTs `{}` to `url`, at most 1024 bytes of answer within 5 s.
    async fn post_to(client: &HttpClient, url: &url::Url) -> Result<Reply, HttpError> {
        client
            .send(
                Method::POST,
                url,
                HeaderMap::new(),
                b"{}".to_vec(),
                Duration::from_secs(5),
                1024,
            )
            .await
    }

    #[tokio::test]
    async fn connections_are_reused_one_after_another() {
        let (addr, accepted) = server(
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}",
        )
        .await;
        let client = HttpClient::new(LOOPBACK);
        for _ in 0..3 {
            let reply = post(&client, addr).await.unwrap();
            assert_eq!(reply.status, StatusCode::OK);
            assert_eq!(reply.body, b"{}");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// A sweep closes the connections idle past their time, and only those; the provider
    /// sees its socket closed.
    #[tokio::test]
    async fn a_sweep_closes_connections_idle_too_long() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (closed_tx, closed) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buffer = vec![0u8; 4096];
            let mut seen = Vec::new();
            while request_end(&seen).is_none() {
                let n = socket.read(&mut buffer).await.unwrap();
                seen.extend_from_slice(&buffer[..n]);
            }
            socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                .await
                .unwrap();
            // The client now keeps the connection idle; a read of 0 bytes is its close.
            let _ = closed_tx.send(socket.read(&mut buffer).await.map(|n| n == 0));
        });
        let client = HttpClient::new(LOOPBACK);
        assert_eq!(post(&client, addr).await.unwrap().body, b"{}");
        let idle = |client: &HttpClient| {
            client
                .lock_pool()
                .idle
                .values()
                .map(Vec::len)
                .sum::<usize>()
        };
        assert_eq!(idle(&client), 1);

        let now = Instant::now();
        assert_eq!(client.lock_pool().sweep(now), 0, "not idle long enough yet");
        assert_eq!(idle(&client), 1);
        assert_eq!(client.lock_pool().sweep(now + IDLE_TIMEOUT), 1);
        assert_eq!(idle(&client), 0);
        let closed = tokio::time::timeout(Duration::from_secs(5), closed).await;
        assert!(matches!(closed, Ok(Ok(Ok(true)))), "{closed:?}");
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_not_reused() {
        let (addr, accepted) =
            server("HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}").await;
        let client = HttpClient::new(LOOPBACK);
        for _ in 0..2 {
            assert_eq!(post(&client, addr).await.unwrap().body, b"{}");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn answers_over_the_limit_are_refused() {
        let (addr, _) = server("HTTP/1.1 200 OK\r\ncontent-length: 2000\r\n\r\n").await;
        let client = HttpClient::new(LOOPBACK);
        assert!(matches!(
            post(&client, addr).await,
            Err(HttpError::TooLarge(1024))
        ));
    }

    #[tokio::test]
    async fn loopback_is_refused_unless_allowed_and_never_dialled() {
        let (addr, accepted) = server("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
        let strict = HttpClient::new(EndpointPolicy::default());
        assert!(matches!(
            post(&strict, addr).await,
            Err(HttpError::Refused(EndpointRefused::Loopback(_)))
        ));
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    /// A throwaway certificate for `localhost` (the `openssl` CLI) and a TLS server with it
    /// that answers one request with 200 and `{}`.
    async fn tls_server() -> (SocketAddr, rustls::pki_types::CertificateDer<'static>) {
        use rustls::pki_types::pem::PemObject as _;
        let dir = std::env::temp_dir().join(format!("cw-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
        let made = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
            .args(["-addext", "subjectAltName=DNS:localhost"])
            .args(["-addext", "basicConstraints=critical,CA:FALSE", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl, to make a test certificate");
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
        let cert = rustls::pki_types::CertificateDer::from_pem_file(&cert).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&key).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(socket).await else {
                        return;
                    };
                    let mut buffer = vec![0u8; 16 * 1024];
                    let mut seen = Vec::new();
                    while request_end(&seen).is_none() {
                        match tls.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buffer[..n]),
                        }
                    }
                    let _ = tls
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                        .await;
                    let _ = tls.flush().await;
                });
            }
        });
        (addr, cert)
    }

    #[tokio::test]
    async fn tls_is_verified_against_the_roots() {
        crate::install_crypto_provider();
        let (addr, cert) = tls_server().await;
        let url = url::Url::parse(&format!("https://localhost:{}/v1", addr.port())).unwrap();
        // The system's roots do not know this certificate: no session, nothing sent.
        assert!(matches!(
            post_to(&HttpClient::new(LOOPBACK), &url).await,
            Err(HttpError::Tls(_))
        ));
        // With its issuer trusted, the same server answers over TLS.
        let trusting = HttpClient::new(LOOPBACK);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let _ = trusting.tls.set(connector_with(roots));
        let reply = post_to(&trusting, &url).await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body, b"{}");
    }

    #[tokio::test]
    async fn an_address_that_never_answers_does_not_hold_up_the_next() {
        // A listener that never accepts, its queue full: Linux drops further SYNs, so a
        // connection to it hangs (retransmitting) instead of failing.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let full = socket.listen(0).unwrap();
        let hanging = full.local_addr().unwrap();
        let mut held = Vec::new();
        for _ in 0..4 {
            let attempt = TcpStream::connect(hanging);
            if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_millis(200), attempt).await
            {
                held.push(stream);
            }
        }
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let started = Instant::now();
        let stream = tokio::time::timeout(
            Duration::from_secs(3),
            dial(&[hanging, good.local_addr().unwrap()]),
        )
        .await
        .expect("the second address is tried after the head start")
        .unwrap();
        assert_eq!(stream.peer_addr().unwrap(), good.local_addr().unwrap());
        assert!(started.elapsed() >= HEAD_START);
        let none = tokio::time::timeout(Duration::from_secs(1), dial(&[])).await;
        assert!(matches!(none, Ok(Err(HttpError::Connect))));
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _held = tokio::spawn(async move {
            let (_socket, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let client = HttpClient::new(LOOPBACK);
        let url = url::Url::parse(&format!("http://{addr}/")).unwrap();
        let sent = client
            .send(
                Method::GET,
                &url,
                HeaderMap::new(),
                Vec::new(),
                Duration::from_millis(200),
                1024,
            )
            .await;
        assert!(matches!(sent, Err(HttpError::Timeout)));
    }
}
