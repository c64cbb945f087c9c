"""The Grad-CAM family base (Selvaraju et al. 2017), shared by gradcam, gradcam_pp, layercam and vit_cx: the
`target_layer` params, the layer's activations and gradients as spatial maps, the check, the cost note and the
registration. Each variant supplies only how it weighs the activations (as pytorch-grad-cam's BaseCAM)."""

from __future__ import annotations

from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field

from service.explain.captures import CaptureBatch, CaptureNeeds
from service.model.anatomy import ModelAnatomy
from service.explain.registry import ComputeFn, register_method
from service.explain.methods._tokens import token_features_to_map


class GradCamParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target_layer: str | None = Field(
        default=None,
        description="Module name (as in model.named_modules()); default: the last feature map before global "
        "pooling (CNNs) or the last block's norm1 (ViTs).",
    )


def target_layer(params: GradCamParams, anatomy: ModelAnatomy) -> str:
    return params.target_layer or anatomy.feature_layer


GRADIENT_CAM_COST_NOTE = (
    "Shares the batch's forward pass and one backward pass per target (only down to the target layer) with the "
    "other gradient methods."
)


def gradient_cam_needs(params: GradCamParams, anatomy: ModelAnatomy) -> CaptureNeeds:
    """What the Grad-CAM family records: the target layer's output and its gradient."""
    return CaptureNeeds(layer_grads=frozenset({target_layer(params, anatomy)}))


def activations_and_gradients(
    captures: CaptureBatch, params: GradCamParams, anatomy: ModelAnatomy
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target layer's activations and gradients as (B, C, h, w) maps (ViT tokens reshaped to the grid)."""
    name = target_layer(params, anatomy)
    return (token_features_to_map(captures.layers[name], anatomy),
            token_features_to_map(captures.layer_grads[name], anatomy))


def _some_spatial_layers(anatomy: ModelAnatomy, count: int = 5) -> str:
    """A few allowed target layers for an error message: the default first, then the deepest others."""
    spatial = anatomy.spatial_modules or ()
    names = [anatomy.feature_layer] + [n for n in reversed(spatial) if n != anatomy.feature_layer][: count - 1]
    return ", ".join(repr(n) for n in names)


def check_target_layer(params: GradCamParams, anatomy: ModelAnatomy) -> None:
    """At request time: the layer exists and its output is a spatial map (found at load time), so a head or a
    pooling layer is a 422 naming allowed layers, never a failed batch."""
    layer = params.target_layer
    if layer is None:
        return
    if layer not in anatomy.module_names:
        raise ValueError(f"params.target_layer: the model has no module named {layer!r}; for example "
                         f"{_some_spatial_layers(anatomy)}")
    if anatomy.spatial_modules is not None and layer not in anatomy.spatial_modules:
        raise ValueError(f"params.target_layer: module {layer!r} has no spatial output (a (C, h, w) feature map or "
                         f"the patch-token sequence); use one that has, for example {_some_spatial_layers(anatomy)}")


def register_gradient_cam(*, name: str, description: str, relative_cost: float) -> Callable[[ComputeFn], ComputeFn]:
    """`register_method` for a Grad-CAM-family method: ViTs and CNNs, class-specific, the `target_layer` params,
    that layer's output and gradient recorded, the same check and cost note."""
    return register_method(
        name=name, description=description, families=("vit", "cnn"), class_specific=True,
        params_model=GradCamParams, needs=gradient_cam_needs, relative_cost=relative_cost,
        cost_note=GRADIENT_CAM_COST_NOTE, check=check_target_layer,
    )
