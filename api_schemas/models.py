"""Descriptions of the served models (`GET /v1/models`)."""

from typing import Literal

from pydantic import BaseModel, Field


class WeightsInfo(BaseModel):
    """Where a model's weights came from."""

    source: str = Field(
        description="Configured weights source: `hub`, `file:PATH`, `package:efficientnet-lite0` or `random`.",
        examples=["package:efficientnet-lite0"],
    )
    random: bool = Field(
        description="True when the model runs on randomly initialised weights (its predictions are meaningless)."
    )
    note: str | None = Field(default=None, description="Why the weights are random, when they are.")


class BatchingInfo(BaseModel):
    """The model's request-batching settings."""

    max_batch_size: int = Field(description="The configured batch cap; 1 turns batching off.")
    lanes: int = Field(description="Batches of the device that run at once (CPU lanes; 1 on a GPU).")
    batch_cap: int = Field(description="Largest batch actually formed: max_batch_size divided by lanes, rounded up.")
    max_wait_ms: float = Field(description="How long the consumer waits for more requests after the first.")
    queue_size: int = Field(description="Requests that may wait in the queue before new ones get 503.")
    timeout_s: float = Field(description="How long a request may wait for its result before it gets 504.")


class Preprocessing(BaseModel):
    """How an image becomes the model's input (timm's data config): resize, centre crop, normalise."""

    input_size: list[int] = Field(description="[channels, height, width].", examples=[[3, 224, 224]])
    interpolation: str = Field(description="Resize interpolation.", examples=["bicubic"])
    mean: list[float] = Field(description="Per-channel mean subtracted after scaling to [0, 1].",
                              examples=[[0.485, 0.456, 0.406]])
    std: list[float] = Field(description="Per-channel standard deviation divided by.", examples=[[0.229, 0.224, 0.225]])
    crop_pct: float = Field(description="Centre-crop fraction: the image is resized to input / crop_pct, then cropped.",
                            examples=[0.875])
    crop_mode: str = Field(description="timm crop mode: `center`, `squash` or `border`.", examples=["center"])


class ModelInfo(BaseModel):
    """One served model."""

    id: str = Field(examples=["efficientnet_lite0"])
    architecture: str = Field(description="timm model name.", examples=["tf_efficientnet_lite0"])
    family: Literal["vit", "cnn"] = Field(description="`vit` for vision transformers, `cnn` otherwise.", examples=["cnn"])
    weights: WeightsInfo
    input_size: list[int] = Field(description="Model input as [channels, height, width].", examples=[[3, 224, 224]])
    num_classes: int = Field(examples=[1000])
    device: str = Field(examples=["cpu"])
    dtype: str = Field(examples=["float32"])
    ready: bool = Field(description="Loaded and warmed up.")
    batching: BatchingInfo
    preprocessing: Preprocessing


class ModelListResponse(BaseModel):
    """Every served model."""

    models: list[ModelInfo]
