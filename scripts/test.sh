#!/usr/bin/env bash
# The test suite: creates/refreshes .venv, then runs pytest (no network needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
