"""Validating the `methods` of an explain request against the registry and the model."""

from __future__ import annotations

from pydantic import ValidationError

from api_schemas import MethodSpec
from api_schemas.errors import validation_message
from service.model.anatomy import ModelAnatomy
from service.explain.pipeline import MethodRequest
from service.explain.registry import all_methods


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
        params = method.params_model.model_validate(raw_params)
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
