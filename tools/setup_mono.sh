#!/usr/bin/env bash
# Installs what the Unity client's tests need: Debian's Mono C# compiler (mcs) and runtime (mono) with the
# class libraries the client uses (System, System.Core). Idempotent: does nothing when they are present.
# Installs only as root with apt-get (as on CI); elsewhere prints what to install and exits 0, and
# tests/test_client_unity.py then skips and says why.
set -u

have_all() {
  command -v mcs >/dev/null 2>&1 && command -v mono >/dev/null 2>&1 || return 1
  # System.dll (sockets) and System.Core.dll must be in the 4.5 profile mcs compiles against.
  local d
  for d in /usr/lib/mono/4.5 /usr/lib/mono/4.5-api; do
    [ -f "$d/System.dll" ] && [ -f "$d/System.Core.dll" ] && return 0
  done
  return 1
}

if have_all; then
  exit 0
fi

PKGS="mono-mcs mono-runtime libmono-system4.0-cil libmono-system-core4.0-cil"

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: Mono (mcs + mono) is missing and cannot be installed here (needs root and apt-get):"
  echo "      the Unity client's tests will be skipped. Install it with: sudo apt-get install $PKGS"
  exit 0
fi

echo "installing Mono for the Unity client's tests: $PKGS"
# Waits for the apt/dpkg locks; on a machine that can install (root + apt, as CI), a failure is an error,
# not a skipped test.
bash "$(dirname "$0")/apt_install.sh" --no-install-recommends $PKGS || exit 1
if ! have_all; then
  echo "gllm: Mono was installed but mcs/mono or System.dll is still missing" >&2
  exit 1
fi
echo "Mono installed: $(mcs --version 2>/dev/null | head -1)"
