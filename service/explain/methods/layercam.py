"""LayerCAM (Jiang et al. 2021): activations weighted position by position by their positive gradients."""

from __future__ import annotations

import torch

from service.explain.captures import CaptureBatch
from service.model.anatomy import ModelAnatomy
from service.explain.methods._cam import GradCamParams, activations_and_gradients, register_gradient_cam
from service.explain.registry import MethodOutput


@register_gradient_cam(
    name="layercam",
    description="LayerCAM: a layer's activations times their positive gradients at each position, summed over "
    "channels, ReLU. Same target layers as gradcam.",
    relative_cost=1.2,
)
def layercam(captures: CaptureBatch, params: GradCamParams, anatomy: ModelAnatomy) -> MethodOutput:
    activations, gradients = activations_and_gradients(captures, params, anatomy)
    return MethodOutput(maps=torch.relu((torch.relu(gradients) * activations).sum(dim=1)))
