"""`ddpm fit` on two CPU processes (DDP over gloo): every rank ends with the same weights, EMA and t-sampler,
and the W&B logger (offline) keeps one run, on rank 0."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH = 3, 16


def test_two_process_ddp_ranks_stay_identical(tmp_path):
    ddpm = str(Path(sys.executable).parent / "ddpm")
    python_path = os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path, "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": "1"}  # one thread per process: the two share a 2-core machine
    env.pop("WANDB_DIR", None)
    command = [ddpm, "fit", "--config", str(ROOT / "experiments" / "quickstart.yaml"),
               "--config", str(ROOT / "experiments" / "base" / "wandb.yaml"),
               "--model.net=tiny", "--data.init_args.image_size=8", f"--data.init_args.batch_size={BATCH}",
               "--model.timestep_sampler=loss-second-moment", "--trainer.callbacks+=ddp_probe.SaveRankState",
               "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
               f"--trainer.max_steps={STEPS}", "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
               f"--trainer.default_root_dir={tmp_path}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]

    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert [r["global_step"] for r in ranks] == [STEPS, STEPS] and ranks[0]["world_size"] == 2
    # seed_everything seeds every rank alike; the module offsets by rank so t and noise differ across ranks
    assert ranks[0]["seed"] != ranks[1]["seed"]
    weights = [r["state_dict"] for r in ranks]
    assert weights[0].keys() == weights[1].keys()
    assert any(name.startswith("ema.averages.0.") for name in weights[0])
    for name in weights[0]:  # the network, its EMA and every buffer: bit for bit
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=0, msg=name)
    samplers = [r["timestep_sampler"] for r in ranks]
    for key in ("loss_history", "loss_counts"):
        torch.testing.assert_close(samplers[0][key], samplers[1][key], rtol=0, atol=0)
    # both ranks' losses reached the importance sampler: every step saw 2 x BATCH of them
    assert int(samplers[0]["loss_counts"].sum()) == STEPS * BATCH * 2
    # training moved the weights: the EMA (a copy of them at the start) now lags behind
    moved = [name for name in weights[0] if name.startswith("net.") and
             not torch.equal(weights[0][name], weights[0]["ema.averages.0." + name[len("net."):]])]
    assert moved
    # the checkpoint rank 0 wrote is that same state
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == STEPS
    for name, tensor in checkpoint["state_dict"].items():
        torch.testing.assert_close(tensor, weights[0][name], rtol=0, atol=0)
    torch.testing.assert_close(checkpoint["timestep_sampler"]["loss_counts"], samplers[0]["loss_counts"])
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1  # rank 1 logs nothing of its own
