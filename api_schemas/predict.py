"""Prediction request and response (`POST /v1/models/{model_id}/predict`)."""

from pydantic import BaseModel, ConfigDict, Field

from api_schemas.models import WeightsInfo

MAX_TOP_K = 1000
ONE_PIXEL_PNG_BASE64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"


class PredictOptions(BaseModel):
    """Prediction options; in a multipart upload they are form fields beside `file`."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(
        default=5, ge=1, le=MAX_TOP_K, strict=True, description="How many classes to return, best first."
    )


class PredictJsonRequest(PredictOptions):
    """JSON form of a prediction request (the alternative is a multipart upload with a `file` field)."""

    image: str = Field(
        description="The image file (JPEG, PNG, WebP, BMP, TIFF, GIF...) encoded as base64; a `data:` URL prefix is accepted.",
        min_length=1,
        examples=[ONE_PIXEL_PNG_BASE64],
    )


class ClassScore(BaseModel):
    """One predicted class."""

    index: int = Field(examples=[967])
    label: str = Field(examples=["espresso"])
    probability: float = Field(ge=0.0, le=1.0, examples=[0.95])


class Timings(BaseModel):
    """Where the request's time went."""

    queue_ms: float = Field(description="Time from enqueueing to the start of the batch it ran in.")
    compute_ms: float = Field(description="Time the batch it ran in took on the device.")
    total_ms: float = Field(description="Time from receiving the request to sending the answer.")
    batch_size: int = Field(description="Number of requests in the batch this one ran in.")


class PredictResponse(BaseModel):
    """Top-k classes for one image."""

    model_id: str = Field(examples=["efficientnet_lite0"])
    weights: WeightsInfo
    predictions: list[ClassScore]
    timings: Timings
