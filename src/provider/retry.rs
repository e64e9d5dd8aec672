//! Every retry decision in one place: which provider errors are transient (the classifier)
//! and when to try again (the schedule, built on backon's exponential backoff with full
//! jitter and the provider's own `Retry-After` hints).

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use http::HeaderMap;

use super::guard::EndpointRefused;

/// Stable, machine-readable failure classes; they appear in failed results and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// 401/403: the key is wrong or revoked.
    ProviderAuth,
    /// 402 or `insufficient_quota`: the org's account cannot pay.
    ProviderQuota,
    /// 429 without a quota problem, after every retry.
    ProviderRateLimited,
    /// 400/404/422: the provider refuses the request (model name, parameters).
    ProviderBadRequest,
    /// 5xx, connection failures, timeouts, garbage answers: transient.
    ProviderUnavailable,
    /// The base URL points somewhere the endpoint guard forbids.
    EndpointRefused,
    /// The model's output did not validate, even after the corrective re-ask.
    InvalidOutput,
    /// Transient errors outlasted every attempt.
    RetriesExhausted,
    /// The stored config cannot be used (its key does not decrypt, no key where one is needed).
    ConfigInvalid,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 9] = [
        ErrorClass::ProviderAuth,
        ErrorClass::ProviderQuota,
        ErrorClass::ProviderRateLimited,
        ErrorClass::ProviderBadRequest,
        ErrorClass::ProviderUnavailable,
        ErrorClass::EndpointRefused,
        ErrorClass::InvalidOutput,
        ErrorClass::RetriesExhausted,
        ErrorClass::ConfigInvalid,
    ];

    /// The class named `text` (as in a result's `error.class`).
    pub fn parse(text: &str) -> Option<ErrorClass> {
        ErrorClass::ALL
            .into_iter()
            .find(|class| class.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::ProviderAuth => "provider_auth",
            ErrorClass::ProviderQuota => "provider_quota",
            ErrorClass::ProviderRateLimited => "provider_rate_limited",
            ErrorClass::ProviderBadRequest => "provider_bad_request",
            ErrorClass::ProviderUnavailable => "provider_unavailable",
            ErrorClass::EndpointRefused => "endpoint_refused",
            ErrorClass::InvalidOutput => "invalid_output",
            ErrorClass::RetriesExhausted => "retries_exhausted",
            ErrorClass::ConfigInvalid => "config_invalid",
        }
    }

    /// Whether this class means the org's config needs attention (marks it unhealthy).
    pub fn is_config_problem(self) -> bool {
        matches!(
            self,
            ErrorClass::ProviderAuth
                | ErrorClass::ProviderQuota
                | ErrorClass::EndpointRefused
                | ErrorClass::ConfigInvalid
        )
    }
}

/// A failed provider call. Messages never include a response body (it could echo the key)
/// nor a header value; only the status, a sanitized provider error code and our own words.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    #[error("could not reach the provider ({0})")]
    Connect(String),
    #[error("the provider did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the provider answered HTTP {status}{}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Status {
        status: u16,
        code: Option<String>,
        retry_after: Option<Duration>,
    },
    #[error("the provider's answer is not a chat completion ({0})")]
    Malformed(String),
    #[error("endpoint refused: {0}")]
    Refused(#[from] EndpointRefused),
    #[error("the org's config has no usable API key")]
    MissingKey,
}

impl ProviderError {
    /// Transient errors are retried; everything else fails at once.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Connect(_) | ProviderError::Timeout(_) | ProviderError::Malformed(_) => {
                true
            }
            ProviderError::Status { status, code, .. } => {
                let quota = code.as_deref() == Some("insufficient_quota");
                matches!(status, 408 | 425 | 529 | 500..=599) || (*status == 429 && !quota)
            }
            ProviderError::Refused(_) | ProviderError::MissingKey => false,
        }
    }

    /// The class this error gives a failed result when it is final.
    pub fn class(&self) -> ErrorClass {
        match self {
            ProviderError::Status { status, code, .. } => {
                if code.as_deref() == Some("insufficient_quota") || *status == 402 {
                    ErrorClass::ProviderQuota
                } else {
                    match status {
                        401 | 403 => ErrorClass::ProviderAuth,
                        429 => ErrorClass::ProviderRateLimited,
                        400 | 404 | 409 | 413 | 422 => ErrorClass::ProviderBadRequest,
                        _ => ErrorClass::ProviderUnavailable,
                    }
                }
            }
            ProviderError::Connect(_) | ProviderError::Timeout(_) | ProviderError::Malformed(_) => {
                ErrorClass::ProviderUnavailable
            }
            ProviderError::Refused(_) => ErrorClass::EndpointRefused,
            ProviderError::MissingKey => ErrorClass::ConfigInvalid,
        }
    }

    /// The wait the provider asked for, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Reads the provider's wait hint: `retry-after-ms`, `x-ms-retry-after-ms` (milliseconds) or
