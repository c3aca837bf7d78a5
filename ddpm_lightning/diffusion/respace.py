"""Choosing a subset of timesteps to sample with (Nichol & Dhariwal 2021, sec. 4)."""

from __future__ import annotations

import numpy as np


def space_timesteps(num_timesteps: int, section_counts: str | list[int] | int) -> set[int]:
    """Pick the timesteps to keep from a process of num_timesteps steps, as improved-diffusion does.

    - "100" or [100]: one section, strided by the fractional (size-1)/(count-1), values rounded
      with Python's round (so 1000 -> "100" starts 0, 10, 20, 30, 40, 50, 61, ...).
    - "10,15,20": the process is cut into equal sections (the remainder goes to the earliest ones)
      and each is strided to its own count.
    - "ddimN": the integer stride of Song et al. (2021) that gives exactly N steps from 0.
    - "trailingN": N steps evenly spaced back from the last step, so T-1 is always kept
      (Lin et al. 2023, table 2). Beyond the reference.
    """
    original = section_counts
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        text = section_counts.strip()
        for prefix, chooser in (("ddim", _ddim_steps), ("trailing", _trailing_steps)):
            if text.startswith(prefix):
                return chooser(num_timesteps, _parse_count(text[len(prefix):], section_counts))
        section_counts = [_parse_count(part, section_counts) for part in text.split(",")]
    if not section_counts or any(c < 1 for c in section_counts):
        raise ValueError(f"respacing {original!r}: every section needs at least 1 step")

    size_per, extra = divmod(num_timesteps, len(section_counts))
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(
                f"respacing {original!r}: cannot take {section_count} steps from a section "
                f"of {size} steps (T={num_timesteps})"
            )
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


def _parse_count(text: str, whole) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"malformed respacing {whole!r}: expected comma-separated step counts like '100' or "
            f"'10,15,20', or 'ddimN' / 'trailingN'"
        ) from None


def _ddim_steps(num_timesteps: int, count: int) -> set[int]:
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == count:
            return set(range(0, num_timesteps, stride))
    if count == num_timesteps:
        return set(range(num_timesteps))
    raise ValueError(f"respacing 'ddim{count}': no integer stride gives exactly {count} steps of T={num_timesteps}")


def _trailing_steps(num_timesteps: int, count: int) -> set[int]:
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"respacing 'trailing{count}': count must be in [1, {num_timesteps}]")
    steps = np.round(np.arange(num_timesteps, 0, -num_timesteps / count)).astype(np.int64) - 1
    return {int(s) for s in steps}
