"""DiffusionModule: the Lightning system that trains a network under a GaussianDiffusion."""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
import torch
from torch import Tensor

from ddpm_lightning.diffusion import (
    GaussianDiffusion,
    LossSecondMomentResampler,
    create_named_schedule_sampler,
    get_named_beta_schedule,
    rescale_zero_terminal_snr,
)
from ddpm_lightning.ema import EMA
from ddpm_lightning.nets import build_network
from ddpm_lightning.nonfinite import NonFiniteGuard
from ddpm_lightning.quartiles import QuartileLog

LR_SCHEDULES = ("constant", "cosine")


class TimestepRescaler:
    """Feeds the network t * 1000 / T when T != 1000 (improved-diffusion's rescale_timesteps).

    Networks are trained and released on the 0..1000 range; iDDPM's T = 4000 weights expect it.
    A plain wrapper, not an nn.Module, so the network's weights appear once in the state_dict.
    """

    def __init__(self, net: torch.nn.Module, num_timesteps: int, class_cond: bool):
        self.net = net
        self.scale = 1000.0 / num_timesteps
        self.class_cond = class_cond

    def __call__(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        t = t.float() * self.scale if self.scale != 1.0 else t
        return self.net(x, t, y) if self.class_cond else self.net(x, t)

    # The samplers and sample_images treat the wrapper like the network it wraps.
    def parameters(self):
        return self.net.parameters()

    @property
    def training(self) -> bool:
        return self.net.training

    def train(self, mode: bool = True) -> "TimestepRescaler":
        self.net.train(mode)
        return self

    def eval(self) -> "TimestepRescaler":
        return self.train(False)


class DiffusionModule(L.LightningModule):
    """Trains `net` on a diffusion objective, with EMA weights for sampling and evaluation.

    Args:
        net: a preset name of ddpm_lightning.models ("ddpm_cifar10", "iddpm_cifar10",
            "iddpm_imagenet64", "small", "tiny") or {"class_path": ..., "init_args": {...}}.
        net_overrides: network arguments that beat the preset's (e.g. {"dropout": 0.3}).
        image_size, in_channels, num_classes: the data's; the CLI links them from the DataModule.
        class_cond: condition the network on labels (needs num_classes).
        num_timesteps, schedule, zero_terminal_snr: the forward process (T, "linear" | "cosine").
        mean_type, var_type, loss_type: see GaussianDiffusion.
        timestep_sampler: "uniform" or "loss-second-moment" (importance sampling of t).
        lr, weight_decay, adam_betas: AdamW. warmup_steps: linear LR warmup (DDPM: 5000).
        lr_schedule: "constant" (the papers) or "cosine" decay to 0 over the run.
        ema_decay: one rate or a list; the first is used for sampling. ema_warmup: (1+n)/(10+n) cap.
        use_ema_for_eval: validate and sample with the EMA weights.
        val_bpd_batches: compute bits/dim (calc_bpd_loop, all T steps) on this many validation
            batches per validation run; 0 disables it.
        nonfinite_loss: on a NaN/Inf loss, "stop" (detected within one log interval, a checkpoint
            saved beside the good ones) or "skip" the batch (costs a host sync per step).
    """

    def __init__(
        self,
        net: Union[str, dict] = "small",
        net_overrides: Optional[dict[str, Any]] = None,
        image_size: int = 32,
        in_channels: int = 3,
        num_classes: Optional[int] = None,
        class_cond: bool = False,
        num_timesteps: int = 1000,
        schedule: str = "linear",
        zero_terminal_snr: bool = False,
        mean_type: str = "epsilon",
        var_type: str = "fixed_large",
        loss_type: str = "mse",
        timestep_sampler: str = "uniform",
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        ema_decay: Union[float, list[float]] = 0.9999,
        ema_warmup: bool = False,
        use_ema_for_eval: bool = True,
        val_bpd_batches: int = 0,
        nonfinite_loss: str = "stop",
    ):
        super().__init__()
        self.save_hyperparameters()
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
        self.nonfinite = NonFiniteGuard(nonfinite_loss)
        if class_cond and not num_classes:
            raise ValueError("class_cond=True needs num_classes (set by the DataModule or --model.num_classes)")
        betas = get_named_beta_schedule(schedule, num_timesteps)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.diffusion = GaussianDiffusion(betas=betas, mean_type=mean_type, var_type=var_type, loss_type=loss_type)
        self.timestep_sampler = create_named_schedule_sampler(timestep_sampler, num_timesteps)

        self.net = build_network(
            net, net_overrides, image_size=image_size, in_channels=in_channels,
            learn_sigma=var_type in ("learned", "learned_range"), num_classes=num_classes if class_cond else None,
        )
        self.model = TimestepRescaler(self.net, num_timesteps, class_cond)
        decays = [ema_decay] if isinstance(ema_decay, (int, float)) else list(ema_decay)
        self.ema = EMA(self.net, decays, warmup=ema_warmup)
        self.quartiles = QuartileLog(num_timesteps)

    # ----------------------------------------------------------------- forward
    def forward(self, x_t: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """The network's prediction at original timestep indices t (trained weights)."""
        return self.model(x_t, t, y)

    def eval_model(self, use_ema: Optional[bool] = None, ema_index: int = 0) -> TimestepRescaler:
        """The network used for sampling and evaluation: the EMA weights unless told otherwise."""
        use_ema = self.hparams.use_ema_for_eval if use_ema is None else use_ema
        net = self.ema.averages[ema_index] if use_ema else self.net
        return TimestepRescaler(net, self.hparams.num_timesteps, self.hparams.class_cond)

    # ---------------------------------------------------------------- training
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x_start, y = batch
        t, weights = self.timestep_sampler.sample(x_start.shape[0], x_start.device)
        losses = self.diffusion.training_losses(self.model, x_start, t, model_kwargs=self._model_kwargs(y))
        loss = (losses["loss"] * weights).mean()
        if self.nonfinite.policy == "skip" and self.nonfinite.should_skip(loss, self.trainer.strategy):
            self.nonfinite.skipped += 1
            rank_zero_warn(f"non-finite loss at step {self.global_step}: batch skipped "
                           f"({self.nonfinite.skipped} so far)")
            return None  # Lightning then skips backward and the optimizer step
        if self.nonfinite.policy == "stop":
            self.nonfinite.record(loss, self.global_step)
        if isinstance(self.timestep_sampler, LossSecondMomentResampler):
            self.timestep_sampler.update_with_local_losses(t, losses["loss"].detach())

        # Logged as improved-diffusion logs them: weighted by the importance weights.
        self.quartiles.update(t, {name: value * weights for name, value in losses.items()})
        if self._should_log():
            if self.nonfinite.policy == "stop":
                self.nonfinite.check(self.trainer)
            # The only host syncs of a step, and only at the log interval: this step's means (one
            # transfer, logged as floats so the progress bar never reads a device tensor) and the
            # per-quartile-of-t means since the last log (improved-diffusion's loss_q0..q3).
            names = [name for name in ("mse", "vb") if name in losses]
            values = torch.stack([loss.detach()] + [(losses[name] * weights).detach().mean() for name in names]).tolist()
            self.log("train/loss", values[0], prog_bar=True)
            for name, value in zip(names, values[1:]):
                self.log(f"train/{name}", value)
            reduce_sum = lambda x: self.trainer.strategy.reduce(x, reduce_op="sum")
            for key, value in self.quartiles.compute_and_reset(reduce_sum).items():
                self.log(f"train/{key}", value)
        return loss

    def _should_log(self) -> bool:
        trainer = self._trainer
        every = trainer.log_every_n_steps if trainer is not None else 50
        return (self.global_step + 1) % max(every, 1) == 0

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # After the weights changed: EMA of the post-step weights, as improved-diffusion does.
        self.ema.update(self.net, self.global_step)

    # -------------------------------------------------------------- validation
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x_start, y = batch
        # Fixed t and noise per batch, so the validation loss is comparable across runs.
        g = torch.Generator(device="cpu").manual_seed(batch_idx)
        t = torch.randint(0, self.diffusion.num_timesteps, (x_start.shape[0],), generator=g).to(self.device)
        noise = torch.randn(x_start.shape, generator=g).to(self.device, x_start.dtype)
        model = self.eval_model()
        losses = self.diffusion.training_losses(model, x_start, t, noise=noise, model_kwargs=self._model_kwargs(y))
        for name, value in losses.items():
            self.log(f"val/{name}", value.mean(), sync_dist=True)
        if batch_idx < self.hparams.val_bpd_batches:
            bpd = self.diffusion.calc_bpd_loop(model, x_start, model_kwargs=self._model_kwargs(y))
            self.log("val/bpd", bpd["total_bpd"].mean(), sync_dist=True)
            self.log("val/prior_bpd", bpd["prior_bpd"].mean(), sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """bits/dim on the test split (the papers' NLL tables)."""
        x_start, y = batch
        bpd = self.diffusion.calc_bpd_loop(self.eval_model(), x_start, model_kwargs=self._model_kwargs(y))
        self.log("test/bpd", bpd["total_bpd"].mean(), sync_dist=True)

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self, num_samples: int, respacing: Optional[str] = None, sampler: str = "ddpm", eta: float = 0.0,
        skip_fraction: float = 0.0, use_ema: Optional[bool] = None, generator=None, noise: Optional[Tensor] = None,
        y: Optional[Tensor] = None, clip_denoised: bool = True, progress: bool = False,
    ) -> Tensor:
        """Images in [-1, 1], [num_samples, C, H, W], from the (EMA) network."""
        from ddpm_lightning.sampling import sample_images

        return sample_images(self, num_samples, respacing=respacing, sampler=sampler, eta=eta,
                             skip_fraction=skip_fraction, use_ema=use_ema, generator=generator, noise=noise,
                             y=y, clip_denoised=clip_denoised, progress=progress)

    # ------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        fused = self.device.type == "cuda" or all(p.is_cuda for p in self.net.parameters())
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=hp.lr, betas=tuple(hp.adam_betas),
                                      weight_decay=hp.weight_decay, fused=fused or None)
        total = self._trainer.estimated_stepping_batches if self._trainer is not None else 0

        def factor(step: int) -> float:
            warm = min(1.0, (step + 1) / hp.warmup_steps) if hp.warmup_steps > 0 else 1.0
            if hp.lr_schedule == "cosine" and total and math.isfinite(total):
                warm *= 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
            return warm

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- hooks
    def setup(self, stage: str) -> None:
        # seed_everything gives every DDP rank the same seed, hence the same t and noise for different
        # images; offsetting by rank keeps the ranks' draws independent (and still reproducible).
        if stage == "fit" and self.trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + 1_000_003 * self.trainer.global_rank)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["timestep_sampler"] = self.timestep_sampler.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "timestep_sampler" in checkpoint:
            self.timestep_sampler.load_state_dict(checkpoint["timestep_sampler"])

    def _model_kwargs(self, y: Optional[Tensor]) -> Optional[dict]:
        return {"y": y} if self.hparams.class_cond else None
