#!/usr/bin/env bash
# liger-healthcheck: exits 0 when liger-serve's GET /health answers 200 (the model is loaded),
# 1 otherwise (503 while loading, no answer, refused). Installed in the images as
# /usr/local/bin/liger-healthcheck and used by their HEALTHCHECK and by docker/compose.yaml.
#
# Needs only bash (its /dev/tcp), so the runtime images carry no curl or wget.
# Environment: LIGER_PORT (the server's port, default 8080), LIGER_HEALTH_HOST (default
# 127.0.0.1: the server must listen there, as it does with LIGER_HOST=0.0.0.0),
# LIGER_HEALTH_TIMEOUT (seconds to wait for the answer, default 5).
set -euo pipefail
host="${LIGER_HEALTH_HOST:-127.0.0.1}"
port="${LIGER_PORT:-8080}"

if ! { exec 3<>"/dev/tcp/$host/$port"; } 2>/dev/null; then
  echo "liger-healthcheck: cannot connect to $host:$port" >&2
  exit 1
fi
printf 'GET /health HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n' "$host" >&3
status=""
IFS= read -r -t "${LIGER_HEALTH_TIMEOUT:-5}" status <&3 || true
status="${status%$'\r'}"
if [[ "$status" =~ ^HTTP/1\.[01]\ 200 ]]; then
  exit 0
fi
echo "liger-healthcheck: $host:$port/health answered '${status:-nothing}'" >&2
exit 1
