"""Integrated gradients (Sundararajan et al. 2017): (input - baseline) times the target logit's gradient averaged
along the straight path from the baseline to the input."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torchvision.transforms.v2 import functional as TF

from service.explain.captures import CaptureBatch, CaptureNeeds, ModelRunner
from service.model.anatomy import ModelAnatomy
from service.explain.methods._input import (
    ATTRIBUTION_REDUCE_DESCRIPTION,
    INPUT_RESOLUTION_NOTE,
    AttributionReduce,
    chunk_segments,
    reduce_attribution,
    seeded_generator,
)
from service.explain.registry import CostContext, CostEstimate, MethodCost, MethodOutput, register_method

MAX_STEPS = 512
Integration = Literal["riemann_trapezoid", "gausslegendre"]


class IntegratedGradientsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=32, ge=2, le=MAX_STEPS, description="Points on the path where the gradient is taken.")
    integration: Integration = Field(
        default="gausslegendre",
        description="Quadrature along the path (Captum's names): `gausslegendre` (Gauss-Legendre nodes and weights "
        "on [0, 1]) or `riemann_trapezoid` (the trapezoid rule on `steps` equally spaced points including both ends; "
        "its weights sum to 1, where Captum's use 1/steps with halved ends, i.e. Captum's attributions times "
        "(steps - 1) / steps).",
    )
    baseline: Literal["black", "blur", "noise", "mean"] = Field(
        default="black",
        description="`black`: an all-black image (normalised with the model's mean and std); `blur`: the image "
        "blurred with a Gaussian of `blur_sigma`; `noise`: uniform noise between each channel's min and max of the "
        "image (seeded by `seed`); `mean`: the image's per-channel mean colour.",
    )
    blur_sigma: float = Field(
        default=10.0, gt=0.0, le=64.0, description="Standard deviation in input pixels of the `blur` baseline."
    )
    seed: int = Field(default=0, ge=0, le=2**63 - 1, description="Seed of the `noise` baseline.")
    reduce: AttributionReduce = Field(default="sum", description=ATTRIBUTION_REDUCE_DESCRIPTION)


STEP_COST = 2.5  # forward passes' worth of one step (forward and backward, chunked)


def _cost(params: IntegratedGradientsParams, ctx: CostContext) -> CostEstimate:
    baseline = 1 if params.integration == "gausslegendre" else 0  # the baseline's own forward pass
    per_target = STEP_COST * params.steps + baseline
    return CostEstimate(per_target * ctx.targets,
                        f"({STEP_COST:g} x steps={params.steps} + {baseline}) x {ctx.targets} target(s)")


def path_points(steps: int, integration: Integration) -> tuple[list[float], list[float]]:
    """(alphas in [0, 1], quadrature weights summing to 1) for the integral over the path."""
    if integration == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return (0.5 * (1.0 + nodes)).tolist(), (0.5 * weights).tolist()
    alphas = torch.linspace(0, 1, steps).tolist()
    weights = [1.0 / (steps - 1)] * steps
    weights[0] /= 2
    weights[-1] /= 2
    return alphas, weights


def blur_baseline(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, C, H, W) blurred by torchvision's Gaussian truncated at 3 sigma, edges replicated (as
    scipy.ndimage.gaussian_filter with mode="nearest", truncate=3).

    torchvision pads by reflection, and by less than the image's size only. So each axis is first padded by the
    kernel radius with copies of its edge pixels, blurred alone (two 1-D passes, not one 2-D kernel), and cropped
    back: the reflected border never reaches the image's own pixels, and any sigma works on any image size."""
    radius = max(1, int(3.0 * sigma + 0.5))
    size = 2 * radius + 1  # torchvision's kernel_size is [width, height]
    wide = F.pad(pixels, (radius, radius, 0, 0), mode="replicate")
    rows_blurred = TF.gaussian_blur(wide, kernel_size=[size, 1], sigma=[sigma, sigma])[..., radius:-radius]
    tall = F.pad(rows_blurred, (0, 0, radius, radius), mode="replicate")
    return TF.gaussian_blur(tall, kernel_size=[1, size], sigma=[sigma, sigma])[..., radius:-radius, :]


