//! One choice of a request while it decodes: its state slot, sampler, penalty history,
//! incremental detokenizer and stop matcher, and the rules that end it.

use std::collections::HashSet;

use liger_model::{Backup, Slot};

use tracing::warn;

use super::sampling::{token_logprob, History, Sampler};
use super::{Event, FinishReason, GenerationRequest, SamplingParams};
use crate::text::grammar::Guide;
use crate::text::{Codec, IncrementalDecoder, StopMatcher};

/// What all choices of a request share.
#[derive(Debug)]
pub struct Shared {
    pub sampling: SamplingParams,
    pub prompt_len: usize,
    /// Distinct prompt tokens, for the repetition penalty.
    pub prompt_tokens: HashSet<u32>,
    pub max_tokens: usize,
    pub min_tokens: usize,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    pub logprobs: Option<usize>,
    pub eos: Vec<u32>,
    pub max_model_len: usize,
}

impl Shared {
    pub fn new(req: &GenerationRequest, eos: &[u32], max_model_len: usize) -> Self {
        Self {
            sampling: req.sampling.clone(),
            prompt_len: req.prompt.len(),
            prompt_tokens: if req.sampling.repetition_penalty() != 1.0 {
                req.prompt.iter().copied().collect()
            } else {
                HashSet::new()
            },
            max_tokens: req.max_tokens,
            min_tokens: req.min_tokens,
            ignore_eos: req.ignore_eos,
            stop: req.stop.clone(),
            logprobs: req.logprobs,
            eos: eos.to_vec(),
            max_model_len,
        }
    }
}

/// A decoding sequence.
#[derive(Debug)]
pub struct Choice {
    pub index: usize,
    pub slot: Slot,
    /// The token to feed at the next step.
    pub next: u32,
    pub generated: usize,
    /// Every token generated so far; the state has read `tokens[..fed]`.
    pub tokens: Vec<u32>,
    /// How many of `tokens` the state has read: all but the last, or fewer after a
    /// speculative step gave back a rejected draft ([`super::speculate`]). The next step
    /// feeds `tokens[fed..]`.
    pub fed: usize,
    /// This step's drafted tokens, fed after `tokens[fed..]`.
    pub drafts: Vec<u32>,
    /// The state before this step, while it carries drafts.
    pub backup: Option<Backup>,
    /// Steps left without drafts, and how many the next wholly rejected draft skips.
    pub draft_pause: u32,
    draft_backoff: u32,
    sampler: Sampler,
    history: History,
    detok: IncrementalDecoder,
    stops: StopMatcher,
    /// Structured output: the grammar this choice's tokens follow.
    pub guide: Option<Guide>,
}

impl Choice {
    pub fn new(
        index: usize,
        slot: Slot,
        prompt: &[u32],
        shared: &Shared,
        guide: Option<Guide>,
    ) -> Self {
        Self {
            index,
            slot,
            next: 0,
            generated: 0,
            tokens: Vec::new(),
            fed: 0,
            drafts: Vec::new(),
            backup: None,
            draft_pause: 0,
            draft_backoff: 0,
            sampler: Sampler::new(shared.sampling.seed(), index),
            history: History::default(),
            detok: IncrementalDecoder::new(prompt),
            stops: StopMatcher::new(shared.stop.clone()),
            guide,
        }
    }

    /// Generated tokens the state has not read, besides the newest: those a rejected draft
    /// gave back, fed again at the front of the next step.
    pub fn unread(&self) -> usize {
        self.tokens.len() - 1 - self.fed
    }

    /// Whether this choice drafts nothing whatever its pause: a grammar's next mask is
    /// computed for one token, and tokens read again after a rejected draft are fed before
    /// new drafts are taken (`tokens` drafted tokens at most).
    pub fn cannot_draft(&self, tokens: usize) -> bool {
        self.guide.is_some() || self.unread() >= tokens
    }

    /// Whether this step reads only the argmax of this choice's logits, on every row it
    /// feeds (`liger_model::SeqStep::argmax_only`): a greedy pick, with no grammar mask, no
    /// token banned (`min_tokens` reached: later rows stay past it) and no logprobs to
    /// report. Anything else needs every logit.
    pub fn argmax_only(&self, shared: &Shared) -> bool {
        shared.sampling.picks_argmax()
            && shared.logprobs.is_none()
            && self.guide.is_none()
            && self.generated >= shared.min_tokens
    }

    /// The tokens this step feeds: the unread generated ones, then the drafts.
    pub fn step_input(&self) -> Vec<u32> {
        [&self.tokens[self.fed..], self.drafts.as_slice()].concat()
    }

