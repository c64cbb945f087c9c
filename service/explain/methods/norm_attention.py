"""Norm-based attention analysis (Kobayashi et al. 2020, "Attention is not only a weight").

In a block, token i's attention output is sum_j sum_h alpha^h_ij f^h(x_j) (+ the projection bias), with
f^h(x_j) = v^h_j W_O^h: token j's value vector in head h after the output projection. The contribution of j to
i is || sum_h alpha^h_ij f^h(x_j) ||. Its square is sum_{h,g} alpha^h_ij alpha^g_ij <f^h(x_j), f^g(x_j)>, so only
a (heads x heads) Gram matrix per token is needed, never the (N, N, C) vectors themselves.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from service.explain.captures import CaptureBatch, CaptureNeeds
from service.model.anatomy import ModelAnatomy
from service.explain.registry import CostContext, CostEstimate, MethodCost, MethodOutput, register_method
from service.explain.methods._rollout import add_residual_and_normalise, class_token_row, normalise_rows
from service.explain.methods._tokens import (
    aggregated_layers,
    check_class_token_attention,
    check_layer_index,
    patch_tokens_to_grid,
)


class NormAttentionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layer: int = Field(
        default=-1,
        description="The top block: with `aggregate=last` the map is this block's norms, with `rollout` the product "
        "runs from the first block up to this one. Negative values count from the last block.",
    )
    aggregate: Literal["last", "rollout"] = Field(
        default="last",
        description="`last`: the class token's row of ||alpha f(x)|| in block `layer`; `rollout`: each block's "
        "norms with rows normalised to 1, the residual added (0.5N + 0.5I, renormalised) and multiplied as in "
        "attention rollout.",
    )


def _check(params: NormAttentionParams, anatomy: ModelAnatomy) -> None:
    check_class_token_attention(anatomy)
    check_layer_index(params.layer, anatomy, "layer")
    for name in anatomy.attention_modules:
        if f"{name}.qkv" not in anatomy.module_names or f"{name}.proj" not in anatomy.module_names:
            raise ValueError(f"attention module {name!r} has no `qkv` and `proj` projections to decompose")
        if f"{name}.gate" in anatomy.module_names:
            raise ValueError(f"attention module {name!r} is gated: its output does not decompose per token")


def _needs(params: NormAttentionParams, anatomy: ModelAnatomy) -> CaptureNeeds:
    names = anatomy.attention_modules
    layers = aggregated_layers(params.layer, params.aggregate, anatomy)
    return CaptureNeeds(attention=True, layers=frozenset(f"{names[i]}.qkv" for i in layers))


ROLLOUT_COST = 1.8


def _cost(params: NormAttentionParams, ctx: CostContext) -> CostEstimate:
    units = 1.2 if params.aggregate == "last" else ROLLOUT_COST
    return CostEstimate(units, f"{units:g} (aggregate={params.aggregate})")


def contribution_norms(attention: torch.Tensor, qkv: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """(B, N, N) norms ||sum_h alpha^h_ij f^h(x_j)|| of one block, from its attention probabilities
    (B, H, N, N), its qkv projection's output (B, N, 3 * H * head_dim) and the attention module."""
    if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity) or getattr(module, "gate", None) is not None:
        raise ValueError("norm_attention needs attention modules without a norm or gate after the weighted sum")
    batch, heads, n, _ = attention.shape
    head_dim = qkv.shape[-1] // (3 * heads)
    values = qkv.reshape(batch, n, 3, heads, head_dim)[:, :, 2]  # (B, N, H, d), as timm splits qkv
    weight = module.proj.weight.detach().to(device=qkv.device, dtype=qkv.dtype)  # (C, H * d)
    transformed = torch.einsum("bnhd,chd->bnhc", values, weight.reshape(weight.shape[0], heads, head_dim))
    gram = torch.einsum("bjhc,bjgc->bjhg", transformed, transformed)  # (B, N, H, H)
    inner = torch.einsum("bgij,bjhg->bhij", attention, gram)  # sum_g alpha^g_ij <f^h_j, f^g_j>
    return (attention * inner).sum(dim=1).clamp_min(0.0).sqrt()


@register_method(
    name="norm_attention",
    description="Norm-based attention (Kobayashi et al. 2020): the contribution of token j to token i is "
    "||sum over heads of alpha_ij f(x_j)||, f(x_j) being j's value vector after the output projection (without "
    "its bias); the class token's row in one block, or rolled out across blocks.",
    families=("vit",),
    class_specific=False,
    params_model=NormAttentionParams,
    needs=_needs,
    relative_cost=1.2,
    cost=MethodCost(_cost, f"1.2 with aggregate=last, {ROLLOUT_COST:g} with rollout"),
    cost_note="About 1.2 forward passes with aggregate=last, 1.5-1.8 with rollout (deit-tiny, CPU).",
    check=_check,
)
def norm_attention(captures: CaptureBatch, params: NormAttentionParams, anatomy: ModelAnatomy) -> MethodOutput:
    assert captures.runner is not None
    modules = dict(captures.runner.module.named_modules())
    matrices = []
    for index in aggregated_layers(params.layer, params.aggregate, anatomy):
        name = anatomy.attention_modules[index]
        matrices.append(contribution_norms(captures.attentions[index], captures.layers[f"{name}.qkv"], modules[name]))
    prefix = anatomy.num_prefix_tokens
    if params.aggregate == "last":
        return MethodOutput(maps=patch_tokens_to_grid(matrices[0][:, 0, prefix:], anatomy))
    normalised = [add_residual_and_normalise(normalise_rows(m)) for m in matrices]
    return MethodOutput(maps=patch_tokens_to_grid(class_token_row(normalised)[:, prefix:], anatomy))
