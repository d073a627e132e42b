//! Training and evaluation data: files in, fixed-length token chunks out.
//!
//! Accepted files:
//! - plain text (any extension but `.jsonl`, `.ndjson`, `.json`): the whole file is one
//!   document;
//! - JSON Lines (`.jsonl`, `.ndjson`, `.json`), one object per line, with
//!   - `text`: a document;
//!   - `messages`: a conversation (`[{"role", "content"}]`), rendered with the model's chat
//!     template; when it ends with a user turn it is a prompt instead (see `prompt`);
//!   - `prompt`: a user message for the teacher to answer (`--self-distill`).
//!
//! Documents are tokenized, joined with EOS between them, and cut into `seq_len` chunks
//! (packing: no padding, no token wasted). Each token carries a loss flag: every token of a
//! text, only the assistant's tokens of a conversation (what the `lm` stage learns).
//!
//! Errors name the file and, for JSON Lines, the line, so a bad record in a large file is
//! found at once.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Error, Result};
use liger_model::chat::Message;
use liger_model::text::Text;

/// One record of a data file.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    Text(String),
    Conversation(Vec<Message>),
    /// A conversation that ends with a user turn: a prompt for the teacher.
    Prompt(Vec<Message>),
}

/// Whether `path` is read as JSON Lines.
pub fn is_jsonl(path: &Path) -> bool {
    matches!(
        path.extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("jsonl" | "ndjson" | "json")
    )
}

/// Reads every file, in order.
pub fn read_files(paths: &[PathBuf]) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    for p in paths {
        out.extend(read_file(p)?);
    }
    Ok(out)
}

/// Reads one data file (see the module docs for the formats).
pub fn read_file(path: &Path) -> Result<Vec<Entry>> {
    let shown = path.display();
    let bytes = std::fs::read(path).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::NotFound => "no such file".to_owned(),
            std::io::ErrorKind::IsADirectory => "is a folder, not a file".to_owned(),
            _ => e.to_string(),
        };
        Error::Data(format!("data file {shown}: {why}"))
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        Error::Data(format!(
            "data file {shown}: not UTF-8 text (invalid byte at line {line}, byte offset {at})"
        ))
    })?;
    if text.trim().is_empty() {
        return Err(Error::Data(format!("data file {shown}: empty (no text)")));
    }
    if !is_jsonl(path) {
        return Ok(vec![Entry::Text(text)]);
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            parse_line(line)
                .map_err(|why| Error::Data(format!("data file {shown}, line {}: {why}", i + 1)))?,
        );
    }
    Ok(out)
}

fn parse_line(line: &str) -> std::result::Result<Entry, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON ({e})"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| "expected a JSON object".to_owned())?;
    if let Some(t) = obj.get("text") {
        let t = t.as_str().ok_or("`text` must be a string")?;
        if t.trim().is_empty() {
            return Err("`text` is empty".into());
        }
        return Ok(Entry::Text(t.to_owned()));
    }
    if let Some(m) = obj.get("messages") {
        let list = m.as_array().ok_or("`messages` must be a list")?;
        if list.is_empty() {
            return Err("`messages` is empty".into());
        }
        let msgs = list
            .iter()
            .enumerate()
            .map(|(j, m)| parse_message(m).map_err(|why| format!("messages[{j}] {why}")))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        return Ok(if msgs.last().is_some_and(|m| m.role == "user") {
            Entry::Prompt(msgs)
        } else {
            Entry::Conversation(msgs)
        });
    }
    if let Some(p) = obj.get("prompt") {
        let p = p.as_str().ok_or("`prompt` must be a string")?;
        return Ok(Entry::Prompt(vec![Message::new("user", p)]));
    }
    Err("needs a `text`, `messages` or `prompt` field".into())
}

fn parse_message(m: &Value) -> std::result::Result<Message, String> {
    let obj = m.as_object().ok_or("is not an object")?;
    let role = obj
        .get("role")
        .ok_or("has no `role`")?
        .as_str()
        .ok_or("has a `role` that is not a string")?;
    let content = match obj.get("content").ok_or("has no `content`")? {
        Value::String(s) => s.clone(),
        // OpenAI-style content parts: keep the text ones.
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => return Err("has a `content` that is not a string".into()),
    };
    Ok(Message::new(role, content))
}

/// Tokens joined into one stream, with a loss flag per token.
#[derive(Debug, Clone, Default)]
pub struct TokenStream {
    pub tokens: Vec<u32>,
    /// Whether the `lm` stage predicts this token.
    pub learn: Vec<bool>,
    pub documents: usize,
}

impl TokenStream {
    /// Tokenizes `entries` (prompts are skipped: they are not training text) and appends
    /// them, each followed by `eos`.
    pub fn extend(&mut self, entries: &[Entry], text: &Text, eos: u32) -> Result<()> {
        for e in entries {
            match e {
                Entry::Text(t) => {
                    // Plain text gets no special tokens, as in pretraining with packed
                    // documents.
                    let ids = text.encode(t, false)?.get_ids().to_vec();
                    self.learn.extend(std::iter::repeat_n(true, ids.len() + 1));
                    self.tokens.extend(ids);
                    self.tokens.push(eos);
                }
                Entry::Conversation(msgs) => {
                    // Tokenized as serving tokenizes a rendered chat.
                    let (rendered, ranges) = text.template().render_conversation(msgs)?;
                    let enc = text.encode_rendered(&rendered)?;
                    for (&id, &(start, _)) in enc.get_ids().iter().zip(enc.get_offsets()) {
                        self.tokens.push(id);
                        self.learn.push(match &ranges {
                            Some(r) => r.iter().any(|r| r.contains(&start)),
                            None => true,
                        });
                    }
                    // The template already closed the turn; the separator is not learned.
                    self.tokens.push(eos);
                    self.learn.push(false);
                }
                Entry::Prompt(_) => continue,
            }
            self.documents += 1;
        }
        Ok(())
    }

