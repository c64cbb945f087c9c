"""AttnLRP (Achtibat et al. 2024, "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers")."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from service.explain.captures import CaptureBatch, CaptureNeeds
from service.explain.methods._attn_lrp import attn_lrp_relevance
from service.explain.methods._tokens import check_attention_modules, require_grid
from service.explain.registry import MethodOutput, register_method
from service.model.anatomy import ModelAnatomy


class AttnLrpParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    resolution: Literal["tokens", "pixels"] = Field(
        default="tokens",
        description="`tokens`: the relevance of each patch (the sum over its pixels and colour channels), one value "
        "per cell of the patch grid; `pixels`: one value per input pixel (summed over the colour channels).",
    )
    epsilon: float = Field(
        default=1e-6, ge=0.0, le=1.0,
        description="The epsilon rule's stabiliser on linear layers and convolutions: relevance R_y of an output y "
        "goes back as R_y / (y + epsilon * sign(y)) times each input's contribution. 0 is LRP-0 (the plain gradient "
        "there, and 10-25% faster on CPU); larger values absorb the relevance of weak, noisy activations.",
    )


def _check(params: AttnLrpParams, anatomy: ModelAnatomy) -> None:
    check_attention_modules(anatomy)
    require_grid(anatomy)
    for name in anatomy.attention_modules:
        if f"{name}.qkv" not in anatomy.module_names:
            raise ValueError(f"attention module {name!r} has no fused `qkv` projection to apply AttnLRP's rules to")
        if f"{name}.gate" in anatomy.module_names:
            raise ValueError(f"attention module {name!r} gates its output, which AttnLRP's rules here do not cover")


def sum_over_patches(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) pixel values -> (B, rows, cols) sums over each grid cell (cells of ceil(H / rows) x ceil(W / cols)
    pixels, the last ones cut at the border), so the grid keeps the map's total."""
    rows, cols = grid
    batch, height, width = maps.shape
    cell_h, cell_w = -(-height // rows), -(-width // cols)
    padded = F.pad(maps, (0, cols * cell_w - width, 0, rows * cell_h - height))
    return padded.reshape(batch, rows, cell_h, cols, cell_w).sum(dim=(2, 4))


@register_method(
    name="attn_lrp",
    description="AttnLRP (Achtibat et al. 2024): layer-wise relevance propagation of the target logit through the "
    "whole ViT in one modified backward pass: epsilon rule on linear layers, identity rule on LayerNorm and GELU, "
    "the paper's softmax rule and the uniform rule (half to each operand) on the query-key and attention-value "
    "products. Signed input relevance summed over the colour channels: over each patch (`tokens`, default) or per "
    "pixel; it sums to about the target logit (biases and the softmax absorb some).",
    families=("vit",),
    class_specific=True,
    params_model=AttnLrpParams,
    needs=lambda params, anatomy: CaptureNeeds(),
    relative_cost=3.5,
    cost_note="Its own forward pass and one modified backward pass per target, in chunks of the model's "
    "explain_chunk_size (the shared forward pass is not used: the rules must be in place during the forward).",
    check=_check,
)
def attn_lrp(captures: CaptureBatch, params: AttnLrpParams, anatomy: ModelAnatomy) -> MethodOutput:
    assert captures.runner is not None and captures.targets is not None
    relevance, _ = attn_lrp_relevance(captures.runner, captures.pixels, captures.targets, params.epsilon)
    maps = relevance.sum(dim=1)
    if params.resolution == "tokens":
        maps = sum_over_patches(maps, require_grid(anatomy))
    return MethodOutput(maps=maps)
