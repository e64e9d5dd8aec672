//! Per-org isolation: a concurrency cap and a circuit breaker, so that one org's slow,
//! failing or flooding provider cannot take every consumer slot.
//!
//! An org may have `limit` provider calls in flight and `limit` more events waiting in
//! process, and more in a waiting room all orgs share (a quarter of the prefetch: the rest of
//! the window stays open for the other orgs' events); beyond that its events are deferred to
//! a delay queue instead of holding prefetch slots the other orgs need. A deferred event is
//! given a turn by its org's recent pace (`pace.rs`) and parked until about then, so that a
//! backlog comes back as the org can take it instead of all of it every 5 s. Deferred events
//! still come back in waves (a delay queue's TTL is per queue): the shared room lets a wave
//! wait in process for the org's capacity instead of being deferred again, so that an org
//! with a backlog keeps its calls busy between waves.
//!
//! After `BREAKER_THRESHOLD` consecutive transient failures the org's breaker opens for
//! `BREAKER_COOLDOWN`: its events are deferred without a call. The first event after the
//! cool-down is a trial; one more failure reopens the breaker.
//!
//! An org's own cap (`max_concurrency`, which protects its provider's rate limit) holds across
//! replicas: the replicas serving the org find each other in `org_presence` every
//! `SHARE_EVERY` (`share_caps`) and each takes its share, the remainder going to the first
//! by instance id, so that the shares add up to the cap. A replica that starts serving an
//! org announces itself at once; until the others' next beat they may hold one share more
//! than the cap allows. An org without a cap of its own is held to `DEFAULT_ORG_CAP` calls
//! per replica, for fairness within the replica.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

pub use crate::store::presence::Peers;
use pace::{TURN_HORIZON, Turn};
pub use share::{PRESENCE_WINDOW, SHARE_EVERY, share, share_caps};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

mod pace;
mod share;

/// Provider calls in flight per org and replica when the org's config sets no cap.
pub const DEFAULT_ORG_CAP: u32 = 32;
/// Consecutive transient failures that open an org's breaker.
pub const BREAKER_THRESHOLD: u32 = 5;
/// How long an open breaker defers the org's events.
pub const BREAKER_COOLDOWN: Duration = Duration::from_secs(30);
/// How long an event of an org at its cap waits in the delay queue when there is no pace to
/// give it a turn by; the shortest wait otherwise.
pub const BUSY_DEFERRAL: Duration = Duration::from_secs(5);

/// Recovers the guard of a poisoned lock: every value behind these locks stays consistent
/// between statements, so a panic elsewhere leaves nothing half-done.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn limit_for(cap: Option<u32>, peers: Peers) -> u32 {
    match cap {
        Some(cap) => share(cap.max(1), peers),
        None => DEFAULT_ORG_CAP,
    }
}

struct Gate {
    slots: Mutex<Slots>,
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    /// An event of this (capped) org came since the last beat.
    active: AtomicBool,
    /// The last beat told the other replicas this one serves the org.
    announced: AtomicBool,
    breaker: Mutex<Breaker>,
    pace: Mutex<pace::Pace>,
}

struct Slots {
    /// The org's own cap, shared among replicas; `None`: `DEFAULT_ORG_CAP` for this replica.
    cap: Option<u32>,
    /// Calls this replica may have in flight for the org.
    limit: u32,
    /// Permits in use beyond a lowered limit: each one given back is forgotten until paid.
    debt: u32,
}

impl Gate {
    fn new(cap: Option<u32>, peers: Peers) -> Gate {
        let limit = limit_for(cap, peers);
        Gate {
            slots: Mutex::new(Slots {
                cap,
                limit,
                debt: 0,
            }),
            permits: Arc::new(Semaphore::new(limit as usize)),
            waiting: AtomicUsize::new(0),
            active: AtomicBool::new(false),
            announced: AtomicBool::new(false),
            breaker: Mutex::new(Breaker::default()),
            pace: Mutex::new(pace::Pace::default()),
        }
    }

