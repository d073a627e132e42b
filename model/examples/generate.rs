//! Greedy chat generation with the runtime, straight from a GGUF file or a Hugging Face
//! folder, as the original Transformer or converted zero-shot to Liger-GLA in memory.
//!
//! ```text
//! cargo run --release -p liger-model --example generate -- MODEL [--liger] [--prompt TEXT] [--max-tokens N]
//! ```
//!
//! MODEL is a `.gguf` file or a folder with config.json, model.safetensors and tokenizer.json.
//! The prompt is rendered as ChatML (SmolLM2's template without a system turn override).

use std::io::Write;
use std::path::PathBuf;

use candle_core::{DType, Device, D};
use liger_model::testing::model_from_tensors;
use liger_model::{LigerConfig, Logits, Model, ModelConfig};

fn main() -> anyhow::Result<()> {
    liger_model::threads::init(None);
    let mut args = std::env::args().skip(1);
    let mut model_path: Option<PathBuf> = None;
    let (mut liger, mut prompt, mut max_tokens) =
        (false, "What is the capital of France?".to_string(), 64);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--liger" => liger = true,
            "--prompt" => {
                prompt = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--prompt needs a value"))?
            }
            "--max-tokens" => {
                max_tokens = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--max-tokens needs a value"))?
                    .parse()?
            }
            p if model_path.is_none() && !p.starts_with("--") => model_path = Some(p.into()),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let path = model_path.ok_or_else(|| {
        anyhow::anyhow!("usage: generate MODEL [--liger] [--prompt TEXT] [--max-tokens N]")
    })?;
    let (model, tokenizer) = load(&path, liger)?;
    let text = format!(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tokenizer
        .encode(text, true)
        .map_err(anyhow::Error::msg)?
        .get_ids()
        .to_vec();
    let eos = model.config().eos_token_ids.clone();
    let mut state = model.new_state()?;
    let mut logits = model.prefill(&ids, &mut state, 512)?;
    let mut out: Vec<u32> = Vec::new();
    let mut shown = 0;
    // A folder says for itself whether it is a Liger model (converted or recovered).
    let label = if liger {
        "liger-gla (zero-shot)"
    } else if model.config().liger.is_some() {
        "liger-gla"
    } else {
        "transformer"
    };
    print!("[{label}] ");
    for _ in 0..max_tokens {
        let next = logits.argmax(D::Minus1)?.squeeze(0)?.to_scalar::<u32>()?;
        if eos.contains(&next) {
            break;
        }
        out.push(next);
        // Print only complete text: a multi-byte character may span tokens.
        let text = tokenizer.decode(&out, true).map_err(anyhow::Error::msg)?;
        if !text.ends_with('\u{FFFD}') {
            print!("{}", &text[shown..]);
            std::io::stdout().flush()?;
            shown = text.len();
        }
        logits = model.forward(&[next], &mut state, Logits::Last)?;
    }
    println!(
        "\n[{} prompt tokens, {} generated, state {:.2} MiB]",
        ids.len(),
        out.len(),
        state.size_bytes() as f64 / 1048576.0
    );
    Ok(())
}

fn load(path: &std::path::Path, liger: bool) -> anyhow::Result<(Model, tokenizers::Tokenizer)> {
    let device = Device::Cpu;
    if path.extension().is_some_and(|e| e == "gguf") {
        let import = liger_model::gguf::import_gguf(path)?;
        let mut cfg = ModelConfig::from_json(import.config.clone())?;
        if liger {
            cfg = cfg.with_liger(LigerConfig::default())?;
        }
        let tensors = import.tensors.into_iter().collect();
        Ok((
            model_from_tensors(cfg, &tensors, DType::F32, &device)?,
            import.tokenizer,
        ))
    } else {
        if liger {
            anyhow::bail!("--liger applies to GGUF input; convert folders with liger-convert");
        }
        let stored = liger_model::checkpoint::Checkpoint::open(path)?;
        let model = stored.load(&device, DType::F32, &Default::default())?;
        Ok((model, stored.text()?.tokenizer().clone()))
    }
}
