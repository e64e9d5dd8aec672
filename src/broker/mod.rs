//! RabbitMQ: connections with automatic recovery, the topology, the consumer loop and the
//! confirmed publisher.

pub mod consumer;
pub mod link;
pub mod publisher;
pub mod topology;

pub use consumer::Consumer;
pub use link::Link;
pub use publisher::{Outgoing, PublishError, Publisher};
pub use topology::{Subscription, Topology, TopologyKeeper};

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::{Connection, ConnectionProperties};

/// The channel-level error the broker answered with, if that is what `err` is.
fn soft_error(err: &lapin::Error) -> Option<&AMQPSoftError> {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// Whether the broker answered that a named exchange or queue does not exist (404).
pub fn is_not_found(err: &lapin::Error) -> bool {
    matches!(soft_error(err), Some(AMQPSoftError::NOTFOUND))
}

/// Whether the broker refused a declaration because what exists has other arguments (406).
pub fn is_precondition_failed(err: &lapin::Error) -> bool {
    matches!(soft_error(err), Some(AMQPSoftError::PRECONDITIONFAILED))
}

/// The text of the header `name` (a long or a short AMQP string), if `headers` has one.
pub fn text_header(headers: &lapin::types::FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        lapin::types::AMQPValue::LongString(text) => {
            Some(String::from_utf8_lossy(text.as_bytes()).into_owned())
        }
        lapin::types::AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
        _ => None,
    }
}

/// Opens a connection that lapin recovers by itself (connection, channels, topology and
/// consumers) after a network failure or a forced close.
pub async fn connect(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    crate::install_crypto_provider();
    let properties = ConnectionProperties::default()
        .with_connection_name(name.into())
        .with_backoff(crate::provider::retry::broker_reconnect())
        .enable_auto_recover();
    let mut uri: lapin::uri::AMQPUri = url
        .parse()
        .map_err(|err: String| lapin::Error::from(std::io::Error::other(err)))?;
    // lapin keeps 32 frames of read and of write buffer per connection, zero-filled: 8 MiB
    // per connection at RabbitMQ's default frame_max (128 KiB). Our messages take a few KiB;
    // a larger one spans several frames. A `frame_max` in the URL wins.
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    Connection::connect_uri(uri, properties).await
}

/// The largest AMQP frame we propose (the broker may lower it).
const FRAME_MAX: u32 = 32 * 1024;

/// Consumes everything published to `exchange` from now on, through a temporary exclusive
/// queue (for downstream-style listeners: the demo, the benchmark, tests).
pub async fn tap(
    connection: &Connection,
    exchange: &str,
) -> Result<(lapin::Channel, lapin::Consumer), lapin::Error> {
    use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    let channel = connection.create_channel().await?;
    let options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    let queue = channel
        .queue_declare("".into(), options, FieldTable::default())
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let consumer = channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer))
}
