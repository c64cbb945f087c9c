"""The Open Inference Protocol (KServe V2 REST) request and response bodies, as its specification names them.

https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/ : the JSON form of a request and a
response; with the binary tensor data extension a tensor's data follows the JSON instead (`binary_data_size`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

class V2ErrorResponse(BaseModel):
    """An error of a /v2 route, in the protocol's shape (our own routes answer with ErrorResponse)."""

    error: str = Field(description="What went wrong.")


class V2LiveResponse(BaseModel):
    """`GET /v2/health/live`."""

    live: bool


class V2ReadyResponse(BaseModel):
    """`GET /v2/health/ready` and `GET /v2/models/{name}/ready`."""

    ready: bool


class V2ServerMetadata(BaseModel):
    """`GET /v2`."""

    name: str
    version: str
    extensions: list[str] = Field(description="Protocol extensions the server supports.")


class V2TensorMetadata(BaseModel):
    """An input or output of a model: its name, datatype and shape (-1 for a dimension of any size)."""

    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None


class V2ModelMetadata(BaseModel):
    """`GET /v2/models/{name}`."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]
    parameters: dict[str, Any] | None = None


class V2RequestInput(BaseModel):
    """An input tensor of an inference request; `data` is absent when its bytes follow the JSON
    (`parameters.binary_data_size`)."""

    model_config = ConfigDict(extra="ignore")

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None


class V2RequestOutput(BaseModel):
    """An output the client asks for; `parameters.binary_data` asks for it as binary data after the JSON,
    `parameters.classification` for the top classes (the classification extension)."""

    model_config = ConfigDict(extra="ignore")

    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    """`POST /v2/models/{name}/infer`."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2RequestInput]
    outputs: list[V2RequestOutput] | None = None


class V2ResponseOutput(BaseModel):
    """An output tensor of an inference response; `data` is absent when its bytes follow the JSON."""

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class V2InferResponse(BaseModel):
    """The answer to an inference request."""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[V2ResponseOutput]
