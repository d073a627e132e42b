//! The LM head and the token-level losses fused into one op, for end-to-end training on CPU.
//!
//! Through candle's autograd, the head of a 2 x 256-token step of SmolLM2 costs far more
//! than its matmul: the logits (`[512, 49152]`, 100 MB) and every intermediate of
//! log-softmax and its backward are fresh 100 MB buffers (page faults on each), and the
//! matmul backward also computes the gradient of the frozen `[49152, 576]` embedding (a
//! wasted 29 GFLOP). This op takes the final hidden states and, block by block of rows,
//! computes the logits, the loss and the loss's gradient with respect to the hidden states
//! directly (`dL/dh = (dL/dz) W`), keeping only a block of logits alive. Its backward just
//! hands that gradient on.
//!
//! The loss is `kl_scale * sum_rows cross-entropy part of KL(teacher || student)` (teacher
//! as top-k + rest, see [`super::loss`]) `+ ce_scale * sum_rows w_r * NLL(next token)`; the
//! gradient with respect to a logit `z_j` of a row is
//!
//! ```text
//! KL part: q_j - P_j                  (j among the teacher's top k)
//!          q_j - R q_j / Q_rest       (j outside: the rest bucket's share)
//! CE part: w (q_j - [j = next])
//! ```
//!
//! with `q` the student's softmax, `P` the teacher's top-k probabilities, `R` their rest
//! mass and `Q_rest` the student's. Unit tests hold value and gradient to the composite ops.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};

use super::teacher::TopK;
use crate::Result;

/// Rows of logits computed at once (64 x 49152 floats = 12.6 MB: reused heap memory).
const BLOCK: usize = 64;

/// What each row (position) of a batch is trained towards.
#[derive(Debug, Clone, Default)]
pub struct RowTargets {
    /// Teacher top-k per row (distillation); `k` ids, probabilities, rest mass.
    pub k: usize,
    pub ids: Vec<u32>,
    pub probs: Vec<f32>,
    pub rest: Vec<f32>,
    /// Weight of the KL term per row, summed (usually 1 / rows).
    pub kl_scale: f64,
    /// Next token and whether it is learned, per row.
    pub next: Vec<u32>,
    pub learn: Vec<bool>,
    /// Weight of the NLL term per learned row (usually ce_weight / learned rows).
    pub ce_scale: f64,
}

impl RowTargets {
    /// Targets for `chunks` (tokens, learn flags) in batch order; `topk` their teacher
    /// targets when distilling. `only_learned`: NLL only where the next token is flagged.
    pub fn new(
        chunks: &[(&[u32], &[bool])],
        topk: Option<&[&TopK]>,
        ce_weight: f64,
        only_learned: bool,
    ) -> Self {
        let mut t = RowTargets::default();
        for (tokens, learn) in chunks {
            for i in 0..tokens.len() {
                let has_next = i + 1 < tokens.len();
                t.next.push(if has_next { tokens[i + 1] } else { 0 });
                t.learn.push(has_next && (!only_learned || learn[i + 1]));
            }
        }
        let rows = t.next.len();
        let learned = t.learn.iter().filter(|&&l| l).count();
        t.ce_scale = if learned > 0 {
            ce_weight / learned as f64
        } else {
            0.0
        };
        if let Some(parts) = topk {
            t.k = parts.first().map_or(0, |p| p.k);
            for p in parts {
                t.ids.extend_from_slice(&p.ids);
                t.probs.extend(p.logp.iter().map(|l| l.exp()));
                t.rest.extend_from_slice(&p.rest);
            }
            t.kl_scale = 1.0 / rows.max(1) as f64;
        }
        t
    }

    pub fn rows(&self) -> usize {
        self.next.len()
    }

    /// The targets of `rows` alone (in that order), with the whole batch's scales: the
    /// losses of a partition of the rows add up to the loss of all of them.
    pub fn select(&self, rows: &[usize]) -> Self {
        let k = self.k;
        let pick_k = |v: &[f32]| -> Vec<f32> {
            if k == 0 {
                return Vec::new();
            }
            rows.iter()
                .flat_map(|&r| v[r * k..(r + 1) * k].iter().copied())
                .collect()
        };
        Self {
            k,
            ids: if k == 0 {
                Vec::new()
            } else {
                rows.iter()
                    .flat_map(|&r| self.ids[r * k..(r + 1) * k].iter().copied())
                    .collect()
            },
            probs: pick_k(&self.probs),
            rest: if k == 0 {
                Vec::new()
            } else {
                rows.iter().map(|&r| self.rest[r]).collect()
            },
            kl_scale: self.kl_scale,
            next: rows.iter().map(|&r| self.next[r]).collect(),
            learn: rows.iter().map(|&r| self.learn[r]).collect(),
            ce_scale: self.ce_scale,
        }
    }

