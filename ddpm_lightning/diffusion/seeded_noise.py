"""Counter-based, per-sample Gaussian noise drawn on the device.

Row i of every draw is a pure function of (seeds[i], draw counter, element index), as in the
counter-based generators of Salmon et al. (Philox, SC'11); no state is carried from one element to the
next. So a sample's noise does not depend on which other samples share its batch or its rank. A batch is
drawn by a fixed number of tensor ops, with no Python loop over samples. The counter is a device tensor
that each draw advances in place, so a draw never waits on the host and can be captured in a CUDA graph
or traced by torch.compile.

The bits come from a keyed Feistel network over the 64-bit block (element index, counter). Its round
function is Wellons' lowbias32 integer hash (hash-prospector), and each row's round keys are derived
from that row's 64-bit seed. Box–Muller turns the two 32-bit words of a block into two standard normals.
Everything before the float conversion is integer arithmetic on int64 tensors, kept below 2^63 so that
it never overflows. The bits are therefore identical on CPU and CUDA, eager or compiled; only the
float32 log/cos/sin at the end may differ by an ulp or two between devices, or between eager and compiled.

A draw is about 80 elementwise ops on [N, numel / 2] tensors. Run one by one on a GPU that is ~80 kernel
launches a sampling step, each a few microseconds (GPU runs 3-4's profiles: bitwise_xor alone 25 a step at
3.3-3.6 us), about 0.27 ms against a compiled DDPM CIFAR-10 forward's 17.8 ms at batch 512. With `compile`,
a draw on a CUDA device runs through torch.compile instead: two kernels (the words with Box–Muller, and
the interleaving of its pairs) and the counter's increment. The integer ops are exact either way.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
# Weyl increment (2^32 / golden ratio), as in Philox's key schedule: makes every round's key distinct.
GOLDEN32 = 0x9E3779B9
# Luby–Rackoff: four Feistel rounds make a strong pseudorandom permutation; one more for margin. The
# first round is nearly free, because the half it hashes (the counter) is shared by a whole row.
NUM_ROUNDS = 5


def lowbias32(x: Tensor) -> Tensor:
    """Wellons' lowbias32 avalanche hash of 32-bit words held in int64 (values in [0, 2^32))."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32  # < 2^32 * 2^31: no int64 overflow
    x = x ^ (x >> 15)
    # 0x846CA68B exceeds 2^31; subtracting 2^32 keeps the product's low 32 bits but fits it in int64.
    x = (x * (0x846CA68B - 2**32)) & MASK32
    return x ^ (x >> 16)


def round_keys(seeds: Tensor) -> Tensor:
    """[NUM_ROUNDS, N, 1] round keys of N 64-bit seeds; distinct seeds get distinct key pairs."""
    seed_lo, seed_hi = seeds & MASK32, (seeds >> 32) & MASK32
    # Each step is a bijection of one half given the other, so (seed_lo, seed_hi) -> (key_a, key_b) is
    # injective; and seeds that differ in a bit or two (0, 1, 2, ...) still get unrelated keys.
    key_a = lowbias32(seed_lo ^ lowbias32(seed_hi))
    key_b = lowbias32(seed_hi ^ lowbias32(key_a ^ GOLDEN32))
    keys = [((key_a if r % 2 == 0 else key_b) + r * GOLDEN32) & MASK32 for r in range(NUM_ROUNDS)]
    return torch.stack(keys).unsqueeze(-1)


def uniform_unit_interval(words: Tensor, open_at_zero: bool) -> Tensor:
    """The top 24 bits of 32-bit words as float32 in (0, 1] (open_at_zero) or [0, 1), exactly."""
    top = (words >> 8) + int(open_at_zero)  # at most 2^24: an exact float32
    return top.to(torch.float32) * 2.0**-24


