//! `liger-model`: the runtime for linearized ("Liger") LLMs.
//!
//! Liger (Lan et al., "Liger: Linearizing Large Language Models to Gated Recurrent
//! Structures", ICML 2025, arXiv:2503.01496) turns a pretrained Transformer into a
//! gated recurrent model without new parameters: the key projection doubles as the
//! gate, and each layer mixes gated linear attention with sliding-window attention.
//!
//! Layering, bottom up:
//! - [`config`]: Hugging Face `config.json` plus the `liger` section, validated;
//! - [`layers`]: RMSNorm, RoPE, SwiGLU, linear projections;
//! - [`gla`]: the gated recurrent branch in naive, chunked and recurrent form;
//! - [`attention`]: softmax attention (full or windowed) and the Liger hybrid, whose
//!   window branch may also see a bounded [`global`] cache of salient older tokens;
//! - [`state`]: per-sequence state, kept outside the model, and its slot pool;
//! - [`cache`]: snapshots of states keyed by consumed tokens (resume, not re-read);
//! - [`model`]: the causal LM, its batched forward, and LoRA adapters ([`lora`]); its
//!   decode steps run fused on the CPU (`decode`, private);
//! - [`weights`]: loading Hugging Face folders (safetensors, single or sharded);
//! - [`gguf`]: reading llama-architecture GGUF files into Hugging Face form;
//! - [`hub`]: downloading hub models into the Hugging Face cache;
//! - [`chat`]: the chat template of a model folder, one renderer for serving, training
//!   and evaluation.

pub mod attention;
pub mod cache;
pub mod chat;
pub mod config;
mod decode;
pub mod device;
pub mod error;
pub mod gguf;
pub mod gla;
pub mod global;
pub mod hub;
pub mod layers;
pub mod lora;
pub mod model;
pub mod rng;
pub mod state;
pub mod testing;
pub mod threads;
pub mod weights;

pub use config::{Architecture, LayerKind, LigerConfig, ModelConfig, Variant};
pub use error::{Error, Result};
pub use model::{Logits, Model, RuntimeOptions, SeqStep};
pub use state::{SequenceState, Slot, StateBytes, StatePool, StateSpec};
