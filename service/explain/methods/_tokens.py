"""Token bookkeeping shared by the attention methods: head fusion, prefix tokens, reshaping to the grid; and the
cost note of the methods that take the gradient of the attention (grad_rollout, gae)."""

from __future__ import annotations

from typing import Literal

import torch

from service.model.anatomy import ModelAnatomy

HeadFusion = Literal["mean", "max", "min"]
TokenChoice = Literal["cls", "mean"]
TOKEN_DESCRIPTION = (
    "Which row of the token-to-token matrix becomes the map: `cls`, the class token's row (needs a class token), "
    "or `mean`, the mean over all query rows, prefix tokens included (Mylonas et al. 2022; works without a class "
    "token). Either way restricted to the patch columns."
)
ATTENTION_GRADIENT_COST_NOTE = "One backward pass per target class on top of the shared forward pass."


def fuse_heads(attention: torch.Tensor, how: HeadFusion) -> torch.Tensor:
    """(B, heads, N, N) -> (B, N, N) by mean, max or min over heads."""
    if how == "mean":
        return attention.mean(dim=1)
    if how == "max":
        return attention.amax(dim=1)
    return attention.amin(dim=1)


def patch_tokens_to_grid(values: torch.Tensor, anatomy: ModelAnatomy) -> torch.Tensor:
    """Values over the patch tokens (B, n_patches) -> (B, rows, cols)."""
    rows, cols = require_grid(anatomy)
    return values.reshape(values.shape[0], rows, cols)


def token_features_to_map(features: torch.Tensor, anatomy: ModelAnatomy) -> torch.Tensor:
    """Block features (B, N, C) with prefix tokens -> (B, C, rows, cols); CNN maps (B, C, H, W) pass through."""
    if features.ndim == 4:
        return features
    if features.ndim != 3:
        raise ValueError(f"cannot turn a layer output of shape {tuple(features.shape)} into a spatial map")
    rows, cols = require_grid(anatomy)
    patches = features[:, anatomy.num_prefix_tokens:, :]
    if patches.shape[1] != rows * cols:
        raise ValueError(f"layer has {patches.shape[1]} patch tokens, expected a {rows}x{cols} grid")
    return patches.transpose(1, 2).reshape(features.shape[0], features.shape[2], rows, cols)


def require_grid(anatomy: ModelAnatomy) -> tuple[int, int]:
    if anatomy.grid_size is None:
        raise ValueError("this model has no patch grid")
    return anatomy.grid_size


def check_class_token_attention(anatomy: ModelAnatomy) -> None:
    """Raise ValueError unless the model exposes attention probabilities and has a class token."""
    if not anatomy.attention_modules:
        raise ValueError("this model exposes no timm attention modules whose probabilities can be recorded")
    if not anatomy.has_class_token:
        raise ValueError("this model has no class token (it pools its tokens), so there is no class-token row")


def check_attention_modules(anatomy: ModelAnatomy) -> None:
    """Raise ValueError unless the model exposes attention probabilities (a class token is not required)."""
    if not anatomy.attention_modules:
        raise ValueError("this model exposes no timm attention modules whose probabilities can be recorded")


def check_token_choice(token: TokenChoice, anatomy: ModelAnatomy) -> None:
    """`cls` needs a class token; `mean` (the mean over all query rows) works for any ViT."""
    if token == "cls":
        check_class_token_attention(anatomy)
    else:
        check_attention_modules(anatomy)


def token_row(matrices: torch.Tensor, token: TokenChoice, anatomy: ModelAnatomy) -> torch.Tensor:
    """(B, N, N) token-to-token matrices -> (B, n_patches): the class-token row, or the mean over all N rows
    (every query token, prefix tokens included; Mylonas et al. 2022), restricted to the patch columns."""
    row = matrices[:, 0, :] if token == "cls" else matrices.mean(dim=1)
    return row[:, anatomy.num_prefix_tokens:]


def check_layer_index(layer: int, anatomy: ModelAnatomy, field: str) -> int:
    """A layer index (negative counts from the last) as a non-negative index, or ValueError naming the field."""
    n = anatomy.num_layers
    if not -n <= layer < n:
        raise ValueError(f"params.{field}: layer {layer} is out of range for a model with {n} blocks ({-n}..{n - 1})")
    return layer % n


def aggregated_layers(layer: int, aggregate: str, anatomy: ModelAnatomy) -> list[int]:
    """The blocks of a per-block method with `aggregate` `last` (block `layer` alone) or `rollout` (blocks 0 up to
    `layer`); negative `layer` counts from the last block."""
    top = layer % anatomy.num_layers
    return [top] if aggregate == "last" else list(range(top + 1))


def token_count(anatomy: ModelAnatomy) -> int:
    """Tokens per block of a ViT (prefix tokens plus the patch grid): what token-wise methods' cost grows with."""
    rows, cols = anatomy.grid_size or (0, 0)
    return max(1, anatomy.num_prefix_tokens + rows * cols)
