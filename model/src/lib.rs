//! `liger-model`: the runtime for linearized ("Liger") LLMs.
//!
//! Liger (Lan et al., "Liger: Linearizing Large Language Models to Gated Recurrent
//! Structures", ICML 2025, arXiv:2503.01496) turns a pretrained Transformer into a
//! gated recurrent model without new parameters: the key projection doubles as the
//! gate, and each layer mixes gated linear attention with sliding-window attention.
//!
//! Layering, bottom up (each module uses only those above it in this list; no module
//! imports one that imports it back):
//! - `uninit` (private): vectors written once, whole, allocated without a zero fill;
//! - [`config`]: Hugging Face `config.json` plus the `liger` section, validated;
//! - [`files`]: a model folder's file names and the safetensors check;
//! - [`layers`]: RMSNorm, RoPE, SwiGLU, linear projections (dense, quantized, with LoRA),
//!   the block's projection names, and the quantized tensors a checkpoint hands them;
//! - [`gla`]: the gated recurrent branch in naive, chunked and recurrent form;
//! - [`global`]: the bounded cache of salient older tokens the window branch may also see;
//! - [`state`]: per-sequence state, kept outside the model, its slot pool, and a batch
//!   entry ([`SeqStep`]);
//! - `mix` (private): how a layer mixes tokens, as the fused decode step needs it;
//! - [`attention`]: softmax attention (full or windowed) and the Liger hybrid;
//! - `decode` (private): the fused CPU decode step, driven by the layers' `mix`;
//! - [`cache`]: snapshots of states keyed by consumed tokens (resume, not re-read);
//! - [`lora`]: adapter settings and PEFT files;
//! - [`model`]: the causal LM and its batched forward;
//! - [`weights`]: the safetensors side of a folder, dense and block-quantized;
//! - [`gguf`]: reading llama-architecture GGUF files into Hugging Face form;
//! - [`hub`]: downloading hub models into the Hugging Face cache;
//! - [`chat`]: the chat template of a model folder, one renderer for serving, training
//!   and evaluation;
//! - [`text`]: a folder's tokenizer, template, special tokens and stop ids, read once;
//! - [`checkpoint`]: a model on disk (folder, hub id, GGUF), opened and loaded one way
//!   for every front end.

pub mod attention;
pub mod cache;
pub mod chat;
pub mod checkpoint;
pub mod config;
mod decode;
pub mod device;
pub mod error;
pub mod files;
pub mod gguf;
pub mod gla;
pub mod global;
pub mod hub;
pub mod hugepages;
pub mod layers;
pub mod lora;
mod mix;
pub mod model;
pub mod rng;
pub mod state;
pub mod testing;
pub mod text;
pub mod threads;
mod uninit;
pub mod weights;

pub use config::{Architecture, LayerKind, LigerConfig, ModelConfig, Variant};
pub use error::{Error, Result};
pub use model::{Logits, Model, RuntimeOptions, FUSED_SPAN_TOKENS, FUSED_STEP_TOKENS};
pub use state::{Backup, SeqStep, SequenceState, Slot, StateBytes, StatePool, StateSpec};
