#!/usr/bin/env bash
# Debian's Prometheus 2.42 (with promtool) and Alertmanager 0.25, unpacked once into a
# cache outside the clone and reused: prints the folder holding their executables
# (prometheus, promtool, prometheus-alertmanager, amtool). Nothing is installed system
# wide and no service is started: the tests run them on loopback themselves.
#   scripts/prometheus.sh         fetch and unpack if missing, print the folder
# GPUWARDEN_CACHE (default ~/.cache/gpuwarden) chooses where.
set -euo pipefail
cache="${GPUWARDEN_CACHE:-$HOME/.cache/gpuwarden}/prometheus-debian12"
if [ -x "$cache/usr/bin/promtool" ] && [ -f "$cache/.complete" ]; then
  echo "$cache/usr/bin"
  exit 0
fi
command -v apt-get >/dev/null || { echo "prometheus.sh: needs apt-get (Debian)" >&2; exit 1; }
rm -rf "$cache"
mkdir -p "$cache/debs"
# apt-get download runs as the _apt user where it can; a folder it may write avoids the
# "unsandboxed" warning for root.
chmod 0777 "$cache/debs"
(cd "$cache/debs" && apt-get download -q prometheus prometheus-alertmanager >&2) || {
  apt-get update -qq >&2
  (cd "$cache/debs" && apt-get download -q prometheus prometheus-alertmanager >&2)
}
for deb in "$cache"/debs/*.deb; do
  dpkg-deb -x "$deb" "$cache"
done
rm -rf "$cache/debs"
touch "$cache/.complete"
echo "$cache/usr/bin"
