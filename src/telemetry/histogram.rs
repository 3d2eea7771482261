//! The request path's latency histograms, kept as atomic bucket counters.
//!
//! The Prometheus recorder's histograms queue every sample and sort the
//! queue into buckets in its upkeep (every 5 s and at each scrape): about
//! 550 instructions per request for the two per-route histograms, a tenth of
//! the record stage (BENCHMARKS.md, ninth session). Here a sample is a bucket
//! search and two relaxed atomic adds on the recording thread's own shard,
//! so two workers never write the same cache line. `/metrics` renders the
//! families after the recorder's text, in the same format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds: 100 µs to 30 s.
pub const BOUNDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0, 30.0,
];

/// [`BOUNDS`] in nanoseconds, for the search on the request path.
const BOUNDS_NANOS: [u64; BOUNDS.len()] = {
    let mut out = [0u64; BOUNDS.len()];
    let mut i = 0;
    while i < BOUNDS.len() {
        out[i] = (BOUNDS[i] * 1e9) as u64;
        i += 1;
    }
    out
};

/// Shards per series; a thread records into shard `thread number % SHARDS`.
const SHARDS: usize = 8;

/// One thread's share of a series: a count per bucket (the last for samples
/// above every bound) and the sum. Aligned so shards never share a line
/// (or the adjacent line the prefetcher pairs with it).
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
}

/// One histogram series (one label value).
#[derive(Default)]
pub struct Latency {
    shards: [Shard; SHARDS],
}

fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Relaxed) % SHARDS;
    }
    INDEX.with(|i| *i)
}

impl Latency {
    pub fn record(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // Prometheus buckets are `le`: a sample equal to a bound is in it.
        let bucket = BOUNDS_NANOS.partition_point(|&b| b < nanos);
        let shard = &self.shards[shard_index()];
        shard.buckets[bucket].fetch_add(1, Relaxed);
        shard.sum_nanos.fetch_add(nanos, Relaxed);
    }

    /// The counts per bucket (not cumulative; the last is above every
    /// bound) and the sum in nanoseconds, over all shards.
    fn snapshot(&self) -> ([u64; BOUNDS.len() + 1], u64) {
        let mut counts = [0u64; BOUNDS.len() + 1];
        let mut sum = 0u64;
        for shard in &self.shards {
            for (total, b) in counts.iter_mut().zip(&shard.buckets) {
                *total += b.load(Relaxed);
            }
            sum = sum.wrapping_add(shard.sum_nanos.load(Relaxed));
        }
        (counts, sum)
    }
}

/// A histogram metric with one label, its series made on first use and
/// kept for the life of the process (as the recorder keeps its series), so
/// a reload that keeps a route keeps its counts.
pub struct Family {
    name: &'static str,
    help: &'static str,
    label: &'static str,
    series: Mutex<BTreeMap<String, Arc<Latency>>>,
}

