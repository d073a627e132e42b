//! `eval`'s reports as text: one model's table ([`render`]) and several models' Markdown
//! table ([`render_comparison`]), each followed by the pass-key and loop sections when
//! those were measured.

use std::fmt::Write as _;

use super::{EvalReport, LoopsReport, PasskeyReport, Scores};
use crate::inspect::human_bytes;

/// A percentage, or `-` for none.
fn pct(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |x| format!("{:.1}%", 100.0 * x))
}

/// The report as a table.
pub fn render(r: &EvalReport) -> String {
    let mut s = String::new();
    if r.tokens > 0 {
        let _ = writeln!(
            s,
            "data        {} tokens predicted, {} chunks of up to {}",
            r.tokens, r.chunks, r.seq_len
        );
    }
    let mut model = match &r.adapter {
        Some(a) => format!("{} + adapter {}", r.model.path.display(), a.display()),
        None => r.model.path.display().to_string(),
    };
    if let Some(q) = r.quantize {
        model.push_str(&format!(", quantized to {q}"));
    }
    let _ = writeln!(s, "model       {model}");
    if let Some(rf) = &r.reference {
        let _ = writeln!(s, "reference   {}", rf.path.display());
    }
    if r.tokens > 0 {
        text_table(&mut s, r);
    }
    if let Some(p) = &r.passkey {
        passkey_table(&mut s, p);
    }
    if let Some(l) = &r.loops {
        loops_table(&mut s, l);
    }
    s
}

/// Perplexity, ratio, agreement, KL, state and latency; then the same by context.
fn text_table(s: &mut String, r: &EvalReport) {
    let _ = writeln!(s);
    let _ = writeln!(s, "{:<24} {:>12} {:>12}", "", "model", "reference");
    let refv = |f: &dyn Fn(&Scores) -> f64| {
        r.reference
            .as_ref()
            .map_or("-".to_owned(), |x| format!("{:.3}", f(x)))
    };
    let _ = writeln!(
        s,
        "{:<24} {:>12.3} {:>12}",
        "perplexity",
        r.model.perplexity,
        refv(&|x| x.perplexity)
    );
    let _ = writeln!(
        s,
        "{:<24} {:>12.4} {:>12}",
        "NLL (nats/token)",
        r.model.nll,
        r.reference
            .as_ref()
            .map_or("-".to_owned(), |x| format!("{:.4}", x.nll))
    );
    if let (Some(ratio), Some(agree), Some(kl)) = (r.perplexity_ratio, r.agreement, r.kl) {
        let _ = writeln!(s, "{:<24} {:>11.3}x", "perplexity ratio", ratio);
        let _ = writeln!(s, "{:<24} {:>11.1}%", "top-1 agreement", 100.0 * agree);
        let _ = writeln!(s, "{:<24} {:>12.4}", "KL(ref || model), nats", kl);
    }
    let _ = writeln!(
        s,
        "{:<24} {:>12}",
        format!("state at {} tokens", r.seq_len),
        human_bytes(r.state.total as u64)
    );
    if let Some(ms) = r.decode_ms_per_token {
        let _ = writeln!(s, "{:<24} {:>9.1} ms", "decode step", ms);
    }
    if r.by_context.len() > 1 {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<12} {:>8} {:>12} {:>9} {:>10} {:>8}",
            "context", "tokens", "perplexity", "ratio", "agreement", "KL"
        );
        let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".to_owned(), f);
        for b in &r.by_context {
            let _ = writeln!(
                s,
                "{:<12} {:>8} {:>12.3} {:>9} {:>10} {:>8}",
                format!("{}-{}", b.from, b.to),
                b.tokens,
                b.perplexity,
                opt(b.perplexity_ratio, &|x| format!("{x:.3}x")),
                opt(b.agreement, &|x| format!("{:.1}%", 100.0 * x)),
                opt(b.kl, &|x| format!("{x:.4}")),
            );
        }
    }
}

/// Several reports (same data and reference) as one Markdown table.
pub fn render_comparison(reports: &[EvalReport]) -> String {
    let mut s = String::new();
    let Some(first) = reports.first() else {
        return s;
    };
    if first.tokens > 0 {
        text_comparison(&mut s, reports);
    }
    if reports.iter().any(|r| r.passkey.is_some()) {
        passkey_comparison(&mut s, reports);
    }
    if reports.iter().any(|r| r.loops.is_some()) {
        loops_comparison(&mut s, reports);
    }
    s
}

/// A model's name in comparison tables: its folder, and its adapter's.
fn model_name(r: &EvalReport) -> String {
    match &r.adapter {
        Some(a) => format!("{} + {}", r.model.path.display(), a.display()),
        None => r.model.path.display().to_string(),
    }
}

/// The reference's path, from the first report that has one.
fn reference_name(reports: &[EvalReport]) -> String {
    reports
        .iter()
        .find_map(|r| r.reference.as_ref())
        .map_or("reference".to_owned(), |r| {
            format!("{} (reference)", r.path.display())
        })
}

