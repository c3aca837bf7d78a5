"""The evaluation grid: checkpoints x samplers x sampling steps x skip fractions, parsed and checked up front.

Nichol & Dhariwal (2021) fig. 8 (FID against sampling steps, DDPM vs DDIM) and their skip ablation are
rows of this grid. Every check here runs before any sampling, so that a typo in the last value of a list
does not surface hours into a 50k-sample run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from ddpm_lightning.diffusion.respace import space_timesteps
from ddpm_lightning.diffusion.samplers import reverse_timesteps
from ddpm_lightning.sampling import SAMPLERS

# "uniform": improved-diffusion's single-section spacing ("50"), the same steps for both samplers.
# "ddim": Song et al.'s integer stride ("ddim50") for the DDIM cells, as their tables use.
DDIM_SPACINGS = ("uniform", "ddim")


@dataclass(frozen=True)
class Cell:
    """One grid point: a checkpoint (by label) sampled `steps` steps with `sampler`, dropping skip_fraction."""

    label: str
    sampler: str
    steps: int
    skip_fraction: float
    eta: Optional[float]  # None for DDPM: ancestral sampling has no eta, so it must not split its results


def split_list(values: Union[str, Sequence[str], None]) -> list[str]:
    """A flag given several times and/or as comma lists -> one flat list of stripped, non-empty items."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [item.strip() for value in values for item in str(value).split(",") if item.strip()]


def parse_steps(text: Union[str, Sequence[str]]) -> list[int]:
    """--respacing "25,50,100" -> [25, 50, 100]: sampling step counts, each >= 1."""
    items = split_list(text)
    try:
        steps = [int(item) for item in items]
    except ValueError:
        steps = []
    if not steps or any(count < 1 for count in steps):
        raise ValueError(f"--respacing {','.join(items) or repr('')}: expected comma-separated step counts >= 1, "
                         "e.g. 25,50,100,200,1000")
    return list(dict.fromkeys(steps))


def parse_skip_fractions(text: Union[str, Sequence[str]]) -> list[float]:
    """--skip_fraction "0,0.1,0.2" -> [0.0, 0.1, 0.2]: fractions of the noisiest steps to drop, in [0, 1)."""
    items = split_list(text)
    try:
        fractions = [float(item) for item in items]
    except ValueError:
        fractions = []
    if not fractions or not all(0.0 <= value < 1.0 for value in fractions):
        raise ValueError(f"--skip_fraction {','.join(items) or repr('')}: expected comma-separated fractions "
                         "in [0, 1), e.g. 0,0.1,0.2,0.3")
    return list(dict.fromkeys(fractions))


def parse_samplers(text: Union[str, Sequence[str]]) -> list[str]:
    """--sampler "ddpm,ddim" -> ["ddpm", "ddim"]."""
    samplers = split_list(text)
    unknown = [name for name in samplers if name not in SAMPLERS]
    if not samplers:
        raise ValueError(f"--sampler '': expected a comma list of {', '.join(SAMPLERS)}")
    if unknown:
        raise ValueError(f"--sampler {','.join(samplers)}: unknown sampler {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(SAMPLERS)}")
    return list(dict.fromkeys(samplers))


def build_grid(labels: Sequence[str], samplers: Sequence[str], steps: Sequence[int],
               skip_fractions: Sequence[float], eta: float = 0.0) -> list[Cell]:
    """Every cell, checkpoint-major, in the order the options list them (the order of the table's rows)."""
    return [Cell(label, sampler, count, skip, eta if sampler == "ddim" else None)
            for label in labels for sampler in samplers for count in steps for skip in skip_fractions]


def respacing_string(cell: Cell, num_timesteps: int, ddim_spacing: str = "uniform") -> Optional[str]:
    """The space_timesteps string of a cell; None (the full process) when it samples all T steps."""
    if cell.steps == num_timesteps:
        return None
    if cell.sampler == "ddim" and ddim_spacing == "ddim":
        return f"ddim{cell.steps}"
    return str(cell.steps)


def check_grid(cells: Sequence[Cell], num_timesteps: dict[str, int], ddim_spacing: str = "uniform") -> None:
    """Raise one ValueError naming the option for any cell that cannot be sampled (counts against each T)."""
    if ddim_spacing not in DDIM_SPACINGS:
        raise ValueError(f"--ddim_spacing {ddim_spacing!r}: valid: {', '.join(DDIM_SPACINGS)}")
    for cell in cells:
        total = num_timesteps[cell.label]
        if cell.steps > total:
            raise ValueError(f"--respacing {cell.steps}: checkpoint '{cell.label}' has T={total} steps; "
                             f"valid counts: 1..{total}")
        respacing = respacing_string(cell, total, ddim_spacing)
        try:
            if respacing is not None:
                space_timesteps(total, respacing)
            reverse_timesteps(cell.steps, cell.skip_fraction)
        except ValueError as err:
            option = "--skip_fraction" if "skip_fraction" in str(err) else "--respacing"
            where = f"checkpoint '{cell.label}', {cell.sampler}, {cell.steps} steps"
            raise ValueError(f"{option}: {err} ({where})") from None
