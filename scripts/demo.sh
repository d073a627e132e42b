#!/usr/bin/env bash
# Demo on the default model, SmolLM2-135M-Instruct: fetch it (cached), convert it to a
# Liger model with the settings the committed recovery adapter ships with
# (models/smollm2-135m-liger/convert.args), merge the adapter into it, and serve the
# recovered model.
#
#   scripts/demo.sh [--prepare-only] ["your question"]
#
# --prepare-only: only build the recovered model folder and print its path as the last line
# (a folder `liger-serve --model` accepts). It is cached under $LIGER_CACHE (default
# ~/.cache/liger), keyed by the adapter's contents, so a second run is fast.
#
# Otherwise, once prepared, it serves the recovered model with
# `liger-serve --model DIR --host 127.0.0.1 --port 8080` and prints a curl line to try.
set -euo pipefail
cd "$(dirname "$0")/.."

prepare_only=0
if [[ "${1:-}" == "--prepare-only" ]]; then
  prepare_only=1
  shift
fi
prompt="${1:-What is the capital of France?}"

gguf="$(scripts/fetch-smollm2.sh)"
cache="${LIGER_CACHE:-$HOME/.cache/liger}/smollm2-135m-instruct"
adapter=models/smollm2-135m-liger
# The adapter only fits a student converted as it was trained (e.g. its window), so the
# conversion flags live beside it; both cached folders are keyed by them.
args_file="$adapter/convert.args"
[[ -f "$args_file" ]] || { echo "demo: $args_file is missing" >&2; exit 1; }
read -r -a convert_args < "$args_file" || true # a last line without a newline still reads
flags_key="$(printf '%s ' "${convert_args[@]}" | sha256sum | cut -c1-8)"
key="$(cat "$args_file" "$adapter/adapter_config.json" "$adapter/adapter_model.safetensors" | sha256sum | cut -c1-16)"
zero_shot="$cache/liger-gla-zero-shot-$flags_key"
recovered="$cache/liger-gla-recovered-$key"

# A folder is usable when every file a server needs is there (folders are written
# atomically, so a present folder is a complete one; the check guards against old layouts).
complete() {
  local d="$1"
  [[ -f "$d/config.json" && -f "$d/model.safetensors" && -f "$d/tokenizer.json" && -f "$d/tokenizer_config.json" ]]
}

if ! complete "$recovered"; then
  echo "demo: building the recovered model (once; cached in $recovered)" >&2
  cargo build --release -q -p liger-converter --bin liger-convert >&2
  if ! complete "$zero_shot"; then
    target/release/liger-convert convert --from "$gguf" "${convert_args[@]}" --out "$zero_shot" \
      --force --quiet >&2
  fi
  target/release/liger-convert apply-adapter --model "$zero_shot" --adapter "$adapter" \
    --out "$recovered" --force --quiet >&2
fi

if [[ $prepare_only == 1 ]]; then
  echo "$recovered"
  exit 0
fi

cargo build --release -q -p liger-server --bin liger-serve >&2
echo "demo: serving $recovered on http://127.0.0.1:8080 (OpenAI API; Ctrl-C stops). Try:" >&2
echo "  curl -s http://127.0.0.1:8080/v1/chat/completions -H 'content-type: application/json' \\" >&2
echo "    -d '{\"model\":\"smollm2-135m-liger\",\"messages\":[{\"role\":\"user\",\"content\":\"$prompt\"}]}'" >&2
exec target/release/liger-serve --model "$recovered" --served-model-name smollm2-135m-liger \
  --host 127.0.0.1 --port 8080
