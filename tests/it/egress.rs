//! Provider calls through the operator's egress proxy (`COPILOT_PROVIDER_PROXY`): a
//! `CONNECT` tunnel per connection, with the proxy's credentials; the hosts of
//! `COPILOT_PROVIDER_NO_PROXY` reached directly.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::skeleton::provider_for;
use crate::support::{Harness, Options, summary_output, ticket_event};

const WAIT: Duration = Duration::from_secs(20);
const PROXY_USER: &str = "egress";
const PROXY_PASSWORD: &str = "proxy-pass-0123";

/// A `CONNECT` proxy that wants `Proxy-Authorization: Basic egress:proxy-pass-0123`
/// (407 otherwise), tunnels to the asked address, and keeps the head of every request.
struct ConnectProxy {
    port: u16,
    heads: Arc<Mutex<Vec<String>>>,
    accepting: tokio::task::JoinHandle<()>,
}

impl ConnectProxy {
    async fn start() -> ConnectProxy {
        use base64::Engine as _;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        let expected = format!(
            "Proxy-Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD
                .encode(format!("{PROXY_USER}:{PROXY_PASSWORD}"))
        );
        let accepting = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let seen = seen.clone();
                let expected = expected.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") {
                        let Ok(byte) = client.read_u8().await else {
                            return;
                        };
                        head.push(byte);
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    seen.lock().unwrap().push(head.clone());
                    let target = head
                        .strip_prefix("CONNECT ")
                        .and_then(|rest| rest.split(' ').next())
                        .map(str::to_owned);
                    let answer = match (&target, head.contains(&expected)) {
                        (Some(_), false) => "HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
                        (None, _) => "HTTP/1.1 405 Method Not Allowed\r\n\r\n",
                        (Some(_), true) => "HTTP/1.1 200 Connection established\r\n\r\n",
                    };
                    let _ = client.write_all(answer.as_bytes()).await;
                    let (Some(target), true) = (target, answer.contains(" 200 ")) else {
                        return;
                    };
                    if let Ok(mut upstream) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
            }
        });
        ConnectProxy {
            port,
            heads,
            accepting,
        }
    }

    fn url(&self, password: &str) -> String {
        format!("http://{PROXY_USER}:{password}@127.0.0.1:{}", self.port)
    }

    /// The `CONNECT` targets asked for so far.
    fn targets(&self) -> Vec<String> {
        self.heads
            .lock()
            .unwrap()
            .iter()
            .filter_map(|head| head.strip_prefix("CONNECT "))
            .filter_map(|rest| rest.split(' ').next())
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// With a proxy set, an org's calls reach its provider through a tunnel the proxy was asked
/// for by host and port, with the proxy's credentials and without the org's key; a host
/// listed in `COPILOT_PROVIDER_NO_PROXY` is called directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_calls_go_through_the_egress_proxy() {
    let proxy = ConnectProxy::start().await;
    let mut h = Harness::with(Options {
        provider_proxy: Some(proxy.url(PROXY_PASSWORD)),
        provider_no_proxy: Some("localhost".to_owned()),
        ..Options::default()
    })
    .await;
    let tunneled = provider_for("sk-tunneled-0123", &summary_output("tunneled")).await;
    let direct = provider_for("sk-direct-0123", &summary_output("direct")).await;
    h.set_org(
        "org_tunneled",
        &format!("{}/v1", tunneled.uri()),
        "sk-tunneled-0123",
    )
    .await;
    let direct_port = direct.address().port();
    h.set_org(
        "org_direct",
        &format!("http://localhost:{direct_port}/v1"),
        "sk-direct-0123",
    )
    .await;

    h.publish(&ticket_event(
        "evt_tunneled",
        "org_tunneled",
        "ticket.created",
    ))
    .await;
    h.publish(&ticket_event("evt_direct", "org_direct", "ticket.created"))
        .await;
    let results = h.results(2, WAIT).await;
    assert_eq!(results.len(), 2);
    for result in &results {
        assert_eq!(result.kind, "ticket.enrichment.completed", "{result:?}");
    }
    assert_eq!(tunneled.received_requests().await.unwrap().len(), 1);
    assert_eq!(direct.received_requests().await.unwrap().len(), 1);
    assert_eq!(
        proxy.targets(),
        [tunneled.address().to_string()],
        "one tunnel, to the proxied provider only"
    );
    let heads = proxy.heads.lock().unwrap().join("");
    assert!(!heads.contains("sk-tunneled"), "{heads}");
    h.finish().await;
}

/// A proxy that refuses the tunnel (here: wrong credentials) fails the call as a connection
/// failure, retried and then failed; nothing reaches the provider, and the proxy's answer is
/// what the result says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_the_proxy_refuses_fails_the_run_without_reaching_the_provider() {
    let proxy = ConnectProxy::start().await;
    let mut h = Harness::with(Options {
        provider_proxy: Some(proxy.url("wrong-password")),
        max_attempts: 1,
        ..Options::default()
    })
    .await;
    let provider = provider_for("sk-refused-0123", &summary_output("never")).await;
    h.set_org(
        "org_refused",
        &format!("{}/v1", provider.uri()),
        "sk-refused-0123",
    )
    .await;
    h.publish(&ticket_event(
        "evt_refused",
        "org_refused",
        "ticket.created",
    ))
    .await;
    let (result, _) = h.next_result(WAIT).await.expect("a result");
    assert_eq!(result.kind, "ticket.enrichment.failed", "{result:?}");
    let error = serde_json::to_string(&result.data.error).unwrap();
    assert!(error.contains("407"), "{error}");
    assert!(!error.contains("wrong-password"), "{error}");
    assert!(provider.received_requests().await.unwrap().is_empty());
    assert!(!proxy.targets().is_empty());
    h.finish().await;
}
