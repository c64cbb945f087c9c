"""Grad-CAM++ (Chattopadhay et al. 2018): Grad-CAM with channel weights from positive gradients weighted per
position by the closed-form alpha coefficients (the exponential-score derivation, as in pytorch-grad-cam)."""

from __future__ import annotations

import torch

from service.explain.captures import CaptureBatch
from service.model.anatomy import ModelAnatomy
from service.explain.methods._cam import GradCamParams, activations_and_gradients, register_gradient_cam
from service.explain.registry import MethodOutput

EPS = 1e-6  # as pytorch-grad-cam


@register_gradient_cam(
    name="gradcam_pp",
    description="Grad-CAM++: channels of a layer's activations weighted by the alpha-weighted sum of their positive "
    "gradients, summed, ReLU. Same target layers as gradcam.",
    relative_cost=1.2,
)
def gradcam_pp(captures: CaptureBatch, params: GradCamParams, anatomy: ModelAnatomy) -> MethodOutput:
    activations, gradients = activations_and_gradients(captures, params, anatomy)
    grads_2 = gradients.pow(2)
    grads_3 = grads_2 * gradients
    activation_sums = activations.sum(dim=(2, 3), keepdim=True)
    alphas = grads_2 / (2 * grads_2 + activation_sums * grads_3 + EPS)
    alphas = torch.where(gradients != 0, alphas, torch.zeros_like(alphas))
    weights = (torch.relu(gradients) * alphas).sum(dim=(2, 3), keepdim=True)
    return MethodOutput(maps=torch.relu((weights * activations).sum(dim=1)))
