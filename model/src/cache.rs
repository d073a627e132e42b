//! The conversation state cache: snapshots of sequence states keyed by the exact token ids
//! they consumed, in a radix tree, so a request resumes from the longest cached prefix of its
//! prompt and processes only the rest.
//!
//! A Liger state is a few MB whatever the history length, so caching one per conversation
//! turn is cheap; turn 20 of a chat then costs only the new message's tokens. Full-attention
//! layers (a served Transformer, or the inter-layer hybrid) keep their KV caches inside the
//! snapshot, so the cache stays correct for them too; their size just grows with the prefix.
//!
//! Memory: entries are evicted least-recently-used first when their bytes exceed the budget.
//! A hit hands out a clone of the snapshot, and states are copy-on-write (tensors are
//! replaced, never mutated, but for a cache's spare rows, which a cache writes only while it
//! holds its buffer alone: `state.rs`), so evicting an entry never disturbs a request that
//! resumed from it: the request's clone keeps the tensors alive until it moves past them.
//!
//! Persistence: with a directory, every snapshot is also written to disk (checked by model
//! fingerprint and a checksum), and a new cache over the same directory indexes those files,
//! so a restarted server, or another replica of the same model, resumes the conversations.
//! A file that fails any check is ignored with a warning, never trusted. Files are written
//! by a background thread, so a server's engine thread never waits on the disk.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

use crate::state::{SequenceState, StateSpec};
use crate::{Error, Result};

/// Counters for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Prompt tokens not recomputed thanks to hits.
    pub hit_tokens: u64,
    pub evictions: u64,
    /// Bytes of snapshots held in memory.
    pub bytes: usize,
    pub entries: usize,
    /// Snapshots known on disk.
    pub disk_entries: usize,
    /// Snapshots that could not be written to disk (a full or vanished folder); each is
    /// logged, and leaves no file behind.
    pub write_failures: u64,
}

/// A successful lookup.
#[derive(Debug, Clone)]
pub struct Hit {
    /// Prompt tokens the state has consumed.
    pub tokens: usize,
    pub state: SequenceState,
}

#[derive(Debug)]
struct Entry {
    /// In memory, or only on disk (loaded on first use).
    state: Option<SequenceState>,
    bytes: usize,
    last_used: u64,
}

/// A radix tree node: `edge` is the token run from the parent to here.
#[derive(Debug, Default)]
struct Node {
    edge: Vec<u32>,
    children: HashMap<u32, Node>,
    entry: Option<Entry>,
}

/// See the module docs.
#[derive(Debug)]
pub struct StateCache {
    root: Node,
    budget_bytes: usize,
    clock: u64,
    stats: CacheStats,
    disk: Option<Disk>,
}

#[derive(Debug)]
struct Disk {
    dir: PathBuf,
    spec: StateSpec,
    /// Identifies the model: snapshots of another model are never used.
    model_id: String,
    writer: Writer,
    /// Files already indexed or rejected (ours included), so a rescan reads only new ones.
    seen: std::collections::HashSet<PathBuf>,
    /// The folder's modification time at the last scan: a new file (another replica's, or
    /// one copied in) changes it.
    scanned_at: Option<std::time::SystemTime>,
}

/// A snapshot to write.
struct Job {
    path: PathBuf,
    model_id: String,
    tokens: Vec<u32>,
    state: SequenceState,
}

/// The background thread that serializes and writes snapshots, in order.
struct Writer {
    tx: Option<mpsc::Sender<Job>>,
    /// Jobs sent and not yet written, with a condition to wait for zero.
    pending: Arc<(Mutex<usize>, Condvar)>,
    /// Jobs that failed.
    failures: Arc<std::sync::atomic::AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

impl Writer {
    fn start() -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let pending = Arc::new((Mutex::new(0usize), Condvar::new()));
        let counter = pending.clone();
        let failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let failed = failures.clone();
        let thread = std::thread::Builder::new()
            .name("liger-state-writer".into())
            .spawn(move || {
                for job in rx {
                    if let Err(e) = write_snapshot(&job) {
                        failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(error = %e, "could not persist a state snapshot");
                    }
                    let (count, done) = &*counter;
                    let mut n = count.lock().unwrap_or_else(|e| e.into_inner());
                    *n -= 1;
                    done.notify_all();
                }
            })
            .map_err(|e| Error::io(Path::new("liger-state-writer thread"), e))?;
        Ok(Self {
            tx: Some(tx),
            pending,
            failures,
            thread: Some(thread),
        })
    }

