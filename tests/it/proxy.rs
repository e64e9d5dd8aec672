//! A TCP proxy to the local Postgres that can fall silent on some of its connections, the way a
//! NAT or a firewall does with a flow it has forgotten (no FIN, no reset, the bytes just stop),
//! or pass everything on but notifications, the way a transaction-mode PgBouncer does.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
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
struct Flow {
    /// Its client sent the marker.
    marked: AtomicBool,
    /// [`PASS`], [`SILENT`] or [`DEAF`].
    mode: AtomicU8,
}

/// Everything is passed on.
const PASS: u8 = 0;
/// Nothing more is passed on, either way.
const SILENT: u8 = 1;
/// The server's notifications are dropped; everything else is passed on.
const DEAF: u8 = 2;
/// The type of Postgres' NotificationResponse message.
const NOTIFICATION: u8 = b'A';

impl SilentProxy {
    /// Forwards `127.0.0.1:port` to the local Postgres. [`SilentProxy::silence`] makes the
    /// open connections whose client has sent `marker` pass nothing more either way, their
    /// sockets left open, and [`SilentProxy::deafen`] drops their notifications; the others,
    /// and new ones, are forwarded as before.
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
                    let flow = Arc::new(Flow {
                        marked: AtomicBool::new(false),
                        mode: AtomicU8::new(PASS),
                    });
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
        self.set(SILENT)
    }

    /// From now on the marked connections open now pass no notification; returns how many.
    pub fn deafen(&self) -> usize {
        self.set(DEAF)
    }

    fn set(&self, mode: u8) -> usize {
        let flows = self.flows.lock().unwrap();
        let marked = flows
            .iter()
            .filter(|flow| flow.marked.load(Ordering::SeqCst));
        marked
            .inspect(|flow| flow.mode.store(mode, Ordering::SeqCst))
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
        // What the server sent, cut into whole messages (type byte, then a length that counts
        // itself): the client speaks first, unframed, and with no TLS the server never does.
        let mut pending: Vec<u8> = Vec::new();
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
            let mode = self.flow.mode.load(Ordering::SeqCst);
            if mode == SILENT {
                // Both ends stay open and hear nothing more, until the proxy is dropped.
                std::future::pending::<()>().await;
            }
            let out = if self.marker.is_some() {
                buf[..read].to_vec()
            } else {
                pending.extend_from_slice(&buf[..read]);
                whole_messages(&mut pending, mode == DEAF)
            };
            if to.write_all(&out).await.is_err() {
                return;
            }
        }
    }
}

/// Takes the whole messages off the front of `pending`, without the notifications when
/// `drop_notifications`.
fn whole_messages(pending: &mut Vec<u8>, drop_notifications: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = 0;
    while pending.len() >= at + 5 {
        let length = u32::from_be_bytes(pending[at + 1..at + 5].try_into().unwrap()) as usize;
        let end = at + 1 + length;
        if pending.len() < end {
            break;
        }
        if !(drop_notifications && pending[at] == NOTIFICATION) {
            out.extend_from_slice(&pending[at..end]);
        }
        at = end;
    }
    pending.drain(..at);
    out
}
