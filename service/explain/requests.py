"""Validating the `methods` of an explain request against the registry and the model."""

from __future__ import annotations

from pydantic import ValidationError

from api_schemas import MethodSpec
from service.http.errors import ApiError
from service.model.anatomy import ModelAnatomy
from service.explain.pipeline import MethodRequest
from service.explain.registry import all_methods


def _invalid(message: str) -> ApiError:
    return ApiError(422, "invalid_request", message)


def resolve_method(spec: str | MethodSpec, position: int, family: str, anatomy: ModelAnatomy) -> MethodRequest:
    """One requested method with validated params, or 422 naming `methods[position]` and the problem."""
    field = f"methods[{position}]"
    name, raw_params = (spec, {}) if isinstance(spec, str) else (spec.name, spec.params)
    methods = all_methods()
    method = methods.get(name)
    if method is None:
        raise _invalid(f"{field}.name: unknown method {name!r}; available: {', '.join(methods)}")
    if family not in method.families:
        raise _invalid(
            f"{field}: method {name!r} does not apply to {family} models (it applies to {', '.join(method.families)})"
        )
    try:
        params = method.params_model.model_validate(raw_params)
    except ValidationError as exc:
        details = "; ".join(
            f"{field}.params.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise _invalid(details) from None
    try:
        if method.check is not None:
            method.check(params, anatomy)
        needs = method.needs(params, anatomy)
    except ValueError as exc:
        raise _invalid(f"{field} ({name}): {exc}") from None
    return MethodRequest(method=method, params=params, needs=needs)


def resolve_methods(specs: list[str | MethodSpec], family: str, anatomy: ModelAnatomy) -> tuple[MethodRequest, ...]:
    return tuple(resolve_method(spec, i, family, anatomy) for i, spec in enumerate(specs))