    pub fn learned(&self) -> usize {
        self.learn.iter().filter(|&&l| l).count()
    }
}

/// The parts of the loss of the last forward.
#[derive(Debug, Clone, Copy, Default)]
pub struct LossParts {
    /// `sum_rows cross-entropy part of the KL`, times `kl_scale`.
    pub kl_cross: f64,
    /// `sum_rows w NLL`, divided by the learned rows (not times ce_weight).
    pub nll: f64,
}

/// The fused op; apply it to the final normed hidden states `[rows, hidden]` (f32, CPU).
pub struct FusedHeadLoss {
    /// `[vocab, hidden]`, f32 on the CPU.
    weight: Tensor,
    targets: RowTargets,
    grad: Mutex<Option<Tensor>>,
    parts: Arc<Mutex<LossParts>>,
}

impl FusedHeadLoss {
    pub fn new(weight: Tensor, targets: RowTargets) -> Self {
        Self {
            weight,
            targets,
            grad: Mutex::new(None),
            parts: Arc::new(Mutex::new(LossParts::default())),
        }
    }

    /// Where the forward leaves the loss's parts (readable after the op was moved into
    /// the graph).
    pub fn parts_handle(&self) -> Arc<Mutex<LossParts>> {
        self.parts.clone()
    }

    /// Loss and `dL/dh` for hidden states `h` (`[rows, hidden]`).
    fn compute(&self, h: &Tensor) -> Result<(f64, LossParts, Tensor)> {
        let t = &self.targets;
        let rows = h.dim(0)?;
        let vocab = self.weight.dim(0)?;
        let wt = self.weight.t()?;
        let mut grads = Vec::with_capacity(rows.div_ceil(BLOCK));
        let (mut kl_cross, mut nll_sum) = (0f64, 0f64);
        for start in (0..rows).step_by(BLOCK) {
            let n = BLOCK.min(rows - start);
            let mut z = h
                .narrow(0, start, n)?
                .matmul(&wt)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            // Rows are independent: split them over the cores.
            let threads = std::thread::available_parallelism()
                .map_or(1, |c| c.get())
                .min(n);
            let per = n.div_ceil(threads);
            let sums: Vec<(f64, f64)> = std::thread::scope(|s| {
                z.chunks_mut(per * vocab)
                    .enumerate()
                    .map(|(j, block)| {
                        s.spawn(move || {
                            let mut acc = (0f64, 0f64);
                            for (i, row) in block.chunks_mut(vocab).enumerate() {
                                let r = start + j * per + i;
                                let (c, l) = row_loss_and_grad(row, r, t);
                                acc.0 += c;
                                acc.1 += l;
                            }
                            acc
                        })
                    })
                    .collect::<Vec<_>>()
                    .into_iter()
                    .map(|h| h.join().expect("loss worker"))
                    .collect()
            });
            for (c, l) in sums {
                kl_cross += c;
                nll_sum += l;
            }
            let g = Tensor::from_vec(z, (n, vocab), &Device::Cpu)?;
            grads.push(g.matmul(&self.weight)?);
        }
        let learned = t.learned().max(1) as f64;
        let parts = LossParts {
            kl_cross: kl_cross * t.kl_scale,
            nll: nll_sum / learned,
        };
        let loss = parts.kl_cross + nll_sum * t.ce_scale;
        Ok((loss, parts, Tensor::cat(&grads, 0)?))
    }
}

/// Overwrites `z` (one row of logits) with `dL/dz` and returns the row's unscaled KL
/// cross-entropy part and NLL (0 where unused).
fn row_loss_and_grad(z: &mut [f32], r: usize, t: &RowTargets) -> (f64, f64) {
    let top = (t.k > 0).then(|| {
        (
            &t.ids[r * t.k..(r + 1) * t.k],
            &t.probs[r * t.k..(r + 1) * t.k],
            t.rest[r] as f64,
        )
    });
    let learn = t.learn[r];
    let next = t.next[r] as usize;
    // The logits the loss reads, before `z` is overwritten.
    let top_logits: Vec<f32> = top.map_or(Vec::new(), |(ids, _, _)| {
        ids.iter().map(|&i| z[i as usize]).collect()
    });
    let next_logit = z[next];
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for x in z.iter_mut() {
        let e = (*x - max).exp();
        *x = e;
        sum += e as f64;
    }
    let log_z = max as f64 + sum.ln();
    let (mut cross, mut nll) = (0f64, 0f64);
    let w = if learn { t.ce_scale } else { 0.0 };
    let kl = t.kl_scale;
    let mut top_q = Vec::with_capacity(top_logits.len());
    let mut base = w;
    if let Some((_, probs, rest)) = top {
        let mut q_top = 0f64;
        for (&l, &p) in top_logits.iter().zip(probs) {
            let logq = l as f64 - log_z;
            cross -= p as f64 * logq;
            let q = logq.exp();
            q_top += q;
            top_q.push(q);
        }
        let q_rest = (1.0 - q_top).max(1e-12);
        cross -= rest * q_rest.ln();
        base += kl * (1.0 - rest / q_rest);
    }
    if learn {
        nll = log_z - next_logit as f64;
    }
    // Gradient: every logit first as if outside the top k, then the top k and the next
    // token fixed up.
    let scale = base / sum;
    for x in z.iter_mut() {
        *x = (*x as f64 * scale) as f32;
    }
    if let Some((ids, probs, _)) = top {
        for ((&i, &p), &q) in ids.iter().zip(probs).zip(&top_q) {
            z[i as usize] = (kl * (q - p as f64) + w * q) as f32;
        }
    }
    if learn {
        z[next] -= w as f32;
    }
    (cross, nll)
}

