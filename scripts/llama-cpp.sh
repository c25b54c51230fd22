#!/usr/bin/env bash
# A pinned llama-cpp-python with its OpenAI server (from PyPI) for the model router's
# real-engine test, installed once into a virtual environment in a cache outside the
# clone and reused: prints the path of that environment's python, which runs
# `python -m llama_cpp.server`.
#   scripts/llama-cpp.sh        install if missing, print the path
# PyPI has only its source: the wheel is built once (about 4 minutes on 2 cores; CMake
# and a C++ compiler, which scripts/test.sh installs) and kept in the cache's wheels/.
# LLAMA_CPP_VERSION (default 0.3.36) and GPUWARDEN_CACHE (default ~/.cache/gpuwarden)
# choose what and where.
set -euo pipefail
version="${LLAMA_CPP_VERSION:-0.3.36}"
root="${GPUWARDEN_CACHE:-$HOME/.cache/gpuwarden}"
cache="$root/llama-cpp-$version"
bin="$cache/venv/bin/python"
if [ -x "$bin" ] && [ -f "$cache/.complete" ]; then
  echo "$bin"
  exit 0
fi
python="${PYTHON:-python3}"
rm -rf "$cache"
mkdir -p "$cache" "$root/wheels"
"$python" -m venv "$cache/venv"
pip=("$cache/venv/bin/python" -m pip install -q --disable-pip-version-check)
if ! ls "$root/wheels/llama_cpp_python-$version-"*.whl >/dev/null 2>&1; then
  # Portable (no -march=native): the cached wheel may serve another machine of the pool.
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    "$cache/venv/bin/python" -m pip wheel -q --disable-pip-version-check --no-deps \
    "llama-cpp-python==$version" --wheel-dir "$root/wheels" >&2
fi
"${pip[@]}" --find-links "$root/wheels" "llama-cpp-python[server]==$version" >&2
touch "$cache/.complete"
echo "$bin"
