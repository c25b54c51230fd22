#!/usr/bin/env bash
# Builds (once) the Debian bookworm root filesystem that tests/test_systemd_host.py
# boots with systemd as PID 1 in a container, and prints the path of the cached
# tarball. The cache lives outside the clone (~/.cache/gpuwarden, or
# $GPUWARDEN_CACHE) and is keyed by this script's content, so a change rebuilds it.
#
#   scripts/systemd-image.sh            print the tarball's path, building it if needed
#
# Needs mmdebstrap and zstd (installed with apt when missing) and the Debian mirror
# from this machine's apt sources.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib.sh
. "$root/scripts/lib.sh"
cache="${GPUWARDEN_CACHE:-$HOME/.cache/gpuwarden}"
key="$(sha256sum "$0" | cut -c1-12)"
out="$cache/systemd-bookworm-$key.tar.zst"
if [ -s "$out" ]; then
  echo "$out"
  exit 0
fi
command -v mmdebstrap >/dev/null || apt_install mmdebstrap >&2
command -v zstd >/dev/null || apt_install zstd >&2
# The first Debian mirror apt uses here (deb822 URIs: or one-line deb entries).
mirror="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
  /etc/apt/sources.list.d/*.list 2>/dev/null \
  | sed -nE 's#^(URIs:|deb)[[:space:]]+(\[[^]]*\][[:space:]]+)?(https?://[^[:space:]]*/debian)/?([[:space:]].*)?$#\3#p' \
  | head -1 || true)"
mirror="${mirror:-http://deb.debian.org/debian}"
mkdir -p "$cache"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# systemd needs / mounted rshared for LoadCredential= (without it the credentials
# folder is empty and the unit still starts); the wrapper does that, then execs it.
mmdebstrap --variant=minbase --quiet \
  --include=systemd,systemd-sysv,dbus,python3,python3-venv,ca-certificates,procps,polkitd,pkexec,sudo,jq \
  --customize-hook='printf "#!/bin/sh\nmount --make-rshared /\nexec /lib/systemd/systemd \"\$@\"\n" > "$1/usr/local/sbin/init-rshared"' \
  --customize-hook='chmod 0755 "$1/usr/local/sbin/init-rshared"' \
  --customize-hook='rm -f "$1/etc/machine-id"; : > "$1/etc/machine-id"' \
  bookworm "$tmp/rootfs.tar" "$mirror" >&2
zstd -q -T0 -10 "$tmp/rootfs.tar" -o "$tmp/rootfs.tar.zst"
mv "$tmp/rootfs.tar.zst" "$out"
echo "$out"
