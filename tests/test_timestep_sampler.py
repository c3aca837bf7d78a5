"""Timestep samplers: uniform and loss-second-moment importance sampling (Nichol & Dhariwal sec. 3.3)."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddpm_lightning.diffusion import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)


def test_uniform():
    s = create_named_schedule_sampler("uniform", 50)
    assert isinstance(s, UniformSampler)
    t, w = s.sample(10000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 49 and (w == 1).all()
    assert np.bincount(t.numpy(), minlength=50).min() > 120


def warm(sampler, losses_per_step):
    for _ in range(sampler.history_per_term):
        sampler.update_with_local_losses(torch.arange(len(losses_per_step)), torch.tensor(losses_per_step))


def test_loss_second_moment_is_uniform_until_every_history_is_full():
    s = create_named_schedule_sampler("loss-second-moment", 4)
    assert isinstance(s, LossSecondMomentResampler)
    for _ in range(9):
        s.update_with_all_losses([0, 1, 2, 3], [1.0, 2.0, 3.0, 4.0])
    s.update_with_all_losses([0, 1, 2], [1.0, 2.0, 3.0])
    assert not s.warmed_up() and (s.weights() == 1).all()
    s.update_with_all_losses([3], [4.0])
    assert s.warmed_up()
    expected = np.array([1.0, 2.0, 3.0, 4.0]) / 10 * (1 - 0.001) + 0.001 / 4
    np.testing.assert_allclose(s.weights(), expected)


def test_weights_use_root_mean_square_of_the_last_ten_losses():
    s = LossSecondMomentResampler(2)
    warm(s, [100.0, 100.0])  # pushed out below
    for value in (3.0, 4.0) * 5:
        s.update_with_all_losses([0, 1], [value, 1.0])
    w = s.weights()
    rms = np.sqrt((9 + 16) / 2)
    np.testing.assert_allclose(w[0] / w[1], (rms * 0.999 / (rms + 1) + 0.0005) / (0.999 / (rms + 1) + 0.0005))


def test_importance_weights_keep_the_objective_unbiased():
    losses = np.linspace(0.1, 5.0, 20)
    s = LossSecondMomentResampler(20)
    warm(s, losses.tolist())
    t, w = s.sample(200000, "cpu", generator=torch.Generator().manual_seed(0))
    p = s.weights() / s.weights().sum()
    torch.testing.assert_close(w, torch.tensor(1 / (20 * p[t.numpy()]), dtype=torch.float32))
    # E_p[w L] = mean_t L: importance sampling leaves the mean of the loss unchanged
    assert float((w.double() * torch.tensor(losses)[t]).mean()) == pytest.approx(losses.mean(), rel=0.01)
    # high-loss steps are drawn more often
    counts = np.bincount(t.numpy(), minlength=20)
    assert counts[-1] > 10 * counts[0]


def test_state_dict_round_trip():
    s = LossSecondMomentResampler(5)
    warm(s, [1.0, 2.0, 3.0, 4.0, 5.0])
    s2 = LossSecondMomentResampler(5)
    s2.load_state_dict(s.state_dict())
    np.testing.assert_array_equal(s2.weights(), s.weights())
    with pytest.raises(ValueError, match="expected"):
        LossSecondMomentResampler(6).load_state_dict(s.state_dict())


def test_unknown_sampler():
    with pytest.raises(ValueError, match="unknown timestep sampler 'importance'; valid: uniform, loss-second-moment"):
        create_named_schedule_sampler("importance", 10)


def _rank_main(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    s = LossSecondMomentResampler(6, history_per_term=2)
    for step in range(4):
        # ranks see different timesteps and different batch sizes
        ts = torch.tensor([(rank + step + k) % 6 for k in range(3 + rank)])
        s.update_with_local_losses(ts, ts.double() * (rank + 1) + step)
    queue.put((rank, s.state_dict()))
    dist.destroy_process_group()


def test_state_is_identical_on_every_rank():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    states = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    np.testing.assert_array_equal(states[0]["loss_history"], states[1]["loss_history"])
    # and equal to one process that saw every rank's losses in rank order
    single = LossSecondMomentResampler(6, history_per_term=2)
    for step in range(4):
        for rank in range(2):
            ts = [(rank + step + k) % 6 for k in range(3 + rank)]
            single.update_with_all_losses(ts, [t * (rank + 1) + step for t in ts])
    np.testing.assert_array_equal(states[0]["loss_history"], single.state_dict()["loss_history"])
