"""Explanation request and response (`POST /v1/models/{model_id}/explain`) and the method catalogue."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from api_schemas.models import WeightsInfo
from api_schemas.predict import MAX_TOP_K, ONE_PIXEL_PNG_BASE64, ClassScore, Timings

OutputFormat = Literal["heatmap_png", "overlay_png", "gray_png", "raw"]
OutputSpace = Literal["original", "input", "tokens"]
MAX_TARGETS = 10


class MethodSpec(BaseModel):
    """A method with parameters; unspecified parameters take their defaults (see GET /v1/methods)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(examples=["rollout"])
    params: dict[str, Any] = Field(default_factory=dict, examples=[{"head_fusion": "max", "discard_ratio": 0.9}])


class TopKTarget(BaseModel):
    """Explain each of the k most probable classes (one map per class)."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(ge=1, le=MAX_TARGETS, strict=True)


TARGET_FORMS = 'expected "top1", a class index (an integer), a class label (a string) or {"top_k": k}'


def _target_form(value: Any) -> str | None:
    """Which form of `target` a value is, by its JSON type alone: a boolean or a float is none of them (no
    `true` taken as class 1), so it gets one clear message instead of an error per member of the union."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return "index"
    if isinstance(value, str):
        return "name"
    if isinstance(value, (dict, TopKTarget)):
        return "top_k"
    return None


# "top1" is one of the strings, not a constant of its own in the union: generated clients type a `Literal` member
# badly (openapi-python-client calls isinstance on it), and the string's default says the same.
Target = Annotated[
    Union[
        Annotated[str, Tag("name")],
        Annotated[int, Field(strict=True), Tag("index")],
        Annotated[TopKTarget, Tag("top_k")],
    ],
    Discriminator(_target_form, custom_error_type="invalid_target", custom_error_message=TARGET_FORMS),
]


class OutputOptions(BaseModel):
    """How maps are returned."""

    model_config = ConfigDict(extra="forbid")

    format: list[OutputFormat] = Field(
        default_factory=lambda: ["heatmap_png"],
        min_length=1,
        description="Any of: `heatmap_png` (colormapped RGBA PNG, transparent where the model saw nothing), "
        "`overlay_png` (heatmap blended over the image; unseen pixels darkened), `gray_png` (16-bit grayscale PNG: "
        "0 = unseen, 1..65535 = normalised saliency 0..1), `raw` (float32 array of the unnormalised map, NaN where "
        "unseen).",
    )
    space: OutputSpace = Field(
        default="original",
        description="`original`: on the original image at its resolution (bounded by `max_side`); `input`: on the "
        "model's input crop; `tokens`: the patch grid / feature-map grid, no upsampling.",
    )
    colormap: str = Field(default="jet", description="A matplotlib colormap name.", examples=["jet", "viridis"])
    alpha: float = Field(default=0.5, ge=0.0, le=1.0, strict=True, description="Heatmap opacity in `overlay_png`.")
    max_side: int | None = Field(
        default=None, ge=8, le=8192, strict=True,
        description="Longest side of `original`-space maps; default: the server's configured bound.",
    )


METHOD_FORMS = 'expected a method name (a string) or {"name": ..., "params": {...}}'


def _method_form(value: Any) -> str | None:
    """Which form of a `methods` entry a value is, by its JSON type alone (one clear message for anything else)."""
    if isinstance(value, str):
        return "name"
    if isinstance(value, (dict, MethodSpec)):
        return "spec"
    return None


MethodEntry = Annotated[
    Union[Annotated[str, Tag("name")], Annotated[MethodSpec, Tag("spec")]],
    Discriminator(_method_form, custom_error_type="invalid_method", custom_error_message=METHOD_FORMS),
]


