"""Raw attention (the baseline of Abnar & Zuidema 2020): one block's attention (heads fused) from the class token,
or averaged over all query tokens, to each patch."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from service.explain.captures import CaptureBatch, CaptureNeeds
from service.model.anatomy import ModelAnatomy
from service.explain.registry import MethodOutput, register_method
from service.explain.methods._rollout import discard_lowest
from service.explain.methods._tokens import (
    TOKEN_DESCRIPTION,
    HeadFusion,
    TokenChoice,
    check_layer_index,
    check_token_choice,
    fuse_heads,
    patch_tokens_to_grid,
    token_row,
)


class RawAttentionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layer: int = Field(default=-1, description="Block index; negative values count from the last block.")
    head_fusion: HeadFusion = Field(default="mean", description="How the heads are fused: mean, max or min.")
    token: TokenChoice = Field(default="cls", description=TOKEN_DESCRIPTION)
    discard_ratio: float = Field(
        default=0.0, ge=0.0, lt=1.0,
        description="Fraction of the entries of the fused (N, N) matrix discarded before the row is taken: the "
        "int(ratio * N^2) lowest, ranked over the whole matrix, are set to zero, except those in prefix-token rows "
        "and columns (ranked, never zeroed), so it only changes `token: mean` maps.",
    )


def _check(params: RawAttentionParams, anatomy: ModelAnatomy) -> None:
    check_token_choice(params.token, anatomy)
    check_layer_index(params.layer, anatomy, "layer")


@register_method(
    name="raw_attention",
    description="One block's attention to each patch (heads fused), from the class token or averaged over all "
    "query tokens; prefix tokens dropped.",
    families=("vit",),
    class_specific=False,
    params_model=RawAttentionParams,
    needs=lambda params, anatomy: CaptureNeeds(attention=True),
    relative_cost=1.2,
    check=_check,
)
def raw_attention(captures: CaptureBatch, params: RawAttentionParams, anatomy: ModelAnatomy) -> MethodOutput:
    attention = fuse_heads(captures.attentions[params.layer % anatomy.num_layers], params.head_fusion)
    attention = discard_lowest(attention, params.discard_ratio, anatomy.num_prefix_tokens)
    return MethodOutput(maps=patch_tokens_to_grid(token_row(attention, params.token, anatomy), anatomy))
