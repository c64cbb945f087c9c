"""grad_rollout and gae against re-derivations from attention and gradients of an explicit forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import BaseModel

from service.explain.captures import CaptureNeeds
from service.explain.pipeline import ExplainJob, MethodRequest, run_explain_batch
from service.explain.registry import ExplainMethod, MethodOutput
from service.explain.targets import TargetRequest
from tests.attention_reference import attentions_and_gradients, discard_plainly, fuse, residual, sharpen_heads
from tests.explain_helpers import VIT_VARIANTS, explain_direct, random_pixels, served_model

TARGETS = [3, 7, 1]


def reference_grad_rollout(attentions, grads, image, prefix, grid, head_fusion, discard_ratio, start_layer):
    n = attentions[0].shape[-1]
    result = np.eye(n)
    for attention, grad in list(zip(attentions, grads))[start_layer:]:
        weighted = np.maximum(attention[image] * grad[image], 0.0)
        result = residual(discard_plainly(fuse(weighted, head_fusion), discard_ratio, prefix)) @ result
    return result[0, prefix:].reshape(grid)


def reference_gae(attentions, grads, image, prefix, grid):
    """The per-image loop of Chefer et al.'s ViT notebook, averaging over the heads only."""
    n = attentions[0].shape[-1]
    relevance = np.eye(n)
    for attention, grad in zip(attentions, grads):
        cam = (grad[image] * attention[image]).clip(min=0).mean(axis=0)
        relevance = relevance + cam @ relevance
    return relevance[0, prefix:].reshape(grid)


def test_recorded_attention_gradients_equal_autograd_on_explicit_attention() -> None:
    served = served_model(*VIT_VARIANTS["registers_nonsquare"], seed=3)
    sharpen_heads(served)
    pixels = random_pixels(served, 3, seed=3)
    seen = []

    class NoParams(BaseModel):
        pass

    def keep(captures, params, anatomy):
        seen.append(captures)
        return MethodOutput(maps=torch.zeros(captures.logits.shape[0], *anatomy.grid_size))

    method = ExplainMethod(name="probe", description="", families=("vit",), class_specific=True,
                           params_model=NoParams, needs=lambda p, a: CaptureNeeds(attention_grad=True),
                           compute=keep, relative_cost=1.0)
    request = MethodRequest(method, NoParams(), CaptureNeeds(attention_grad=True))
    jobs = [ExplainJob(pixels[i], (request,), TargetRequest(index=t)) for i, t in enumerate(TARGETS)]
    run_explain_batch(served, jobs)
    (captures,) = seen
    attentions, grads = attentions_and_gradients(served.active_network, pixels, TARGETS)
    assert captures.targets.tolist() == TARGETS
    for ours, theirs in zip(captures.attentions, attentions):
        np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-6)
    for ours, theirs in zip(captures.attention_grads, grads):
        assert np.abs(theirs).max() > 0
        np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(("variant", "head_fusion", "discard_ratio", "start_layer"), [
    ("vit", "mean", 0.0, 0), ("vit", "max", 0.5, 0), ("deit_distilled", "min", 0.0, -2),
    ("deit_distilled", "mean", 0.9, 1), ("registers_nonsquare", "mean", 0.5, 0), ("registers_nonsquare", "max", 0.0, 1),
    ("patch14", "mean", 0.0, 0), ("patch32_nonsquare", "min", 0.5, 0),
])
def test_grad_rollout_matches_a_per_image_re_derivation(variant, head_fusion, discard_ratio, start_layer) -> None:
    served = served_model(*VIT_VARIANTS[variant], seed=1)
    sharpen_heads(served)
    pixels = random_pixels(served, 3, seed=1)
    attentions, grads = attentions_and_gradients(served.active_network, pixels, TARGETS)
    params = {"head_fusion": head_fusion, "discard_ratio": discard_ratio, "start_layer": start_layer}
    outcomes = explain_direct(served, pixels, [{"name": "grad_rollout", "params": params}],
                              targets=[TargetRequest(index=t) for t in TARGETS])
    prefix, grid = served.anatomy.num_prefix_tokens, served.anatomy.grid_size
    for i, outcome in enumerate(outcomes):
        expected = reference_grad_rollout(attentions, grads, i, prefix, grid, head_fusion, discard_ratio,
                                          start_layer % len(attentions))
        got = outcome.methods[0].maps[0].numpy()
        assert got.shape == tuple(grid)
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("variant", sorted(VIT_VARIANTS))
def test_gae_matches_the_fixed_per_image_notebook_loop(variant: str) -> None:
    served = served_model(*VIT_VARIANTS[variant], seed=2)
    sharpen_heads(served)
    pixels = random_pixels(served, 3, seed=2)
    attentions, grads = attentions_and_gradients(served.active_network, pixels, TARGETS)
    outcomes = explain_direct(served, pixels, ["gae"], targets=[TargetRequest(index=t) for t in TARGETS])
    prefix, grid = served.anatomy.num_prefix_tokens, served.anatomy.grid_size
    for i, outcome in enumerate(outcomes):
        expected = reference_gae(attentions, grads, i, prefix, grid)
        got = outcome.methods[0].maps[0].numpy()
        assert got.shape == tuple(grid)
        assert np.abs(expected).max() > 0
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-4)


def test_gae_is_not_the_batch_averaged_notebook() -> None:
    """Averaging over batch and heads together (the widely copied bug) would give every image the same map."""
    served = served_model(*VIT_VARIANTS["vit"], seed=2)
    pixels = random_pixels(served, 2, seed=5)
    outcomes = explain_direct(served, pixels, ["gae"], targets=[TargetRequest(index=t) for t in (3, 3)])
    assert not torch.allclose(outcomes[0].methods[0].maps[0], outcomes[1].methods[0].maps[0], atol=1e-4)


@pytest.mark.parametrize("method", ["grad_rollout", "gae"])
def test_different_targets_give_different_maps(method: str) -> None:
    served = served_model(*VIT_VARIANTS["deit_distilled"], seed=4)
    sharpen_heads(served)
    pixels = random_pixels(served, 2, seed=4)
    for outcome in explain_direct(served, pixels, [method], target=TargetRequest(top_k=3)):
        maps = outcome.methods[0].maps
        assert len(maps) == 3
        assert not torch.allclose(maps[0], maps[1], atol=1e-3) and not torch.allclose(maps[1], maps[2], atol=1e-3)
