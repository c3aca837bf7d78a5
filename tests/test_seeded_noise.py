"""SeededNoise: normal statistics, independence, per-row purity, the counter, integer-only bits, compile."""

import shutil

import numpy as np
import pytest
import torch
from scipy import stats

from ddpm_lightning.diffusion import seeded_noise
from ddpm_lightning.diffusion.seeded_noise import MASK32, SeededNoise, lowbias32, normal_draw
from ddpm_lightning.sampling import sample_seed

# Raw small seeds are the hard case for a hash (they differ in a bit or two); derived seeds are the real one.
SEED_SETS = {"adjacent": torch.arange(64), "derived": torch.tensor([sample_seed(0, i) for i in range(64)])}


def flat(x):
    return x.reshape(x.shape[0], -1).double()


def correlation(a, b):
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


def reference_lowbias32(x: int) -> int:
    """Wellons' C code, in Python integers wrapped to 32 bits."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def test_lowbias32_matches_the_reference_on_32_bit_words():
    # The int64 version multiplies by 0x846CA68B - 2^32 to avoid overflow; the low bits must not change.
    words = [0, 1, 2, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, MASK32]
    words += torch.randint(0, 2**32, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    got = lowbias32(torch.tensor(words, dtype=torch.int64)).tolist()
    assert got == [reference_lowbias32(w) for w in words]


@pytest.mark.parametrize("seeds", SEED_SETS.values(), ids=SEED_SETS.keys())
def test_draws_are_standard_normal(seeds):
    z = flat(SeededNoise(seeds).randn((64, 3, 32, 32))).flatten()
    n = z.numel()
    assert abs(float(z.mean())) < 5 / n**0.5
    assert abs(float(z.var()) - 1) < 5 * (2 / n) ** 0.5
    assert abs(float((z**4).mean()) - 3) < 5 * (96 / n) ** 0.5  # kurtosis: Var(z^4) = 105 - 9
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3


@pytest.mark.parametrize("seeds", SEED_SETS.values(), ids=SEED_SETS.keys())
def test_no_correlation_between_neighbours_seeds_or_draws(seeds):
    noise = SeededNoise(seeds)
    first, second = flat(noise.randn((64, 3, 32, 32))), flat(noise.randn((64, 3, 32, 32)))
    pairs = {
        "neighbouring elements": (first[:, :-1], first[:, 1:]),
        "Box-Muller partners, squared": (first[:, 0::2] ** 2, first[:, 1::2] ** 2),
        "neighbouring seeds": (first[:-1], first[1:]),
        "neighbouring seeds, squared": (first[:-1] ** 2, first[1:] ** 2),
        "consecutive draws": (first, second),
    }
    for name, (a, b) in pairs.items():
        assert abs(correlation(a, b)) < 5 / a.numel() ** 0.5, name  # five standard errors


def test_every_bit_of_the_words_is_fair():
    left, right = SeededNoise(torch.arange(256)).words(256)
    words = torch.cat([left.flatten(), right.flatten()])
    ones = torch.stack([(words >> b) & 1 for b in range(32)]).double().mean(dim=1)
    assert words.min() >= 0 and words.max() <= MASK32
    assert (ones - 0.5).abs().max() < 5 * (0.25 / words.numel()) ** 0.5


def test_a_row_depends_only_on_its_own_seed():
    seeds = torch.tensor([sample_seed(3, i) for i in range(6)])
    full, part = SeededNoise(seeds), SeededNoise(seeds[[4, 1, 2]])  # a subset, reordered
    for _ in range(3):  # and at later counters
        a, b = full.randn((6, 2, 5, 5)), part.randn((3, 2, 5, 5))
        assert torch.equal(a[[4, 1, 2]], b)
    assert not torch.equal(a[0], a[1])
    assert torch.equal(SeededNoise(seeds).randint(10)[[4, 1, 2]], SeededNoise(seeds[[4, 1, 2]]).randint(10))


def test_element_j_does_not_depend_on_the_shape():
    seeds = torch.arange(4)
    short, long = SeededNoise(seeds).randn((4, 7)), SeededNoise(seeds).randn((4, 3, 5))
    assert torch.equal(short, long.reshape(4, -1)[:, :7])  # odd lengths included


def test_the_counter_advances_on_every_draw_and_replays():
    noise = SeededNoise(torch.arange(3))
    assert int(noise.counter) == 0
    draws = [noise.randn((3, 4)), noise.randn((3, 4))]
    noise.randint(5)
    assert int(noise.counter) == 3
    assert not torch.equal(draws[0], draws[1])
    replay = SeededNoise(torch.arange(3))
    assert all(torch.equal(replay.randn((3, 4)), d) for d in draws)


def test_only_integer_ops_come_before_the_float_conversion():
    """The bits are device-independent only if no float arithmetic enters them."""
    dtypes = []

    class RecordDtypes(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor):
                    dtypes.append(t.dtype)
            return out

    noise = SeededNoise(torch.arange(4))
    with RecordDtypes():
        noise.words(10)
    assert dtypes and set(dtypes) == {torch.int64}


def test_randint_is_uniform():
    labels = SeededNoise(torch.tensor([sample_seed(1, i) for i in range(20000)])).randint(10)
    assert labels.min() >= 0 and labels.max() < 10
    assert stats.chisquare(torch.bincount(labels, minlength=10).numpy()).pvalue > 1e-3


def test_compiled_draws_match_eager_and_advance_the_counter():
    """No graph break and no host sync (fullgraph), the in-place counter included."""
    eager, compiled = SeededNoise(torch.arange(5)), SeededNoise(torch.arange(5))
    draw = torch.compile(lambda: compiled.randn((5, 2, 3, 3)), backend="aot_eager", fullgraph=True)
    for step in range(2):
        assert torch.equal(draw(), eager.randn((5, 2, 3, 3)))
        assert int(compiled.counter) == step + 1


def test_compile_draws_through_torch_compile_on_cuda_devices_only(monkeypatch):
    """What sampling with a compiled module does: each draw one compiled call, the same noise, the counter kept."""
    shapes = []

    def compiled_draw():  # the real one is torch.compile(normal_draw) with inductor (next test)
        traced = torch.compile(normal_draw, backend="aot_eager", fullgraph=True)  # fullgraph: no break, no sync
        return lambda keys, counter, shape: shapes.append(shape) or traced(keys, counter, shape)

    monkeypatch.setattr(seeded_noise, "compiled_normal_draw", compiled_draw)
    seeds = torch.arange(3)
    assert torch.equal(SeededNoise(seeds, compile=True).randn((3, 4)), SeededNoise(seeds).randn((3, 4)))
    assert shapes == []  # on the CPU, compile changes nothing
    monkeypatch.setattr(SeededNoise, "device", property(lambda self: torch.device("cuda")))
    compiled, eager = SeededNoise(seeds, compile=True), SeededNoise(seeds)
    for step in range(2):
        assert torch.equal(compiled.randn((3, 2, 3)), eager.randn((3, 2, 3)))
        assert int(compiled.counter) == step + 1
    assert shapes == [(3, 2, 3)] * 2
    assert torch.equal(compiled.randint(7), eager.randint(7))  # integers stay eager, after the same counter
    assert torch.equal(SeededNoise(seeds).randn((3, 5)), SeededNoise(seeds, compile=False).randn((3, 5)))
    monkeypatch.setattr(SeededNoise, "compiled_draws", False)  # the benchmarks' A/B: eager draws
    SeededNoise(seeds, compile=True).randn((3, 2, 3))
    assert len(shapes) == 2


def test_a_draw_that_fails_to_compile_is_drawn_eagerly_with_a_warning(monkeypatch):
    def broken():
        def draw(*args):
            raise RuntimeError("triton: no compiler\nmore detail")
        return draw

    monkeypatch.setattr(seeded_noise, "compiled_normal_draw", broken)
    monkeypatch.setattr(SeededNoise, "device", property(lambda self: torch.device("cuda")))
    noise = SeededNoise(torch.arange(2), compile=True)
    failed = r"seeded noise draw failed to compile \(triton: no compiler\); it runs eagerly"
    with pytest.warns(UserWarning, match=failed):
        first = noise.randn((2, 6))
    assert torch.equal(first, SeededNoise(torch.arange(2)).randn((2, 6))) and int(noise.counter) == 1
    assert not noise.compile  # once: the next draws go straight to the eager ops


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor needs a C++ compiler on a CPU")
def test_inductor_compiles_the_draw_to_the_same_noise():
    """The integer words exactly (a different word would move a normal by O(1)); the float32 log, cos and sin
    of Box–Muller to an ulp or two (about 25 s of inductor's C++ compilation on 2 cores)."""
    noise = SeededNoise(torch.tensor([sample_seed(5, i) for i in range(4)]))
    noise.counter.fill_(7)
    compiled = seeded_noise.compiled_normal_draw()(noise.keys, noise.counter, (4, 3, 5, 5))
    eager = normal_draw(noise.keys, noise.counter, (4, 3, 5, 5))
    assert compiled.shape == eager.shape == (4, 3, 5, 5)
    assert float((compiled - eager).abs().max()) < 4 * torch.finfo(torch.float32).eps * float(eager.abs().max())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="1-d int64"):
        SeededNoise(torch.arange(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="got 3 seeds for a batch of 4"):
        SeededNoise(torch.arange(3)).randn((4, 2))
    with pytest.raises(ValueError, match="high must be"):
        SeededNoise(torch.arange(3)).randint(0)
