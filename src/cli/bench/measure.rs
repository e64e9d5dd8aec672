//! Reading what the benchmark reports: process CPU and peak memory from /proc, quantiles from
//! a Prometheus histogram, rates over the steady part of a run.

use std::time::Instant;

/// CPU seconds (user + system) and peak RSS in MiB of a process, from /proc.
pub fn process_stats(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kb: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())?;
    // The kernel's USER_HZ is 100 on every Linux this runs on.
    Some((ticks / 100.0, hwm_kb / 1024.0))
}

/// CPU seconds (user + system) of every local process named `comm`: `beam.smp` is the Erlang
/// VM RabbitMQ runs in, `postgres` every Postgres process. `None` when there is none here (a
/// remote server).
pub fn cpu_of(comm: &str) -> Option<f64> {
    let mut total = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if name.trim() != comm {
            continue;
        }
        if let Some((cpu, _)) = process_stats(pid) {
            *total.get_or_insert(0.0) += cpu;
        }
    }
    total
}

/// The local RabbitMQ's processes.
pub const BROKER: &str = "beam.smp";
/// The local Postgres' processes.
pub const POSTGRES: &str = "postgres";

/// A note on `who`'s CPU per event between two CPU readings (seconds); empty when either is
/// missing (a remote server).
pub fn cpu_note(who: &str, before: Option<f64>, after: Option<f64>, events: usize) -> String {
    per_event(before, after, events).map_or(String::new(), |secs| {
        format!("; {who} CPU {:.3} ms per event", secs * 1000.0)
    })
}

/// How much a counter grew per event between two readings; None when either is missing.
fn per_event(before: Option<f64>, after: Option<f64>, events: usize) -> Option<f64> {
    let (before, after) = before.zip(after)?;
    (events > 0).then(|| (after - before) / events as f64)
}

/// Context switches (voluntary and not) of every thread of a process so far, from
/// `/proc/PID/task/*/status`. On a small VM each one is dear: a thread that sleeps and is
/// woken for every hand-off costs more than the hand-off.
pub fn context_switches(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        total += status
            .lines()
            .filter(|line| line.contains("ctxt_switches:"))
            .filter_map(|line| line.rsplit(char::is_whitespace).next()?.parse::<u64>().ok())
            .sum::<u64>();
    }
    Some(total)
}

/// A note on a process's context switches per event between two [`context_switches`]
/// readings; empty when either is missing.
pub fn switches_note(who: &str, before: Option<u64>, after: Option<u64>, events: usize) -> String {
    let count = |switches: Option<u64>| switches.map(|n| n as f64);
    per_event(count(before), count(after), events).map_or(String::new(), |switches| {
        format!("; {who} threads switched {switches:.2} times per event")
    })
}

