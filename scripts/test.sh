#!/usr/bin/env bash
# Quick start, command 2: set up everything the tests need and run the whole suite.
# Installs Debian's docker.io, busybox-static (the tests start their own private Docker
# engine) and systemd (for systemd-analyze) when missing, creates .venv, then runs
# ruff, mypy --strict and pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/lib.sh
. "$root/scripts/lib.sh"
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
command -v systemd-analyze >/dev/null || missing+=(systemd)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]} from Debian's packages" >&2
  apt_install "${missing[@]}"
fi
scripts/bootstrap.sh test
.venv/bin/ruff check src tests
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
