//! Claims: one worker at a time on an (event, worker), across every replica.
//!
//! The ledger answers redeliveries of a decided event; a claim covers the window before it is
//! decided, when two deliveries of one event (a republish, a redelivery after a lost ack) could
//! otherwise both call the provider. Each process renews the leases of all its claims in one
//! statement every few seconds (see `renew_claims`); a second delivery waits for the holder's
//! result and republishes it, or takes over once the lease lapses because the holder died.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lapin::message::Delivery;

use super::Pipeline;
use crate::events::TicketEvent;
use crate::store::Store;
use crate::workers::Worker;

/// How long a claim lives without renewal.
pub const CLAIM_LEASE: Duration = Duration::from_secs(15);
/// How often a process renews its claims.
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// A claim is renewed once it expires within this: a claim younger than half a round is left
/// alone (it has nearly its whole lease, and the next round comes well before it runs out).
/// At 5,000 two-second calls in flight, renewing every claim every round was an update of
/// 5,000 rows every 5 s (170–590 ms each, seen with `auto_explain`), nearly all for calls
/// about to end.
const RENEW_DUE_WITHIN: Duration =
    Duration::from_millis(CLAIM_LEASE.as_millis() as u64 - RENEW_EVERY.as_millis() as u64 / 2);
/// How often a waiting delivery looks for the holder's result.
const POLL_EVERY: Duration = Duration::from_millis(200);

/// A held claim. Its lease is renewed with every other claim of this process until the
/// result is recorded (then it lapses and is purged) or it is released.
pub(super) struct Claim {
    store: Store,
    event_id: String,
    worker: String,
    holder: String,
}

impl Claim {
    /// Gives the claim up (the event is parked or deferred).
    pub async fn release(self) {
        if let Err(err) = self
            .store
            .release_claim(&self.event_id, &self.worker, &self.holder)
            .await
        {
            tracing::debug!(error = %err, "claim release failed; it lapses by itself");
        }
    }

    /// The result was recorded: the claim is no longer renewed, lapses, and is purged.
    pub fn settled(self) {}
}

/// Renews every claim this process holds for an event not yet recorded, and purges lapsed
/// claims, every `RENEW_EVERY`, until `stop`.
pub async fn renew_claims(
    store: Store,
    instance: String,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RENEW_EVERY) => {}
        }
        if let Err(err) = store
            .renew_claims(&instance, CLAIM_LEASE, RENEW_DUE_WITHIN)
            .await
        {
            tracing::warn!(error = %err, "claim renewal failed; retrying");
        }
        if let Err(err) = store.purge_lapsed_claims().await {
            tracing::debug!(error = %err, "purging lapsed claims failed; next round");
        }
    }
}

impl Pipeline {
    /// A fresh claim holder id: this process and a counter.
    pub(super) fn new_holder(&self) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        format!("{}-{}", self.instance, NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// Another delivery holds the claim: wait for its result and republish it, or take the
    /// claim over once its lease lapses. `None` means the delivery was answered (or must be
    /// left to the broker).
    pub(super) async fn wait_for_holder(
        &self,
        worker: &Worker,
        delivery: &Delivery,
        event: &TicketEvent,
        holder: String,
    ) -> Option<Claim> {
        tracing::info!("another delivery of this event is being processed; waiting for its result");
        loop {
            tokio::select! {
                () = self.abandon.cancelled() => return None,
                () = tokio::time::sleep(POLL_EVERY) => {}
            }
            if let Some(entry) = self
                .db(|| self.store.ledger_entry(&event.id, worker.name()))
                .await?
            {
                if self.publish_result(delivery, &entry).await {
                    self.skip(worker, delivery, "duplicate").await;
                }
                return None;
            }
            let taken = self
                .db(|| {
                    self.store
                        .claim(&event.id, worker.name(), &holder, CLAIM_LEASE)
                })
                .await?;
            if taken {
                return Some(self.hold(event, worker, holder));
            }
        }
    }

    pub(super) fn hold(&self, event: &TicketEvent, worker: &Worker, holder: String) -> Claim {
        Claim {
            store: self.store.clone(),
            event_id: event.id.clone(),
            worker: worker.name().to_owned(),
            holder,
        }
    }
}
