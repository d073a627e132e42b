#!/usr/bin/env bash
# Prompt processing side by side with llama.cpp: llama-bench's pp<N> and the project's
# prefill bench (the original Transformer and the default Liger structure, same weights),
# in alternating rounds so machine noise hits both alike; prints a table of medians and
# the ratios to llama-bench, and writes it as JSON.
#
#   scripts/bench-prefill.sh [--tokens 128,512] [--rounds 3] [--precision f32,q8_0]
#
#   LLAMA_BENCH   path to llama-bench (default: built by scripts/build-llama-server.sh)
#   THREADS       threads for both (default 2)
#   BENCH_OUT     folder for the JSON and logs (default target/bench-prefill)
# Not part of CI (minutes of both cores).
set -euo pipefail
cd "$(dirname "$0")/.."
tokens=512 rounds=3 precisions=f32,q8_0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tokens) tokens="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --precision) precisions="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
threads="${THREADS:-2}"
out="${BENCH_OUT:-target/bench-prefill}"
mkdir -p "$out"
llama_bench="${LLAMA_BENCH:-$(scripts/build-llama-server.sh | tail -1)/llama-bench}"
cargo bench -p liger-model --bench decode --no-run >"$out/build.log" 2>&1
bench="$(cargo bench -p liger-model --bench decode --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))/\1/p' | tail -1)"
variant=window-w240-g384-a320-c4096-f16

: >"$out/runs.tsv"
for precision in ${precisions//,/ }; do
  case "$precision" in
    f32) gguf_type=F32 quantize=() ;;
    q8_0) gguf_type=Q8_0 quantize=(--quantize q8_0) ;;
    *) echo "precision must be f32 or q8_0, not $precision" >&2; exit 2 ;;
  esac
  # The fixture is Q4_1; our import dequantizes it, so llama.cpp gets the same values.
  gguf="$(scripts/requantize-smollm2.sh "$(dirname "$llama_bench")/llama-quantize" "$gguf_type")"
  for round in $(seq 1 "$rounds"); do
    # --repack 0: as in bench-http.sh (AMX repacking of Q8_0 crashes on the project's VM).
    "$llama_bench" -m "$gguf" -p "$tokens" -n 0 -t "$threads" -r 3 --repack 0 -o jsonl 2>/dev/null |
      python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(sys.argv[1], sys.argv[2], r["n_prompt"], "llama-bench", r["avg_ts"], sep="\t")
' "$precision" "$round" >>"$out/runs.tsv"
    RAYON_NUM_THREADS="$threads" "$bench" --prefill "$tokens" --reps 3 --variants "$variant" \
      "${quantize[@]}" 2>/dev/null |
      awk -F'|' -v p="$precision" -v r="$round" 'NF > 6 && $2 ~ /[0-9]/ {
        gsub(/ /, "", $2); gsub(/ /, "", $4); gsub(/ /, "", $6);
        print p "\t" r "\t" $2 "\t" $4 "\t" $6 }' >>"$out/runs.tsv"
  done
done
python3 - "$out/runs.tsv" "$out/prefill.json" <<'EOF'
import json, statistics, sys
from collections import defaultdict
runs = defaultdict(list)
for line in open(sys.argv[1]):
    p, _, n, who, ts = line.split("\t")
    runs[(p, int(n), who)].append(float(ts))
rows = []
print("| precision | prompt tokens | engine | tokens/s (median) | runs | vs llama-bench |")
print("|---|---:|---|---:|---:|---:|")
for (p, n, who), ts in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != "llama-bench")):
    med = statistics.median(ts)
    base = statistics.median(runs[(p, n, "llama-bench")])
    rows.append({"precision": p, "prompt_tokens": n, "engine": who, "tokens_per_s": med,
                 "runs": ts, "vs_llama_bench": med / base})
    print(f"| {p} | {n} | {who} | {med:.1f} | {len(ts)} | {med / base:.2f}x |")
json.dump(rows, open(sys.argv[2], "w"), indent=2)
EOF
