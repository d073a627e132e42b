//! The engine thread: owns the model and runs continuous batching.
//!
//! Each step it (1) takes new submissions, (2) drops requests whose client went away,
//! (3) admits queued requests while state slots are free, (4) runs ONE `forward_batch`
//! over every decoding sequence plus prefill chunks under the token budget ([`step`]), and
//! (5) samples, detokenizes and sends events. Sequence states live in a [`StatePool`] of
//! `max_running` slots; a Liger state has constant size, so memory does not grow with the
//! context.
//!
//! A failed step fails only the requests in it (the model restores their states on error)
//! and the loop goes on serving.
//!
//! With the conversation state cache on, an admitted request starts from the snapshot of
//! the longest cached prefix of its prompt, and snapshots are stored when a prompt has been
//! read and when a choice finishes (keyed by every token its state consumed), so the next
//! turn of a chat, whose prompt repeats this one and its answer, reads only the new tokens.

mod step;

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use liger_model::cache::StateCache;
use liger_model::{Model, SequenceState, Slot, StateBytes, StatePool};
use tracing::{debug, info, warn};

use super::options::EngineOptions;
use super::scheduler::{admit, StepBudget, Waiting};
use super::sequence::{Choice, Shared};
use super::{EngineError, Event, EventSender, GenerationRequest, TokenLogprob};
use crate::metrics::Metrics;
use crate::text::Codec;

enum Phase {
    /// `slots[0]` consumes the prompt; the others are reserved for the forks. `ready`:
    /// the prompt is read and its last logits wait for the group's start.
    Prefill {
        slots: Vec<Slot>,
        done: usize,
        ready: Option<(Vec<f32>, Instant)>,
    },
    /// Unfinished choices (finished ones have given their slot back).
    Decode { choices: Vec<Choice> },
}

struct Group {
    request: GenerationRequest,
    shared: Shared,
    events: EventSender,
    submitted: Instant,
    phase: Phase,
    /// A prompt position to snapshot on the way (where it leaves the cached keys).
    snapshot_at: Option<usize>,
    /// Resumed from the state cache: its prompt is read before cold ones.
    warm: bool,
    prompt_logprobs: Vec<TokenLogprob>,
    first_token_at: Option<Instant>,
    last_token_at: Instant,
    completion_tokens: usize,
    /// The client went away (a send failed).
    gone: bool,
}

/// Heap the engine's thread touches at start ([`liger_model::threads::prefault_this_thread`]):
/// the step's logits (up to 32 rows of the vocabulary) and the new states it makes.
const ENGINE_PREFAULT: usize = 64 << 20;

/// What the engine thread receives.
pub(in crate::engine) enum Message {
    Submit(Box<Submission>),
    /// Fail everything held, and everything submitted from now on ([`Engine::shut_down`]).
    ShutDown,
}

/// A request on its way to the engine thread.
pub(in crate::engine) struct Submission {
    pub request: GenerationRequest,
    pub events: EventSender,
    pub at: Instant,
}

/// What a group contributes to the current step.
#[derive(Clone, Copy)]
enum Part {
    Idle,
    Decode,
    Prefill(usize),
}

/// What the engine thread is made of.
pub(super) struct WorkerParts {
    pub model: Model,
    pub codec: Arc<Codec>,
    pub pool: StatePool,
    pub cache: Option<StateCache>,
    pub options: EngineOptions,
    pub metrics: Arc<Metrics>,
    pub inbox: mpsc::Receiver<Message>,
    pub waiting: Arc<AtomicUsize>,
}

pub(super) struct Worker {
    model: Model,
    codec: Arc<Codec>,
    pool: StatePool,
    cache: Option<StateCache>,
    options: EngineOptions,
    metrics: Arc<Metrics>,
    inbox: mpsc::Receiver<Message>,
    waiting: Arc<AtomicUsize>,
    /// A shutdown's grace period is over: everything fails with `ShuttingDown`.
    closing: bool,
    queue: VecDeque<Submission>,
    running: Vec<Group>,
    budget: StepBudget,
    /// A logits row to sample from, reused from step to step (see `step::StepLogits`).
    scratch: Vec<f32>,
}

