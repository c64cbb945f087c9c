"""Layer-wise raw attention (compared block by block in Abnar & Zuidema 2020): the class token's attention map in
every chosen block, plus an aggregate of them."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from service.explain.captures import CaptureBatch, CaptureNeeds
from service.model.anatomy import ModelAnatomy
from service.explain.registry import CostContext, CostEstimate, MethodCost, MethodOutput, register_method
from service.explain.methods._rollout import add_residual_and_normalise, class_token_row
from service.explain.methods._tokens import (
    HeadFusion,
    check_class_token_attention,
    check_layer_index,
    fuse_heads,
    patch_tokens_to_grid,
)

Aggregate = Literal["mean", "max", "min", "rollout"]


class AttentionLayersParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: list[int] | None = Field(
        default=None, min_length=1, max_length=256,
        description="Block indices to show (negative values count from the last block); default: every block. "
        "Returned in depth order, duplicates removed.",
    )
    head_fusion: HeadFusion = Field(default="mean", description="How the heads are fused: mean, max or min.")
    aggregate: Aggregate = Field(
        default="mean",
        description="The main map: the element-wise `mean`, `max` or `min` of the per-layer maps, or `rollout`, "
        "the class-token row of the rollout product (0.5A + 0.5I, rows renormalised) over the chosen blocks.",
    )


def chosen_layers(params: AttentionLayersParams, anatomy: ModelAnatomy) -> list[int]:
    if params.layers is None:
        return list(range(anatomy.num_layers))
    return sorted({layer % anatomy.num_layers for layer in params.layers})


def _check(params: AttentionLayersParams, anatomy: ModelAnatomy) -> None:
    check_class_token_attention(anatomy)
    for position, layer in enumerate(params.layers or []):
        check_layer_index(layer, anatomy, f"layers[{position}]")


def _cost(params: AttentionLayersParams, ctx: CostContext) -> CostEstimate:
    layers = len(chosen_layers(params, ctx.anatomy))
    return CostEstimate(1.15, "1.15", maps=1 + layers)  # the main map and one per chosen layer


@register_method(
    name="attention_layers",
    description="Layer-wise attention: the class token's attention to each patch in every chosen block (heads "
    "fused), returned as one map per layer (`layers`), plus their mean, max, min or rollout as the main map.",
    families=("vit",),
    class_specific=False,
    params_model=AttentionLayersParams,
    needs=lambda params, anatomy: CaptureNeeds(attention=True),
    relative_cost=1.15,
    cost=MethodCost(_cost, "1.15 (returns 1 + one map per chosen layer)"),
    check=_check,
)
def attention_layers(captures: CaptureBatch, params: AttentionLayersParams, anatomy: ModelAnatomy) -> MethodOutput:
    indices = chosen_layers(params, anatomy)
    prefix = anatomy.num_prefix_tokens
    fused = [fuse_heads(captures.attentions[i], params.head_fusion) for i in indices]
    per_layer = torch.stack([patch_tokens_to_grid(matrix[:, 0, prefix:], anatomy) for matrix in fused], dim=1)
    if params.aggregate == "mean":
        maps = per_layer.mean(dim=1)
    elif params.aggregate == "max":
        maps = per_layer.amax(dim=1)
    elif params.aggregate == "min":
        maps = per_layer.amin(dim=1)
    else:
        class_row = class_token_row([add_residual_and_normalise(matrix) for matrix in fused])
        maps = patch_tokens_to_grid(class_row[:, prefix:], anatomy)
    return MethodOutput(maps=maps, layers=per_layer, layer_indices=tuple(indices))