    fn send(&self, job: Job) {
        let (count, _) = &*self.pending;
        *count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(job).is_ok());
        if !sent {
            *count.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
            tracing::warn!("the state writer thread is gone; snapshot not persisted");
        }
    }

    /// Waits until every snapshot sent so far is on disk (or failed).
    fn flush(&self) {
        let (count, done) = &*self.pending;
        let mut n = count.lock().unwrap_or_else(|e| e.into_inner());
        while *n > 0 {
            n = done.wait(n).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for Writer {
    /// Finishes the queued writes: a server shutting down keeps what it promised to keep.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl StateCache {
    /// An in-memory cache holding at most `budget_bytes` of snapshots.
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            root: Node::default(),
            budget_bytes,
            clock: 0,
            stats: CacheStats::default(),
            disk: None,
        }
    }

    /// A cache that also keeps snapshots in `dir` for model `model_id` (see
    /// [`crate::Model::fingerprint`]) and indexes the valid ones already there.
    pub fn with_dir(
        budget_bytes: usize,
        dir: &Path,
        spec: StateSpec,
        model_id: &str,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut cache = Self::new(budget_bytes);
        cache.disk = Some(Disk {
            dir: dir.to_path_buf(),
            spec,
            model_id: model_id.to_string(),
            writer: Writer::start()?,
            seen: Default::default(),
            scanned_at: None,
        });
        cache.index_new_files();
        Ok(cache)
    }

    pub fn stats(&self) -> CacheStats {
        let write_failures = self.disk.as_ref().map_or(0, |d| {
            d.writer.failures.load(std::sync::atomic::Ordering::Relaxed)
        });
        CacheStats {
            write_failures,
            ..self.stats
        }
    }

    /// Indexes the snapshot files in the folder not seen before, when its modification time
    /// says something was added: replicas sharing a folder resume each other's
    /// conversations, not only those written before they started.
    fn index_new_files(&mut self) {
        let Some(disk) = &mut self.disk else { return };
        let modified = std::fs::metadata(&disk.dir).and_then(|m| m.modified()).ok();
        if modified.is_some() && modified == disk.scanned_at {
            return;
        }
        disk.scanned_at = modified;
        let Ok(entries) = std::fs::read_dir(&disk.dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != SNAPSHOT_EXT) || disk.seen.contains(&path) {
                continue;
            }
            disk.seen.insert(path.clone());
            match read_header(&path, &disk.model_id) {
                Ok(tokens) => {
                    let size = e.metadata().map(|m| m.len() as usize).unwrap_or(0);
                    let node = self.root.insert_path(&tokens);
                    if node.entry.is_none() {
                        node.entry = Some(Entry {
                            state: None,
                            bytes: size,
                            last_used: 0,
                        });
                        self.stats.disk_entries += 1;
                    }
                }
                Err(reason) => {
                    tracing::warn!(file = %path.display(), %reason, "ignoring state snapshot")
                }
            }
        }
    }

    pub fn budget_bytes(&self) -> usize {
        self.budget_bytes
    }

    /// Waits until every snapshot inserted so far is written to the directory (if any).
    pub fn flush(&self) {
        if let Some(d) = &self.disk {
            d.writer.flush();
        }
    }

    /// The longest cached prefix of `prompt` that leaves at least one token to process (the
    /// model must see a token to produce the next one's logits).
    pub fn lookup(&mut self, prompt: &[u32]) -> Option<Hit> {
        self.index_new_files();
        self.clock += 1;
        let limit = prompt.len().saturating_sub(1);
        let mut candidates = self.root.prefixes_with_entries(&prompt[..limit]);
        // Longest first; a disk entry that fails its checks is dropped and the next tried.
        while let Some(len) = candidates.pop() {
            match self.take_state(&prompt[..len]) {
                Some(state) => {
                    self.stats.hits += 1;
                    self.stats.hit_tokens += len as u64;
                    return Some(Hit { tokens: len, state });
                }
                None => continue,
            }
        }
        self.stats.misses += 1;
        None
    }

    /// How many leading tokens of `prompt` [`lookup`](Self::lookup) would resume from (0:
    /// none), without touching the cache's order or counters. A snapshot only on disk
    /// counts, though it may fail its checks when loaded.
    pub fn cached_prefix(&self, prompt: &[u32]) -> usize {
        let limit = prompt.len().saturating_sub(1);
        self.root
            .prefixes_with_entries(&prompt[..limit])
            .last()
            .copied()
            .unwrap_or(0)
    }

    /// How many leading tokens of `tokens` some stored key shares (whether or not a snapshot
    /// sits exactly there). A request that diverges from a cached conversation at this point
    /// should store a snapshot here: the next request with the same prefix (a system prompt,
    /// a few-shot header) then resumes from it.
    pub fn shared_prefix(&self, tokens: &[u32]) -> usize {
        self.root.shared_prefix(tokens)
    }

    /// Stores a snapshot of `state`, which has consumed exactly `tokens`.
    pub fn insert(&mut self, tokens: &[u32], state: &SequenceState) -> Result<()> {
        if tokens.is_empty() || state.position() != tokens.len() {
            return Err(Error::State(format!(
                "snapshot of a state at position {} keyed by {} tokens",
                state.position(),
                tokens.len()
            )));
        }
        let bytes = state.size_bytes();
        if bytes > self.budget_bytes {
            return Ok(()); // would evict everything and still not fit
        }
        self.clock += 1;
        if let Some(disk) = &mut self.disk {
            let path = snapshot_path(disk, tokens);
            disk.seen.insert(path.clone());
            // A clone is cheap (copy-on-write); the writer thread serializes it.
            disk.writer.send(Job {
                path,
                model_id: disk.model_id.clone(),
                tokens: tokens.to_vec(),
                state: state.clone(),
            });
        }
        let clock = self.clock;
        let node = self.root.insert_path(tokens);
        match &mut node.entry {
            Some(e) => {
                if e.state.is_some() {
                    self.stats.bytes -= e.bytes;
                } else {
                    self.stats.entries += 1;
                }
                *e = Entry {
                    state: Some(state.clone()),
                    bytes,
                    last_used: clock,
                };
            }
            None => {
                node.entry = Some(Entry {
                    state: Some(state.clone()),
                    bytes,
                    last_used: clock,
                });
                self.stats.entries += 1;
                if self.disk.is_some() {
                    self.stats.disk_entries += 1;
                }
            }
        }
        self.stats.bytes += bytes;
        self.evict();
        Ok(())
    }

    /// The in-memory state at exactly `tokens`, loading it from disk if needed.
    fn take_state(&mut self, tokens: &[u32]) -> Option<SequenceState> {
        let clock = self.clock;
        let node = self.root.find_mut(tokens)?;
        let entry = node.entry.as_mut()?;
        entry.last_used = clock;
        if let Some(s) = &entry.state {
            return Some(s.clone());
        }
        let disk = self.disk.as_ref()?;
        // Its file may still be on its way to the disk.
        disk.writer.flush();
        match read_snapshot(disk, tokens) {
            Ok(state) => {
                entry.bytes = state.size_bytes();
                entry.state = Some(state.clone());
                self.stats.bytes += entry.bytes;
                self.stats.entries += 1;
                self.evict();
                Some(state)
            }
            Err(reason) => {
                tracing::warn!(%reason, "ignoring state snapshot");
                node.entry = None;
                self.stats.disk_entries -= 1;
                None
            }
        }
    }

    /// Drops least-recently-used in-memory snapshots until within budget. With a directory,
    /// an evicted snapshot stays on disk and can come back.
    fn evict(&mut self) {
        while self.stats.bytes > self.budget_bytes {
            let Some((path, _)) = self.root.oldest_in_memory(Vec::new()) else {
                return;
            };
            let keep_on_disk = self.disk.is_some();
            let node = self.root.find_mut(&path).expect("path from the tree");
            let entry = node.entry.as_mut().expect("oldest has an entry");
            self.stats.bytes -= entry.bytes;
            self.stats.entries -= 1;
            self.stats.evictions += 1;
            if keep_on_disk {
                entry.state = None;
            } else {
                node.entry = None;
                self.root.prune(&path);
            }
        }
    }
}

