//! The handle of the real engine: [`LocalEngine::start`] moves the model onto its own OS
//! thread (see [`super::worker`]) and [`Engine::submit`] queues requests for it, enforcing
//! the waiting-queue limit at the door so overload is answered at once with 429.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use liger_model::{Model, StatePool};
use tokio::sync::mpsc as tokio_mpsc;

use super::options::EngineOptions;
use super::worker::{Message, Submission, Worker};
use super::{Engine, EngineError, EventReceiver, GenerationRequest};
use crate::metrics::Metrics;
use crate::text::Codec;

/// Handle to the engine thread. Dropping it lets the thread exit once idle.
pub struct LocalEngine {
    inbox: mpsc::Sender<Message>,
    /// Set by [`Engine::shut_down`]: submissions are refused at the door.
    closing: Arc<AtomicBool>,
    /// Submitted but not yet holding slots; shared with the thread.
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    max_running: usize,
    metrics: Arc<Metrics>,
}

/// The most heap [`LocalEngine::start`] touches in advance for sequence states.
const PREFAULT_MOST: usize = 2 << 30;

/// Heap to touch in advance ([`liger_model::threads::prefault_heap`]) for `max_running`
/// states of `state` bytes: the states, and as much again within the state cache's
/// `cache_budget`. A prompt's snapshot shares its state's buffers until the state's first
/// decode step copies them, so a full wave holds two of each. With one state each
/// prefaulted, 32 streams of 256-token prompts faulted in 182K pages while they ran (7% of
/// the server's CPU time, in its steps); with this, 46-67K. llama.cpp clears its whole KV
/// cache at start-up, so its steps never fault.
fn prefault_bytes(state: usize, max_running: usize, cache_budget: usize) -> usize {
    let live = state.saturating_mul(max_running);
    live.saturating_add(live.min(cache_budget))
        .min(PREFAULT_MOST)
}

impl LocalEngine {
    /// Starts the engine thread, which takes ownership of `model`.
    pub fn start(
        model: Model,
        codec: Arc<Codec>,
        options: EngineOptions,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let pool = StatePool::new(model.state_spec().clone(), options.max_running);
        if model.device().is_cpu() {
            // The states' buffers, in memory the process already has (see `prefault_heap`):
            // a Liger state's size does not depend on its length; a Transformer's KV
            // caches are counted at 4K tokens.
            let state = model.state_spec().bytes_at(4096);
            let cache_budget = options.state_cache.budget_bytes;
            let bytes = prefault_bytes(state, options.max_running, cache_budget);
            liger_model::threads::prefault_heap(bytes);
        }
        let cache = options.state_cache.build(&model)?;
        metrics
            .pool_capacity
            .store(options.max_running as u64, Ordering::Relaxed);
        let (max_waiting, max_running) = (options.max_waiting, options.max_running);
        Worker::spawn(super::worker::WorkerParts {
            model,
            codec,
            pool,
            cache,
            options,
            metrics: metrics.clone(),
            inbox: rx,
            waiting: waiting.clone(),
        })?;
        Ok(Self {
            inbox: tx,
            closing: Arc::new(AtomicBool::new(false)),
            waiting,
            max_waiting,
            max_running,
            metrics,
        })
    }
}

impl Engine for LocalEngine {
    fn submit(&self, request: GenerationRequest) -> Result<EventReceiver, EngineError> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(EngineError::ShuttingDown);
        }
        if request.prompt.is_empty() {
            return Err(EngineError::Invalid("the prompt is empty".into()));
        }
        // `ChoiceCount` was checked against the server's slot count when the request was
        // validated (`Limits::max_n` is `max_running`); more could never be admitted.
        debug_assert!(
            request.n.get() <= self.max_running,
            "n = {} exceeds the {} sequence slots",
            request.n.get(),
            self.max_running
        );
        // Reserve a place in the queue first, so the limit holds under concurrent submits.
        let reserved = self
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                (w < self.max_waiting).then_some(w + 1)
            });
        let now_waiting = reserved.map_err(EngineError::Overloaded)? + 1;
        self.metrics
            .waiting
            .store(now_waiting as u64, Ordering::Relaxed);
        let (tx, rx) = tokio_mpsc::unbounded_channel();
        let sub = Submission {
            request,
            events: tx,
            at: Instant::now(),
        };
        if self.inbox.send(Message::Submit(Box::new(sub))).is_err() {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Stopped);
        }
        Ok(rx)
    }

    fn shut_down(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let _ = self.inbox.send(Message::ShutDown);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefault_covers_the_states_and_as_many_snapshots_within_bounds() {
        const MB: usize = 1 << 20;
        // 32 states of 16 MB: themselves, and their prompts' snapshots in a 512 MB cache.
        assert_eq!(prefault_bytes(16 * MB, 32, 512 * MB), 1024 * MB);
        // A smaller cache holds fewer snapshots; without one, the states alone.
        assert_eq!(prefault_bytes(16 * MB, 32, 100 * MB), 612 * MB);
        assert_eq!(prefault_bytes(16 * MB, 32, 0), 512 * MB);
        // Never more than the bound, whatever the settings (no overflow either).
        assert_eq!(prefault_bytes(64 * MB, 256, 4096 * MB), PREFAULT_MOST);
        assert_eq!(prefault_bytes(usize::MAX, 2, usize::MAX), PREFAULT_MOST);
    }
}
