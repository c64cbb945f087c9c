"""Validating the `methods` of an explain request against the registry and the model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from pydantic import ValidationError
from torch import nn

from api_schemas import MethodSpec
from api_schemas.errors import validation_message
from service.model.anatomy import ModelAnatomy
from service.explain.evaluation import forward_passes
from service.explain.pipeline import MethodRequest
from service.explain.registry import CostContext, CostEstimate, all_methods


class MethodRequestError(ValueError):
    """A requested method is unknown, does not apply to the model, or has invalid params; the message names
    `methods[i]` and the problem."""


def resolve_method(spec: str | MethodSpec, position: int, family: str, anatomy: ModelAnatomy) -> MethodRequest:
    """One requested method with validated params, or MethodRequestError naming `methods[position]` and the problem."""
    field = f"methods[{position}]"
    name, raw_params = (spec, {}) if isinstance(spec, str) else (spec.name, spec.params)
    methods = all_methods()
    method = methods.get(name)
    if method is None:
        raise MethodRequestError(f"{field}.name: unknown method {name!r}; available: {', '.join(methods)}")
    if family not in method.families:
        raise MethodRequestError(
            f"{field}: method {name!r} does not apply to {family} models (it applies to {', '.join(method.families)})"
        )
    try:
        # strict: params come from JSON, where a boolean is never a number (`steps: true` is not 1 step)
        params = method.params_model.model_validate(raw_params, strict=True)
    except ValidationError as exc:
        raise MethodRequestError(validation_message(exc.errors(), at=f"{field}.params")) from None
    try:
        if method.check is not None:
            method.check(params, anatomy)
        needs = method.needs(params, anatomy)
    except ValueError as exc:
        raise MethodRequestError(f"{field} ({name}): {exc}") from None
    return MethodRequest(method=method, params=params, needs=needs)


def resolve_methods(specs: list[str | MethodSpec], family: str, anatomy: ModelAnatomy) -> tuple[MethodRequest, ...]:
    """Every requested method, in order; the first invalid one raises MethodRequestError."""
    return tuple(resolve_method(spec, i, family, anatomy) for i, spec in enumerate(specs))


class BudgetError(ValueError):
    """A request would cost more than the model's budget (compute or response size); the message names the estimate,
    the limit and what drives the estimate."""


def _channels_of(module: nn.Module) -> int | None:
    for attribute in ("out_channels", "num_features", "out_features", "embed_dim"):
        value = getattr(module, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    shape = getattr(module, "normalized_shape", None)
    return int(shape[-1]) if shape else None


def module_channels(network: nn.Module) -> Callable[[str], int]:
    """A lookup of the output width of a module of `network`, read from the module attributes (no forward pass): the
    width of the last module with one (a conv's out_channels, a norm's features...) at or before the end of the
    named module's subtree, in registration order. A name not found gets the widest module of the network."""

    def channels(name: str) -> int:
        modules = list(network.named_modules())
        last, inside = None, False
        for module_name, module in modules:
            if module_name == name or module_name.startswith(name + "."):
                inside = True
            elif inside:
                break
            last = _channels_of(module) or last
        if inside and last:
            return last
        return max((c for _, m in modules if (c := _channels_of(m))), default=1)

    return channels


@dataclass(frozen=True)
class RequestCost:
    """The cost of one request's image: each method's estimate, in order, the faithfulness evaluation of their maps,
    and the sum (forward passes; an upper bound, since the methods share the recording forward pass and the
    backward pass per target)."""

    methods: tuple[tuple[str, CostEstimate], ...]
    evaluation: CostEstimate | None = None

    @property
    def units(self) -> float:
        return sum(estimate.units for _, estimate in self.methods) + (self.evaluation.units if self.evaluation else 0)


def request_cost(
    requests: Sequence[MethodRequest], context: CostContext, evaluate: Sequence[str] = ()
) -> RequestCost:
    """Each method's estimate and, with `evaluate`, the evaluation's: its forward passes per map times the maps
    evaluated (one per target for class-specific methods, one otherwise; per-layer maps are not evaluated)."""
    evaluation = None
    if evaluate:
        maps = sum(context.targets if r.method.class_specific else 1 for r in requests)
        passes = forward_passes(evaluate)
        evaluation = CostEstimate(maps * passes, f"{passes} passes ({' + '.join(evaluate)}) x {maps} map(s)")
    return RequestCost(tuple((r.method.name, r.method.estimate_cost(r.params, context)) for r in requests),
                       evaluation)


def check_request_cost(cost: RequestCost, limit: float) -> None:
    """BudgetError naming the estimate, the limit and each method's share (largest first) when over `limit`."""
    if cost.units <= limit:
        return
    named = [(f"methods[{i}] {name}", estimate) for i, (name, estimate) in enumerate(cost.methods)]
    if cost.evaluation is not None:
        named.append(("evaluate", cost.evaluation))
    shares = sorted(named, key=lambda item: -item[1].units)
    parts = ", ".join(f"{name}: {estimate.units:.4g} = {estimate.basis}" for name, estimate in shares)
    raise BudgetError(
        f"estimated cost {cost.units:.4g} forward passes exceeds this model's max_request_cost {limit:g} ({parts}); "
        "ask for fewer targets, methods or evaluation metrics, or smaller steps/samples/masks"
    )


# Upper bounds of the bytes per pixel of each output format (PNGs as if incompressible), before base64.
FORMAT_BYTES_PER_PIXEL = {"heatmap_png": 4, "overlay_png": 3, "gray_png": 2, "raw": 4}
MAP_OVERHEAD_BYTES = 600  # statistics, dimensions and JSON keys of one map


def map_count(cost: RequestCost, requests: Sequence[MethodRequest], targets: int) -> int:
    """Maps a request returns: per method, one per target (class-specific) or one, times its maps per target."""
    return sum((targets if r.method.class_specific else 1) * estimate.maps
               for r, (_, estimate) in zip(requests, cost.methods))


def response_bytes(maps: int, formats: Sequence[str], pixels: int) -> int:
    """An upper bound of the response body's size: every map in every format at `pixels` pixels, base64-encoded."""
    per_pixel = sum(FORMAT_BYTES_PER_PIXEL[f] for f in formats)
    return math.ceil(maps * (pixels * per_pixel * 4 / 3 + MAP_OVERHEAD_BYTES))


def check_response_bytes(maps: int, formats: Sequence[str], size: tuple[int, int], limit: int) -> None:
    """BudgetError naming the estimate, the limit and its factors when `maps` maps of `size` (width, height) in
    `formats` could exceed `limit` bytes."""
    estimate = response_bytes(maps, formats, size[0] * size[1])
    if estimate <= limit:
        return
    raise BudgetError(
        f"estimated response size {estimate} bytes exceeds max_response_bytes {limit}: {maps} map(s) x "
        f"{len(formats)} format(s) ({', '.join(formats)}) at {size[0]}x{size[1]} pixels; ask for fewer targets, "
        "methods or formats, or a smaller output.max_side or space"
    )