    /// Cuts the stream into chunks of `seq_len` tokens; a shorter tail is kept when it has
    /// at least two tokens (one prediction).
    pub fn chunks(&self, seq_len: usize) -> Vec<Chunk> {
        self.tokens
            .chunks(seq_len)
            .zip(self.learn.chunks(seq_len))
            .filter(|(t, _)| t.len() >= 2)
            .map(|(t, l)| Chunk {
                tokens: t.to_vec(),
                learn: l.to_vec(),
            })
            .collect()
    }
}

/// A training or evaluation sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub tokens: Vec<u32>,
    pub learn: Vec<bool>,
}

/// FNV-1a over the chunks' tokens and flags: two runs on the same data agree on it, which
/// is how `--resume` knows a checkpoint belongs to this data.
/// FNV-1a of some bytes, as hex (identity, not security).
pub fn fingerprint_bytes(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

pub fn fingerprint(chunks: &[Chunk]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |x: u64| {
        for b in x.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for c in chunks {
        eat(c.tokens.len() as u64);
        for (&t, &l) in c.tokens.iter().zip(&c.learn) {
            eat(((t as u64) << 1) | l as u64);
        }
    }
    format!("{h:016x}")
}

/// The order chunks are visited in: a fresh seeded shuffle every epoch, so batch `s` is a
/// pure function of (seed, s) and a resumed run sees exactly the batches it would have.
pub struct Schedule {
    n: usize,
    seed: u64,
    cached: Option<(usize, Vec<usize>)>,
}

impl Schedule {
    pub fn new(n: usize, seed: u64) -> Self {
        Self {
            n,
            seed,
            cached: None,
        }
    }

    fn order(&mut self, epoch: usize) -> &[usize] {
        if self.cached.as_ref().map(|c| c.0) != Some(epoch) {
            let mut rng = liger_model::rng::SplitMix(
                self.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            let mut v: Vec<usize> = (0..self.n).collect();
            for i in (1..v.len()).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                v.swap(i, j);
            }
            self.cached = Some((epoch, v));
        }
        &self.cached.as_ref().expect("just set").1
    }

    /// Chunk indices of batch `step` of `batch` chunks.
    pub fn batch(&mut self, step: usize, batch: usize) -> Vec<usize> {
        (step * batch..(step + 1) * batch)
            .map(|p| {
                let (epoch, i) = (p / self.n, p % self.n);
                self.order(epoch)[i]
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn formats_and_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "a.jsonl",
            br#"{"text": "hello"}

{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]}
{"messages": [{"role": "user", "content": "only a question"}]}
{"prompt": "Write a poem."}
"#,
        );
        let e = read_file(&p).unwrap();
        assert_eq!(e.len(), 4);
        assert_eq!(e[0], Entry::Text("hello".into()));
        assert!(matches!(&e[1], Entry::Conversation(m) if m[1].content == "a"));
        assert!(matches!(&e[2], Entry::Prompt(_)));
        assert!(matches!(&e[3], Entry::Prompt(m) if m[0].content == "Write a poem."));

        let err = |name: &str, body: &[u8]| {
            read_file(&write(d.path(), name, body))
                .unwrap_err()
                .to_string()
        };
        assert!(
            err("b.jsonl", b"{\"text\": \"x\"}\n{oops\n").contains("b.jsonl, line 2: invalid JSON")
        );
        assert!(err("c.jsonl", br#"{"messages": [{"content": "x"}]}"#)
            .contains("line 1: messages[0] has no `role`"));
        assert!(err("d.jsonl", br#"{"messages": [{"role": "user"}]}"#)
            .contains("messages[0] has no `content`"));
        assert!(err("e.txt", b"  \n").contains("e.txt: empty"));
        assert!(
            err("f.txt", b"ok\nbad \xff here").contains("not UTF-8 text (invalid byte at line 2")
        );
        assert!(err("g.jsonl", br#"{"foo": 1}"#).contains("needs a `text`, `messages` or `prompt`"));
        let missing = read_file(&d.path().join("nope.txt"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("nope.txt: no such file"), "{missing}");
    }

    #[test]
    fn schedule_is_a_pure_function_of_seed_and_step() {
        let mut a = Schedule::new(10, 3);
        let first: Vec<Vec<usize>> = (0..7).map(|s| a.batch(s, 3)).collect();
        let mut b = Schedule::new(10, 3);
        assert_eq!(b.batch(5, 3), first[5]);
        assert_eq!(b.batch(1, 3), first[1]);
        // Every epoch visits every chunk once.
        let mut epoch0: Vec<usize> = first.concat()[..10].to_vec();
        epoch0.sort();
        assert_eq!(epoch0, (0..10).collect::<Vec<_>>());
        assert_ne!(
            Schedule::new(10, 4).batch(0, 10),
            Schedule::new(10, 3).batch(0, 10)
        );
    }
}
