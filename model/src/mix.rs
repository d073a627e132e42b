//! How a layer mixes tokens, as the fused decode step needs it: the attention layers
//! describe themselves with these ([`crate::attention`]'s `decode_view`) and the step
//! ([`crate::decode`]) follows the description, so neither module needs the other.

use crate::config::Variant;

/// The Liger recurrent branch's settings for one layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Recurrent {
    pub variant: Variant,
    pub gate_normalizer: f32,
}

/// How a layer mixes tokens, as the fused step needs it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Mix {
    /// Causal softmax attention over the layer's KV cache.
    Softmax,
    /// Liger: `window_weight * SWA + recurrent_weight * R` (R skipped when its weight is 0).
    Liger {
        recurrent: Recurrent,
        window_weight: f32,
        recurrent_weight: f32,
        /// The layer keeps a recurrent memory: for R, or only for the global cache's
        /// saliences when R's weight is 0.
        memory: bool,
        /// The layer keeps a global cache: the window branch also attends to its rows.
        global: bool,
        /// The global cache gives places by attention: the step measures the window-only
        /// attention share of each window row (the cache's, then the token's).
        attention_scores: bool,
        /// The global cache gives places by recall: the step measures the memory's recall
        /// error at the token's key.
        recall_scores: bool,
        /// The global cache's distance cap: its entries past it are stored un-rotated and
        /// scored with the query rotated by the cap alone.
        max_distance: Option<usize>,
    },
}

impl Mix {
    /// What the global cache's choice needs measured: (attention shares, recall score).
    pub(crate) fn scoring(&self) -> (bool, bool) {
        match *self {
            Mix::Liger {
                attention_scores,
                recall_scores,
                ..
            } => (attention_scores, recall_scores),
            Mix::Softmax => (false, false),
        }
    }
}
