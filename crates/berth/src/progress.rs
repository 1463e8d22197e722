//! Progress of long commands (cache warm, backup, restore, verify, gc,
//! scrub, export, import) on stderr: on a terminal, one live bar with the
//! bytes done, the rate and the time so far (indicatif); elsewhere (a log,
//! CI, a pipe), plain lines, each a complete sentence a log search finds.

use std::io::IsTerminal as _;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Progress of `label`, over `total` bytes when known. `quiet` (JSON
    /// output) shows nothing.
    pub fn start(label: &str, total: Option<u64>, quiet: bool) -> Progress {
        if quiet || !std::io::stderr().is_terminal() {
            return Progress { bar: None };
        }
        let bar = match total {
            Some(total) => ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr()),
            None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
        };
        let template = if total.is_some() {
            "{spinner} {prefix} [{bar:30}] {bytes}/{total_bytes} ({binary_bytes_per_sec}, {elapsed}) {wide_msg}"
        } else {
            "{spinner} {prefix} {bytes} ({binary_bytes_per_sec}, {elapsed}) {wide_msg}"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(label.to_string());
        // Drawn at once, not at the first tick: a short job shows it too.
        bar.tick();
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress { bar: Some(bar) }
    }

    pub fn on_terminal(&self) -> bool {
        self.bar.is_some()
    }

    /// `done` bytes so far; `line` says the rest (a phase, counts). Off a
    /// terminal the line is printed as it is.
    pub fn update(&self, done: u64, line: impl FnOnce() -> String) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(done);
                bar.set_message(line());
            }
            None => eprintln!("{}", line()),
        }
    }

    /// Adds to the total (work found as it goes, such as a warm's images).
    pub fn add_total(&self, more: u64) {
        if let Some(bar) = &self.bar {
            bar.inc_length(more);
        }
    }

    /// Adds to the bytes done.
    pub fn advance(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    /// A line of the command's output (stdout), printed past the bar.
    pub fn say(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }

    /// Clears the bar; the command's summary follows.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
