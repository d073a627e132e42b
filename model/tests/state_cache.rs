//! The conversation state cache: longest-prefix hits resume exactly, eviction respects the
//! byte budget, and snapshots on disk survive a restart but are never trusted blindly.

use candle_core::{DType, Tensor};
use liger_model::cache::StateCache;
use liger_model::testing::{count_files, Family, SplitMix, TinyCheckpoint};
use liger_model::{LigerConfig, Logits, Model};

fn model(seed: u64) -> Model {
    let l = LigerConfig {
        window: 4,
        ..Default::default()
    };
    TinyCheckpoint::new(Family::Llama, seed)
        .unwrap()
        .with_liger(&l)
        .model(DType::F32)
        .unwrap()
}

fn tokens(seed: u64, n: usize) -> Vec<u32> {
    SplitMix(seed).tokens(n, 61)
}

use liger_model::testing::max_abs_diff as max_diff;

/// Runs `prompt` through the cache the way a server does: resume from the longest hit,
/// process the rest, snapshot the result. Returns the last logits and the hit length.
fn serve(m: &Model, cache: &mut StateCache, prompt: &[u32]) -> (Tensor, usize) {
    let (mut state, done) = match cache.lookup(prompt) {
        Some(hit) => (hit.state, hit.tokens),
        None => (m.new_state().unwrap(), 0),
    };
    let logits = m
        .forward(&prompt[done..], &mut state, Logits::Last)
        .unwrap();
    cache.insert(prompt, &state).unwrap();
    (logits, done)
}

fn uncached(m: &Model, prompt: &[u32]) -> Tensor {
    m.forward(prompt, &mut m.new_state().unwrap(), Logits::Last)
        .unwrap()
}

#[test]
fn conversation_turns_resume_from_the_previous_turn() {
    let m = model(1);
    let mut cache = StateCache::new(usize::MAX);
    let mut conversation = tokens(1, 7);
    for turn in 0..5u64 {
        let (logits, hit) = serve(&m, &mut cache, &conversation);
        assert!(
            max_diff(&logits, &uncached(&m, &conversation)) < 1e-4,
            "turn {turn}"
        );
        let previous = conversation.len();
        assert_eq!(
            hit,
            if turn == 0 { 0 } else { previous - 6 },
            "turn {turn} reuses the last turn"
        );
        conversation.extend(tokens(10 + turn, 6));
    }
    let s = cache.stats();
    assert_eq!((s.hits, s.misses), (4, 1));
    assert_eq!(s.entries, 5);
}

#[test]
fn shared_prefixes_branch_and_never_match_other_tokens() {
    let m = model(2);
    let mut cache = StateCache::new(usize::MAX);
    let system = tokens(2, 10);
    let a = [system.clone(), tokens(3, 4)].concat();
    let b = [system.clone(), tokens(4, 5)].concat();
    cache
        .insert(&system, &{
            let mut s = m.new_state().unwrap();
            m.forward(&system, &mut s, Logits::Last).unwrap();
            s
        })
        .unwrap();
    for p in [&a, &b] {
        let (logits, hit) = serve(&m, &mut cache, p);
        assert_eq!(hit, system.len());
        assert!(max_diff(&logits, &uncached(&m, p)) < 1e-4);
    }
    // A prompt equal to a cached key still leaves one token to process.
    let hit = cache.lookup(&a).unwrap();
    assert_eq!(hit.tokens, system.len());
    // What a lookup would resume from, asked without a lookup's side effects.
    let before = cache.stats();
    assert_eq!(cache.cached_prefix(&b), system.len());
    assert_eq!(
        cache.cached_prefix(&system),
        0,
        "one token must be left to read"
    );
    assert_eq!(cache.stats(), before);
    // A prompt that diverges inside the first edge gets nothing.
    let mut other = system.clone();
    other[3] = (other[3] + 1) % 61;
    assert!(cache.lookup(&other).is_none());
    // Where a prompt leaves the stored keys, whether or not a snapshot sits there.
    assert_eq!(cache.shared_prefix(&other), 3);
    assert_eq!(cache.shared_prefix(&a), a.len());
    let c = [system.clone(), vec![a[10]], tokens(9, 3)].concat();
    assert_eq!(cache.shared_prefix(&c), system.len() + 1);
    assert_eq!(cache.shared_prefix(&[]), 0);
}

#[test]
fn eviction_keeps_within_budget_and_is_lru() {
    let m = model(3);
    let one = {
        let mut s = m.new_state().unwrap();
        m.forward(&tokens(5, 8), &mut s, Logits::Last).unwrap();
        s.size_bytes()
    };
    let mut cache = StateCache::new(2 * one + one / 2);
    let prompts: Vec<Vec<u32>> = (0..3).map(|i| tokens(20 + i, 9)).collect();
    serve(&m, &mut cache, &prompts[0]);
    serve(&m, &mut cache, &prompts[1]);
    // Touch the first so the second is the least recently used.
    assert!(cache
        .lookup(&[prompts[0].clone(), vec![1]].concat())
        .is_some());
    serve(&m, &mut cache, &prompts[2]);
    let s = cache.stats();
    assert!(s.bytes <= cache.budget_bytes());
    assert_eq!((s.entries, s.evictions), (2, 1));
    assert!(
        cache
            .lookup(&[prompts[1].clone(), vec![1]].concat())
            .is_none(),
        "LRU entry evicted"
    );
    assert!(cache
        .lookup(&[prompts[0].clone(), vec![1]].concat())
        .is_some());
    // After eviction, results are still exact.
    let (logits, _) = serve(&m, &mut cache, &prompts[1]);
    assert!(max_diff(&logits, &uncached(&m, &prompts[1])) < 1e-4);
}

