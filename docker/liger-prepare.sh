#!/usr/bin/env bash
# liger-prepare: makes the model folder that liger-serve serves, once, from the settings below;
# run again with the same settings it does nothing. Installed in the images as
# /usr/local/bin/liger-prepare; docker/compose.yaml's `convert` service and the init container
# in deploy/k8s/liger.yaml run it before the server starts.
#
# Steps: `liger-convert convert` the source; then, if asked, `apply-adapter` a LoRA adapter
# and/or `recover` (LoRA training against the original); the result replaces OUT in one
# rename, with a stamp of the settings it was made from (OUT/.liger-prepare).
#
# Environment (scripts/check-deploy.sh reads the LIGER_* names of this list):
#   LIGER_CONVERT_FROM      the source: hub id (owner/name), model folder or .gguf file (required)
#   LIGER_CONVERT_OUT       the folder to make (default /models/liger)
#   LIGER_CONVERT_REVISION  hub revision of a hub id source (default: the hub's main)
#   LIGER_CONVERT_ARGS      more `liger-convert convert` flags, split on blanks
#                           (e.g. "--variant hgrn2 --dtype bf16 --full-attention-layers every:8")
#   LIGER_APPLY_ADAPTER     a LoRA adapter folder in PEFT's layout to merge after conversion
#                           (it must have been trained on the same conversion of the same source)
#   LIGER_RECOVER           1: also run `liger-convert recover` (hours on a CPU for real models)
#   LIGER_RECOVER_ARGS      its flags, split on blanks: at least `--data FILE...` or
#                           `--self-distill N`; not --adapter-only (a model must come out)
#   LIGER_PREPARE_FORCE     1: make OUT again even if its stamp matches, or replace a folder
#                           that liger-prepare did not make
#   HF_TOKEN, HF_HOME       hub token and cache, as for liger-convert
set -euo pipefail

log() { echo "liger-prepare: $*" >&2; }
die() { log "error: $*"; exit 1; }

src="${LIGER_CONVERT_FROM:-}"
[[ -n "$src" ]] || die "set LIGER_CONVERT_FROM to a hub id (owner/name), a model folder or a .gguf file"
out="${LIGER_CONVERT_OUT:-/models/liger}"
out="${out%/}"
rev="${LIGER_CONVERT_REVISION:-}"
adapter="${LIGER_APPLY_ADAPTER:-}"
recover="${LIGER_RECOVER:-0}"
force="${LIGER_PREPARE_FORCE:-0}"
read -r -a convert_args <<<"${LIGER_CONVERT_ARGS:-}"
read -r -a recover_args <<<"${LIGER_RECOVER_ARGS:-}"
[[ "$recover" == 0 || "$recover" == 1 ]] || die "LIGER_RECOVER must be 0 or 1, not '$recover'"
[[ "$force" == 0 || "$force" == 1 ]] || die "LIGER_PREPARE_FORCE must be 0 or 1, not '$force'"
if [[ -n "$adapter" ]]; then
  for f in adapter_config.json adapter_model.safetensors; do
    [[ -f "$adapter/$f" ]] || die "LIGER_APPLY_ADAPTER=$adapter: $f missing (a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors)"
  done
fi

# What OUT is made from. The adapter is named by its checksum, so a new adapter at the same
# path is applied again; a local source by its size and time (hashing gigabytes every start
# would be slow); a hub source by its revision.
settings() {
  echo "converter=$(liger-convert --version)"
  echo "from=$src"
  if [[ -f "$src" ]]; then echo "from_file=$(stat -c '%s %Y' "$src")"; fi
  echo "revision=$rev"
  echo "convert_args=${convert_args[*]}"
  if [[ -n "$adapter" ]]; then
    echo "adapter=$(cat "$adapter/adapter_config.json" "$adapter/adapter_model.safetensors" | sha256sum)"
  fi
  echo "recover=$recover"
  if [[ "$recover" == 1 ]]; then echo "recover_args=${recover_args[*]}"; fi
}
wanted="$(settings)"
stamp="$out/.liger-prepare"

parent="$(dirname "$out")"
mkdir -p "$parent"
# One liger-prepare at a time per folder (replicas sharing a volume start together).
exec 9>"$parent/.liger-prepare.lock"
flock 9 || die "cannot lock $parent/.liger-prepare.lock"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" && "$force" == 0 ]]; then
  log "$out is up to date (made from the same settings); nothing to do"
  exit 0
fi
if [[ -e "$out" && ! -f "$stamp" && "$force" == 0 ]]; then
  die "$out exists and was not made by liger-prepare; remove it or set LIGER_PREPARE_FORCE=1"
fi

# Leftovers of a run that was killed.
rm -rf "$parent"/.liger-prepare.work.* "$out.old"
work="$(mktemp -d "$parent/.liger-prepare.work.XXXXXX")"
child=""
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
# As a container's first process, pass a stop signal on to the running liger-convert (which
# removes its partial output) and leave.
forward() {
  if [[ -n "$child" ]]; then
    kill -s "$1" "$child" 2>/dev/null || true
    wait "$child" || true
  fi
  exit 143
}
trap 'forward TERM' TERM
trap 'forward INT' INT
run() {
  log "+ $*"
  "$@" &
  child=$!
  local rc=0
  wait "$child" || rc=$?
  child=""
  return "$rc"
}

cur="$work/converted"
run liger-convert convert --from "$src" --out "$cur" ${rev:+--revision "$rev"} "${convert_args[@]}"

if [[ -n "$adapter" ]]; then
  run liger-convert apply-adapter --model "$cur" --adapter "$adapter" --out "$work/adapted"
  cur="$work/adapted"
fi

if [[ "$recover" == 1 ]]; then
  # The teacher is the original as a Hugging Face folder.
  if [[ -d "$src" ]]; then
    teacher="$src"
  elif [[ -f "$src" ]]; then
    run liger-convert import --from "$src" --out "$work/teacher"
    teacher="$work/teacher"
  else
    # A hub id: the snapshot `convert` just downloaded into the hub cache.
    repo="${HF_HOME:-$HOME/.cache/huggingface}/hub/models--${src//\//--}"
    ref="${rev:-main}"
    if [[ -f "$repo/refs/$ref" ]]; then ref="$(cat "$repo/refs/$ref")"; fi
    teacher="$repo/snapshots/$ref"
    [[ -f "$teacher/config.json" ]] || die "no cached snapshot of $src at $teacher to use as the teacher"
  fi
  run liger-convert recover --teacher "$teacher" --student "$cur" --out "$work/recovered" "${recover_args[@]}"
  cur="$work/recovered"
  [[ -f "$cur/config.json" ]] || die "recover wrote no model to serve (LIGER_RECOVER_ARGS must not hold --adapter-only)"
fi

printf '%s\n' "$wanted" >"$cur/.liger-prepare"
if [[ -e "$out" ]]; then mv "$out" "$out.old"; fi
mv "$cur" "$out"
rm -rf "$out.old"
log "ready: $out"
liger-convert inspect "$out"
