"""Obtaining a model's weights from its configured source: hub, file, package or random."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models import clean_state_dict
from timm.models import load_state_dict as load_checkpoint_state_dict
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
    """The weights in a safetensors file or torch checkpoint, read by timm's loader; never unpickles arbitrary objects.

    timm's `load_state_dict` reads safetensors, or `torch.load`s with `weights_only=True` (it also allows the
    `argparse.Namespace` of timm training checkpoints' `args`), unwraps a checkpoint's `state_dict` or else `model`
    entry and strips the `module.` (DDP) and `_orig_mod.` (torch.compile) key prefixes. `use_ema=False`: timm would
    prefer an EMA copy of the weights (`state_dict_ema`, `model_ema`) when the checkpoint holds one; the plain weights
    are served instead, whatever else the checkpoint holds. timm does not know the `model_state_dict` key that plain
    PyTorch training loops save under, hence the one unwrap here.
    """
    if not path.is_file():  # timm raises a bare FileNotFoundError
        raise FileNotFoundError(f"no such weights file: {path}")
    try:
        state = load_checkpoint_state_dict(str(path), use_ema=False, device="cpu", weights_only=True)
        if isinstance(state.get("model_state_dict"), dict):
            state = clean_state_dict(state["model_state_dict"])
    except AttributeError:  # no dict with string keys where the weights should be (cleaning its keys failed)
        raise ValueError(f"{path} does not hold a state dict of tensors") from None
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
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