impl Node {
    /// The node for exactly `tokens`, creating (and splitting edges) as needed.
    fn insert_path(&mut self, tokens: &[u32]) -> &mut Node {
        if tokens.is_empty() {
            return self;
        }
        let child = match self.children.entry(tokens[0]) {
            MapEntry::Vacant(v) => {
                return v.insert(Node {
                    edge: tokens.to_vec(),
                    ..Default::default()
                })
            }
            MapEntry::Occupied(o) => o.into_mut(),
        };
        let common = child
            .edge
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count();
        if common < child.edge.len() {
            // Split the edge at the divergence point.
            let tail = child.edge.split_off(common);
            let moved = Node {
                edge: tail.clone(),
                children: std::mem::take(&mut child.children),
                entry: child.entry.take(),
            };
            child.children.insert(tail[0], moved);
        }
        child.insert_path(&tokens[common..])
    }

    fn find_mut(&mut self, tokens: &[u32]) -> Option<&mut Node> {
        if tokens.is_empty() {
            return Some(self);
        }
        let child = self.children.get_mut(&tokens[0])?;
        if tokens.len() < child.edge.len() || tokens[..child.edge.len()] != child.edge[..] {
            return None;
        }
        let n = child.edge.len();
        child.find_mut(&tokens[n..])
    }

