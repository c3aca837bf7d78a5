#!/usr/bin/env bash
# The main job on a fresh machine: creates/refreshes .venv, then runs the quickstart.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m ddpm_lightning.demo "$@"
