#!/usr/bin/env bash
# A pinned n8n for the end-to-end test, installed once into a cache outside the clone
# and reused: prints the path of its `n8n` executable.
#   scripts/n8n.sh            install if missing, print the path
# N8N_VERSION (default 1.123.0: the newest line that runs on Node 20) and
# GPUWARDEN_CACHE (default ~/.cache/gpuwarden) choose what and where.
set -euo pipefail
version="${N8N_VERSION:-1.123.0}"
cache="${GPUWARDEN_CACHE:-$HOME/.cache/gpuwarden}/n8n-$version"
bin="$cache/node_modules/.bin/n8n"
if [ -x "$bin" ] && [ -f "$cache/.complete" ]; then
  echo "$bin"
  exit 0
fi
command -v npm >/dev/null || { echo "n8n.sh: npm is needed (apt-get install nodejs npm)" >&2; exit 1; }
rm -rf "$cache"
mkdir -p "$cache"
cd "$cache"
# n8n pins xlsx to a tarball on a host outside the registries; the registry's 0.18.5
# is the same library. Install scripts are skipped (they download from outside too);
# the one native module n8n needs, sqlite3, is built below.
cat > package.json <<JSON
{"name": "gpuwarden-n8n-cache", "private": true,
 "dependencies": {"n8n": "$version"},
 "overrides": {"xlsx": "0.18.5"}}
JSON
npm install --ignore-scripts --no-audit --no-fund --loglevel=error >&2
(cd node_modules/sqlite3 && npx --yes node-gyp rebuild >&2)
touch .complete
echo "$bin"
