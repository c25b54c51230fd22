#!/usr/bin/env bash
# Real-GPU acceptance run: the daemon on NVML with PyTorch-allocating process workloads
# (scripts/gpu_acceptance.py says what it checks). Needs an NVIDIA GPU and PyTorch, no
# Docker engine; without a GPU (CI) it runs the same checks on the simulated backend.
# Prints a table, writes gpu-acceptance.json to $OUT (or --out), finishes within 4 min.
#   scripts/gpu-acceptance.sh [--backend auto|nvml|sim] [--out DIR]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py=python3; fi
fi
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec timeout --signal=INT --kill-after=10 240 "$py" "$root/scripts/gpu_acceptance.py" "$@"
