//! Replicas sharing one broker and one database: an org's own concurrency cap holds for all
//! of them together, not for each.

use std::time::Duration;

use copilot_workers::pipeline::gate::{PRESENCE_WINDOW, Peers, SHARE_EVERY};
use copilot_workers::provider::Profile;
use copilot_workers::provider::fake::{FakeBehaviour, FakeProvider};

use crate::support::{Harness, Options, SeenResults, assert_exactly_once, org_config};

const ORG: &str = "org_capped";

/// The other replicas serving `org`, as a replica that serves nothing sees them.
async fn replicas_serving(h: &Harness, org: &str) -> u32 {
    let seen = h
        .store
        .share_presence("observer", &[], PRESENCE_WINDOW)
        .await
        .unwrap();
    seen.iter()
        .find(|(serving, _)| serving == org)
        .map_or(0, |(_, peers)| peers.others)
}

#[tokio::test]
async fn replicas_see_each_other_serving_an_org_until_they_leave() {
    let h = Harness::with(Options {
        in_process: false,
        ..Options::default()
    })
    .await;
    let orgs = |names: &[&str]| {
        names
            .iter()
            .map(|name| name.to_string())
            .collect::<Vec<_>>()
    };
    let window = PRESENCE_WINDOW;
    assert!(
        h.store
            .share_presence("b", &orgs(&["x", "y"]), window)
            .await
            .unwrap()
            .is_empty()
    );
    let mut seen_by_a = h
        .store
        .share_presence("a", &orgs(&["x"]), window)
        .await
        .unwrap();
    seen_by_a.sort_by(|l, r| l.0.cmp(&r.0));
    // "b" sorts after "a": "a" has no one before it.
    let b_only = Peers {
        others: 1,
        before: 0,
    };
    assert_eq!(
        seen_by_a,
        [("x".to_owned(), b_only), ("y".to_owned(), b_only)]
    );
    let seen_by_c = h
        .store
        .share_presence("c", &orgs(&["x"]), window)
        .await
        .unwrap();
    let x = seen_by_c.iter().find(|(org, _)| org == "x").unwrap().1;
    assert_eq!(
        x,
        Peers {
            others: 2,
            before: 2
        }
    );
    h.store.leave_presence("b").await.unwrap();
    let seen_by_a = h
        .store
        .share_presence("a", &orgs(&["x"]), window)
        .await
        .unwrap();
    assert_eq!(
        seen_by_a,
        [(
            "x".to_owned(),
            Peers {
                others: 1,
                before: 0
            }
        )],
        "only c is left"
    );
    // A replica that stopped saying it serves an org drops out once the window passes.
    let seen = h
        .store
        .share_presence("a", &[], Duration::ZERO)
        .await
        .unwrap();
    assert!(seen.is_empty(), "{seen:?}");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orgs_cap_holds_across_two_replicas() {
    let mut h = Harness::with(Options {
        in_process: false,
        prefetch: 50,
        ..Options::default()
    })
    .await;
    let provider = FakeProvider::start(FakeBehaviour {
        latency: Duration::from_millis(400),
        expected_key: None,
        chaos: false,
    })
    .await
    .unwrap();
    let cap = 4;
    let mut config = org_config(
        &h.keys,
        ORG,
        Profile::Openai,
        &provider.base_url(),
        Some("sk-capped-0001"),
    );
    config.max_concurrency = Some(cap);
    h.set_config(config).await;
    let mut first = h.spawn_binary();
    let mut second = h.spawn_binary();
    let queue = h.topology.worker_queue("summarize");
    h.eventually(
        Duration::from_secs(20),
        "both replicas consuming",
        || async { h.queue_consumers(&queue).await == 2 },
    )
    .await;
    // Each replica lets its share go and holds a few more waiting; the rest are deferred for
    // 5 s and come back in waves, the first of them after both replicas share the cap.
    let ids = h.publish_many("capped", 100, &[ORG]).await;
    // Each replica says it serves the org at once, and reads the other's row at its next
    // beat; the first wave (before that) may hold a share more than the cap.
    h.eventually(
        Duration::from_secs(20),
        "both replicas serving the org",
        || async { replicas_serving(&h, ORG).await == 2 },
    )
    .await;
    tokio::time::sleep(SHARE_EVERY + Duration::from_millis(500)).await;
    provider.reset_peak_in_flight();
    let before = provider.requests();
    let mut seen = SeenResults::new();
    h.collect(&mut seen, &ids, Duration::from_secs(120)).await;
    assert_exactly_once(&ids, &seen);
    let measured = provider.requests() - before;
    assert!(
        measured >= 16,
        "only {measured} calls were made once both replicas shared the cap"
    );
    let peak = provider.peak_in_flight();
    assert!(
        peak <= u64::from(cap),
        "{peak} calls in flight at once, over the org's cap of {cap}"
    );
    // A replica that stops removes its rows once drained: the cap is whole again at once,
    // not when the rows lapse.
    first.signal("-TERM");
    second.signal("-TERM");
    for replica in [&mut first, &mut second] {
        let status = tokio::time::timeout(Duration::from_secs(15), replica.child.wait())
            .await
            .expect("exits")
            .unwrap();
        assert!(status.success(), "{status:?}");
    }
    assert_eq!(replicas_serving(&h, ORG).await, 0, "rows left behind");
    h.finish().await;
}
