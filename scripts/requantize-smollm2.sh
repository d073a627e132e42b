#!/usr/bin/env bash
# Print the path of the SmolLM2 fixture requantized by llama.cpp to TYPE (F32, Q8_0, ...),
# made once with the llama-quantize given and cached beside the fixture: each copy is
# hundreds of MB, and the benches used to leave one in every output folder.
#
#   scripts/requantize-smollm2.sh LLAMA_QUANTIZE TYPE
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -eq 2 ]] || { echo "usage: $0 LLAMA_QUANTIZE TYPE" >&2; exit 2; }
quantize="$1" type="$2"
fixture="$(scripts/fetch-smollm2.sh)"
out="$(dirname "$fixture")/SmolLM2-135M-Instruct.$type.gguf"
if [[ ! -f "$out" ]]; then
  # Written under a temporary name and renamed, so an interrupted run leaves no half file.
  tmp="$out.tmp.$$"
  trap 'rm -f "$tmp"' EXIT
  "$quantize" --allow-requantize "$fixture" "$tmp" "$type" >"$tmp.log" 2>&1 ||
    { tail -5 "$tmp.log" >&2; rm -f "$tmp.log"; echo "llama-quantize to $type failed" >&2; exit 1; }
  rm -f "$tmp.log"
  mv "$tmp" "$out"
fi
echo "$out"
