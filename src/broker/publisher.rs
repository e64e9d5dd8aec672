//! Confirmed, mandatory publishing that cannot silently drop a message.
//!
//! Every publish waits for the broker's confirm. A nack, or a confirm that never comes because
//! the channel was recovered, is retried; a message returned as unroutable is an error (the
//! results exchange has an alternate exchange, so it should never happen).

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use std::sync::Arc;
use tokio::sync::RwLock;

use super::Link;
use crate::provider::retry;

/// Times one message is tried before the caller is told.
const PUBLISH_ATTEMPTS: u32 = 8;
/// The wait should the schedule ever end (it does not: `publish_backoff` is endless).
const LONGEST_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("no queue took the message (exchange {exchange}, routing key {routing_key})")]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
    #[error("the broker refused the message {0} times")]
    Nacked(u32),
    #[error("{trouble}: {err}", trouble = trouble(.0), err = .0)]
    Broker(#[from] lapin::Error),
}

/// What a lapin error means for a publish: a 404 is a missing exchange, not an outage.
fn trouble(err: &lapin::Error) -> &'static str {
    if super::is_not_found(err) {
        "the broker has no such exchange"
    } else {
        "broker unavailable"
    }
}

impl PublishError {
    /// Whether the broker lacks part of the topology the message needs (its exchange, or
    /// every queue it could go to): declaring the topology again is what would help.
    pub fn topology_missing(&self) -> bool {
        match self {
            PublishError::Unroutable { .. } => true,
            PublishError::Broker(err) => super::is_not_found(err),
            PublishError::Nacked(_) => false,
        }
    }
}

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub body: &'a [u8],
    pub content_type: &'a str,
    pub message_id: Option<&'a str>,
    /// Headers as (name, value) text pairs, plus any given as AMQP values.
    pub headers: FieldTable,
}

impl<'a> Outgoing<'a> {
    pub fn new(exchange: &'a str, routing_key: &'a str, body: &'a [u8]) -> Outgoing<'a> {
        Outgoing {
            exchange,
            routing_key,
            body,
            content_type: "application/json",
            message_id: None,
            headers: FieldTable::default(),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.insert(
            name.into(),
            AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())),
        );
        self
    }
}

/// A channel in confirm mode, shared by all tasks of a process; replaced by a new one (on a
/// new connection if need be) when it cannot be recovered.
#[derive(Clone)]
pub struct Publisher {
    link: Arc<Link>,
    channel: Arc<RwLock<Channel>>,
}

async fn confirm_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

impl Publisher {
    pub async fn new(link: Arc<Link>) -> Result<Publisher, lapin::Error> {
        let channel = confirm_channel(&*link.connection().await).await?;
        Ok(Publisher {
            link,
            channel: Arc::new(RwLock::new(channel)),
        })
    }

    /// The channel, to declare topology on.
    pub async fn channel(&self) -> Channel {
        self.channel.read().await.clone()
    }

    /// Replaces the channel after an unrecoverable failure.
    async fn renew(&self, failed: &Channel) {
        let mut slot = self.channel.write().await;
        if slot.id() != failed.id() || slot.status().connected() {
            return; // someone else renewed it already
        }
        let connection = self.link.connection().await;
        match confirm_channel(&connection).await {
            Ok(channel) => *slot = channel,
            Err(err) => tracing::warn!(error = %err, "cannot open a new publishing channel yet"),
        }
    }

    /// Publishes persistently and waits until the broker has confirmed it.
    pub async fn publish(&self, message: &Outgoing<'_>) -> Result<(), PublishError> {
        let mut nacks = 0;
        let mut attempt = 0;
        let mut waits = retry::publish_backoff();
        loop {
            attempt += 1;
            let mut properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type(message.content_type.into())
                .with_headers(message.headers.clone());
            if let Some(id) = message.message_id {
                properties = properties.with_message_id(id.into());
            }
            let channel = self.channel().await;
            let sent = channel
                .basic_publish(
                    message.exchange.into(),
                    message.routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    message.body,
                    properties,
                )
                .await;
            let confirmed = match sent {
                Ok(confirm) => confirm.await,
                Err(err) => Err(err),
            };
            match confirmed {
                Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => return Ok(()),
                Ok(Confirmation::Ack(Some(_))) | Ok(Confirmation::Nack(Some(_))) => {
                    return Err(PublishError::Unroutable {
                        exchange: message.exchange.to_owned(),
                        routing_key: message.routing_key.to_owned(),
                    });
                }
                Ok(Confirmation::Nack(None)) => {
                    nacks += 1;
                    if attempt >= PUBLISH_ATTEMPTS {
                        return Err(PublishError::Nacked(nacks));
                    }
                    tokio::time::sleep(waits.next().unwrap_or(LONGEST_WAIT)).await;
                }
                Err(err) if super::is_not_found(&err) => {
                    // A missing exchange stays missing however often it is retried: the
                    // channel it closed is mended, and the caller told at once.
                    if channel.wait_for_recovery(err.clone()).await.is_err() {
                        self.renew(&channel).await;
                    }
                    return Err(err.into());
                }
                Err(err) => {
                    if attempt >= PUBLISH_ATTEMPTS {
                        return Err(err.into());
                    }
                    tracing::warn!(error = %err, "publish failed; waiting for the broker connection to recover");
                    if channel.wait_for_recovery(err).await.is_err() {
                        self.renew(&channel).await;
                        tokio::time::sleep(waits.next().unwrap_or(LONGEST_WAIT)).await;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPSoftError};

    fn refused(soft: AMQPSoftError) -> PublishError {
        let amqp = AMQPError::new(AMQPErrorKind::Soft(soft), "refused".into());
        PublishError::Broker(lapin::ErrorKind::ProtocolError(amqp).into())
    }

    #[test]
    fn a_missing_exchange_is_not_called_an_outage() {
        let missing = refused(AMQPSoftError::NOTFOUND);
        assert!(missing.topology_missing());
        assert!(
            missing
                .to_string()
                .starts_with("the broker has no such exchange: "),
            "{missing}"
        );
        let other = refused(AMQPSoftError::ACCESSREFUSED);
        assert!(!other.topology_missing());
        assert!(
            other.to_string().starts_with("broker unavailable: "),
            "{other}"
        );
    }
}
