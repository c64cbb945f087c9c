"""Grad-CAM (Selvaraju et al. 2017): ReLU of the gradient-weighted channel sum of a layer's activations."""

from __future__ import annotations

import torch

from service.explain.captures import CaptureBatch
from service.model.anatomy import ModelAnatomy
from service.explain.methods._cam import GradCamParams, activations_and_gradients, register_gradient_cam
from service.explain.registry import MethodOutput


@register_gradient_cam(
    name="gradcam",
    description="Grad-CAM: channels of a layer's activations weighted by their mean gradient, summed, ReLU.",
    relative_cost=1.25,
)
def gradcam(captures: CaptureBatch, params: GradCamParams, anatomy: ModelAnatomy) -> MethodOutput:
    activations, gradients = activations_and_gradients(captures, params, anatomy)
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    return MethodOutput(maps=torch.relu((weights * activations).sum(dim=1)))
