#!/usr/bin/env bash
# Install gpuwarden as a systemd service (idempotent), or remove it.
#
#   scripts/install.sh                 install into /opt/gpuwarden, /etc/gpuwarden, enable, start
#                                      (a config still identical to the example is not
#                                      started: edit it first, or give --enable)
#   scripts/install.sh --uninstall     stop, disable, remove the unit and /opt/gpuwarden
#                                      (config and state are kept; --purge removes them too)
#   scripts/install.sh --prefix DIR    install under DIR (paths in the unit point there)
#   DESTDIR=DIR scripts/install.sh     stage into DIR (paths in the unit stay final)
#   --purge                            with --uninstall: also the config, state and user
#   --no-enable                        install without enabling or starting the unit
#   --enable                           enable and start even with the unedited example
#   --operator USER                    add USER to the gpuwarden group (status, mode, ...)
#   --wheelhouse DIR                   install offline from wheels in DIR (pip wheel ...)
#   PYTHON=/usr/bin/python3.11         the Python the venv is based on
#
# It also installs the crash-loop guard's mask oneshots for unit workloads and, where
# polkit is, a polkit rule letting the service user manage exactly the units of its
# workloads (gpuwarden polkit-rule); run it again after adding or renaming one.
#
# With --prefix or DESTDIR nothing outside that folder is touched: no user is
# created and systemctl is not called. The config is never overwritten; it is
# checked (gpuwarden check-config, secrets read from the credentials folder as the
# service will) before the service is started. The config folder and file belong
# to root with group gpuwarden (0750/0640); credentials are root's only (0600).
set -euo pipefail

src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix=""
action="install"
purge=0
enable=1
force_enable=0
python="${PYTHON:-python3}"
wheelhouse=""
operators=()
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="${2:?--prefix needs a folder}"; shift 2 ;;
    --prefix=*) prefix="${1#--prefix=}"; shift ;;
    --uninstall) action="uninstall"; shift ;;
    --purge) purge=1; shift ;;
    --no-enable) enable=0; shift ;;
    --enable) force_enable=1; shift ;;
    --operator) operators+=("${2:?--operator needs a user}"); shift 2 ;;
    --operator=*) operators+=("${1#--operator=}"); shift ;;
    --wheelhouse) wheelhouse="${2:?--wheelhouse needs a folder}"; shift 2 ;;
    --wheelhouse=*) wheelhouse="${1#--wheelhouse=}"; shift ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
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

polkit_rule="$prefix/etc/polkit-1/rules.d/50-gpuwarden.rules"

if [ "$action" = "uninstall" ]; then
  if systemd_running; then
    systemctl disable --now gpuwarden.service 2>/dev/null || true
    # Process workloads run as transient units that outlive the daemon: stop them too.
    systemctl stop 'gpuwarden-*.service' 2>/dev/null || true
  fi
  rm -f "$root$unitdir/gpuwarden.service" "$root$unitdir/gpuwarden-mask@.service" \
    "$root$unitdir/gpuwarden-unmask@.service" "$root$polkit_rule"
  rm -rf "$root$unitdir/gpuwarden.service.d" "$root$opt"
  if [ -L "$root$prefix/usr/local/bin/gpuwarden" ]; then rm -f "$root$prefix/usr/local/bin/gpuwarden"; fi
  rm -f "$root$prefix/usr/local/share/man/man1/gpuwarden.1"
  if [ "$purge" = 1 ]; then
    rm -rf "$root$etc" "$root$prefix/var/lib/gpuwarden"
    if [ "$staged" = 0 ] && getent passwd gpuwarden >/dev/null; then
      userdel gpuwarden 2>/dev/null || true
      getent group gpuwarden >/dev/null && groupdel gpuwarden 2>/dev/null || true
    fi
    say "removed gpuwarden, its config, its state and its user"
  else
    say "removed gpuwarden; kept $etc and $prefix/var/lib/gpuwarden (--purge removes them)"
  fi
  if systemd_running; then systemctl daemon-reload; fi
  exit 0
fi

# 0. The service user and group first: the config belongs to its group.
if [ "$staged" = 0 ] && ! getent passwd gpuwarden >/dev/null; then
  useradd --system --home-dir /var/lib/gpuwarden --no-create-home \
    --shell /usr/sbin/nologin gpuwarden
  say "created system user gpuwarden"
fi
for user in "${operators[@]}"; do
  [ "$staged" = 0 ] || { say "--operator needs a real install, not a staged one"; exit 2; }
  getent passwd "$user" >/dev/null || { say "--operator: no user $user"; exit 2; }
  usermod -a -G gpuwarden "$user"
  say "$user may now run gpuwarden status, mode and unblock (from their next login)"
done

