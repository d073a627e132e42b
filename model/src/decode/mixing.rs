//! Token mixing for one decode token of one sequence and one KV head group, on plain slices:
//! the same math as `attention.rs` and `gla` (LIGER.md §1), written per row so the fused
//! step can run a (sequence, KV head) pair on whichever thread owns it.

use std::mem::MaybeUninit;

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::attend::{attend, Attend};
use super::rows::{sized, write_converted, write_copy, Rows, RowsMut};
use crate::gla::feature::key_row;
use crate::layers::vexp;
use crate::mix::{Mix, Recurrent};

/// One KV head group's inputs: its `g` query heads and its key and value, all pre-RoPE, the
/// group's cache rows (`[len, d]`, post-RoPE keys), its global cache rows (the same; empty
/// without one) and the token's RoPE table.
pub(crate) struct GroupIn<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub cached_k: Rows<'a>,
    pub cached_v: Rows<'a>,
    pub global_k: Rows<'a>,
    pub global_v: Rows<'a>,
    /// Which global rows are past the distance cap (stored un-rotated); empty: none.
    pub global_far: &'a [bool],
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    /// The RoPE table of the distance cap, when some global row is past it.
    pub cap_rope: Option<(&'a [f32], &'a [f32])>,
    /// In a span of several tokens: the rotated keys and the values of the span's tokens
    /// before this one (`[i, d]` each; empty for the first or only one).
    pub earlier: (&'a [f32], &'a [f32]),
    /// Cached rows that have left the window before this token (the first ones): seen
    /// only where they hold a place in the global cache.
    pub left: usize,
    /// Which global rows, then which of the `left` rows, the token does not see (empty:
    /// all global rows are seen, and no row has left).
    pub hidden: &'a [bool],
}

/// Where the group's results go: `out` (`[g, d]`), the token's cache rows (key post-RoPE,
/// value; empty when the cache keeps no rows) and, for Liger layers, the recurrent memory.
pub(crate) struct GroupOut<'a> {
    pub out: &'a mut [f32],
    pub new_k: RowsMut<'a>,
    pub new_v: RowsMut<'a>,
    /// What the global cache's choice needs: the attention shares of the window rows
    /// (cache rows that have not left, the span's earlier tokens, the token) when it gives
    /// places by attention, then the token's recall score when it gives places by recall;
    /// empty otherwise.
    pub salience: &'a mut [f32],
}

/// The recurrent memory of the group's KV head, before and after the token (`[d, d]`); the
/// one after is written whole, so it may start uninitialized (a batch-32 step's new
/// memories are 47 MB, whose zero fill and fresh pages were ~5% of the step).
pub(crate) struct Memory<'a> {
    pub old: &'a [f32],
    pub new: &'a mut [MaybeUninit<f32>],
}

/// Per-thread working memory, reused across groups, layers and tokens.
#[derive(Default)]
pub(crate) struct Scratch {
    q_rot: Vec<f32>,
    q_cap: Vec<f32>,
    k_rot: Vec<f32>,
    probs: Vec<f32>,
    gate: Vec<f32>,
    key: Vec<f32>,
    q_feat: Vec<f32>,
    o_rec: Vec<f32>,
    read: Vec<f32>,
    /// Cached rows widened to f32 (global keys and values, then the window's).
    wide: [Vec<f32>; 4],
    /// A span's rows up to the token: rotated keys, values.
    own: [Vec<f32>; 2],
}

impl Scratch {
    /// The rotated key of the token [`mix_group`] mixed last.
    pub(crate) fn last_key(&self) -> &[f32] {
        &self.k_rot
    }
}