/// `Retry-After` (seconds or an HTTP date). Absurd values are capped at one hour.
pub fn parse_retry_after(headers: &HeaderMap, now: time::OffsetDateTime) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let cap = Duration::from_secs(3600);
    for name in ["retry-after-ms", "x-ms-retry-after-ms"] {
        if let Some(ms) = text(name).and_then(|v| v.trim().parse::<f64>().ok())
            && ms.is_finite()
            && ms >= 0.0
        {
            return Some(Duration::from_secs_f64(ms / 1000.0).min(cap));
        }
    }
    let value = text("retry-after")?.trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0)
            .then(|| Duration::from_secs_f64(seconds).min(cap));
    }
    let date =
        time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc2822).ok()?;
    let wait = date - now;
    Some(if wait.is_negative() {
        Duration::ZERO
    } else {
        Duration::try_from(wait).unwrap_or(cap).min(cap)
    })
}

/// When to try again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// The first backoff step (before jitter).
    pub base_delay: Duration,
    /// The largest backoff step (before jitter).
    pub max_delay: Duration,
    /// The longest wait spent sleeping in process; longer waits are parked durably.
    pub in_process_cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            in_process_cap: Duration::from_secs(20),
        }
    }
}

impl RetryPolicy {
    /// Backoff steps (before jitter) for retries 1, 2, …: backon's exponential sequence.
    fn steps(&self) -> impl Iterator<Item = Duration> {
        ExponentialBuilder::default()
            .with_min_delay(self.base_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0)
            .without_max_times()
            .build()
    }

    /// The wait before retry number `retry` (1-based): full jitter over the backoff step,
    /// never shorter than the provider's own hint.
    pub fn delay(&self, retry: u32, hint: Option<Duration>, unit: f64) -> Duration {
        let step = self
            .steps()
            .nth(retry.saturating_sub(1) as usize)
            .unwrap_or(self.max_delay);
        let jittered = step.mul_f64(unit.clamp(0.0, 1.0));
        match hint {
            Some(hint) => jittered.max(hint),
            None => jittered,
        }
    }
}

/// How a call with retries ended.
#[derive(Debug)]
pub enum Attempted<T> {
    /// It succeeded after `attempts` attempts.
    Done { value: T, attempts: u32 },
    /// It failed for good: a permanent error, or the last attempt failed.
    Failed { error: ProviderError, attempts: u32 },
    /// The next wait is longer than the in-process cap: park the event for `delay`.
    Park {
        error: ProviderError,
        attempts: u32,
        delay: Duration,
    },
}

/// Runs `call` until it succeeds, fails permanently, runs out of attempts or needs a wait too
/// long to sleep. `already` counts attempts made before (in an earlier delivery).
pub async fn retry<T, F, Fut>(policy: &RetryPolicy, already: u32, mut call: F) -> Attempted<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ProviderError>>,
{
    let mut attempts = already;
    loop {
        attempts += 1;
        let error = match call().await {
            Ok(value) => return Attempted::Done { value, attempts },
            Err(error) => error,
        };
        if !error.is_retryable() || attempts >= policy.max_attempts {
            return Attempted::Failed { error, attempts };
        }
        let delay = policy.delay(attempts, error.retry_after(), fastrand::f64());
        metrics::counter!(crate::telemetry::PROVIDER_RETRIES, "class" => error.class().as_str())
            .increment(1);
        if delay > policy.in_process_cap {
            return Attempted::Park {
                error,
                attempts,
                delay,
            };
        }
        tracing::debug!(attempt = attempts, ?delay, %error, "provider call failed, retrying");
        tokio::time::sleep(delay).await;
    }
}

/// Exponential waits from `min` to `max` with jitter, without end: the shape of every schedule
/// below except the provider's (whose jitter is full and whose hints count).
fn endless(min: Duration, max: Duration) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
}

/// lapin's schedule for recovering a lost broker connection: exponential from 200 ms to 5 s,
/// without end (lapin's own default stops after 16 attempts; a broker down for an hour is
/// reconnected to when it returns).
pub fn broker_reconnect() -> ExponentialBuilder {
    endless(Duration::from_millis(200), Duration::from_secs(5))
}

/// Waits between the attempts to publish one message (after a nack, or a channel that could
/// not be recovered): exponential from 100 ms to 2 s with jitter; the publisher bounds the
/// attempts.
pub fn publish_backoff() -> impl Iterator<Item = Duration> {
    endless(Duration::from_millis(100), Duration::from_secs(2)).build()
}

