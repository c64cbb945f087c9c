"""Grad-CAM (Selvaraju et al. 2017): ReLU of the gradient-weighted channel sum of a layer's activations."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from service.explain.captures import CaptureBatch, CaptureNeeds, ModelAnatomy
from service.explain.registry import MethodOutput, register_method
from service.explain.tokens import token_features_to_map


class GradCamParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target_layer: str | None = Field(
        default=None,
        description="Module name (as in model.named_modules()); default: the last feature map before global "
        "pooling (CNNs) or the last block's norm1 (ViTs).",
    )


def target_layer(params: GradCamParams, anatomy: ModelAnatomy) -> str:
    return params.target_layer or anatomy.feature_layer


def check_target_layer(params: GradCamParams, anatomy: ModelAnatomy) -> None:
    if params.target_layer is not None and params.target_layer not in anatomy.module_names:
        raise ValueError(f"params.target_layer: the model has no module named {params.target_layer!r}")


@register_method(
    name="gradcam",
    description="Grad-CAM: channels of a layer's activations weighted by their mean gradient, summed, ReLU.",
    families=("vit", "cnn"),
    class_specific=True,
    params_model=GradCamParams,
    needs=lambda params, anatomy: CaptureNeeds(layer_grads=frozenset({target_layer(params, anatomy)})),
    relative_cost=1.25,
    check=check_target_layer,
)
def gradcam(captures: CaptureBatch, params: GradCamParams, anatomy: ModelAnatomy) -> MethodOutput:
    name = target_layer(params, anatomy)
    activations = token_features_to_map(captures.layers[name], anatomy)
    gradients = token_features_to_map(captures.layer_grads[name], anatomy)
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    return MethodOutput(maps=torch.relu((weights * activations).sum(dim=1)))
