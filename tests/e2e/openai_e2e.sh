#!/usr/bin/env bash
# End-to-end test of liger-serve with the official `openai` Python client.
#
# Builds the release binaries, fetches the SmolLM2-135M-Instruct GGUF fixture, converts it
# twice (`liger-convert convert` -> Liger-GLA folder, `liger-convert import` -> the plain
# Transformer folder), then for each folder starts liger-serve on a free 127.0.0.1 port and
# runs tests/e2e/openai_e2e.py against it: chat and completions, streamed and not, and echo
# + logprobs compared with the golden reference logprobs (tolerance 1e-2). Stops the server
# after each run. Exits non-zero on any failure; the last line is `N passed, M failed`.
#
#   LIGER_E2E_WORK   working folder (default: a fresh temp folder, removed at the end)
#   LIGER_GOLDEN     golden logits JSON (default: shared/golden/ beside the repository)
#   PYTHON           python with venv and pip (default: python3)
#   LIGER_E2E_SKIP_BUILD=1  use the binaries already built in $LIGER_E2E_BIN_DIR
#   LIGER_E2E_BIN_DIR       where the binaries are (default: target/release); the test suite
#                           points it at target/debug, which `cargo test` has just built
#                           (dependencies optimized), to avoid a second full build
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
BIN="${LIGER_E2E_BIN_DIR:-target/release}"
GOLDEN="${LIGER_GOLDEN:-$ROOT/../shared/golden/smollm2_135m_logits.json}"
if [[ -n "${LIGER_E2E_WORK:-}" ]]; then
  WORK="$LIGER_E2E_WORK"
  mkdir -p "$WORK"
else
  WORK="$(mktemp -d)"
  trap 'rm -rf "$WORK"' EXIT
fi
API_KEY="e2e-$RANDOM$RANDOM"
passed=0
failed=0
server_pid=""

step() { # step NAME COMMAND...: a setup step counts as one check
  local name="$1"
  shift
  if "$@"; then
    echo "ok    $name"
    passed=$((passed + 1))
  else
    echo "FAIL  $name"
    failed=$((failed + 1))
    return 1
  fi
}

finish() {
  [[ -n "$server_pid" ]] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  echo "$passed passed, $failed failed"
  [[ $failed -eq 0 ]] && exit 0 || exit 1
}

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Starts liger-serve on MODEL_DIR and waits for /health to answer 200.
start_server() {
  local dir="$1" name="$2" log="$3"
  port="$(free_port)"
  LIGER_LOG_FORMAT="${log_format:-}" "$BIN/liger-serve" --model "$dir" --served-model-name "$name" \
    --host 127.0.0.1 --port "$port" --api-key "$API_KEY" --max-running 4 >"$log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 600); do
    if ! kill -0 "$server_pid" 2>/dev/null; then
      echo "liger-serve exited:"; tail -20 "$log"; server_pid=""; return 1
    fi
    code="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health" || true)"
    [[ "$code" == 200 ]] && return 0
    sleep 0.2
  done
  echo "liger-serve did not become healthy:"; tail -20 "$log"
  return 1
}

stop_server() {
  kill "$server_pid" 2>/dev/null
  wait "$server_pid" 2>/dev/null
  server_pid=""
  return 0
}

if [[ "${LIGER_E2E_SKIP_BUILD:-}" == 1 ]]; then
  step "binaries present in $BIN" test -x "$BIN/liger-serve" -a -x "$BIN/liger-convert" || finish
else
  step "build liger-serve and liger-convert (release)" \
    cargo build --release --locked -q -p liger-server -p liger-converter || finish
fi
gguf="$(scripts/fetch-smollm2.sh)"
step "fetch the SmolLM2 fixture" test -f "$gguf" || finish
step "golden reference present ($GOLDEN)" test -f "$GOLDEN" || finish
step "liger-convert convert (Liger-GLA)" \
  "$BIN/liger-convert" convert --from "$gguf" --out "$WORK/liger" --force -q || finish
step "liger-convert import (Transformer)" \
  "$BIN/liger-convert" import --from "$gguf" --out "$WORK/transformer" --force -q || finish
step "python venv with openai" \
  bash -c "'$PYTHON' -m venv '$WORK/venv' && '$WORK/venv/bin/pip' install -q --disable-pip-version-check openai" || finish

# Logs written to a file are plain text, or one JSON object per line (the transformer run).
plain_log() { ! grep -q $'\e\[' "$1"; }
json_log() {
  "$PYTHON" -c 'import json, sys; [json.loads(l) for l in open(sys.argv[1]) if l.strip()]' "$1" &&
    grep -q '"level"' "$1"
}

for kind in transformer liger; do
  reference=$([[ $kind == liger ]] && echo liger_gla || echo transformer)
  log_format=$([[ $kind == transformer ]] && echo json || echo text)
  name="smollm2-$kind"
  if ! step "liger-serve $kind starts and becomes healthy" start_server "$WORK/$kind" "$name" "$WORK/$kind.log"; then
    continue
  fi
  out="$("$WORK/venv/bin/python" tests/e2e/openai_e2e.py --base-url "http://127.0.0.1:$port/v1" \
    --model "$name" --api-key "$API_KEY" --golden "$GOLDEN" --reference "$reference" 2>&1)"
  rc=$?
  echo "$out" | sed '$d'
  summary="$(echo "$out" | tail -1)"
  if [[ "$summary" =~ ^([0-9]+)\ passed,\ ([0-9]+)\ failed$ ]]; then
    passed=$((passed + BASH_REMATCH[1]))
    failed=$((failed + BASH_REMATCH[2]))
    [[ $rc -ne 0 && ${BASH_REMATCH[2]} -eq 0 ]] && failed=$((failed + 1))
  else
    echo "FAIL  openai_e2e.py ($kind) crashed: $summary"
    failed=$((failed + 1))
  fi
  stop_server
  if [[ $log_format == json ]]; then
    step "liger-serve $kind log: one JSON object per line (LIGER_LOG_FORMAT=json)" json_log "$WORK/$kind.log" || true
  else
    step "liger-serve $kind log: no colour codes in a file" plain_log "$WORK/$kind.log" || true
  fi
done
finish
