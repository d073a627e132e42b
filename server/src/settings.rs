//! Server settings from three sources, in order of precedence: command-line flags, then
//! `LIGER_*` environment variables (clap reads both), then a TOML file (`--config`), then
//! defaults. Every option has all three spellings: `--max-running`, `LIGER_MAX_RUNNING`,
//! `max_running = ...`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use liger_model::layers::Quantization;
use serde::Deserialize;

use crate::engine::SpeculativeOptions;

/// `--step-target-ms` when unset. 200 on the AMD EPYC Zen 5 VM (2026-12-06), where
/// llama-server's 8-stream ITL p99 is 140-245 ms: 8 and 32 streams x 256-token prompts, f32,
/// 300 / 200 / 150 alternating, two runs each, ITL p99 at 8 streams 243 / 206 ms at 300,
/// 208 / 166 at 200, 143 / 151 at 150, throughput the same within the runs' spread
/// (`server/README.md`, Scheduling). Before: 300 on the Intel VM once prompts read ~1.2x
/// faster, 400 once decode steps took the AVX-512 kernel, 500 at first.
const DEFAULT_STEP_TARGET_MS: u64 = 200;

/// `--start-wait-ms` when unset. On the Zen 5 VM (f32, 2026-12-07) a wave of 8 x 256-token
/// prompts is read in ~1.4 s: its streams then start together, ~8% more tokens/s, ITL p99
/// ~40-50 ms against ~200 ms when each starts on its own, TTFT p50 ~1.4-1.6 s against
/// ~1.2 s (llama-server's ~1.8-2.3 s). A wave of 32 (~5.4 s) starts stream by stream:
/// waiting for it made TTFT p50 ~5.5 s against ~3.7-4.7 s, next to llama-server's ~5.9 s
/// (`server/README.md`, Scheduling).
const DEFAULT_START_WAIT_MS: u64 = 2000;

/// `--speculative-tokens` when unset, and the most it may be.
const DEFAULT_SPECULATIVE_TOKENS: usize = 3;
const MAX_SPECULATIVE_TOKENS: usize = 64;

/// `--speculative-max-streams` when unset. Drafts share one fused decode step's tokens
/// (32) after what the streams feed anyway, so more streams draft fewer tokens each. 8
/// streams x 256-token prompts, f32, Zen 5 VM, liger-serve alone, 8 against 1
/// alternating (2026-12-07): 193.8 / 189.7 / 177.7 / 179.8 against 171.1 / 173.5 / 173.4 /
/// 173.8 tokens/s, ITL p99 157-200 against 161-177 ms.
const DEFAULT_SPECULATIVE_MAX_STREAMS: usize = 8;

