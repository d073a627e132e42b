//! Incremental detokenization: turn a growing list of token ids into text deltas without
//! ever splitting a UTF-8 character (or any decoder-level unit) across two deltas.
//!
//! Decoding each token alone is wrong: byte-level tokens can hold half a character, and
//! decoders such as SentencePiece's strip or merge spaces depending on neighbours. Instead we
//! decode a short window twice, with and without the newest tokens, and emit the difference
//! once it no longer ends in U+FFFD (the mark of an unfinished byte sequence).

/// Anything that can turn ids into text (the tokenizer; a byte table in tests).
pub trait Decode {
    fn decode(&self, ids: &[u32]) -> String;
}

/// Prompt tokens kept as left context so the first generated token decodes as it would in
/// the middle of the text (e.g. keeps its leading space).
const CONTEXT: usize = 6;

#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the decode window.
    prefix: usize,
    /// Tokens before this have been emitted as text.
    read: usize,
}

impl IncrementalDecoder {
    /// Starts after `prompt` (only its last few tokens are kept, as context).
    pub fn new(prompt: &[u32]) -> Self {
        let ctx = &prompt[prompt.len().saturating_sub(CONTEXT)..];
        Self {
            ids: ctx.to_vec(),
            prefix: 0,
            read: ctx.len(),
        }
    }

    /// Adds a token; returns the text it completes (often empty for partial characters).
    pub fn push(&mut self, decoder: &impl Decode, id: u32) -> String {
        self.ids.push(id);
        let delta = self.delta(decoder, false);
        if !delta.is_empty() {
            self.prefix = self.read;
            self.read = self.ids.len();
            // Keep only the window: memory stays constant however long the generation.
            self.ids.drain(..self.prefix);
            self.read -= self.prefix;
            self.prefix = 0;
        }
        delta
    }

    /// Everything not yet emitted, incomplete characters included (as U+FFFD).
    pub fn flush(&mut self, decoder: &impl Decode) -> String {
        let delta = self.delta(decoder, true);
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        delta
    }

    fn delta(&self, decoder: &impl Decode, finish: bool) -> String {
        let window = &self.ids[self.prefix..];
        let before = decoder.decode(&self.ids[self.prefix..self.read]);
        // Only a prompt can leave the window ending in half a character; the token that
        // completes it emits the whole character.
        let before = before.trim_end_matches('\u{FFFD}');
        let after = decoder.decode(window);
        if after.len() <= before.len() || (!finish && after.ends_with('\u{FFFD}')) {
            return String::new();
        }
        // A decoder that rewrote earlier text (rare) gives no clean boundary: wait for more.
        match after.get(before.len()..) {
            Some(new) if after.starts_with(before) => new.to_string(),
            _ if finish => after,
            _ => String::new(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Token i is byte i; decoded lossily like a byte-level BPE decoder.
    pub struct Bytes;

    impl Decode for Bytes {
        fn decode(&self, ids: &[u32]) -> String {
            let bytes: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
    }

    fn run(bytes: &[u8]) -> Vec<String> {
        let mut d = IncrementalDecoder::new(&[]);
        let mut out: Vec<String> = bytes.iter().map(|&b| d.push(&Bytes, b as u32)).collect();
        out.push(d.flush(&Bytes));
        out
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let text = "aé€😀b";
        let deltas = run(text.as_bytes());
        assert_eq!(deltas.concat(), text);
        for d in &deltas {
            assert!(!d.contains('\u{FFFD}'), "split character in {deltas:?}");
        }
        // "é" is two bytes: the first gives nothing, the second the whole character.
        assert_eq!(deltas[1], "");
        assert_eq!(deltas[2], "é");
    }

    #[test]
    fn invalid_bytes_come_out_as_replacement_characters_eventually() {
        let deltas = run(&[b'a', 0xC3, b'b', 0xE2, 0x82]);
        assert_eq!(deltas.concat(), "a\u{FFFD}b\u{FFFD}");
        assert_eq!(
            deltas.last().unwrap(),
            "\u{FFFD}",
            "the trailing partial is flushed at the end"
        );
    }

    #[test]
    fn prompt_context_is_not_emitted() {
        let mut d = IncrementalDecoder::new(&[b'x' as u32, 0xC3]);
        // The prompt ended in half a character; completing it emits the character but not "x".
        assert_eq!(d.push(&Bytes, 0xA9), "é");
    }
}
