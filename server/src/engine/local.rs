//! The handle of the real engine: [`LocalEngine::start`] moves the model onto its own OS
//! thread (see [`super::worker`]) and [`Engine::submit`] queues requests for it, enforcing
//! the waiting-queue limit at the door so overload is answered at once with 429.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use liger_model::cache::StateCache;
use liger_model::{Model, StatePool};
use tokio::sync::mpsc as tokio_mpsc;

use super::worker::Worker;
use super::{Engine, EngineError, EventReceiver, EventSender, GenerationRequest};
use crate::metrics::Metrics;
use crate::text::Codec;

/// Engine limits, from the server settings.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// State slots: sequences decoding or prefilling at once.
    pub max_running: usize,
    /// Requests queued for a slot before new ones get 429.
    pub max_waiting: usize,
    /// Tokens per forward pass (decodes plus prefill chunks).
    pub max_batch_tokens: usize,
    /// While sequences decode, steps are cut to about this long ([`super::scheduler`]).
    pub step_target: Option<std::time::Duration>,
    /// Prompt plus generated tokens per sequence.
    pub max_model_len: usize,
    pub state_cache: StateCacheOptions,
}

/// The conversation state cache (see [`liger_model::cache`]).
#[derive(Debug, Clone, Default)]
pub struct StateCacheOptions {
    /// Bytes of snapshots kept in memory; 0 turns the cache off.
    pub budget_bytes: usize,
    /// Also keep snapshots here, for restarts and replicas of the same model.
    pub dir: Option<PathBuf>,
}

impl StateCacheOptions {
    /// The cache these options ask for, if any.
    fn build(&self, model: &Model) -> std::io::Result<Option<StateCache>> {
        if self.budget_bytes == 0 {
            return Ok(None);
        }
        let Some(dir) = &self.dir else {
            return Ok(Some(StateCache::new(self.budget_bytes)));
        };
        let made = model.fingerprint().and_then(|id| {
            StateCache::with_dir(self.budget_bytes, dir, model.state_spec().clone(), &id)
        });
        made.map(Some)
            .map_err(|e| std::io::Error::other(format!("--state-cache-dir {}: {e}", dir.display())))
    }
}

/// What the engine thread receives.
pub(super) enum Message {
    Submit(Box<Submission>),
    /// Fail everything held, and everything submitted from now on ([`Engine::shut_down`]).
    ShutDown,
}

/// A request on its way to the engine thread.
pub(super) struct Submission {
    pub request: GenerationRequest,
    pub events: EventSender,
    pub at: Instant,
}

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
        if request.n == 0 || request.n > self.max_running {
            // It could never get its slots, and would block the queue behind it.
            return Err(EngineError::Invalid(format!(
                "n = {} needs more sequence slots than the server has ({})",
                request.n, self.max_running
            )));
        }
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
