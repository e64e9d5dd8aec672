//! Claims: one worker at a time on an (event, worker), across every replica.
//!
//! The ledger answers redeliveries of a decided event; a claim covers the window before it is
//! decided, when two deliveries of one event (a republish, a redelivery after a lost ack) could
//! otherwise both call the provider. Each process keeps the list of the claims it holds
//! ([`HeldClaims`]) and renews those near their lease's end in one statement every few
//! seconds (`renew_claims`); a second delivery waits for the holder's result and republishes
//! it, or takes over once the lease lapses because the holder died.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use lapin::message::Delivery;

use super::Pipeline;
use crate::events::TicketEvent;
use crate::store::Store;
use crate::workers::Worker;

/// How long a claim lives without renewal.
pub const CLAIM_LEASE: Duration = Duration::from_secs(15);
/// How often a process renews its claims.
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// A claim is renewed once this long has passed since it was taken or last renewed: a claim
/// younger than half a round is left alone (it has nearly its whole lease, and the next round
/// comes well before it runs out). At 5,000 two-second calls in flight, renewing every claim
/// every round was an update of 5,000 rows every 5 s (170–590 ms each, seen with
/// `auto_explain`), nearly all for calls about to end.
const RENEW_AFTER: Duration = Duration::from_millis(RENEW_EVERY.as_millis() as u64 / 2);
/// How often a waiting delivery looks for the holder's result.
const POLL_EVERY: Duration = Duration::from_millis(200);

/// The claims this process holds, from the moment one is taken until its result is recorded
/// or it is released: what the renewal renews. Before this list, each round asked Postgres
/// for every claim of the process not yet recorded, a scan of the claims table that took
/// 60–160 ms a round at saturation and renewed nothing.
#[derive(Clone, Default)]
pub struct HeldClaims(Arc<Mutex<HashMap<String, Held>>>);

struct Held {
    event_id: String,
    worker: String,
    /// When it was taken or last renewed.
    renewed: Instant,
}

impl HeldClaims {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        // A panic elsewhere while holding the lock leaves a map that is still whole.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The claims due for renewal: (event id, worker, holder).
    fn due(&self, now: Instant) -> Vec<(String, String, String)> {
        self.lock()
            .iter()
            .filter(|(_, held)| now.duration_since(held.renewed) >= RENEW_AFTER)
            .map(|(holder, held)| (held.event_id.clone(), held.worker.clone(), holder.clone()))
            .collect()
    }

    fn renewed(&self, holders: &[String], at: Instant) {
        let mut held = self.lock();
        for holder in holders {
            if let Some(claim) = held.get_mut(holder) {
                claim.renewed = at;
            }
        }
    }

    /// Adds a claim just taken (its lease starts now).
    fn take(&self, store: &Store, event_id: &str, worker: &str, holder: String) -> Claim {
        self.lock().insert(
            holder.clone(),
            Held {
                event_id: event_id.to_owned(),
                worker: worker.to_owned(),
                renewed: Instant::now(),
            },
        );
        Claim {
            store: store.clone(),
            held: self.clone(),
            holder,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A held claim. Its lease is renewed with every other claim of this process until the
/// result is recorded (then it lapses and is purged) or it is released; dropping it stops the
/// renewal too.
pub(super) struct Claim {
    store: Store,
    held: HeldClaims,
    /// Its key in `held`, which holds the event and worker.
    holder: String,
}

impl Claim {
    /// Gives the claim up (the event is parked or deferred).
    pub async fn release(self) {
        let Some(held) = self.held.lock().remove(&self.holder) else {
            return;
        };
        if let Err(err) = self
            .store
            .release_claim(&held.event_id, &held.worker, &self.holder)
            .await
        {
            tracing::debug!(error = %err, "claim release failed; it lapses by itself");
        }
    }

    /// The result was recorded: the claim is no longer renewed, lapses, and is purged.
    pub fn settled(self) {}
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.held.lock().remove(&self.holder);
    }
}

/// Renews the claims this process holds that are due, and purges lapsed claims, every
/// `RENEW_EVERY`, until `stop`.
pub async fn renew_claims(
    store: Store,
    held: HeldClaims,
    stop: tokio_util::sync::CancellationToken,
) {
    while crate::sleep_unless_stopped(RENEW_EVERY, &stop).await {
        let now = Instant::now();
        let due = held.due(now);
        if !due.is_empty() {
            match store.renew_claims(&due, CLAIM_LEASE).await {
                // Claims skipped (locked right now, or taken over) stay due for next round.
                Ok(renewed) => held.renewed(&renewed, now),
                Err(err) => tracing::warn!(error = %err, "claim renewal failed; retrying"),
            }
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
        self.claims
            .take(&self.store, &event.id, worker.name(), holder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn claims_are_due_after_half_a_round_and_forgotten_once_settled_or_dropped() {
        let held = HeldClaims::default();
        // Not connected: nothing here reaches Postgres.
        let store = Store::connect("postgres://postgres@127.0.0.1:5432/postgres", 1).unwrap();
        let first = held.take(&store, "evt_1", "summarize", "p-1".into());
        assert!(
            held.due(Instant::now()).is_empty(),
            "a new claim is not due"
        );
        tokio::time::advance(RENEW_AFTER).await;
        let second = held.take(&store, "evt_2", "triage", "p-2".into());
        let due = held.due(Instant::now());
        assert_eq!(
            due,
            vec![("evt_1".to_owned(), "summarize".to_owned(), "p-1".to_owned())]
        );
        held.renewed(&["p-1".to_owned()], Instant::now());
        assert!(held.due(Instant::now()).is_empty(), "renewed just now");
        first.settled();
        assert_eq!(held.len(), 1);
        drop(second);
        assert!(held.is_empty());
    }
}
