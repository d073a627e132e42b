//! One engine step: plan the batch (decodes first, then prefill chunks under the token
//! budget), run ONE `forward_batch` over it, and apply the logits: prompt logprobs, forking
//! a finished prompt's state into its `n` choices, sampling and emitting tokens.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::time::Instant;

use candle_core::Tensor;
use liger_model::{Logits, SeqStep};
use tracing::warn;

use super::{snapshot, Part, Phase, Worker};
use crate::engine::sampling::token_logprob;
use crate::engine::scheduler::{keep_waiting, plan_prefill, Prefilling, Ready};
use crate::engine::sequence::Choice;
use crate::engine::speculate::draft;
use crate::engine::{EngineError, Event, FinishReason};

impl Worker {
    /// Plans, runs and applies one batched forward pass.
    pub(super) fn step(&mut self) {
        self.start_ready();
        let parts = self.plan();
        // Drafts need every row's logits, which a prompt chunk would pay for in full.
        let mut all_logits = self.draft(&parts);
        let mut inputs: Vec<Vec<u32>> = Vec::new();
        for (g, part) in self.running.iter().zip(&parts) {
            match (part, &g.phase) {
                (Part::Decode, Phase::Decode { choices }) => {
                    inputs.extend(choices.iter().map(|c| c.step_input()))
                }
                (Part::Prefill(len), Phase::Prefill { done, .. }) => {
                    inputs.push(g.request.prompt[*done..done + len].to_vec());
                    all_logits |= g.request.prompt_logprobs.is_some();
                }
                _ => {}
            }
        }
        if inputs.is_empty() {
            return;
        }
        let mode = if all_logits {
            Logits::All
        } else {
            Logits::Last
        };
        let started = Instant::now();
        let result = {
            let mut steps: Vec<SeqStep<'_>> = Vec::with_capacity(inputs.len());
            // Constrained choices: their next masks are computed while the model runs.
            let mut guides = Vec::new();
            let mut it = inputs.iter();
            for (g, part) in self.running.iter_mut().zip(&parts) {
                match (part, &mut g.phase) {
                    (Part::Decode, Phase::Decode { choices }) => {
                        for c in choices.iter_mut() {
                            let tokens = it.next().expect("one input per entry");
                            steps.push(SeqStep {
                                tokens,
                                argmax_only: c.argmax_only(&g.shared),
                                state: &mut c.slot.state,
                            });
                            guides.extend(c.guide.as_mut());
                        }
                    }
                    (Part::Prefill(_), Phase::Prefill { slots, .. }) => {
                        let tokens = it.next().expect("one input per entry");
                        steps.push(SeqStep {
                            tokens,
                            state: &mut slots[0].state,
                            // A prompt's logits may be forked into `n` choices, or
                            // reported as prompt logprobs.
                            argmax_only: false,
                        });
                    }
                    _ => {}
                }
            }
            let model = &self.model;
            std::thread::scope(|scope| {
                // Off the critical path: llguidance's mask (well under a millisecond per
                // sequence for JSON schemas) overlaps the forward pass instead of following it.
                let masks = (!guides.is_empty())
                    .then(|| scope.spawn(move || guides.into_iter().for_each(|g| g.prepare())));
                let out = catch_unwind(AssertUnwindSafe(|| model.forward_batch(&mut steps, mode)))
                    .unwrap_or_else(|p| Err(liger_model::Error::Invalid(panic_message(&p))));
                if masks.is_some_and(|h| h.join().is_err()) {
                    // The masks not computed are computed again when applied.
                    warn!("the grammar mask thread panicked");
                }
                out
            })
        };
        let took = started.elapsed();
        // One input per decoding choice and one per prefill chunk. `continued`: tokens of
        // chunks that continue a prompt (they attend to a full window, and pass tokens on to
        // the global cache), dearer than a prompt's first chunk.
        let rows: usize = inputs.iter().map(Vec::len).sum::<usize>();
        let (mut chunks, mut prompt, mut continued) = (0, 0, 0);
        for (g, part) in self.running.iter().zip(&parts) {
            if let (Part::Prefill(len), Phase::Prefill { done, .. }) = (part, &g.phase) {
                chunks += 1;
                prompt += len;
                if *done > 0 {
                    continued += len;
                }
            }
        }
        let decodes = inputs.len() - chunks;
        // Rows beyond one per decoding choice: drafts, and tokens fed again after a
        // rejected draft. A step of drafts alone is a fused decode step whose extra rows cost
        // a fraction of a prompt token's: counted as prompt tokens, they would teach the fit
        // that prompt tokens are cheap and overfill the next chunks; and no prompt waits
        // while one drafts. Beside a prompt chunk (tokens fed again) they are counted with it.
        let extra = rows - prompt - decodes;
        if extra == 0 || chunks > 0 {
            self.budget.observe(decodes, prompt + extra, took);
        }
        tracing::debug!(
            decodes,
            extra,
            prompt,
            chunks,
            continued,
            took_ms = took.as_secs_f64() * 1e3,
            "step"
        );
        self.metrics.steps.fetch_add(1, Ordering::Relaxed);
        if chunks > 0 && decodes > 0 {
            self.metrics.mixed_steps.fetch_add(1, Ordering::Relaxed);
        }
        self.metrics.step_duration.observe(took);
        match result {
            Ok(outputs) => self.apply(&parts, outputs),
            Err(e) => self.fail_step(&parts, &e.to_string()),
        }
    }

