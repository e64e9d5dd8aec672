//! Per-org isolation: a concurrency cap and a circuit breaker, so that one org's slow,
//! failing or flooding provider cannot take every consumer slot.
//!
//! An org may have `cap` provider calls in flight and `cap` more events waiting in process;
//! beyond that its events are deferred to a short delay queue instead of holding prefetch
//! slots the other orgs need. After `BREAKER_THRESHOLD` consecutive transient failures the
//! org's breaker opens for `BREAKER_COOLDOWN`: its events are deferred without a call. The
//! first event after the cool-down is a trial; one more failure reopens the breaker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Provider calls in flight per org when its config sets no cap.
pub const DEFAULT_ORG_CAP: u32 = 32;
/// Consecutive transient failures that open an org's breaker.
pub const BREAKER_THRESHOLD: u32 = 5;
/// How long an open breaker defers the org's events.
pub const BREAKER_COOLDOWN: Duration = Duration::from_secs(30);
/// How long an event of an org at its cap waits in the delay queue.
pub const BUSY_DEFERRAL: Duration = Duration::from_secs(5);

struct Gate {
    cap: u32,
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    breaker: Mutex<Breaker>,
}

#[derive(Default)]
struct Breaker {
    consecutive_failures: u32,
    open_until: Option<Instant>,
}

/// Whether an event may go to its provider now.
pub enum Admission {
    /// Go; the permit is held for the duration of the call.
    Go(OwnedSemaphorePermit),
    /// Not now: park the event for this long. `reason` is a metric label.
    Defer {
        delay: Duration,
        reason: &'static str,
    },
}

/// Every org's gate, created on first use.
#[derive(Default)]
pub struct OrgGates {
    gates: Mutex<HashMap<String, Arc<Gate>>>,
}

impl OrgGates {
    fn gate(&self, org: &str, cap: u32) -> Arc<Gate> {
        let mut gates = match self.gates.lock() {
            Ok(gates) => gates,
            Err(poisoned) => poisoned.into_inner(),
        };
        match gates.get(org) {
            Some(gate) if gate.cap == cap => gate.clone(),
            existing => {
                // A changed cap starts a fresh gate; the old one's permits drain on their own.
                let breaker = existing
                    .and_then(|gate| {
                        gate.breaker.lock().ok().map(|b| Breaker {
                            consecutive_failures: b.consecutive_failures,
                            open_until: b.open_until,
                        })
                    })
                    .unwrap_or_default();
                let gate = Arc::new(Gate {
                    cap,
                    permits: Arc::new(Semaphore::new(cap as usize)),
                    waiting: AtomicUsize::new(0),
                    breaker: Mutex::new(breaker),
                });
                gates.insert(org.to_owned(), gate.clone());
                gate
            }
        }
    }

    /// Admits an event of `org` (whose config caps it at `cap`, if set).
    pub async fn admit(&self, org: &str, cap: Option<u32>) -> Admission {
        let gate = self.gate(org, cap.unwrap_or(DEFAULT_ORG_CAP).max(1));
        if let Ok(breaker) = gate.breaker.lock()
            && let Some(until) = breaker.open_until
        {
            let now = Instant::now();
            if until > now {
                return Admission::Defer {
                    delay: until - now,
                    reason: "circuit_open",
                };
            }
        }
        if let Ok(permit) = gate.permits.clone().try_acquire_owned() {
            return Admission::Go(permit);
        }
        if gate.waiting.fetch_add(1, Ordering::SeqCst) >= gate.cap as usize {
            gate.waiting.fetch_sub(1, Ordering::SeqCst);
            return Admission::Defer {
                delay: BUSY_DEFERRAL,
                reason: "org_busy",
            };
        }
        let permit = gate.permits.clone().acquire_owned().await;
        gate.waiting.fetch_sub(1, Ordering::SeqCst);
        match permit {
            Ok(permit) => Admission::Go(permit),
            // The semaphore is never closed; treat it as busy if it ever were.
            Err(_) => Admission::Defer {
                delay: BUSY_DEFERRAL,
                reason: "org_busy",
            },
        }
    }

    /// Records how an org's call went: `true` for an answer (even an invalid one or a
    /// permanent refusal: the provider is up), `false` for a transient failure.
    pub fn record(&self, org: &str, provider_up: bool) {
        let gate = match self.gates.lock() {
            Ok(gates) => gates.get(org).cloned(),
            Err(poisoned) => poisoned.into_inner().get(org).cloned(),
        };
        let Some(gate) = gate else { return };
        let Ok(mut breaker) = gate.breaker.lock() else {
            return;
        };
        if provider_up {
            *breaker = Breaker::default();
            return;
        }
        breaker.consecutive_failures += 1;
        if breaker.consecutive_failures >= BREAKER_THRESHOLD {
            if breaker
                .open_until
                .is_none_or(|until| until <= Instant::now())
            {
                tracing::warn!(
                    org_id = org,
                    failures = breaker.consecutive_failures,
                    "provider failing; circuit opened"
                );
            }
            breaker.open_until = Some(Instant::now() + BREAKER_COOLDOWN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_org_at_its_cap_defers_beyond_its_waiting_room() {
        let gates = OrgGates::default();
        let first = match gates.admit("a", Some(1)).await {
            Admission::Go(permit) => permit,
            Admission::Defer { .. } => panic!("the first call goes"),
        };
        let gates = Arc::new(gates);
        let waiter = tokio::spawn({
            let gates = gates.clone();
            async move { matches!(gates.admit("a", Some(1)).await, Admission::Go(_)) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(matches!(
            gates.admit("a", Some(1)).await,
            Admission::Defer {
                reason: "org_busy",
                ..
            }
        ));
        // Another org is not affected.
        assert!(matches!(gates.admit("b", Some(1)).await, Admission::Go(_)));
        drop(first);
        assert!(
            waiter.await.unwrap(),
            "the waiting event goes once a permit frees"
        );
    }

    #[tokio::test]
    async fn consecutive_failures_open_the_breaker_and_a_success_closes_it() {
        let gates = OrgGates::default();
        drop(gates.admit("a", None).await);
        for _ in 0..BREAKER_THRESHOLD - 1 {
            gates.record("a", false);
        }
        assert!(matches!(gates.admit("a", None).await, Admission::Go(_)));
        gates.record("a", false);
        assert!(matches!(
            gates.admit("a", None).await,
            Admission::Defer {
                reason: "circuit_open",
                ..
            }
        ));
        assert!(matches!(gates.admit("b", None).await, Admission::Go(_)));
        gates.record("a", true);
        assert!(matches!(gates.admit("a", None).await, Admission::Go(_)));
    }
}
