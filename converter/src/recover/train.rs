//! The training loops of the three stages, their checkpoints, and their progress display.
//!
//! One [`Trainer`] owns the teacher, the student with its LoRA variables, the data and the
//! teacher cache, and runs the planned stages in order. A stage is a loop of optimizer
//! steps; every step is a pure function of (weights, optimizer state, step index), which is
//! what makes a resumed run land on the same bits as an uninterrupted one.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{Tensor, Var, D};
use liger_model::{Logits, Model, SeqStep};
use serde_json::Value;

use super::checkpoint::{Checkpoints, Meta, Restored};
use super::data::{Chunk, Schedule};
use super::head::{rms_norm_differentiable, FusedHeadLoss, LossParts, RowTargets};
use super::loss::{self, KlTargets, NextTokens};
use super::optim::{self, AdamW, AdamWConfig};
use super::stats::{LayerStats, StageStats};
use super::teacher::{Head, TeacherCache, TopK};
use super::{liger_layers, Log, RecoverOptions, Stage, StagePlan, PLAIN_EVERY};
use crate::progress::Progress;
use crate::{Error, Result};

/// What a [`Trainer`] is built from.
pub struct TrainerParts<'a> {
    pub opts: &'a RecoverOptions,
    pub plans: Vec<StagePlan>,
    pub settings: Value,
    pub teacher: Model,
    pub student: Model,
    pub vars: Vec<(String, Var)>,
    pub chunks: Vec<Chunk>,
    pub ckpt: Checkpoints,
    pub progress: Progress,
    pub log: Log,
}

pub struct Trainer<'a> {
    p: TrainerParts<'a>,
    /// Next stage to run and the step to start it at.
    stage_index: usize,
    start_step: usize,
    /// Optimizer state to resume the current stage with.
    pending_optimizer: Option<(HashMap<String, Tensor>, u64)>,
    stats: Vec<StageStats>,
    cache: Option<TeacherCache>,
    /// The student's final norm and LM head (frozen), for the fused loss.
    student_head: Head,
    /// Teacher activations of the transfer set, by chunk (when it is bounded).
    transfer_acts: HashMap<usize, ChunkActs>,
    /// Optimizer steps taken by this process (for the stop hook).
    steps_here: usize,
    elapsed_before: f64,
    started: Instant,
}

/// The teacher's activations for one chunk, per Liger layer: its input residual stream and
/// its attention output (the transfer target).
#[derive(Clone, Default)]
struct ChunkActs {
    inputs: Vec<Tensor>,
    targets: Vec<Tensor>,
}

/// One step's result.
struct StepOut {
    loss: f32,
    tokens: u64,
    layers: Vec<(usize, f32)>,
}

impl<'a> Trainer<'a> {
    pub fn new(p: TrainerParts<'a>) -> Result<Self> {
        let needs_cache = p.plans.iter().any(|pl| pl.stage == Stage::Distill);
        let cache = if needs_cache {
            Some(TeacherCache::new(&p.teacher, p.opts.top_k)?)
        } else {
            None
        };
        let student_head = Head::of(&p.student)?;
        Ok(Self {
            p,
            stage_index: 0,
            start_step: 0,
            pending_optimizer: None,
            stats: Vec::new(),
            cache,
            student_head,
            transfer_acts: HashMap::new(),
            steps_here: 0,
            elapsed_before: 0.0,
            started: Instant::now(),
        })
    }

    pub fn ckpt_dir(&self) -> &std::path::Path {
        &self.p.ckpt.dir
    }

    /// Continues from a checkpoint: adapter weights, optimizer state, stage and step.
    pub fn restore(&mut self, r: Restored) -> Result<()> {
        for (name, var) in &self.p.vars {
            let t = r.adapter.get(name).ok_or_else(|| {
                Error::checkpoint(&self.p.ckpt.dir, format!("lacks adapter tensor `{name}`"))
            })?;
            if t.dims() != var.dims() {
                return Err(Error::checkpoint(
                    &self.p.ckpt.dir,
                    format!("adapter tensor `{name}` has the wrong shape"),
                ));
            }
            var.set(&t.to_device(var.device())?)?;
        }
        self.stage_index = r.meta.stage_index;
        self.start_step = r.meta.step;
        self.pending_optimizer = match (r.optimizer, r.meta.step) {
            (_, 0) => None,
            (Some(o), _) => Some((o, r.meta.optimizer_step)),
            (None, _) => {
                return Err(Error::checkpoint(
                    &self.p.ckpt.dir,
                    "is in the middle of a stage but has no optimizer state",
                ))
            }
        };
        self.stats = r.meta.stats;
        self.elapsed_before = r.meta.elapsed_s;
        Ok(())
    }

