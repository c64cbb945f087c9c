"""Every attention-family method: batched equals per image, maps on the grid for prefix/register-token layouts."""

from __future__ import annotations

import pytest
import torch

from service.explain.registry import all_methods
from service.explain.targets import TargetRequest
from tests.explain_helpers import VIT_VARIANTS, explain_direct, random_pixels, served_model

FAMILY = [
    {"name": "raw_attention", "params": {"token": "mean", "head_fusion": "min"}},
    {"name": "rollout", "params": {"token": "mean", "discard_ratio": 0.5, "start_layer": 1}},
    {"name": "attention_layers", "params": {"aggregate": "rollout", "head_fusion": "max"}},
    {"name": "grad_rollout", "params": {"discard_ratio": 0.5}},
    {"name": "gae"},
    {"name": "norm_attention"},
    {"name": "norm_attention", "params": {"aggregate": "rollout"}},
    {"name": "attention_flow", "params": {"discard_ratio": 0.0}},
    {"name": "value_zeroing"},
    {"name": "value_zeroing", "params": {"aggregate": "rollout", "layer": 1}},
]


def test_the_family_is_registered_with_honest_costs() -> None:
    methods = all_methods()
    for spec in FAMILY:
        method = methods[spec["name"]]
        assert method.families == ("vit",) and method.relative_cost > 0 and method.description
    assert methods["grad_rollout"].class_specific and methods["gae"].class_specific
    assert not methods["attention_layers"].class_specific
    assert methods["value_zeroing"].relative_cost >= 10 and "Expensive" in methods["value_zeroing"].cost_note
    assert methods["attention_flow"].relative_cost >= 10 and methods["attention_flow"].cost_note


@pytest.mark.parametrize("variant", ["deit_distilled", "registers_nonsquare"])
def test_batched_equals_per_image_and_maps_have_the_grid_shape(variant: str) -> None:
    served = served_model(*VIT_VARIANTS[variant], seed=15)
    pixels = random_pixels(served, 3, seed=15)
    targets = [TargetRequest(index=2), TargetRequest(top_k=2), TargetRequest(index=5)]
    batched = explain_direct(served, pixels, FAMILY, targets=targets)
    grid = tuple(served.anatomy.grid_size)
    for i in range(3):
        (single,) = explain_direct(served, pixels[i:i + 1], FAMILY, targets=[targets[i]])
        assert batched[i].targets == single.targets
        for spec, ours, theirs in zip(FAMILY, batched[i].methods, single.methods):
            assert len(ours.maps) == len(theirs.maps) == (len(single.targets) if spec["name"] in ("gae", "grad_rollout")
                                                           else 1)
            for a, b in zip(ours.maps, theirs.maps):
                assert a.shape == grid, spec
                assert torch.isfinite(a).all(), spec
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m, spec=spec: f"{spec}: {m}")
            if ours.layers[0] is not None:
                torch.testing.assert_close(ours.layers[0], theirs.layers[0], atol=1e-6, rtol=1e-5)
                assert ours.layers[0].shape[1:] == grid
