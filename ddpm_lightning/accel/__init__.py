"""Fast paths for GPUs: compiled networks, one-CUDA-graph training steps, graphed sampling forwards.

Each is opt-in through DiffusionModule arguments and computes the same function as the plain path
(tests/test_accel.py checks the training step bit for bit on the CPU, where the graph runs eagerly).
"""

from ddpm_lightning.accel.compile import CompiledCall, compile_blocks
from ddpm_lightning.accel.fast_forward import FastForward
from ddpm_lightning.accel.train_step import TrainStep

__all__ = ["CompiledCall", "FastForward", "TrainStep", "compile_blocks"]
