//! Progress of long steps: bars on a terminal, plain log lines elsewhere.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::TableReport;

/// Where progress goes.
#[derive(Clone)]
pub struct Progress {
    bars: Option<MultiProgress>,
}

impl Progress {
    /// Bars on stderr when it is a terminal and `quiet` is off; otherwise log lines only.
    pub fn auto(quiet: bool) -> Self {
        let bars = (!quiet && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Progress { bars }
    }

    /// No bars (tests, JSON output).
    pub fn hidden() -> Self {
        Progress { bars: None }
    }

    /// Start a step.
    pub fn step(&self, name: &str) -> Step {
        let bar = self.bars.as_ref().map(|m| {
            let bar = m.add(ProgressBar::new_spinner());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {msg:32} {human_pos:>12} rows  {prefix}  {elapsed}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_message(name.to_string());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        tracing::debug!(step = name, "started");
        Step {
            bar,
            bytes: std::sync::atomic::AtomicU64::new(0),
            started: std::time::Instant::now(),
        }
    }

    /// A table is staged.
    pub fn table_done(&self, t: &TableReport) {
        tracing::info!(
            table = %t.table,
            rows_in = t.rows_in,
            rejected = t.rows_rejected,
            rows_written = t.rows_written,
            bytes = t.bytes_written,
            seconds = format!("{:.2}", t.seconds),
            rows_per_second = (t.rows_in as f64 / t.seconds.max(1e-3)).round() as u64,
            changed = t.changed,
            "{} staged", t.kind
        );
    }
}

/// One running step.
pub struct Step {
    bar: Option<ProgressBar>,
    bytes: std::sync::atomic::AtomicU64,
    started: std::time::Instant,
}

impl Step {
    /// Count rows and bytes done.
    pub fn inc(&self, rows: u64, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(rows);
            let total = self
                .bytes
                .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed)
                + bytes;
            let secs = self.started.elapsed().as_secs_f64().max(1e-3);
            let rows_rate = indicatif::HumanCount((b.position() as f64 / secs) as u64);
            let mut prefix = format!("{rows_rate} rows/s");
            if total > 0 {
                prefix.push_str(&format!(
                    "  {} at {}/s",
                    indicatif::HumanBytes(total),
                    indicatif::HumanBytes((total as f64 / secs) as u64)
                ));
            }
            b.set_prefix(prefix);
        }
    }

    /// The step is over.
    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}
