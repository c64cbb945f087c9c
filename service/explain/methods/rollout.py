"""Attention rollout (Abnar & Zuidema 2020): the product of residual-adjusted, head-fused attention matrices."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from service.explain.captures import CaptureBatch, CaptureNeeds
from service.model.anatomy import ModelAnatomy
from service.explain.registry import MethodOutput, register_method
from service.explain.methods._rollout import query_weights, rollout_matrix, rollout_row
from service.explain.methods._tokens import (
    TOKEN_DESCRIPTION,
    HeadFusion,
    TokenChoice,
    check_layer_index,
    check_token_choice,
    patch_tokens_to_grid,
)


class RolloutParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    head_fusion: HeadFusion = Field(default="mean", description="How the heads are fused: mean, max or min.")
    discard_ratio: float = Field(
        default=0.0, ge=0.0, lt=1.0,
        description="Fraction of the entries of each fused (N, N) matrix discarded: the int(ratio * N^2) lowest, "
        "ranked over the whole matrix, are set to zero, except those in prefix-token rows and columns (ranked, "
        "never zeroed).",
    )
    start_layer: int = Field(default=0, description="First block of the product; negative counts from the last.")
    token: TokenChoice = Field(default="cls", description=TOKEN_DESCRIPTION)


def _check(params: RolloutParams, anatomy: ModelAnatomy) -> None:
    check_token_choice(params.token, anatomy)
    check_layer_index(params.start_layer, anatomy, "start_layer")


def _mean_fusion_row(attentions: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """rollout_row for head fusion `mean` without discarding, never forming the fused matrices: with F the mean
    over heads and s the row sums of M = 0.5F + 0.5I, v @ (M / s) = 0.5 (v / s) @ F + 0.5 (v / s), and
    (v / s) @ F is the mean over heads of (v / s) @ A_h (fewer, smaller operations than the matrix form, whose
    per-operation overhead shows at small batches)."""
    vector = weights.expand(attentions[0].shape[0], -1)  # (B, N)
    for attention in reversed(attentions):  # (B, H, N, N)
        scaled = vector / (0.5 * attention.sum(dim=-1).mean(dim=1) + 0.5)
        vector = 0.5 * (scaled[:, None, None, :] @ attention).mean(dim=1)[:, 0] + 0.5 * scaled
    return vector


@register_method(
    name="rollout",
    description="Attention rollout: product over blocks of head-fused attention with the residual (0.5A + 0.5I), "
    "class-token row (or the mean over all rows) over the patches.",
    families=("vit",),
    class_specific=False,
    params_model=RolloutParams,
    needs=lambda params, anatomy: CaptureNeeds(attention=True),
    relative_cost=1.3,
    check=_check,
)
def rollout(captures: CaptureBatch, params: RolloutParams, anatomy: ModelAnatomy) -> MethodOutput:
    start = params.start_layer % anatomy.num_layers
    attentions = captures.attentions[start:]
    # Only one row of the product is needed: the class token's, or the mean of all rows (token_row's choices).
    weights = query_weights(params.token, attentions[0])
    if params.head_fusion == "mean" and params.discard_ratio == 0.0:
        row = _mean_fusion_row(attentions, weights)
    else:
        matrices = [rollout_matrix(attention, params.head_fusion, params.discard_ratio, anatomy.num_prefix_tokens)
                    for attention in attentions]
        row = rollout_row(matrices, weights)
    return MethodOutput(maps=patch_tokens_to_grid(row[:, anatomy.num_prefix_tokens:], anatomy))