def feistel_words(keys: Tensor, counter: Tensor, numel: int) -> tuple[Tensor, Tensor]:
    """Two [N, numel] tensors of 32-bit words: the blocks (element index, counter) under each row's round keys."""
    index = torch.arange(numel, dtype=torch.int64, device=keys.device)
    # Feistel rounds on the block (left, right) = (element index, counter). Round 0 hashes only
    # [N, 1] values (counter and key); every later round is full width, [N, numel].
    left, right = index, counter & MASK32
    for key in keys:
        left, right = right, left ^ lowbias32(right ^ key)
    return left, right


def normal_draw(keys: Tensor, counter: Tensor, shape: tuple[int, ...]) -> Tensor:
    """float32 standard normals of `shape` for one counter value, by Box–Muller (1958), both outputs used.

    Block k gives elements 2k (cosine) and 2k + 1 (sine), so element j is one function of
    (seed, counter, j) whatever the shape.
    """
    numel = math.prod(shape[1:])
    left, right = feistel_words(keys, counter, (numel + 1) // 2)
    radius = torch.sqrt(-2.0 * torch.log(uniform_unit_interval(left, open_at_zero=True)))
    angle = (2 * math.pi) * uniform_unit_interval(right, open_at_zero=False)
    pairs = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)
    return pairs.reshape(shape[0], -1)[:, :numel].reshape(shape)


@functools.cache
def compiled_normal_draw():
    """normal_draw through torch.compile, made once per process (each new shape is traced once)."""
    return torch.compile(normal_draw)


class SeededNoise:
    """Per-sample normal noise on the seeds' device; row i depends only on (seeds[i], counter, index).

    seeds: [N] int64. Every draw (randn or randint) uses the current counter and then advances it, so
    successive draws are independent and replay the same way for the same seeds. compile: draw the normals
    through torch.compile on a CUDA device (see the module doc); elsewhere, and if compiling fails, eagerly.
    """

    # Off: the draws run eagerly even with compile, as before session 17 (the benchmarks' A/B).
    compiled_draws = True

    def __init__(self, seeds: Tensor, compile: bool = False):
        if seeds.ndim != 1 or seeds.dtype != torch.int64:
            raise ValueError(f"seeds must be a 1-d int64 tensor, got {seeds.dtype} of shape {tuple(seeds.shape)}")
        self.keys = round_keys(seeds)
        self.counter = torch.zeros((), dtype=torch.int64, device=seeds.device)
        self.compile = compile

    def __len__(self) -> int:
        return self.keys.shape[1]

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def _compiles(self) -> bool:
        return self.compile and self.compiled_draws and self.device.type == "cuda"

    def words(self, numel: int) -> tuple[Tensor, Tensor]:
        """Two [N, numel] tensors of 32-bit words for the current counter, which then advances."""
        words = feistel_words(self.keys, self.counter, numel)
        self.counter.add_(1)
        return words

    def randn(self, shape) -> Tensor:
        """float32 standard normals of `shape` (shape[0] = N); see normal_draw."""
        shape = tuple(shape)
        if shape[0] != len(self):
            raise ValueError(f"got {len(self)} seeds for a batch of {shape[0]}")
        z = None
        if self._compiles():
            try:
                z = compiled_normal_draw()(self.keys, self.counter, shape)
            except Exception as err:  # e.g. no working Triton: eager ops draw the same noise
                warnings.warn(f"compile: the seeded noise draw failed to compile ({str(err).splitlines()[0][:200]}); "
                              "it runs eagerly")
                self.compile = False
        if z is None:
            z = normal_draw(self.keys, self.counter, shape)
        self.counter.add_(1)
        return z

    def randint(self, high: int) -> Tensor:
        """[N] int64 uniform on {0, ..., high - 1}, by Lemire's multiply-shift (bias below high / 2^32)."""
        if not 0 < high < 2**31:
            raise ValueError(f"high must be in [1, 2^31), got {high}")
        left, _ = self.words(1)
        return (left[:, 0] * high) >> 32
