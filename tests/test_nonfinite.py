"""A NaN loss is caught: "stop" within one log interval with a checkpoint, "skip" drops the batch."""

import lightning as L
import pytest
import torch

from ddpm_lightning.data import DigitsDataModule
from ddpm_lightning.module import DiffusionModule
from ddpm_lightning.nonfinite import NonFiniteLossError


class PoisonedNet(torch.nn.Module):
    """A 1x1 conv whose output is NaN on the chosen training calls (a stand-in for a bad batch)."""

    def __init__(self, in_channels=1, poison_calls=(), **kwargs):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.poison_calls = set(poison_calls)
        self.calls = 0

    def forward(self, x, t):
        out = self.conv(x)
        if self.training:
            if self.calls in self.poison_calls:
                out = out * float("nan")
            self.calls += 1
        return out


def train(tmp_path, policy, poison_calls, max_steps=12):
    L.seed_everything(0)
    module = DiffusionModule(net={"class_path": "test_nonfinite.PoisonedNet", "init_args": {"poison_calls": poison_calls}},
                             image_size=8, in_channels=1, num_timesteps=100, nonfinite_loss=policy)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=5,
                        default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(module, DigitsDataModule(image_size=8, batch_size=16))
    return module, trainer


def test_stop_names_the_step_and_saves_a_checkpoint_beside_the_good_ones(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"non-finite at step 6 \(seen at step 9\)") as info:
        train(tmp_path, "stop", poison_calls=[6])
    saved = tmp_path / "checkpoints" / "nonfinite-step=6.ckpt"
    assert saved.exists() and str(saved) in str(info.value)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_skip_drops_only_the_bad_batches(tmp_path):
    with pytest.warns(UserWarning, match="non-finite loss at step 3: batch skipped"):
        module, trainer = train(tmp_path, "skip", poison_calls=[3, 4])
    assert module.nonfinite.skipped == 2
    assert trainer.global_step == 12  # skipped batches count as (empty) steps
    assert all(torch.isfinite(p).all() for p in module.net.parameters())
    assert all(torch.isfinite(p).all() for p in module.ema.averages[0].parameters())


def test_stop_reports_the_first_bad_step_even_after_the_poison_spread(tmp_path):
    # A NaN gradient at step 1 makes every later loss NaN too; the report still names step 1.
    with pytest.raises(NonFiniteLossError, match=r"non-finite at step 1 \(seen at step 4\)"):
        train(tmp_path, "stop", poison_calls=[1])


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown nonfinite_loss 'ignore'; valid: stop, skip"):
        DiffusionModule(net="tiny", nonfinite_loss="ignore")


def test_skipped_losses_stay_out_of_the_importance_sampler(tmp_path):
    L.seed_everything(0)
    module = DiffusionModule(net={"class_path": "test_nonfinite.PoisonedNet", "init_args": {"poison_calls": [2]}},
                             image_size=8, in_channels=1, num_timesteps=100, nonfinite_loss="skip",
                             timestep_sampler="loss-second-moment")
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0)
    with pytest.warns(UserWarning, match="batch skipped"):
        trainer.fit(module, DigitsDataModule(image_size=8, batch_size=16))
    state = module.timestep_sampler.state_dict()
    # Lightning counts the skipped batch as a step (its optimizer.step sees no gradients and changes nothing)
    assert module.nonfinite.skipped == 1 and trainer.global_step == 5
    assert int(state["loss_counts"].sum()) == 16 * (5 - 1)  # the poisoned batch's losses were not recorded
    assert torch.isfinite(state["loss_history"]).all()
