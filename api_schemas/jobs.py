"""Visualization jobs: activation maximisation (`POST /v1/models/{model_id}/visualizations`, `/v1/jobs`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from api_schemas.errors import ErrorDetail

MAX_STEPS = 10_000
MAX_VISUALIZATION_SIDE = 1024

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class ClassObjective(BaseModel):
    """Maximise the logit (pre-softmax score) of one class."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["class"]
    index: int = Field(strict=True, ge=0, description="Class index (see the model's labels).", examples=[3])


class ChannelObjective(BaseModel):
    """Maximise the mean activation of one channel of a module's output.

    The channel dimension is dim 1 of 4-D (N, C, H, W) and 2-D (N, C) outputs and the last dimension of 3-D token
    outputs (N, tokens, features).
    """

    model_config = ConfigDict(extra="forbid")

    type: Literal["channel"]
    layer: str = Field(min_length=1, description="Module name as in `model.named_modules()`.",
                       examples=["layer2.0.conv1"])
    channel: int = Field(strict=True, ge=0, description="Channel index in that module's output.", examples=[5])


class LayerObjective(BaseModel):
    """Maximise the mean activation of a module's whole output (every channel, position and token)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["layer"]
    layer: str = Field(min_length=1, description="Module name as in `model.named_modules()`.", examples=["blocks.1"])


class TokenObjective(BaseModel):
    """Maximise the mean activation (over features) of one token of a 3-D (N, tokens, features) module output."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["token"]
    layer: str = Field(min_length=1, description="Module name as in `model.named_modules()`.", examples=["blocks.1"])
    token: int = Field(strict=True, ge=0, description="Token index (prefix tokens such as the class token come first).",
                       examples=[0])


VisualizationObjective = Annotated[
    Union[ClassObjective, ChannelObjective, LayerObjective, TokenObjective], Field(discriminator="type")
]


class VisualizationRequest(BaseModel):
    """An activation-maximisation job: optimise an input image so that one unit of the model fires strongly.

    Each step rolls the image by a random jitter, runs the model, and takes an Adam step (in the model's
    normalised input space) on `objective - l2_weight * mean(x^2) - tv_weight * TV(x)`, where TV is the mean squared
    difference between neighbouring pixels; then optionally blurs the image and clamps it to valid [0, 1] pixels.
    """

    model_config = ConfigDict(extra="forbid")

    objective: VisualizationObjective = Field(
        description='What to maximise: {"type": "class", "index": i}, {"type": "channel", "layer": name, '
        '"channel": c}, {"type": "layer", "layer": name} or {"type": "token", "layer": name, "token": t}.',
        examples=[{"type": "class", "index": 3}],
    )
    steps: int = Field(strict=True, default=256, ge=1, le=MAX_STEPS, description="Optimisation steps.")
    lr: float = Field(
        default=0.05, gt=0.0, le=10.0, strict=True,
        description="Adam learning rate (normalised input units).")
    l2_weight: float = Field(
        default=1e-3, ge=0.0, le=1e4, strict=True,
        description="Weight of the mean squared pixel penalty.")
    tv_weight: float = Field(
        default=1e-2, ge=0.0, le=1e4, strict=True,
        description="Weight of the total-variation penalty.")
    jitter: int = Field(
        default=4, ge=0, le=64, strict=True,
        description="Largest random shift (pixels) applied before each step.")
    blur_every: int | None = Field(
        default=None, strict=True, ge=1, le=MAX_STEPS, description="Blur the image every this many steps (null: never)."
    )
    blur_sigma: float = Field(strict=True, default=0.5, gt=0.0, le=10.0, description="Gaussian blur sigma in pixels.")
    seed: int = Field(
        default=0, ge=0, le=2**63 - 1, strict=True,
        description="Seed of the initial noise and the jitter.")
    size: list[Annotated[int, Field(ge=8, le=MAX_VISUALIZATION_SIDE, strict=True)]] | None = Field(
        default=None, min_length=2, max_length=2,
        description="[height, width] of the image to optimise; default: the model's input size.",
        examples=[[224, 224]],
    )


class JobProgress(BaseModel):
    """How far a job has got."""

    step: int = Field(description="Steps completed.", examples=[120])
    total: int = Field(description="Steps the job will run.", examples=[256])
    objective: float | None = Field(
        default=None, description="The objective measured at the latest completed step (null before the first)."
    )


class VisualizationResult(BaseModel):
    """The optimised image and how the objective evolved."""

    image_png: str = Field(description="base64 PNG of the optimised image (RGB, or grayscale for 1-channel models).")
    width: int
    height: int
    objective_curve: list[float] = Field(description="The objective at each step, measured on the jittered image.")
    initial_objective: float = Field(description="The objective of the initial noise image (the curve's first value).")
    final_objective: float = Field(description="The objective of the final image, without jitter.")


class JobStatus(BaseModel):
    """A visualization job: its state, progress and, once it has succeeded, its result."""

    id: str = Field(examples=["3f2b6c0e9a1d4b5c8e7f6a5b4c3d2e1f"])
    kind: Literal["activation_maximization"] = "activation_maximization"
    model_id: str = Field(examples=["efficientnet_lite0"])
    status: JobState = Field(description="queued, running, succeeded, failed or cancelled.")
    progress: JobProgress
    params: VisualizationRequest = Field(description="The request with every default filled in.")
    created_at: datetime
    started_at: datetime | None = Field(default=None, description="When the first step started.")
    finished_at: datetime | None = None
    error: ErrorDetail | None = Field(default=None, description="Why the job failed.")
    result: VisualizationResult | None = Field(
        default=None, description="Present when the job has succeeded (GET /v1/jobs/{id} only, not in the listing)."
    )


class JobListResponse(BaseModel):
    """Every job the server still holds (active and retained finished jobs), oldest first, without results."""

    jobs: list[JobStatus]
