#!/usr/bin/env bash
# Installs what the C++ client's tests need beyond g++ and cmake: Debian's clang 14 with the compiler-rt
# runtimes (libclang-rt-14-dev: AddressSanitizer, UndefinedBehaviorSanitizer and libFuzzer for clang).
# Idempotent: does nothing when they are present. Installs only as root with apt-get (as on CI); elsewhere
# prints what to install and exits 0, and tests/test_client_cpp.py then skips the clang builds and the fuzzer
# and says why. On a machine that can install, a failed install is an error (exit 1), not a skipped test.
set -u

have_all() {
  command -v clang++-14 >/dev/null 2>&1 || return 1
  # libFuzzer and the sanitizer runtimes live in compiler-rt (libclang-rt-14-dev on Debian 12).
  ls /usr/lib/llvm-14/lib/clang/*/lib/linux/libclang_rt.fuzzer-*.a >/dev/null 2>&1 || return 1
  ls /usr/lib/llvm-14/lib/clang/*/lib/linux/libclang_rt.asan-*.a >/dev/null 2>&1 || return 1
  return 0
}

if have_all; then
  exit 0
fi

PKGS="clang-14 libclang-rt-14-dev"

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: clang 14 with its sanitizer/fuzzer runtimes is missing and cannot be installed here (needs root"
  echo "      and apt-get): the C++ client's clang builds and fuzzer will be skipped (g++ builds still run)."
  echo "      Install them with: sudo apt-get install $PKGS"
  exit 0
fi

echo "installing clang 14 for the C++ client's tests: $PKGS"
bash "$(dirname "$0")/apt_install.sh" --no-install-recommends $PKGS || exit 1
if ! have_all; then
  echo "gllm: clang 14 was installed but clang++-14 or libclang_rt.fuzzer/asan is still missing" >&2
  exit 1
fi
echo "clang installed: $(clang++-14 --version 2>/dev/null | head -1)"
