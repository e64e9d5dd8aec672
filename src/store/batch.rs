//! Opportunistic batching of hot-path statements (group commit).
//!
//! Every event makes the same two ledger statements. Sent one by one, each is a round trip and
//! the second a durable commit of its own; on a two-core machine that single fsync per event is
//! the wall. A [`Batcher`] hands requests to at most `flushes` statements at a time: while they
//! run, new requests queue, and the next statement takes all of them at once (up to
//! `max_batch`). At low load a request goes out alone and at once, so no latency is added;
//! under load one statement and one commit serve hundreds of events. When nothing is queued
//! and a statement slot is free, the caller runs its request itself instead of handing it to
//! the batching task and back (two task hand-offs, each a thread wake-up when the machine is
//! not saturated).
//!
//! Two requests with the same key never share a statement (one multi-row upsert cannot touch a
//! row twice): the later waits for the next statement, where it meets the row the first left.
//! When a statement fails with an error from the database itself (not a lost connection), its
//! requests are retried one by one, so one bad row cannot fail the others.

use std::collections::HashSet;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::StoreError;

type Reply<Resp> = oneshot::Sender<Result<Resp, StoreError>>;
type Outcome<Req, Resp> = (Vec<Req>, Result<Vec<Resp>, StoreError>);
type RunFn<Req, Resp> =
    dyn Fn(Vec<Req>) -> Pin<Box<dyn Future<Output = Outcome<Req, Resp>> + Send>> + Send + Sync;

/// Submits requests to a background task that runs them in batches.
pub struct Batcher<Req, Resp> {
    queue: mpsc::UnboundedSender<(Req, Reply<Resp>)>,
    shared: Arc<Shared<Req, Resp>>,
}

/// What callers and the batching task share.
struct Shared<Req, Resp> {
    /// The statement's name, a metric label.
    name: &'static str,
    /// One permit per statement that may run at a time.
    slots: Arc<Semaphore>,
    /// Requests sent to the batching task and not yet in a statement.
    queued: AtomicUsize,
    run: Box<RunFn<Req, Resp>>,
}

impl<Req, Resp> Shared<Req, Resp> {
    fn count_rows(&self, rows: usize) {
        metrics::histogram!(crate::telemetry::LEDGER_BATCH_ROWS, "statement" => self.name)
            .record(rows as f64);
    }
}