    fn shared_prefix(&self, tokens: &[u32]) -> usize {
        let (mut node, mut depth) = (self, 0);
        loop {
            let Some(child) = tokens.get(depth).and_then(|t| node.children.get(t)) else {
                return depth;
            };
            let rest = &tokens[depth..];
            let common = child
                .edge
                .iter()
                .zip(rest)
                .take_while(|(a, b)| a == b)
                .count();
            depth += common;
            if common < child.edge.len() {
                return depth;
            }
            node = child;
        }
    }

    /// Lengths of the prefixes of `tokens` that have an entry, shortest first.
    fn prefixes_with_entries(&self, tokens: &[u32]) -> Vec<usize> {
        let mut out = Vec::new();
        let (mut node, mut depth) = (self, 0);
        loop {
            let Some(child) = tokens.get(depth).and_then(|t| node.children.get(t)) else {
                return out;
            };
            let rest = &tokens[depth..];
            if rest.len() < child.edge.len() || rest[..child.edge.len()] != child.edge[..] {
                return out;
            }
            depth += child.edge.len();
            if child.entry.is_some() {
                out.push(depth);
            }
            node = child;
        }
    }

    /// Path and clock of the least recently used in-memory entry below this node.
    fn oldest_in_memory(&self, path: Vec<u32>) -> Option<(Vec<u32>, u64)> {
        let mut best = self
            .entry
            .as_ref()
            .filter(|e| e.state.is_some())
            .map(|e| (path.clone(), e.last_used));
        for child in self.children.values() {
            let mut p = path.clone();
            p.extend_from_slice(&child.edge);
            if let Some(c) = child.oldest_in_memory(p) {
                if best.as_ref().is_none_or(|b| c.1 < b.1) {
                    best = Some(c);
                }
            }
        }
        best
    }

    /// Removes empty leaves along `tokens` and merges single-child nodes, keeping the tree
    /// as small as its entries.
    fn prune(&mut self, tokens: &[u32]) {
        let Some(&first) = tokens.first() else { return };
        let Some(child) = self.children.get_mut(&first) else {
            return;
        };
        let n = child.edge.len().min(tokens.len());
        child.prune(&tokens[n..]);
        if child.entry.is_none() {
            match child.children.len() {
                0 => {
                    self.children.remove(&first);
                }
                1 => {
                    let (_, grandchild) = child.children.drain().next().expect("one child");
                    let mut edge = std::mem::take(&mut child.edge);
                    edge.extend_from_slice(&grandchild.edge);
                    *child = Node { edge, ..grandchild };
                }
                _ => {}
            }
        }
    }
}

