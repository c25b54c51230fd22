#!/usr/bin/env bash
# Every benchmark in one command, on whatever backend is present; a summary table at the
# end, JSON per benchmark and timeline.png in $OUT (default bench/out).
#   scripts/bench.sh            full run (about 4 minutes; Docker-based parts need dockerd)
#   scripts/bench.sh --quick    shorter soak and fewer loops
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-$root/bench/out}"
quick=0
[ "${1:-}" = "--quick" ] && quick=1
if [ -x .venv/bin/python ] || scripts/bootstrap.sh test; then py=.venv/bin/python; else py=python3; fi
"$py" -c "import matplotlib" 2>/dev/null || "$py" -m pip install -q matplotlib
mkdir -p "$out"
duration=60; loops=20; seconds=20
[ "$quick" = 1 ] && { duration=10; loops=5; seconds=5; }
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
"$py" bench/sample.py --duration "$duration" --out "$out"
scripts/gpu-acceptance.sh --out "$out" || echo "bench.sh: the acceptance run FAILED (above)"
"$py" bench/api.py --seconds "$seconds" --out "$out"
"$py" bench/sinks.py --out "$out"
"$py" bench/discord.py --out "$out"
"$py" bench/fleet.py --out "$out"
"$py" bench/node_page.py --seconds 20 --rounds 2 --out "$out"
# The replayed mixed day takes 3 x 10 minutes: bench/proxy.py alone runs it.
"$py" bench/proxy.py --skip-day --out "$out"
if command -v node >/dev/null && command -v npm >/dev/null; then
  "$py" bench/n8n.py --out "$out" || echo "bench.sh: the n8n benchmark FAILED (above)"
else
  echo "bench.sh: no Node.js here: the n8n benchmark skipped"
fi
if command -v dockerd >/dev/null && [ -x /bin/busybox ]; then
  "$py" bench/switch.py --out "$out"
  "$py" bench/crashloop.py --loops "$loops" --out "$out"
  "$py" bench/timeline.py --out "$out"
else
  echo "bench.sh: no dockerd/busybox here: switch, crash-loop and timeline benchmarks skipped"
fi
"$py" bench/summary.py "$out"
