#!/usr/bin/env bash
# Install Debian packages for the tests (root only), waiting for the apt/dpkg locks when another apt-get or
# unattended-upgrades holds them, instead of failing at once. Usage: tools/apt_install.sh PKG...
set -uo pipefail
LOCK_TIMEOUT_S="${GLLM_APT_LOCK_TIMEOUT_S:-600}"
export DEBIAN_FRONTEND=noninteractive
deadline=$((SECONDS + LOCK_TIMEOUT_S))
# `apt-get update` does not honour DPkg::Lock::Timeout for the lists lock: retry while a lock is the reason.
while true; do
  if out=$(apt-get -qq update 2>&1); then break; fi
  if ! grep -q "Could not get lock\|Unable to lock" <<<"$out" || [ $SECONDS -ge $deadline ]; then
    echo "$out" >&2
    echo "gllm: apt-get update failed (waited up to ${LOCK_TIMEOUT_S}s for the apt lock)" >&2
    exit 1
  fi
  sleep 3
done
if ! apt-get -o DPkg::Lock::Timeout="$((deadline - SECONDS > 1 ? deadline - SECONDS : 1))" -qq install -y \
     "$@" >/dev/null; then
  echo "gllm: could not install $* with apt-get (see its message above; the dpkg lock was waited for up to" \
       "${LOCK_TIMEOUT_S}s)" >&2
  exit 1
fi
