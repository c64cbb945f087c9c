"""LayerCAM (Jiang et al. 2021): activations weighted position by position by their positive gradients."""

from __future__ import annotations

import torch

from service.explain.captures import CaptureBatch, CaptureNeeds, ModelAnatomy
from service.explain.methods.gradcam import GradCamParams, check_target_layer, target_layer
from service.explain.registry import MethodOutput, register_method
from service.explain.tokens import token_features_to_map


@register_method(
    name="layercam",
    description="LayerCAM: a layer's activations times their positive gradients at each position, summed over "
    "channels, ReLU. Same target layers as gradcam.",
    families=("vit", "cnn"),
    class_specific=True,
    params_model=GradCamParams,
    needs=lambda params, anatomy: CaptureNeeds(layer_grads=frozenset({target_layer(params, anatomy)})),
    relative_cost=1.2,
    cost_note="Shares the batch's forward pass and one backward pass per target (only down to the target layer) with "
    "the other gradient methods.",
    check=check_target_layer,
)
def layercam(captures: CaptureBatch, params: GradCamParams, anatomy: ModelAnatomy) -> MethodOutput:
    name = target_layer(params, anatomy)
    activations = token_features_to_map(captures.layers[name], anatomy)
    gradients = token_features_to_map(captures.layer_grads[name], anatomy)
    return MethodOutput(maps=torch.relu((torch.relu(gradients) * activations).sum(dim=1)))
