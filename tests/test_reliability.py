"""Preemption (SIGTERM, SLURM's SIGUSR1), atomic checkpoints, damaged or mismatched checkpoints, through `ddpm`."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddpm_lightning.cli import main
from ddpm_lightning.resume import AtomicCheckpointIO, is_readable_checkpoint, resolve_resume_path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "experiments" / "quickstart.yaml")
TINY = ["--model.net=tiny", "--data.init_args.image_size=8", "--data.init_args.batch_size=16",
        "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]"]


def ddpm_command(root, *extra):
    ddpm = str(Path(sys.executable).parent / "ddpm")
    return [ddpm, "fit", "--config", QUICKSTART, *TINY, f"--trainer.default_root_dir={root}", *extra]


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    proc = subprocess.Popen(ddpm_command(tmp_path, "--trainer.max_steps=100000", "--checkpoint.every_n_train_steps=2"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    periodic = tmp_path / "checkpoints" / "step=2.ckpt"
    deadline = time.time() + 240
    while not periodic.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert periodic.exists(), proc.communicate()[0][-2000:]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert "SIGTERM: saved step" in out, out[-2000:]
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    step = saved["global_step"]
    assert step >= 2
    # --ckpt_path last continues from the preemption checkpoint
    main(ddpm_command(tmp_path, f"--trainer.max_steps={step + 2}", "--ckpt_path=last")[1:])
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == step + 2
    assert not list((tmp_path / "checkpoints").glob("last-v*.ckpt"))  # one last.ckpt, updated in place


def test_atomic_save_leaves_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)
    assert torch.load(target)["step"] == 1

    def killed_mid_write(self, checkpoint, path, storage_options=None):
        Path(path).write_bytes(b"half a checkpoint")  # whatever file it writes to is left half-written
        raise OSError("disk full")

    monkeypatch.setattr("lightning.pytorch.plugins.io.TorchCheckpointIO.save_checkpoint", killed_mid_write)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no stray temporary file


def test_damaged_last_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for step in (2, 4):
        torch.save({"global_step": step}, folder / f"step={step}.ckpt")
        time.sleep(0.01)
    full = (folder / "step=4.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(full[: len(full) // 2])  # killed mid-copy
    assert not is_readable_checkpoint(folder / "last.ckpt") and is_readable_checkpoint(folder / "step=4.ckpt")
    with pytest.warns(UserWarning, match="resuming from .*step=4.ckpt"):
        assert resolve_resume_path("last", str(folder)) == str(folder / "step=4.ckpt")
    (folder / "step=4.ckpt").write_bytes(full[:100])
    with pytest.warns(UserWarning, match="step=2.ckpt"):
        assert resolve_resume_path("last", str(folder)) == str(folder / "step=2.ckpt")
    with pytest.raises(ValueError, match="step=4.ckpt is truncated or corrupted"):
        resolve_resume_path(str(folder / "step=4.ckpt"), str(folder))
    assert resolve_resume_path("last", str(tmp_path / "empty")) == "last"


def test_damaged_explicit_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SystemExit) as exit_info:
        main(ddpm_command(tmp_path, "--trainer.max_steps=1", f"--ckpt_path={bad}")[1:])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"ddpm: error: checkpoint {bad} is truncated or corrupted"


def slurm_env(tmp_path):
    """SLURM's variables for one task, so Lightning picks SLURMEnvironment (auto_requeue on SIGUSR1), and a fake
    `scontrol` that records its arguments and then freezes the job, as SLURM's kill after a requeue would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\nkill -STOP $PPID\n')
    scontrol.chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "ddpm", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
             "SLURM_NNODES": "1", "SLURM_NODELIST": "localhost", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0"}
    return {**os.environ, **slurm, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}


