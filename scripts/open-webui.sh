#!/usr/bin/env bash
# A pinned Open WebUI (from PyPI) for the browser test, installed once into a virtual
# environment in a cache outside the clone and reused: prints the path of its
# `open-webui` executable.
#   scripts/open-webui.sh        install if missing, print the path
# OPEN_WEBUI_VERSION (default 0.12.4) and GPUWARDEN_CACHE (default ~/.cache/gpuwarden)
# choose what and where. PyTorch comes first as the CPU build (2.13.0) so that Open
# WebUI's sentence-transformers does not pull a CUDA build of several GB.
set -euo pipefail
version="${OPEN_WEBUI_VERSION:-0.12.4}"
cache="${GPUWARDEN_CACHE:-$HOME/.cache/gpuwarden}/open-webui-$version"
bin="$cache/venv/bin/open-webui"
if [ -x "$bin" ] && [ -f "$cache/.complete" ]; then
  echo "$bin"
  exit 0
fi
python="${PYTHON:-python3}"
rm -rf "$cache"
mkdir -p "$cache"
"$python" -m venv "$cache/venv"
pip=("$cache/venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" torch==2.13.0 >&2
"${pip[@]}" "open-webui==$version" torch==2.13.0 >&2
touch "$cache/.complete"
echo "$bin"
