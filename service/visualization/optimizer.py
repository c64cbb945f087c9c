"""Activation maximisation, one step at a time, on the first lane of the model's device.

The image is optimised in the model's normalised input space, x = (pixels - mean) / std, and kept within the range
that [0, 1] pixels map to. Each step: roll the image by a random jitter, run the model, and take an Adam step that
increases `objective - l2_weight * mean(x^2) - tv_weight * TV(x)`; every `blur_every` steps the image is blurred.
The model's own parameters are never touched (they do not require gradients); only the image is optimised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from service.visualization.objective import BoundObjective, Objective


@dataclass(frozen=True)
class OptimizationSettings:
    steps: int
    lr: float
    l2_weight: float
    tv_weight: float
    jitter: int
    blur_every: int | None
    blur_sigma: float
    seed: int
    height: int
    width: int


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between vertically and horizontally neighbouring pixels."""
    dy = (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() if x.shape[-2] > 1 else x.new_zeros(())
    dx = (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean() if x.shape[-1] > 1 else x.new_zeros(())
    return dy + dx


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, C, H, W) blurred by torchvision's Gaussian (reflect padding), truncated at ceil(3 sigma) pixels but at
    most one pixel less than the image's smaller side (reflect padding needs the radius below the size); run as
    two 1-D passes (kernel_size is [width, height]: [k, 1] along rows, then [1, k] along columns) rather than one
    k x k kernel."""
    radius = min(max(1, math.ceil(3 * sigma)), x.shape[-1] - 1, x.shape[-2] - 1)
    if radius < 1:
        return x
    size = 2 * radius + 1
    x = TF.gaussian_blur(x, kernel_size=[size, 1], sigma=[sigma, sigma])
    return TF.gaussian_blur(x, kernel_size=[1, size], sigma=[sigma, sigma])


class ActivationMaximizer:
    """The image, its Adam state and the jitter RNG of one job. Every method runs on the device's first lane."""

    def __init__(
        self,
        module: nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        objective: Objective,
        settings: OptimizationSettings,
    ) -> None:
        self.module = module
        self.device = device
        self.dtype = dtype
        self.mean = mean
        self.std = std
        self.objective = objective
        self.settings = settings
        self.steps_done = 0
        self._bound: BoundObjective | None = None
        self._x: torch.Tensor | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._rng = torch.Generator().manual_seed(settings.seed)

    def _channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        return mean, std

    def _start(self) -> None:
        s = self.settings
        mean, std = self._channel_stats()
        self._low, self._high = (0.0 - mean) / std, (1.0 - mean) / std
        noise = torch.randn((1, len(self.mean), s.height, s.width), generator=self._rng)
        pixels = (0.5 + 0.05 * noise).clamp(0.0, 1.0).to(self.device)
        self._x = ((pixels - mean) / std).requires_grad_(True)
        self._optimizer = torch.optim.Adam([self._x], lr=s.lr)
        self._bound = self.objective.bind(self.module)

    def _jittered(self, x: torch.Tensor) -> torch.Tensor:
        j = self.settings.jitter
        if j == 0:
            return x
        dy, dx = torch.randint(-j, j + 1, (2,), generator=self._rng).tolist()
        return torch.roll(x, shifts=(dy, dx), dims=(2, 3))

    def step(self) -> float:
        """One optimisation step; returns the objective measured on this step's (jittered) input."""
        if self._x is None:
            self._start()
        assert self._x is not None and self._optimizer is not None and self._bound is not None
        s = self.settings
        x = self._x
        with torch.enable_grad():
            value = self._bound(self._jittered(x).to(self.dtype))
            total = value - s.l2_weight * x.pow(2).mean() - s.tv_weight * total_variation(x)
            (grad,) = torch.autograd.grad(-total, [x])
        x.grad = grad
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        with torch.no_grad():
            if s.blur_every is not None and self.steps_done % s.blur_every == 0:
                x.copy_(gaussian_blur(x, s.blur_sigma))
            x.copy_(torch.maximum(torch.minimum(x, self._high), self._low))
        return float(value.detach())

    def finish(self) -> tuple[np.ndarray, float]:
        """The image as uint8 (H, W, C) pixels and its objective without jitter."""
        if self._x is None:
            self._start()
        assert self._x is not None and self._bound is not None
        with torch.inference_mode():
            x = self._x.detach()
            final = float(self._bound(x.to(self.dtype)))
            mean, std = self._channel_stats()
            pixels = (x * std + mean).clamp(0.0, 1.0)[0]
            image = (pixels * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return image, final