    /// Runs the remaining stages.
    pub fn run(&mut self) -> Result<()> {
        while self.stage_index < self.p.plans.len() {
            let plan = self.p.plans[self.stage_index];
            self.run_stage(plan)?;
            self.stage_index += 1;
            self.start_step = 0;
            // A boundary checkpoint: the next stage starts from here with a fresh optimizer.
            self.save(0, None)?;
            if self.p.opts.stop_after == Some(self.steps_here)
                && self.stage_index < self.p.plans.len()
            {
                return Err(self.stopped());
            }
        }
        Ok(())
    }

    /// The trained student, the stats, the checkpoint folder and the time spent before
    /// this process (for resumed runs).
    pub fn finish(self) -> (Model, Vec<StageStats>, Checkpoints, f64) {
        (self.p.student, self.stats, self.p.ckpt, self.elapsed_before)
    }

    fn stopped(&self) -> Error {
        Error::Training(format!(
            "stopped after {} steps as asked (--stop-after); continue with --resume",
            self.steps_here
        ))
    }

    fn elapsed(&self) -> f64 {
        self.elapsed_before + self.started.elapsed().as_secs_f64()
    }

    fn save(&self, step: usize, opt: Option<&AdamW>) -> Result<()> {
        let meta = Meta {
            format: 1,
            settings: self.p.settings.clone(),
            stage_index: self.stage_index,
            step,
            optimizer_step: opt.map_or(0, AdamW::step_count),
            rng: self.p.opts.seed,
            stats: self.stats.clone(),
            elapsed_s: self.elapsed(),
        };
        let adapter: Vec<(String, Tensor)> = self
            .p
            .vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let state = opt.map(AdamW::state_tensors);
        self.p.ckpt.save(&meta, &adapter, state.as_deref())
    }

