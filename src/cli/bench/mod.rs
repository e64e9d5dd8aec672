//! `copilot-workers bench`: measures the worker against the broker's own limit, on the local
//! RabbitMQ and Postgres, in one run.
//!
//! (a) `baseline`: the same AMQP work per event with nothing in between (consume with the same
//!     prefetch, publish a result-sized message with a confirm, ack);
//! (b) `instant`: the real worker (a child process) with an instant fake provider;
//!     `paced`: the same below saturation, events published at a fixed rate (1,000/s) while
//!     the worker runs, for the overhead target;
//! (c) `slow`: the real worker with a provider taking 2 s per call and 5,000 calls in flight;
//! (d) `soak` (optional): a chaos provider failing half the calls, counting every outcome.
//! The fake provider, the publisher and the result listener run in this process; the worker
//! runs alone in its child process, so its CPU and peak memory are its own.

mod measure;
mod phases;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use crate::config::Settings;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Events for the broker baseline and the instant-provider run.
    #[arg(long, default_value_t = 20_000)]
    pub events: usize,
    /// Events for the slow-provider run.
    #[arg(long, default_value_t = 60_000)]
    pub slow_events: usize,
    /// Provider latency of the slow run, in milliseconds.
    #[arg(long, default_value_t = 2_000)]
    pub slow_latency_ms: u64,
    /// Provider calls in flight in the slow run (its prefetch and the org's cap).
    #[arg(long, default_value_t = 5_000)]
    pub in_flight: u16,
    /// Events of the paced run (published at `--rate` while the worker runs).
    #[arg(long, default_value_t = 20_000)]
    pub paced_events: usize,
    /// Events per second of the paced run, where overhead is measured below saturation.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u32,
    /// Also run a chaos soak of this many events.
    #[arg(long)]
    pub soak: Option<usize>,
    /// Run only these phases (comma-separated: baseline, instant, paced, slow, soak).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Write the results table as Markdown to this file.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
}

/// One line of the report.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub phase: String,
    pub events: usize,
    /// Events/s between the 10th and 90th percentile of results.
    pub steady: f64,
    /// Events/s over the whole run, ramp-up and drain included.
    pub wall: f64,
    /// Worker overhead p50 and p99, milliseconds.
    pub overhead_ms: Option<(f64, f64)>,
    pub peak_rss_mb: Option<f64>,
    pub cpu_per_1000: Option<f64>,
    pub ready_ms: Option<f64>,
    pub note: String,
}

pub async fn run(settings: Settings, args: BenchArgs) -> anyhow::Result<()> {
    let wanted = |phase: &str| args.only.is_empty() || args.only.iter().any(|p| p == phase);
    let bench = phases::Bench::prepare(&settings)
        .await
        .context("bench setup")?;
    let mut rows = Vec::new();
    if wanted("baseline") {
        rows.push(bench.baseline(args.events).await?);
    }
    if wanted("instant") {
        rows.push(
            bench
                .pipeline("instant", args.events, Duration::ZERO, 200, false, None)
                .await?,
        );
    }
    if wanted("paced") {
        rows.push(
            bench
                .pipeline(
                    "paced",
                    args.paced_events,
                    Duration::ZERO,
                    200,
                    false,
                    Some(args.rate),
                )
                .await?,
        );
    }
    if wanted("slow") {
        let latency = Duration::from_millis(args.slow_latency_ms);
        rows.push(
            bench
                .pipeline(
                    "slow",
                    args.slow_events,
                    latency,
                    args.in_flight,
                    false,
                    None,
                )
                .await?,
        );
    }
    if let Some(events) = args.soak
        && (args.only.is_empty() || wanted("soak"))
    {
        rows.push(
            bench
                .pipeline("soak", events, Duration::ZERO, 1_000, true, None)
                .await?,
        );
    }
    let table = render(&rows);
    println!("\n{table}");
    if let Some(path) = &args.markdown {
        std::fs::write(path, &table).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("table written to {}", path.display());
    }
    bench.cleanup().await;
    Ok(())
}

fn render(rows: &[Row]) -> String {
    let fmt = |value: Option<f64>, digits: usize| {
        value.map_or("–".to_owned(), |v| format!("{v:.digits$}"))
    };
    let mut out = String::from(
        "| phase | events | events/s (steady) | events/s (wall) | overhead p50 ms | overhead p99 ms | peak RSS MB | CPU s / 1000 ev | start→ready ms | notes |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for row in rows {
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} |\n",
            row.phase,
            row.events,
            row.steady,
            row.wall,
            fmt(row.overhead_ms.map(|o| o.0), 2),
            fmt(row.overhead_ms.map(|o| o.1), 2),
            fmt(row.peak_rss_mb, 0),
            fmt(row.cpu_per_1000, 3),
            fmt(row.ready_ms, 0),
            row.note
        ));
    }
    let base = rows
        .iter()
        .find(|r| r.phase == "baseline")
        .map(|r| r.steady);
    let instant = rows.iter().find(|r| r.phase == "instant").map(|r| r.steady);
    if let (Some(a), Some(b)) = (base, instant)
        && a > 0.0
    {
        out.push_str(&format!(
            "\n(b)/(a) = instant / baseline = {:.0}%\n",
            100.0 * b / a
        ));
    }
    out
}