    fn plan(&self) -> Vec<Part> {
        let decodes: usize = self
            .running
            .iter()
            .map(|g| match &g.phase {
                Phase::Decode { choices } => choices.len(),
                Phase::Prefill { .. } => 0,
            })
            .sum();
        let prefilling: Vec<Prefilling> = self
            .running
            .iter()
            .filter_map(|g| match &g.phase {
                Phase::Prefill {
                    done, ready: None, ..
                } => Some(Prefilling {
                    remaining: g.request.prompt.len() - done,
                    warm: g.warm,
                }),
                _ => None,
            })
            .collect();
        let budget = self.budget.tokens(decodes);
        let mut chunks = plan_prefill(budget, decodes, &prefilling).into_iter();
        self.running
            .iter()
            .map(|g| match &g.phase {
                Phase::Decode { choices } if !choices.is_empty() => Part::Decode,
                Phase::Decode { .. } | Phase::Prefill { ready: Some(_), .. } => Part::Idle,
                Phase::Prefill { done, .. } => {
                    let mut len = chunks.next().unwrap_or(0);
                    // End a chunk where a snapshot is due, so the state is there to take.
                    if let Some(at) = g.snapshot_at.filter(|&at| at > *done) {
                        len = len.min(at - done);
                    }
                    match len {
                        0 => Part::Idle,
                        len => Part::Prefill(len),
                    }
                }
            })
            .collect()
    }

    /// Drafts tokens for this step's decoding choices ([`crate::engine::speculate`]) and
    /// backs up their states. Returns whether any choice drafted.
    fn draft(&mut self, parts: &[Part]) -> bool {
        let opts = self.options.speculative;
        let decodes: usize = self
            .running
            .iter()
            .zip(parts)
            .map(|(g, part)| match (part, &g.phase) {
                (Part::Decode, Phase::Decode { choices }) => choices.len(),
                _ => 0,
            })
            .sum();
        let prefilling = parts.iter().any(|p| matches!(p, Part::Prefill(_)));
        if !opts.enabled() || prefilling || decodes > opts.max_streams {
            return false;
        }
        // Drafts share what one fused decode step takes after the tokens every choice feeds
        // anyway: a step past it is several fused steps, each reading every weight again.
        let (fed, drafting) = self
            .running
            .iter()
            .filter_map(|g| match &g.phase {
                Phase::Decode { choices } => Some(choices),
                Phase::Prefill { .. } => None,
            })
            .flatten()
            .fold((0, 0), |(fed, drafting), c| {
                let drafts = !c.cannot_draft(opts.tokens) && c.draft_pause == 0;
                (fed + 1 + c.unread(), drafting + usize::from(drafts))
            });
        let share = liger_model::FUSED_STEP_TOKENS.saturating_sub(fed) / drafting.max(1);
        let mut any = false;
        for g in &mut self.running {
            let Phase::Decode { choices } = &mut g.phase else {
                continue;
            };
            let shared = &g.shared;
            for c in choices.iter_mut() {
                if c.cannot_draft(opts.tokens) {
                    continue;
                }
                if c.draft_pause > 0 {
                    c.draft_pause -= 1;
                    continue;
                }
                // The step yields at most one token past its drafts.
                let left = shared
                    .max_tokens
                    .min(shared.max_model_len.saturating_sub(shared.prompt_len))
                    .saturating_sub(c.generated + 1)
                    .min(share);
                c.drafts = draft(&g.request.prompt, &c.tokens, &opts, left);
                if !c.drafts.is_empty() {
                    c.backup = Some(c.slot.state.backup());
                    any = true;
                }
            }
        }
        any
    }

