#!/usr/bin/env bash
# Wheels for a GPU machine that has Python 3.12 with PyTorch, nvidia-ml-py, httpx,
# aiohttp, psutil and prometheus-client, but reaches no registry: downloads what else
# gpuwarden needs into .whl/ (git-ignored). There:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site scripts/gpu-acceptance.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
packages=(pydantic pydantic-core pydantic-settings annotated-types typing-inspection
  typing-extensions python-dotenv structlog docker requests urllib3 charset-normalizer
  idna certifi apscheduler tzlocal discord.py standardwebhooks dbus-fast httptools pyyaml)
# --no-deps takes each package on its own: pin the versions the tested .venv has, so
# that pairs which must match (pydantic and pydantic-core) do.
if [ -x "$root/.venv/bin/python" ]; then
  mapfile -t packages < <("$root/.venv/bin/python" - "${packages[@]}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name)
PY
  )
fi
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$root/.whl" "${packages[@]}"
ls "$root/.whl"