impl CustomOp1 for FusedHeadLoss {
    fn name(&self) -> &'static str {
        "fused-head-loss"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("fused-head-loss: f32 hidden states expected")
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("fused-head-loss: contiguous hidden states expected")
        };
        let h = Tensor::from_slice(&data[a..b], l.shape(), &Device::Cpu)?;
        let (loss, parts, grad) = self
            .compute(&h)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        *self.grad.lock().unwrap_or_else(|p| p.into_inner()) = Some(grad);
        *self.parts.lock().unwrap_or_else(|p| p.into_inner()) = parts;
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        _h: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = self
            .grad
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| {
                candle_core::Error::Msg("fused-head-loss: backward before forward".into())
            })?;
        let scale = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        Ok(Some((g * scale as f64)?))
    }
}

/// `x / sqrt(mean(x^2) + eps) * w` from ops with a backward pass.
pub fn rms_norm_differentiable(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
    Ok(x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recover::loss::{self, KlTargets, NextTokens};
    use crate::recover::teacher::top_k;
    use candle_core::{DType, Var, D};
    use liger_model::testing::{max_abs_diff, SplitMix};

    fn randn(rng: &mut SplitMix, shape: (usize, usize), scale: f32) -> Tensor {
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| scale * rng.normal())
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The fused op against the composite ops: same loss, same gradient.
    #[test]
    fn matches_the_composite_loss_and_gradient() {
        let mut rng = SplitMix(3);
        let (rows, hidden, vocab, k) = (70, 8, 50, 6); // rows cross a block boundary
        let w = randn(&mut rng, (vocab, hidden), 1.0);
        let teacher = randn(&mut rng, (rows, vocab), 2.0);
        let tk = top_k(&teacher, k).unwrap();
        let tokens: Vec<u32> = rng.tokens(rows, vocab);
        let learn: Vec<bool> = (0..rows).map(|i| i % 3 != 0).collect();
        for (distill, ce_weight, only_learned) in
            [(true, 0.0, false), (true, 0.5, false), (false, 1.0, true)]
        {
            let h = Var::from_tensor(&randn(&mut rng, (rows, hidden), 1.0)).unwrap();
            let chunks = [(tokens.as_slice(), learn.as_slice())];
            let parts = [&tk];
            let targets = RowTargets::new(
                &chunks,
                distill.then_some(&parts[..]),
                ce_weight,
                only_learned,
            );
            let op_loss = h
                .as_tensor()
                .apply_op1(FusedHeadLoss::new(w.clone(), targets))
                .unwrap();
            let g_fused = op_loss.backward().unwrap().get(&h).unwrap().clone();

            let logits = h.as_tensor().matmul(&w.t().unwrap()).unwrap();
            let ls = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
            let next = NextTokens::new(&chunks, only_learned, &Device::Cpu).unwrap();
            let mut composite = (loss::next_token_nll(&ls, &next).unwrap() * ce_weight).unwrap();
            if distill {
                let kt = KlTargets::new(&parts, &Device::Cpu).unwrap();
                composite = (composite + loss::kl_cross_entropy(&ls, &kt).unwrap()).unwrap();
            }
            let g_comp = composite.backward().unwrap().get(&h).unwrap().clone();
            let (a, b) = (
                op_loss.to_scalar::<f32>().unwrap(),
                composite
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
            );
            assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "loss {a} vs {b}");
            let diff = max_abs_diff(&g_fused, &g_comp);
            let scale = liger_model::testing::max_abs(&g_comp);
            assert!(
                diff < 1e-4 * (1.0 + scale),
                "gradient differs by {diff} (scale {scale})"
            );
        }
    }
}
