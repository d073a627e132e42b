//! Server-sent events in OpenAI's streaming format: `data: {json}\n\n` chunks, then
//! `data: [DONE]`. An endpoint supplies a [`Chunker`] that turns engine events into chunk
//! objects; this module merges the events of every prompt of a request and frames them.
//!
//! The response body owns the engine receivers, so a client that disconnects drops them
//! and the engine frees the request's slots at its next step.

use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, BoxStream, StreamExt};
use serde_json::{json, Value};

use super::output::{Completeness, Usage};
use crate::engine::{Event, EventReceiver};

/// Formats one endpoint's chunks.
pub trait Chunker: Send + 'static {
    /// Chunks sent before any event (the chat role delta).
    fn start(&mut self) -> Vec<Value>;
    /// Chunks for one event of prompt `prompt`.
    fn event(&mut self, prompt: usize, event: Event) -> Vec<Value>;
    /// Chunks after the last event (the usage chunk).
    fn end(&mut self) -> Vec<Value>;
}

/// Engine events of all prompts, tagged with the prompt's index.
fn merged(receivers: Vec<EventReceiver>) -> BoxStream<'static, (usize, Event)> {
    stream::select_all(receivers.into_iter().enumerate().map(|(p, rx)| {
        stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) })
            .map(move |e| (p, e))
            .boxed()
    }))
    .boxed()
}

/// The SSE response for a request's receivers.
pub fn sse_response(receivers: Vec<EventReceiver>, mut chunker: impl Chunker) -> Response {
    let head = chunker.start();
    let body = stream::unfold(Some((merged(receivers), chunker)), |st| async move {
        let (mut events, mut chunker) = st?;
        match events.next().await {
            Some((p, e)) => Some((chunker.event(p, e), Some((events, chunker)))),
            None => Some((chunker.end(), None)),
        }
    });
    let frames = stream::iter(head)
        .chain(body.flat_map(stream::iter))
        .map(|v| v.to_string())
        .chain(stream::once(async { "[DONE]".to_string() }))
        .map(|data| Ok::<_, Infallible>(SseEvent::default().data(data)));
    Sse::new(frames).into_response()
}

/// What both endpoints' chunkers do alike: the chunk envelope (`id`, `object`, `created`,
/// `model`, and `usage: null` on every chunk when usage is asked for, as OpenAI sends it),
/// the token counts, whether every choice finished, and the closing chunks.
pub struct Envelope {
    pub id: String,
    /// `chat.completion.chunk` or `text_completion`.
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
    /// Choices expected to finish (`n` per prompt).
    pub done: Completeness,
}

impl Envelope {
    /// A chunk carrying `choices`.
    pub fn chunk(&self, choices: Value) -> Value {
        let mut c = json!({
            "id": self.id, "object": self.object, "created": self.created,
            "model": self.model, "choices": choices,
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    /// Counts what `event` says about usage and completion. A failure's chunk is the
    /// OpenAI error body, returned here so both endpoints send it alike.
    pub fn count(&mut self, event: &Event) -> Option<Value> {
        match event {
            Event::Cached(n) => self.cached_tokens += n,
            Event::Token { .. } => self.completion_tokens += 1,
            Event::Finished { .. } => self.done.finished += 1,
            Event::Failed(e) => {
                self.done.failed = true;
                return Some(crate::error::ApiError::from(e.clone()).body());
            }
            Event::Prompt(_) => {}
        }
        None
    }

    /// The closing chunks: an error if the stream was cut short, then the usage chunk
    /// when asked for.
    pub fn end(&self) -> Vec<Value> {
        let mut out: Vec<Value> = self.done.error_at_end().into_iter().collect();
        if self.include_usage {
            let mut c = self.chunk(json!([]));
            c["usage"] = json!(Usage::new(
                self.prompt_tokens,
                self.completion_tokens,
                self.cached_tokens,
            ));
            out.push(c);
        }
        out
    }
}
