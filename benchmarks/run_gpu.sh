#!/usr/bin/env bash
# The GPU benchmark as one prepared run (see benchmarks/RESULTS.md): training through `ddpm fit` on the
# CIFAR-10 JPEGs held in GPU memory, sampling throughput, and the FID pipeline. Writes logs and JSON to
# ${OUT:-benchmarks/out}. Expects torch, lightning and torchmetrics installed; jsonargparse, torch-fidelity
# and diffusers may come as wheels in .whl/, and the CIFAR-10 JPEG tarball at .data/ (both git-ignored;
# RESULTS.md says how to fill them). About 9 minutes on an H100, most of it compilation. PARTS picks the
# benchmarks (default: train sample fid); *_VARIANTS, *_TIMEOUT and TRAIN_STEPS override the defaults below.
set -o pipefail
OUT=${OUT:-$PWD/benchmarks/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
DATA=${DATA:-/tmp/cifar}
if [ -f .data/cifar10-train-jpg.tar.gz ] && [ ! -d "$DATA/train" ]; then
  mkdir -p "$DATA" && tar xzf .data/cifar10-train-jpg.tar.gz -C "$DATA"
fi
cd benchmarks
filter='^\[|^\||^[a-z]+,|FAILED|Error'
PARTS=${PARTS:-train sample fid}
[[ " $PARTS " == *" train "* ]] && timeout ${TRAIN_TIMEOUT:-330} python3 train_throughput.py --config ../experiments/cifar10_ddpm.yaml \
  --variants ${TRAIN_VARIANTS:-bf16-cl-compile-graph bf16-cl-compile-graph+adopt bf16-compile-graph} \
  --diffusers ${TRAIN_DIFFUSERS:-bf16-cl} --warmup 25 --steps ${TRAIN_STEPS:-100} --profile_steps 5 --profile_dir "$OUT" --attribute \
  --json "$OUT/train.json" --set --data.init_args.source=folder --data.init_args.data_dir="$DATA" \
  --data.init_args.in_memory=true --data.init_args.num_workers=16 --trainer.callbacks=[] 2>&1 | tee "$OUT/train.log" | grep -E "$filter"
[[ " $PARTS " == *" sample "* ]] && timeout ${SAMPLE_TIMEOUT:-170} python3 sample_throughput.py --variants ${SAMPLE_VARIANTS:-bf16-cl-compile-graph bf16-compile-graph bf16-cl-graph} --profile_dir "$OUT" \
  --diffusers ${SAMPLE_DIFFUSERS:-bf16-cl bf16-cl-compile-ro} --batch_size 512 --respacing 100 --num_batches 2 \
  --json "$OUT/sample.json" 2>&1 | tee "$OUT/sample.log" | grep -E "$filter"
[[ " $PARTS " == *" fid "* ]] && timeout ${FID_TIMEOUT:-80} python3 fid_throughput.py --variant ${FID_VARIANT:-bf16-cl-compile-graph} --num_samples ${FID_SAMPLES:-5000} \
  --batch_size 512 --respacing 100 --json "$OUT/fid.json" 2>&1 | tee "$OUT/fid.log" | grep -E "$filter"
