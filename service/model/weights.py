"""Obtaining a model's weights from its configured source: hub, file, package or random."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from service.config import ModelConfig
from service.model.hub import create_pretrained_model

log = logging.getLogger(__name__)

PACKAGE_SOURCES = {"efficientnet-lite0"}


class WeightsUnavailableError(RuntimeError):
    """The configured weights could not be obtained and no fallback is allowed."""


@dataclass(frozen=True)
class WeightsOutcome:
    """What a model ended up running on."""

    source: str
    random: bool
    note: str | None = None


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file or a torch state dict, never unpickling arbitrary objects."""
    if not path.is_file():
        raise FileNotFoundError(f"no such weights file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper_key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper_key), dict):
            state = state[wrapper_key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def _package_state_dict(name: str) -> dict[str, torch.Tensor]:
    if name == "efficientnet-lite0":
        from service.model.package_weights import load_efficientnet_lite0_state_dict

        return load_efficientnet_lite0_state_dict()
    raise ValueError(f"unknown weights package {name!r}; known: {sorted(PACKAGE_SOURCES)}")


def create_random_model(architecture: str, **kwargs: object) -> nn.Module:
    """A randomly initialised model; an unknown pretrained tag falls back to the bare architecture."""
    try:
        return timm.create_model(architecture, pretrained=False, **kwargs)
    except RuntimeError:
        if "." not in architecture:
            raise
        return timm.create_model(architecture.split(".", 1)[0], pretrained=False, **kwargs)


def _build(config: ModelConfig) -> tuple[nn.Module, WeightsOutcome]:
    source = config.weights
    kwargs = dict(config.model_kwargs)
    if source == "random":
        return create_random_model(config.architecture, **kwargs), WeightsOutcome(source, True)
    if source == "hub":
        return create_pretrained_model(config.architecture, **kwargs), WeightsOutcome(source, False)
    model = timm.create_model(config.architecture, pretrained=False, **kwargs)
    if source.startswith("file:"):
        state = load_state_dict_file(Path(source.removeprefix("file:")).expanduser())
    else:
        state = _package_state_dict(source.removeprefix("package:"))
    model.load_state_dict(state, strict=True)
    return model, WeightsOutcome(source, False)


def create_model_with_weights(config: ModelConfig) -> tuple[nn.Module, WeightsOutcome]:
    """Create the timm model and load its weights; fall back to random weights only where configured."""
    try:
        return _build(config)
    except Exception as exc:  # noqa: BLE001 - any failure to obtain weights is reported the same way
        reason = f"{type(exc).__name__}: {exc}".strip()
        if config.fallback != "random":
            raise WeightsUnavailableError(
                f"model {config.id!r}: cannot load weights from source {config.weights!r} "
                f"for architecture {config.architecture!r}: {reason}"
            ) from exc
        note = f"weights source {config.weights!r} failed ({reason[:300]}); running on RANDOM weights"
        log.warning("model %r: %s", config.id, note)
        return create_random_model(config.architecture, **config.model_kwargs), WeightsOutcome(config.weights, True, note)
