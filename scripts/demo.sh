#!/usr/bin/env bash
# The main job: the offline SANDE demo on SmolLM2-135M-Instruct (set-up included). Extra flags go to `sande-peft demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/sande-peft demo "$@"
