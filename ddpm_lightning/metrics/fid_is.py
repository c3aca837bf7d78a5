"""FID and Inception Score of a model's samples, or of given images, against reference statistics, over DDP ranks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from ddpm_lightning.metrics.distributed import rank_and_world_size, shard
from ddpm_lightning.metrics.fid import FeatureStats, RunningFeatureStats, frechet_distance
from ddpm_lightning.metrics.inception import extract_features, module_device
from ddpm_lightning.metrics.inception_score import RunningInceptionScore

if TYPE_CHECKING:
    from ddpm_lightning.module import DiffusionModule


def sampler_tag(sampler: str, respacing: Optional[str], skip_fraction: float, eta: float = 0.0) -> str:
    """The sampler settings as a metric-name suffix: ddpm_100_skip0.0, ddim_50_eta0.0_skip0.0, ddpm_full_skip0.0."""
    parts = [sampler, respacing or "full"]
    if sampler == "ddim":
        parts.append(f"eta{eta}")
    parts.append(f"skip{skip_fraction}")
    return "_".join(parts)


def _check_images(images: Union[Tensor, np.ndarray]) -> Tensor:
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 [N, H, W, C] images (C = 1 or 3), got {images.dtype} {tuple(images.shape)}")
    return images


def compute_fid_is(
    source: Union["DiffusionModule", Tensor, np.ndarray],
    reference: FeatureStats,
    feature_extractor: nn.Module,
    num_samples: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 256,
    is_splits: int = 10,
    progress: bool = False,
    **sample_kwargs: Any,
) -> dict[str, float]:
    """{"fid", "is_mean", "is_std"} of num_samples images against reference; call it on every rank.

    source is a DiffusionModule, whose samples 0 .. num_samples - 1 of the run seeded `seed` are generated
    with sample_kwargs (respacing, sampler, eta, skip_fraction, use_ema), or uint8 [N, H, W, C] images
    (the arr_0 of `ddpm sample`'s samples.npz). Each rank takes a contiguous shard of the sample indices;
    the float64 sums are all-reduced, so the numbers do not depend on the number of ranks or the batch size.
    """
    from tqdm.auto import tqdm

    from ddpm_lightning.sampling import generate_uint8

    is_module = not isinstance(source, (Tensor, np.ndarray))
    if not is_module:
        source = _check_images(source)
        num_samples = len(source) if num_samples is None else num_samples
        if num_samples > len(source):
            raise ValueError(f"num_samples={num_samples} but only {len(source)} images were given")
    elif sample_kwargs.get("use_ema") is None:
        sample_kwargs["use_ema"] = True  # evaluation numbers are the EMA weights' unless asked otherwise
    if num_samples is None or num_samples < 2:
        raise ValueError(f"FID needs num_samples >= 2, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if reference.mu.shape[0] != feature_extractor.num_features:
        raise ValueError(f"reference statistics have {reference.mu.shape[0]} features but the feature extractor gives "
                         f"{feature_extractor.num_features}: were they computed with another extractor?")

    rank, world_size = rank_and_world_size()
    device = module_device(feature_extractor)
    fid_stats = RunningFeatureStats(feature_extractor.num_features).to(device)
    inception_score = RunningInceptionScore(feature_extractor.num_classes, num_samples, is_splits).to(device)
    mine = shard(num_samples, rank, world_size)
    starts = range(mine.start, mine.stop, batch_size)
    for start in tqdm(starts, desc="FID/IS batches", disable=not progress or rank != 0):
        indices = range(start, min(start + batch_size, mine.stop))
        if is_module:
            images, _ = generate_uint8(source, indices, seed, batch_size, **sample_kwargs)
        else:
            images = source[indices.start:indices.stop]
        features, logits = extract_features(feature_extractor, images.permute(0, 3, 1, 2))
        fid_stats.update(features)
        inception_score.update(logits, torch.arange(indices.start, indices.stop))
    # Synced compute(): every rank must get here, never from rank-zero-only code.
    is_mean, is_std = inception_score.compute()
    return {"fid": frechet_distance(fid_stats.compute(), reference), "is_mean": is_mean, "is_std": is_std}
