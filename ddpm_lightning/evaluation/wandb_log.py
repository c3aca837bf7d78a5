"""Logging an evaluation's table and plots to Weights & Biases, only when a project is named.

wandb is imported here and nowhere else, so evaluations without --wandb_project never load it. The mode
(online, offline, disabled) comes from the WANDB_MODE environment variable, as wandb itself reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, Union


def log_to_wandb(project: str, output_dir: Union[str, Path], rows: Sequence[dict[str, Any]],
                 columns: Sequence[str], plots: Sequence[Union[str, Path]], config: dict[str, Any]) -> str:
    """One W&B run in output_dir/wandb holding the results table and the plot images; returns its folder."""
    import wandb

    folder = Path(output_dir)
    run = wandb.init(project=project, dir=str(folder), job_type="evaluate", config=config)
    try:
        table = wandb.Table(columns=list(columns), data=[[row.get(name) for name in columns] for row in rows])
        images = {Path(plot).stem: wandb.Image(str(plot)) for plot in plots if Path(plot).is_file()}
        run.log({"results": table, **images})
        if len(rows) == 1:  # one cell per run (a sweep): its numbers as summary metrics W&B can rank by
            run.summary.update({k: rows[0][k] for k in ("fid", "is_mean", "is_std", "bpd") if rows[0].get(k) is not None})
        return str(run.dir)
    finally:
        run.finish()
