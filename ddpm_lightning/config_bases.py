"""`__base__:` in experiment YAML files, so a config only states what it changes.

jsonargparse has no include directive. `ddpm fit --config leaf.yaml` is rewritten to one
`--config` per file of the chain, base first; jsonargparse then merges them key by key, exactly as
if the user had passed several --config flags.
"""

from __future__ import annotations

from pathlib import Path

import yaml

CONFIG_FLAGS = ("--config", "-c")


def _chain(path: Path, seen: tuple[Path, ...] = ()) -> list[str]:
    path = path.resolve()
    if path in seen:
        raise ValueError(f"config {path}: __base__ cycle through {' -> '.join(map(str, seen))}")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or "__base__" not in data:
        return [str(path)]
    bases = data.pop("__base__")
    bases = [bases] if isinstance(bases, str) else list(bases)
    out: list[str] = []
    for base in bases:
        out += _chain(path.parent / base, seen + (path,))
    # The leaf itself, minus its __base__ key, as an inline YAML string (jsonargparse accepts both).
    if data:
        out.append(yaml.safe_dump(data, sort_keys=False))
    return out


def expand_config_bases(argv: list[str]) -> list[str]:
    """Replace each `--config FILE` whose FILE has `__base__` by the whole chain of --config flags."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg in CONFIG_FLAGS and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        for item in _chain(Path(value)) if Path(value).suffix in (".yaml", ".yml") else [value]:
            out += ["--config", item]
    return out
