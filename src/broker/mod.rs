//! RabbitMQ: connections with automatic recovery, the topology, the consumer loop and the
//! confirmed publisher.

pub mod consumer;
pub mod publisher;
pub mod topology;

pub use consumer::Consumer;
pub use publisher::{Outgoing, PublishError, Publisher};
pub use topology::Topology;

use lapin::{Connection, ConnectionProperties};

/// Opens a connection that lapin recovers by itself (connection, channels, topology and
/// consumers) after a network failure or a forced close.
pub async fn connect(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    crate::install_crypto_provider();
    let properties = ConnectionProperties::default()
        .with_connection_name(name.into())
        .enable_auto_recover();
    Connection::connect(url, properties).await
}