    /// After a step that confirmed `accepted` of its drafts: the state keeps what it read
    /// when all were (or there were none), and is given its backup back otherwise;
    /// `before` is how many tokens there were when the step started.
    ///
    /// A step whose drafts all miss costs more than a plain one (its rows, and the token
    /// fed again next step), so such a step pauses drafting for 1, 2, 4 ... 16 steps, until
    /// a draft is confirmed again: text that does not repeat itself is decoded almost as
    /// without drafts.
    pub fn settle(&mut self, before: usize, accepted: usize) -> liger_model::Result<()> {
        let rejected = accepted < self.drafts.len();
        if !self.drafts.is_empty() {
            self.draft_backoff = if accepted == 0 {
                (self.draft_backoff * 2).clamp(1, 16)
            } else {
                0
            };
            self.draft_pause = self.draft_backoff;
        }
        let backup = self.backup.take();
        let drafted = std::mem::take(&mut self.drafts).len();
        if rejected {
            let backup = backup.expect("a step with drafts keeps a backup");
            backup.restore(&mut self.slot.state)?;
        } else {
            self.fed = before + drafted;
        }
        Ok(())
    }

    /// Samples the next token from `logits` (this choice's last row; scratch, its values
    /// are changed) and returns the events it produces and, when the choice is done, why.
    pub fn advance(
        &mut self,
        logits: &mut [f32],
        shared: &Shared,
        codec: &Codec,
    ) -> (Vec<Event>, Option<FinishReason>) {
        let before_min = self.generated < shared.min_tokens;
        // A grammar decides by itself when the output may end: min_tokens does not hold it
        // open (its end-of-sequence may be the only token left).
        let banned: &[u32] = if before_min && self.guide.is_none() {
            &shared.eos
        } else {
            &[]
        };
        // Logprobs are the model's, before the grammar's mask (as vLLM reports them).
        let logprob_of = shared.logprobs.map(|k| (k, logits.to_vec()));
        if let Some(guide) = &mut self.guide {
            if let Err(e) = guide.apply(logits) {
                // Cannot happen with a grammar that compiled, short of a bug in the matcher:
                // end the choice rather than emit an unconstrained token.
                warn!(error = %e, "grammar mask failed; ending the choice");
                let checking = self.generated >= shared.min_tokens;
                return self.finish(Vec::new(), FinishReason::Stop, codec, checking);
            }
        }
        let token = self.sampler.sample(
            &shared.sampling,
            logits,
            &shared.prompt_tokens,
            &self.history,
            banned,
        );
        let logprob = logprob_of.map(|(k, l)| token_logprob(&l, token, k));
        let mut grammar_done = false;
        if let Some(guide) = &mut self.guide {
            if let Err(e) = guide.consume(token) {
                warn!(error = %e, token, "grammar refused a token it allowed; ending the choice");
            }
            grammar_done = guide.is_stopped();
        }
        self.generated += 1;
        self.tokens.push(token);
        *self.history.output_counts.entry(token).or_insert(0) += 1;
        self.next = token;

        // vLLM's rule: neither end-of-sequence nor stop strings count before min_tokens.
        let checking = self.generated >= shared.min_tokens;
        let piece = self.detok.push(codec, token);
        let released = self.stops.push(&piece, checking);
        let mut events = vec![Event::Token {
            choice: self.index,
            token,
            text: released.text,
            logprob,
        }];
        let at_eos = checking && !shared.ignore_eos && shared.eos.contains(&token);
        let reason = if released.stopped || at_eos || grammar_done {
            Some(FinishReason::Stop)
        } else if self.generated >= shared.max_tokens
            || shared.prompt_len + self.generated >= shared.max_model_len
        {
            Some(FinishReason::Length)
        } else {
            None
        };
        match reason {
            None => (events, None),
            Some(_) if released.stopped => {
                events.push(Event::Finished {
                    choice: self.index,
                    reason: FinishReason::Stop,
                    text: String::new(),
                });
                (events, Some(FinishReason::Stop))
            }
            Some(reason) => self.finish(events, reason, codec, checking),
        }
    }

    /// Ends the choice: releases what was held back (unfinished characters, then possible
    /// stop prefixes, which the last characters may still complete into a stop string).
    fn finish(
        &mut self,
        mut events: Vec<Event>,
        mut reason: FinishReason,
        codec: &Codec,
        checking: bool,
    ) -> (Vec<Event>, Option<FinishReason>) {
        let mut tail = String::new();
        let last = self.stops.push(&self.detok.flush(codec), checking);
        tail.push_str(&last.text);
        if last.stopped {
            reason = FinishReason::Stop;
        } else {
            tail.push_str(&self.stops.flush());
        }
        events.push(Event::Finished {
            choice: self.index,
            reason,
            text: tail,
        });
        (events, Some(reason))
    }
}