    fn run_stage(&mut self, plan: StagePlan) -> Result<()> {
        let opts = self.p.opts;
        let mut opt = AdamW::new(
            &self.p.vars,
            AdamWConfig {
                weight_decay: opts.weight_decay,
                ..AdamWConfig::default()
            },
        )?;
        if let Some((state, step)) = self.pending_optimizer.take() {
            opt.load_state(&state, step)?;
        }
        if self.stats.len() <= self.stage_index {
            self.stats.push(StageStats {
                stage: plan.stage.name().to_owned(),
                total_steps: plan.steps,
                batch: plan.batch,
                seq_len: opts.seq_len,
                lr: plan.lr,
                ..StageStats::default()
            });
        }
        // Every stage walks the chunks in the same seeded order, so distillation after
        // transfer first sees the chunks whose teacher targets transfer already cached.
        let n = self.p.chunks.len();
        let mut schedule = Schedule::new(n, self.p.opts.seed);
        // Transfer trains on a bounded set (the first chunks of that order) whose teacher
        // activations are kept, so later epochs cost only the student's layers.
        let subset: Option<Vec<usize>> = match (plan.stage, self.p.opts.transfer_chunks) {
            (Stage::Transfer, k) if k > 0 && k < n => Some(schedule.batch(0, k)),
            _ => None,
        };
        let mut sub_schedule = subset
            .as_ref()
            .map(|s| Schedule::new(s.len(), self.p.opts.seed ^ 0x7472_616e_7366_6572));
        let warmup = (plan.steps / 20).clamp(1, 50);
        let bar = self.p.progress.train(plan.steps as u64, plan.stage.name());
        bar.set_position(self.start_step as u64);
        let layers = liger_layers(&self.p.student);
        let groups = self.transfer_groups(&layers);
        let fill_cache = plan.stage == Stage::Transfer
            && self.p.plans[self.stage_index + 1..]
                .iter()
                .any(|p| p.stage == Stage::Distill);
        let t0 = Instant::now();
        let (mut tokens_here, mut last_plain) = (0u64, Instant::now());
        let mut ema: Option<f32> = None;
        for step in self.start_step..plan.steps {
            let lr = optim::lr_at(plan.lr, step, plan.steps, warmup, 0.1);
            let batch = match (&subset, &mut sub_schedule) {
                (Some(sub), Some(sched)) => sched
                    .batch(step, plan.batch)
                    .into_iter()
                    .map(|i| sub[i])
                    .collect(),
                _ => schedule.batch(step, plan.batch),
            };
            let step_t = Instant::now();
            let out = match plan.stage {
                Stage::Transfer => self.transfer_step(&batch, &groups, &mut opt, lr, fill_cache)?,
                Stage::Distill | Stage::Lm => self.e2e_step(plan.stage, &batch, &mut opt, lr)?,
            };
            if !out.loss.is_finite() {
                return Err(Error::Training(format!(
                    "the {} loss became {} at step {}; lower --lr",
                    plan.stage.name(),
                    out.loss,
                    step + 1
                )));
            }
            let secs = step_t.elapsed().as_secs_f64();
            tokens_here += out.tokens;
            {
                let st = &mut self.stats[self.stage_index];
                st.steps = step + 1;
                st.tokens += out.tokens;
                st.seconds += secs;
                st.losses.push(out.loss);
                for (l, v) in out.layers {
                    match st.layers.iter_mut().find(|x| x.layer == l) {
                        Some(x) => x.last = v,
                        None => st.layers.push(LayerStats {
                            layer: l,
                            first: v,
                            last: v,
                        }),
                    }
                }
            }
            ema = Some(ema.map_or(out.loss, |e| 0.9 * e + 0.1 * out.loss));
            let rate = tokens_here as f64 / t0.elapsed().as_secs_f64().max(1e-9);
            let msg = format!(
                "loss {:.4} | {:.0} tok/s | {:.2} s/step",
                ema.unwrap_or(out.loss),
                rate,
                secs
            );
            bar.set_message(msg.clone());
            bar.inc(1);
            if self.p.log.wants_plain() && last_plain.elapsed() >= PLAIN_EVERY {
                last_plain = Instant::now();
                let left = bar.eta().as_secs();
                self.p.log.line(&format!(
                    "{} step {}/{}: {msg} | eta {}m{:02}s",
                    plan.stage.name(),
                    step + 1,
                    plan.steps,
                    left / 60,
                    left % 60
                ));
            }
            self.steps_here += 1;
            let done = step + 1;
            let every = self.p.opts.checkpoint_every;
            if every > 0 && done % every == 0 && done < plan.steps {
                self.save(done, Some(&opt))?;
            }
            if self.p.opts.stop_after == Some(self.steps_here) && done < plan.steps {
                bar.finish_and_clear();
                return Err(self.stopped());
            }
        }
        bar.finish_and_clear();
        // The transfer set's activations are not needed past its stage (about 1 GB).
        self.transfer_acts.clear();
        let st = &self.stats[self.stage_index];
        self.p.log.line(&st.summary());
        if let Some(c) = &self.cache {
            if plan.stage == Stage::Distill {
                self.p.log.line(&format!(
                    "teacher cache: {:.1} MB of top-{} targets",
                    c.bytes() as f64 / 1e6,
                    c.k
                ));
            }
        }
        Ok(())
    }

    /// For each Liger layer, the indices (into the variables) of the adapters that shape its
    /// attention output: those on q, k and v. Other targets do not affect it.
    fn transfer_groups(&self, layers: &[usize]) -> Vec<(usize, Vec<usize>)> {
        layers
            .iter()
            .map(|&l| {
                let prefix = format!("base_model.model.model.layers.{l}.self_attn.");
                let idx = self
                    .p
                    .vars
                    .iter()
                    .enumerate()
                    .filter(|(_, (n, _))| {
                        n.strip_prefix(&prefix).is_some_and(|rest| {
                            ["q_proj.", "k_proj.", "v_proj."]
                                .iter()
                                .any(|p| rest.starts_with(p))
                        })
                    })
                    .map(|(i, _)| i)
                    .collect();
                (l, idx)
            })
            .collect()
    }