#[test]
fn snapshots_on_disk_survive_a_restart_and_are_checked() {
    let m = model(4);
    let id = m.fingerprint().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let prompt = tokens(30, 12);
    {
        let mut cache =
            StateCache::with_dir(usize::MAX, dir.path(), m.state_spec().clone(), &id).unwrap();
        serve(&m, &mut cache, &prompt);
    }
    let next = [prompt.clone(), tokens(31, 3)].concat();
    let mut restarted =
        StateCache::with_dir(usize::MAX, dir.path(), m.state_spec().clone(), &id).unwrap();
    assert_eq!(restarted.stats().disk_entries, 1);
    let (logits, hit) = serve(&m, &mut restarted, &next);
    assert_eq!(hit, prompt.len());
    assert!(max_diff(&logits, &uncached(&m, &next)) < 1e-4);

    // Another model (different weights) never sees these snapshots.
    let other = model(5);
    let other_id = other.fingerprint().unwrap();
    assert_ne!(other_id, id);
    let mut foreign = StateCache::with_dir(
        usize::MAX,
        dir.path(),
        other.state_spec().clone(),
        &other_id,
    )
    .unwrap();
    assert_eq!(foreign.stats().disk_entries, 0);
    assert!(foreign.lookup(&next).is_none());

    // A corrupted file is ignored (with a warning) and the request still succeeds.
    for f in std::fs::read_dir(dir.path()).unwrap() {
        let p = f.unwrap().path();
        let mut bytes = std::fs::read(&p).unwrap();
        let n = bytes.len();
        bytes[n - 5] ^= 0xff;
        std::fs::write(&p, bytes).unwrap();
    }
    let mut corrupted =
        StateCache::with_dir(usize::MAX, dir.path(), m.state_spec().clone(), &id).unwrap();
    assert!(
        corrupted.lookup(&next).is_none(),
        "checksum must reject the file"
    );
    let (logits, hit) = serve(&m, &mut corrupted, &next);
    assert_eq!(hit, 0);
    assert!(max_diff(&logits, &uncached(&m, &next)) < 1e-4);
}

#[test]
fn transformer_snapshots_carry_their_kv_cache() {
    let m = TinyCheckpoint::new(Family::Mistral, 6)
        .unwrap()
        .model(DType::F32)
        .unwrap();
    let mut cache = StateCache::new(usize::MAX);
    let mut convo = tokens(40, 5);
    for turn in 0..3u64 {
        let (logits, _) = serve(&m, &mut cache, &convo);
        assert!(
            max_diff(&logits, &uncached(&m, &convo)) < 1e-4,
            "turn {turn}"
        );
        convo.extend(tokens(41 + turn, 4));
    }
    assert_eq!(cache.stats().hits, 2);
}

#[test]
fn an_evicted_snapshot_comes_back_from_disk_while_writes_are_in_flight() {
    let m = model(7);
    let id = m.fingerprint().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let one = m.state_spec().bytes_at(9);
    // Room for one snapshot in memory: the second insert evicts the first to disk.
    let mut cache =
        StateCache::with_dir(one + one / 2, dir.path(), m.state_spec().clone(), &id).unwrap();
    let (a, b) = (tokens(40, 9), tokens(41, 9));
    serve(&m, &mut cache, &a);
    serve(&m, &mut cache, &b);
    assert_eq!(cache.stats().entries, 1);
    assert_eq!(cache.stats().evictions, 1);
    // No flush here: the lookup itself waits for the background write.
    let next = [a.clone(), tokens(42, 4)].concat();
    let (logits, hit) = serve(&m, &mut cache, &next);
    assert_eq!(hit, a.len(), "reloaded from disk");
    assert!(max_diff(&logits, &uncached(&m, &next)) < 1e-4);
    cache.flush();
    assert_eq!(count_files(dir.path(), "state"), 3);
}

#[test]
fn replicas_sharing_a_folder_resume_each_others_conversations() {
    let m = model(8);
    let id = m.fingerprint().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let open =
        || StateCache::with_dir(usize::MAX, dir.path(), m.state_spec().clone(), &id).unwrap();
    // Both start on an empty folder; one serves a conversation's first turn.
    let (mut a, mut b) = (open(), open());
    let prompt = tokens(50, 15);
    serve(&m, &mut a, &prompt);
    a.flush();
    // The other picks the snapshot up at its next lookup, not only at startup.
    let next = [prompt.clone(), tokens(51, 3)].concat();
    let (logits, hit) = serve(&m, &mut b, &next);
    assert_eq!(hit, prompt.len());
    assert!(max_diff(&logits, &uncached(&m, &next)) < 1e-4);
}

#[test]
fn snapshots_that_cannot_be_written_are_counted_and_serving_goes_on() {
    let m = model(6);
    let id = m.fingerprint().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("states");
    let mut cache = StateCache::with_dir(usize::MAX, &folder, m.state_spec().clone(), &id).unwrap();
    assert_eq!(cache.stats().write_failures, 0);
    // The folder disappears under the server (an unmounted volume, say).
    std::fs::remove_dir_all(&folder).unwrap();
    let prompt = tokens(40, 9);
    let (logits, _) = serve(&m, &mut cache, &prompt);
    assert!(max_diff(&logits, &uncached(&m, &prompt)) < 1e-4);
    cache.flush();
    assert_eq!(cache.stats().write_failures, 1);
    // The snapshot is still served from memory.
    let next = [prompt.clone(), tokens(41, 2)].concat();
    let (_, hit) = serve(&m, &mut cache, &next);
    assert_eq!(hit, prompt.len());
}
