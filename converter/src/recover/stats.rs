//! What a recovery run reports about each stage: losses at the start and the end, tokens,
//! time and throughput. They go into `recovery.json`, the model card and the terminal, and
//! travel in checkpoints so a resumed run reports the whole run.

use serde::{Deserialize, Serialize};

/// One stage's record.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StageStats {
    /// `transfer`, `distill` or `lm`.
    pub stage: String,
    pub steps: usize,
    /// Steps planned.
    pub total_steps: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub lr: f64,
    /// Tokens the student was trained on (each transfer step counts its batch once).
    pub tokens: u64,
    pub seconds: f64,
    /// Loss of every step, in order (transfer: the mean over layers).
    pub losses: Vec<f32>,
    /// Transfer only: per layer, the MSE of its first and its last step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerStats>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LayerStats {
    pub layer: usize,
    pub first: f32,
    pub last: f32,
}

impl StageStats {
    /// Mean loss of the first `n` steps (n = a tenth of them, at least one).
    pub fn first_loss(&self) -> Option<f32> {
        let n = (self.losses.len() / 10).max(1);
        mean(self.losses.get(..n.min(self.losses.len()))?)
    }

    /// Mean loss of the last tenth of the steps.
    pub fn last_loss(&self) -> Option<f32> {
        let n = (self.losses.len() / 10).max(1);
        mean(self.losses.get(self.losses.len().saturating_sub(n)..)?)
    }

    pub fn tokens_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.tokens as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// One line for the terminal and the model card.
    pub fn summary(&self) -> String {
        let f = |x: Option<f32>| x.map_or("-".to_owned(), |v| format!("{v:.4}"));
        format!(
            "{}: {} steps x {} x {} tokens, lr {}, loss {} -> {}, {} tokens in {:.0} s ({:.0} tokens/s)",
            self.stage,
            self.steps,
            self.batch,
            self.seq_len,
            self.lr,
            f(self.first_loss()),
            f(self.last_loss()),
            self.tokens,
            self.seconds,
            self.tokens_per_second()
        )
    }
}

fn mean(v: &[f32]) -> Option<f32> {
    (!v.is_empty()).then(|| v.iter().sum::<f32>() / v.len() as f32)
}