def test_slurm_sigusr1_saves_requeues_and_last_resumes_from_it(tmp_path, caplog):
    proc = subprocess.Popen(ddpm_command(tmp_path, "--trainer.max_steps=100000", "--checkpoint.every_n_train_steps=2",
                                         "--trainer.log_every_n_steps=1"),
                            env=slurm_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(tmp_path / "checkpoints" / "step=2.ckpt", proc)  # training, with Lightning's handlers installed
        proc.send_signal(signal.SIGUSR1)
        wait_for(tmp_path / "scontrol.log", proc)
        # the job is frozen inside `scontrol requeue`; SLURM then kills it, here without a chance to save
    finally:
        proc.kill()
        out, _ = proc.communicate(timeout=60)
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"], out[-2000:]
    hpc = tmp_path / "hpc_ckpt_1.ckpt"  # Lightning's auto-requeue checkpoint, in default_root_dir
    assert is_readable_checkpoint(hpc), out[-2000:]
    step = torch.load(hpc, weights_only=True)["global_step"]
    assert step >= 2
    # newer than last.ckpt (the periodic save before it): `--ckpt_path last` resumes from it
    assert resolve_resume_path("last", str(tmp_path / "checkpoints"), str(tmp_path)) == str(hpc)
    with caplog.at_level(logging.INFO):
        main(ddpm_command(tmp_path, f"--trainer.max_steps={step + 2}", "--ckpt_path=last")[1:])
    assert f"Restoring states from the checkpoint path at {hpc}" in caplog.text
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step + 2


def wait_for(path, proc, seconds=240):
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    if not path.exists():
        proc.kill()
        raise AssertionError(f"{path.name} never appeared:\n{proc.communicate()[0][-2000:]}")


def test_last_resolves_to_the_newest_of_last_and_hpc_checkpoints(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    last, hpc = folder / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt"
    for path, age in ((hpc, 20), (last, 10)):  # a requeue checkpoint, then SIGTERM's last.ckpt
        torch.save({"global_step": age}, path)
        os.utime(path, (time.time() - age, time.time() - age))
    assert resolve_resume_path("last", str(folder), str(tmp_path)) == str(last)
    os.utime(hpc, None)  # killed before it could save last.ckpt: the requeue checkpoint is the newest
    assert resolve_resume_path("last", str(folder), str(tmp_path)) == str(hpc)
    hpc.write_bytes(hpc.read_bytes()[:50])
    with pytest.warns(UserWarning, match="resuming from .*last.ckpt"):
        assert resolve_resume_path("last", str(folder), str(tmp_path)) == str(last)
    assert resolve_resume_path("last", str(folder)) == str(last)  # outside SLURM: no hpc folder to look in


@pytest.fixture(scope="module")
def one_step_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_step")
    main(ddpm_command(root, "--trainer.max_steps=1")[1:])
    return torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)


def sample_error(checkpoint, tmp_path, capsys, *extra):
    """Runs `ddpm sample` on a checkpoint; returns (exit code, stderr lines)."""
    path = tmp_path / "edited.ckpt"
    torch.save(checkpoint, path)
    capsys.readouterr()
    try:
        main(["sample", "--ckpt_path", str(path), "--output_dir", str(tmp_path / "out"), "--num_samples", "2",
              "--respacing", "2", *extra])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err.strip().splitlines()


def test_checkpoint_of_another_network_is_one_line(one_step_checkpoint, tmp_path, capsys):
    edited = {**one_step_checkpoint, "hyper_parameters": {**one_step_checkpoint["hyper_parameters"], "net": "small"}}
    code, err = sample_error(edited, tmp_path, capsys)  # the weights are the tiny preset's
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"ddpm: error: checkpoint {tmp_path / 'edited.ckpt'} holds another network than its "
                             "hyperparameters describe (net='small'): ")
    assert "weights of other shapes (net." in err[0] and " missing (net." in err[0] and " unexpected (net." in err[0]


def test_checkpoint_without_ema_is_one_line_and_samples_with_no_ema(one_step_checkpoint, tmp_path, capsys):
    state = {k: v for k, v in one_step_checkpoint["state_dict"].items() if not k.startswith("ema.")}
    code, err = sample_error({**one_step_checkpoint, "state_dict": state}, tmp_path, capsys)
    assert code == 2 and err == [f"ddpm: error: checkpoint {tmp_path / 'edited.ckpt'} has no EMA weights "
                                 "(no ema.* entries); use its trained weights with --no_ema"]
    code, err = sample_error({**one_step_checkpoint, "state_dict": state}, tmp_path, capsys, "--no_ema")
    assert code == 0, err
    assert (tmp_path / "out" / "samples.npz").exists()


def test_save_last_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(ddpm_command(tmp_path, "--trainer.max_steps=1", "--checkpoint.save_last=true")[1:])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "ddpm: error: --checkpoint.save_last: last.ckpt is written by ddpm itself")