class ExplainOptions(BaseModel):
    """Explanation options; in a multipart upload they are form fields beside `file` (lists and objects as JSON)."""

    model_config = ConfigDict(extra="forbid")

    methods: list[MethodEntry] = Field(
        min_length=1, max_length=16, description="Method names or {name, params} objects.",
        examples=[["rollout", {"name": "gradcam", "params": {}}]],
    )
    target: Target = Field(
        default="top1",
        description='Class to explain: "top1" (default), a class index, a label, or {"top_k": k} (one map per class).',
    )
    output: OutputOptions = Field(default_factory=OutputOptions)
    top_k: int = Field(default=5, ge=1, le=MAX_TOP_K, strict=True, description="How many predictions to return.")


class ExplainJsonRequest(ExplainOptions):
    """JSON form of an explanation request (the alternative is a multipart upload with a `file` field)."""

    image: str = Field(
        min_length=1, description="The image file encoded as base64; a `data:` URL prefix is accepted.",
        examples=[ONE_PIXEL_PNG_BASE64],
    )


class RawArray(BaseModel):
    """A float32 array, little-endian, row-major, base64-encoded."""

    dtype: Literal["float32"] = "float32"
    shape: list[int] = Field(examples=[[14, 14]])
    data: str = Field(description="base64 of the little-endian float32 bytes.")

    def to_numpy(self) -> Any:
        """The array as a writable numpy float32 array of `shape` (numpy is imported here, not with the package)."""
        import base64

        import numpy as np

        data = bytearray(base64.b64decode(self.data))
        count = 1
        for side in self.shape:
            count *= side
        if len(data) != 4 * count:
            raise ValueError(f"raw array of shape {self.shape} needs {4 * count} bytes of float32, got {len(data)}")
        return np.frombuffer(data, dtype="<f4").reshape(self.shape).astype(np.float32, copy=False)


class Peak(BaseModel):
    """Where the map is highest."""

    grid: list[int] = Field(description="[row, col] in the token / feature-map grid.", examples=[[3, 7]])
    original: list[float] = Field(description="[x, y] of that cell's centre in original-image pixels.")


class MapStatistics(BaseModel):
    """Summary of one map, computed on the grid before any upsampling."""

    min: float
    max: float
    entropy: float = Field(description="Entropy of the map as a distribution (min-shifted), divided by log(cells).")
    top10_mass: float = Field(description="Share of the (min-shifted) mass held by the top 10% of cells.")
    peak: Peak
    completeness_gap: float | None = Field(
        default=None,
        description="Integrated gradients only: sum of the attributions minus (f(input) - f(baseline)) for the target "
        "logit f; it shrinks towards 0 as `steps` grows.",
    )


class RenderedMap(BaseModel):
    """One map in the requested formats and space."""

    width: int
    height: int
    heatmap_png: str | None = Field(default=None, description="base64 PNG")
    overlay_png: str | None = Field(default=None, description="base64 PNG")
    gray_png: str | None = Field(default=None, description="base64 16-bit PNG")
    raw: RawArray | None = None
    statistics: MapStatistics

    def to_array(self) -> Any:
        """The map's values as a numpy float32 (height, width) array, NaN where the model saw nothing (the `raw`
        output format, which has to have been requested)."""
        if self.raw is None:
            raise ValueError(
                "this map has no raw values: request them with output={'format': [..., 'raw']} (OutputOptions.format)"
            )
        return self.raw.to_numpy()

    def to_image(self, kind: OutputFormat = "heatmap_png") -> Any:
        """One of the map's PNGs as a PIL image: `heatmap_png` (RGBA), `overlay_png` (RGB) or `gray_png` (16-bit
        grayscale); that format has to have been requested (PIL is imported here, not with the package)."""
        import base64
        import io

        from PIL import Image

        if kind not in ("heatmap_png", "overlay_png", "gray_png"):
            raise ValueError(f"kind must be 'heatmap_png', 'overlay_png' or 'gray_png', got {kind!r}")
        encoded = getattr(self, kind)
        if encoded is None:
            present = [f for f in ("heatmap_png", "overlay_png", "gray_png", "raw") if getattr(self, f) is not None]
            raise ValueError(
                f"this map has no {kind}: request it with output={{'format': [..., {kind!r}]}} (it has {present})"
            )
        image = Image.open(io.BytesIO(base64.b64decode(encoded)))
        image.load()
        return image


