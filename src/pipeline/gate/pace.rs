//! Pacing an org's backlog. An event deferred because its org has no room is given a turn:
//! when the org's calls, at their recent pace, should have room for it. It is parked in the
//! longest delay queue that brings it back no later than its turn, and carries the turn
//! (`x-copilot-turn`) so that it keeps its place if it comes back early. Without turns a
//! backlog came back from the 5 s delay queue every 5 s, and all but the few events the gate
//! could hold went round again, each round a publish and an ack: an org's backlog of five
//! minutes cost 29.5 parks per event, against 5.0 with turns, and 3.8 once delay steps of 10
//! and 15 s took over most of the last 30 s before a turn (BENCHMARKS.md, "A bulk import").
//!
//! Only an org whose calls in one shortest deferral (5 s) fit in what the replica can hold
//! for it (its calls, its waiting room and the shared one) is paced. A faster org is kept
//! busy by the stream of its events coming back every 5 s, which turns would thin: an org at
//! 32 calls of 100 ms fell from 258 to 157 events/s with turns (BENCHMARKS.md).
//!
//! Turns err early, never late: a delay queue's TTL is at most the wait (so an event is
//! back by its turn), and an event that comes back to room goes at once, whatever its turn.
//! A turn is at most `TURN_HORIZON` ahead. An event whose turn would be further is parked for
//! the horizon without one, and takes a turn when it is back: a backlog of any length costs
//! each event about one park per horizon, and an org whose provider got faster is held to
//! its old pace for no longer than that.

use std::time::{Duration, SystemTime};

use super::BUSY_DEFERRAL;

/// The furthest ahead a turn is given (a delay step, so that an event beyond it waits exactly
/// this long).
pub const TURN_HORIZON: Duration = Duration::from_secs(300);
/// The weight of the newest call in the smoothed call time.
const NEWEST_CALL_WEIGHT: f64 = 0.2;

/// When a deferred event should come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// About then: it waits until no later, and carries the turn.
    At(SystemTime),
    /// Beyond the horizon: it waits for the horizon and takes a turn when back.
    Beyond,
}

/// One org's pace on this replica.
#[derive(Debug, Default)]
pub(super) struct Pace {
    /// How long a call holds its permit, smoothed; `None` before the first call ends.
    call: Option<Duration>,
    /// The next turn free, as this replica gave them out.
    next: Option<SystemTime>,
}

impl Pace {
    /// Counts a call that held its permit for `held`.
    pub(super) fn record(&mut self, held: Duration) {
        self.call = Some(match self.call {
            None => held,
            Some(call) => call.mul_f64(1.0 - NEWEST_CALL_WEIGHT) + held.mul_f64(NEWEST_CALL_WEIGHT),
        });
    }