def make_baselines(pixels: torch.Tensor, params: IntegratedGradientsParams, runner: ModelRunner) -> torch.Tensor:
    """One baseline per image, (B, C, H, W), computed from that image alone."""
    channels = pixels.shape[1]
    if params.baseline == "black":
        if runner.mean is None or runner.std is None:
            raise ValueError("the black baseline needs the model's normalisation mean and std")
        mean = torch.tensor(runner.mean, dtype=pixels.dtype, device=pixels.device).view(1, channels, 1, 1)
        std = torch.tensor(runner.std, dtype=pixels.dtype, device=pixels.device).view(1, channels, 1, 1)
        return ((0.0 - mean) / std).expand_as(pixels).clone()
    if params.baseline == "mean":
        return pixels.mean(dim=(2, 3), keepdim=True).expand_as(pixels).clone()
    if params.baseline == "blur":
        return blur_baseline(pixels, params.blur_sigma)
    low = pixels.amin(dim=(2, 3), keepdim=True)
    high = pixels.amax(dim=(2, 3), keepdim=True)
    uniform = torch.stack([
        torch.rand(pixels.shape[1:], generator=seeded_generator(params.seed, pixels.device), device=pixels.device)
        for _ in range(pixels.shape[0])
    ])
    return low + uniform * (high - low)


@register_method(
    name="integrated_gradients",
    description="Integrated gradients: (input - baseline) times the target logit's gradient integrated along the "
    "straight path from the baseline, reduced over the colour channels (signed sum by default). The completeness "
    "gap, sum of attributions - (f(input) - f(baseline)), is returned in the map statistics."
    + INPUT_RESOLUTION_NOTE,
    families=("vit", "cnn"),
    class_specific=True,
    params_model=IntegratedGradientsParams,
    needs=lambda params, anatomy: CaptureNeeds(),
    relative_cost=80.0,
    cost=MethodCost(_cost, f"({STEP_COST:g} x steps + 1 for gausslegendre) x targets"),
    cost_note="About 2.5 forward passes' worth (forward and backward) per step and target (80 at the default 32 "
    "steps), plus one forward pass of the baseline for gausslegendre; steps of all images run through the model "
    "together in chunks of the model's explain_chunk_size.",
)
def integrated_gradients(
    captures: CaptureBatch, params: IntegratedGradientsParams, anatomy: ModelAnatomy
) -> MethodOutput:
    runner, pixels, targets = captures.runner, captures.pixels, captures.targets
    assert runner is not None and targets is not None
    batch = pixels.shape[0]
    alphas, weights = path_points(params.steps, params.integration)
    alpha_t = torch.tensor(alphas, dtype=pixels.dtype, device=pixels.device).view(-1, 1, 1, 1)
    weight_t = torch.tensor(weights, dtype=pixels.dtype, device=pixels.device).view(-1, 1, 1, 1)
    baselines = make_baselines(pixels, params, runner)
    path = pixels - baselines
    total = torch.zeros_like(pixels)
    baseline_scores = torch.zeros(batch, dtype=torch.float32, device=pixels.device)
    for segments in chunk_segments([params.steps] * batch, runner.chunk_size):
        points = torch.cat([baselines[i] + alpha_t[first:stop] * path[i] for i, first, stop in segments])
        chunk_targets = torch.cat([targets[i].repeat(stop - first) for i, first, stop in segments])
        scores, grads = runner.input_gradients(points, chunk_targets)
        scores, grads = scores.to(pixels.device), grads.to(pixels.device)
        offset = 0
        for i, first, stop in segments:
            total[i] += (grads[offset:offset + stop - first] * weight_t[first:stop]).sum(dim=0)
            if first == 0:
                baseline_scores[i] = scores[offset]  # alpha 0 is the baseline itself (trapezoid)
            offset += stop - first
    if alphas[0] != 0.0:  # Gauss-Legendre nodes exclude the ends: the baseline needs its own forward pass
        baseline_scores = runner.logits(baselines).to(pixels.device).gather(1, targets[:, None])[:, 0]
    attributions = total * path
    input_scores = captures.logits.gather(1, targets[:, None].to(captures.logits.device))[:, 0].to(pixels.device)
    gaps = attributions.sum(dim=(1, 2, 3)) - (input_scores - baseline_scores)
    return MethodOutput(
        maps=reduce_attribution(attributions, params.reduce),
        statistics=tuple({"completeness_gap": float(gap)} for gap in gaps.cpu()),
    )
