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
use serde_json::Value;

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
