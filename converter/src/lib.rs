//! `liger-converter`: turns pretrained Transformers into linearized (Liger) checkpoints.
//!
//! The library does the work; the `liger-convert` binary only parses flags and prints. That
//! split keeps every step testable without a process boundary and lets other tools (the
//! server's model manager, recovery training) reuse the pieces.
//!
//! - [`source`]: what SRC is (folder, `.gguf`, hub id), downloading, reading it;
//! - [`tensors`]: the weights as a lazily read, cast-on-demand set;
//! - [`settings`]: Liger flags, validated, into the config's `liger` section;
//! - [`check`]: the config against the weights, through the runtime's own model builder;
//! - [`output`]: atomic output folders, safetensors writing and sharding;
//! - [`folder`]: the one way every command writes a model folder (config, weights, side
//!   files, records, card);
//! - [`card`]: the `README.md` model card;
//! - [`convert`], [`import`], [`inspect`]: the conversion commands;
//! - [`recover`]: recovery training (attention transfer, distillation, LM) by LoRA;
//! - [`eval`]: perplexity, agreement and KL against a reference on held-out text;
//! - [`adapter`]: merging a LoRA adapter into a model folder (`apply-adapter`);
//! - [`progress`]: progress bars.

pub mod adapter;
pub mod card;
pub mod check;
pub mod convert;
pub mod error;
pub mod eval;
pub mod folder;
pub mod import;
pub mod inspect;
pub mod output;
pub mod progress;
pub mod quantize;
pub mod recover;
pub mod settings;
pub mod source;
pub mod tensors;

pub use adapter::{apply_adapter, ApplyOptions, DeviceChoice};
pub use convert::{convert, ConvertOptions, Summary};
pub use error::{Error, Result};
pub use eval::{evaluate, EvalOptions, EvalReport};
pub use import::{import, ImportOptions};
pub use inspect::{inspect, Report};
pub use progress::Progress;
pub use quantize::{quantize, QuantizeOptions};
pub use recover::{
    recover, self_distill, RecoverOptions, RecoverSummary, SelfDistillOptions, SelfDistillSummary,
    StageChoice,
};
pub use settings::{FullAttention, LigerSettings};