/// A Prometheus counter summed over all its label sets.
pub fn counter_total(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The mean of a Prometheus histogram (sum / count) over the label sets whose line contains
/// `only`.
pub fn histogram_mean(page: &str, name: &str, only: &str) -> Option<f64> {
    let total = |suffix: &str| -> f64 {
        let prefix = format!("{name}_{suffix}");
        page.lines()
            .filter(|line| line.starts_with(&prefix) && line.contains(only))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let count = total("count");
    (count > 0.0).then(|| total("sum") / count)
}

/// Resets a process's peak RSS (Linux: writing 5 to clear_refs).
pub fn reset_peak_rss(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// The `q` quantile of a Prometheus histogram, interpolated within buckets the way
/// `histogram_quantile` does; the label sets of `name` whose line contains `only` (say
/// `step="record"`, or "" for all) are summed.
pub fn histogram_quantile(page: &str, name: &str, only: &str, q: f64) -> Option<f64> {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in page
        .lines()
        .filter(|line| line.starts_with(&prefix) && line.contains(only))
    {
        let le = line.split("le=\"").nth(1)?.split('"').next()?;
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        let count: f64 = line.rsplit(' ').next()?.parse().ok()?;
        match buckets.iter_mut().find(|(b, _)| *b == bound) {
            Some(bucket) => bucket.1 += count,
            None => buckets.push((bound, count)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    let rank = q * total;
    let mut previous = (0.0, 0.0);
    for (bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(previous.0);
            }
            let within = (rank - previous.1) / (count - previous.1).max(f64::MIN_POSITIVE);
            return Some(previous.0 + (bound - previous.0) * within);
        }
        previous = (bound, count);
    }
    None
}

/// Events per second between the 10th and the 90th percentile of arrival times (the steady
/// part of a run, without ramp-up and drain), and over the whole run from `start`.
pub fn rates(start: Instant, arrivals: &[Instant]) -> (f64, f64) {
    let n = arrivals.len();
    if n < 10 {
        return (0.0, 0.0);
    }
    let (low, high) = (n / 10, n * 9 / 10);
    let steady = (high - low) as f64 / (arrivals[high] - arrivals[low]).as_secs_f64().max(1e-9);
    let wall = n as f64 / (arrivals[n - 1] - start).as_secs_f64().max(1e-9);
    (steady, wall)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let page =
            "x_bucket{le=\"0.001\"} 50\nx_bucket{le=\"0.002\"} 100\nx_bucket{le=\"+Inf\"} 100\n";
        let p50 = histogram_quantile(page, "x", "", 0.5).unwrap();
        assert!((p50 - 0.001).abs() < 1e-9);
        let p75 = histogram_quantile(page, "x", "", 0.75).unwrap();
        assert!((p75 - 0.0015).abs() < 1e-9);
    }

    #[test]
    fn means_and_quantiles_keep_to_the_chosen_labels() {
        let page = "y_bucket{s=\"a\",le=\"1\"} 4\ny_bucket{s=\"a\",le=\"+Inf\"} 4\n\
                    y_bucket{s=\"b\",le=\"1\"} 0\ny_bucket{s=\"b\",le=\"+Inf\"} 2\n\
                    y_sum{s=\"a\"} 2\ny_count{s=\"a\"} 4\ny_sum{s=\"b\"} 30\ny_count{s=\"b\"} 2\n";
        assert_eq!(histogram_mean(page, "y", "s=\"a\""), Some(0.5));
        assert_eq!(histogram_mean(page, "y", "s=\"b\""), Some(15.0));
        assert_eq!(histogram_mean(page, "y", ""), Some(32.0 / 6.0));
        assert_eq!(histogram_mean(page, "z", ""), None);
        assert!(histogram_quantile(page, "y", "s=\"a\"", 0.99).unwrap() <= 1.0);
    }

    #[test]
    fn a_counter_total_sums_its_label_sets_only() {
        let page = "# HELP p parked\np{r=\"a\"} 3\np{r=\"b\"} 4\np 1\np_other{r=\"a\"} 100\n";
        assert_eq!(counter_total(page, "p"), 8.0);
        assert_eq!(counter_total(page, "q"), 0.0);
    }

    #[test]
    fn the_cpu_note_is_per_event_or_nothing() {
        assert_eq!(
            cpu_note("the broker's", Some(10.0), Some(12.5), 10_000),
            "; the broker's CPU 0.250 ms per event"
        );
        assert_eq!(cpu_note("the broker's", None, Some(12.5), 10_000), "");
        assert_eq!(cpu_note("the broker's", Some(10.0), Some(12.5), 0), "");
    }

    #[test]
    fn this_process_has_stats() {
        let (cpu, rss) = process_stats(std::process::id()).unwrap();
        assert!(cpu >= 0.0 && rss > 1.0);
        let before = context_switches(std::process::id()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let after = context_switches(std::process::id()).unwrap();
        assert!(after > before, "a sleep is a switch: {before} → {after}");
    }

    #[test]
    fn the_switches_note_is_per_event_or_nothing() {
        assert_eq!(
            switches_note("the worker's", Some(100), Some(350), 100),
            "; the worker's threads switched 2.50 times per event"
        );
        assert_eq!(switches_note("the worker's", None, Some(350), 100), "");
    }
}
