"""SmoothGrad (Smilkov et al. 2017): input gradients averaged over copies of the image with Gaussian noise added."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from service.explain.captures import CaptureBatch, CaptureNeeds
from service.model.anatomy import ModelAnatomy
from service.explain.methods._input import (
    INPUT_RESOLUTION_NOTE,
    MAGNITUDE_REDUCE_DESCRIPTION,
    MagnitudeReduce,
    chunk_segments,
    normal_noise,
    reduce_magnitude,
    seeded_generator,
)
from service.explain.registry import CostContext, CostEstimate, MethodCost, MethodOutput, register_method

MAX_SAMPLES = 256


class SmoothGradParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    samples: int = Field(default=25, ge=1, le=MAX_SAMPLES, description="Noisy copies per image.")
    noise: float = Field(
        default=0.15, ge=0.0, le=10.0,
        description="Standard deviation of the Gaussian noise as a fraction of the image's value range (max - min of "
        "the normalised input over all its pixels and channels).",
    )
    variant: Literal["plain", "squared", "var"] = Field(
        default="plain",
        description="`plain`: mean gradient (SmoothGrad); `squared`: mean squared gradient (SmoothGrad-Squared); "
        "`var`: variance of the gradient (VarGrad). Captum's smoothgrad, smoothgrad_sq and vargrad.",
    )
    reduce: MagnitudeReduce = Field(default="max", description=MAGNITUDE_REDUCE_DESCRIPTION)
    seed: int = Field(
        default=0, ge=0, le=2**63 - 1,
        description="Seed of the noise (each image gets the same standard-normal draws, in the same order, whatever "
        "the batch): equal seeds give equal maps on the same kind of device.",
    )


SAMPLE_COST = 2.6  # forward passes' worth of one noisy sample (forward and backward, chunked)


def _cost(params: SmoothGradParams, ctx: CostContext) -> CostEstimate:
    return CostEstimate(SAMPLE_COST * params.samples * ctx.targets,
                        f"{SAMPLE_COST:g} x samples={params.samples} x {ctx.targets} target(s)")


@register_method(
    name="smoothgrad",
    description="SmoothGrad: input gradients of the target logit averaged over `samples` copies of the image with "
    "Gaussian noise added (or their square or variance: `variant`), then absolute values reduced over the colour "
    "channels." + INPUT_RESOLUTION_NOTE,
    families=("vit", "cnn"),
    class_specific=True,
    params_model=SmoothGradParams,
    needs=lambda params, anatomy: CaptureNeeds(),
    relative_cost=65.0,
    cost=MethodCost(_cost, f"{SAMPLE_COST:g} x samples x targets"),
    cost_note="About 2.6 forward passes' worth (forward and backward) per noise sample and target (65 at the default "
    "25 samples); samples of all images run through the model together in chunks of the model's explain_chunk_size.",
)
def smoothgrad(captures: CaptureBatch, params: SmoothGradParams, anatomy: ModelAnatomy) -> MethodOutput:
    runner, pixels, targets = captures.runner, captures.pixels, captures.targets
    assert runner is not None and targets is not None
    batch, shape = pixels.shape[0], pixels.shape[1:]
    flat = pixels.flatten(1)
    stdevs = params.noise * (flat.amax(dim=1) - flat.amin(dim=1))  # (B,)
    generators = [seeded_generator(params.seed, pixels.device) for _ in range(batch)]
    total = torch.zeros_like(pixels)
    total_sq = torch.zeros_like(pixels)
    for segments in chunk_segments([params.samples] * batch, runner.chunk_size):
        noisy = torch.cat([
            pixels[i] + normal_noise(generators[i], stop - first, shape, pixels.device) * stdevs[i]
            for i, first, stop in segments
        ])
        chunk_targets = torch.cat([targets[i].repeat(stop - first) for i, first, stop in segments])
        _, grads = runner.input_gradients(noisy, chunk_targets)
        grads = grads.to(pixels.device)
        offset = 0
        for i, first, stop in segments:
            part = grads[offset:offset + stop - first]
            total[i] += part.sum(dim=0)
            total_sq[i] += part.pow(2).sum(dim=0)
            offset += stop - first
    mean, mean_sq = total / params.samples, total_sq / params.samples
    if params.variant == "plain":
        smoothed = mean
    elif params.variant == "squared":
        smoothed = mean_sq
    else:
        smoothed = mean_sq - mean * mean
    return MethodOutput(maps=reduce_magnitude(smoothed, params.reduce))
