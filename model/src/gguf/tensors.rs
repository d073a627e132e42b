//! llama GGUF tensors to Hugging Face tensors: names, shape checks, dequantization, and the
//! q/k row un-permutation.
//!
//! Names: llama.cpp renames `model.layers.N.self_attn.q_proj.weight` to `blk.N.attn_q.weight`
//! and so on; [`plan`] lists what a llama GGUF with the given dimensions must hold, under both
//! names, and rejects anything missing, extra, or of the wrong shape before any data is read.
//!
//! Shapes: GGUF lists dimensions innermost first (`[in, out]` for a linear weight); candle's
//! reader reverses them, so shapes arrive row-major and match Hugging Face's `[out, in]` as is.
//!
//! Permutation: Hugging Face rotates q/k with the "half split" RoPE (pairs `(i, i + d/2)`),
//! llama.cpp with adjacent pairs `(2i, 2i + 1)`. Its converter therefore interleaves the two
//! halves of each head's rows of `attn_q` (per query head) and `attn_k` (per KV head);
//! [`unpermute`] puts them back so the half-split RoPE is correct again.

use std::collections::BTreeSet;
use std::io::{Read, Seek};
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};

use super::hf_config::Dims;
use crate::{Error, Result};

/// The llama.cpp tensor holding Llama 3 rope divisors; it becomes `rope_scaling` in the config.
pub(crate) const ROPE_FREQS: &str = "rope_freqs.weight";

/// One tensor to import.
pub(crate) struct Planned {
    pub gguf: String,
    pub hf: String,
    pub shape: Vec<usize>,
    /// Head count for the q/k un-permutation, if this is `attn_q` or `attn_k`.
    pub heads: Option<usize>,
}

fn planned(gguf: String, hf: String, shape: Vec<usize>, heads: Option<usize>) -> Planned {
    Planned {
        gguf,
        hf,
        shape,
        heads,
    }
}

/// Everything a llama GGUF with these dimensions must (or, for `output.weight`, may) contain.
fn expected(d: &Dims, vocab: usize, untied: bool) -> Vec<Planned> {
    let (h, q, kv, f) = (
        d.hidden,
        d.n_head * d.head_dim,
        d.n_kv_head * d.head_dim,
        d.ffn,
    );
    let mut v = vec![
        planned(
            "token_embd.weight".into(),
            "model.embed_tokens.weight".into(),
            vec![vocab, h],
            None,
        ),
        planned(
            "output_norm.weight".into(),
            "model.norm.weight".into(),
            vec![h],
            None,
        ),
    ];
    if untied {
        v.push(planned(
            "output.weight".into(),
            "lm_head.weight".into(),
            vec![vocab, h],
            None,
        ));
    }
    for i in 0..d.n_layer {
        let parts: [(&str, &str, Vec<usize>, Option<usize>); 9] = [
            ("attn_norm", "input_layernorm", vec![h], None),
            ("ffn_norm", "post_attention_layernorm", vec![h], None),
            ("attn_q", "self_attn.q_proj", vec![q, h], Some(d.n_head)),
            ("attn_k", "self_attn.k_proj", vec![kv, h], Some(d.n_kv_head)),
            ("attn_v", "self_attn.v_proj", vec![kv, h], None),
            ("attn_output", "self_attn.o_proj", vec![h, q], None),
            ("ffn_gate", "mlp.gate_proj", vec![f, h], None),
            ("ffn_up", "mlp.up_proj", vec![f, h], None),
            ("ffn_down", "mlp.down_proj", vec![h, f], None),
        ];
        for (g, hf, shape, heads) in parts {
            v.push(planned(
                format!("blk.{i}.{g}.weight"),
                format!("model.layers.{i}.{hf}.weight"),
                shape,
                heads,
            ));
        }
    }
    v
}

