#!/usr/bin/env bash
# Demo on the default model, SmolLM2-135M-Instruct: fetch it (cached), then answer a chat
# question with the original Transformer and with its zero-shot Liger-GLA conversion.
#   scripts/demo.sh ["your question"]
set -euo pipefail
cd "$(dirname "$0")/.."
gguf="$(scripts/fetch-smollm2.sh)"
prompt="${1:-What is the capital of France?}"
cargo build --release -q -p liger-model --example generate
target/release/examples/generate "$gguf" --prompt "$prompt"
target/release/examples/generate "$gguf" --liger --prompt "$prompt"
