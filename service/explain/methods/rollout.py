"""Attention rollout (Abnar & Zuidema 2020): the product of residual-adjusted, head-fused attention matrices."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from service.explain.captures import CaptureBatch, CaptureNeeds, ModelAnatomy
from service.explain.registry import MethodOutput, register_method
from service.explain.rollout_math import add_residual_and_normalise, discard_lowest, rollout_product
from service.explain.tokens import (
    TOKEN_DESCRIPTION,
    HeadFusion,
    TokenChoice,
    check_layer_index,
    check_token_choice,
    fuse_heads,
    patch_tokens_to_grid,
    token_row,
)


class RolloutParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    head_fusion: HeadFusion = Field(default="mean", description="How the heads are fused: mean, max or min.")
    discard_ratio: float = Field(
        default=0.0, ge=0.0, lt=1.0,
        description="Fraction of the lowest entries of each fused matrix set to zero (prefix-token rows and "
        "columns are never discarded).",
    )
    start_layer: int = Field(default=0, description="First block of the product; negative counts from the last.")
    token: TokenChoice = Field(default="cls", description=TOKEN_DESCRIPTION)


def _check(params: RolloutParams, anatomy: ModelAnatomy) -> None:
    check_token_choice(params.token, anatomy)
    check_layer_index(params.start_layer, anatomy, "start_layer")


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
    matrices = [
        add_residual_and_normalise(
            discard_lowest(fuse_heads(attention, params.head_fusion), params.discard_ratio, anatomy.num_prefix_tokens)
        )
        for attention in captures.attentions[start:]
    ]
    row = token_row(rollout_product(matrices), params.token, anatomy)
    return MethodOutput(maps=patch_tokens_to_grid(row, anatomy))
