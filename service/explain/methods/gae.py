"""Generic Attention-model Explainability (Chefer, Gur & Wolf 2021), the self-attention (ViT) rule."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from service.explain.captures import CaptureBatch, CaptureNeeds
from service.model.anatomy import ModelAnatomy
from service.explain.registry import MethodOutput, register_method
from service.explain.methods._tokens import (
    ATTENTION_GRADIENT_COST_NOTE,
    check_class_token_attention,
    patch_tokens_to_grid,
)


class GaeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@register_method(
    name="gae",
    description="Chefer, Gur & Wolf 2021 (GAE): R = I; for every block R += mean over heads of "
    "clamp(dA * A, min=0) @ R, with dA the gradient of the target logit; class-token row of R over the patches. "
    "Computed per image (heads averaged, never the batch).",
    families=("vit",),
    class_specific=True,
    params_model=GaeParams,
    needs=lambda params, anatomy: CaptureNeeds(attention_grad=True),
    relative_cost=2.6,
    cost_note=ATTENTION_GRADIENT_COST_NOTE,
    check=lambda params, anatomy: check_class_token_attention(anatomy),
)
def gae(captures: CaptureBatch, params: GaeParams, anatomy: ModelAnatomy) -> MethodOutput:
    assert captures.attention_grads is not None
    first = captures.attentions[0]
    batch, _, n, _ = first.shape
    relevance = torch.eye(n, dtype=first.dtype, device=first.device).expand(batch, n, n)
    for attention, grad in zip(captures.attentions, captures.attention_grads):
        weighted = (grad * attention).clamp(min=0).mean(dim=1)  # (B, N, N): heads only, image by image
        relevance = relevance + weighted @ relevance
    return MethodOutput(maps=patch_tokens_to_grid(relevance[:, 0, anatomy.num_prefix_tokens:], anatomy))
