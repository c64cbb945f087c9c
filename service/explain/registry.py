"""The registry of explanation methods: each method module registers itself with `@register_method`; the modules
are the explicit import list of `service.explain.methods`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, Literal, TypeVar

import torch
from pydantic import BaseModel

from service.explain.captures import CaptureBatch, CaptureNeeds
from service.model.anatomy import ModelAnatomy

Family = Literal["vit", "cnn"]
P = TypeVar("P", bound=BaseModel)

# (captures of a batch, params, the model's anatomy) -> maps (B, h, w); for class-specific methods the
# CaptureBatch carries the gradients of each image's current target.
ComputeFn = Callable[[CaptureBatch, P, ModelAnatomy], "MethodOutput"]
NeedsFn = Callable[[P, ModelAnatomy], CaptureNeeds]
CheckFn = Callable[[P, ModelAnatomy], None]


@dataclass(frozen=True)
class CostContext:
    """What a cost estimate may read besides the params, all known before the image is decoded: the model's
    anatomy, how many targets the request explains, and the output width of any of the model's modules."""

    anatomy: ModelAnatomy
    targets: int
    layer_channels: Callable[[str], int]  # module name -> channels of its output (an upper bound where unsure)


@dataclass(frozen=True)
class CostEstimate:
    """A method's cost for one image, in forward passes of the model it runs on, and how the figure was reached."""

    units: float
    basis: str  # e.g. "2.5 x 32 steps + 1, x 2 targets": named in over-budget errors
    maps: int = 1  # maps returned per target (layer-wise methods add one per layer): sizes the response


EstimateFn = Callable[[P, CostContext], CostEstimate]


@dataclass(frozen=True)
class MethodCost:
    """How a method's cost grows with its params: the estimator and the formula it computes, as text for
    /v1/methods."""

    estimate: EstimateFn
    formula: str


def per_target_cost(relative_cost: float, class_specific: bool) -> MethodCost:
    """The default cost: `relative_cost` forward passes, once per target for class-specific methods (each target
    adds a backward pass and the method's own work)."""
    if not class_specific:
        return MethodCost(lambda params, ctx: CostEstimate(relative_cost, f"{relative_cost:g}"), f"{relative_cost:g}")

    def estimate(params: BaseModel, ctx: CostContext) -> CostEstimate:
        return CostEstimate(relative_cost * ctx.targets, f"{relative_cost:g} x {ctx.targets} target(s)")

    return MethodCost(estimate, f"{relative_cost:g} x targets")


@dataclass(frozen=True)
class MethodOutput:
    """A method's result for a batch: one map per image, optionally one per layer too."""

    maps: torch.Tensor  # (B, h, w)
    layers: torch.Tensor | None = None  # (B, L, h, w)
    layer_indices: tuple[int, ...] | None = None
    # per image, extra map statistics (names of optional api_schemas.MapStatistics fields, e.g. completeness_gap)
    statistics: tuple[dict[str, float], ...] | None = None
    # per image, how a choosing method (auto) chose its map: api_schemas.MethodSelection's fields
    details: tuple[dict[str, Any], ...] | None = None


@dataclass(frozen=True)
class ExplainMethod(Generic[P]):
    """A registered method: metadata for /v1/methods, what it needs captured, and its tensor work."""

    name: str
    description: str
    families: tuple[Family, ...]
    class_specific: bool
    params_model: type[P]
    needs: NeedsFn
    compute: ComputeFn
    relative_cost: float
    cost_note: str | None = None
    check: CheckFn | None = None  # raises ValueError when the method cannot run on this model with these params
    cost: MethodCost | None = None  # None: per_target_cost(relative_cost, class_specific)

    @property
    def method_cost(self) -> MethodCost:
        return self.cost or per_target_cost(self.relative_cost, self.class_specific)

    def estimate_cost(self, params: P, ctx: CostContext) -> CostEstimate:
        """This method's cost for one image with these params (forward passes of the model): checked against the
        model's max_request_cost before a request is queued."""
        return self.method_cost.estimate(params, ctx)


_METHODS: dict[str, ExplainMethod] = {}


def register_method(
    *,
    name: str,
    description: str,
    families: tuple[Family, ...],
    class_specific: bool,
    params_model: type[P],
    needs: NeedsFn,
    relative_cost: float,
    cost_note: str | None = None,
    check: CheckFn | None = None,
    cost: MethodCost | None = None,
) -> Callable[[ComputeFn], ComputeFn]:
    """Decorator registering the decorated compute function under `name`. `cost` estimates the method's cost from
    its params (default: `relative_cost`, times the targets for class-specific methods)."""

    def decorate(compute: ComputeFn) -> ComputeFn:
        if name in _METHODS:
            raise ValueError(f"explanation method {name!r} registered twice")
        _METHODS[name] = ExplainMethod(
            name=name, description=description, families=families, class_specific=class_specific,
            params_model=params_model, needs=needs, compute=compute, relative_cost=relative_cost,
            cost_note=cost_note, check=check,
            cost=cost or per_target_cost(relative_cost, class_specific),  # built once, not per request
        )
        return compute

    return decorate


def all_methods() -> dict[str, ExplainMethod]:
    """Every registered method by name, sorted (importing the methods package registers them all)."""
    import service.explain.methods  # noqa: F401  (lazy: the method modules import this module)

    return dict(sorted(_METHODS.items()))
