"""DiffusionModule: the Lightning system that trains a network under a GaussianDiffusion."""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import lightning as L
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ddpm_lightning.accel import CompiledCall, FastForward, TrainStep
from ddpm_lightning.accel.compile import (TRAINING_INDUCTOR_OPTIONS, check_compile_mode, check_compile_tuning,
                                          inductor_options)
from ddpm_lightning.accel.fast_forward import autocast_dtype
from ddpm_lightning.diffusion import (
    GaussianDiffusion,
    LossSecondMomentResampler,
    create_named_schedule_sampler,
    get_named_beta_schedule,
    rescale_zero_terminal_snr,
)
from ddpm_lightning.ema import EMA
from ddpm_lightning.nets import NetworkWrapper, build_network
from ddpm_lightning.nonfinite import NonFiniteGuard
from ddpm_lightning.quartiles import QuartileLog

LR_SCHEDULES = ("constant", "cosine")


class TimestepRescaler(NetworkWrapper):
    """Feeds the network t * 1000 / T when T != 1000 (improved-diffusion's rescale_timesteps).

    Networks are trained and released on the 0..1000 range; iDDPM's T = 4000 weights expect it.
    """

    def __init__(self, net: torch.nn.Module, num_timesteps: int, class_cond: bool):
        self.net = net
        self.scale = 1000.0 / num_timesteps
        self.class_cond = class_cond

    def __call__(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        t = t.float() * self.scale if self.scale != 1.0 else t
        return self.net(x, t, y) if self.class_cond else self.net(x, t)


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
        grad_clip: clip gradients to this global L2 norm (DDPM: 1.0); the same as Lightning's
            trainer.gradient_clip_val, which cuda_graph cannot use (set one of the two).
        channels_last: keep the network's weights and the training batches in NHWC memory format
            (faster convolutions on tensor-core GPUs).
        compile, compile_mode: on CUDA devices, torch.compile the network (training and sampling),
            block by block if the whole network fails to compile; compile_mode is torch.compile's mode.
            Sampling's seeded noise draws are compiled too (diffusion/seeded_noise.py).
        compile_tuning: with compile, tune each generated Triton kernel's block sizes by timing it at its
            first launch (inductor's coordinate-descent tuning): +10% sampling forwards on an H100, for about
            two minutes of one-off tuning per network and batch shape, cached by inductor on the machine. For
            long sampling runs (1000 steps, repeated evaluations); accel/compile.py has the numbers.
        cuda_graph: on one CUDA device, capture the whole training step (forward, backward,
            clipping, AdamW, EMA) as one CUDA graph and replay it, and replay sampling forwards
            from graphs. Uses manual optimization; needs nonfinite_loss="stop".
        sample_precision: autocast for sampling and evaluation forwards: "32", "bf16-mixed" or
            "16-mixed" (training precision is the Trainer's).
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
        grad_clip: Optional[float] = None,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: Optional[str] = None,
        compile_tuning: bool = False,
        cuda_graph: bool = False,
        sample_precision: str = "32",
    ):
        super().__init__()
        self.save_hyperparameters()
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
        self.nonfinite = NonFiniteGuard(nonfinite_loss)
        check_compile_mode(compile_mode)
        check_compile_tuning(compile, compile_tuning)
        autocast_dtype(sample_precision)
        if cuda_graph and nonfinite_loss == "skip":
            raise ValueError("nonfinite_loss='skip' decides on the host every step, which a CUDA graph cannot; "
                             "use nonfinite_loss='stop' with cuda_graph")
        if cuda_graph and compile_mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"compile_mode={compile_mode!r} makes its own CUDA graphs; with cuda_graph use "
                             "compile_mode 'default' or 'max-autotune-no-cudagraphs'")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 (or null for no clipping), got {grad_clip}")
        # The captured step runs backward, clipping and the optimizer itself.
        self.automatic_optimization = not cuda_graph
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
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        decays = [ema_decay] if isinstance(ema_decay, (int, float)) else list(ema_decay)
        self.ema = EMA(self.net, decays, warmup=ema_warmup)
        self.model = TimestepRescaler(self.net, num_timesteps, class_cond)
        self.quartiles = QuartileLog(num_timesteps)
        self._train_step: Optional[TrainStep] = None
        self._fast_nets: dict[int, FastForward] = {}

    # ----------------------------------------------------------------- forward
    def forward(self, x_t: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """The network's prediction at original timestep indices t (trained weights)."""
        return self.model(x_t, t, y)

    def eval_model(self, use_ema: Optional[bool] = None, ema_index: int = 0) -> TimestepRescaler:
        """The network used for sampling and evaluation: the EMA weights unless told otherwise."""
        use_ema = self.hparams.use_ema_for_eval if use_ema is None else use_ema
        net = self.ema.averages[ema_index] if use_ema else self.net
        return TimestepRescaler(self._fast(net), self.hparams.num_timesteps, self.hparams.class_cond)

    def _fast(self, net: torch.nn.Module):
        """net itself, or a cached FastForward of it when compile, cuda_graph or sample_precision ask for one."""
        hp = self.hparams
        if not (hp.compile or hp.cuda_graph or hp.sample_precision != "32"):
            return net
        fast = self._fast_nets.get(id(net))
        if fast is None:
            fast = self._fast_nets[id(net)] = FastForward(net, hp.sample_precision, hp.compile, hp.compile_mode,
                                                          hp.cuda_graph, inductor_options(None, hp.compile_tuning))
        else:
            fast.sync_weights()  # the weights may have trained (or averaged) on since the last sampling run
        return fast

    def set_sampling_options(self, precision: Optional[str] = None, compile: Optional[bool] = None,
                             cuda_graph: Optional[bool] = None, compile_tuning: Optional[bool] = None) -> None:
        """Override the sampling fast paths a checkpoint recorded (None keeps its value), e.g. fp32 for FID."""
        if precision is not None:
            autocast_dtype(precision)
            self.hparams.sample_precision = precision
        if compile is not None:
            self.hparams.compile = compile
        if compile_tuning is not None:
            check_compile_tuning(self.hparams.compile, compile_tuning)
            self.hparams.compile_tuning = compile_tuning
        elif not self.hparams.compile:
            self.hparams.compile_tuning = False  # nothing compiled, nothing to tune
        if cuda_graph is not None:
            self.hparams.cuda_graph = cuda_graph
        self._fast_nets.clear()

    # ---------------------------------------------------------------- training
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x_start, y = batch
        if self.hparams.channels_last:
            x_start = x_start.contiguous(memory_format=torch.channels_last)
        t, weights = self.timestep_sampler.sample(x_start.shape[0], x_start.device)
        if self.hparams.cuda_graph:
            return self._graphed_training_step(x_start, y, t, weights)
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

        self._after_step(loss, losses, t, weights)
        return loss

    def _graphed_training_step(self, x_start: Tensor, y: Tensor, t: Tensor, weights: Tensor) -> Tensor:
        """The whole step (forward, backward, clipping, AdamW, EMA) through TrainStep, then the bookkeeping."""
        optimizer = self.optimizers()
        if self._train_step is None:
            self._train_step = self._make_train_step(optimizer.optimizer)
        step = self.global_step
        optimizer._on_before_step()  # Lightning counts optimizer steps (global_step) through these
        # The EMA warmup counts the steps before this one, as the update in optimizer_step does.
        out = self._train_step(x_start, y, t, weights, ema_updates=step)
        optimizer._on_after_step()
        self.lr_schedulers().step()
        if self.nonfinite.policy == "stop":
            self.nonfinite.record(out["total"], step)
        losses = {name: value for name, value in out.items() if name != "total"}
        if isinstance(self.timestep_sampler, LossSecondMomentResampler):
            self.timestep_sampler.update_with_local_losses(t, losses["loss"])
        self._after_step(out["total"], losses, t, weights)
        return out["total"].clone()

    def _make_train_step(self, optimizer: torch.optim.Optimizer) -> TrainStep:
        # One device only: DDP's gradient all-reduce hooks are not captured. Several devices (or the
        # CPU) run the same step uncaptured, so one config serves every machine.
        if self._loss_scaled():
            raise ValueError("cuda_graph does not apply fp16 loss scaling; use --trainer.precision=bf16-mixed or 32")
        capture = self.device.type == "cuda" and self.trainer.world_size == 1
        if not capture:
            reason = "no CUDA device" if self.device.type != "cuda" else f"{self.trainer.world_size} processes"
            rank_zero_warn(f"cuda_graph: {reason}, so the training step runs without a graph")
        # Held weights take autograd's gradients in place of the float32 parameters, where a DDP wrapper (even
        # of one process) waits for them.
        hold_weights = isinstance(self.trainer.strategy, SingleDeviceStrategy)
        return TrainStep(self, optimizer, capture=capture, hold_weights=hold_weights)

    def _after_step(self, loss: Tensor, losses: dict[str, Tensor], t: Tensor, weights: Tensor) -> None:
        """Quartile sums on the device every step; means logged (one host sync) at the log interval."""
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

    def _should_log(self) -> bool:
        trainer = self._trainer
        every = trainer.log_every_n_steps if trainer is not None else 50
        return (self.global_step + 1) % max(every, 1) == 0

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if self.hparams.grad_clip and gradient_clip_val:
            raise ValueError("gradient clipping is set twice (trainer.gradient_clip_val and model.grad_clip); "
                             "keep model.grad_clip")
        clip = self.hparams.grad_clip or gradient_clip_val
        if not clip:
            return
        if gradient_clip_algorithm not in (None, "norm") or self._loss_scaled():
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm=gradient_clip_algorithm)
            return
        # Lightning refuses to clip for a fused optimizer under any mixed precision, a guard meant for
        # 16-bit loss scaling; without a loss scale (fp32, bf16) the gradients are true ones and the
        # clip by global norm is exactly Lightning's: the optimizer's parameters, group by group.
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], clip)

    def _loss_scaled(self) -> bool:
        """Whether the Trainer scales the loss (16-bit mixed precision), which fused AdamW cannot be clipped under."""
        return self._trainer is not None and str(self._trainer.precision).startswith("16")

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
        # Under 16-bit loss scaling Lightning clips only non-fused optimizers (it unscales them first).
        fused = fused and not (self._loss_scaled() and (hp.grad_clip or self._trainer.gradient_clip_val))
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

    def on_fit_start(self) -> None:
        # Compiled once on its device, after the EMA copies were made (they compile, if at all, for sampling).
        if self.hparams.compile and not isinstance(self.model.net, CompiledCall):
            if self.device.type == "cuda":
                self.model.net = CompiledCall(self.net, self.hparams.compile_mode, self.training_inductor_options())
            else:
                rank_zero_warn(f"compile: applies on CUDA devices only; training on {self.device.type} runs eagerly")

    def training_inductor_options(self) -> dict[str, Any]:
        """Inductor's settings for compiling the training network (accel/compile.py)."""
        return inductor_options(TRAINING_INDUCTOR_OPTIONS, self.hparams.compile_tuning)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["timestep_sampler"] = self.timestep_sampler.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "timestep_sampler" in checkpoint:
            self.timestep_sampler.load_state_dict(checkpoint["timestep_sampler"])

    def _model_kwargs(self, y: Optional[Tensor]) -> Optional[dict]:
        return {"y": y} if self.hparams.class_cond else None
