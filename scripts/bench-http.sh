#!/usr/bin/env bash
# HTTP load benchmark: liger-serve on the recovered SmolLM2-135M-Liger (scripts/demo.sh
# --prepare-only), and, when LLAMA_SERVER names a llama.cpp `llama-server` binary, the same
# load against it serving the original GGUF, so the table shows both side by side (the two
# run at once and take turns round by round).
#
#   scripts/bench-http.sh [--concurrency 1,8,32] [--prompt-tokens 256,4096] [--max-tokens 64]
#
#   LLAMA_SERVER   path to llama-server (optional; scripts/build-llama-server.sh builds it)
#   PRECISION      weights for both servers: f32 (default) or q8_0. liger-serve gets
#                  --dtype f32 [--quantize q8_0]; llama-server gets the fixture's GGUF
#                  requantized to F32 or Q8_0 by the llama-quantize beside it
#   BENCH_OUT      folder for results.json, results.md and the logs (default target/bench-http)
#   SKIP_LIGER     set to 1 to run only llama-server
#   LIGER_ARGS     more liger-serve flags, split at spaces (e.g. "--speculative-tokens 0")
#   LLAMA_ARGS     more llama-server flags (e.g. "--spec-type ngram-simple")
# Not part of CI: it takes minutes (32 streams x 4K-token prompts on a 2-core CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
args=("$@")
out="${BENCH_OUT:-target/bench-http}"
mkdir -p "$out"
venv="${LIGER_CACHE:-$HOME/.cache/liger}/bench-venv"
[[ -x "$venv/bin/python" ]] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q openai; }

model_dir="$(scripts/demo.sh --prepare-only | tail -1)"
cargo build --release -q -p liger-server --bin liger-serve
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_healthy() { # URL PID LOG
  for _ in $(seq 1 600); do
    kill -0 "$2" 2>/dev/null || { echo "server exited:"; tail -20 "$3"; return 1; }
    [[ "$(curl -s -o /dev/null -w '%{http_code}' "$1" || true)" == 200 ]] && return 0
    sleep 0.5
  done
  echo "server never became healthy"; return 1
}

precision="${PRECISION:-f32}"
case "$precision" in
  f32) quantize=() ; gguf_type=F32 ;;
  q8_0) quantize=(--quantize q8_0) ; gguf_type=Q8_0 ;;
  *) echo "PRECISION must be f32 or q8_0, not $precision" >&2; exit 2 ;;
esac
# Both servers run at once and take turns round by round (benches/http_load.py): a machine
# whose speed drifts then slows both alike. An idle server takes no CPU.
read -ra liger_args <<<"${LIGER_ARGS:-}"
read -ra llama_args <<<"${LLAMA_ARGS:-}"
pids=()
stop_servers() { local p; for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap stop_servers EXIT
servers=()
if [[ "${SKIP_LIGER:-0}" != 1 ]]; then
  port="$(free_port)"
  target/release/liger-serve --model "$model_dir" --served-model-name liger --port "$port" \
    --dtype f32 "${quantize[@]}" --max-running 32 --max-waiting 256 --max-model-len 8192 \
    "${liger_args[@]}" >"$out/liger-serve.log" 2>&1 &
  pids+=($!)
  wait_healthy "http://127.0.0.1:$port/health" "$!" "$out/liger-serve.log"
  servers+=(--server liger-serve "http://127.0.0.1:$port/v1" liger)
fi

if [[ -n "${LLAMA_SERVER:-}" ]]; then
  # The fixture is Q4_1; liger-serve runs its dequantized weights, so llama.cpp gets the
  # same values in the same storage precision.
  gguf="$(scripts/requantize-smollm2.sh "$(dirname "$LLAMA_SERVER")/llama-quantize" "$gguf_type")"
  port="$(free_port)"
  # --no-repack: on AMX CPUs llama.cpp repacks Q8_0 weights for its AMX kernels, which
  # crash (SIGSEGV) on the project's VM; f32 weights are never repacked.
  "$LLAMA_SERVER" -m "$gguf" --port "$port" -np 32 -c $((32 * 8192)) --cont-batching \
    --no-repack "${llama_args[@]}" >"$out/llama-server.log" 2>&1 &
  pids+=($!)
  wait_healthy "http://127.0.0.1:$port/health" "$!" "$out/llama-server.log"
  servers+=(--server llama-server "http://127.0.0.1:$port/v1" smollm2)
fi
[[ ${#servers[@]} -gt 0 ]] || { echo "nothing to run: SKIP_LIGER=1 and no LLAMA_SERVER" >&2; exit 2; }
"$venv/bin/python" benches/http_load.py "${servers[@]}" --json "$out/results.json" "${args[@]}" \
  | tee "$out/results.md"
