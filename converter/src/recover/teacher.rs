//! The teacher's side of distillation: its next-token distributions, kept as top-k.
//!
//! Distillation needs the teacher's distribution at every position of every batch. Storing
//! it whole costs `vocab` floats per token (49152 for SmolLM2: 200 KB); its `k` most likely
//! tokens plus the mass of the rest keep almost all of the information for `k`/`vocab` of
//! the memory, so every chunk's targets are computed once and reused in later epochs. The
//! transfer stage already runs the teacher over its batches, so it fills this cache for
//! the distillation that follows at the cost of the LM head alone.
//!
//! The teacher runs each chunk on its own, never batched with others, so its numbers do not
//! depend on which chunks happened to share a batch: a resumed run recomputes exactly what
//! the interrupted one had cached.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use liger_model::Model;

use crate::{Error, Result};

/// The teacher's top-k log-probabilities for the positions of one chunk.
#[derive(Debug, Clone)]
pub struct TopK {
    pub len: usize,
    pub k: usize,
    /// `[len * k]` token ids.
    pub ids: Vec<u32>,
    /// `[len * k]` log-probabilities.
    pub logp: Vec<f32>,
    /// `[len]` probability mass outside the top k.
    pub rest: Vec<f32>,
    /// `sum p log p` over the k + 1 buckets, per position (the KL's constant part).
    pub neg_entropy: Vec<f32>,
}

/// Rows of teacher logits made at once (64 x vocab floats).
const BLOCK_ROWS: usize = 64;

impl TopK {
    /// Appends the rows of `other` (same `k`).
    pub fn append(&mut self, other: TopK) {
        self.len += other.len;
        self.ids.extend(other.ids);
        self.logp.extend(other.logp);
        self.rest.extend(other.rest);
        self.neg_entropy.extend(other.neg_entropy);
    }
}

/// The final RMSNorm and LM head, applied to the residual stream (what
/// [`Model::layer_inputs`] returns last).
pub struct Head {
    pub norm: Tensor,
    pub eps: f64,
    /// `[vocab, hidden]`.
    pub weight: Tensor,
}

impl Head {
    pub fn of(model: &Model) -> Result<Self> {
        let mut weights: HashMap<String, Tensor> = model.named_weights()?.into_iter().collect();
        let norm = weights
            .remove("model.norm.weight")
            .ok_or_else(|| Error::Training("the teacher has no model.norm.weight".into()))?;
        let weight = weights
            .remove("lm_head.weight")
            .or_else(|| weights.remove("model.embed_tokens.weight"))
            .ok_or_else(|| Error::Training("the teacher has no LM head".into()))?;
        Ok(Self {
            norm,
            eps: model.config().rms_norm_eps,
            weight,
        })
    }

    /// Logits `[tokens, vocab]` (f32) of the residual `[tokens, hidden]`.
    pub fn logits(&self, residual: &Tensor) -> Result<Tensor> {
        let x = candle_nn::ops::rms_norm(&residual.contiguous()?, &self.norm, self.eps as f32)?;
        Ok(x.matmul(&self.weight.t()?)?.to_dtype(DType::F32)?)
    }
}

/// Top-k of each row of `logits` (`[rows, vocab]`, f32), as log-probabilities.
pub fn top_k(logits: &Tensor, k: usize) -> Result<TopK> {
    let rows: Vec<Vec<f32>> = logits.to_device(&Device::Cpu)?.to_vec2()?;
    let len = rows.len();
    let vocab = rows.first().map_or(0, Vec::len);
    let k = k.min(vocab).max(1);
    // Rows are independent; split them over the cores (the sort is O(vocab) per row).
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(len.max(1));
    let per = len.div_ceil(threads.max(1)).max(1);
    let parts: Vec<Vec<RowTop>> = std::thread::scope(|s| {
        let handles: Vec<_> = rows
            .chunks(per)
            .map(|block| s.spawn(move || block.iter().map(|r| row_top_k(r, k)).collect()))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("top-k worker"))
            .collect()
    });
    let mut out = TopK {
        len,
        k,
        ids: Vec::with_capacity(len * k),
        logp: Vec::with_capacity(len * k),
        rest: Vec::with_capacity(len),
        neg_entropy: Vec::with_capacity(len),
    };
    for (ids, logp, rest, ne) in parts.into_iter().flatten() {
        out.ids.extend(ids);
        out.logp.extend(logp);
        out.rest.push(rest);
        out.neg_entropy.push(ne);
    }
    Ok(out)
}

