"""Gradient attention rollout (Gildenblat 2020, github.com/jacobgil/vit-explain; the rollout of Abnar & Zuidema
2020): class-specific rollout of attention weighted by its gradient (positive part)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from service.explain.captures import CaptureBatch, CaptureNeeds
from service.model.anatomy import ModelAnatomy
from service.explain.registry import MethodOutput, register_method
from service.explain.methods._rollout import class_token_row, rollout_matrix
from service.explain.methods._tokens import (
    ATTENTION_GRADIENT_COST_NOTE,
    HeadFusion,
    check_class_token_attention,
    check_layer_index,
    patch_tokens_to_grid,
)


class GradRolloutParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    head_fusion: HeadFusion = Field(
        default="mean", description="How the heads of ReLU(A * dA) are fused: mean, max or min."
    )
    discard_ratio: float = Field(
        default=0.0, ge=0.0, lt=1.0,
        description="Fraction of the entries of each fused (N, N) matrix discarded: the int(ratio * N^2) lowest, "
        "ranked over the whole matrix, are set to zero, except those in prefix-token rows and columns (ranked, "
        "never zeroed).",
    )
    start_layer: int = Field(default=0, description="First block of the product; negative counts from the last.")


def _check(params: GradRolloutParams, anatomy: ModelAnatomy) -> None:
    check_class_token_attention(anatomy)
    check_layer_index(params.start_layer, anatomy, "start_layer")


@register_method(
    name="grad_rollout",
    description="Gradient attention rollout: per block, the attention times the gradient of the target logit "
    "with respect to it, negatives zeroed, heads fused; then the residual (0.5A + 0.5I, rows renormalised) and "
    "the rollout product; class-token row over the patches.",
    families=("vit",),
    class_specific=True,
    params_model=GradRolloutParams,
    needs=lambda params, anatomy: CaptureNeeds(attention_grad=True),
    relative_cost=2.5,
    cost_note=ATTENTION_GRADIENT_COST_NOTE,
    check=_check,
)
def grad_rollout(captures: CaptureBatch, params: GradRolloutParams, anatomy: ModelAnatomy) -> MethodOutput:
    assert captures.attention_grads is not None
    start = params.start_layer % anatomy.num_layers
    prefix = anatomy.num_prefix_tokens
    matrices = [
        rollout_matrix(torch.relu(attention * grad), params.head_fusion, params.discard_ratio, prefix)
        for attention, grad in zip(captures.attentions[start:], captures.attention_grads[start:])
    ]
    class_row = class_token_row(matrices)[:, prefix:]
    return MethodOutput(maps=patch_tokens_to_grid(class_row, anatomy))
