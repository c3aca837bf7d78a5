"""Preemption, atomic checkpoints and damaged-checkpoint fallback, through the real `ddpm fit`."""

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