/// Waits between attempts to reach Postgres or the broker during an outage: exponential from
/// 100 ms to 5 s, without end (the caller stops on shutdown).
pub fn outage_backoff() -> impl Iterator<Item = Duration> {
    endless(Duration::from_millis(100), Duration::from_secs(5)).build()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use http::HeaderValue;

    use super::*;

    fn status(status: u16) -> ProviderError {
        ProviderError::Status {
            status,
            code: None,
            retry_after: None,
        }
    }

    #[test]
    fn classification_follows_the_contract() {
        for code in [408, 425, 429, 500, 502, 503, 504, 529] {
            assert!(status(code).is_retryable(), "{code}");
        }
        for code in [400, 401, 402, 403, 404, 422] {
            assert!(!status(code).is_retryable(), "{code}");
        }
        let quota = ProviderError::Status {
            status: 429,
            code: Some("insufficient_quota".into()),
            retry_after: None,
        };
        assert!(!quota.is_retryable());
        assert_eq!(quota.class(), ErrorClass::ProviderQuota);
        assert_eq!(status(401).class(), ErrorClass::ProviderAuth);
        assert!(ProviderError::Timeout(Duration::from_secs(1)).is_retryable());
        assert!(!ProviderError::MissingKey.is_retryable());
    }

    #[test]
    fn schedule_grows_exponentially_and_jitter_stays_within_the_step() {
        let policy = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            in_process_cap: Duration::from_secs(20),
        };
        let top: Vec<u128> = (1..=6)
            .map(|n| policy.delay(n, None, 1.0).as_millis())
            .collect();
        assert_eq!(top, vec![100, 200, 400, 800, 1600, 2000]);
        assert_eq!(policy.delay(3, None, 0.0), Duration::ZERO);
        for _ in 0..1000 {
            let delay = policy.delay(3, None, fastrand::f64());
            assert!(delay <= Duration::from_millis(400));
        }
        // A provider hint wins over a shorter jittered step.
        assert_eq!(
            policy.delay(1, Some(Duration::from_secs(3)), 0.5),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn every_retry_after_form_is_read() {
        let now = time::macros::datetime!(2026-12-04 10:00:00 UTC);
        let read = |name: &'static str, value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_str(value).unwrap());
            parse_retry_after(&headers, now)
        };
        assert_eq!(read("retry-after", "7"), Some(Duration::from_secs(7)));
        assert_eq!(
            read("retry-after-ms", "250"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            read("x-ms-retry-after-ms", "1500"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            read("retry-after", "Fri, 04 Dec 2026 10:00:30 GMT"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            read("retry-after", "Fri, 04 Dec 2026 09:00:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(read("retry-after", "soon"), None);
        assert_eq!(
            read("retry-after", "999999"),
            Some(Duration::from_secs(3600))
        );
    }

    #[test]
    fn publish_and_outage_waits_rise_from_their_floor_to_their_ceiling_and_never_end() {
        // backon's jitter adds up to the step itself: a step of d waits in [d, 2d).
        for (waits, floor, ceiling) in [
            (publish_backoff().take(30).collect::<Vec<_>>(), 100, 2_000),
            (outage_backoff().take(30).collect::<Vec<_>>(), 100, 5_000),
        ] {
            let (floor, ceiling) = (Duration::from_millis(floor), Duration::from_millis(ceiling));
            assert_eq!(waits.len(), 30, "the schedule does not end");
            assert!(waits[0] >= floor && waits[0] < 2 * floor, "{waits:?}");
            assert!(waits.iter().all(|wait| *wait < 2 * ceiling), "{waits:?}");
            assert!(waits[29] >= ceiling, "{waits:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_with_backoff_then_succeed() {
        let policy = RetryPolicy::default();
        let calls = Arc::new(AtomicU32::new(0));
        let start = tokio::time::Instant::now();
        let counter = calls.clone();
        let outcome = retry(&policy, 0, move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    Err(ProviderError::Status {
                        status: 429,
                        code: None,
                        retry_after: Some(Duration::from_secs(2)),
                    })
                } else {
                    Ok("done")
                }
            }
        })
        .await;
        assert!(matches!(
            outcome,
            Attempted::Done {
                value: "done",
                attempts: 3
            }
        ));
        // Two waits, each at least the provider's two seconds.
        assert!(start.elapsed() >= Duration::from_secs(4));
        assert!(start.elapsed() < Duration::from_secs(62));
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried() {
        let calls = Arc::new(AtomicU32::new(0));
        let counter = calls.clone();
        let outcome: Attempted<()> = retry(&RetryPolicy::default(), 0, move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Err(status(401)) }
        })
        .await;
        assert!(matches!(outcome, Attempted::Failed { attempts: 1, .. }));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_are_bounded() {
        let calls = Arc::new(AtomicU32::new(0));
        let counter = calls.clone();
        let outcome: Attempted<()> = retry(&RetryPolicy::default(), 0, move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Err(status(503)) }
        })
        .await;
        assert!(matches!(outcome, Attempted::Failed { attempts: 4, .. }));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_wait_is_parked_not_slept() {
        let start = tokio::time::Instant::now();
        let outcome: Attempted<()> = retry(&RetryPolicy::default(), 0, || async {
            Err(ProviderError::Status {
                status: 429,
                code: None,
                retry_after: Some(Duration::from_secs(120)),
            })
        })
        .await;
        match outcome {
            Attempted::Park {
                delay, attempts, ..
            } => {
                assert_eq!(delay, Duration::from_secs(120));
                assert_eq!(attempts, 1);
            }
            other => panic!("expected a park, got {other:?}"),
        }
        assert!(start.elapsed() < Duration::from_millis(1));
    }
}
