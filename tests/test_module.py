"""DiffusionModule: timestep rescaling, EMA, class conditioning, checkpoints, and a loss that falls."""

import lightning as L
import pytest
import torch

from ddpm_lightning.data import DigitsDataModule
from ddpm_lightning.ema import EMA
from ddpm_lightning.module import DiffusionModule


class Recorder(torch.nn.Module):
    """A stand-in network that records the timesteps and labels it is fed."""

    def __init__(self, in_channels=1, learn_sigma=False, **kwargs):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, in_channels * (2 if learn_sigma else 1), 1)
        self.seen = []

    def forward(self, x, t, y=None):
        self.seen.append((t.clone(), None if y is None else y.clone()))
        return self.conv(x)


def recorder_module(**kw):
    return DiffusionModule(net={"class_path": "test_module.Recorder"}, image_size=8, in_channels=1, **kw)


@pytest.mark.parametrize("T,scale", [(1000, 1.0), (4000, 0.25), (500, 2.0)])
def test_network_sees_timesteps_on_the_0_to_1000_range(T, scale):
    m = recorder_module(num_timesteps=T)
    t = torch.tensor([0, T // 2, T - 1])
    m(torch.randn(3, 1, 8, 8), t)
    seen = m.net.seen[-1][0]
    if T == 1000:
        assert seen.dtype == torch.long and torch.equal(seen, t)  # fed as given, exactly
    else:
        torch.testing.assert_close(seen, t.float() * scale)
    # respaced sampling still feeds original indices, rescaled
    m.sample(2, respacing="5", use_ema=False)
    first, last = m.net.seen[-5][0], m.net.seen[-1][0]
    assert first.max().item() == pytest.approx((T - 1) * scale) and last.max().item() == 0


def test_class_conditional_labels_reach_the_network():
    m = recorder_module(class_cond=True, num_classes=10)
    batch = (torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4]))
    m.training_step(batch, 0)
    assert m.net.seen[-1][1].tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="class_cond=True needs num_classes"):
        recorder_module(class_cond=True)


def test_learned_variance_doubles_output_channels():
    m = DiffusionModule(net="tiny", image_size=16, in_channels=1, var_type="learned_range", loss_type="rescaled_mse")
    out = m(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]))
    assert out.shape == (2, 2, 16, 16)


def test_ema_update_is_the_exponential_average():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, [0.9, 0.5])
    before = [p.detach().clone() for p in ema.averages[0].parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net, num_updates=10)
    for avg, old, new in zip(ema.averages[0].parameters(), before, net.parameters()):
        torch.testing.assert_close(avg, 0.9 * old + 0.1 * new)
    for avg, old, new in zip(ema.averages[1].parameters(), before, net.parameters()):
        torch.testing.assert_close(avg, 0.5 * old + 0.5 * new)
    warm = EMA(net, [0.9999], warmup=True)
    assert warm.decay_at(0.9999, 0) == pytest.approx(0.1) and warm.decay_at(0.9999, 10**7) == 0.9999
    with pytest.raises(ValueError, match="EMA decay"):
        EMA(net, [1.0])


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown lr_schedule 'step'"):
        recorder_module(lr_schedule="step")
    with pytest.raises(ValueError, match="unknown beta schedule 'sigmoid'"):
        recorder_module(schedule="sigmoid")
    with pytest.raises(ValueError, match="unknown timestep sampler"):
        recorder_module(timestep_sampler="importance")
    with pytest.raises(ValueError, match="cannot be imported"):
        DiffusionModule(net={"class_path": "nowhere.Net"})


def test_short_training_on_digits_lowers_the_loss(tmp_path):
    L.seed_everything(0)
    module = DiffusionModule(net="tiny", image_size=8, in_channels=1, lr=2e-3, ema_decay=0.99, num_timesteps=100)
    losses = []

    class Collect(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(max_steps=120, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Collect()],
                        default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, DigitsDataModule(image_size=8, batch_size=32))
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.7 * first, (first, last)
    # the EMA moved towards the trained weights
    assert not torch.equal(next(module.ema.averages[0].parameters()), next(module.net.parameters()))


def test_state_dict_holds_the_network_once_plus_its_ema():
    m = DiffusionModule(net="tiny", image_size=16, in_channels=1, ema_decay=[0.999, 0.9999])
    state = m.state_dict()
    net_params = sum(p.numel() for p in m.net.parameters())
    assert sum(v.numel() for k, v in state.items() if k.startswith("net.")) == net_params
    assert {k.split(".")[0] for k in state} == {"net", "ema"}
    assert sum(v.numel() for v in state.values()) == 3 * net_params  # weights + two EMA copies
