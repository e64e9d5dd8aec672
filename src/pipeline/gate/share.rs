//! Sharing an org's own cap among the replicas serving it: each replica says which capped
//! orgs it serves (`org_presence`), learns which other replicas serve them, and resizes its
//! gates to its share. See the parent module for what a gate is.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{OrgGates, Peers, lock};
use crate::store::Store;

/// How often a replica tells the others which capped orgs it serves, and learns theirs.
pub const SHARE_EVERY: Duration = Duration::from_secs(2);
/// A replica that has not said it serves an org for this long no longer shares its cap.
pub const PRESENCE_WINDOW: Duration = Duration::from_secs(8);
/// The shortest gap between beats that a newly served org brings forward.
const SHORTEST_BEAT_GAP: Duration = Duration::from_millis(100);

/// This replica's share of `cap` when `peers` serve the org too: the shares of all the
/// replicas that see the same set add up to `cap` (a share may be 0 when the cap is smaller
/// than the number of replicas).
pub fn share(cap: u32, peers: Peers) -> u32 {
    let replicas = peers.others.saturating_add(1);
    cap / replicas + u32::from(peers.before < cap % replicas)
}

impl OrgGates {
    /// The capped orgs this replica served since the last call, or serves now.
    pub fn serving(&self) -> Vec<String> {
        let inner = lock(&self.inner);
        let mut serving = Vec::new();
        for (org, gate) in &inner.by_org {
            let slots = lock(&gate.slots);
            let active = gate.active.swap(false, Ordering::SeqCst);
            let serves = slots.cap.is_some() && (active || gate.busy(&slots));
            gate.announced.store(serves, Ordering::SeqCst);
            if serves {
                serving.push(org.clone());
            }
        }
        serving
    }

    /// Takes what the last beat saw of the other replicas, and resizes every capped gate to
    /// its share.
    pub fn share_with(&self, peers: Vec<(String, Peers)>) {
        let mut inner = lock(&self.inner);
        inner.peers = peers.into_iter().collect();
        for (org, gate) in &inner.by_org {
            let mut slots = lock(&gate.slots);
            if slots.cap.is_none() {
                continue;
            }
            let before = slots.limit;
            gate.refit(
                &mut slots,
                inner.peers.get(org).copied().unwrap_or_default(),
            );
            if slots.limit != before {
                tracing::debug!(org_id = %org, from = before, to = slots.limit, "org's share of its cap changed");
            }
        }
    }
}

/// Shares capped orgs' caps with the other replicas until `stop`: every `SHARE_EVERY`, and
/// at once when this replica starts serving a capped org, it writes which capped orgs it
/// serves and resizes its gates to its share of each. On `stop` its rows are left for the
/// caller to remove once in-flight work is done (`Store::leave_presence`).
pub async fn share_caps(
    store: Store,
    gates: Arc<OrgGates>,
    instance: String,
    stop: CancellationToken,
) {
    let mut failing = false;
    loop {
        let serving = gates.serving();
        match store
            .share_presence(&instance, &serving, PRESENCE_WINDOW)
            .await
        {
            Ok(peers) => {
                if failing {
                    tracing::info!("sharing org caps with the other replicas again");
                }
                failing = false;
                gates.share_with(peers);
            }
            // The shares stay as they were. Said once, not every beat: an outage of the
            // database is reported elsewhere too.
            Err(err) => {
                if !failing {
                    tracing::warn!(error = %err, "cannot share org caps with the other replicas (is the database migrated?); shares stay as they were");
                }
                failing = true;
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(SHARE_EVERY) => {}
            () = gates.announce.notified() => {
                if !crate::sleep_unless_stopped(SHORTEST_BEAT_GAP, &stop).await {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shares_of_a_cap_add_up_to_it() {
        for cap in 1..=40 {
            for replicas in 1..=12u32 {
                let shares: Vec<u32> = (0..replicas)
                    .map(|before| {
                        share(
                            cap,
                            Peers {
                                others: replicas - 1,
                                before,
                            },
                        )
                    })
                    .collect();
                assert_eq!(shares.iter().sum::<u32>(), cap, "{cap} over {replicas}");
                let (least, most) = (shares.iter().min(), shares.iter().max());
                assert!(
                    most.zip(least)
                        .is_some_and(|(most, least)| most - least <= 1)
                );
            }
        }
    }
}
