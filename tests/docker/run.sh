#!/usr/bin/env bash
# Container tests: builds the CPU image (docker/Dockerfile) and the proxy image
# (docker/Dockerfile.proxy) and runs tests/docker/scenarios.py against them: the prepare job,
# the server's health, non-root user, the openai client, a restart that keeps the state
# directory, SIGTERM drains and their grace period, a full state directory, and two replicas
# behind nginx with conversation affinity and failover. scripts/test.sh runs it when a Docker
# engine answers; .ci/run installs and starts one.
#
# Base images that cannot be pulled are made locally (tests/docker/base-images.sh: debootstrap
# and this machine's Rust toolchain), so this needs no registry. Builds trust the CA bundle
# LIGER_DOCKER_EXTRA_CA (default: this machine's, /etc/ssl/certs/ca-certificates.crt) through
# the Dockerfile's `extra_ca` build secret, for machines behind a TLS-intercepting proxy.
# Layers are cached by the engine: a second run rebuilds only what changed.
#
# Environment: DOCKER (the client; default: the first that can build with BuildKit),
# LIGER_DOCKER_PORT (the servers' port on their 127.0.0.x addresses, default 28080),
# PYTHON (default python3), LIGER_CACHE (default ~/.cache/liger; holds the test's venv).
set -euo pipefail
cd "$(dirname "$0")/../.."

log() { echo "docker-test: $*" >&2; }

# A client that builds with BuildKit: through buildx where the client has it, else a client
# older than 23 (Debian bookworm's docker.io), which drives the engine's built-in BuildKit.
pick_docker() {
  local d v
  for d in ${DOCKER:-} docker /usr/bin/docker; do
    command -v "$d" >/dev/null 2>&1 || continue
    "$d" info >/dev/null 2>&1 || continue
    if "$d" buildx version >/dev/null 2>&1; then echo "$d"; return 0; fi
    v="$("$d" version -f '{{.Client.Version}}' 2>/dev/null || echo 99)"
    if ((${v%%.*} < 23)); then echo "$d"; return 0; fi
  done
  return 1
}
DOCKER="$(pick_docker)" || { log "no Docker engine answers (or no client that can use BuildKit)"; exit 1; }
export DOCKER DOCKER_BUILDKIT=1
if "$DOCKER" compose version >/dev/null 2>&1; then
  COMPOSE="$DOCKER compose"
elif command -v docker-compose >/dev/null; then
  COMPOSE=docker-compose
else
  log "neither 'docker compose' nor docker-compose found"
  exit 1
fi
log "client $DOCKER ($("$DOCKER" version -f '{{.Client.Version}}')), engine $("$DOCKER" version -f '{{.Server.Version}}'), compose: $COMPOSE"

tests/docker/base-images.sh

ca="${LIGER_DOCKER_EXTRA_CA:-/etc/ssl/certs/ca-certificates.crt}"
secret=()
[[ -s "$ca" ]] && secret=(--secret "id=extra_ca,src=$ca")
build() { # build TAG DOCKERFILE: builds from the repository root, reports time and size
  local t0=$SECONDS
  if ! "$DOCKER" build -q "${secret[@]}" -f "$2" -t "$1" . >/dev/null; then
    log "building $1 failed; again with the build's output:"
    "$DOCKER" build --progress=plain "${secret[@]}" -f "$2" -t "$1" . >&2
    exit 1
  fi
  log "$1: built in $((SECONDS - t0)) s, $(("$("$DOCKER" image inspect -f '{{.Size}}' "$1")" / 1000000)) MB"
}
build liger:cpu docker/Dockerfile
build liger-proxy docker/Dockerfile.proxy

gguf="$(scripts/fetch-smollm2.sh)"
venv="${LIGER_CACHE:-$HOME/.cache/liger}/venv-docker-test"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import openai, yaml' 2>/dev/null; then
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check openai pyyaml
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$venv/bin/python" tests/docker/scenarios.py --docker "$DOCKER" --compose "$COMPOSE" \
  --gguf "$gguf" --work "$work" --port "${LIGER_DOCKER_PORT:-28080}"
