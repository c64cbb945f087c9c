"""What a model is made of, decided at load time: its family (`vit` when built from ViT-style self-attention
blocks) and the attention modules whose probabilities can be recorded."""

from __future__ import annotations

import pytest
import timm
import torch

from service.model.anatomy import attention_modules, model_family
from tests.explain_helpers import VIT_VARIANTS, served_model


@pytest.mark.parametrize("variant", ["vit", "deit_distilled", "registers_nonsquare"])
def test_a_vit_is_the_vit_family_with_one_recordable_attention_per_block(variant: str) -> None:
    served = served_model(*VIT_VARIANTS[variant])
    blocks = served.network.blocks
    assert served.family == "vit"
    assert served.anatomy.attention_modules == tuple(f"blocks.{i}.attn" for i in range(len(blocks)))


def test_a_cnn_is_the_cnn_family_without_attention() -> None:
    served = served_model("test_resnet", {"num_classes": 10}, size=32)
    assert served.family == "cnn" and served.anatomy.attention_modules == ()


def test_a_hybrid_whose_attention_has_no_qkv_projection_loads_as_a_cnn() -> None:
    """PVT-v2 records attention (q and kv projections, no qkv) but has no single patch grid: it must load, as a CNN
    (deciding the family by recordable attention made its start-up fail)."""
    served = served_model("pvt_v2_b0", {"num_classes": 10}, size=64)
    assert attention_modules(served.network)  # recordable...
    assert served.family == "cnn"  # ...but not a ViT
    assert served.anatomy.feature_layer


def test_convit_with_gated_positional_attention_is_still_a_vit() -> None:
    torch.manual_seed(0)
    model = timm.create_model("convit_tiny", pretrained=False, num_classes=10)
    assert model_family(model) == "vit"
