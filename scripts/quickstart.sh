#!/usr/bin/env bash
# The main job on a fresh machine, offline: creates/refreshes .venv, trains the quickstart model on
# scikit-learn's bundled digits, samples a grid from it, and asks a digit classifier about the samples.
# Running it again resumes from runs/quickstart/checkpoints/last.ckpt (and just samples once done).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
RUN=runs/quickstart
.venv/bin/ddpm fit --config experiments/quickstart.yaml --ckpt_path last "$@"
.venv/bin/ddpm sample --ckpt_path "$RUN/checkpoints/last.ckpt" --num_samples 64 --respacing 100 \
  --output_dir "$RUN/samples"
.venv/bin/python -m ddpm_lightning.tools.check_digits "$RUN/samples/samples.npz"
echo "samples: $RUN/samples/grid.png"