    /// The teacher's side of transfer for one chunk: the residual stream entering each Liger
    /// layer and that layer's attention output. Computed chunk by chunk (so the numbers do
    /// not depend on batch composition) and kept when the transfer set is bounded.
    fn transfer_targets(
        &mut self,
        chunk: usize,
        layers: &[usize],
        keep: bool,
        fill_cache: bool,
    ) -> Result<ChunkActs> {
        if let Some(a) = self.transfer_acts.get(&chunk) {
            return Ok(a.clone());
        }
        let tokens = &self.p.chunks[chunk].tokens;
        let inputs = self.p.teacher.layer_inputs(&[tokens])?;
        if fill_cache {
            if let Some(cache) = &mut self.cache {
                cache.insert_from_residual(chunk, inputs.last().expect("final residual"))?;
            }
        }
        let mut acts = ChunkActs::default();
        for &l in layers {
            let x = inputs[l].clone();
            let target = self.p.teacher.attention_output(l, &x, &[tokens.len()])?;
            acts.inputs.push(x);
            acts.targets.push(target);
        }
        if keep {
            self.transfer_acts.insert(chunk, acts.clone());
        }
        Ok(acts)
    }

    /// One transfer step: every Liger layer takes an optimizer step on its own MSE.
    fn transfer_step(
        &mut self,
        batch: &[usize],
        groups: &[(usize, Vec<usize>)],
        opt: &mut AdamW,
        lr: f64,
        fill_cache: bool,
    ) -> Result<StepOut> {
        let lens: Vec<usize> = batch
            .iter()
            .map(|&c| self.p.chunks[c].tokens.len())
            .collect();
        let layers: Vec<usize> = groups.iter().map(|(l, _)| *l).collect();
        let keep = self.p.opts.transfer_chunks > 0;
        let per_chunk = batch
            .iter()
            .map(|&c| self.transfer_targets(c, &layers, keep, fill_cache))
            .collect::<Result<Vec<_>>>()?;
        let mut grads: Vec<Option<Tensor>> = vec![None; self.p.vars.len()];
        let mut layer_losses = Vec::with_capacity(groups.len());
        for (j, (l, idx)) in groups.iter().enumerate() {
            let cat = |f: &dyn Fn(&ChunkActs) -> &Tensor| -> Result<Tensor> {
                Ok(Tensor::cat(
                    &per_chunk.iter().map(f).collect::<Vec<_>>(),
                    0,
                )?)
            };
            let x = cat(&|a| &a.inputs[j])?;
            let target = cat(&|a| &a.targets[j])?;
            let out = self.p.student.attention_output(*l, &x, &lens)?;
            let loss = loss::mse(&out, &target)?;
            let g = loss.backward()?;
            for &i in idx {
                grads[i] = g.get(self.p.vars[i].1.as_tensor()).cloned();
            }
            layer_losses.push((*l, loss.to_scalar::<f32>()?));
        }
        opt.step(&grads, lr)?;
        let mean =
            layer_losses.iter().map(|(_, v)| v).sum::<f32>() / layer_losses.len().max(1) as f32;
        Ok(StepOut {
            loss: mean,
            tokens: lens.iter().sum::<usize>() as u64,
            layers: layer_losses,
        })
    }