/// One row's top-k ids and log-probabilities, rest mass and `sum p log p`.
type RowTop = (Vec<u32>, Vec<f32>, f32, f32);

fn row_top_k(row: &[f32], k: usize) -> RowTop {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let log_z = max as f64 + sum.ln();
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    // Highest first; ties broken by id so the selection is fully determined.
    let cmp = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(cmp);
    let logp: Vec<f32> = idx
        .iter()
        .map(|&i| (row[i as usize] as f64 - log_z) as f32)
        .collect();
    let top: f64 = logp.iter().map(|&l| (l as f64).exp()).sum();
    let rest = (1.0 - top).max(0.0);
    let mut ne: f64 = logp.iter().map(|&l| (l as f64).exp() * l as f64).sum();
    if rest > 0.0 {
        ne += rest * rest.ln();
    }
    (idx, logp, rest as f32, ne as f32)
}

/// Per-chunk teacher targets, computed on first use.
pub struct TeacherCache {
    pub k: usize,
    map: HashMap<usize, TopK>,
    head: Head,
}

impl TeacherCache {
    pub fn new(teacher: &Model, k: usize) -> Result<Self> {
        Ok(Self {
            k,
            map: HashMap::new(),
            head: Head::of(teacher)?,
        })
    }

    pub fn contains(&self, chunk: usize) -> bool {
        self.map.contains_key(&chunk)
    }

    /// Stores chunk `chunk`'s targets from its final residual stream. The logits are made
    /// a block of rows at a time, so no vocabulary-wide buffer of the whole chunk exists.
    pub fn insert_from_residual(&mut self, chunk: usize, residual: &Tensor) -> Result<()> {
        if self.map.contains_key(&chunk) {
            return Ok(());
        }
        let rows = residual.dim(0)?;
        let mut all: Option<TopK> = None;
        for start in (0..rows).step_by(BLOCK_ROWS) {
            let n = BLOCK_ROWS.min(rows - start);
            let part = top_k(&self.head.logits(&residual.narrow(0, start, n)?)?, self.k)?;
            match &mut all {
                None => all = Some(part),
                Some(a) => a.append(part),
            }
        }
        if let Some(a) = all {
            self.map.insert(chunk, a);
        }
        Ok(())
    }

    /// Makes sure `chunk` (with `tokens`) is cached, running the teacher if needed.
    pub fn ensure(&mut self, teacher: &Model, chunk: usize, tokens: &[u32]) -> Result<()> {
        if !self.map.contains_key(&chunk) {
            let mut inputs = teacher.layer_inputs(&[tokens])?;
            let last = inputs
                .pop()
                .expect("layer_inputs returns the final residual");
            self.insert_from_residual(chunk, &last)?;
        }
        Ok(())
    }

    pub fn get(&self, chunk: usize) -> Option<&TopK> {
        self.map.get(&chunk)
    }

    /// Bytes held, for the log.
    pub fn bytes(&self) -> usize {
        self.map
            .values()
            .map(|t| t.ids.len() * 8 + t.rest.len() * 8)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_normalized_and_ordered() {
        let logits = Tensor::new(
            &[[1.0f32, 3.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
            &Device::Cpu,
        )
        .unwrap();
        let t = top_k(&logits, 2).unwrap();
        assert_eq!(&t.ids[..2], &[1, 2]);
        assert_eq!(&t.ids[2..], &[0, 1]); // ties broken by id
        let z: f64 = [1.0f64, 3.0, 2.0, 0.0].iter().map(|x| x.exp()).sum();
        assert!((t.logp[0] as f64 - (3.0 - z.ln())).abs() < 1e-5);
        let top: f32 = t.logp[..2].iter().map(|l| l.exp()).sum();
        assert!((top + t.rest[0] - 1.0).abs() < 1e-6);
        assert!((t.rest[1] - 0.5).abs() < 1e-6);
        // Uniform over 4 with k = 2 -> buckets 1/4, 1/4, 1/2.
        let want = 2.0 * 0.25 * 0.25f32.ln() + 0.5 * 0.5f32.ln();
        assert!((t.neg_entropy[1] - want).abs() < 1e-5);
    }
}
