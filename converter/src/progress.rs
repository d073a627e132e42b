//! Progress reporting on stderr (indicatif).
//!
//! Conversions of real models take minutes (downloads, casting gigabytes), so each stage
//! shows a bar. The library takes a [`Progress`] rather than printing itself so that tests,
//! `--quiet` and other front ends can turn it off. indicatif already hides bars when stderr
//! is not a terminal, so logs and CI output stay clean.

use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A factory for progress bars; a disabled one hands out hidden bars.
#[derive(Clone)]
pub struct Progress {
    multi: Option<MultiProgress>,
}

impl Progress {
    /// Bars on stderr when `enabled` (and stderr is a terminal).
    pub fn new(enabled: bool) -> Self {
        Self {
            multi: enabled.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
        }
    }

    /// No output at all.
    pub fn hidden() -> Self {
        Self { multi: None }
    }

    fn add(&self, bar: ProgressBar) -> ProgressBar {
        match &self.multi {
            Some(m) => m.add(bar),
            None => ProgressBar::hidden(),
        }
    }

    /// A bar counting bytes (downloads, writing weights).
    pub fn bytes(&self, total: u64, message: impl Into<String>) -> ProgressBar {
        let bar = self.add(ProgressBar::new(total));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>9.bold} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>11} {eta:>4} {wide_msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(message.into());
        bar
    }

    /// A bar counting items (files, tensors).
    pub fn items(&self, total: u64, message: impl Into<String>) -> ProgressBar {
        let bar = self.add(ProgressBar::new(total));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>9.bold} [{bar:30}] {pos:>5}/{len:<5} {wide_msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(message.into());
        bar
    }

    /// Whether bars are shown at all (not `--quiet`).
    pub fn is_enabled(&self) -> bool {
        self.multi.is_some()
    }

    /// Prints a line above the bars (plain stderr when stderr is not a terminal).
    pub fn println(&self, line: &str) {
        if let Some(m) = &self.multi {
            if m.is_hidden() {
                eprintln!("{line}");
            } else {
                let _ = m.println(line);
            }
        }
    }

    /// A bar counting training steps, with loss and throughput in its message and an ETA.
    pub fn train(&self, total: u64, message: impl Into<String>) -> ProgressBar {
        let bar = self.add(ProgressBar::new(total));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>9.bold} [{bar:30}] {pos:>5}/{len:<5} {elapsed_precise} eta {eta_precise} {wide_msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(message.into());
        bar
    }

    /// A spinner for a step whose length is unknown (GGUF dequantization).
    pub fn spinner(&self, message: impl Into<String>) -> ProgressBar {
        let bar = self.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("{prefix:>9.bold} {spinner} {elapsed} {wide_msg}")
                .expect("valid template"),
        );
        bar.set_prefix(message.into());
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    }
}