/// Mixes one group. `memory` is needed exactly when `mix` keeps a recurrent memory.
pub(crate) fn mix_group(
    mix: Mix,
    d: usize,
    (x, y): (GroupIn, GroupOut),
    memory: Option<Memory>,
    scratch: &mut Scratch,
) {
    let g = x.q.len() / d;
    // Rotated queries and key, for the softmax/window branch.
    let q_rot = sized(&mut scratch.q_rot, g * d);
    for (qh, qr) in x.q.chunks(d).zip(q_rot.chunks_mut(d)) {
        rope(qh, x.cos, x.sin, qr);
    }
    let k_rot = sized(&mut scratch.k_rot, d);
    rope(x.k, x.cos, x.sin, k_rot);
    // The queries as far global rows (un-rotated keys) see them: rotated by the cap alone.
    let far = match x.cap_rope {
        Some((cos, sin)) if x.global_far.contains(&true) => {
            let q_cap = sized(&mut scratch.q_cap, g * d);
            for (qh, qc) in x.q.chunks(d).zip(q_cap.chunks_mut(d)) {
                rope(qh, cos, sin, qc);
            }
            Some((&*q_cap, x.global_far))
        }
        _ => None,
    };
    let (attention_scores, recall_scores) = mix.scoring();
    // The token's own rows: itself, after the span's earlier tokens.
    let (own_k, own_v): (&[f32], &[f32]) = if x.earlier.0.is_empty() {
        (k_rot, x.v)
    } else {
        let [ok, ov] = &mut scratch.own;
        ok.clear();
        ok.extend_from_slice(x.earlier.0);
        ok.extend_from_slice(k_rot);
        ov.clear();
        ov.extend_from_slice(x.earlier.1);
        ov.extend_from_slice(x.v);
        (ok, ov)
    };
    let rows = (x.cached_k.len() + own_k.len()) / d - x.left;
    let (mass, recall) = y
        .salience
        .split_at_mut(if attention_scores { rows } else { 0 });
    attend(
        &Attend {
            queries: (q_rot, far),
            keys: [x.global_k, x.cached_k, Rows::F32(own_k)],
            values: [x.global_v, x.cached_v, Rows::F32(own_v)],
            d,
            hidden: x.hidden,
            window_from: x.global_k.len() / d + x.left,
        },
        (&mut scratch.probs, &mut scratch.wide),
        (&mut *y.out, attention_scores.then_some(mass)),
    );
    write_row(k_rot, y.new_k);
    write_row(x.v, y.new_v);
    if let Mix::Liger {
        recurrent,
        window_weight,
        recurrent_weight,
        ..
    } = mix
    {
        for o in y.out.iter_mut() {
            *o *= window_weight;
        }
        if let Some(memory) = memory {
            let key_read = recall_scores;
            // Without a read-out (weight 0) the memory is only written and asked at the key.
            let q: &[f32] = if recurrent_weight != 0.0 { x.q } else { &[] };
            recurrent_step(recurrent, (q, x.k, x.v), d, (memory, key_read), scratch);
            for (o, r) in y.out.iter_mut().zip(&scratch.o_rec) {
                *o += recurrent_weight * r;
            }
            if key_read {
                recall[0] = crate::global::salience(x.v, &scratch.read);
            }
        }
    }
}

/// Rotate-half RoPE of one head: `x = [x1, x2]` -> `[x1 cos - x2 sin, x1 sin + x2 cos]`.
pub(crate) fn rope(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        out[i] = a * cos[i] - b * sin[i];
        out[i + half] = a * sin[i] + b * cos[i];
    }
}

/// The token's row `new` in `dst`'s dtype (rounded when `dst` is f16); `dst` is as long,
/// or empty when the cache keeps no rows.
fn write_row(new: &[f32], dst: RowsMut) {
    match dst {
        RowsMut::F32([]) | RowsMut::F16([]) => {}
        RowsMut::F32(d) => write_copy(d, new),
        RowsMut::F16(d) => write_converted(d, new, to_f16),
    }
}

fn to_f16(s: &[f32], d: &mut [f16]) {
    d.convert_from_f32_slice(s);
}

