//! How `migrate` and `resume` show progress: bars on a terminal (indicatif), JSON lines with
//! `--json`, plain periodic lines otherwise. Log lines go through the bars, so neither
//! garbles the other.

use std::io::{IsTerminal, Write};
use std::sync::{Mutex, OnceLock};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use crate::migrate::Reporter;
use crate::plan::report::thousands;
use crate::state::Phase;

/// The bars, when they are drawn; the log writer suspends them around each line.
static BARS: OnceLock<MultiProgress> = OnceLock::new();

/// A `tracing` writer for stderr that keeps the bars intact.
#[derive(Clone, Copy, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match BARS.get() {
            Some(bars) => bars.suspend(|| std::io::stderr().write(buf)),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

fn timestamp() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Picks the reporter: JSON lines, bars on a terminal, or plain lines.
pub fn reporter(json: bool) -> Box<dyn Reporter> {
    if json {
        Box::new(JsonLines)
    } else if std::io::stdout().is_terminal() {
        let bars = BARS.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Box::new(Bars { bars: bars.clone(), current: Mutex::new(None) })
    } else {
        Box::new(super::migrate::Lines)
    }
}

/// One JSON object per line on stdout.
pub struct JsonLines;

impl JsonLines {
    pub fn emit(value: serde_json::Value) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{value}");
    }
}

impl Reporter for JsonLines {
    fn phase(&self, phase: Phase, message: &str) {
        Self::emit(json!({"event": "phase", "at": timestamp(), "phase": phase, "message": message}));
    }

    fn progress(&self, phase: Phase, done: i64, total: i64, rate: f64) {
        let eta = (rate > 0.0 && total > done).then(|| (total - done) as f64 / rate);
        Self::emit(
            json!({"event": "progress", "at": timestamp(), "phase": phase, "rows": done, "rows_estimated": total,
                          "rows_per_second": rate.round(), "eta_seconds": eta.map(|e| e.round())}),
        );
    }

    fn note(&self, message: &str) {
        Self::emit(json!({"event": "note", "at": timestamp(), "message": message}));
    }
}

/// Bars on a terminal: one for the phase under way. The copy's shows rows, rate and ETA;
/// the others a spinner with the phase's message and elapsed time. A phase that ends
/// becomes a plain line above the bar, as do notes, so the history stays on screen.
pub struct Bars {
    bars: MultiProgress,
    current: Mutex<Option<(Phase, String, ProgressBar)>>,
}

impl Bars {
    fn current(&self) -> std::sync::MutexGuard<'_, Option<(Phase, String, ProgressBar)>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the bar of the phase that ended by a line saying what it did and how long.
    fn end_phase(&self, current: &mut Option<(Phase, String, ProgressBar)>) {
        let Some((phase, message, bar)) = current.take() else { return };
        let took = bar.elapsed().as_secs_f64();
        let line = if phase == Phase::Copy {
            let rate = bar.position() as f64 / took.max(1e-3);
            format!(
                "[copy] {} rows in {took:.1} s ({} rows/s)",
                thousands(bar.position() as i64),
                thousands(rate as i64)
            )
        } else {
            format!("[{phase}] {message} ({took:.1} s)")
        };
        bar.finish_and_clear();
        let _ = self.bars.println(line);
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

impl Reporter for Bars {
    fn phase(&self, phase: Phase, message: &str) {
        let mut current = self.current();
        self.end_phase(&mut current);
        if phase == Phase::Swapped {
            return; // the summary follows
        }
        let bar = if phase == Phase::Copy {
            ProgressBar::new(0)
                .with_style(style("[copy] {wide_bar} {human_pos}/{human_len} rows, {per_sec}, {eta} left"))
        } else {
            ProgressBar::new_spinner()
                .with_style(style("[{prefix}] {spinner} {msg} ({elapsed})"))
                .with_prefix(phase.to_string())
                .with_message(message.to_owned())
        };
        let bar = self.bars.add(bar);
        if phase != Phase::Copy {
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
        }
        *current = Some((phase, message.to_owned(), bar));
    }

    fn progress(&self, phase: Phase, done: i64, total: i64, _rate: f64) {
        if let Some((_, _, bar)) = self.current().as_ref().filter(|c| c.0 == phase && phase == Phase::Copy) {
            bar.set_length(total.max(done).max(0) as u64);
            bar.set_position(done.max(0) as u64);
        }
    }

    fn note(&self, message: &str) {
        let _ = self.bars.println(format!("        {message}"));
    }

    fn close(&self) {
        let mut current = self.current();
        self.end_phase(&mut current);
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        self.close();
    }
}