# 1. The program, in its own virtual environment (reused on a second run). The unit
# hides /root and /home (ProtectHome=yes), so a venv based on a Python there (pyenv,
# a user's conda) could not even start: refuse it and say what to do.
hidden() { case "$1" in /root|/root/*|/home|/home/*) return 0 ;; esac; return 1; }
base="$("$python" -c 'import sys; print(sys.base_prefix)')"
if hidden "$base" && [ -z "${PYTHON:-}" ] && [ -x /usr/bin/python3 ] &&
    /usr/bin/python3 -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  say "python3 here is under $base, which the service cannot see: using /usr/bin/python3"
  python=/usr/bin/python3
  base="$("$python" -c 'import sys; print(sys.base_prefix)')"
fi
if hidden "$base"; then
  say "the venv would be based on $base ($python), which the service cannot see"
  say "(ProtectHome=yes): run again with PYTHON=/usr/bin/python3 (3.11 or later)"
  exit 2
fi
mkdir -p "$root$opt"
if [ ! -x "$root$opt/venv/bin/python" ]; then
  "$python" -m venv "$root$opt/venv"
fi
if [ -n "$wheelhouse" ]; then
  # Offline: everything, the build backend included, comes from the wheelhouse.
  "$root$opt/venv/bin/python" -m pip install -q --no-index --find-links "$wheelhouse" \
    --upgrade "$src"
else
  "$root$opt/venv/bin/python" -m pip install -q --upgrade pip
  "$root$opt/venv/bin/python" -m pip install -q --upgrade "$src"
fi
install -m 0644 "$src/README.md" "$root$opt/README.md"
install -d "$root$opt/docs"
install -m 0644 "$src"/docs/*.md "$root$opt/docs/"
# The man page, where man finds local pages.
install -d "$root$prefix/usr/local/share/man/man1"
install -m 0644 "$src/man/gpuwarden.1" "$root$prefix/usr/local/share/man/man1/gpuwarden.1"
# The CLI on everyone's PATH (operators included).
install -d "$root$prefix/usr/local/bin"
ln -sfn "$opt/venv/bin/gpuwarden" "$root$prefix/usr/local/bin/gpuwarden"
install -m 0644 "$src/config.example.toml" "$root$opt/config.example.toml"

# 2. The config: never overwritten. Readable by the service and operators (group
# gpuwarden); the credentials only by root, which hands them to the service
# (LoadCredential=).
install -d -m 0750 "$root$etc"
install -d -m 0700 "$root$etc/credentials"
if [ -e "$root$etc/config.toml" ]; then
  say "keeping the existing $etc/config.toml"
else
  install -m 0640 "$src/config.example.toml" "$root$etc/config.toml"
  say "installed $etc/config.toml from the example: edit it for this host"
fi
if [ "$staged" = 0 ]; then
  chgrp gpuwarden "$root$etc" "$root$etc/config.toml"
  chmod 0750 "$root$etc"
  chmod 0640 "$root$etc/config.toml"
  chown root:root "$root$etc/credentials"
  find "$root$etc/credentials" -type f -exec chown root:root {} + -exec chmod 0600 {} +
fi

# 3. The unit, with paths under --prefix when one is given, and the credentials drop-in.
install -d "$root$unitdir"
sed -e "s#/opt/gpuwarden#$opt#g" -e "s#/etc/gpuwarden#$etc#g" \
  "$src/systemd/gpuwarden.service" > "$root$unitdir/gpuwarden.service.tmp"
mv "$root$unitdir/gpuwarden.service.tmp" "$root$unitdir/gpuwarden.service"
chmod 0644 "$root$unitdir/gpuwarden.service"
# The crash-loop guard's mask and unmask oneshots for kind = "systemd" workloads.
install -m 0644 "$src/systemd/gpuwarden-mask@.service" "$src/systemd/gpuwarden-unmask@.service" \
  "$root$unitdir/"
dropin="$root$unitdir/gpuwarden.service.d"
rm -f "$dropin/credentials.conf" "$dropin/docker.conf"
# The Docker socket's group, only where it exists: a unit naming a missing group
# cannot start at all (216/GROUP). That group is root-equivalent (Docker's own docs):
# the price of managing containers.
if getent group docker >/dev/null; then
  install -d "$dropin"
  printf '%s\n' "# Written by scripts/install.sh: the Docker socket's group exists here." \
    "[Service]" "SupplementaryGroups=docker" > "$dropin/docker.conf"
fi
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

# 4. Check the config as the service will read it, then (re)start.
getent group docker >/dev/null || say "no docker group here: Docker workloads cannot run"
if ! CREDENTIALS_DIRECTORY="$etc/credentials" "$opt/venv/bin/gpuwarden" check-config \
    "$etc/config.toml"; then
  say "the config has problems (above): fix $etc/config.toml, then run this again"
  exit 2
fi
# The polkit rule: the service user may start, stop and kill the units of its
# workloads (and start their mask oneshots), no others. Written anew from the config.
if [ -d "$prefix/etc/polkit-1" ] || [ -d /usr/share/polkit-1 ]; then
  install -d "$(dirname "$polkit_rule")"
  CREDENTIALS_DIRECTORY="$etc/credentials" "$opt/venv/bin/gpuwarden" polkit-rule \
    --config "$etc/config.toml" > "$polkit_rule.tmp"
  chmod 0644 "$polkit_rule.tmp"
  mv "$polkit_rule.tmp" "$polkit_rule"
  say "polkit rule: $polkit_rule"
elif grep -Eq '^[[:space:]]*kind[[:space:]]*=[[:space:]]*"(systemd|process)"' "$etc/config.toml"; then
  say "no polkit here: the service cannot manage its workloads' units (install polkitd)"
fi
# The example names containers "ollama" and "comfyui": on a host that happens to have
# them, starting now would stop, start and re-policy them before anyone read the
# config. So an unedited example installs, checks, and waits for its operator.
if [ "$enable" = 1 ] && [ "$force_enable" = 0 ] && \
    cmp -s "$etc/config.toml" "$src/config.example.toml"; then
  enable=0
  say "$etc/config.toml is still the example: nothing was enabled or started."
  say "next: edit it for this host (workloads, modes, proxies), check it with"
  say "  $opt/venv/bin/gpuwarden check-config $etc/config.toml"
  say "then run this script again (or systemctl enable --now gpuwarden)."
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
