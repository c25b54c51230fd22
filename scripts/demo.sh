#!/usr/bin/env bash
# Quick start, command 1: set up and run gpuwarden on the built-in simulated node.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/bootstrap.sh"
exec "$root/.venv/bin/gpuwarden" demo "$@"