impl<Req, Resp> Clone for Batcher<Req, Resp> {
    fn clone(&self) -> Self {
        Batcher {
            queue: self.queue.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<Req, Resp> Batcher<Req, Resp>
where
    Req: Send + 'static,
    Resp: Send + 'static,
{
    /// Starts the batching task; it ends when the last `Batcher` clone is dropped.
    /// `run` executes one batch and returns one response per request, in order; `key`
    /// names what a request writes, so that equal keys go to different statements.
    pub fn start<K, KeyFn, Run, Fut>(
        name: &'static str,
        max_batch: usize,
        flushes: usize,
        key: KeyFn,
        run: Run,
    ) -> Batcher<Req, Resp>
    where
        K: Eq + Hash + 'static,
        KeyFn: Fn(&Req) -> K + Send + 'static,
        Run: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome<Req, Resp>> + Send + 'static,
    {
        let (queue, requests) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            name,
            slots: Arc::new(Semaphore::new(flushes.max(1))),
            queued: AtomicUsize::new(0),
            run: Box::new(move |requests: Vec<Req>| {
                Box::pin(run(requests)) as Pin<Box<dyn Future<Output = _> + Send>>
            }),
        });
        tokio::spawn(collect(requests, max_batch.max(1), key, shared.clone()));
        Batcher { queue, shared }
    }

    /// Runs `request` in the next batch and returns its response.
    pub async fn submit(&self, request: Req) -> Result<Resp, StoreError> {
        let (reply, response) = oneshot::channel();
        let shared = &self.shared;
        if shared.queued.load(Ordering::SeqCst) == 0
            && let Ok(slot) = shared.slots.clone().try_acquire_owned()
        {
            // Nothing waits for a statement and one may start: this request is a batch of one
            // whichever task runs it, so it runs here.
            shared.count_rows(1);
            flush(&*shared.run, vec![(request, reply)]).await;
            drop(slot);
        } else {
            shared.queued.fetch_add(1, Ordering::SeqCst);
            if self.queue.send((request, reply)).is_err() {
                return Err(StoreError::Closed);
            }
        }
        response.await.unwrap_or(Err(StoreError::Closed))
    }
}

async fn collect<Req, Resp, K, KeyFn>(
    mut requests: mpsc::UnboundedReceiver<(Req, Reply<Resp>)>,
    max_batch: usize,
    key: KeyFn,
    shared: Arc<Shared<Req, Resp>>,
) where
    Req: Send + 'static,
    Resp: Send + 'static,
    K: Eq + Hash + 'static,
    KeyFn: Fn(&Req) -> K,
{
    let mut waiting: Vec<(Req, Reply<Resp>)> = Vec::new();
    loop {
        // Take a statement slot first: requests pile up in the channel meanwhile.
        let Ok(slot) = shared.slots.clone().acquire_owned().await else {
            return;
        };
        let mut pending = std::mem::take(&mut waiting);
        if pending.is_empty() && requests.recv_many(&mut pending, max_batch).await == 0 {
            return; // every sender is gone
        }
        while pending.len() < max_batch {
            match requests.try_recv() {
                Ok(request) => pending.push(request),
                Err(_) => break,
            }
        }
        let mut seen = HashSet::with_capacity(pending.len());
        let (batch, later): (Vec<_>, Vec<_>) = pending
            .into_iter()
            .partition(|(req, _)| seen.insert(key(req)));
        waiting = later;
        // Those left for the next statement still count as queued.
        shared.queued.fetch_sub(batch.len(), Ordering::SeqCst);
        shared.count_rows(batch.len());
        let shared = shared.clone();
        tokio::spawn(async move {
            flush(&*shared.run, batch).await;
            drop(slot);
        });
    }
}

async fn flush<Req, Resp>(run: &RunFn<Req, Resp>, batch: Vec<(Req, Reply<Resp>)>) {
    let (requests, replies): (Vec<Req>, Vec<Reply<Resp>>) = batch.into_iter().unzip();
    let size = requests.len();
    let (requests, outcome) = run(requests).await;
    match outcome {
        Ok(responses) if responses.len() == size => {
            for (reply, response) in replies.into_iter().zip(responses) {
                let _ = reply.send(Ok(response));
            }
        }
        Ok(_) => {
            for reply in replies {
                let _ = reply.send(Err(StoreError::Invalid(
                    "a batched statement returned the wrong number of rows".into(),
                )));
            }
        }
        Err(err) if size > 1 && err.is_from_database() => {
            // One request may be what the database refused: run each alone.
            tracing::warn!(error = %err, size, "batched statement failed; retrying its requests one by one");
            for (request, reply) in requests.into_iter().zip(replies) {
                let (_, outcome) = run(vec![request]).await;
                let _ = reply.send(outcome.and_then(|mut responses| {
                    responses.pop().ok_or_else(|| {
                        StoreError::Invalid("a batched statement returned no row".into())
                    })
                }));
            }
        }
        Err(err) => {
            let message = err.to_string();
            let mut replies = replies.into_iter();
            if let Some(first) = replies.next() {
                let _ = first.send(Err(err));
            }
            for reply in replies {
                let _ = reply.send(Err(StoreError::Batch(message.clone())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    /// A batcher whose statement doubles numbers, records each batch it ran, and fails
    /// (as the database would) any batch containing 13.
    type Ran = Arc<Mutex<Vec<Vec<u32>>>>;

    fn doubler(flushes: usize, delay: Duration) -> (Batcher<u32, u32>, Ran) {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = batches.clone();
        let batcher = Batcher::start(
            "test",
            100,
            flushes,
            |n: &u32| *n,
            move |requests: Vec<u32>| {
                let seen = seen.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    seen.lock().unwrap().push(requests.clone());
                    let outcome = if requests.contains(&13) {
                        Err(StoreError::Invalid("thirteen".into()))
                    } else {
                        Ok(requests.iter().map(|n| n * 2).collect())
                    };
                    (requests, outcome)
                }
            },
        );
        (batcher, batches)
    }

    fn spawn_submit(
        batcher: &Batcher<u32, u32>,
        n: u32,
    ) -> tokio::task::JoinHandle<Result<u32, StoreError>> {
        let batcher = batcher.clone();
        tokio::spawn(async move { batcher.submit(n).await })
    }

    #[tokio::test]
    async fn requests_arriving_during_a_statement_share_the_next_one() {
        let (batcher, batches) = doubler(1, Duration::from_millis(50));
        let first = spawn_submit(&batcher, 1);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let rest: Vec<_> = (100..139).map(|n| spawn_submit(&batcher, n)).collect();
        assert_eq!(first.await.unwrap().unwrap(), 2);
        for (n, handle) in (100..139).zip(rest) {
            assert_eq!(
                handle.await.unwrap().unwrap(),
                n * 2,
                "each caller gets its own answer"
            );
        }
        let batches = batches.lock().unwrap().clone();
        assert_eq!(
            batches.len(),
            2,
            "one statement alone, then one for the rest"
        );
        assert_eq!(batches[0], vec![1]);
        assert_eq!(batches[1].len(), 39);
    }

    #[tokio::test]
    async fn a_request_alone_runs_in_its_callers_task() {
        let ran_in = Arc::new(Mutex::new(Vec::new()));
        let batcher = Batcher::start("test", 100, 2, |n: &u32| *n, {
            let ran_in = ran_in.clone();
            move |requests: Vec<u32>| {
                let ran_in = ran_in.clone();
                async move {
                    ran_in.lock().unwrap().push(tokio::task::try_id());
                    let doubled = requests.iter().map(|n| n * 2).collect();
                    (requests, Ok(doubled))
                }
            }
        });
        let caller = tokio::spawn(async move {
            let answer = batcher.submit(21).await.unwrap();
            (answer, tokio::task::id())
        });
        let (answer, caller_id) = caller.await.unwrap();
        assert_eq!(answer, 42);
        assert_eq!(*ran_in.lock().unwrap(), [Some(caller_id)]);
    }

    #[tokio::test]
    async fn equal_keys_never_share_a_statement() {
        let (batcher, batches) = doubler(1, Duration::from_millis(20));
        let blocker = spawn_submit(&batcher, 100);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let twins: Vec<_> = [7, 7, 8]
            .into_iter()
            .map(|n| spawn_submit(&batcher, n))
            .collect();
        blocker.await.unwrap().unwrap();
        for handle in twins {
            handle.await.unwrap().unwrap();
        }
        for batch in batches.lock().unwrap().iter() {
            assert!(
                batch.iter().filter(|n| **n == 7).count() <= 1,
                "a batch held a key twice: {batch:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_refused_request_does_not_fail_its_batch_mates() {
        let (batcher, _) = doubler(1, Duration::from_millis(20));
        let blocker = spawn_submit(&batcher, 1);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let handles: Vec<_> = [12, 13, 14]
            .into_iter()
            .map(|n| spawn_submit(&batcher, n))
            .collect();
        blocker.await.unwrap().unwrap();
        let results: Vec<_> = futures_util::future::join_all(handles)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(results[0].as_ref().ok(), Some(&24));
        assert!(results[1].is_err(), "13 is refused");
        assert_eq!(results[2].as_ref().ok(), Some(&28));
    }
}
