#!/usr/bin/env bash
# Quick start, command 2: set up everything the tests need and run the whole suite.
# Installs Debian's docker.io, busybox-static (the tests start their own private Docker
# engine), systemd (for systemd-analyze), chromium (the browser tests), and cmake and
# g++ (scripts/llama-cpp.sh builds llama.cpp's server once) when missing, creates
# .venv, then runs ruff, mypy --strict and pytest.
#
#   scripts/test.sh [--busy] [PYTEST ARGS...]
#
# --busy runs the tests while every core is saturated by a CPU burner this script
# starts and stops itself: a homelab box doing inference, or a shared CI runner. A
# test that passes only on an idle machine hides a race.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/lib.sh
. "$root/scripts/lib.sh"
busy=0
if [ "${1:-}" = "--busy" ]; then
  busy=1
  shift
fi
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v chromium >/dev/null || missing+=(chromium)
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null || missing+=(g++)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]} from Debian's packages" >&2
  apt_install "${missing[@]}"
fi
scripts/bootstrap.sh test
.venv/bin/ruff check src tests
.venv/bin/mypy
if [ "$busy" = 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
burners=()
stop_burners() { [ "${#burners[@]}" -eq 0 ] || kill "${burners[@]}" 2>/dev/null || true; }
trap stop_burners EXIT
for _ in $(seq "$(nproc)"); do
  # A busy loop at normal priority: the tests compete for every core.
  sh -c 'while :; do :; done' &
  burners+=("$!")
done
echo "busy: ${#burners[@]} CPU burner(s) on $(nproc) core(s)" >&2
.venv/bin/python -m pytest "$@"
