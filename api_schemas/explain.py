"""Explanation request and response (`POST /v1/models/{model_id}/explain`) and the method catalogue."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from api_schemas.models import WeightsInfo
from api_schemas.predict import MAX_TOP_K, ONE_PIXEL_PNG_BASE64, ClassScore, Timings

OutputFormat = Literal["heatmap_png", "overlay_png", "gray_png", "raw"]
OutputSpace = Literal["original", "input", "tokens"]
EvaluationMetric = Literal["deletion", "insertion", "positive_perturbation", "negative_perturbation"]
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
        "0 = unseen, 1..65535 = the map's `value_range` low..high, linearly), `raw` (float32 array of the "
        "unnormalised map, NaN where unseen, whatever `sign` says).",
    )
    space: OutputSpace = Field(
        default="original",
        description="`original`: on the original image at its resolution (bounded by `max_side`); `input`: on the "
        "model's input crop; `tokens`: the patch grid / feature-map grid, no upsampling.",
    )
    colormap: str | None = Field(
        default=None,
        description="A matplotlib colormap name. Default: `jet`, or the diverging `RdBu_r` (blue below zero, white at "
        "zero, red above) for maps rendered `signed`; a colormap named here is used for every map, with zero at its "
        "middle colour for signed ones.",
        examples=["jet", "viridis", "RdBu_r"],
    )
    sign: Literal["auto", "positive", "absolute", "signed"] = Field(
        default="auto",
        description="How negative values are drawn in the PNG formats (`raw` is the map as computed, whatever this "
        "says). `positive`: negatives clipped to 0, colours scaled from max(min, 0) to max (a non-negative map is "
        "min-max scaled); `absolute`: |map|, scaled from 0 to max |map|; `signed`: symmetric scale from -m to +m, "
        "m = max |map|, so 0 is the colormap's middle; in `overlay_png` the heatmap's opacity grows from 0 at 0 to "
        "`alpha` at -m and +m, so the photo shows where the map is near 0; in `gray_png` -m..+m is 1..65535 (0 is "
        "32768). `auto` (default): `signed` for a map with material negative values (min < -1e-6 x max |map| on "
        "the grid), else `positive`, decided per map. Each map reports the `sign` and `value_range` it got.",
    )
    alpha: float = Field(
        default=0.5, ge=0.0, le=1.0, strict=True,
        description="Heatmap opacity in `overlay_png` (for `signed` maps: at the extremes, fading to 0 at zero).",
    )
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
    evaluate: list[EvaluationMetric] = Field(
        default_factory=list, max_length=4,
        description="Faithfulness metrics to measure on the model for every map (not per-layer maps): `deletion`, "
        "`insertion` (RISE) and `positive_perturbation`, `negative_perturbation` (Chefer et al. 2021). Each costs "
        "forward passes per map (see `evaluation_metrics` of GET /v1/methods), counted in the request's cost.",
        examples=[["deletion", "insertion"]],
    )


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
    """Where the map is highest: the grid cell holding its maximum (the first, row-major, on a tie) and that cell's
    centre on the original image."""

    row: int = Field(description="Row of the cell in the token / feature-map grid, from 0 at the top.", examples=[3])
    col: int = Field(description="Column of the cell in the grid, from 0 at the left.", examples=[7])
    x: float = Field(
        description="Horizontal position of the cell's centre in original-image pixels, from the left edge.",
        examples=[241.5],
    )
    y: float = Field(
        description="Vertical position of the cell's centre in original-image pixels, from the top edge.",
        examples=[112.0],
    )


class MapStatistics(BaseModel):
    """Summary of one map, computed on the grid before any upsampling."""

    min: float
    max: float
    entropy: float = Field(description="Entropy of the map as a distribution (min-shifted), divided by log(cells).")
    top10_mass: float = Field(description="Share of the (min-shifted) mass held by the top 10% of cells.")
    border_mass: float = Field(
        description="Share of the (min-shifted) mass outside the centre of the crop: the cells whose centres lie "
        "outside the middle half of each side (a uniform map gives about 0.75; near 1, the map sits on the borders).",
    )
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
    sign: Literal["positive", "absolute", "signed"] = Field(
        description="How the PNGs drew the map's sign (the request's `output.sign`, with `auto` resolved for this "
        "map): `positive` (negatives clipped to 0), `absolute` (|map|) or `signed` (diverging, 0 at the middle).",
        examples=["signed"],
    )
    value_range: list[float] = Field(
        min_length=2, max_length=2,
        description="[low, high] of the colour scale in map units (for `absolute`, units of |map|), for a colour "
        "bar: `low` is the colormap's first colour and gray 1, `high` its last colour and gray 65535, linearly "
        "between; `signed` has low = -high, 0 at the middle. low = high: a constant map, drawn in the first colour "
        "(the middle one for `signed`).",
        examples=[[-0.8, 0.8]],
    )
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


class MapEvaluation(BaseModel):
    """Faithfulness of one map, measured on the model (requested with `evaluate`): each metric is the area under the
    probability of class `target` while the input is perturbed in the map's order (0..1; see
    `evaluation_metrics` of GET /v1/methods for the protocol and which direction is better)."""

    target: int = Field(description="The class whose probability was followed: the map's target, or the image's "
                        "first target (the top-1 class by default) for a class-agnostic map.")
    deletion: float | None = Field(default=None, description="Lower is better.")
    insertion: float | None = Field(default=None, description="Higher is better.")
    positive_perturbation: float | None = Field(default=None, description="Lower is better.")
    negative_perturbation: float | None = Field(default=None, description="Higher is better.")


class CandidateScore(BaseModel):
    """One candidate of `auto` and how faithful its map was on this image."""

    method: str
    params: dict[str, Any] = Field(description="The candidate's params, defaults filled in.")
    deletion: float = Field(description="RISE deletion AUC (lower is better), in the selection's `steps`.")
    insertion: float = Field(description="RISE insertion AUC (higher is better).")
    score: float = Field(description="What the selection maximised (see `score_rule`).")


class MethodSelection(BaseModel):
    """How `auto` chose this map: every candidate's scores on this image, and the winner."""

    winner: int = Field(description="Index of the chosen candidate in `candidates`.")
    score_rule: Literal["insertion_minus_deletion", "insertion", "deletion"]
    steps: int = Field(description="Deletion/insertion steps each candidate was scored with.")
    candidates: list[CandidateScore]


