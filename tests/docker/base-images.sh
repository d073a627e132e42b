#!/usr/bin/env bash
# Makes the base images that docker/Dockerfile builds from, where they cannot be pulled (an
# air-gapped machine, or one with no route to a registry, like the ones this project is tested
# on). docs/deploy.md, "Air-gapped builds", describes the same path for users.
#
#   debian:bookworm-slim   `debootstrap --variant=minbase bookworm` from Debian's packages
#                          (apt's mirror: DEBIAN_MIRROR, default http://deb.debian.org/debian),
#                          docs and locales left out as in the official slim image
#   rust:1-slim-bookworm   that, plus gcc, libc6-dev and ca-certificates, plus this machine's
#                          Rust toolchain (rustc, cargo and the standard library of the active
#                          rustup toolchain) at /usr/local/rust, CARGO_HOME=/usr/local/cargo
#                          as in the official image
#
# An image already present is kept (LIGER_DOCKER_REBUILD_BASE=1 makes both again). Unless
# LIGER_DOCKER_PULL=0, each is first pulled, with a timeout, in case a registry is reachable.
# Needs root (debootstrap) and a running Docker engine.
set -euo pipefail
cd "$(dirname "$0")/../.."

DOCKER="${DOCKER:-docker}"
DEBIAN_IMAGE=debian:bookworm-slim
RUST_IMAGE=rust:1-slim-bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
log() { echo "base-images: $*" >&2; }

have() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }
wanted() {
  [[ "${LIGER_DOCKER_REBUILD_BASE:-0}" == 1 ]] && return 0
  have "$1" && { log "$1: present"; return 1; }
  if [[ "${LIGER_DOCKER_PULL:-1}" != 0 ]] && timeout 60 "$DOCKER" pull -q "$1" >/dev/null 2>&1; then
    log "$1: pulled"
    return 1
  fi
  return 0
}

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

if wanted "$DEBIAN_IMAGE"; then
  command -v debootstrap >/dev/null || { log "debootstrap missing (apt-get install debootstrap)"; exit 1; }
  log "$DEBIAN_IMAGE: debootstrap from $MIRROR (a few minutes)"
  root="$scratch/rootfs"
  debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$scratch/debootstrap.log" 2>&1 || {
    tail -20 "$scratch/debootstrap.log" >&2
    exit 1
  }
  # As the official slim image: no docs, man pages or locales now or in later installs.
  cat >"$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
  rm -rf "$root"/usr/share/{man,info,locale}/* "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb http://deb.debian.org/debian-security bookworm-security main\n' \
    "$MIRROR" "$MIRROR" >"$root/etc/apt/sources.list"
  tar -C "$root" -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' - "$DEBIAN_IMAGE" >/dev/null
  rm -rf "$root"
  log "$DEBIAN_IMAGE: made ($("$DOCKER" image inspect -f '{{.Size}}' "$DEBIAN_IMAGE") bytes)"
fi

if wanted "$RUST_IMAGE"; then
  sysroot="$(rustc --print sysroot)"
  log "$RUST_IMAGE: $DEBIAN_IMAGE + gcc + the toolchain at $sysroot ($(rustc --version))"
  ctx="$scratch/rust"
  mkdir -p "$ctx/rust/bin" "$ctx/rust/lib/rustlib"
  cp -a "$sysroot"/bin/{rustc,cargo,rustdoc} "$ctx/rust/bin/"
  cp -a "$sysroot"/lib/*.so* "$ctx/rust/lib/"
  cp -a "$sysroot/lib/rustlib/x86_64-unknown-linux-gnu" "$ctx/rust/lib/rustlib/"
  [[ -d "$sysroot/libexec" ]] && cp -a "$sysroot/libexec" "$ctx/rust/"
  cat >"$ctx/Dockerfile" <<EOF
FROM $DEBIAN_IMAGE
RUN apt-get update \\
 && apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates \\
 && rm -rf /var/lib/apt/lists/*
COPY rust /usr/local/rust
ENV CARGO_HOME=/usr/local/cargo \\
    PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN mkdir -p /usr/local/cargo/bin && rustc --version && cargo --version
EOF
  DOCKER_BUILDKIT=1 "$DOCKER" build -q -t "$RUST_IMAGE" "$ctx" >/dev/null
  log "$RUST_IMAGE: made ($("$DOCKER" image inspect -f '{{.Size}}' "$RUST_IMAGE") bytes)"
fi