/// `--compute-nice` when unset. One stream, 24 requests alternating with llama-server, f32,
/// Zen 5 VM (2 vCPUs, Linux 6.18), 2026-12-07: the client's wake-up waited for a core with
/// p90 3.0 ms while liger-serve ran (0.05 ms while llama-server did), both vCPUs held by
/// the model's two threads, so a token reached it 3.4-3.6 ms after its step at p90 (the
/// server's own gaps matched llama-server's); at nice 1 and 5 alike, 0.19-0.24 ms.
const DEFAULT_COMPUTE_NICE: i32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DTypeArg {
    /// f32 on the CPU, bf16 on CUDA, f16 on Metal.
    Auto,
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceArg {
    Cpu,
    Cuda,
    Metal,
}

/// Flags and environment variables; also the TOML file's schema (same names, snake_case).
#[derive(Debug, Clone, Default, Parser, Deserialize)]
#[command(
    name = "liger-serve",
    version,
    about = "OpenAI-compatible server for Liger (and Transformer) models"
)]
#[serde(deny_unknown_fields)]
pub struct Args {
    /// TOML file with defaults for any option below (flags and env vars override it).
    #[arg(long, env = "LIGER_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Model folder (config.json, safetensors, tokenizer.json) or Hugging Face hub id.
    #[arg(long, env = "LIGER_MODEL")]
    pub model: Option<String>,
    /// Hub revision (branch, tag or commit) when --model is a hub id [default: main].
    #[arg(long, env = "LIGER_REVISION")]
    pub revision: Option<String>,
    /// LoRA adapter folder in PEFT's layout (`adapter_config.json`,
    /// `adapter_model.safetensors`), e.g. from `liger-convert recover --adapter-only`;
    /// merged into the weights at load.
    #[arg(long, env = "LIGER_ADAPTER", value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Name clients must send as `model` [default: the folder name or hub id].
    #[arg(long, env = "LIGER_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// [default: 127.0.0.1]
    #[arg(long, env = "LIGER_HOST")]
    pub host: Option<String>,
    /// [default: 8080]; 0 picks a free port.
    #[arg(long, env = "LIGER_PORT")]
    pub port: Option<u16>,
    /// Weight dtype [default: auto].
    #[arg(long, env = "LIGER_DTYPE", value_enum)]
    pub dtype: Option<DTypeArg>,
    /// [default: cpu]
    #[arg(long, env = "LIGER_DEVICE", value_enum)]
    pub device: Option<DeviceArg>,
    /// Quantize the projections and LM head after loading: q8_0 (near-lossless) or q4k
    /// (4-bit; q8_0 where a projection's input does not fit its blocks) [default: none].
    /// A folder from `liger-convert quantize` is served quantized without this flag.
    #[arg(long, env = "LIGER_QUANTIZE", value_name = "FORMAT")]
    pub quantize: Option<Quantization>,
    /// Sequences decoding at once (state slots) [default: 16].
    #[arg(long, env = "LIGER_MAX_RUNNING")]
    pub max_running: Option<usize>,
    /// Requests queued for a slot before new ones get 429 [default: 64].
    #[arg(long, env = "LIGER_MAX_WAITING")]
    pub max_waiting: Option<usize>,
    /// Tokens per forward pass, decodes plus prefill chunks [default: 512].
    #[arg(long, env = "LIGER_MAX_BATCH_TOKENS")]
    pub max_batch_tokens: Option<usize>,
    /// While sequences decode, cut each step's prompt chunk so the step takes about this
    /// long (every step delays each decoding stream's next token by its duration); 0 turns
    /// the cut off (every step reads up to --max-batch-tokens) [default: 200].
    #[arg(long, env = "LIGER_STEP_TARGET_MS", value_name = "MS")]
    pub step_target_ms: Option<u64>,
    /// While no sequence decodes, a request whose prompt is read waits for the prompts
    /// being read alongside it, so that they are read in full steps and the streams start
    /// together, if they will all be read within this long; 0: every stream starts as soon
    /// as its prompt is read [default: 2000].
    #[arg(long, env = "LIGER_START_WAIT_MS", value_name = "MS")]
    pub start_wait_ms: Option<u64>,
    /// On SIGTERM or Ctrl-C, requests in flight may finish for this many seconds; then the
    /// rest fail with 503 `shutting_down` and the server exits [default: 20, below
    /// Kubernetes' 30 s termination grace period].
    #[arg(long, env = "LIGER_SHUTDOWN_GRACE_SECS", value_name = "SECS")]
    pub shutdown_grace_secs: Option<u64>,
    /// Prompt plus completion tokens [default: max_position_embeddings; only Liger models may exceed it].
    #[arg(long, env = "LIGER_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Require `Authorization: Bearer <key>` on /v1/*.
    #[arg(long, env = "LIGER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Largest request body in bytes [default: 4194304].
    #[arg(long, env = "LIGER_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Memory for cached conversation states, in MiB; 0 turns the cache off [default: 512].
    #[arg(long, env = "LIGER_STATE_CACHE_MB")]
    pub state_cache_mb: Option<usize>,
    /// Also keep cached states in this folder, so a restarted server (or a replica of the
    /// same model) resumes conversations [default: memory only].
    #[arg(long, env = "LIGER_STATE_CACHE_DIR", value_name = "DIR")]
    pub state_cache_dir: Option<PathBuf>,
    /// Speculative decoding: tokens drafted per step from earlier text (n-gram prompt
    /// lookup), checked in one step; the output is the same as without, up to rounding. 0
    /// turns it off [default: 3].
    #[arg(long, env = "LIGER_SPECULATIVE_TOKENS", value_name = "N")]
    pub speculative_tokens: Option<usize>,
    /// Longest suffix of the text looked up for a draft [default: 3].
    #[arg(long, env = "LIGER_SPECULATIVE_NGRAM_MAX", value_name = "N")]
    pub speculative_ngram_max: Option<usize>,
    /// Shortest suffix looked up [default: 2].
    #[arg(long, env = "LIGER_SPECULATIVE_NGRAM_MIN", value_name = "N")]
    pub speculative_ngram_min: Option<usize>,
    /// Draft only while at most this many sequences decode (and no prompt is being read)
    /// [default: 8].
    #[arg(long, env = "LIGER_SPECULATIVE_MAX_STREAMS", value_name = "N")]
    pub speculative_max_streams: Option<usize>,
    /// Nice steps (0-19) the threads that run the model take below the rest of the
    /// process: a thread that wakes to send a token (the server's, or a client's on the same
    /// machine) then takes a core from them at once instead of after their time slice. 0
    /// leaves them at the process's priority [default: 1].
    #[arg(long, env = "LIGER_COMPUTE_NICE", value_name = "N")]
    pub compute_nice: Option<i32>,
    /// Pin each thread that runs the model to a CPU of its own (when there is one thread
    /// per CPU the process may use), so that two never take turns on one core while
    /// another idles [default: true].
    #[arg(long, env = "LIGER_PIN_COMPUTE_THREADS", value_name = "BOOL", action = clap::ArgAction::Set)]
    pub pin_compute_threads: Option<bool>,
    /// Move the weights onto transparent huge pages after loading (Linux 6.1+; CPU): a
    /// decode step reads every weight, and on 4 KiB pages it misses the TLB every 4 KiB
    /// [default: true].
    #[arg(long, env = "LIGER_HUGE_PAGES", value_name = "BOOL", action = clap::ArgAction::Set)]
    pub huge_pages: Option<bool>,
    /// Greedy decode steps read a Q8_0 copy of an f32 LM head and compute exactly only the
    /// logits that can be the largest: the same tokens, a quarter of the head's bytes (CPU,
    /// AVX-512) [default: true].
    #[arg(long, env = "LIGER_HEAD_SCREEN", value_name = "BOOL", action = clap::ArgAction::Set)]
    pub head_screen: Option<bool>,
}