/// Check the tensor directory against the dimensions and return what to import, sorted by
/// Hugging Face name, plus the vocabulary size (rows of the embedding matrix).
pub(crate) fn plan(content: &Content, d: &Dims) -> Result<(Vec<Planned>, usize)> {
    let infos = &content.tensor_infos;
    let embd = infos
        .get("token_embd.weight")
        .ok_or_else(|| Error::tensor("token_embd.weight", "missing from the GGUF file"))?;
    let vocab = match embd.shape.dims() {
        [rows, _] => *rows,
        other => {
            return Err(Error::tensor(
                "token_embd.weight",
                format!("shape {other:?} is not two-dimensional"),
            ))
        }
    };
    // Each layer has 9 tensors; checking first keeps a corrupt block_count from allocating.
    if d.n_layer.saturating_mul(9) > infos.len() {
        return Err(Error::tensor(
            format!("blk.{}.*", d.n_layer - 1),
            format!(
                "llama.block_count is {} but the file holds only {} tensors",
                d.n_layer,
                infos.len()
            ),
        ));
    }
    let mut plan = expected(d, vocab, infos.contains_key("output.weight"));
    let known: BTreeSet<&str> = plan.iter().map(|p| p.gguf.as_str()).collect();
    // Sorted so that the first offending name is reported deterministically.
    let names: BTreeSet<&String> = infos.keys().collect();
    if let Some(extra) = names
        .iter()
        .find(|n| !known.contains(n.as_str()) && n.as_str() != ROPE_FREQS)
    {
        return Err(Error::tensor(
            extra.as_str(),
            "unexpected in a llama GGUF (no Hugging Face LlamaForCausalLM equivalent; \
             attention biases, MoE experts and vision towers are not supported)",
        ));
    }
    for p in &plan {
        let info = infos.get(&p.gguf).ok_or_else(|| {
            Error::tensor(
                &p.gguf,
                format!("missing from the GGUF file (Hugging Face `{}`)", p.hf),
            )
        })?;
        if info.shape.dims() != p.shape.as_slice() {
            return Err(Error::tensor(
                &p.gguf,
                format!(
                    "shape {:?} does not match the metadata: expected {:?} for Hugging Face `{}`",
                    info.shape.dims(),
                    p.shape,
                    p.hf
                ),
            ));
        }
    }
    plan.sort_by(|a, b| a.hf.cmp(&b.hf));
    Ok((plan, vocab))
}

/// Check every tensor's data lies inside the file and is made of whole quantization blocks
/// per row, so that a truncated file fails with one clear message before any decoding.
pub(crate) fn check_data(content: &Content, path: &Path, file_len: u64) -> Result<()> {
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let info = &content.tensor_infos[name];
        let block = info.ggml_dtype.block_size();
        let row = info.shape.dims().last().copied().unwrap_or(1);
        if row % block != 0 {
            return Err(Error::tensor(
                name.as_str(),
                format!(
                    "rows of {row} values are not a whole number of {:?} blocks of {block}",
                    info.ggml_dtype
                ),
            ));
        }
        // Checked arithmetic: the dimensions come straight from the file and may be absurd.
        let bytes = info
            .shape
            .dims()
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            .and_then(|n| (n / block as u64).checked_mul(info.ggml_dtype.type_size() as u64));
        let Some(bytes) = bytes else {
            return Err(Error::tensor(
                name.as_str(),
                format!("corrupt shape {:?}", info.shape.dims()),
            ));
        };
        let end = content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|start| start.checked_add(bytes));
        if !matches!(end, Some(end) if end <= file_len) {
            return Err(Error::weights(
                path,
                format!(
                    "truncated file: tensor `{name}` needs {bytes} bytes at offset {} but the \
                     file ends at {file_len}",
                    content.tensor_data_offset.saturating_add(info.offset)
                ),
            ));
        }
    }
    Ok(())
}

/// Read one tensor and dequantize it to f32 on the CPU.
pub(crate) fn read_f32<R: Read + Seek>(
    content: &Content,
    reader: &mut R,
    name: &str,
) -> Result<Tensor> {
    let q = content
        .tensor(reader, name, &Device::Cpu)
        .map_err(|e| Error::tensor(name, format!("cannot read: {e}")))?;
    q.dequantize(&Device::Cpu)
        .map_err(|e| Error::tensor(name, format!("cannot dequantize {:?}: {e}", q.dtype())))
}

/// Undo llama.cpp's interleaving of the two RoPE halves of each head's rows (see module docs).
pub(crate) fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if heads == 0 || rows % (2 * heads) != 0 {
        return Err(Error::Invalid(format!(
            "cannot un-permute {rows} rows for {heads} heads: rows must be a multiple of 2 x heads"
        )));
    }
    Ok(w.reshape((heads, rows / heads / 2, 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?)
}

/// Read, dequantize and un-permute every planned tensor, in plan order.
pub(crate) fn load<R: Read + Seek>(
    content: &Content,
    reader: &mut R,
    plan: &[Planned],
) -> Result<Vec<(String, Tensor)>> {
    plan.iter()
        .map(|p| {
            let mut w = read_f32(content, reader, &p.gguf)?;
            if let Some(heads) = p.heads {
                w = unpermute(&w, heads).map_err(|e| Error::tensor(&p.gguf, e.to_string()))?;
            }
            Ok((p.hf.clone(), w))
        })
        .collect()
}
