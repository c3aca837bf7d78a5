"""Turning a trained DiffusionModule into images: respacing, sampler choice, seeds, uint8."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ddpm_lightning.diffusion.gaussian_diffusion import check_option
from ddpm_lightning.diffusion.seeded_noise import SeededNoise

if TYPE_CHECKING:
    from ddpm_lightning.module import DiffusionModule

SAMPLERS = ("ddpm", "ddim")


def check_sampling_options(sampler: str, skip_fraction: float, eta: float) -> None:
    """Validate a sampler configuration up front (callbacks otherwise fail at their first firing)."""
    check_option("sampler", sampler, SAMPLERS)
    if not 0.0 <= skip_fraction < 1.0:
        raise ValueError(f"skip_fraction must be in [0, 1), got {skip_fraction}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")


def check_respacing(respacing: Optional[str], num_timesteps: int) -> None:
    """A respacing string must select steps of this T (e.g. "100" needs T >= 100)."""
    if respacing:
        from ddpm_lightning.diffusion import space_timesteps

        space_timesteps(num_timesteps, respacing)


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a run seeded `seed` (independent streams, unlike seed + index)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def per_sample_noise(seed: int, indices: Sequence[int], device: torch.device, compile: bool = False) -> SeededNoise:
    """Noise drawn on `device` in which image i depends on (seed, i) only, whatever the batch or rank;
    compiled on CUDA with `compile` (SeededNoise)."""
    seeds = [sample_seed(seed, int(i)) for i in indices]
    return SeededNoise(torch.tensor(seeds, dtype=torch.int64, device=device), compile=compile)


def sample_labels(num_classes: int, generators: Union[SeededNoise, Sequence[Optional[torch.Generator]]]) -> Tensor:
    """One uniform label per sample, drawn first from each sample's own stream."""
    if isinstance(generators, SeededNoise):
        return generators.randint(num_classes)
    return torch.cat([torch.randint(0, num_classes, (1,), generator=g) for g in generators])


@torch.no_grad()
def sample_images(
    module: "DiffusionModule", num_samples: int, respacing: Optional[str] = None, sampler: str = "ddpm",
    eta: float = 0.0, skip_fraction: float = 0.0, use_ema: Optional[bool] = None, generator=None,
    noise: Optional[Tensor] = None, y: Optional[Tensor] = None, clip_denoised: bool = True, progress: bool = False,
) -> Tensor:
    """[num_samples, C, H, W] in [-1, 1]; respacing is a space_timesteps string ("100", "ddim50")."""
    check_sampling_options(sampler, skip_fraction, eta)
    diffusion = module.diffusion.respace(respacing) if respacing else module.diffusion
    hp = module.hparams
    shape = (num_samples, hp.in_channels, hp.image_size, hp.image_size)
    model_kwargs = None
    if hp.class_cond:
        if y is None:
            gens = generator if isinstance(generator, (list, tuple, SeededNoise)) else [generator] * num_samples
            y = sample_labels(hp.num_classes, gens)
        model_kwargs = {"y": y.to(module.device)}
    model = module.eval_model(use_ema)
    kwargs = dict(noise=noise, clip_denoised=clip_denoised, skip_fraction=skip_fraction, progress=progress,
                  generator=generator, model_kwargs=model_kwargs, device=module.device)
    # Dropout off while sampling; the previous mode comes back (sampling may happen mid-training).
    was_training = model.training
    model.eval()
    try:
        if sampler == "ddim":
            return diffusion.ddim_sample_loop(model, shape, eta=eta, **kwargs)
        return diffusion.p_sample_loop(model, shape, **kwargs)
    finally:
        model.train(was_training)


def to_uint8_nhwc(images: Tensor) -> Tensor:
    """[-1, 1] NCHW floats -> uint8 NHWC, truncating as improved-diffusion's sampler writes them."""
    return ((images + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def generate_uint8(
    module: "DiffusionModule", indices: Sequence[int], seed: int, batch_size: int, progress: bool = False,
    **sample_kwargs,
) -> tuple[Tensor, Optional[Tensor]]:
    """Samples `indices` of a seeded run as uint8 NHWC on the CPU, plus labels when class-conditional.

    Sample i is the same image whichever batch or rank draws it, so generation shards cleanly.
    """
    from tqdm.auto import tqdm

    images, labels = [], []
    starts = range(0, len(indices), batch_size)
    for start in tqdm(starts, desc="batches", disable=not progress):
        chunk = list(indices[start:start + batch_size])
        # The module's compile covers the noise too: ~80 eager launches a step otherwise (seeded_noise.py).
        noise = per_sample_noise(seed, chunk, module.device, compile=bool(module.hparams.compile))
        y = None
        if module.hparams.class_cond:
            y = sample_labels(module.hparams.num_classes, noise)
            labels.append(y.cpu())
        x = sample_images(module, len(chunk), generator=noise, y=y, progress=progress, **sample_kwargs)
        images.append(to_uint8_nhwc(x).cpu())
    empty = torch.zeros(0, module.hparams.image_size, module.hparams.image_size, module.hparams.in_channels,
                        dtype=torch.uint8)
    return (torch.cat(images) if images else empty), (torch.cat(labels) if labels else None)