impl Args {
    /// Fills what `self` (flags and env) leaves unset from `file`.
    pub fn or(self, file: Args) -> Args {
        Args {
            config: self.config,
            model: self.model.or(file.model),
            revision: self.revision.or(file.revision),
            adapter: self.adapter.or(file.adapter),
            served_model_name: self.served_model_name.or(file.served_model_name),
            host: self.host.or(file.host),
            port: self.port.or(file.port),
            dtype: self.dtype.or(file.dtype),
            device: self.device.or(file.device),
            quantize: self.quantize.or(file.quantize),
            max_running: self.max_running.or(file.max_running),
            max_waiting: self.max_waiting.or(file.max_waiting),
            max_batch_tokens: self.max_batch_tokens.or(file.max_batch_tokens),
            step_target_ms: self.step_target_ms.or(file.step_target_ms),
            start_wait_ms: self.start_wait_ms.or(file.start_wait_ms),
            shutdown_grace_secs: self.shutdown_grace_secs.or(file.shutdown_grace_secs),
            max_model_len: self.max_model_len.or(file.max_model_len),
            api_key: self.api_key.or(file.api_key),
            max_body_bytes: self.max_body_bytes.or(file.max_body_bytes),
            state_cache_mb: self.state_cache_mb.or(file.state_cache_mb),
            state_cache_dir: self.state_cache_dir.or(file.state_cache_dir),
            speculative_tokens: self.speculative_tokens.or(file.speculative_tokens),
            speculative_ngram_max: self.speculative_ngram_max.or(file.speculative_ngram_max),
            speculative_ngram_min: self.speculative_ngram_min.or(file.speculative_ngram_min),
            speculative_max_streams: self
                .speculative_max_streams
                .or(file.speculative_max_streams),
            compute_nice: self.compute_nice.or(file.compute_nice),
            pin_compute_threads: self.pin_compute_threads.or(file.pin_compute_threads),
            huge_pages: self.huge_pages.or(file.huge_pages),
            head_screen: self.head_screen.or(file.head_screen),
        }
    }