const SNAPSHOT_EXT: &str = "state";
const MAGIC: &[u8; 8] = b"LIGERST1";

fn snapshot_path(disk: &Disk, tokens: &[u32]) -> PathBuf {
    let mut h = Sha256::new();
    h.update(disk.model_id.as_bytes());
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    let name: String = h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    disk.dir.join(format!("{name}.{SNAPSHOT_EXT}"))
}

/// File layout: MAGIC, u32 header length, header JSON {model_id, tokens, sha256 of the state
/// bytes}, then the state bytes ([`SequenceState::to_bytes`]).
fn write_snapshot(job: &Job) -> Result<()> {
    let body = job.state.to_bytes()?;
    let header = serde_json::json!({
        "model_id": job.model_id,
        "tokens": job.tokens,
        "sha256": hex(&Sha256::digest(&body)),
    })
    .to_string();
    let mut out = Vec::with_capacity(12 + header.len() + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&body);
    write_atomically(&job.path, &out)
}

/// Writes `bytes` to a temporary file beside `path`, then renames it into place, so a crash
/// never leaves a half-written snapshot under the real name; a failed write removes its
/// temporary file. The temporary name is unique to this process and write: replicas sharing
/// a folder may write the same snapshot at once.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp-{}-{n}", std::process::id()));
    let written = std::fs::write(&tmp, bytes)
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn parse_header(bytes: &[u8]) -> std::result::Result<(serde_json::Value, usize), String> {
    if bytes.len() < 12 || &bytes[..8] != MAGIC {
        return Err("not a state snapshot".into());
    }
    let len = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    let end = 12usize
        .checked_add(len)
        .filter(|&e| e <= bytes.len())
        .ok_or("truncated header")?;
    let header = serde_json::from_slice(&bytes[12..end]).map_err(|e| format!("bad header: {e}"))?;
    Ok((header, end))
}

fn header_tokens(
    header: &serde_json::Value,
    model_id: &str,
) -> std::result::Result<Vec<u32>, String> {
    if header["model_id"] != model_id {
        return Err("snapshot of another model".into());
    }
    header["tokens"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .map(|t| t.as_u64().and_then(|x| u32::try_from(x).ok()))
                .collect()
        })
        .filter(|t: &Vec<u32>| !t.is_empty())
        .ok_or_else(|| "bad token list".into())
}

/// Reads just enough of a file to index it.
fn read_header(path: &Path, model_id: &str) -> std::result::Result<Vec<u32>, String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    f.read_exact(&mut head).map_err(|_| "truncated")?;
    let len = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) as usize;
    if &head[..8] != MAGIC || len > 64 << 20 {
        return Err("not a state snapshot".into());
    }
    let mut buf = head.to_vec();
    buf.resize(12 + len, 0);
    f.read_exact(&mut buf[12..])
        .map_err(|_| "truncated header")?;
    let (header, _) = parse_header(&buf)?;
    header_tokens(&header, model_id)
}

/// Reads and fully checks a snapshot: model, key, checksum, and shape against the model.
fn read_snapshot(disk: &Disk, tokens: &[u32]) -> std::result::Result<SequenceState, String> {
    let path = snapshot_path(disk, tokens);
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (header, body_start) = parse_header(&bytes)?;
    if header_tokens(&header, &disk.model_id)? != tokens {
        return Err("snapshot keyed by other tokens".into());
    }
    let body = &bytes[body_start..];
    if header["sha256"] != hex(&Sha256::digest(body)) {
        return Err(format!("{}: checksum mismatch", path.display()));
    }
    let state = SequenceState::from_bytes(&disk.spec, body).map_err(|e| e.to_string())?;
    if state.position() != tokens.len() {
        return Err("snapshot position does not match its tokens".into());
    }
    Ok(state)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_no_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.snap");
        write_atomically(&path, b"one").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        // The rename cannot replace a non-empty folder: the write fails and cleans up.
        let blocked = dir.path().join("y.snap");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("inside"), b"").unwrap();
        assert!(write_atomically(&blocked, b"two").is_err());
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["x.snap", "y.snap"]);
    }
}