    /// One end-to-end step (distill or lm) through the whole student.
    fn e2e_step(
        &mut self,
        stage: Stage,
        batch: &[usize],
        opt: &mut AdamW,
        lr: f64,
    ) -> Result<StepOut> {
        let device = self.p.student.device().clone();
        let chunks: Vec<&Chunk> = batch.iter().map(|&c| &self.p.chunks[c]).collect();
        if stage == Stage::Distill {
            let cache = self.cache.as_mut().expect("distill has a teacher cache");
            for (&c, chunk) in batch.iter().zip(&chunks) {
                cache.ensure(&self.p.teacher, c, &chunk.tokens)?;
            }
        }
        let topk: Option<Vec<&TopK>> = (stage == Stage::Distill).then(|| {
            let cache = self.cache.as_ref().expect("distill has a teacher cache");
            batch
                .iter()
                .map(|c| cache.get(*c).expect("just ensured"))
                .collect()
        });
        let pairs: Vec<(&[u32], &[bool])> = chunks
            .iter()
            .map(|c| (c.tokens.as_slice(), c.learn.as_slice()))
            .collect();
        let only_learned = stage == Stage::Lm;
        let ce_weight = if stage == Stage::Lm {
            1.0
        } else {
            self.p.opts.ce_weight
        };
        let tokens = chunks.iter().map(|c| c.tokens.len() as u64).sum();
        let neg_entropy = topk.as_ref().map_or(0.0, |parts| {
            let rows: usize = parts.iter().map(|p| p.len).sum();
            parts
                .iter()
                .flat_map(|p| p.neg_entropy.iter())
                .map(|&x| x as f64)
                .sum::<f64>()
                / rows.max(1) as f64
        });
        let (loss, reported) = if device.is_cpu() {
            // The fused head (see `head`): the student's final residual stream, normed, into
            // one op that computes the logits, the loss and its gradient block by block.
            let targets = RowTargets::new(&pairs, topk.as_deref(), ce_weight, only_learned);
            if only_learned && targets.learned() == 0 {
                // Nothing to learn in this batch (e.g. only user turns): no update.
                return Ok(StepOut {
                    loss: 0.0,
                    tokens: 0,
                    layers: Vec::new(),
                });
            }
            let seqs: Vec<&[u32]> = chunks.iter().map(|c| c.tokens.as_slice()).collect();
            let longest = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
            let segment = self.p.opts.segment;
            if segment > 0 && longest > segment {
                let (grads, p) = self.segmented_grads(&seqs, &targets, segment)?;
                let shown = match stage {
                    Stage::Lm => p.nll,
                    _ => p.kl_cross + neg_entropy + ce_weight * p.nll,
                };
                self.update(grads, opt, lr)?;
                return Ok(StepOut {
                    loss: shown as f32,
                    tokens,
                    layers: Vec::new(),
                });
            }
            let h = self
                .p
                .student
                .layer_inputs(&seqs)?
                .pop()
                .expect("layer_inputs returns the final residual");
            let (loss, p) = self.head_loss(&h, targets)?;
            let shown = match stage {
                Stage::Lm => p.nll,
                _ => p.kl_cross + neg_entropy + ce_weight * p.nll,
            };
            (loss, shown)
        } else {
            self.e2e_loss_composite(
                &chunks,
                &pairs,
                topk.as_deref(),
                ce_weight,
                only_learned,
                neg_entropy,
            )?
        };
        let grads = self.grads_of(&loss)?;
        self.update(grads, opt, lr)?;
        Ok(StepOut {
            loss: reported as f32,
            tokens,
            layers: Vec::new(),
        })
    }

    /// The fused head's loss (see `head`) on the student's final residual stream `h`.
    fn head_loss(&self, h: &Tensor, targets: RowTargets) -> Result<(Tensor, LossParts)> {
        let head = &self.student_head;
        let hn = rms_norm_differentiable(h, &head.norm, head.eps)?;
        let op = FusedHeadLoss::new(head.weight.clone(), targets);
        let parts = op.parts_handle();
        let loss = hn.apply_op1(op)?;
        let p = *parts.lock().unwrap_or_else(|e| e.into_inner());
        Ok((loss, p))
    }

    /// The gradient of `loss` for every trainable variable.
    fn grads_of(&self, loss: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = loss.backward()?;
        Ok(self
            .p
            .vars
            .iter()
            .map(|(_, v)| g.get(v.as_tensor()).cloned())
            .collect())
    }

    /// Clips and applies one optimizer step.
    fn update(&self, mut grads: Vec<Option<Tensor>>, opt: &mut AdamW, lr: f64) -> Result<()> {
        optim::clip_grad_norm(&mut grads, self.p.opts.max_grad_norm)?;
        opt.step(&grads, lr)
    }

