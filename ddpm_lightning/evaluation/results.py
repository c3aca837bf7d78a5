"""The resumable results of an evaluation grid: one JSON file per finished cell, and the tables built from them.

A cell's file is named by a hash of everything that decides its numbers (checkpoint file, sampler, steps,
skip fraction, eta, sample count, seed, EMA, reference statistics, feature extractor) and written to a
temporary name first, then renamed: an interrupted run leaves whole files or none, never half a row, and
one key has one file, so a rerun neither duplicates nor loses a row. Changing a setting that moves the
numbers (say --num_samples) gives new keys, so stale results are never reused; the old files stay and are
picked up again if the old settings come back. results.csv and results.md are rewritten the same way after
every cell and list the cells of the current grid that have finished.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

# The table's columns, in order; "bpd" only when --bpd asked for it.
COLUMNS = ("label", "sampler", "steps", "respacing", "skip_fraction", "eta", "num_samples", "fid", "is_mean",
           "is_std", "seconds", "bpd", "num_timesteps", "schedule", "var_type", "seed", "use_ema", "reference",
           "ckpt_path")
_DECIMALS = {"fid": 3, "is_mean": 3, "is_std": 3, "bpd": 4, "seconds": 1}


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    """Write text to path through a temporary file and a rename, so readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def key_digest(key: dict[str, Any]) -> str:
    """A short, stable name for a result key (JSON-native values only)."""
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class ResultsStore:
    """Finished results under output_dir/cells/, one JSON file per key."""

    def __init__(self, output_dir: Union[str, Path]):
        self.folder = Path(output_dir) / "cells"

    def path(self, key: dict[str, Any], prefix: str = "cell") -> Path:
        return self.folder / f"{prefix}-{key_digest(key)}.json"

    def get(self, key: dict[str, Any], prefix: str = "cell") -> Optional[dict[str, Any]]:
        """The stored result of key, or None when it has not finished (or its file is not ours)."""
        path = self.path(key, prefix)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # missing, or edited by hand into nonsense: recompute it
        # The full key is kept in the file, so a hash collision or a hand-copied file cannot pass as a match.
        return record.get("result") if isinstance(record, dict) and record.get("key") == key else None

    def put(self, key: dict[str, Any], result: dict[str, Any], prefix: str = "cell") -> None:
        atomic_write_text(self.path(key, prefix), json.dumps({"key": key, "result": result}, indent=1, sort_keys=True))


def table_columns(with_bpd: bool) -> list[str]:
    return [name for name in COLUMNS if with_bpd or name != "bpd"]


def _markdown_value(name: str, value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and name in _DECIMALS and math.isfinite(value):
        return f"{value:.{_DECIMALS[name]}f}"
    return str(value).replace("|", "\\|")


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """CSV text with full-precision numbers; a missing value (eta of DDPM) is an empty field."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({name: ("" if row.get(name) is None else row[name]) for name in columns} for row in rows)
    return buffer.getvalue()


def to_markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub-flavoured Markdown table with rounded metrics."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_markdown_value(name, row.get(name)) for name in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[dict[str, Any]], output_dir: Union[str, Path], with_bpd: bool) -> tuple[Path, Path]:
    """Write output_dir/results.csv and results.md (atomically) and return their paths."""
    columns = table_columns(with_bpd)
    csv_path, md_path = Path(output_dir) / "results.csv", Path(output_dir) / "results.md"
    atomic_write_text(csv_path, to_csv(rows, columns))
    atomic_write_text(md_path, to_markdown(rows, columns))
    return csv_path, md_path


def read_csv(path: Union[str, Path]) -> list[dict[str, str]]:
    """The rows of a results.csv, as strings."""
    with open(path, newline="") as file:
        return list(csv.DictReader(file))
