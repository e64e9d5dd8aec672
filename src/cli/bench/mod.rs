//! `copilot-workers bench`: measures the worker against the broker's own limit, on the local
//! RabbitMQ and Postgres, in one run.
//!
//! (a) `baseline`: the same AMQP work per event with nothing in between (consume with the same
//!     prefetch, publish a result-sized message with a confirm, ack);
//! (b) `instant`: the real worker (a child process) with an instant fake provider;
//!     `paced`: the same below saturation, events published at a fixed rate (1,000/s) while
//!     the worker runs, for the overhead target;
//! (c) `slow`: the real worker with a provider taking 2 s per call and 5,000 calls in flight;
//!     `backlog`: one org capped at 4 calls of 400 ms (`--backlog-cap`, `--backlog-latency-ms`)
//!     with a queue far beyond what it can hold (a bulk import), for how often its events are
//!     parked while they wait their turn;
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
    /// Rounds of the baseline and the instant run, alternated. Both vary by 10-15 % from one
    /// minute to the next on a shared machine; the table shows the round whose ratio is the
    /// median, and the notes list every round.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=9))]
    pub rounds: u32,
    /// Events for the slow-provider run.
    #[arg(long, default_value_t = 60_000)]
    pub slow_events: usize,
    /// Provider latency of the slow run, in milliseconds.
    #[arg(long, default_value_t = 2_000)]
    pub slow_latency_ms: u64,
    /// Provider calls in flight in the slow run (its prefetch and the org's cap).
    #[arg(long, default_value_t = 5_000)]
    pub in_flight: u16,
    /// Events of the backlog run (one org at its cap, the queue filled first: with the
    /// default cap and latency, 10 events/s at best).
    #[arg(long, default_value_t = 1_200)]
    pub backlog_events: usize,
    /// The org's cap in the backlog run.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub backlog_cap: u16,
    /// Provider latency of the backlog run, in milliseconds.
    #[arg(long, default_value_t = 400)]
    pub backlog_latency_ms: u64,
    /// Events of the paced run (published at `--rate` while the worker runs).
    #[arg(long, default_value_t = 20_000)]
    pub paced_events: usize,
    /// Events per second of the paced run, where overhead is measured below saturation.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u32,
    /// Earlier results in the ledger before the first phase, as a running installation has
    /// (the planner sees a ledger of this size; 0 starts empty, as a new install does).
    #[arg(long, default_value_t = 100_000)]
    pub ledger_rows: u32,
    /// Also run a chaos soak of this many events.
    #[arg(long)]
    pub soak: Option<usize>,
    /// Run only these phases (comma-separated: baseline, instant, paced, slow, backlog,
    /// soak).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Pace the baseline to this many events per second, evenly, one at a time (default: as
    /// fast as the broker goes). The broker's CPU per event, in each phase's notes, then shows
    /// what the same AMQP work costs it at the instant run's rate.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub baseline_rate: Option<u32>,
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
    let bench = phases::Bench::prepare(&settings, args.ledger_rows)
        .await
        .context("bench setup")?;
    let measured = measure_all(&bench, &args).await;
    // Whether the phases succeeded or not: a failed phase must not leave its queues behind
    // (one left 80,000 events in a queue nobody consumes).
    bench.cleanup().await;
    measured
}

async fn measure_all(bench: &phases::Bench, args: &BenchArgs) -> anyhow::Result<()> {
    let wanted = |phase: &str| args.only.is_empty() || args.only.iter().any(|p| p == phase);
    let mut rows = Vec::new();
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        // Each round has its own queues and event ids.
        let label = |phase: &str| match round {
            1 => phase.to_owned(),
            _ => format!("{phase}{round}"),
        };
        let baseline = match wanted("baseline") {
            true => Some(
                bench
                    .baseline(&label("baseline"), args.events, args.baseline_rate)
                    .await?,
            ),
            false => None,
        };
        let instant = match wanted("instant") {
            true => Some(
                bench
                    .pipeline(
                        &label("instant"),
                        args.events,
                        Duration::ZERO,
                        200,
                        false,
                        None,
                    )
                    .await?,
            ),
            false => None,
        };
        rounds.push((baseline, instant));
    }
    rows.extend(median_round(rounds));
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
    if wanted("backlog") {
        rows.push(
            bench
                .pipeline(
                    "backlog",
                    args.backlog_events,
                    Duration::from_millis(args.backlog_latency_ms),
                    args.backlog_cap,
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
    Ok(())
}

/// The baseline and instant rows of the round whose instant/baseline ratio is the median,
/// with every round's figures in the instant row's notes.
fn median_round(mut rounds: Vec<(Option<Row>, Option<Row>)>) -> Vec<Row> {
    let steady = |row: &Option<Row>| row.as_ref().map_or(0.0, |r| r.steady);
    let ratio = |round: &(Option<Row>, Option<Row>)| match steady(&round.0) {
        base if base > 0.0 => steady(&round.1) / base,
        _ => steady(&round.1),
    };
    let listed: Vec<String> = rounds
        .iter()
        .map(|round| match (&round.0, &round.1) {
            (Some(a), Some(b)) => format!(
                "{:.0}/{:.0} = {:.0} %",
                b.steady,
                a.steady,
                100.0 * ratio(round)
            ),
            (Some(a), None) => format!("{:.0}", a.steady),
            (None, Some(b)) => format!("{:.0}", b.steady),
            (None, None) => String::new(),
        })
        .collect();
    rounds.sort_by(|x, y| ratio(x).total_cmp(&ratio(y)));
    let middle = rounds.len() / 2;
    let Some((baseline, instant)) = rounds.into_iter().nth(middle) else {
        return Vec::new();
    };
    let mut rows = Vec::new();
    if let Some(mut row) = baseline {
        row.phase = "baseline".into();
        rows.push(row);
    }
    if let Some(mut row) = instant {
        row.phase = "instant".into();
        if listed.len() > 1 {
            row.note.push_str(&format!(
                "; rounds (instant/baseline events/s): {}; the median round is shown",
                listed.join(", ")
            ));
        }
        rows.push(row);
    }
    rows
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

#[cfg(test)]
mod tests {
    use super::*;

    fn row(phase: &str, steady: f64) -> Option<Row> {
        Some(Row {
            phase: phase.into(),
            steady,
            ..Row::default()
        })
    }

    #[test]
    fn the_round_with_the_median_ratio_is_shown_with_every_round_noted() {
        let rounds = vec![
            (row("baseline", 10_000.0), row("instant", 5_000.0)),
            (row("baseline2", 8_000.0), row("instant2", 3_200.0)),
            (row("baseline3", 9_000.0), row("instant3", 5_400.0)),
        ];
        let rows = median_round(rounds);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].phase.as_str(), rows[0].steady),
            ("baseline", 10_000.0)
        );
        assert_eq!(
            (rows[1].phase.as_str(), rows[1].steady),
            ("instant", 5_000.0)
        );
        assert!(
            rows[1]
                .note
                .contains("5000/10000 = 50 %, 3200/8000 = 40 %, 5400/9000 = 60 %"),
            "{}",
            rows[1].note
        );
    }

    #[test]
    fn one_round_or_one_phase_is_shown_as_measured() {
        let rows = median_round(vec![(row("baseline", 9_000.0), None)]);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].note, "");
        let rows = median_round(vec![
            (None, row("instant", 3_000.0)),
            (None, row("instant2", 4_000.0)),
        ]);
        assert_eq!(rows[0].phase, "instant");
        assert_eq!(rows[0].steady, 4_000.0);
    }
}