class LayerMap(RenderedMap):
    """A per-layer map of a layer-wise method."""

    layer: int


class TargetExplanation(BaseModel):
    """The map of one method for one target class (target is null for class-agnostic methods)."""

    target: ClassScore | None
    map: RenderedMap
    layers: list[LayerMap] | None = Field(default=None, description="Per-layer maps, for layer-wise methods.")

    def to_array(self) -> Any:
        """The map as a numpy float32 array (see RenderedMap.to_array)."""
        return self.map.to_array()


class MethodResult(BaseModel):
    """Everything one method produced."""

    method: str
    params: dict[str, Any] = Field(description="The parameters used, defaults filled in.")
    class_specific: bool
    compute_ms: float = Field(description="Time the method's own tensor work took for the batch this request ran in.")
    results: list[TargetExplanation]

    def map(self, rank: int = 0) -> RenderedMap:
        """The map for the method's `rank`-th target, in the request's order (with {"top_k": k}: 0 is the most
        probable class); a class-agnostic method has one map, whatever the target."""
        if not -len(self.results) <= rank < len(self.results):
            raise IndexError(f"method {self.method!r} has {len(self.results)} map(s); there is no rank {rank}")
        return self.results[rank].map

    def for_class(self, index: int) -> RenderedMap:
        """The map explaining the class `index` (one of the request's targets)."""
        for result in self.results:
            if result.target is not None and result.target.index == index:
                return result.map
        explained = [r.target.index for r in self.results if r.target is not None]
        raise KeyError(f"method {self.method!r} has no map for class {index}; it explained {explained}")


class CropBox(BaseModel):
    """The region of the original image the model's input covers, in original pixel coordinates."""

    left: float
    top: float
    right: float
    bottom: float


class ExplainResponse(BaseModel):
    """Predictions and saliency maps for one image."""

    model_id: str
    weights: WeightsInfo
    predictions: list[ClassScore]
    original_size: list[int] = Field(description="[width, height] of the decoded (EXIF-rotated) image.")
    crop_box: CropBox
    space: OutputSpace
    explanations: list[MethodResult]
    timings: Timings

    def method(self, method: str | int) -> MethodResult:
        """A method's results, by name (the first, if the request named it twice) or by position in the request."""
        if isinstance(method, int):
            return self.explanations[method]
        for result in self.explanations:
            if result.method == method:
                return result
        raise KeyError(f"no results of method {method!r}; the response has {[r.method for r in self.explanations]}")

    def map(self, method: str | int, rank: int = 0) -> RenderedMap:
        """The map of `method` (name or position) for its `rank`-th target (see MethodResult.map)."""
        return self.method(method).map(rank)


class MethodInfo(BaseModel):
    """One explanation method."""

    name: str
    description: str
    families: list[Literal["vit", "cnn"]]
    class_specific: bool
    params_schema: dict[str, Any] = Field(description="JSON schema of the params, with defaults and bounds.")
    relative_cost: float = Field(description="Approximate cost per image as a multiple of one forward pass.")
    cost_note: str | None = None
    cost_formula: str = Field(
        description="How the cost of a request is estimated from the params and targets, in forward passes of the "
        "model per image; a request's methods together must stay within the model's max_request_cost.",
        examples=["(2.5 x steps + 1 for gausslegendre) x targets"],
    )
    reference_cost: float = Field(
        description="The estimate with default params and one target on the reference model, deit_tiny_patch16_224 "
        "at 224x224 (12 blocks of 197 tokens, 192 channels), in its forward passes.",
    )


class MethodListResponse(BaseModel):
    """Every registered explanation method."""

    methods: list[MethodInfo]
