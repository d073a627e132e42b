#!/usr/bin/env bash
# Converts the default model (SmolLM2-135M-Instruct) into every Liger structure, recovers
# each with the same budget, and compares them in one `liger-convert eval` table: perplexity
# ratio and greedy agreement with the original on held-out text, decode latency after a
# 512-token prefill, and state bytes per sequence. Not part of CI (about 20 min of training
# per structure on one CPU thread).
#
#   scripts/compare-variants.sh [WORK_DIR]      # default target/compare-variants
#
# Folders already finished in WORK_DIR are kept, so an interrupted run can be restarted.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-target/compare-variants}"
mkdir -p "$work"
cargo build --release -q -p liger-converter --bin liger-convert
bin=target/release/liger-convert
gguf="$(scripts/fetch-smollm2.sh)"
[[ -f "$work/orig/config.json" ]] || "$bin" import --from "$gguf" --out "$work/orig" --force --quiet

variants=(
  "gla="
  "hgrn2=--variant hgrn2"
  "gsa=--variant gsa --slots 64"
  "gla-h8=--full-attention-layers every:8"
  "window=--mix 0"
)
models=()
adapters=()
for spec in "${variants[@]}"; do
  name="${spec%%=*}"
  read -r -a flags <<<"${spec#*=}"
  dir="$work/$name"
  models+=(--model "$dir/model")
  adapters+=(--adapter "$dir/adapter")
  [[ -f "$dir/adapter/adapter_config.json" ]] && continue
  echo "== $name: convert and recover ($(date -u +%H:%M:%S))" >&2
  "$bin" convert --from "$gguf" --out "$dir/model" --force --quiet "${flags[@]}"
  # The same budget for every structure: attention transfer, then KL distillation.
  "$bin" recover --teacher "$work/orig" --student "$dir/model" \
    --data data/pydoc-train.txt data/smollm2-selfdistill.jsonl \
    --out "$dir/adapter" --adapter-only --stage all --force \
    --transfer-steps 40 --transfer-batch 4 --transfer-chunks 32 \
    --steps 40 --batch 2 --seq-len 256 --seed 0 --threads 1 --checkpoint-every 10 --quiet
done
echo "== eval ($(date -u +%H:%M:%S))" >&2
"$bin" eval "${models[@]}" "${adapters[@]}" --reference "$work/orig" \
  --data data/heldout.txt --latency --json --quiet >"$work/compare.json"
"$bin" eval "${models[@]}" "${adapters[@]}" --reference "$work/orig" \
  --data data/heldout.txt --latency --quiet | tee "$work/compare.md"