    pub fn from_toml_file(path: &Path) -> anyhow::Result<Args> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// Settings with every default applied and checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub model: String,
    pub revision: Option<String>,
    pub adapter: Option<PathBuf>,
    pub served_model_name: String,
    pub host: String,
    pub port: u16,
    pub dtype: DTypeArg,
    pub device: DeviceArg,
    pub quantize: Option<Quantization>,
    pub max_running: usize,
    pub max_waiting: usize,
    pub max_batch_tokens: usize,
    /// `None`: steps are not cut to a latency target.
    pub step_target: Option<std::time::Duration>,
    /// `None`: streams start as soon as their prompts are read.
    pub start_wait: Option<std::time::Duration>,
    /// How long a shutdown waits for requests in flight before failing them.
    pub shutdown_grace: std::time::Duration,
    pub max_model_len: Option<usize>,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    /// 0: no state cache.
    pub state_cache_bytes: usize,
    pub state_cache_dir: Option<PathBuf>,
    pub speculative: SpeculativeOptions,
    /// Nice steps the model's threads take below the rest of the process (0: none).
    pub compute_nice: i32,
    /// Whether the model's threads are pinned to a CPU each.
    pub pin_compute_threads: bool,
    /// Whether the weights are moved onto huge pages after loading.
    pub huge_pages: bool,
    /// Whether greedy decode steps read the LM head's Q8_0 screen
    /// (`liger_model::RuntimeOptions::head_screen`).
    pub head_screen: bool,
}

impl Settings {
    /// Parses the process's flags and environment, then the config file they name.
    pub fn from_env_and_args() -> anyhow::Result<Self> {
        Self::from_args(Args::parse())
    }

    pub fn from_args(args: Args) -> anyhow::Result<Self> {
        let args = match &args.config {
            Some(path) => {
                let file = Args::from_toml_file(path)?;
                args.or(file)
            }
            None => args,
        };
        Self::resolve(args)
    }

    /// Applies defaults and checks ranges.
    pub fn resolve(a: Args) -> anyhow::Result<Self> {
        let Some(model) = a.model.filter(|m| !m.is_empty()) else {
            bail!("no model given: pass --model DIR_OR_HUB_ID, set LIGER_MODEL, or put `model` in the --config file");
        };
        let served_model_name = a
            .served_model_name
            .unwrap_or_else(|| default_served_name(&model));
        let positive = |name: &str, v: Option<usize>, default: usize| -> anyhow::Result<usize> {
            let v = v.unwrap_or(default);
            if v == 0 {
                bail!("--{name} must be at least 1");
            }
            Ok(v)
        };
        let max_running = positive("max-running", a.max_running, 16)?;
        let max_waiting = positive("max-waiting", a.max_waiting, 64)?;
        let max_batch_tokens = positive("max-batch-tokens", a.max_batch_tokens, 512)?;
        let max_body_bytes = positive("max-body-bytes", a.max_body_bytes, 4 << 20)?;
        if a.max_model_len == Some(0) {
            bail!("--max-model-len must be at least 1");
        }
        let state_cache_mb = a.state_cache_mb.unwrap_or(512);
        let Some(state_cache_bytes) = state_cache_mb.checked_mul(1 << 20) else {
            bail!("--state-cache-mb {state_cache_mb} is too large");
        };
        let ngram_max = positive("speculative-ngram-max", a.speculative_ngram_max, 3)?;
        let ngram_min = positive("speculative-ngram-min", a.speculative_ngram_min, 2)?;
        if ngram_min > ngram_max {
            bail!("--speculative-ngram-min ({ngram_min}) is above --speculative-ngram-max ({ngram_max})");
        }
        let tokens = a.speculative_tokens.unwrap_or(DEFAULT_SPECULATIVE_TOKENS);
        if tokens > MAX_SPECULATIVE_TOKENS {
            // A step carries up to 2k + 1 rows of logits per stream (49K floats each for
            // SmolLM2); past a few dozen drafts almost none are taken anyway.
            bail!("--speculative-tokens {tokens} is above the most a step drafts ({MAX_SPECULATIVE_TOKENS})");
        }
        let speculative = SpeculativeOptions {
            tokens,
            ngram_max,
            ngram_min,
            max_streams: positive(
                "speculative-max-streams",
                a.speculative_max_streams,
                DEFAULT_SPECULATIVE_MAX_STREAMS,
            )?,
        };
        if state_cache_bytes == 0 && a.state_cache_dir.is_some() {
            bail!("--state-cache-dir needs the state cache on (--state-cache-mb above 0)");
        }
        let compute_nice = a.compute_nice.unwrap_or(DEFAULT_COMPUTE_NICE);
        if !(0..=19).contains(&compute_nice) {
            bail!("--compute-nice must be 0 to 19, not {compute_nice}");
        }
        Ok(Self {
            model,
            revision: a.revision,
            adapter: a.adapter,
            served_model_name,
            host: a.host.unwrap_or_else(|| "127.0.0.1".into()),
            port: a.port.unwrap_or(8080),
            dtype: a.dtype.unwrap_or(DTypeArg::Auto),
            device: a.device.unwrap_or(DeviceArg::Cpu),
            quantize: a.quantize,
            max_running,
            max_waiting,
            max_batch_tokens,
            step_target: millis_or_off(a.step_target_ms.unwrap_or(DEFAULT_STEP_TARGET_MS)),
            start_wait: millis_or_off(a.start_wait_ms.unwrap_or(DEFAULT_START_WAIT_MS)),
            shutdown_grace: std::time::Duration::from_secs(a.shutdown_grace_secs.unwrap_or(20)),
            max_model_len: a.max_model_len,
            api_key: a.api_key.filter(|k| !k.is_empty()),
            max_body_bytes,
            state_cache_bytes,
            state_cache_dir: a.state_cache_dir,
            speculative,
            compute_nice,
            pin_compute_threads: a.pin_compute_threads.unwrap_or(true),
            huge_pages: a.huge_pages.unwrap_or(true),
            head_screen: a.head_screen.unwrap_or(true),
        })
    }
}