fn text_comparison(s: &mut String, reports: &[EvalReport]) {
    let first = &reports[0];
    let _ = writeln!(
        s,
        "{} tokens predicted in chunks of up to {}{}\n",
        first.tokens,
        first.seq_len,
        first.reference.as_ref().map_or(String::new(), |r| format!(
            ", reference {} (perplexity {:.3})",
            r.path.display(),
            r.perplexity
        ))
    );
    let _ = writeln!(
        s,
        "| model | perplexity | ratio | agreement | KL | decode ms/token | state at {} (recurrent + window + global + KV) |",
        first.seq_len
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---|");
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".to_owned(), f);
    for r in reports {
        let _ = writeln!(
            s,
            "| {} | {:.3} | {} | {} | {} | {} | {} ({} + {} + {} + {}) |",
            model_name(r),
            r.model.perplexity,
            opt(r.perplexity_ratio, &|x| format!("{x:.2}x")),
            opt(r.agreement, &|x| format!("{:.1}%", 100.0 * x)),
            opt(r.kl, &|x| format!("{x:.3}")),
            opt(r.decode_ms_per_token, &|x| format!("{x:.1}")),
            human_bytes(r.state.total as u64),
            human_bytes(r.state.recurrent as u64),
            human_bytes(r.state.window as u64),
            human_bytes(r.state.global as u64),
            human_bytes(r.state.kv_cache as u64),
        );
    }
}

/// Pass-key accuracy per length, one row per model and the reference's last.
fn passkey_comparison(s: &mut String, reports: &[EvalReport]) {
    let Some(first) = reports.iter().find_map(|r| r.passkey.as_ref()) else {
        return;
    };
    if !s.is_empty() {
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "pass-key accuracy by prompt length ({} format)\n",
        first.format
    );
    let lengths: Vec<String> = first
        .by_length
        .iter()
        .map(|l| l.tokens.to_string())
        .collect();
    let _ = writeln!(s, "| model | {} | all |", lengths.join(" | "));
    let _ = writeln!(s, "|---|{}---:|", "---:|".repeat(lengths.len()));
    for r in reports {
        if let Some(p) = &r.passkey {
            let cells: Vec<String> = p.by_length.iter().map(|l| pct(Some(l.model))).collect();
            let all = pct(Some(p.model_accuracy));
            let _ = writeln!(s, "| {} | {} | {all} |", model_name(r), cells.join(" | "));
        }
    }
    let cells: Vec<String> = first.by_length.iter().map(|l| pct(l.reference)).collect();
    if first.reference_accuracy.is_some() {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            reference_name(reports),
            cells.join(" | "),
            pct(first.reference_accuracy)
        );
    }
}

/// Share of looping answers, one row per model and the reference's last.
fn loops_comparison(s: &mut String, reports: &[EvalReport]) {
    let Some(first) = reports.iter().find_map(|r| r.loops.as_ref()) else {
        return;
    };
    if !s.is_empty() {
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "greedy answers (up to {} tokens) to {} prompts that loop\n",
        first.max_tokens, first.prompts
    );
    let _ = writeln!(s, "| model | looping answers |");
    let _ = writeln!(s, "|---|---:|");
    for r in reports {
        if let Some(l) = &r.loops {
            let _ = writeln!(
                s,
                "| {} | {} ({}/{}) |",
                model_name(r),
                pct(Some(l.model)),
                l.model_looping,
                l.prompts
            );
        }
    }
    if let (Some(share), Some(k)) = (first.reference, first.reference_looping) {
        let _ = writeln!(
            s,
            "| {} | {} ({k}/{}) |",
            reference_name(reports),
            pct(Some(share)),
            first.prompts
        );
    }
}

/// Pass-key accuracy by length and by depth, model beside reference.
fn passkey_table(s: &mut String, p: &PasskeyReport) {
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "pass key: {} key{} per length and depth, greedy, {} format",
        p.keys,
        if p.keys == 1 { "" } else { "s" },
        p.format
    );
    let _ = writeln!(s, "{:<24} {:>12} {:>12}", "", "model", "reference");
    for l in &p.by_length {
        let label = format!("{} tokens", l.tokens);
        let _ = writeln!(
            s,
            "{label:<24} {:>12} {:>12}",
            pct(Some(l.model)),
            pct(l.reference)
        );
    }
    for d in &p.by_depth {
        let label = format!("depth {}%", d.depth);
        let _ = writeln!(
            s,
            "{label:<24} {:>12} {:>12}",
            pct(Some(d.model)),
            pct(d.reference)
        );
    }
    let _ = writeln!(
        s,
        "{:<24} {:>12} {:>12}",
        "all",
        pct(Some(p.model_accuracy)),
        pct(p.reference_accuracy)
    );
}

/// Share of looping answers, model beside reference, and the model's examples.
fn loops_table(s: &mut String, l: &LoopsReport) {
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "loops: greedy answers (up to {} tokens) to {} prompts that repeat a {}-word run {} times",
        l.max_tokens,
        l.prompts,
        super::loops::RUN_WORDS,
        super::loops::RUN_REPEATS
    );
    let _ = writeln!(s, "{:<24} {:>12} {:>12}", "", "model", "reference");
    let count = |k: Option<usize>| k.map_or("-".to_owned(), |k| format!("{k}/{}", l.prompts));
    let _ = writeln!(
        s,
        "{:<24} {:>12} {:>12}",
        "looping answers",
        pct(Some(l.model)),
        pct(l.reference)
    );
    let _ = writeln!(
        s,
        "{:<24} {:>12} {:>12}",
        "",
        count(Some(l.model_looping)),
        count(l.reference_looping)
    );
    for e in &l.examples {
        let _ = writeln!(
            s,
            "  \"{}\" repeats in the answer to \"{}\"",
            e.repeated,
            shorten(&e.prompt, 60)
        );
    }
}

/// `text` on one line, cut to `max` characters.
fn shorten(text: &str, max: usize) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &one_line[..i]),
        None => one_line,
    }
}
