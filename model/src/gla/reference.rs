//! The recurrence computed from its definition, in f64, one output at a time:
//!
//! ```text
//! o_t = sum_i q_{t,i} [ e^{G_{t,i}} S0_{i,:} + sum_{s<=t} e^{G_{t,i} - G_{s,i}} k_{s,i} v_s ]
//! G_t = g_1 + ... + g_t
//! ```
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
