//! The figures of one `make bench` run. Each benchmark binary records what it measured as a
//! [`Figure`]; [`record`] appends it as one JSON line to the file named by
//! `TALLY_BENCH_REPORT` (and does nothing when that is unset), and
//! `deploy/local/bench-table.py FILE` prints the lines as the README's table.

use std::io::Write as _;

use serde::Serialize;

/// Names the file that [`record`] appends to.
pub const REPORT_ENV: &str = "TALLY_BENCH_REPORT";
/// The command a figure is reproduced with, as the Makefile ran it (e.g.
/// `make load FORMAT=otlp`); without it, the binary's own command line.
pub const COMMAND_ENV: &str = "TALLY_BENCH_COMMAND";

/// One benchmark figure, with the raw limit measured in the same run when there is one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figure {
    /// What was measured, e.g. "ingest, JSON events".
    pub job: String,
    pub value: f64,
    /// The unit of `value` (and of the raw limit), e.g. "events/s", "ms", "MB".
    pub unit: String,
    pub raw: Option<Raw>,
    /// `value / raw.value`.
    pub ratio: Option<f64>,
    /// What the figure should reach, e.g. "≥ 0.5 ×" (of the ratio) or "≤ 500 ms" (of the value).
    pub goal: Option<String>,
    pub command: String,
}

/// The raw limit a figure is measured against.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Raw {
    /// What the limit is, e.g. "rdkafka producer, same events".
    pub name: String,
    pub value: f64,
}

impl Figure {
    /// A figure without raw limit or goal, reproduced by [`command`].
    pub fn new(job: impl Into<String>, value: f64, unit: impl Into<String>) -> Figure {
        Figure {
            job: job.into(),
            value,
            unit: unit.into(),
            raw: None,
            ratio: None,
            goal: None,
            command: command(),
        }
    }

    /// The raw limit measured in the same run, in the figure's unit; sets the ratio.
    pub fn raw(mut self, name: impl Into<String>, value: f64) -> Figure {
        self.ratio = (value > 0.0).then(|| self.value / value);
        self.raw = Some(Raw {
            name: name.into(),
            value,
        });
        self
    }

    pub fn goal(mut self, goal: impl Into<String>) -> Figure {
        self.goal = Some(goal.into());
        self
    }
}

/// The `q`-quantile (0..=1) of durations sorted ascending (nearest rank); panics when empty.
pub fn percentile(sorted: &[std::time::Duration], q: f64) -> std::time::Duration {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// `TALLY_BENCH_COMMAND`, or else this process's command line.
pub fn command() -> String {
    std::env::var(COMMAND_ENV).unwrap_or_else(|_| {
        let mut args = std::env::args();
        let program = args.next().unwrap_or_default();
        let program = std::path::Path::new(&program)
            .file_name()
            .map_or(program.clone(), |n| n.to_string_lossy().into_owned());
        std::iter::once(program)
            .chain(args)
            .collect::<Vec<_>>()
            .join(" ")
    })
}

/// `9954` → "9 954": numbers in job texts, grouped as the README writes them.
pub fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// Appends `figure` as one JSON line to the file named by `TALLY_BENCH_REPORT`; does nothing
/// when that is unset. Prints nothing: the benchmark prints its own figures.
pub fn record(figure: &Figure) -> std::io::Result<()> {
    match std::env::var_os(REPORT_ENV) {
        Some(path) => append(std::path::Path::new(&path), figure),
        None => Ok(()),
    }
}

/// Appends `figure` to `path` as one JSON line.
pub fn append(path: &std::path::Path, figure: &Figure) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(figure)?;
    line.push(b'\n');
    // One write of a whole line to a file opened for appending: lines of concurrent
    // benchmarks do not interleave.
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(&line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_limit_sets_the_ratio() {
        let f = Figure::new("ingest, JSON events", 40_000.0, "events/s")
            .raw("rdkafka producer, same events", 100_000.0)
            .goal("≥ 0.5 ×");
        assert_eq!(f.ratio, Some(0.4));
        let json = serde_json::to_value(&f).unwrap();
        assert_eq!(json["raw"]["name"], "rdkafka producer, same events");
        assert_eq!(json["goal"], "≥ 0.5 ×");
        assert_eq!(Figure::new("x", 1.0, "ms").raw("zero", 0.0).ratio, None);
    }

    #[test]
    fn numbers_are_grouped_by_thousands() {
        let cases = [
            (0, "0"),
            (999, "999"),
            (1000, "1 000"),
            (9954, "9 954"),
            (1234567, "1 234 567"),
        ];
        for (n, text) in cases {
            assert_eq!(grouped(n), text);
        }
    }

    #[test]
    fn figures_are_appended_one_json_line_each() {
        let path =
            std::env::temp_dir().join(format!("tally-report-{}.jsonl", uuid::Uuid::new_v4()));
        let a = Figure::new("a", 1.0, "ms").goal("≤ 2 ms");
        let b = Figure::new("b", 2.0, "MB");
        append(&path, &a).unwrap();
        append(&path, &b).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let jobs: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["job"].to_string())
            .collect();
        assert_eq!(jobs, ["\"a\"", "\"b\""]);
    }
}