    /// The turn of an event that found no room at `now`, when `limit` calls may run at once
    /// here, `ahead` events are in flight or waiting here, and `room` at most can be (calls,
    /// the org's waiting room and the shared one). An event that `carried` a turn
    /// keeps it, even one already passed (it came back with a wave larger than the room: it
    /// is tried again after the shortest deferral, ahead of the events given later turns);
    /// any other takes the next one free, unless that is beyond the horizon. `None` when
    /// the org is not paced: no call has ended yet, this replica's share of the org's cap is
    /// 0 (a replica with a share paces it), or the org's calls in 5 s do not fit in `room`.
    pub(super) fn turn(
        &mut self,
        now: SystemTime,
        limit: u32,
        ahead: usize,
        room: usize,
        carried: Option<SystemTime>,
    ) -> Option<Turn> {
        let call = self.call?;
        if limit == 0 {
            return None;
        }
        // One call ends every `gap`, when all `limit` run.
        let gap = call / limit;
        let per_deferral = BUSY_DEFERRAL.as_secs_f64() / gap.as_secs_f64().max(1e-6);
        if per_deferral > room as f64 {
            return None;
        }
        let horizon = now + TURN_HORIZON;
        if let Some(turn) = carried {
            // Held to the horizon: a header from elsewhere, or a skewed clock.
            return Some(Turn::At(turn.min(horizon)));
        }
        let ahead = u32::try_from(ahead).unwrap_or(u32::MAX);
        let earliest = now + BUSY_DEFERRAL.max(gap.saturating_mul(ahead));
        let turn = self.next.map_or(earliest, |next| next.max(earliest));
        if turn > horizon {
            // Takes no turn: those within the horizon stay free for the events to come.
            return Some(Turn::Beyond);
        }
        self.next = Some(turn + gap);
        Some(Turn::At(turn))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(turn: Option<Turn>, now: SystemTime) -> Option<f64> {
        match turn? {
            Turn::At(at) => Some(at.duration_since(now).unwrap_or_default().as_secs_f64()),
            Turn::Beyond => None,
        }
    }

    fn at(turn: SystemTime) -> Option<Turn> {
        Some(Turn::At(turn))
    }

    #[test]
    fn turns_follow_the_orgs_call_rate_after_what_waits_here() {
        let mut pace = Pace::default();
        let now = SystemTime::now();
        assert_eq!(
            pace.turn(now, 2, 4, 1_000, None),
            None,
            "no call has ended yet"
        );
        pace.record(Duration::from_secs(1));
        // Two calls of 1 s at once: one ends every 0.5 s. Four ahead take 2 s, less than the
        // shortest deferral, so the first turn is 5 s away.
        let turns: Vec<Option<f64>> = (0..700)
            .map(|_| secs(pace.turn(now, 2, 4, 1_000, None), now))
            .collect();
        let within: Vec<f64> = turns.iter().map_while(|turn| *turn).collect();
        // 5 + 0.5 × 590 = 300: the last turn within the horizon.
        assert_eq!(within.len(), 591);
        assert!((within[0] - 5.0).abs() < 1e-6, "{}", within[0]);
        assert!((within[60] - 35.0).abs() < 1e-6, "{}", within[60]);
        assert!((within[590] - 300.0).abs() < 1e-6, "{}", within[590]);
        assert!(within.windows(2).all(|pair| pair[0] < pair[1]));
        assert!(
            turns[591..].iter().all(Option::is_none),
            "beyond the horizon"
        );
        // Later, the turns beyond it have come within it, and follow on.
        let later = now + Duration::from_secs(100);
        assert_eq!(
            secs(pace.turn(later, 2, 4, 1_000, None), later),
            Some(200.5)
        );
        // Many ahead: the first turn waits for them.
        let mut pace = Pace::default();
        pace.record(Duration::from_secs(2));
        assert_eq!(secs(pace.turn(now, 4, 40, 1_000, None), now), Some(20.0));
        // A share of 0: the replicas with a share pace the org.
        assert_eq!(pace.turn(now, 0, 0, 1_000, None), None);
    }

    #[test]
    fn an_event_keeps_its_turn_and_gives_none_out() {
        let mut pace = Pace::default();
        pace.record(Duration::from_secs(1));
        let now = SystemTime::now();
        assert_eq!(secs(pace.turn(now, 1, 1, 1_000, None), now), Some(5.0));
        let later = now + Duration::from_secs(100);
        assert_eq!(pace.turn(now, 1, 1, 1_000, Some(later)), at(later));
        // Keeping a turn gives none out: the next new one follows the first.
        assert_eq!(secs(pace.turn(now, 1, 1, 1_000, None), now), Some(6.0));
        // Passed: it keeps it too, and the next new turn is not moved.
        let passed = now - Duration::from_secs(3);
        assert_eq!(pace.turn(now, 1, 1, 1_000, Some(passed)), at(passed));
        assert_eq!(secs(pace.turn(now, 1, 1, 1_000, None), now), Some(7.0));
        // A turn beyond the horizon (a publisher's header, a skewed clock) is held to it.
        let far = now + Duration::from_secs(86_400);
        assert_eq!(
            pace.turn(now, 1, 1, 1_000, Some(far)),
            at(now + TURN_HORIZON)
        );
    }

    #[test]
    fn an_org_whose_calls_in_5_s_outgrow_its_room_is_not_paced() {
        let now = SystemTime::now();
        let mut fast = Pace::default();
        fast.record(Duration::from_millis(100));
        // 32 calls of 100 ms: 1,600 in 5 s, against 114 places. A carried turn is dropped.
        assert_eq!(fast.turn(now, 32, 64, 114, None), None);
        let carried = Some(now + Duration::from_secs(60));
        assert_eq!(fast.turn(now, 32, 64, 114, carried), None);
        // 4 calls of 400 ms: 50 in 5 s, against 58 places.
        let mut slow = Pace::default();
        slow.record(Duration::from_millis(400));
        assert!(slow.turn(now, 4, 8, 58, None).is_some());
    }

    #[test]
    fn the_horizon_is_a_delay_step() {
        let steps = crate::broker::topology::DELAY_STEPS_SECS;
        assert!(steps.contains(&TURN_HORIZON.as_secs()));
    }

    #[test]
    fn the_call_time_follows_the_recent_calls() {
        let mut pace = Pace::default();
        pace.record(Duration::from_secs(10));
        for _ in 0..30 {
            pace.record(Duration::from_secs(1));
        }
        let call = pace.call.unwrap_or_default().as_secs_f64();
        assert!((1.0..1.02).contains(&call), "{call}");
    }
}
