#!/usr/bin/env bash
# The test suite (set-up included). Extra flags go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Two workers by default (CI has two cores); each file runs whole on one worker, so its fixtures are built once.
# Files go out in the order tests/conftest.py gives them (the longest first), not xdist's (most tests first,
# which put the one-test demo file last, alone).
exec .venv/bin/python -m pytest -q -n "${SANDE_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
