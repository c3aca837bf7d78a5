"""The Gaussian diffusion process: q, its posterior, p_theta, training losses and bits/dim.

The semantics and numbers follow openai/improved-diffusion (Nichol & Dhariwal 2021), which extends
Ho et al. (2020). The object never owns the network: every method takes `model` as an argument, a
callable model(x_t, t, **model_kwargs) where t is a LongTensor of *original* timestep indices.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from . import samplers
from .likelihood import discretized_gaussian_log_likelihood, mean_flat, normal_kl

MEAN_TYPES = ("epsilon", "start_x", "previous_x", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")
LEARNED_VAR_TYPES = ("learned", "learned_range")
LN2 = float(np.log(2.0))


def check_option(kind: str, value: str, valid: Sequence[str]) -> str:
    """Validate a named option once, with an error that lists the valid names."""
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")
    return value


def extract(arr: np.ndarray | Tensor, t: Tensor, x: Tensor) -> Tensor:
    """arr[t] on x's device and dtype, shaped [N, 1, ..., 1] to broadcast against x.

    Gathering happens in float64 and the cast comes last, so values equal the float64 numbers
    rounded once (as improved-diffusion's `.float()` does).
    """
    arr = torch.as_tensor(arr, device=t.device)
    dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    return arr[t].to(device=x.device, dtype=dtype).reshape(-1, *([1] * (x.ndim - 1)))


class GaussianDiffusion:
    """Diffusion utilities for one beta schedule (Ho et al. 2020; Nichol & Dhariwal 2021).

    betas: float64 [T]. mean_type: what the model predicts ("epsilon", "start_x", "previous_x",
    "v"). var_type: "fixed_small" (posterior variance), "fixed_large" (beta_t), "learned" (log
    variance) or "learned_range" (Nichol & Dhariwal eq. 15). loss_type: "mse" (L_simple, or
    L_hybrid with a learned variance), "rescaled_mse" (vb term times T/1000), "kl" (L_vlb),
    "rescaled_kl" (L_vlb times T).
    """

    def __init__(
        self,
        *,
        betas: Sequence[float] | np.ndarray,
        mean_type: str = "epsilon",
        var_type: str = "fixed_small",
        loss_type: str = "mse",
        timestep_map: Optional[Sequence[int]] = None,
        original_num_timesteps: Optional[int] = None,
    ):
        self.mean_type = check_option("mean_type", mean_type, MEAN_TYPES)
        self.var_type = check_option("var_type", var_type, VAR_TYPES)
        self.loss_type = check_option("loss_type", loss_type, LOSS_TYPES)

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(len(betas))
        # Indices into the original process; the identity unless this process was respaced.
        self.timestep_map = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map, dtype=np.int64)
        if len(self.timestep_map) != self.num_timesteps:
            raise ValueError("timestep_map must have one entry per beta")
        self._respaced = not np.array_equal(self.timestep_map, np.arange(self.num_timesteps))
        # T of the process this one was respaced from: networks are conditioned on its indices.
        self.original_num_timesteps = int(original_num_timesteps or self.num_timesteps)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        # Zero terminal SNR (Lin et al. 2023) makes 1/alpha_bar infinite at the last step.
        self.zero_terminal_snr = bool(self.alphas_cumprod[-1] == 0.0)
        if self.zero_terminal_snr and mean_type == "epsilon":
            raise ValueError(
                "a zero-terminal-SNR schedule cannot recover x_0 from epsilon at the last step; "
                "use mean_type 'v' or 'start_x'"
            )

        # q(x_t | x_0), Ho et al. eq. 4
        with np.errstate(divide="ignore"):
            self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
            self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
            self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
            self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
            self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
            self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0), Ho et al. eqs. 6-7
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0, so its log is clipped to the value at t = 1.
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        # eq. 7 solved for x_0, for mean_type "previous_x"
        self.recip_posterior_mean_coef1 = 1.0 / self.posterior_mean_coef1
        self.posterior_mean_coef2_over_coef1 = self.posterior_mean_coef2 / self.posterior_mean_coef1

        # "fixed_large" uses beta_t, but the posterior variance at t = 0 for a better decoder NLL.
        self.fixed_large_variance = np.append(first, betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self.log_betas = np.log(betas)
        self._device_cache: dict[tuple[str, torch.device], Tensor] = {}

    # ------------------------------------------------------------------ helpers
    def _coef(self, name: str, t: Tensor, x: Tensor) -> Tensor:
        """A precomputed float64 array, kept on t's device once, gathered at t for x."""
        key = (name, t.device)
        arr = self._device_cache.get(key)
        if arr is None:
            # MPS has no float64; everything else keeps full precision until the gather.
            dtype = torch.float32 if t.device.type == "mps" else torch.float64
            arr = torch.as_tensor(getattr(self, name), dtype=dtype, device=t.device)
            self._device_cache[key] = arr
        return extract(arr, t, x)

    def _check_t(self, t: Tensor, x: Tensor) -> None:
        if not isinstance(t, Tensor) or t.dtype.is_floating_point or t.ndim != 1:
            raise ValueError("t must be a 1-D integer tensor of timestep indices")
        if t.shape[0] != x.shape[0]:
            raise ValueError(f"t has {t.shape[0]} entries but the batch has {x.shape[0]}")
        # A range check needs the values on the host: free on the CPU, a sync elsewhere, where
        # t comes from our own samplers anyway.
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(
                f"t out of range: got values in [{int(t.min())}, {int(t.max())}], "
                f"valid [0, {self.num_timesteps - 1}]"
            )

    def original_timesteps(self, t: Tensor) -> Tensor:
        """Map indices into this (possibly respaced) process to the original process's indices."""
        if not self._respaced:
            return t
        key = ("timestep_map", t.device)
        table = self._device_cache.get(key)
        if table is None:
            table = torch.as_tensor(self.timestep_map, dtype=torch.long, device=t.device)
            self._device_cache[key] = table
        return table[t]

    def _run_model(self, model: Callable, x: Tensor, t: Tensor, model_kwargs: Optional[dict]) -> Tensor:
        """Call the model with original timestep indices and check its channel count."""
        out = model(x, self.original_timesteps(t), **(model_kwargs or {}))
        channels = x.shape[1] * (2 if self.var_type in LEARNED_VAR_TYPES else 1)
        if out.shape != (x.shape[0], channels, *x.shape[2:]):
            need = f"2 x {x.shape[1]} channels ([mean, variance])" if channels != x.shape[1] else f"{channels} channels"
            raise ValueError(
                f"model output has shape {tuple(out.shape)}; var_type {self.var_type!r} needs "
                f"{need} for input {tuple(x.shape)}"
            )
        return out

    # -------------------------------------------------------------- forward q
    def q_mean_variance(self, x_start: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0) (Ho et al. eq. 4); each [N, ...]."""
        mean = self._coef("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._coef("one_minus_alphas_cumprod", t, x_start).expand_as(x_start)
        log_variance = self._coef("log_one_minus_alphas_cumprod", t, x_start).expand_as(x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Optional[Tensor] = None) -> Tensor:
        """Sample x_t ~ q(x_t | x_0) (Ho et al. eq. 4). x_start, noise: [N, ...]; t: [N]."""
        self._check_t(t, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (
            self._coef("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._coef("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. eqs. 6-7)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {tuple(x_start.shape)} != x_t shape {tuple(x_t.shape)}")
        self._check_t(t, x_t)
        mean = self._coef("posterior_mean_coef1", t, x_t) * x_start + self._coef("posterior_mean_coef2", t, x_t) * x_t
        variance = self._coef("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._coef("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------- reverse p
    def p_mean_variance(
        self,
        model: Callable,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[Tensor], Tensor]] = None,
        model_kwargs: Optional[dict] = None,
    ) -> dict[str, Tensor]:
        """p_theta(x_{t-1} | x_t): "mean", "variance", "log_variance" and "pred_xstart", each [N, ...].

        x: [N, C, ...] at step t ([N]). Learned variances follow Nichol & Dhariwal eq. 15.
        """
        self._check_t(t, x)
        model_output = self._run_model(model, x, t, model_kwargs)
        C = x.shape[1]
        if self.var_type in LEARNED_VAR_TYPES:
            model_output, var_values = torch.split(model_output, C, dim=1)
            if self.var_type == "learned":
                log_variance = var_values
            else:
                # var_values in [-1, 1] interpolates between beta~_t and beta_t in the log domain.
                min_log = self._coef("posterior_log_variance_clipped", t, x)
                max_log = self._coef("log_betas", t, x)
                frac = (var_values + 1) / 2
                log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            name = "fixed_large" if self.var_type == "fixed_large" else "posterior"
            variance = self._coef(f"{name}_variance", t, x).expand_as(x)
            log_name = "fixed_large_log_variance" if name == "fixed_large" else "posterior_log_variance_clipped"
            log_variance = self._coef(log_name, t, x).expand_as(x)

        def process_xstart(pred: Tensor) -> Tensor:
            if denoised_fn is not None:
                pred = denoised_fn(pred)
            return pred.clamp(-1, 1) if clip_denoised else pred

        if self.mean_type == "previous_x":
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x, t, model_output))
            mean = model_output
        else:
            if self.mean_type == "start_x":
                pred_xstart = process_xstart(model_output)
            elif self.mean_type == "epsilon":
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, model_output))
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_v(x, t, model_output))
            mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def _predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        # Ho et al. eq. 4 solved for x_0.
        return self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._coef("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def _predict_xstart_from_xprev(self, x_t: Tensor, t: Tensor, xprev: Tensor) -> Tensor:
        # Ho et al. eq. 7 solved for x_0: (xprev - coef2 * x_t) / coef1.
        return (self._coef("recip_posterior_mean_coef1", t, x_t) * xprev
                - self._coef("posterior_mean_coef2_over_coef1", t, x_t) * x_t)

    def _predict_xstart_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        # v = sqrt(a) eps - sqrt(1-a) x_0  =>  x_0 = sqrt(a) x_t - sqrt(1-a) v  (Salimans & Ho 2022)
        return self._coef("sqrt_alphas_cumprod", t, x_t) * x_t - self._coef("sqrt_one_minus_alphas_cumprod", t, x_t) * v

    def _predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        if self.zero_terminal_snr:
            # The form below is inf/inf at alpha_bar = 0; this one is finite everywhere.
            return (x_t - self._coef("sqrt_alphas_cumprod", t, x_t) * pred_xstart) / self._coef(
                "sqrt_one_minus_alphas_cumprod", t, x_t
            )
        return (self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart) / self._coef(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    def v_target(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """The v-prediction target sqrt(a) eps - sqrt(1-a) x_0 (Salimans & Ho 2022, sec. 4)."""
        return self._coef("sqrt_alphas_cumprod", t, x_start) * noise - self._coef(
            "sqrt_one_minus_alphas_cumprod", t, x_start
        ) * x_start

    # ------------------------------------------------------------------ losses
    def _vb_terms_bpd(
        self, model: Callable, x_start: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = True,
        model_kwargs: Optional[dict] = None,
    ) -> dict[str, Tensor]:
        """One term of L_vlb in bits/dim: L_{t-1} = KL(q || p) for t > 0, the decoder NLL L_0 at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / LN2
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / LN2
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self, model: Callable, x_start: Tensor, t: Tensor, noise: Optional[Tensor] = None,
        model_kwargs: Optional[dict] = None,
    ) -> dict[str, Tensor]:
        """Per-sample training losses [N]: "loss", plus "mse" and "vb" where they apply.

        L_simple (Ho et al. eq. 14), L_hybrid = L_simple + lambda L_vlb with the mean detached in
        the vb term (Nichol & Dhariwal sec. 3.1), or L_vlb itself for the kl loss types.
        """
        self._check_t(t, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms: dict[str, Tensor] = {}

        if self.loss_type in ("kl", "rescaled_kl"):
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)["output"]
            if self.loss_type == "rescaled_kl":
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = self._run_model(model, x_t, t, model_kwargs)
        if self.var_type in LEARNED_VAR_TYPES:
            model_output, var_values = torch.split(model_output, x_t.shape[1], dim=1)
            # The vb term trains only the variance: the mean is frozen so L_simple alone drives it.
            frozen_out = torch.cat([model_output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(
                lambda *args, r=frozen_out, **kwargs: r, x_start, x_t, t, clip_denoised=False
            )["output"]
            if self.loss_type == "rescaled_mse":
                # lambda = T/1000: improved-diffusion's scale, so the vb term does not swamp mse.
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        if self.mean_type == "previous_x":
            target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
        elif self.mean_type == "start_x":
            target = x_start
        elif self.mean_type == "epsilon":
            target = noise
        else:
            target = self.v_target(x_start, t, noise)
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    # -------------------------------------------------------------- bits/dim
    def _prior_bpd(self, x_start: Tensor) -> Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits/dim, [N]: the term L_T no model can change."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x_start.device)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(qt_mean, qt_log_variance, 0.0, 0.0)) / LN2

    @torch.no_grad()
    def calc_bpd_loop(
        self, model: Callable, x_start: Tensor, clip_denoised: bool = True,
        model_kwargs: Optional[dict] = None, progress: bool = False,
    ) -> dict[str, Tensor]:
        """The full variational bound in bits/dim (Ho et al. eq. 5), one Monte-Carlo x_t per step.

        Returns "total_bpd" and "prior_bpd" [N], and "vb", "xstart_mse", "mse" [N, T].
        """
        vb, xstart_mse, mse = [], [], []
        steps = samplers.progress_iter(list(range(self.num_timesteps))[::-1], progress, "bits/dim")
        for i in steps:
            t = torch.full((x_start.shape[0],), i, dtype=torch.long, device=x_start.device)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start, t, noise=noise)
            out = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb_t = torch.stack(vb, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb_t.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb_t,
            "xstart_mse": torch.stack(xstart_mse, dim=1),
            "mse": torch.stack(mse, dim=1),
        }

    # --------------------------------------------------------------- sampling
    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, skip_fraction=0.0,
                      progress=False, generator=None, model_kwargs=None, device=None) -> Tensor:
        """Ancestral sampling, Algorithm 2 of Ho et al. (2020). See samplers.p_sample_loop."""
        return samplers.p_sample_loop(self, model, shape, noise=noise, clip_denoised=clip_denoised,
                                      skip_fraction=skip_fraction, progress=progress, generator=generator,
                                      model_kwargs=model_kwargs, device=device)

    def ddim_sample_loop(self, model, shape, noise=None, eta=0.0, clip_denoised=True, skip_fraction=0.0,
                         progress=False, generator=None, model_kwargs=None, device=None) -> Tensor:
        """DDIM sampling with eta (Song et al. 2021, eq. 12). See samplers.ddim_sample_loop."""
        return samplers.ddim_sample_loop(self, model, shape, noise=noise, eta=eta, clip_denoised=clip_denoised,
                                         skip_fraction=skip_fraction, progress=progress, generator=generator,
                                         model_kwargs=model_kwargs, device=device)

    # --------------------------------------------------------------- respacing
    def respace(self, timesteps) -> "GaussianDiffusion":
        """A process over the kept steps only (Nichol & Dhariwal sec. 4; improved-diffusion respace.py).

        timesteps: indices into this process (a set, list, or a space_timesteps string). Betas are
        rebuilt from the kept cumulative alphas, beta'_i = 1 - alpha_bar(kept i) / alpha_bar(kept i-1);
        the new process's methods take indices into the kept steps and call the model with the
        original indices.
        """
        from .respace import space_timesteps

        if isinstance(timesteps, (str, int)):
            timesteps = space_timesteps(self.num_timesteps, timesteps)
        kept = sorted({int(i) for i in timesteps})
        if not kept or kept[0] < 0 or kept[-1] >= self.num_timesteps:
            raise ValueError(f"respace: timesteps must be a non-empty subset of [0, {self.num_timesteps - 1}]")
        kept_alphas_cumprod = self.alphas_cumprod[kept]
        betas = 1.0 - kept_alphas_cumprod / np.append(1.0, kept_alphas_cumprod[:-1])
        return GaussianDiffusion(
            betas=betas, mean_type=self.mean_type, var_type=self.var_type, loss_type=self.loss_type,
            timestep_map=self.timestep_map[kept], original_num_timesteps=self.original_num_timesteps,
        )

    def __repr__(self) -> str:
        return (f"GaussianDiffusion(T={self.num_timesteps}, mean_type={self.mean_type!r}, "
                f"var_type={self.var_type!r}, loss_type={self.loss_type!r})")