    /// Moves the limit: permits are added, or taken away (those in use as they come back).
    fn resize(&self, slots: &mut Slots, limit: u32) {
        if limit > slots.limit {
            let grow = limit - slots.limit;
            let paid = grow.min(slots.debt);
            slots.debt -= paid;
            self.permits.add_permits((grow - paid) as usize);
        } else if limit < slots.limit {
            let shrink = slots.limit - limit;
            let forgotten = self.permits.forget_permits(shrink as usize);
            slots.debt += shrink - u32::try_from(forgotten).unwrap_or(shrink);
        }
        slots.limit = limit;
    }

    /// Resizes to the limit the org's cap and `peers` give, when that changed.
    fn refit(&self, slots: &mut Slots, peers: Peers) {
        let limit = limit_for(slots.cap, peers);
        if limit != slots.limit {
            self.resize(slots, limit);
        }
    }

    /// Defers an event that found no room (see `pace.rs`), with the turn it `carried` if any,
    /// when the org may also wait in a room of `shared_room` all orgs share.
    fn defer_busy(&self, limit: u32, shared_room: usize, carried: Option<SystemTime>) -> Admission {
        let now = SystemTime::now();
        let ahead = limit as usize + self.waiting.load(Ordering::SeqCst);
        let room = 2 * limit as usize + shared_room;
        let (delay, turn) = match lock(&self.pace).turn(now, limit, ahead, room, carried) {
            // A turn passed (or less than the shortest deferral away) waits the shortest.
            Some(Turn::At(turn)) => {
                let delay = turn.duration_since(now).unwrap_or_default();
                (delay.max(BUSY_DEFERRAL), Some(turn))
            }
            Some(Turn::Beyond) => (TURN_HORIZON, None),
            None => (BUSY_DEFERRAL, None),
        };
        Admission::Defer {
            delay,
            reason: "org_busy",
            turn,
        }
    }

    /// Calls in flight or waiting here now.
    fn busy(&self, slots: &Slots) -> bool {
        let issued = (slots.limit + slots.debt) as usize;
        self.permits.available_permits() < issued || self.waiting.load(Ordering::SeqCst) > 0
    }
}

/// An event counted in an org's waiting room until it goes (or its future is dropped).
struct Waiting<'a> {
    org: &'a AtomicUsize,
    /// The shared room's count, when the event waits there.
    shared: Option<&'a AtomicUsize>,
}