impl Worker {
    /// Starts the thread; it ends once every handle is dropped and the work is done.
    pub(super) fn spawn(p: WorkerParts) -> std::io::Result<()> {
        let worker = Worker {
            budget: StepBudget::new(p.options.max_batch_tokens, p.options.step_target),
            model: p.model,
            codec: p.codec,
            pool: p.pool,
            cache: p.cache,
            options: p.options,
            metrics: p.metrics,
            inbox: p.inbox,
            waiting: p.waiting,
            closing: false,
            queue: VecDeque::new(),
            running: Vec::new(),
            scratch: Vec::new(),
        };
        std::thread::Builder::new()
            .name("liger-engine".into())
            .spawn(move || worker.run())?;
        Ok(())
    }

    fn run(mut self) {
        if self.model.device().is_cpu() {
            liger_model::threads::prefault_this_thread(ENGINE_PREFAULT);
        }
        info!(slots = self.options.max_running, "engine started");
        loop {
            if self.queue.is_empty() && self.running.is_empty() {
                // Idle: block until work arrives or every handle is gone.
                match self.inbox.recv() {
                    Ok(m) => self.take(m),
                    Err(_) => break,
                }
            }
            while let Ok(m) = self.inbox.try_recv() {
                self.take(m);
            }
            if self.closing {
                self.fail_everything();
                continue;
            }
            self.drop_cancelled();
            self.admit();
            // Model calls are already guarded; this catches a bug in our own bookkeeping so
            // that it costs the running requests, not the server.
            if catch_unwind(AssertUnwindSafe(|| self.step())).is_err() {
                self.fail_all("internal engine error");
            }
            self.publish_gauges();
        }
        info!("engine stopped");
    }

