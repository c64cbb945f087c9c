"""The registry of explanation methods: each method module registers itself with `@register_method`; the modules
are the explicit import list of `service.explain.methods`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Literal, TypeVar

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
class MethodOutput:
    """A method's result for a batch: one map per image, optionally one per layer too."""

    maps: torch.Tensor  # (B, h, w)
    layers: torch.Tensor | None = None  # (B, L, h, w)
    layer_indices: tuple[int, ...] | None = None
    # per image, extra map statistics (names of optional api_schemas.MapStatistics fields, e.g. completeness_gap)
    statistics: tuple[dict[str, float], ...] | None = None


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
) -> Callable[[ComputeFn], ComputeFn]:
    """Decorator registering the decorated compute function under `name`."""

    def decorate(compute: ComputeFn) -> ComputeFn:
        if name in _METHODS:
            raise ValueError(f"explanation method {name!r} registered twice")
        _METHODS[name] = ExplainMethod(
            name=name, description=description, families=families, class_specific=class_specific,
            params_model=params_model, needs=needs, compute=compute, relative_cost=relative_cost,
            cost_note=cost_note, check=check,
        )
        return compute

    return decorate


def all_methods() -> dict[str, ExplainMethod]:
    """Every registered method by name, sorted (importing the methods package registers them all)."""
    import service.explain.methods  # noqa: F401  (lazy: the method modules import this module)

    return dict(sorted(_METHODS.items()))