/// One step of the gated recurrence on the group's KV head (`gla::step_reference`):
/// feature maps of the raw q and k, `S' = diag(exp(g)) S + k'^T v`, `o = q' S'` per query
/// head; with `key_read`, also the memory's answer to the key from before the token,
/// `k' S' - |k'|^2 v` (into `scratch.read`, as the general path computes it).
fn recurrent_step(
    r: Recurrent,
    (q, k, v): (&[f32], &[f32], &[f32]),
    d: usize,
    (memory, key_read): (Memory, bool),
    scratch: &mut Scratch,
) {
    // The same feature maps as prefill's (`gla::feature::host_maps`); GSA never reaches
    // here (`super::applies` sends it to the general path).
    let gate = sized(&mut scratch.gate, d);
    let key = sized(&mut scratch.key, d);
    key_row(r.variant, 1.0 / r.gate_normalizer, k, gate, key);
    let qf = sized(&mut scratch.q_feat, q.len());
    qf.copy_from_slice(q);
    for qh in qf.chunks_mut(d) {
        vexp::softmax(qh);
    }
    let out = sized(&mut scratch.o_rec, q.len());
    out.fill(0.0);
    let read = sized(&mut scratch.read, if key_read { d } else { 0 });
    read.fill(0.0);
    // libm's exp, as before: the decays feed the recall scores, which pick what the global
    // cache keeps, so they stay the same bits.
    for g in gate.iter_mut() {
        *g = g.exp();
    }
    memory_rows(
        MemoryRows {
            decay: gate,
            key,
            v,
            queries: qf,
        },
        memory,
        (out, read),
    );
    if key_read {
        let own: f32 = key.iter().map(|x| x * x).sum();
        for (r, &vj) in read.iter_mut().zip(v) {
            *r -= own * vj;
        }
    }
}

/// What one token's memory update reads ([`memory_rows`]): per-row decays `[d]`, the
/// key's features `[d]`, the value `[d]`, and the query features `[g * d]` (empty without
/// a read-out).
struct MemoryRows<'a> {
    decay: &'a [f32],
    key: &'a [f32],
    v: &'a [f32],
    queries: &'a [f32],
}

/// `new[i] = old[i] * decay[i] + key[i] * v` row by row, each query head's read-out
/// `out[h] += q[h][i] * new[i]`, and the key's read `read += key[i] * new[i]` (`read` empty:
/// not asked). Compiled twice: as is, and with AVX-512 enabled where the CPU has it, so the
/// loops run sixteen lanes wide instead of SSE2's four (the crate is built for baseline
/// x86-64: this was ~2 us of a (token, KV head) unit's ~7 in a speculative check). Rust
/// fuses no multiply-add by itself, so both compute every value with the same operations
/// in the same order: the same bits (`tests`).
fn memory_rows(x: MemoryRows, memory: Memory, (out, read): (&mut [f32], &mut [f32])) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above); the body is safe code.
        unsafe { memory_rows_avx512(x, memory, (out, read)) };
        return;
    }
    memory_rows_body(x, memory, (out, read));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn memory_rows_avx512(x: MemoryRows, memory: Memory, (out, read): (&mut [f32], &mut [f32])) {
    memory_rows_body(x, memory, (out, read));
}

#[inline(always)]
fn memory_rows_body(x: MemoryRows, memory: Memory, (out, read): (&mut [f32], &mut [f32])) {
    let d = x.decay.len();
    for i in 0..d {
        let (decay, ki) = (x.decay[i], x.key[i]);
        let row_old = &memory.old[i * d..(i + 1) * d];
        let row = &mut memory.new[i * d..(i + 1) * d];
        for ((s, &old), &vj) in row.iter_mut().zip(row_old).zip(x.v) {
            s.write(old * decay + ki * vj);
        }
        // SAFETY: every element of `row` was just written.
        let row: &[f32] = unsafe { &*(row as *const [MaybeUninit<f32>] as *const [f32]) };
        for (qh, o) in x.queries.chunks(d).zip(out.chunks_mut(d)) {
            let qi = qh[i];
            for (acc, &s) in o.iter_mut().zip(row) {
                *acc += qi * s;
            }
        }
        if !read.is_empty() {
            for (acc, &s) in read.iter_mut().zip(row) {
                *acc += ki * s;
            }
        }
    }
}

