//! A TCP proxy to the local Postgres that can fall silent on some of its connections, the way a
//! NAT or a firewall does with a flow it has forgotten: no FIN, no reset, the bytes just stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

const POSTGRES: &str = "127.0.0.1:5432";

pub struct SilentProxy {
    pub port: u16,
    flows: Arc<Mutex<Vec<Arc<Flow>>>>,
    accepting: tokio::task::JoinHandle<()>,
}

/// One proxied connection.
#[derive(Default)]
struct Flow {
    /// Its client sent the marker.
    marked: AtomicBool,
    /// It passes nothing more.
    silent: AtomicBool,
}

impl SilentProxy {
    /// Forwards `127.0.0.1:port` to the local Postgres. [`SilentProxy::silence`] makes the
    /// open connections whose client has sent `marker` pass nothing more either way, their
    /// sockets left open; the others, and new ones, are forwarded as before.
    pub async fn start(marker: &'static [u8]) -> SilentProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let flows: Arc<Mutex<Vec<Arc<Flow>>>> = Arc::default();
        let accepting = {
            let flows = flows.clone();
            tokio::spawn(async move {
                // Dropped with this task, which aborts every connection's pumps.
                let mut pumps = JoinSet::new();
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(POSTGRES).await else {
                        continue;
                    };
                    let flow = Arc::new(Flow::default());
                    flows.lock().unwrap().push(flow.clone());
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let up = Pump {
                        marker: Some(marker),
                        flow: flow.clone(),
                    };
                    let down = Pump { marker: None, flow };
                    pumps.spawn(up.run(client_read, server_write));
                    pumps.spawn(down.run(server_read, client_write));
                }
            })
        };
        SilentProxy {
            port,
            flows,
            accepting,
        }
    }

    /// From now on the marked connections open now pass nothing; returns how many.
    pub fn silence(&self) -> usize {
        let flows = self.flows.lock().unwrap();
        let marked = flows
            .iter()
            .filter(|flow| flow.marked.load(Ordering::SeqCst));
        marked
            .inspect(|flow| flow.silent.store(true, Ordering::SeqCst))
            .count()
    }
}

impl Drop for SilentProxy {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// One direction of one connection.
struct Pump {
    /// Marks the connection when this text passes (client to server only).
    marker: Option<&'static [u8]>,
    flow: Arc<Flow>,
}

impl Pump {
    async fn run(self, mut from: OwnedReadHalf, mut to: OwnedWriteHalf) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let read = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(read) => read,
            };
            if let Some(marker) = self.marker
                && buf[..read].windows(marker.len()).any(|part| part == marker)
            {
                self.flow.marked.store(true, Ordering::SeqCst);
            }
            if self.flow.silent.load(Ordering::SeqCst) {
                // Both ends stay open and hear nothing more, until the proxy is dropped.
                std::future::pending::<()>().await;
            }
            if to.write_all(&buf[..read]).await.is_err() {
                return;
            }
        }
    }
}
