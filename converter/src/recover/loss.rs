//! Training losses, built from candle ops that all have a backward pass.
//!
//! - attention transfer: mean squared error between attention outputs;
//! - distillation: KL(teacher || student) between next-token distributions, the teacher's
//!   kept as top-k plus one bucket for the rest of the vocabulary (see [`super::teacher`]).
//!   On those k + 1 buckets the KL is exact, and its gradient pulls the student's top-k
//!   probabilities to the teacher's and its remaining mass, as a whole, to the teacher's;
//! - language modelling: next-token cross-entropy over the positions marked to learn.

use candle_core::{DType, Device, Tensor, D};

use super::teacher::TopK;
use crate::Result;

/// `mean((a - b)^2)`.
pub fn mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a - b)?.sqr()?.mean_all()?)
}

/// Teacher targets of a batch, as tensors: `[rows, k]` ids and probabilities, `[rows]`
/// rest mass, and the constant `sum p log p` (summed over rows).
pub struct KlTargets {
    ids: Tensor,
    probs: Tensor,
    rest: Tensor,
    neg_entropy: f64,
    rows: usize,
}

impl KlTargets {
    /// Stacks the targets of the chunks of a batch, in batch order.
    pub fn new(parts: &[&TopK], device: &Device) -> Result<Self> {
        let k = parts.first().map_or(1, |p| p.k);
        let rows: usize = parts.iter().map(|p| p.len).sum();
        let mut ids = Vec::with_capacity(rows * k);
        let mut probs = Vec::with_capacity(rows * k);
        let mut rest = Vec::with_capacity(rows);
        let mut neg_entropy = 0f64;
        for p in parts {
            ids.extend_from_slice(&p.ids);
            probs.extend(p.logp.iter().map(|l| l.exp()));
            rest.extend_from_slice(&p.rest);
            neg_entropy += p.neg_entropy.iter().map(|&x| x as f64).sum::<f64>();
        }
        Ok(Self {
            ids: Tensor::from_vec(ids, (rows, k), device)?,
            probs: Tensor::from_vec(probs, (rows, k), device)?,
            rest: Tensor::from_vec(rest, rows, device)?,
            neg_entropy,
            rows,
        })
    }

    /// `sum p log p` averaged over rows: add it to the cross-entropy part to get the KL.
    pub fn mean_neg_entropy(&self) -> f64 {
        self.neg_entropy / self.rows.max(1) as f64
    }
}

/// Mean over rows of the cross-entropy part of KL(teacher || student),
/// `-sum_b P_b log Q_b` over the k + 1 buckets; `log_probs` is the student's
/// log-softmax, `[rows, vocab]`. Add [`KlTargets::mean_neg_entropy`] for the KL itself.
pub fn kl_cross_entropy(log_probs: &Tensor, t: &KlTargets) -> Result<Tensor> {
    let picked = log_probs.gather(&t.ids, 1)?; // [rows, k]
    let top = picked.exp()?.sum(D::Minus1)?; // the student's mass on the teacher's top k
                                             // Clamped: the student may put (numerically) everything on the top k.
    let log_rest = (1.0 - top)?.maximum(1e-12)?.log()?;
    let cross = ((&t.probs * &picked)?.sum(D::Minus1)? + (&t.rest * log_rest)?)?;
    Ok(cross.neg()?.mean_all()?)
}

/// Next-token targets of a batch: for row r (a position), the token that follows it and
/// the weight of that prediction (0 where nothing follows or it is not learned).
pub struct NextTokens {
    targets: Tensor,
    weights: Tensor,
    pub count: usize,
}

impl NextTokens {
    /// `chunks`: each chunk's tokens and learn flags, in batch order. `only_learned`: weigh
    /// only the positions whose next token is flagged (assistant turns); else all.
    pub fn new(chunks: &[(&[u32], &[bool])], only_learned: bool, device: &Device) -> Result<Self> {
        let mut targets = Vec::new();
        let mut weights = Vec::new();
        for (tokens, learn) in chunks {
            for t in 0..tokens.len() {
                let next = t + 1;
                let used = next < tokens.len() && (!only_learned || learn[next]);
                targets.push(if next < tokens.len() { tokens[next] } else { 0 });
                weights.push(if used { 1f32 } else { 0.0 });
            }
        }
        let count = weights.iter().filter(|&&w| w > 0.0).count();
        let n = targets.len();
        Ok(Self {
            targets: Tensor::from_vec(targets, (n, 1), device)?,
            weights: Tensor::from_vec(weights, n, device)?,
            count,
        })
    }
}

/// Mean negative log-likelihood of the weighted positions.
pub fn next_token_nll(log_probs: &Tensor, t: &NextTokens) -> Result<Tensor> {
    let picked = log_probs.gather(&t.targets, 1)?.squeeze(1)?; // [rows]
    let total = (picked * &t.weights)?.sum_all()?;
    Ok((total.neg()? / t.count.max(1) as f64)?.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recover::teacher::top_k;

    #[test]
    fn kl_of_the_full_vocabulary_matches_its_definition() {
        let dev = Device::Cpu;
        let t_logits =
            Tensor::new(&[[2.0f32, 1.0, 0.5, -1.0], [0.0, 3.0, 0.0, 1.0]], &dev).unwrap();
        let s_logits = Tensor::new(&[[1.0f32, 1.5, 0.0, 0.0], [0.5, 2.0, 0.0, 0.0]], &dev).unwrap();
        // k = vocab: the rest bucket is empty, so this is the plain KL.
        let tk = top_k(&t_logits, 4).unwrap();
        let targets = KlTargets::new(&[&tk], &dev).unwrap();
        let ls = candle_nn::ops::log_softmax(&s_logits, 1).unwrap();
        let got = kl_cross_entropy(&ls, &targets)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
            + targets.mean_neg_entropy();
        let lp = candle_nn::ops::log_softmax(&t_logits, 1).unwrap();
        let want = (lp.exp().unwrap() * (&lp - &ls).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
            / 2.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        // With k = 2 the coarse KL is smaller but non-negative, and zero for the teacher itself.
        let tk2 = top_k(&t_logits, 2).unwrap();
        let t2 = KlTargets::new(&[&tk2], &dev).unwrap();
        let coarse = kl_cross_entropy(&ls, &t2)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
            + t2.mean_neg_entropy();
        assert!(coarse >= -1e-6 && coarse <= want + 1e-6, "{coarse}");
        let self_kl = kl_cross_entropy(&lp, &t2)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
            + t2.mean_neg_entropy();
        assert!(self_kl.abs() < 1e-5, "{self_kl}");
    }

    #[test]
    fn nll_weighs_only_learned_positions() {
        let dev = Device::Cpu;
        let ls = candle_nn::ops::log_softmax(&Tensor::zeros((3, 5), DType::F32, &dev).unwrap(), 1)
            .unwrap();
        let toks = [1u32, 2, 3];
        let learn = [false, true, false];
        let t = NextTokens::new(&[(&toks, &learn)], true, &dev).unwrap();
        assert_eq!(t.count, 1);
        let v = next_token_nll(&ls, &t).unwrap().to_scalar::<f32>().unwrap();
        assert!((v - 5f32.ln()).abs() < 1e-6);
        assert_eq!(
            NextTokens::new(&[(&toks, &learn)], false, &dev)
                .unwrap()
                .count,
            2
        );
    }
}