impl Family {
    pub const fn new(name: &'static str, help: &'static str, label: &'static str) -> Family {
        Family {
            name,
            help,
            label,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    /// The series for `value`, made if it is new.
    pub fn series(&self, value: &str) -> Arc<Latency> {
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        match series.get(value) {
            Some(s) => s.clone(),
            None => series.entry(value.to_owned()).or_default().clone(),
        }
    }

    /// Appends the family in the Prometheus text format, as the recorder
    /// writes its own histograms; nothing if it has no series yet.
    pub fn render(&self, out: &mut String) {
        let series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        if series.is_empty() {
            return;
        }
        let (name, label) = (self.name, self.label);
        let _ = writeln!(out, "\n# HELP {name} {}", self.help);
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (value, latency) in series.iter() {
            let value = escape_label(value);
            let (counts, sum) = latency.snapshot();
            let mut cumulative = 0;
            for (bound, count) in BOUNDS.iter().zip(counts) {
                cumulative += count;
                let _ = writeln!(
                    out,
                    "{name}_bucket{{{label}=\"{value}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            cumulative += counts[BOUNDS.len()];
            let _ = writeln!(
                out,
                "{name}_bucket{{{label}=\"{value}\",le=\"+Inf\"}} {cumulative}"
            );
            let seconds = sum as f64 / 1e9;
            let _ = writeln!(out, "{name}_sum{{{label}=\"{value}\"}} {seconds}");
            let _ = writeln!(out, "{name}_count{{{label}=\"{value}\"}} {cumulative}");
        }
    }
}

/// A label value as the text format wants it: `\`, `"` and newlines escaped.
fn escape_label(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return value.into();
    }
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(family: &Family) -> Vec<String> {
        let mut out = String::new();
        family.render(&mut out);
        out.lines().map(str::to_owned).collect()
    }

    #[test]
    fn samples_land_in_the_first_bucket_whose_bound_they_do_not_exceed() {
        let f = Family::new("t_seconds", "Test", "route");
        let s = f.series("a");
        for micros in [50, 100, 101, 250, 30_000_000, 40_000_000] {
            s.record(Duration::from_micros(micros));
        }
        let lines = rendered(&f);
        let bucket = |le: &str| {
            let prefix = format!("t_seconds_bucket{{route=\"a\",le=\"{le}\"}} ");
            let line = lines.iter().find(|l| l.starts_with(&prefix));
            line.unwrap_or_else(|| panic!("no {le} in {lines:?}"))[prefix.len()..]
                .parse::<u64>()
                .unwrap()
        };
        assert_eq!(bucket("0.0001"), 2, "50 us and exactly 100 us");
        assert_eq!(bucket("0.00025"), 4);
        assert_eq!(bucket("10"), 4);
        assert_eq!(bucket("30"), 5, "exactly 30 s");
        assert_eq!(bucket("+Inf"), 6);
        assert!(lines.contains(&"t_seconds_count{route=\"a\"} 6".to_owned()));
        assert!(lines.contains(&"t_seconds_sum{route=\"a\"} 70.000501".to_owned()));
    }

    #[test]
    fn a_family_renders_as_the_recorder_does_and_not_at_all_while_empty() {
        let f = Family::new("t_seconds", "Time of a thing", "route");
        assert!(rendered(&f).is_empty());
        f.series("b").record(Duration::from_millis(3));
        // The same label value is the same series.
        f.series("b").record(Duration::from_millis(3));
        f.series("a\"x").record(Duration::from_millis(3));
        let mut out = String::new();
        f.render(&mut out);
        assert!(
            out.starts_with("\n# HELP t_seconds Time of a thing\n# TYPE t_seconds histogram\n")
        );
        assert_eq!(out.matches("le=\"+Inf\"").count(), 2);
        assert!(out.contains("t_seconds_bucket{route=\"a\\\"x\",le=\"0.005\"} 1\n"));
        assert!(out.contains("t_seconds_bucket{route=\"b\",le=\"0.0025\"} 0\n"));
        assert!(out.contains("t_seconds_bucket{route=\"b\",le=\"0.005\"} 2\n"));
        assert!(out.contains("t_seconds_count{route=\"b\"} 2\n"));
        assert!(out.contains("t_seconds_sum{route=\"b\"} 0.006\n"));
    }

    #[test]
    fn threads_recording_at_once_lose_no_sample() {
        let f = Family::new("t_seconds", "Test", "route");
        let s = f.series("a");
        std::thread::scope(|scope| {
            for t in 0..12u64 {
                let s = &s;
                scope.spawn(move || {
                    for i in 0..1000 {
                        s.record(Duration::from_micros(t * 1000 + i));
                    }
                });
            }
        });
        let (counts, sum) = s.snapshot();
        assert_eq!(counts.iter().sum::<u64>(), 12_000);
        let expected: u64 = (0..12u64)
            .flat_map(|t| (0..1000).map(move |i| (t * 1000 + i) * 1000))
            .sum();
        assert_eq!(sum, expected);
    }
}