    fn apply(&mut self, parts: &[Part], outputs: Vec<Tensor>) {
        let mut outputs = outputs.into_iter();
        let mut finished = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let outcome = match part {
                Part::Idle => Ok(false),
                Part::Decode => self.apply_decode(i, &mut outputs),
                Part::Prefill(len) => self.apply_prefill(i, *len, &mut outputs),
            };
            if self.is_done(i, outcome) {
                finished.push(i);
            }
        }
        self.remove_groups(finished);
    }

    /// Whether group `gi` is done after an outcome of [`apply`](Self::apply)'s (a failure,
    /// which is sent to its client, ends it too).
    fn is_done(&self, gi: usize, outcome: Result<bool, String>) -> bool {
        match outcome {
            Ok(done) => done,
            Err(msg) => {
                let g = &self.running[gi];
                warn!(id = %g.request.id, error = %msg, "reading logits failed");
                let _ = g.events.send(Event::Failed(EngineError::Model(msg)));
                true
            }
        }
    }

    /// Removes the groups at `finished` (ascending) and gives their slots back.
    fn remove_groups(&mut self, finished: Vec<usize>) {
        // Remove from the back so earlier indices stay valid; `remove` keeps the order,
        // which is the prefill priority.
        for i in finished.into_iter().rev() {
            let g = self.running.remove(i);
            self.release_group(g);
        }
    }

    /// Returns whether the group is done.
    fn apply_decode(
        &mut self,
        gi: usize,
        outputs: &mut impl Iterator<Item = Tensor>,
    ) -> Result<bool, String> {
        let Phase::Decode { choices } = &self.running[gi].phase else {
            unreachable!("planned as decode")
        };
        let outs: Vec<Tensor> = choices
            .iter()
            .map(|_| outputs.next().expect("one output per entry"))
            .collect();
        let g = &mut self.running[gi];
        let Phase::Decode { choices } = &mut g.phase else {
            unreachable!("checked above")
        };
        let now = Instant::now();
        // One observation a step: a step's accepted drafts reach the client together.
        self.metrics
            .inter_token_latency
            .observe(now - g.last_token_at);
        g.last_token_at = now;
        let mut done = Vec::new();
        for (k, (c, out)) in choices.iter_mut().zip(outs).enumerate() {
            let before = c.tokens.len();
            let (mut accepted, mut finished) = (0, false);
            // The choice's rows from its newest token's on: one, or one per draft more.
            let logits = StepLogits::read(&out).map_err(|e| e.to_string())?;
            let first = if c.drafts.is_empty() {
                logits.rows() - 1
            } else {
                c.unread()
            };
            // Row i predicts the token after draft i: sampled as plain decoding would, it
            // confirms draft i + 1 or replaces it and ends the step's tokens.
            for i in first..logits.rows() {
                let row = logits.row_into(i, &mut self.scratch)?;
                let (events, reason) = c.advance(row, &g.shared, &self.codec);
                g.completion_tokens += 1;
                self.metrics
                    .generation_tokens
                    .fetch_add(1, Ordering::Relaxed);
                for e in events {
                    g.gone |= g.events.send(e).is_err();
                }
                if reason.is_some() {
                    finished = true;
                    break;
                }
                if c.drafts.get(accepted) != Some(&c.next) {
                    break;
                }
                accepted += 1;
            }
            if !c.drafts.is_empty() {
                self.metrics
                    .draft_tokens
                    .fetch_add(c.drafts.len() as u64, Ordering::Relaxed);
                self.metrics
                    .accepted_draft_tokens
                    .fetch_add(accepted as u64, Ordering::Relaxed);
            }
            c.settle(before, accepted).map_err(|e| e.to_string())?;
            if finished {
                done.push(k);
            }
        }
        for k in done.into_iter().rev() {
            let c = choices.remove(k);
            // The state has read the prompt and the generated tokens up to `fed` (all but
            // the last, which was sampled, not fed, unless a draft was rejected): the prefix
            // the next turn of a conversation repeats.
            let fed = &c.tokens[..c.fed];
            if !fed.is_empty() {
                let key = [g.request.prompt.as_slice(), fed].concat();
                snapshot(&mut self.cache, &key, &c.slot.state);
            }
            if let Err(e) = self.pool.release(c.slot) {
                warn!(error = %e, "slot release failed");
            }
        }
        Ok(choices.is_empty())
    }

    fn apply_prefill(
        &mut self,
        gi: usize,
        len: usize,
        outputs: &mut impl Iterator<Item = Tensor>,
    ) -> Result<bool, String> {
        let out = outputs.next().expect("one output per entry");
        self.metrics
            .prompt_tokens
            .fetch_add(len as u64, Ordering::Relaxed);
        let g = &mut self.running[gi];
        let Phase::Prefill { done, .. } = &mut g.phase else {
            unreachable!("planned as prefill")
        };
        let start = *done;
        *done += len;
        let complete = *done == g.request.prompt.len();
        if let Some(k) = g.request.prompt_logprobs {
            // Row j predicts prompt token start + j + 1.
            let rows = out.to_vec2::<f32>().map_err(|e| e.to_string())?;
            for (j, row) in rows.iter().enumerate() {
                if let Some(&next) = g.request.prompt.get(start + j + 1) {
                    g.prompt_logprobs.push(token_logprob(row, next, k));
                }
            }
        }
        if !complete {
            if g.snapshot_at == Some(start + len) {
                let Phase::Prefill { slots, .. } = &g.phase else {
                    unreachable!("checked above")
                };
                snapshot(
                    &mut self.cache,
                    &g.request.prompt[..start + len],
                    &slots[0].state,
                );
            }
            return Ok(false);
        }
        let logits = last_row(&out)?;
        if self.options.start_wait.is_none() {
            return self.start_decoding(gi, logits);
        }
        // Started by `start_ready`, with the prompts read alongside it.
        let Phase::Prefill { ready, .. } = &mut g.phase else {
            unreachable!("checked above")
        };
        *ready = Some((logits, Instant::now()));
        Ok(false)
    }

    /// Starts the groups whose prompts are read, unless they wait for the rest of their
    /// wave ([`keep_waiting`]).
    fn start_ready(&mut self) {
        let mut oldest: Option<Instant> = None;
        let (mut decoding, mut reading) = (false, 0);
        for g in &self.running {
            match &g.phase {
                Phase::Decode { choices } => decoding |= !choices.is_empty(),
                Phase::Prefill {
                    ready: None, done, ..
                } => reading += g.request.prompt.len() - done,
                Phase::Prefill {
                    ready: Some((_, at)),
                    ..
                } => oldest = Some(oldest.map_or(*at, |o| o.min(*at))),
            }
        }
        let Some(oldest) = oldest else { return };
        let ready = Ready {
            decoding,
            reading,
            waited: oldest.elapsed(),
        };
        let estimate = self.budget.prompt_time(reading);
        if keep_waiting(ready, self.options.start_wait, estimate) {
            return;
        }
        let mut finished = Vec::new();
        for gi in 0..self.running.len() {
            let Phase::Prefill { ready, .. } = &mut self.running[gi].phase else {
                continue;
            };
            let Some((logits, _)) = ready.take() else {
                continue;
            };
            let outcome = self.start_decoding(gi, logits);
            if self.is_done(gi, outcome) {
                finished.push(gi);
            }
        }
        self.remove_groups(finished);
    }

    /// The prompt is in: fork its state into every choice and sample their first tokens.
    fn start_decoding(&mut self, gi: usize, logits: Vec<f32>) -> Result<bool, String> {
        let g = &mut self.running[gi];
        let Phase::Prefill { slots, .. } = std::mem::replace(
            &mut g.phase,
            Phase::Decode {
                choices: Vec::new(),
            },
        ) else {
            unreachable!("prefill just completed")
        };
        // The prompt's own snapshot: the prefix that other requests (the same system prompt
        // or few-shot header, or this conversation's next turn) share.
        snapshot(&mut self.cache, &g.request.prompt, &slots[0].state);
        if g.request.prompt_logprobs.is_some() {
            let lp = std::mem::take(&mut g.prompt_logprobs);
            g.gone |= g.events.send(Event::Prompt(lp)).is_err();
        }
        if g.request.max_tokens == 0 {
            // Scoring only: nothing to generate.
            for c in 0..g.request.n.get() {
                let e = Event::Finished {
                    choice: c,
                    reason: FinishReason::Length,
                    text: String::new(),
                };
                g.gone |= g.events.send(e).is_err();
            }
            self.release_slots(slots);
            return Ok(true);
        }
        let mut slots = slots.into_iter();
        let first = slots.next().expect("n >= 1");
        let mut forks = Vec::with_capacity(g.request.n.get());
        for mut s in slots {
            // Cheap: states are reference-counted and copy-on-write (a fork shares its
            // caches' buffers, so neither appends into them in place).
            s.state = first.state.clone();
            forks.push(s);
        }
        let mut choices = Vec::with_capacity(g.request.n.get());
        let mut guide = g.request.guide.take();
        let n = g.request.n.get();
        for (i, slot) in std::iter::once(first).chain(forks).enumerate() {
            // Each choice its own matcher: the last takes the original.
            let own = if i + 1 == n {
                guide.take()
            } else {
                guide.clone()
            };
            choices.push(Choice::new(i, slot, &g.request.prompt, &g.shared, own));
        }
        let now = Instant::now();
        self.metrics.time_to_first_token.observe(now - g.submitted);
        g.first_token_at = Some(now);
        g.last_token_at = now;
        let mut live = Vec::with_capacity(choices.len());
        for mut c in choices {
            let (events, reason) = c.advance(&mut logits.clone(), &g.shared, &self.codec);
            g.completion_tokens += 1;
            self.metrics
                .generation_tokens
                .fetch_add(1, Ordering::Relaxed);
            for e in events {
                g.gone |= g.events.send(e).is_err();
            }
            if reason.is_some() {
                if let Err(e) = self.pool.release(c.slot) {
                    warn!(error = %e, "slot release failed");
                }
            } else {
                live.push(c);
            }
        }
        let done = live.is_empty();
        g.phase = Phase::Decode { choices: live };
        Ok(done)
    }
}

