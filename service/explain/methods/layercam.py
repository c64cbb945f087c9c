"""LayerCAM (Jiang et al. 2021): activations weighted position by position by their positive gradients."""

from __future__ import annotations

import torch

from service.explain.captures import CaptureBatch, ModelAnatomy
from service.explain.methods.gradcam import (
    GRADIENT_CAM_COST_NOTE,
    GradCamParams,
    activations_and_gradients,
    check_target_layer,
    gradient_cam_needs,
)
from service.explain.registry import MethodOutput, register_method


@register_method(
    name="layercam",
    description="LayerCAM: a layer's activations times their positive gradients at each position, summed over "
    "channels, ReLU. Same target layers as gradcam.",
    families=("vit", "cnn"),
    class_specific=True,
    params_model=GradCamParams,
    needs=gradient_cam_needs,
    relative_cost=1.2,
    cost_note=GRADIENT_CAM_COST_NOTE,
    check=check_target_layer,
)
def layercam(captures: CaptureBatch, params: GradCamParams, anatomy: ModelAnatomy) -> MethodOutput:
    activations, gradients = activations_and_gradients(captures, params, anatomy)
    return MethodOutput(maps=torch.relu((torch.relu(gradients) * activations).sum(dim=1)))
