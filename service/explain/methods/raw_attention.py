"""Raw attention: the class token's attention row in one block, heads fused, over the patch grid."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from service.explain.captures import CaptureBatch, CaptureNeeds, ModelAnatomy
from service.explain.registry import MethodOutput, register_method
from service.explain.tokens import HeadFusion, check_class_token_attention, check_layer_index, fuse_heads, patch_tokens_to_grid


class RawAttentionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layer: int = Field(default=-1, description="Block index; negative values count from the last block.")
    head_fusion: HeadFusion = Field(default="mean", description="How the heads are fused: mean, max or min.")


def _check(params: RawAttentionParams, anatomy: ModelAnatomy) -> None:
    check_class_token_attention(anatomy)
    check_layer_index(params.layer, anatomy, "layer")


@register_method(
    name="raw_attention",
    description="The class token's attention to each patch in one block (heads fused), prefix tokens dropped.",
    families=("vit",),
    class_specific=False,
    params_model=RawAttentionParams,
    needs=lambda params, anatomy: CaptureNeeds(attention=True),
    relative_cost=1.05,
    check=_check,
)
def raw_attention(captures: CaptureBatch, params: RawAttentionParams, anatomy: ModelAnatomy) -> MethodOutput:
    attention = fuse_heads(captures.attentions[params.layer % anatomy.num_layers], params.head_fusion)
    class_row = attention[:, 0, anatomy.num_prefix_tokens:]
    return MethodOutput(maps=patch_tokens_to_grid(class_row, anatomy))