impl<'a> Waiting<'a> {
    /// A place in the org's own room, unless `room` of its events wait already; else one in
    /// the room all orgs share, unless that holds `shared_room` events (or the org's share
    /// is 0: its events then go to a replica that has one).
    fn enter(
        org: &'a AtomicUsize,
        room: usize,
        shared: &'a AtomicUsize,
        shared_room: usize,
    ) -> Option<Waiting<'a>> {
        // The org's count includes its events in the shared room; those entered after the
        // others and leave after them (the semaphore is fair), so the count stays true.
        if org.fetch_add(1, Ordering::SeqCst) < room {
            return Some(Waiting { org, shared: None });
        }
        if room > 0 && shared.fetch_add(1, Ordering::SeqCst) < shared_room {
            return Some(Waiting {
                org,
                shared: Some(shared),
            });
        }
        if room > 0 {
            shared.fetch_sub(1, Ordering::SeqCst);
        }
        org.fetch_sub(1, Ordering::SeqCst);
        None
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.org.fetch_sub(1, Ordering::SeqCst);
        if let Some(shared) = self.shared {
            shared.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

#[derive(Default)]
struct Breaker {
    consecutive_failures: u32,
    open_until: Option<Instant>,
}

/// Leave to call an org's provider, held for the duration of the call.
pub struct OrgPermit {
    gate: Arc<Gate>,
    permit: Option<OwnedSemaphorePermit>,
    since: Instant,
}

impl OrgPermit {
    /// Gives the permit back after a call, which sets the org's pace. A permit given back
    /// without a call (a republished result, unchanged content) is simply dropped.
    pub fn call_ended(self) {
        lock(&self.gate.pace).record(self.since.elapsed());
    }
}

impl Drop for OrgPermit {
    fn drop(&mut self) {
        // Under the gate's lock, so that a concurrent resize counts this permit once.
        let mut slots = lock(&self.gate.slots);
        if let Some(permit) = self.permit.take() {
            if slots.debt > 0 {
                slots.debt -= 1;
                permit.forget();
            } else {
                drop(permit);
            }
        }
    }
}

/// Whether an event may go to its provider now.
pub enum Admission {
    /// Go; the permit is held for the duration of the call.
    Go(OrgPermit),
    /// Not now: park the event for this long. `reason` is a metric label. With a `turn`
    /// (when the org's pace should have room for the event), `delay` leads to it: the event
    /// carries it, and may come back early, never late.
    Defer {
        delay: Duration,
        reason: &'static str,
        turn: Option<SystemTime>,
    },
}

/// Every org's gate, created on first use.
#[derive(Default)]
pub struct OrgGates {
    inner: Mutex<Gates>,
    /// Events waiting beyond their org's own room, and how many may.
    shared_waiting: AtomicUsize,
    shared_room: usize,
    /// Wakes `share_caps` when this replica starts serving a capped org.
    announce: Notify,
}

#[derive(Default)]
struct Gates {
    by_org: HashMap<String, Arc<Gate>>,
    /// The other replicas serving each capped org, as the last beat saw them.
    peers: HashMap<String, Peers>,
}

impl OrgGates {
    /// Gates whose orgs may also wait, beyond their own room, in a room of `shared_room`
    /// events they all share. `Default` has none.
    pub fn with_shared_room(shared_room: usize) -> OrgGates {
        OrgGates {
            shared_room,
            ..OrgGates::default()
        }
    }

    fn gate(&self, org: &str, cap: Option<u32>) -> Arc<Gate> {
        let mut inner = lock(&self.inner);
        let peers = |inner: &Gates| inner.peers.get(org).copied().unwrap_or_default();
        if let Some(gate) = inner.by_org.get(org) {
            let mut slots = lock(&gate.slots);
            if slots.cap != cap {
                // The org's cap changed: the same gate, resized, so that calls in flight
                // under the old cap still count.
                slots.cap = cap;
                gate.refit(&mut slots, peers(&inner));
            }
            drop(slots);
            return gate.clone();
        }
        let gate = Arc::new(Gate::new(cap, peers(&inner)));
        inner.by_org.insert(org.to_owned(), gate.clone());
        gate
    }

    /// Admits an event of `org` (whose config caps it at `cap`, if set) that carries `turn`
    /// if it was deferred before.
    pub async fn admit(&self, org: &str, cap: Option<u32>, turn: Option<SystemTime>) -> Admission {
        let gate = self.gate(org, cap);
        if cap.is_some() {
            gate.active.store(true, Ordering::SeqCst);
            if !gate.announced.load(Ordering::SeqCst) {
                self.announce.notify_one();
            }
        }
        if let Ok(breaker) = gate.breaker.lock()
            && let Some(until) = breaker.open_until
        {
            let now = Instant::now();
            if until > now {
                return Admission::Defer {
                    delay: until - now,
                    reason: "circuit_open",
                    turn: None,
                };
            }
        }
        let go = |permit| {
            Admission::Go(OrgPermit {
                gate: gate.clone(),
                permit: Some(permit),
                since: Instant::now(),
            })
        };
        if let Ok(permit) = gate.permits.clone().try_acquire_owned() {
            return go(permit);
        }
        let limit = lock(&gate.slots).limit;
        let entered = Waiting::enter(
            &gate.waiting,
            limit as usize,
            &self.shared_waiting,
            self.shared_room,
        );
        let Some(_waiting) = entered else {
            return gate.defer_busy(limit, self.shared_room, turn);
        };
        match gate.permits.clone().acquire_owned().await {
            Ok(permit) => go(permit),
            // The semaphore is never closed; treat it as busy if it ever were.
            Err(_) => Admission::Defer {
                delay: BUSY_DEFERRAL,
                reason: "org_busy",
                turn: None,
            },
        }
    }

    /// Records how an org's call went: `true` for an answer (even an invalid one or a
    /// permanent refusal: the provider is up), `false` for a transient failure.
    pub fn record(&self, org: &str, provider_up: bool) {
        let Some(gate) = lock(&self.inner).by_org.get(org).cloned() else {
            return;
        };
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
        let first = match gates.admit("a", Some(1), None).await {
            Admission::Go(permit) => permit,
            Admission::Defer { .. } => panic!("the first call goes"),
        };
        let gates = Arc::new(gates);
        let waiter = spawn_admit(&gates, "a", 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(matches!(
            gates.admit("a", Some(1), None).await,
            Admission::Defer {
                reason: "org_busy",
                ..
            }
        ));
        // Another org is not affected.
        assert!(matches!(
            gates.admit("b", Some(1), None).await,
            Admission::Go(_)
        ));
        drop(first);
        assert!(
            waiter.await.unwrap(),
            "the waiting event goes once a permit frees"
        );
    }

    /// An event of `org` admitted in a task of its own: whether it went, once it did.
    fn spawn_admit(
        gates: &Arc<OrgGates>,
        org: &'static str,
        cap: u32,
    ) -> tokio::task::JoinHandle<bool> {
        let gates = gates.clone();
        tokio::spawn(
            async move { matches!(gates.admit(org, Some(cap), None).await, Admission::Go(_)) },
        )
    }

    fn go(admission: Admission) -> OrgPermit {
        match admission {
            Admission::Go(permit) => permit,
            Admission::Defer { reason, .. } => panic!("deferred: {reason}"),
        }
    }

    /// Whether an event of `org` would go within a moment.
    async fn would_go(gates: &OrgGates, org: &str, cap: Option<u32>) -> bool {
        matches!(
            tokio::time::timeout(Duration::from_millis(20), gates.admit(org, cap, None)).await,
            Ok(Admission::Go(_))
        )
    }

    #[tokio::test]
    async fn a_smaller_share_takes_permits_back_as_calls_end() {
        let gates = OrgGates::default();
        let mut held: Vec<OrgPermit> = Vec::new();
        for _ in 0..4 {
            held.push(go(gates.admit("a", Some(4), None).await));
        }
        // Another replica serves the org and sorts first: this one's share is 2 of 4.
        let peer = Peers {
            others: 1,
            before: 1,
        };
        gates.share_with(vec![("a".to_owned(), peer)]);
        held.pop();
        held.pop();
        assert!(!would_go(&gates, "a", Some(4)).await, "2 in flight of 2");
        held.pop();
        assert!(would_go(&gates, "a", Some(4)).await, "1 in flight of 2");
        // The other replica left: the whole cap is this one's again.
        gates.share_with(Vec::new());
        for _ in 0..3 {
            held.push(go(gates.admit("a", Some(4), None).await));
        }
        assert!(!would_go(&gates, "a", Some(4)).await, "4 in flight of 4");
        // An org without a cap of its own is not shared.
        gates.share_with(vec![("b".to_owned(), peer)]);
        for _ in 0..DEFAULT_ORG_CAP {
            held.push(go(gates.admit("b", None, None).await));
        }
    }

    #[tokio::test]
    async fn a_changed_cap_counts_the_calls_in_flight() {
        let gates = OrgGates::default();
        let first = go(gates.admit("a", Some(3), None).await);
        let _second = go(gates.admit("a", Some(3), None).await);
        assert!(!would_go(&gates, "a", Some(1)).await, "2 in flight of 1");
        drop(first);
        assert!(!would_go(&gates, "a", Some(1)).await, "1 in flight of 1");
    }

    #[tokio::test]
    async fn a_wait_given_up_leaves_the_waiting_room() {
        let gates = Arc::new(OrgGates::default());
        let held = go(gates.admit("a", Some(1), None).await);
        for _ in 0..3 {
            assert!(!would_go(&gates, "a", Some(1)).await);
        }
        let waiter = spawn_admit(&gates, "a", 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        assert!(waiter.await.unwrap(), "waited in the room, not deferred");
    }

    #[tokio::test]
    async fn beyond_its_own_room_an_org_waits_in_the_shared_one_while_it_has_places() {
        let gates = Arc::new(OrgGates::with_shared_room(2));
        let held = go(gates.admit("a", Some(1), None).await);
        let mut waiters = Vec::new();
        // One in a's own room, two in the shared room.
        for _ in 0..3 {
            waiters.push(spawn_admit(&gates, "a", 1));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(matches!(
            gates.admit("a", Some(1), None).await,
            Admission::Defer {
                reason: "org_busy",
                ..
            }
        ));
        // Another org still has its own room, but no place left in the shared one.
        let held_b = go(gates.admit("b", Some(1), None).await);
        let b_waiter = spawn_admit(&gates, "b", 1);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(matches!(
            gates.admit("b", Some(1), None).await,
            Admission::Defer { .. }
        ));
        drop(held);
        drop(held_b);
        for waiter in waiters {
            assert!(
                waiter.await.unwrap(),
                "every waiting event of a goes in turn"
            );
        }
        assert!(b_waiter.await.unwrap());
        // An org whose share is 0 does not wait at all: a replica with a share takes it.
        gates.share_with(vec![(
            "c".to_owned(),
            Peers {
                others: 1,
                before: 1,
            },
        )]);
        assert!(matches!(
            gates.admit("c", Some(1), None).await,
            Admission::Defer { .. }
        ));
    }

    #[tokio::test]
    async fn a_deferral_gets_a_turn_by_the_orgs_pace_within_the_horizon() {
        let gates = Arc::new(OrgGates::default());
        let held = go(gates.admit("a", Some(1), None).await);
        let waiter = spawn_admit(&gates, "a", 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let defer = |admission| match admission {
            Admission::Defer { delay, turn, .. } => (delay, turn),
            Admission::Go(_) => panic!("went"),
        };
        // No call has ended yet: the shortest deferral, no turn.
        let (delay, turn) = defer(gates.admit("a", Some(1), None).await);
        assert_eq!((delay, turn), (BUSY_DEFERRAL, None));
        // Calls of 100 s, one at a time, one in flight and one waiting: turns 200 s and
        // 300 s away, then none within the horizon.
        lock(&gates.gate("a", Some(1)).pace).record(Duration::from_secs(100));
        let mut delays = Vec::new();
        for _ in 0..3 {
            let (delay, turn) = defer(gates.admit("a", Some(1), None).await);
            delays.push((delay.as_secs_f64().round() as u64, turn.is_some()));
        }
        assert_eq!(delays, [(200, true), (300, true), (300, false)]);
        // An event back with a turn keeps it.
        let turn = SystemTime::now() + Duration::from_secs(60);
        let (_, kept) = defer(gates.admit("a", Some(1), Some(turn)).await);
        assert_eq!(kept, Some(turn));
        drop(held);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test]
    async fn only_capped_orgs_in_use_are_announced() {
        let gates = OrgGates::default();
        let held = go(gates.admit("capped", Some(2), None).await);
        drop(go(gates.admit("uncapped", None, None).await));
        drop(go(gates.admit("idle", Some(2), None).await));
        let mut serving = gates.serving();
        serving.sort();
        assert_eq!(serving, ["capped", "idle"]);
        // No event since: only the org with a call in flight is still served.
        assert_eq!(gates.serving(), ["capped"]);
        drop(held);
        assert!(gates.serving().is_empty());
    }

    #[tokio::test]
    async fn consecutive_failures_open_the_breaker_and_a_success_closes_it() {
        let gates = OrgGates::default();
        drop(gates.admit("a", None, None).await);
        for _ in 0..BREAKER_THRESHOLD - 1 {
            gates.record("a", false);
        }
        assert!(matches!(
            gates.admit("a", None, None).await,
            Admission::Go(_)
        ));
        gates.record("a", false);
        assert!(matches!(
            gates.admit("a", None, None).await,
            Admission::Defer {
                reason: "circuit_open",
                ..
            }
        ));
        assert!(matches!(
            gates.admit("b", None, None).await,
            Admission::Go(_)
        ));
        gates.record("a", true);
        assert!(matches!(
            gates.admit("a", None, None).await,
            Admission::Go(_)
        ));
    }
}
