#!/usr/bin/env bash
# Gives every workspace member empty sources, so that the images' first `cargo build` compiles
# only the dependencies (a layer reused until Cargo.toml or Cargo.lock change) and the second
# one, over the real sources, compiles only the workspace's own crates.
#
# Usage: docker/cargo-stubs.sh [WORKSPACE_DIR]   (default: the current directory)
#
# The workspace must hold Cargo.toml, Cargo.lock and each member's Cargo.toml, nothing else:
# the script writes an empty file for every target each member declares ([lib], [[bin]],
# [[bench]], [[example]], [[test]]; cargo refuses a manifest whose declared targets are
# missing), `fn main() {}` where the target needs one. scripts/check-deploy.sh runs it on a
# scratch copy and has cargo load the result with --locked.
set -euo pipefail
cd "${1:-.}"

members=$(sed -n '/^members *=/{s/.*\[\(.*\)\].*/\1/;s/[",]/ /g;p;}' Cargo.toml)
[[ -n "${members// /}" ]] || { echo "cargo-stubs: no [workspace] members in Cargo.toml" >&2; exit 1; }

# One line per declared target: KIND NAME PATH (NAME and PATH "-" when not given).
targets() {
  awk '
    function flush() { if (kind != "") print kind, (name == "" ? "-" : name), (path == "" ? "-" : path) }
    /^\[/ { flush(); kind = ""; name = ""; path = "" }
    /^\[lib\]/ { kind = "lib" }
    /^\[\[(bin|bench|example|test)\]\]/ { kind = $0; gsub(/[][ ]/, "", kind) }
    kind != "" && /^name *=/ { v = $0; sub(/^name *= */, "", v); gsub(/"/, "", v); name = v }
    kind != "" && /^path *=/ { v = $0; sub(/^path *= */, "", v); gsub(/"/, "", v); path = v }
    END { flush() }' "$1"
}

for m in $members; do
  [[ -f "$m/Cargo.toml" ]] || { echo "cargo-stubs: $m/Cargo.toml missing" >&2; exit 1; }
  mkdir -p "$m/src"
  : >"$m/src/lib.rs" # every member here is a library (cargo finds it at the default path)
  while read -r kind name path; do
    if [[ "$path" == - ]]; then
      case "$kind" in
        lib) path=src/lib.rs ;;
        bin) path=src/main.rs ;;
        bench) path="benches/$name.rs" ;;
        example) path="examples/$name.rs" ;;
        test) path="tests/$name.rs" ;;
      esac
    fi
    mkdir -p "$m/$(dirname "$path")"
    if [[ "$kind" == lib ]]; then : >"$m/$path"; else echo 'fn main() {}' >"$m/$path"; fi
  done < <(targets "$m/Cargo.toml")
done
