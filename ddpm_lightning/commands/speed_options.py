"""Sampling fast-path flags shared by `ddpm sample` and `ddpm evaluate`; each defaults to the checkpoint's."""

from __future__ import annotations

from typing import Any, Optional


def add_speed_arguments(parser: Any) -> None:
    """--sample_precision, --compile, --compile_tuning and --cuda_graph, overriding the checkpoint's hyperparameters."""
    parser.add_argument("--sample_precision", type=Optional[str], default=None,
                        help="network autocast while sampling: 32 | bf16-mixed | 16-mixed (default: the checkpoint's)")
    parser.add_argument("--compile", type=Optional[bool], default=None,
                        help="torch.compile the sampling network on CUDA (default: the checkpoint's)")
    parser.add_argument("--compile_tuning", type=Optional[bool], default=None,
                        help="with compile, tune each kernel by timing it once: +10 percent on an H100, about two "
                             "minutes of one-off tuning (default: the checkpoint's)")
    parser.add_argument("--cuda_graph", type=Optional[bool], default=None,
                        help="replay sampling forwards from CUDA graphs on CUDA (default: the checkpoint's)")


def apply_speed_options(module: Any, args: Any) -> None:
    """Apply the flags given to a loaded DiffusionModule (unset flags keep the checkpoint's choice)."""
    module.set_sampling_options(args.sample_precision, args.compile, args.cuda_graph, args.compile_tuning)