    /// Truncated backpropagation through time: the sequences run through the student in
    /// pieces of `segment` tokens, each piece continuing from the state the previous one
    /// left (detached, so the gradient stays inside a piece), its rows' loss taken and
    /// differentiated at once. The pieces' losses add up to the whole sequences' loss (the
    /// forward pass is exact across pieces); their gradients are summed.
    fn segmented_grads(
        &self,
        seqs: &[&[u32]],
        targets: &RowTargets,
        segment: usize,
    ) -> Result<(Vec<Option<Tensor>>, LossParts)> {
        let student = &self.p.student;
        let mut states = seqs
            .iter()
            .map(|_| student.new_state())
            .collect::<liger_model::Result<Vec<_>>>()?;
        // First row of each sequence in the batch's row order.
        let offsets: Vec<usize> = seqs
            .iter()
            .scan(0, |acc, s| {
                let o = *acc;
                *acc += s.len();
                Some(o)
            })
            .collect();
        let mut total: Vec<Option<Tensor>> = vec![None; self.p.vars.len()];
        let mut parts = LossParts::default();
        let longest = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        for start in (0..longest).step_by(segment) {
            let mut rows = Vec::new();
            let mut steps = Vec::new();
            for ((s, state), &off) in seqs.iter().zip(states.iter_mut()).zip(&offsets) {
                if start >= s.len() {
                    continue;
                }
                let end = (start + segment).min(s.len());
                rows.extend(off + start..off + end);
                steps.push(SeqStep {
                    tokens: &s[start..end],
                    state,
                    argmax_only: false,
                });
            }
            let h = student.final_residual(&mut steps)?;
            drop(steps);
            let (loss, p) = self.head_loss(&h, targets.select(&rows))?;
            parts.kl_cross += p.kl_cross;
            parts.nll += p.nll;
            for (acc, g) in total.iter_mut().zip(self.grads_of(&loss)?) {
                *acc = match (acc.take(), g) {
                    (Some(a), Some(g)) => Some((a + g)?),
                    (a, g) => a.or(g),
                };
            }
            for s in &mut states {
                s.detach();
            }
        }
        Ok((total, parts))
    }

    /// The same loss from candle ops on full logits (any device; the CPU uses the fused op).
    fn e2e_loss_composite(
        &self,
        chunks: &[&Chunk],
        pairs: &[(&[u32], &[bool])],
        topk: Option<&[&TopK]>,
        ce_weight: f64,
        only_learned: bool,
        neg_entropy: f64,
    ) -> Result<(Tensor, f64)> {
        let student = &self.p.student;
        let device = student.device();
        let mut states = chunks
            .iter()
            .map(|_| student.new_state())
            .collect::<liger_model::Result<Vec<_>>>()?;
        let logits = {
            let mut steps: Vec<SeqStep> = states
                .iter_mut()
                .zip(chunks)
                .map(|(s, c)| SeqStep {
                    tokens: &c.tokens,
                    state: s,
                    argmax_only: false,
                })
                .collect();
            student.forward_batch(&mut steps, Logits::All)?
        };
        let log_probs = candle_nn::ops::log_softmax(&Tensor::cat(&logits, 0)?, D::Minus1)?;
        let next = NextTokens::new(pairs, only_learned, device)?;
        let mut loss: Option<Tensor> = None;
        let mut shown = 0f64;
        if let Some(parts) = topk {
            let t = KlTargets::new(parts, device)?;
            let kl = loss::kl_cross_entropy(&log_probs, &t)?;
            shown += kl.to_scalar::<f32>()? as f64 + neg_entropy;
            loss = Some(kl);
        }
        if ce_weight > 0.0 && next.count > 0 {
            let ce = loss::next_token_nll(&log_probs, &next)?;
            shown += ce_weight * ce.to_scalar::<f32>()? as f64;
            let ce = (ce * ce_weight)?;
            loss = Some(match loss {
                Some(l) => (l + ce)?,
                None => ce,
            });
        }
        let loss = loss.ok_or_else(|| Error::Training("nothing to learn in a batch".into()))?;
        Ok((loss, shown))
    }
}
