"""`transformer_attribution` against a direct, per-image re-derivation of Chefer, Gur & Wolf 2021: an explicit
float64 forward pass through the tiny ViT's blocks, then the authors' relevance propagation written out layer by
layer as their `relprop` methods compute it (github.com/hila-chefer/Transformer-Explainability,
modules/layers_ours.py, baselines/ViT/ViT_LRP.py), the attention gradients by autograd, and their rollout
(`benchmarks.relevance_references.chefer_map`, shared with `saliency-server bench`). Also:
batched (and chunked) maps equal per-image maps, targets change the maps, the model is left as it was, and models
whose blocks are wired otherwise are refused rather than explained wrongly."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from benchmarks.relevance_references import chefer_map
from service.explain.methods.transformer_attribution import attention_relevance
from service.explain.targets import TargetRequest
from tests.explain_helpers import VIT_VARIANTS, explain_direct, random_pixels, served_model, stack_maps

TARGETS = [3, 7, 1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def method_maps(served, pixels, targets, chunk_size=None, **params):
    outcomes = explain_direct(served, pixels, [{"name": "transformer_attribution", "params": params}],
                              targets=[TargetRequest(index=t) for t in targets], chunk_size=chunk_size)
    return stack_maps(outcomes)


@pytest.mark.parametrize(("variant", "start_layer"), [
    ("vit", 0), ("vit", 1), ("vit", -1), ("registers_nonsquare", 0), ("patch14", 0), ("patch32_nonsquare", 1),
])
def test_matches_a_per_image_re_derivation_of_the_paper(variant: str, start_layer: int) -> None:
    served = served_model(*VIT_VARIANTS[variant], seed=1)
    pixels = random_pixels(served, 3, seed=1)
    got = method_maps(served, pixels, TARGETS, start_layer=start_layer)
    grid = served.anatomy.grid_size
    for i, target in enumerate(TARGETS):
        expected, _ = chefer_map(served.network, pixels[i:i + 1], target, start_layer % served.anatomy.num_layers)
        expected = expected.reshape(grid).float()
        assert expected.abs().max() > 0
        # float32 against float64: measured up to 7.8e-6 of the largest value, 6.8e-5 relative
        torch.testing.assert_close(got[i], expected, rtol=2e-4, atol=2e-5 * float(expected.abs().max()))


def test_the_attention_relevance_matches_the_re_derivation() -> None:
    """R_b itself (before the gradient and the rollout), every block, every head, every image of one batch."""
    served = served_model(*VIT_VARIANTS["vit"], seed=2)
    pixels = random_pixels(served, 3, seed=2)
    relevances = attention_relevance(served.network, served.anatomy, pixels, torch.tensor(TARGETS), 0)
    for i, target in enumerate(TARGETS):
        _, expected = chefer_map(served.network, pixels[i:i + 1], target, 0)
        got = torch.stack([r[i] for r in relevances]).double()
        assert expected.abs().max() > 0
        # float32 against float64: measured up to 1.2e-5 of the largest magnitude
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-3, atol=5e-5 * float(expected.abs().max()))


def test_batched_and_chunked_maps_equal_per_image_maps() -> None:
    served = served_model(*VIT_VARIANTS["deit_distilled"], seed=3)
    pixels = random_pixels(served, 3, seed=3)
    batched = method_maps(served, pixels, TARGETS, chunk_size=2)
    for i, target in enumerate(TARGETS):
        alone = method_maps(served, pixels[i:i + 1], [target])
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-5, atol=1e-6 * float(alone.abs().max()))


def test_different_targets_give_different_maps() -> None:
    served = served_model(*VIT_VARIANTS["vit"], seed=4)
    pixels = random_pixels(served, 1, seed=4)
    maps = [method_maps(served, pixels, [t])[0] for t in (0, 4, 9)]
    for a, b in ((0, 1), (1, 2), (0, 2)):
        assert not torch.allclose(maps[a], maps[b], atol=1e-3 * float(maps[a].abs().max())), (a, b)


def hooks_and_switches(network):
    return (sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in network.modules()),
            [m.fused_attn for m in network.modules() if hasattr(m, "fused_attn")])


def test_the_model_is_left_as_it_was_even_when_the_pass_fails() -> None:
    served = served_model(*VIT_VARIANTS["vit"], seed=5)
    network = served.network
    before = hooks_and_switches(network)
    weights = {name: p.clone() for name, p in network.named_parameters()}
    pixels = random_pixels(served, 2, seed=5)
    attention_relevance(network, served.anatomy, pixels, torch.tensor([1, 2]), 0)
    assert hooks_and_switches(network) == before and before[0] == 0 and all(before[1])
    with pytest.raises(IndexError):  # the one-hot's index fails after the forward pass, hooks in place
        attention_relevance(network, served.anatomy, pixels, torch.tensor([1, 99]), 0)
    assert hooks_and_switches(network) == before
    assert all(torch.equal(p, weights[name]) for name, p in network.named_parameters())


def test_blocks_wired_otherwise_are_refused() -> None:
    """A post-norm block (timm's ResPostBlock: x + norm1(attn(x))) has every module the hooks need, but its additions
    are not the pre-norm block's: the relevance pass notices instead of propagating through the wrong graph."""
    from timm.models.vision_transformer import ResPostBlock

    served = served_model(*VIT_VARIANTS["vit"], seed=6)
    torch.manual_seed(6)
    kwargs = dict(VIT_VARIANTS["vit"][1], block_fn=ResPostBlock)
    served.network = timm.create_model("vit_tiny_patch16_224", **kwargs).eval().requires_grad_(False)
    served.copies = [served.network]
    with pytest.raises(ValueError, match="transformer_attribution: block 0.s norm2 input"):
        method_maps(served, random_pixels(served, 1, seed=6), [1])
    assert hooks_and_switches(served.network)[0] == 0


def test_models_without_a_class_token_are_refused() -> None:
    served = served_model("vit_tiny_patch16_224", dict(VIT_VARIANTS["vit"][1], class_token=False,
                                                       global_pool="avg"), seed=7)
    with pytest.raises(Exception, match="class token"):
        method_maps(served, random_pixels(served, 1, seed=7), [1])
