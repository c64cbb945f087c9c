"""raw_attention and rollout against a plain re-derivation from attention matrices computed independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.attention_reference import discard_plainly
from tests.explain_helpers import VIT_VARIANTS, explain_direct, random_pixels, served_model


def independent_attentions(served, pixels: torch.Tensor) -> list[np.ndarray]:
    """Each block's attention probabilities recomputed from its qkv projection, with fused attention left on."""
    model = served.active_network
    inputs: list[torch.Tensor] = []
    handles = [block.attn.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
               for block in model.blocks]
    try:
        assert all(block.attn.fused_attn for block in model.blocks)  # the model keeps its fused kernel
        with torch.no_grad():
            model(pixels)
    finally:
        for h in handles:
            h.remove()
    matrices = []
    for block, x in zip(model.blocks, inputs):
        attn = block.attn
        b, n, c = x.shape
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        matrices.append(((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1).numpy().astype(np.float64))
    return matrices


def fuse(matrix: np.ndarray, how: str) -> np.ndarray:
    return {"mean": matrix.mean(0), "max": matrix.max(0), "min": matrix.min(0)}[how]


def reference_rollout(attentions: list[np.ndarray], image: int, prefix: int, grid, head_fusion: str,
                      discard_ratio: float, start_layer: int) -> np.ndarray:
    """One image at a time, written out plainly."""
    n = attentions[0].shape[-1]
    result = np.eye(n)
    for attention in attentions[start_layer:]:
        fused = discard_plainly(fuse(attention[image], head_fusion), discard_ratio, prefix)
        a = 0.5 * fused + 0.5 * np.eye(n)
        a = a / a.sum(axis=1, keepdims=True)
        result = a @ result
    return result[0, prefix:].reshape(grid)


@pytest.mark.parametrize("variant", sorted(VIT_VARIANTS))
@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
def test_raw_attention_matches_the_class_token_row(variant: str, head_fusion: str) -> None:
    architecture, kwargs = VIT_VARIANTS[variant]
    served = served_model(architecture, kwargs)
    pixels = random_pixels(served, 3)
    reference = independent_attentions(served, pixels)
    prefix, grid = served.anatomy.num_prefix_tokens, served.anatomy.grid_size
    for layer in (-1, 0):
        outcomes = explain_direct(served, pixels, [{"name": "raw_attention",
                                                    "params": {"layer": layer, "head_fusion": head_fusion}}])
        for i, outcome in enumerate(outcomes):
            expected = fuse(reference[layer][i], head_fusion)[0, prefix:].reshape(grid)
            got = outcome.methods[0].maps[0].numpy()
            assert got.shape == tuple(grid)
            np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VIT_VARIANTS))
@pytest.mark.parametrize(("head_fusion", "discard_ratio", "start_layer"),
                         [("mean", 0.0, 0), ("max", 0.5, 0), ("min", 0.0, 1), ("mean", 0.9, -2)])
def test_rollout_matches_a_per_image_re_derivation(variant, head_fusion, discard_ratio, start_layer) -> None:
    architecture, kwargs = VIT_VARIANTS[variant]
    served = served_model(architecture, kwargs)
    pixels = random_pixels(served, 3, seed=1)
    reference = independent_attentions(served, pixels)
    params = {"head_fusion": head_fusion, "discard_ratio": discard_ratio, "start_layer": start_layer}
    outcomes = explain_direct(served, pixels, [{"name": "rollout", "params": params}])
    start = start_layer % len(reference)
    for i, outcome in enumerate(outcomes):
        expected = reference_rollout(reference, i, served.anatomy.num_prefix_tokens, served.anatomy.grid_size,
                                     head_fusion, discard_ratio, start)
        np.testing.assert_allclose(outcome.methods[0].maps[0].numpy(), expected, atol=1e-5)


def test_discard_ratio_changes_the_map_and_keeps_class_token_entries() -> None:
    from service.explain.methods._rollout import discard_lowest

    attention = torch.rand(2, 5, 5)
    attention[:, 0, :] = 0.0  # the lowest values sit in the class-token row: they must survive
    kept = discard_lowest(attention, 0.5, num_prefix_tokens=1)
    assert torch.equal(kept[:, 0, :], attention[:, 0, :]) and torch.equal(kept[:, :, 0], attention[:, :, 0])
    # int(25 * 0.5) = 12 lowest of all 25 entries per image: the class-token row's 5 zeros are among them (ranked,
    # never zeroed), and so are the class-token column's entries below the 12th value; the rest are zeroed
    for image in range(2):
        lowest = attention[image].flatten().argsort(stable=True)[:12]
        in_prefix = int(((lowest // 5 == 0) | (lowest % 5 == 0)).sum())
        assert int((kept[image, 1:, 1:] == 0).sum()) == 12 - in_prefix
    served = served_model(*VIT_VARIANTS["vit"])
    pixels = random_pixels(served, 1, seed=4)
    plain, discarded = (explain_direct(served, pixels, [{"name": "rollout", "params": {"discard_ratio": r}}])[0]
                        .methods[0].maps[0] for r in (0.0, 0.9))
    assert not torch.allclose(plain, discarded)


def test_batched_equals_per_image_for_attention_methods() -> None:
    served = served_model(*VIT_VARIANTS["registers_nonsquare"])
    pixels = random_pixels(served, 4, seed=2)
    methods = ["raw_attention", {"name": "rollout", "params": {"discard_ratio": 0.5, "head_fusion": "max"}}]
    batched = explain_direct(served, pixels, methods)
    for i in range(4):
        single = explain_direct(served, pixels[i:i + 1], methods)[0]
        for m in range(2):
            torch.testing.assert_close(batched[i].methods[m].maps[0], single.methods[m].maps[0], atol=1e-5, rtol=1e-4)


def test_predict_path_keeps_fused_attention_after_explaining() -> None:
    served = served_model(*VIT_VARIANTS["vit"])
    explain_direct(served, random_pixels(served, 2), ["rollout"])
    assert all(block.attn.fused_attn for block in served.active_network.blocks)


@pytest.mark.parametrize("token", ["cls", "mean"])
def test_raw_attention_discard_ratio_matches_a_re_derivation(token: str) -> None:
    served = served_model(*VIT_VARIANTS["deit_distilled"])
    pixels = random_pixels(served, 2, seed=5)
    reference = independent_attentions(served, pixels)
    prefix, grid = served.anatomy.num_prefix_tokens, served.anatomy.grid_size
    outcomes = explain_direct(served, pixels, [{"name": "raw_attention",
                                                "params": {"token": token, "discard_ratio": 0.6, "layer": 1}}])
    for i, outcome in enumerate(outcomes):
        fused = discard_plainly(fuse(reference[1][i], "mean"), 0.6, prefix)
        row = fused[0] if token == "cls" else fused.mean(axis=0)
        np.testing.assert_allclose(outcome.methods[0].maps[0].numpy(), row[prefix:].reshape(grid), atol=1e-5)
