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
    # Modules whose output is a spatial map (Grad-CAM's `target_layer` candidates), in the order they run: (B, C, h, w)
    # feature maps (on a ViT, only the patch grid's h x w) and ViT token sequences holding the prefix tokens and the
    # patch grid. None when the probe forward failed (every module is then accepted, as before).
    spatial_modules: tuple[str, ...] | None = None

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


def _is_spatial(shape: tuple[int, ...], grid: tuple[int, int] | None, num_prefix_tokens: int) -> bool:
    """Whether an output of this shape can be a Grad-CAM map (what `token_features_to_map` accepts)."""
    if grid is None:  # CNN: any (B, C, h, w) feature map
        return len(shape) == 4 and shape[2] >= 1 and shape[3] >= 1
    rows, cols = grid
    if len(shape) == 4:  # e.g. the patch embedding's convolution: only maps on the patch grid
        return (shape[2], shape[3]) == (rows, cols)
    return len(shape) == 3 and shape[1] - num_prefix_tokens == rows * cols


def spatial_output_modules(
    model: nn.Module, input_size: tuple[int, int, int], grid: tuple[int, int] | None, num_prefix_tokens: int
) -> tuple[str, ...] | None:
    """The modules whose output is a spatial map, found by one probe forward recording every module's output shape
    (in the order the modules run). None if the probe fails: an unusual model must still load."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            try:
                shapes.setdefault(name, tuple(first_tensor(output).shape))
            except TypeError:  # an output that is not a tensor can be no map
                pass
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in model.named_modules() if name]
    try:
        param = next(model.parameters())
        with torch.inference_mode():
            model(torch.zeros((1, *input_size), dtype=param.dtype, device=param.device))
    except Exception:  # noqa: BLE001 - see the docstring
        return None
    finally:
        for handle in handles:
            handle.remove()
    return tuple(name for name, shape in shapes.items() if _is_spatial(shape, grid, num_prefix_tokens))


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
            spatial_modules=spatial_output_modules(model, input_size, grid, num_prefix_tokens),  # type: ignore[arg-type]
        )
    return ModelAnatomy(
        family=family, attention_modules=attn, num_prefix_tokens=0, has_class_token=False, grid_size=None,
        feature_layer=_last_feature_map_layer(model, input_size), module_names=names,
        pooled_linear_head=head, head_note=head_note,
        spatial_modules=spatial_output_modules(model, input_size, None, 0),
    )