pub(crate) use crate::layers::rms_norm_rows as rms_norm;

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    #[test]
    fn memory_rows_give_the_same_bits_on_every_path() {
        let d = 64;
        let mut x = 0x9e37_79b9_u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 20_000) as f32 / 10_000.0 - 1.0
        };
        let old: Vec<f32> = (0..d * d).map(|_| next()).collect();
        let decay: Vec<f32> = (0..d).map(|_| next().abs()).collect();
        let key: Vec<f32> = (0..d).map(|_| next()).collect();
        let v: Vec<f32> = (0..d).map(|_| next()).collect();
        let queries: Vec<f32> = (0..3 * d).map(|_| next()).collect();
        // The scalar loops as they were, written out: what every path must equal.
        let mut want_new = vec![0f32; d * d];
        let (mut want_out, mut want_read) = (vec![0f32; 3 * d], vec![0f32; d]);
        for i in 0..d {
            for j in 0..d {
                want_new[i * d + j] = old[i * d + j] * decay[i] + key[i] * v[j];
            }
            for h in 0..3 {
                for j in 0..d {
                    want_out[h * d + j] += queries[h * d + i] * want_new[i * d + j];
                }
            }
            for j in 0..d {
                want_read[j] += key[i] * want_new[i * d + j];
            }
        }
        let run = |avx512: bool, read_len: usize, q: &[f32]| {
            let mut new = vec![MaybeUninit::<f32>::uninit(); d * d];
            let (mut out, mut read) = (vec![0f32; q.len()], vec![0f32; read_len]);
            let x = MemoryRows {
                decay: &decay,
                key: &key,
                v: &v,
                queries: q,
            };
            let memory = Memory {
                old: &old,
                new: &mut new,
            };
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: only called where the CPU has AVX-512F.
                unsafe { memory_rows_avx512(x, memory, (&mut out, &mut read)) };
            } else {
                memory_rows_body(x, memory, (&mut out, &mut read));
            }
            #[cfg(not(target_arch = "x86_64"))]
            memory_rows_body(x, memory, (&mut out, &mut read));
            // SAFETY: every row was written.
            let new: Vec<f32> = new
                .into_iter()
                .map(|x| unsafe { x.assume_init() })
                .collect();
            (new, out, read)
        };
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let mut paths = vec![false];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            paths.push(true);
        }
        for avx512 in paths {
            let (new, out, read) = run(avx512, d, &queries);
            assert_eq!(bits(&new), bits(&want_new), "avx512 {avx512}: memory");
            assert_eq!(bits(&out), bits(&want_out), "avx512 {avx512}: read-out");
            assert_eq!(bits(&read), bits(&want_read), "avx512 {avx512}: key read");
            // Without a read-out or a key read: the memory alone.
            let (new, out, read) = run(avx512, 0, &[]);
            assert_eq!(bits(&new), bits(&want_new));
            assert!(out.is_empty() && read.is_empty());
        }
    }

    #[test]
    fn write_row_writes_the_token_as_stored() {
        use std::mem::MaybeUninit;
        // Destinations start uninitialized, as the step allocates them; every slot of one
        // must be written.
        fn run<T: Copy>(new: &[f32], wrap: fn(&mut [MaybeUninit<T>]) -> RowsMut<'_>) -> Vec<T> {
            let mut dst = vec![MaybeUninit::<T>::uninit(); new.len()];
            write_row(new, wrap(&mut dst));
            // SAFETY: `write_row` writes all of `dst`.
            dst.into_iter()
                .map(|x| unsafe { x.assume_init() })
                .collect()
        }
        fn f32s(d: &mut [MaybeUninit<f32>]) -> RowsMut<'_> {
            RowsMut::F32(d)
        }
        fn f16s(d: &mut [MaybeUninit<f16>]) -> RowsMut<'_> {
            RowsMut::F16(d)
        }
        // Longer than one conversion block.
        let long: Vec<f32> = (0..150).map(|i| i as f32 * 0.3).collect();
        assert_eq!(run(&long, f32s), long);
        let long16: Vec<f16> = long.iter().map(|&x| f16::from_f32(x)).collect();
        assert_eq!(run(&long, f16s), long16);
        // A cache that keeps no rows: nothing to write.
        write_row(&[1.0], RowsMut::F32(&mut []));
    }
}
