"""A short tour of the diffusion core: schedules, respacing and the skip ablation's reason."""

import numpy as np

from ddpm_lightning.diffusion import GaussianDiffusion, get_named_beta_schedule, space_timesteps


def main() -> None:
    print("alpha_bar_t (signal kept) at fractions of T=1000:")
    print(f"{'schedule':>9} " + " ".join(f"{f:>8.0%}" for f in (0.1, 0.25, 0.5, 0.8, 1.0)))
    for name in ("linear", "cosine"):
        ab = GaussianDiffusion(betas=get_named_beta_schedule(name, 1000)).alphas_cumprod
        print(f"{name:>9} " + " ".join(f"{ab[int(f * 1000) - 1]:8.4f}" for f in (0.1, 0.25, 0.5, 0.8, 1.0)))
    print("\nThe linear schedule has destroyed the signal by 80% of T; that is why skipping the first 20%")
    print("of the reverse process costs it nothing, while the cosine schedule still carries signal there.")
    for respacing in ("25", "ddim25", "trailing25"):
        steps = sorted(space_timesteps(1000, respacing))
        print(f"respacing {respacing!r:>13}: {steps[:5]} ... {steps[-2:]}")
    spaced = GaussianDiffusion(betas=get_named_beta_schedule("cosine", 1000)).respace("25")
    print(f"respaced cosine betas: first {spaced.betas[0]:.2e}, last {spaced.betas[-1]:.3f}, "
          f"sum log(1-beta) {np.log1p(-spaced.betas).sum():.2f}")


if __name__ == "__main__":
    main()