/// `ms` milliseconds; 0 turns the setting off.
fn millis_or_off(ms: u64) -> Option<std::time::Duration> {
    (ms > 0).then(|| std::time::Duration::from_millis(ms))
}

/// A folder's own name (paths make poor model names), else the hub id as given.
fn default_served_name(model: &str) -> String {
    let path = Path::new(model);
    if path.is_dir() {
        if let Some(name) = path
            .canonicalize()
            .ok()
            .as_deref()
            .and_then(Path::file_name)
        {
            return name.to_string_lossy().into_owned();
        }
    }
    model.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flags: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("liger-serve").chain(flags.iter().copied())).unwrap()
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let file: Args =
            toml::from_str("model = \"org/m\"\nport = 9000\nmax_running = 4\ndtype = \"f16\"\n")
                .unwrap();
        let s = Settings::resolve(args(&["--port", "7000"]).or(file)).unwrap();
        assert_eq!(s.port, 7000, "flag wins");
        assert_eq!(s.max_running, 4, "file fills the gap");
        assert_eq!(s.dtype, DTypeArg::F16);
        assert_eq!(s.max_waiting, 64, "default");
        assert_eq!(s.step_target, Some(std::time::Duration::from_millis(200)));
        let off = Settings::resolve(args(&["--model", "m", "--step-target-ms", "0"])).unwrap();
        assert_eq!(off.step_target, None, "0 turns the cut off");
        assert_eq!(s.shutdown_grace, std::time::Duration::from_secs(20));
        assert_eq!(s.served_model_name, "org/m");
        assert_eq!(s.host, "127.0.0.1");
        assert_eq!(s.compute_nice, 1);
        assert!(s.pin_compute_threads);
        let unpinned =
            Settings::resolve(args(&["--model", "m", "--pin-compute-threads", "false"])).unwrap();
        assert!(!unpinned.pin_compute_threads);
        assert!(s.huge_pages);
        let small = Settings::resolve(args(&["--model", "m", "--huge-pages", "false"])).unwrap();
        assert!(!small.huge_pages);
        assert!(s.head_screen);
        let full = Settings::resolve(args(&["--model", "m", "--head-screen", "false"])).unwrap();
        assert!(!full.head_screen);
        assert_eq!(
            s.speculative,
            SpeculativeOptions {
                tokens: 3,
                ngram_max: 3,
                ngram_min: 2,
                max_streams: 8
            }
        );
        let off = Settings::resolve(args(&["--model", "m", "--speculative-tokens", "0"])).unwrap();
        assert!(!off.speculative.enabled());
    }

    /// Every number a flag's help gives as its default is what an unset flag resolves to
    /// (the help is hand-written; `--speculative-max-streams` once said 1 after its default
    /// became 8).
    #[test]
    fn every_stated_number_default_is_the_default() {
        use clap::{CommandFactory, FromArgMatches};
        // Without environment variables: another test sets one while this one runs.
        let parse = |flags: &[&str]| -> Settings {
            let cmd = Args::command().mut_args(|a| a.env(None::<&str>));
            let matches = cmd
                .try_get_matches_from(["liger-serve", "--model", "m"].iter().chain(flags))
                .unwrap();
            Settings::resolve(Args::from_arg_matches(&matches).unwrap()).unwrap()
        };
        let unset = format!("{:?}", parse(&[]));
        let mut checked = Vec::new();
        for arg in Args::command().get_arguments() {
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let Some(rest) = help.split("[default: ").nth(1) else {
                continue;
            };
            let value = rest.split([']', ',', ';', ' ']).next().unwrap_or_default();
            if value.parse::<f64>().is_err() {
                continue;
            }
            let flag = format!("--{}", arg.get_long().expect("flags are long"));
            let stated = format!("{:?}", parse(&[&flag, value]));
            assert_eq!(stated, unset, "{flag}'s help says [default: {value}]");
            checked.push(flag);
        }
        assert!(checked.len() >= 8, "too few defaults found: {checked:?}");
    }

    #[test]
    fn environment_sits_between_flags_and_file() {
        // The only test that touches this variable, so no other test can see it.
        std::env::set_var("LIGER_MAX_BATCH_TOKENS", "77");
        let file: Args = toml::from_str("model = \"m\"\nmax_batch_tokens = 5").unwrap();
        let from_env = Settings::resolve(args(&[]).or(file.clone())).unwrap();
        let from_flag = Settings::resolve(args(&["--max-batch-tokens", "9"]).or(file)).unwrap();
        std::env::remove_var("LIGER_MAX_BATCH_TOKENS");
        assert_eq!(from_env.max_batch_tokens, 77);
        assert_eq!(from_flag.max_batch_tokens, 9);
    }

    #[test]
    fn bad_settings_are_explained() {
        let e = Settings::resolve(Args::default()).unwrap_err().to_string();
        assert!(e.contains("--model"), "{e}");
        let e = Settings::resolve(args(&["--model", "m", "--max-running", "0"])).unwrap_err();
        assert!(e.to_string().contains("max-running"));
        let e = Settings::resolve(args(&[
            "--model",
            "m",
            "--speculative-ngram-min",
            "4",
            "--speculative-ngram-max",
            "3",
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("--speculative-ngram-min (4)"), "{e}");
        let e =
            Settings::resolve(args(&["--model", "m", "--speculative-tokens", "65"])).unwrap_err();
        assert!(e.to_string().contains("--speculative-tokens 65"), "{e}");
        let e = Settings::resolve(args(&["--model", "m", "--compute-nice", "20"])).unwrap_err();
        assert!(
            e.to_string().contains("--compute-nice must be 0 to 19"),
            "{e}"
        );
        assert!(
            toml::from_str::<Args>("modle = \"x\"").is_err(),
            "typos in the file are caught"
        );
        assert!(Args::try_parse_from(["liger-serve", "--device", "tpu"]).is_err());
        let e = Args::try_parse_from(["liger-serve", "--quantize", "q3"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("use q8_0 or q4k"), "{e}");
    }

    #[test]
    fn quantization_from_flag_or_file() {
        let file: Args = toml::from_str("model = \"m\"\nquantize = \"q4k\"").unwrap();
        let s = Settings::resolve(args(&[]).or(file.clone())).unwrap();
        assert_eq!(s.quantize, Some(Quantization::Q4K));
        let s = Settings::resolve(args(&["--quantize", "q8_0"]).or(file)).unwrap();
        assert_eq!(s.quantize, Some(Quantization::Q8_0));
        assert!(toml::from_str::<Args>("quantize = \"q5\"").is_err());
    }

    #[test]
    fn the_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/server.toml");
        let a = Args::from_toml_file(&path).unwrap();
        assert!(a.model.is_some());
        Settings::resolve(a).unwrap();
    }
}
