"""Time of the FID/IS evaluation pipeline: sampling plus Inception features, extrapolated to 50,000 samples.

Runs `metrics.compute_fid_is` (the function behind FIDCallback and `ddpm evaluate`) on `--num_samples`
samples of a random-weights DiffusionModule with the fast sampling options, against dummy reference
statistics, with torch-fidelity's Inception-v3 architecture carrying random weights (offline: the real
weights file cannot be downloaded here, and speed does not depend on the weights). It also times the
Inception features alone, on random uint8 images, to split the total.

    python benchmarks/fid_throughput.py --num_samples 5000 --batch_size 512 --respacing 100
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from bench_common import synchronize, write_json
from sample_throughput import build_module, variant_context, variant_name, variant_options


def random_inception(device: torch.device):
    """InceptionFeatures (torch-fidelity's network) loaded from a file of random weights."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    from ddpm_lightning.metrics.inception import InceptionFeatures

    # Build the architecture without its download, save its random initialisation, and load that
    # file through the same path a real weights file takes.
    with mock.patch.object(tf_inception.torch, "load", return_value={}), \
            mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None):
        skeleton = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                            feature_extractor_weights_path="unused")
    path = Path(tempfile.mkdtemp()) / "random_inception.pth"
    torch.save(skeleton.state_dict(), path)
    return InceptionFeatures(path).to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ddpm_cifar10")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--in_channels", type=int, default=3)
    parser.add_argument("--variant", default="bf16-cl-compile-graph", type=variant_name,
                        help="a sampling variant of sample_throughput.py; +bench also autotunes Inception's convolutions")
    parser.add_argument("--num_samples", type=int, default=5000,
                        help="5,000 at batch 512 ends on a short batch, as 50,000 does")
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--respacing", default="100")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    with variant_context(args.variant):
        record = time_pipeline(args, device)
    print(f"\nFID pipeline, {args.preset}, {args.variant}, batch {args.batch_size}, respacing {args.respacing}\n")
    print("| samples | seconds | of which Inception | projected for 50,000 | one-off warm-up (compile, capture) |")
    print("|---|---|---|---|---|")
    print(f"| {args.num_samples} | {record['seconds']:.1f} | {record['inception_seconds']:.1f} | "
          f"{record['seconds_for_50k']:.0f} s ({record['seconds_for_50k'] / 60:.1f} min) | "
          f"{record['warmup_seconds']:.1f} s |")
    if args.json:
        write_json(args.json, args, record)


def time_pipeline(args, device: torch.device) -> dict:
    """Warm-up, the timed evaluation, and Inception alone on as many batches."""
    from ddpm_lightning.metrics.fid import FeatureStats
    from ddpm_lightning.metrics.fid_is import compute_fid_is
    from ddpm_lightning.metrics.inception import extract_features

    module = build_module(args.preset, args.image_size, args.in_channels, device, **variant_options(args.variant))
    inception = random_inception(device)
    reference = FeatureStats(np.zeros(2048), np.eye(2048), 1)
    # Warm-up: compilation and graph capture for the batch shape (and cuDNN's autotuning under +bench). Timed
    # apart: a one-off cost of each `ddpm evaluate` process (less when inductor's on-disk cache is warm).
    synchronize(device)
    start = time.perf_counter()
    compute_fid_is(module, reference, inception, num_samples=args.batch_size, batch_size=args.batch_size,
                   is_splits=1, respacing="5")
    synchronize(device)
    warmup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    compute_fid_is(module, reference, inception, num_samples=args.num_samples, batch_size=args.batch_size,
                   is_splits=min(10, args.num_samples), respacing=args.respacing)
    synchronize(device)
    total = time.perf_counter() - start

    images = torch.randint(0, 256, (args.batch_size, args.in_channels, args.image_size, args.image_size),
                           dtype=torch.uint8)
    batches = -(-args.num_samples // args.batch_size)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(batches):
        extract_features(inception, images)
    synchronize(device)
    inception_seconds = time.perf_counter() - start

    scale = 50_000 / args.num_samples
    return {"num_samples": args.num_samples, "seconds": total, "inception_seconds": inception_seconds,
            "seconds_for_50k": total * scale, "inception_seconds_for_50k": inception_seconds * scale,
            "images_per_s": args.num_samples / total, "warmup_seconds": warmup_seconds,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


if __name__ == "__main__":
    main()
