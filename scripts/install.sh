#!/usr/bin/env bash
# Install gpuwarden as a systemd service (idempotent), or remove it.
#
#   scripts/install.sh                 install into /opt/gpuwarden, /etc/gpuwarden, enable, start
#   scripts/install.sh --uninstall     stop, disable, remove the unit and /opt/gpuwarden
#                                      (config and state are kept; --purge removes them too)
#   scripts/install.sh --prefix DIR    install under DIR (paths in the unit point there)
#   DESTDIR=DIR scripts/install.sh     stage into DIR (paths in the unit stay final)
#
# With --prefix or DESTDIR nothing outside that folder is touched: no user is
# created and systemctl is not called. The config is never overwritten; it is
# checked (gpuwarden check-config) before the service is started.
set -euo pipefail

src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix=""
action="install"
purge=0
enable=1
python="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="${2:?--prefix needs a folder}"; shift 2 ;;
    --prefix=*) prefix="${1#--prefix=}"; shift ;;
    --uninstall) action="uninstall"; shift ;;
    --purge) purge=1; shift ;;
    --no-enable) enable=0; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
prefix="${prefix%/}"
destdir="${DESTDIR:-}"
destdir="${destdir%/}"
staged=0
{ [ -n "$prefix" ] || [ -n "$destdir" ]; } && staged=1

opt="$prefix/opt/gpuwarden"           # as the running system sees it
etc="$prefix/etc/gpuwarden"
unitdir="$prefix/etc/systemd/system"
root="$destdir"                       # where files are written
say() { echo "install.sh: $*"; }

systemd_running() { [ "$staged" = 0 ] && [ -d /run/systemd/system ]; }

if [ "$action" = "uninstall" ]; then
  if systemd_running; then
    systemctl disable --now gpuwarden.service 2>/dev/null || true
  fi
  rm -f "$root$unitdir/gpuwarden.service"
  rm -rf "$root$unitdir/gpuwarden.service.d" "$root$opt"
  if [ "$purge" = 1 ]; then
    rm -rf "$root$etc" "$root$prefix/var/lib/gpuwarden"
    say "removed gpuwarden, its config and its state"
  else
    say "removed gpuwarden; kept $etc and $prefix/var/lib/gpuwarden (--purge removes them)"
  fi
  if systemd_running; then systemctl daemon-reload; fi
  exit 0
fi

# 1. The program, in its own virtual environment (reused on a second run).
mkdir -p "$root$opt"
if [ ! -x "$root$opt/venv/bin/python" ]; then
  "$python" -m venv "$root$opt/venv"
fi
"$root$opt/venv/bin/python" -m pip install -q --upgrade pip
"$root$opt/venv/bin/python" -m pip install -q --upgrade "$src"
install -m 0644 "$src/README.md" "$root$opt/README.md"
install -m 0644 "$src/config.example.toml" "$root$opt/config.example.toml"

# 2. The config: never overwritten.
install -d -m 0750 "$root$etc" "$root$etc/credentials"
if [ -e "$root$etc/config.toml" ]; then
  say "keeping the existing $etc/config.toml"
else
  install -m 0640 "$src/config.example.toml" "$root$etc/config.toml"
  say "installed $etc/config.toml from the example: edit it for this host"
fi

# 3. The unit, with paths under --prefix when one is given, and the credentials drop-in.
install -d "$root$unitdir"
sed -e "s#/opt/gpuwarden#$opt#g" -e "s#/etc/gpuwarden#$etc#g" \
  "$src/systemd/gpuwarden.service" > "$root$unitdir/gpuwarden.service.tmp"
mv "$root$unitdir/gpuwarden.service.tmp" "$root$unitdir/gpuwarden.service"
chmod 0644 "$root$unitdir/gpuwarden.service"
dropin="$root$unitdir/gpuwarden.service.d"
rm -f "$dropin/credentials.conf"
creds=()
for f in "$root$etc/credentials"/*; do
  [ -f "$f" ] && creds+=("$(basename "$f")")
done
if [ "${#creds[@]}" -gt 0 ]; then
  install -d "$dropin"
  {
    echo "# Written by scripts/install.sh: one credential per file in $etc/credentials."
    echo "[Service]"
    for name in "${creds[@]}"; do
      echo "LoadCredential=$name:$etc/credentials/$name"
    done
  } > "$dropin/credentials.conf"
  say "credentials: ${creds[*]}"
fi

if [ "$staged" = 1 ]; then
  say "staged into ${destdir:-$prefix}; not touching users or systemd"
  exit 0
fi

# 4. The service user, then check the config and (re)start.
if ! getent passwd gpuwarden >/dev/null; then
  useradd --system --home-dir /var/lib/gpuwarden --no-create-home \
    --shell /usr/sbin/nologin gpuwarden
  say "created system user gpuwarden"
fi
getent group docker >/dev/null || say "warning: no docker group; Docker workloads will fail"
if ! "$opt/venv/bin/gpuwarden" check-config "$etc/config.toml"; then
  say "the config has problems (above): fix $etc/config.toml, then run this again"
  exit 2
fi
if systemd_running; then
  systemctl daemon-reload
  if [ "$enable" = 1 ]; then
    systemctl enable gpuwarden.service
    systemctl restart gpuwarden.service
    say "gpuwarden is running: systemctl status gpuwarden; gpuwarden status"
  fi
else
  say "systemd is not running here: start it with $opt/venv/bin/gpuwarden daemon"
fi
