"""Deterministic inputs and a closed-form stand-in network shared by the reference-value tests.

tests/data/improved_diffusion_reference.json holds what openai/improved-diffusion (commit
1bc7bbb, rescale_timesteps=False) returns for exactly these inputs; test_reference_values.py
checks that ddpm_lightning returns the same numbers.
"""

import torch

CASES = {
    "linear1000": ("linear", 1000, None),
    "cosine1000": ("cosine", 1000, None),
    "cosine4000_r100": ("cosine", 4000, "100"),
    "linear4000_ddim50": ("linear", 4000, "ddim50"),
}


class ReferenceNet(torch.nn.Module):
    """A smooth function of (x, t): enough to exercise every coefficient, no weights to store."""

    def __init__(self, learn_sigma: bool):
        super().__init__()
        self.learn_sigma = learn_sigma

    def forward(self, x, t):
        tt = t.float().reshape(-1, *([1] * (x.ndim - 1))) / 1000.0
        out = torch.sin(3 * x + tt)
        if self.learn_sigma:
            out = torch.cat([out, torch.tanh(2 * x - tt)], dim=1)
        return out


def reference_net(learn_sigma: bool) -> ReferenceNet:
    return ReferenceNet(learn_sigma)


def reference_inputs(num_timesteps: int):
    """x_0 on the 256-level grid, x_t, noise and t = [0, 1, K/2, K-1], all deterministic."""
    grid = torch.arange(4 * 3 * 4 * 4, dtype=torch.float32).reshape(4, 3, 4, 4)
    x0 = torch.round((torch.sin(grid * 0.37) + 1) * 127.5) / 127.5 - 1
    noise = torch.cos(grid * 0.91 + 0.3) * 1.3
    x_t = torch.sin(grid * 0.53 - 0.2) * 1.1
    t = torch.tensor([0, 1, num_timesteps // 2, num_timesteps - 1])
    return x0, x_t, noise, t