class TargetExplanation(BaseModel):
    """The map of one method for one target class (target is null for class-agnostic methods)."""

    target: ClassScore | None
    map: RenderedMap
    layers: list[LayerMap] | None = Field(default=None, description="Per-layer maps, for layer-wise methods.")
    evaluation: MapEvaluation | None = Field(default=None, description="The map's faithfulness, when requested.")
    selection: MethodSelection | None = Field(default=None, description="`auto` only: how this map was chosen.")

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


class MeasuredQuality(BaseModel):
    """How a method fared in the shipped quality report (`saliency-server evaluate`, see the README) on the models of
    one family; a figure is null where that part was not measured."""

    family: Literal["vit", "cnn"]
    models: list[str] = Field(description="The models measured (trained weights only).")
    deletion_win_rate: float | None = Field(
        default=None, description="Share of images on which its RISE deletion AUC beat a centred Gaussian map's.")
    insertion_win_rate: float | None = Field(
        default=None, description="Share of images on which its RISE insertion AUC beat a centred Gaussian map's.")
    sanity_check: Literal["passed", "failed"] | None = Field(
        default=None, description="Model-parameter randomisation (Adebayo et al. 2018): `passed` when its map "
        "changes once the model's top layers are re-initialised, as a map that explains the model must.")
    sanity_spearman: float | None = Field(
        default=None, description="Spearman correlation of its map with the trained model's once the top stage is "
        "re-initialised (low is good).")
    pointing_game: float | None = Field(
        default=None, description="Ground-truth benchmark: share of images whose map peak lies on the object.")
    mass_inside: float | None = Field(
        default=None, description="Ground-truth benchmark: mean share of the map's positive mass on the object.")


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
    measured_quality: list[MeasuredQuality] = Field(
        default_factory=list, description="Its faithfulness, sanity and ground-truth figures from the shipped "
        "quality report, per model family (see `quality_report`).")


class EvaluationMetricInfo(BaseModel):
    """One faithfulness metric a request may ask for with `evaluate`."""

    name: EvaluationMetric
    description: str
    higher_is_better: bool
    forward_passes: int = Field(description="Forward passes of the model per evaluated map (the metric's cost, "
                                "added to the request's estimated cost).")


class MethodListResponse(BaseModel):
    """Every registered explanation method, and the faithfulness metrics a request may ask for."""

    methods: list[MethodInfo]
    evaluation_metrics: list[EvaluationMetricInfo] = Field(default_factory=list)
    quality_report: str | None = Field(
        default=None, description="Where the methods' `measured_quality` comes from: the command, date and models.")