/// A step's `[rows, vocab]` f32 logits for one sequence, read where they are: copying the
/// rows out (`to_vec2`) allocated a fresh ~200 KB buffer a row on the engine's thread every
/// step, and its pages faulted in (in liger-serve with one stream, 2,794 faults in 8
/// requests, 96% of them there and in the step's own logits; the rows' copies took 2.7 ms
/// at p99 of the steps where the median was 12 us).
struct StepLogits {
    /// On the CPU: the output itself, or a copy when it is on another device.
    cpu: Tensor,
    rows: usize,
    vocab: usize,
}

impl StepLogits {
    fn read(t: &Tensor) -> candle_core::Result<Self> {
        let cpu = t
            .to_device(&candle_core::Device::Cpu)?
            .to_dtype(candle_core::DType::F32)?
            .contiguous()?;
        let (rows, vocab) = cpu.dims2()?;
        Ok(Self { cpu, rows, vocab })
    }

    fn rows(&self) -> usize {
        self.rows
    }

    /// Row `i`, copied into `scratch` (whose memory is reused from step to step), to sample
    /// from: the sampler changes the values it is given.
    fn row_into<'s>(&self, i: usize, scratch: &'s mut Vec<f32>) -> Result<&'s mut [f32], String> {
        let (storage, layout) = self.cpu.storage_and_layout();
        let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)), Some((a, _))) =
            (&*storage, layout.contiguous_offsets())
        else {
            return Err("logits are not contiguous f32 on the CPU".into());
        };
        scratch.clear();
        scratch.extend_from_slice(&data[a + i * self.vocab..][..self.vocab]);
        Ok(scratch)
    }
}

/// The last row of a `[t, vocab]` logits tensor, on the CPU.
fn last_row(t: &Tensor) -> Result<Vec<f32>, String> {
    let rows = t.dim(0).map_err(|e| e.to_string())?;
    t.get(rows - 1)
        .and_then(|r| r.to_vec1::<f32>())
        .map_err(|e| e.to_string())
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    let what = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("the model panicked: {what}")
}