    /// Frees the slots of requests nobody listens to any more.
    fn drop_cancelled(&mut self) {
        let before = self.queue.len();
        self.queue.retain(|s| !s.events.is_closed());
        let dropped = before - self.queue.len();
        if dropped > 0 {
            self.waiting.fetch_sub(dropped, Ordering::SeqCst);
            self.metrics
                .cancelled
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
        let mut i = 0;
        while i < self.running.len() {
            let g = &self.running[i];
            if g.gone || g.events.is_closed() {
                let g = self.running.remove(i);
                debug!(id = %g.request.id, "client went away; freeing its slots");
                self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                self.release_group(g);
            } else {
                i += 1;
            }
        }
    }

    fn admit(&mut self) {
        // Most steps nothing can be admitted: skip the cache lookups below.
        if self.queue.is_empty() || self.pool.available() == 0 {
            return;
        }
        let waiting: Vec<Waiting> = self
            .queue
            .iter()
            .map(|s| Waiting {
                need: s.request.n.get(),
                warm: self.is_warm(&s.request),
            })
            .collect();
        let picked = admit(self.pool.available(), &waiting);
        if picked.is_empty() {
            return;
        }
        // Take the picked ones out in admission order; the rest keep their queue order.
        let mut all: Vec<Option<Submission>> = self.queue.drain(..).map(Some).collect();
        let taken: Vec<Submission> = picked.iter().filter_map(|&i| all[i].take()).collect();
        self.queue = all.into_iter().flatten().collect();
        for sub in taken {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            let mut slots = Vec::with_capacity(sub.request.n.get());
            let mut failure = None;
            for _ in 0..sub.request.n.get() {
                match self.pool.acquire() {
                    Ok(Some(s)) => slots.push(s),
                    Ok(None) => failure = Some("no free state slot".to_string()),
                    Err(e) => failure = Some(e.to_string()),
                }
            }
            if let Some(msg) = failure {
                warn!(id = %sub.request.id, error = %msg, "could not allocate sequence states");
                self.release_slots(slots);
                let _ = sub.events.send(Event::Failed(EngineError::Model(msg)));
                continue;
            }
            let cached = self.resume_from_cache(&sub.request, &mut slots[0]);
            let warm = cached > 0;
            let snapshot_at = self.divergence(&sub.request.prompt, cached);
            if cached > 0 && sub.events.send(Event::Cached(cached)).is_err() {
                self.release_slots(slots);
                continue;
            }
            let shared = Shared::new(
                &sub.request,
                self.codec.eos_token_ids(),
                self.options.max_model_len,
            );
            debug!(id = %sub.request.id, prompt_tokens = sub.request.prompt.len(), cached, n = sub.request.n.get(), "admitted");
            self.running.push(Group {
                request: sub.request,
                shared,
                events: sub.events,
                submitted: sub.at,
                phase: Phase::Prefill {
                    slots,
                    done: cached,
                    ready: None,
                },
                snapshot_at,
                warm,
                prompt_logprobs: Vec::new(),
                first_token_at: None,
                last_token_at: sub.at,
                completion_tokens: 0,
                gone: false,
            });
        }
    }

    /// Whether the state cache holds a prefix of the request's prompt that leaves at most
    /// one step of it to read (as [`resume_from_cache`](Self::resume_from_cache) would use it).
    fn is_warm(&self, request: &GenerationRequest) -> bool {
        let Some(cache) = &self.cache else {
            return false;
        };
        if request.prompt_logprobs.is_some() {
            return false;
        }
        let cached = cache.cached_prefix(&request.prompt);
        cached > 0 && request.prompt.len() - cached <= self.options.max_batch_tokens
    }

    /// Starts `slot` from the longest cached prefix of the prompt; returns its length (0 on
    /// a miss). Requests for prompt logprobs need the logits of every prompt token, so they
    /// always read the whole prompt.
    fn resume_from_cache(&mut self, request: &GenerationRequest, slot: &mut Slot) -> usize {
        if request.prompt_logprobs.is_some() {
            return 0;
        }
        let Some(hit) = self.cache.as_mut().and_then(|c| c.lookup(&request.prompt)) else {
            return 0;
        };
        slot.state = hit.state;
        hit.tokens
    }

    /// Where `prompt` leaves the keys already cached, when that is past the resumed
    /// position and before the prompt's end: a snapshot there lets the next request with
    /// the same prefix (a shared system prompt or few-shot header) resume from it.
    fn divergence(&self, prompt: &[u32], resumed: usize) -> Option<usize> {
        let cache = self.cache.as_ref()?;
        let at = cache.shared_prefix(prompt);
        (at > resumed && at < prompt.len()).then_some(at)
    }

    /// Fails every request that took part in the failed step; the others go on.
    fn fail_step(&mut self, parts: &[Part], msg: &str) {
        warn!(error = %msg, "engine step failed; failing the requests in it");
        self.metrics.step_failures.fetch_add(1, Ordering::Relaxed);
        for i in (0..parts.len()).rev() {
            if matches!(parts[i], Part::Idle) {
                continue;
            }
            let g = self.running.remove(i);
            let _ = g
                .events
                .send(Event::Failed(EngineError::Model(msg.to_string())));
            self.release_group(g);
        }
    }

    fn take(&mut self, message: Message) {
        match message {
            Message::Submit(s) => self.queue.push_back(*s),
            Message::ShutDown => self.closing = true,
        }
    }

    /// Fails every queued and running request with `ShuttingDown` (a shutdown's grace
    /// period is over).
    fn fail_everything(&mut self) {
        if !self.queue.is_empty() || !self.running.is_empty() {
            warn!(
                queued = self.queue.len(),
                running = self.running.len(),
                "shutdown grace period over; failing the requests still in flight"
            );
        }
        for s in std::mem::take(&mut self.queue) {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            let _ = s.events.send(Event::Failed(EngineError::ShuttingDown));
        }
        for g in std::mem::take(&mut self.running) {
            let _ = g.events.send(Event::Failed(EngineError::ShuttingDown));
            self.release_group(g);
        }
        self.publish_gauges();
    }

    fn fail_all(&mut self, msg: &str) {
        warn!(error = %msg, "failing every running request");
        for g in std::mem::take(&mut self.running) {
            let _ = g
                .events
                .send(Event::Failed(EngineError::Model(msg.to_string())));
            self.release_group(g);
        }
    }

    fn release_group(&mut self, g: Group) {
        info!(
            id = %g.request.id,
            prompt_tokens = g.request.prompt.len(),
            completion_tokens = g.completion_tokens,
            ttft_ms = g.first_token_at.map(|t| (t - g.submitted).as_millis() as u64),
            elapsed_ms = g.submitted.elapsed().as_millis() as u64,
            "request done"
        );
        match g.phase {
            Phase::Prefill { slots, .. } => self.release_slots(slots),
            Phase::Decode { choices } => {
                self.release_slots(choices.into_iter().map(|c| c.slot).collect())
            }
        }
    }

    fn release_slots(&mut self, slots: Vec<Slot>) {
        for s in slots {
            if let Err(e) = self.pool.release(s) {
                warn!(error = %e, "slot release failed");
            }
        }
    }

    fn publish_gauges(&self) {
        if let Some(cache) = &self.cache {
            let s = cache.stats();
            let m = &self.metrics;
            m.state_cache_hits.store(s.hits, Ordering::Relaxed);
            m.state_cache_misses.store(s.misses, Ordering::Relaxed);
            m.state_cache_hit_tokens
                .store(s.hit_tokens, Ordering::Relaxed);
            m.state_cache_evictions
                .store(s.evictions, Ordering::Relaxed);
            m.state_cache_bytes.store(s.bytes as u64, Ordering::Relaxed);
            m.state_cache_entries
                .store(s.entries as u64, Ordering::Relaxed);
            m.state_cache_write_failures
                .store(s.write_failures, Ordering::Relaxed);
        }
        let mut sequences = 0;
        let mut bytes = StateBytes::default();
        for g in &self.running {
            match &g.phase {
                Phase::Prefill { slots, .. } => {
                    sequences += 1;
                    for s in slots {
                        bytes += s.state.bytes_by_kind();
                    }
                }
                Phase::Decode { choices } => {
                    sequences += choices.len();
                    for c in choices {
                        bytes += c.slot.state.bytes_by_kind();
                    }
                }
            }
        }
        let m = &self.metrics;
        m.running.store(sequences as u64, Ordering::Relaxed);
        m.waiting.store(
            self.waiting.load(Ordering::SeqCst) as u64,
            Ordering::Relaxed,
        );
        m.pool_bytes.store(bytes.total() as u64, Ordering::Relaxed);
        m.pool_recurrent_bytes
            .store(bytes.recurrent as u64, Ordering::Relaxed);
        m.pool_window_bytes
            .store(bytes.window as u64, Ordering::Relaxed);
        m.pool_global_bytes
            .store(bytes.global as u64, Ordering::Relaxed);
        m.pool_kv_cache_bytes
            .store(bytes.kv_cache as u64, Ordering::Relaxed);
        m.pool_slots_in_use
            .store(self.pool.in_use() as u64, Ordering::Relaxed);
    }
}

/// Stores a snapshot of `state`, which has consumed exactly `tokens` (a no-op without a
/// cache). A free function so callers can hold other borrows of the worker.
fn snapshot(cache: &mut Option<StateCache>, tokens: &[u32], state: &SequenceState) {
    let Some(cache) = cache else { return };
    if state.position() != tokens.len() {
        // A bookkeeping slip must cost a cache entry, never a wrong answer.
        warn!(
            position = state.position(),
            tokens = tokens.len(),
            "not caching a state whose position does not match its tokens"
        );
        return;
    }
    if let Err(e) = cache.insert(tokens, state) {
        warn!(error = %e, "could not cache a state snapshot");
    }
}
