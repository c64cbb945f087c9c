"""What a model is made of, worked out once at load time: its family, attention modules, prefix tokens, patch grid,
default Grad-CAM layer and head. Explanation methods read it; nothing here explains anything."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from service.model.head import PooledLinearHead, analyse_pooled_linear_head, trace_final_features


@dataclass(frozen=True)
class ModelAnatomy:
    """Where things are in a model, worked out once at load time."""

    family: str  # vit | cnn
    attention_modules: tuple[str, ...]  # timm attention modules in depth order
    num_prefix_tokens: int
    has_class_token: bool
    grid_size: tuple[int, int] | None  # ViT patch grid (rows, cols)
    feature_layer: str  # default Grad-CAM layer: the last block's norm1 (ViT) or the last feature map (CNN)
    module_names: frozenset[str]
    # logits = linear(optional LayerNorm(average of the final features)), verified at load time (CAM needs it)
    pooled_linear_head: PooledLinearHead | None = None
    head_note: str | None = None  # why pooled_linear_head is None

    @property
    def num_layers(self) -> int:
        return len(self.attention_modules)


def is_recordable_attention(module: nn.Module) -> bool:
    """Whether the module is a timm attention module whose probabilities can be recorded: it has heads, a
    fused/explicit switch (`fused_attn`) and an `attn_drop` module applied to the softmax probabilities."""
    return (hasattr(module, "fused_attn") and isinstance(getattr(module, "attn_drop", None), nn.Module)
            and hasattr(module, "num_heads"))


def is_self_attention_block(module: nn.Module) -> bool:
    """Whether the module is a ViT-style multi-head self-attention: one `qkv` projection and a head count."""
    return hasattr(module, "qkv") and hasattr(module, "num_heads")


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The recordable attention modules (`is_recordable_attention`), in depth order."""
    return [(name, module) for name, module in model.named_modules() if is_recordable_attention(module)]


def first_tensor(output: object) -> torch.Tensor:
    """A module's output (or inputs) as one tensor: the tensor itself, or the first of a tuple or list."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot record a module output of type {type(output).__name__}")


def model_family(model: nn.Module) -> str:
    """`vit` when the model is built from ViT-style self-attention blocks (`is_self_attention_block`), else `cnn`.

    Not "has recordable attention": hybrids such as PVT-v2 and Twins record attention through modules without a
    `qkv` projection and have no single patch grid, so they are served (and explained) as CNNs; CaiT's class-attention
    blocks are recordable while its self-attention blocks are not. Tested on those models in tests/test_anatomy.py.
    """
    return "vit" if any(is_self_attention_block(module) for module in model.modules()) else "cnn"


def _last_feature_map_layer(model: nn.Module, input_size: tuple[int, int, int]) -> str:
    """The outermost module whose output is the tensor `forward_features` returns (CNNs)."""
    param = next(model.parameters())
    _, producer = trace_final_features(model, torch.zeros((1, *input_size), dtype=param.dtype, device=param.device))
    if producer is None:
        raise ValueError("cannot find the module producing the final feature map")
    return producer


def analyse_model(model: nn.Module, family: str, input_size: tuple[int, int, int]) -> ModelAnatomy:
    """Find the attention modules, prefix tokens, patch grid and default Grad-CAM layer of a timm model."""
    names = frozenset(name for name, _ in model.named_modules() if name)
    attn = tuple(name for name, _ in attention_modules(model))
    num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0)) if family == "vit" else 0
    try:
        head, head_note = analyse_pooled_linear_head(model, input_size, num_prefix_tokens)
    except Exception as exc:  # an unusual model must still load; CAM is then unavailable
        head, head_note = None, f"its head could not be analysed ({type(exc).__name__}: {exc})"
    if family == "vit":
        patch_embed = getattr(model, "patch_embed", None)
        grid = tuple(patch_embed.grid_size) if patch_embed is not None else None
        blocks = getattr(model, "blocks", None)
        feature_layer = f"blocks.{len(blocks) - 1}.norm1" if blocks is not None else attn[-1]
        return ModelAnatomy(
            family=family,
            attention_modules=attn,
            num_prefix_tokens=num_prefix_tokens,
            has_class_token=bool(getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None)),
            grid_size=grid,  # type: ignore[arg-type]
            feature_layer=feature_layer,
            module_names=names,
            pooled_linear_head=head,
            head_note=head_note,
        )
    return ModelAnatomy(
        family=family, attention_modules=attn, num_prefix_tokens=0, has_class_token=False, grid_size=None,
        feature_layer=_last_feature_map_layer(model, input_size), module_names=names,
        pooled_linear_head=head, head_note=head_note,
    )
