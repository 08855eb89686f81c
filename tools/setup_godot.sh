#!/usr/bin/env bash
# Installs what the Godot client's tests need: a headless Godot 4 (Debian sid's `godot` package, 4.6.x).
# Godot 4 needs a newer libc than Debian 12, so it lives in a private Debian sid root built once with
# debootstrap under ${GLLM_CACHE:-$HOME/.cache/gllm}/godot-root (about 1 GB) and is started from the host
# through that root's own dynamic loader (no chroot, no root privileges needed once built), via the
# wrapper ${GLLM_CACHE:-$HOME/.cache/gllm}/godot that this script writes.
#
# Idempotent and cached: does nothing when $GODOT_BIN is set, or the root is already built and its Godot runs.
# Installs only as root with apt-get (as on CI); elsewhere prints a note and exits 0, and
# tests/test_client_godot.py then skips and says why. Where it can install but the install fails (sid's
# package moved, the network is down), it exits 1: the Godot tests must never skip silently on CI.
set -u

CACHE="${GLLM_CACHE:-$HOME/.cache/gllm}"
ROOT="$CACHE/godot-root"
WRAPPER="$CACHE/godot"
MIRROR="${GLLM_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

godot_runs() {  # $1: a godot command; prints its version
  local v
  v=$("$1" --headless --version 2>/dev/null | tail -1) || return 1
  case "$v" in 4.*) echo "$v"; return 0 ;; *) return 1 ;; esac
}

if [ -n "${GODOT_BIN:-}" ]; then
  if godot_runs "$GODOT_BIN" >/dev/null; then exit 0; fi
  echo "gllm: GODOT_BIN=$GODOT_BIN is set but does not run as Godot 4 (--headless --version)" >&2
  exit 1
fi

write_wrapper() {
  # The root's own loader and library folders: the multiarch ones, those its ld.so.conf.d names, and private
  # ones (pulseaudio keeps libpulsecommon off the search path, reached through an rpath).
  local loader triplet dirs d libpath
  loader=$(ls "$ROOT"/usr/lib/*-linux-gnu*/ld-linux*.so.[0-9] 2>/dev/null | head -1)
  [ -n "$loader" ] || return 1
  triplet=$(basename "$(dirname "$loader")")
  dirs="/usr/lib/$triplet:/lib/$triplet:/usr/lib/$triplet/pulseaudio"
  for d in $(cat "$ROOT"/etc/ld.so.conf.d/*.conf 2>/dev/null | grep '^/'); do dirs="$dirs:$d"; done
  libpath=$(echo "$dirs" | tr ':' '\n' | sed "s|^|\$R|" | paste -sd:)
  cat >"$WRAPPER.tmp" <<WRAP
#!/bin/sh
# Runs Debian sid's Godot 4 from the private root $ROOT through that root's own loader (written by
# tools/setup_godot.sh).
R="$ROOT"
exec "\$R${loader#"$ROOT"}" --library-path "$libpath" "\$R/usr/bin/godot" "\$@"
WRAP
  chmod +x "$WRAPPER.tmp" && mv "$WRAPPER.tmp" "$WRAPPER"
}

if [ -f "$ROOT/.gllm-ready" ] && [ -x "$WRAPPER" ] && godot_runs "$WRAPPER" >/dev/null; then
  exit 0
fi

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: Godot 4 is missing and cannot be installed here (needs root and apt-get to debootstrap a"
  echo "      Debian sid root): the Godot client's tests will be skipped. Set GODOT_BIN to a Godot 4 binary,"
  echo "      or run tools/setup_godot.sh as root."
  exit 0
fi

fail() { echo "gllm: setup_godot: $*" >&2; exit 1; }

if ! command -v debootstrap >/dev/null 2>&1; then
  bash "$(dirname "$0")/apt_install.sh" --no-install-recommends debootstrap || fail "could not install debootstrap"
fi

start=$SECONDS
mkdir -p "$CACHE" || fail "cannot create $CACHE"
if [ ! -f "$ROOT/.gllm-installed" ]; then
  echo "building a Debian sid root for Godot 4 under $ROOT (once; about 1 GB, about a minute)"
  BUILD="$ROOT.build"
  rm -rf "$BUILD" "$ROOT"
  if ! debootstrap --variant=minbase sid "$BUILD" "$MIRROR" >"$CACHE/godot-debootstrap.log" 2>&1; then
    tail -20 "$CACHE/godot-debootstrap.log" >&2
    fail "debootstrap of Debian sid failed (full log: $CACHE/godot-debootstrap.log)"
  fi
  in_root() { chroot "$BUILD" env DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
  if ! in_root apt-get -qq -o Acquire::Check-Valid-Until=false update >>"$CACHE/godot-debootstrap.log" 2>&1 ||
     ! in_root apt-get -qq -o Acquire::Check-Valid-Until=false install -y --no-install-recommends godot \
       >>"$CACHE/godot-debootstrap.log" 2>&1; then
    tail -20 "$CACHE/godot-debootstrap.log" >&2
    fail "apt-get install godot inside the sid root failed (did sid's package change? log: $CACHE/godot-debootstrap.log)"
  fi
  in_root apt-get -qq clean >/dev/null 2>&1 || true
  touch "$BUILD/.gllm-installed"
  mv "$BUILD" "$ROOT" || fail "cannot move $BUILD to $ROOT"
fi
write_wrapper || fail "no dynamic loader found in $ROOT"
if ! v=$(godot_runs "$WRAPPER"); then
  "$WRAPPER" --headless --version >&2
  fail "Godot was installed in $ROOT but does not run as Godot 4 (see above)"
fi
touch "$ROOT/.gllm-ready"
echo "Godot $v ready in $ROOT ($((SECONDS - start)) s); run it with $WRAPPER"
