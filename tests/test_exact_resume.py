"""Exact resume: N steps, stopped and resumed for N more, end bit for bit where 2N unbroken steps end."""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ddpm_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "experiments" / "quickstart.yaml")
BATCHES_PER_EPOCH = 3
SMALL = ["--model.net=tiny", "--data.init_args.image_size=8", "--data.init_args.batch_size=16",
         # 1,797 digits less 1,749 held out: 48 training images, 3 batches of 16 per epoch
         "--data.init_args.num_val_samples=1749", "--model.timestep_sampler=loss-second-moment",
         "--trainer.deterministic=true", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false"]


class SigtermDuringStep(L.Callback):
    """Sends this process SIGTERM while it trains step `step` (1-based), as a preempting scheduler would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step - 1:
            # Lightning's handler, not the default one that would end pytest
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
            os.kill(os.getpid(), signal.SIGTERM)


def fit(root, max_steps, *extra):
    main(["fit", "--config", QUICKSTART, *SMALL, f"--trainer.default_root_dir={root}",
          f"--trainer.max_steps={max_steps}", *extra])


def logged_losses(version_dir):
    with open(version_dir / "metrics.csv") as file:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(file) if row["train/loss"]}


def assert_same_state(unbroken, resumed):
    """Weights, EMA, AdamW and LR schedule, timestep-sampler history and the random streams: all equal."""
    assert resumed["global_step"] == unbroken["global_step"]
    state = unbroken["state_dict"]
    assert any(name.startswith("ema.") for name in state)
    for name, tensor in state.items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    (adam,), (adam_resumed,) = unbroken["optimizer_states"], resumed["optimizer_states"]
    assert adam["param_groups"] == adam_resumed["param_groups"]
    for index, moments in adam["state"].items():
        for key, value in moments.items():
            assert torch.equal(value, adam_resumed["state"][index][key]), (index, key)
    assert unbroken["lr_schedulers"] == resumed["lr_schedulers"]
    history = unbroken["timestep_sampler"]
    assert int(history["loss_counts"].sum()) > 0
    for key, value in history.items():
        assert torch.equal(value, resumed["timestep_sampler"][key]), key
    streams, streams_resumed = (run["callbacks"]["RNGState"]["per_rank"] for run in (unbroken, resumed))
    assert len(streams) == len(streams_resumed)
    for rank, (stream, stream_resumed) in enumerate(zip(streams, streams_resumed)):
        assert torch.equal(stream["torch"], stream_resumed["torch"]), rank


CASES = {
    # name: (N, loader option, how the first run stops)
    "in-memory, mid-epoch": (4, "true", "max_steps"),
    "in-memory, epoch's last batch": (3, "true", "max_steps"),
    "DataLoader, mid-epoch": (4, "false", "max_steps"),
    "DataLoader, epoch's last batch": (3, "false", "max_steps"),
    "SIGTERM mid-epoch": (4, "true", "sigterm"),
    "SIGTERM at an epoch's last batch": (3, "true", "sigterm"),
    # the graph-mode step (manual optimization; uncaptured on the CPU) keeps its state in the same places
    "cuda_graph step, mid-epoch": (4, "true", "max_steps", "--model.cuda_graph=true"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_stopped_and_resumed_run_equals_the_unbroken_run(tmp_path, case):
    steps, in_memory, stop, *extra = CASES[case]
    options = [f"--data.init_args.in_memory={in_memory}", "--trainer.callbacks=[]", *extra]
    fit(tmp_path / "unbroken", 2 * steps, *options)
    if stop == "max_steps":
        fit(tmp_path / "resumed", steps, *options)
    else:
        preempt = f'--trainer.callbacks=[{{"class_path": "test_exact_resume.SigtermDuringStep", "init_args": {{"step": {steps}}}}}]'
        with pytest.raises(SIGTERMException):
            fit(tmp_path / "resumed", 100, f"--data.init_args.in_memory={in_memory}", preempt)
    stopped = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert stopped["global_step"] == steps
    # the loader's position, kept by Lightning: epoch, and batches of it done (all 3 at an epoch's end)
    epoch, batches = divmod(steps - 1, BATCHES_PER_EPOCH)
    assert stopped["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": epoch, "batches": batches + 1}]
    fit(tmp_path / "resumed", 2 * steps, *options, "--ckpt_path=last")

    unbroken = torch.load(tmp_path / "unbroken" / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert_same_state(unbroken, resumed)
    # the resumed run's own log (version_1) holds steps N+1..2N, with the unbroken run's losses
    expected = logged_losses(tmp_path / "unbroken" / "lightning_logs" / "version_0")
    after_resume = logged_losses(tmp_path / "resumed" / "lightning_logs" / "version_1")
    assert sorted(expected) == list(range(2 * steps)) and sorted(after_resume) == list(range(steps, 2 * steps))
    assert after_resume == {step: expected[step] for step in range(steps, 2 * steps)}


def test_two_process_resume_restores_each_ranks_streams(tmp_path):
    """DDP over gloo: the checkpoint holds both ranks' random streams (they differ) and each gets its own back."""
    ddpm = str(Path(sys.executable).parent / "ddpm")
    steps = 2  # of 3 per epoch and rank (48 images over 2 ranks x 8): mid-epoch
    command = [ddpm, "fit", "--config", QUICKSTART, *SMALL, "--data.init_args.batch_size=8", "--trainer.callbacks=[]",
               "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process: the two share a 2-core machine
    # the unbroken run's periodic checkpoint at step N is the state a run stopped at N leaves in last.ckpt
    for extra in ([f"--trainer.default_root_dir={tmp_path / 'unbroken'}", f"--checkpoint.every_n_train_steps={steps}"],
                  [f"--trainer.default_root_dir={tmp_path / 'resumed'}",
                   f"--ckpt_path={tmp_path / 'unbroken' / 'checkpoints' / f'step={steps}.ckpt'}"]):
        done = subprocess.run([*command, f"--trainer.max_steps={2 * steps}", *extra], env=env, capture_output=True,
                              text=True, timeout=240, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
    unbroken = torch.load(tmp_path / "unbroken" / "checkpoints" / "last.ckpt", weights_only=True)
    streams = unbroken["callbacks"]["RNGState"]["per_rank"]
    assert len(streams) == 2 and not torch.equal(streams[0]["torch"], streams[1]["torch"])
    assert_same_state(unbroken, torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True))
