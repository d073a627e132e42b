//! The recurrences computed from their definitions in f64: GLA one output at a time,
//!
//! ```text
//! o_t = sum_i q_{t,i} [ e^{G_{t,i}} S0_{i,:} + sum_{s<=t} e^{G_{t,i} - G_{s,i}} k_{s,i} v_s ]
//! G_t = g_1 + ... + g_t
//! ```
//!
//! and GSA token by token exactly as LIGER.md writes it (its `d x M` key memory untransposed,
//! the pooling and gate computed from the raw key).
//!
//! Quadratic in the sequence length and slow on purpose: it shares no code with the fast
//! forms, so tests can hold them to it.

/// One KV head of one sequence, row-major: `q: [g][t][d]`, `k`, `gate`, `v`: `[t][d]`,
/// `s0: [d][d]`. Returns `(o: [g][t][d], s_t: [d][d])`.
pub struct Head<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub gate: &'a [f32],
    pub v: &'a [f32],
    pub s0: &'a [f32],
    pub groups: usize,
    pub len: usize,
    pub dim: usize,
}

pub fn gla_head(h: &Head) -> (Vec<f32>, Vec<f32>) {
    let (t_len, d) = (h.len, h.dim);
    // cum[t][i] = g_0 + ... + g_t
    let mut cum = vec![0f64; t_len * d];
    for t in 0..t_len {
        for i in 0..d {
            let prev = if t == 0 { 0.0 } else { cum[(t - 1) * d + i] };
            cum[t * d + i] = prev + h.gate[t * d + i] as f64;
        }
    }
    let mut out = vec![0f32; h.groups * t_len * d];
    for g in 0..h.groups {
        for t in 0..t_len {
            let q = &h.q[(g * t_len + t) * d..(g * t_len + t + 1) * d];
            for j in 0..d {
                let mut acc = 0f64;
                for i in 0..d {
                    let qi = q[i] as f64;
                    acc += qi * cum[t * d + i].exp() * h.s0[i * d + j] as f64;
                    for s in 0..=t {
                        let decay = (cum[t * d + i] - cum[s * d + i]).exp();
                        acc += qi * decay * h.k[s * d + i] as f64 * h.v[s * d + j] as f64;
                    }
                }
                out[(g * t_len + t) * d + j] = acc as f32;
            }
        }
    }
    // Final state: S_T = e^{G_T} S0 + sum_s e^{G_T - G_s} k_s^T v_s.
    let mut state = vec![0f32; d * d];
    if t_len == 0 {
        state.copy_from_slice(h.s0);
        return (out, state);
    }
    let last = t_len - 1;
    for i in 0..d {
        for j in 0..d {
            let mut acc = cum[last * d + i].exp() * h.s0[i * d + j] as f64;
            for s in 0..t_len {
                let decay = (cum[last * d + i] - cum[s * d + i]).exp();
                acc += decay * h.k[s * d + i] as f64 * h.v[s * d + j] as f64;
            }
            state[i * d + j] = acc as f32;
        }
    }
    (out, state)
}

/// One KV head of one sequence for GSA, from raw inputs, row-major: `q: [g][t][d]`, `k`,
/// `v`: `[t][d]`, `s0: [2M][d]` in the runtime's layout (`K~^T` rows, then `V~` rows).
pub struct GsaHead<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub s0: &'a [f32],
    pub groups: usize,
    pub len: usize,
    pub dim: usize,
    pub slots: usize,
    pub gate_normalizer: f64,
}

/// GSA token by token, exactly as LIGER.md §1 writes it, with `K~` held as `d x M` and the
/// pooling, gate and slot writes computed here from the raw key. Returns
/// `(o: [g][t][d], state: [2M][d])` in the runtime's layout.
pub fn gsa_head(h: &GsaHead) -> (Vec<f32>, Vec<f32>) {
    let (d, m) = (h.dim, h.slots);
    let group = d / m;
    // K~: d x M, V~: M x d.
    let mut kt = vec![0f64; d * m];
    let mut vt = vec![0f64; m * d];
    for i in 0..d {
        for j in 0..m {
            kt[i * m + j] = h.s0[j * d + i] as f64;
        }
    }
    for (v, s) in vt.iter_mut().zip(&h.s0[m * d..2 * m * d]) {
        *v = *s as f64;
    }
    let mut out = vec![0f32; h.groups * h.len * d];
    for t in 0..h.len {
        let k = &h.k[t * d..(t + 1) * d];
        let v = &h.v[t * d..(t + 1) * d];
        let mut a = vec![0f64; m];
        for (j, aj) in a.iter_mut().enumerate() {
            let pooled = k[j * group..(j + 1) * group]
                .iter()
                .map(|&x| x as f64)
                .sum::<f64>()
                / group as f64;
            let log_sigmoid = -(1.0 + (-pooled).exp()).ln();
            *aj = (log_sigmoid / h.gate_normalizer).exp();
        }
        // K~ = K~ diag(a) + k^T s ;  V~ = diag(a) V~ + s^T v ;  s = 1 - a
        for i in 0..d {
            for j in 0..m {
                kt[i * m + j] = kt[i * m + j] * a[j] + k[i] as f64 * (1.0 - a[j]);
            }
        }
        for j in 0..m {
            for c in 0..d {
                vt[j * d + c] = a[j] * vt[j * d + c] + (1.0 - a[j]) * v[c] as f64;
            }
        }
        for g in 0..h.groups {
            let q = &h.q[(g * h.len + t) * d..(g * h.len + t + 1) * d];
            let scores: Vec<f64> = (0..m)
                .map(|j| (0..d).map(|i| q[i] as f64 * kt[i * m + j]).sum())
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for c in 0..d {
                let o: f64 = (0..m)
                    .map(|j| (scores[j] - max).exp() / z * vt[j * d + c])
                    .sum();
                out[(g * h.len + t) * d + c] = o as f32;
            }
        }
    }
    let mut state = vec![0f32; 2 * m * d];
    for j in 0..m {
        for i in 0..d {
            state[j * d + i] = kt[i * m + j] as f32;
        }
    }
    for (s, v) in state[m * d..].iter_mut().zip(&vt) {
        *s = *v as f32;
    }
    (out, state)
}
