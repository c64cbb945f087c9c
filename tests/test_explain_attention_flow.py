"""attention_flow against networkx's max-flow over the same layered graph, built from an explicit forward pass."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch

from tests.attention_reference import discard_plainly, explicit_forward, fuse, residual
from tests.explain_helpers import VIT_VARIANTS, explain_direct, random_pixels, served_model


def reference_flows(attentions: list[np.ndarray], prefix: int, head_fusion: str, discard_ratio: float) -> np.ndarray:
    """Float capacities, every edge of every layer (top layer included), one networkx max-flow per patch."""
    matrices = [residual(discard_plainly(fuse(a, head_fusion), discard_ratio, prefix)) for a in attentions]
    n = matrices[0].shape[0]
    graph = nx.DiGraph()
    for layer, matrix in enumerate(matrices):
        for i in range(n):
            for j in range(n):
                if matrix[i, j] > 0:
                    graph.add_edge((layer, j), (layer + 1, i), capacity=float(matrix[i, j]))
    sink = (len(matrices), 0)
    return np.array([nx.maximum_flow_value(graph, (0, p), sink) for p in range(prefix, n)])


@pytest.mark.parametrize(("variant", "head_fusion", "discard_ratio"), [
    ("vit", "mean", 0.0), ("deit_distilled", "max", 0.5), ("registers_nonsquare", "mean", 0.0),
    ("registers_nonsquare", "min", 0.9), ("patch32_nonsquare", "mean", 0.5),
])
def test_attention_flow_matches_networkx(variant: str, head_fusion: str, discard_ratio: float) -> None:
    served = served_model(*VIT_VARIANTS[variant], seed=8)
    pixels = random_pixels(served, 2, seed=8)
    with torch.no_grad():
        attentions = [a.double().numpy() for a in explicit_forward(served.active_network, pixels).attentions]
    params = {"head_fusion": head_fusion, "discard_ratio": discard_ratio}
    outcomes = explain_direct(served, pixels, [{"name": "attention_flow", "params": params}])
    prefix, grid = served.anatomy.num_prefix_tokens, served.anatomy.grid_size
    for i, outcome in enumerate(outcomes):
        expected = reference_flows([a[i] for a in attentions], prefix, head_fusion, discard_ratio)
        got = outcome.methods[0].maps[0].numpy()
        assert got.shape == tuple(grid)
        assert expected.max() > 0
        # capacities are rounded to multiples of 1e-6: a cut of at most N edges moves by at most N * 5e-7
        np.testing.assert_allclose(got, expected.reshape(grid), atol=1e-4)


def test_attention_flow_differs_from_rollout_and_sparsifying_changes_it() -> None:
    served = served_model(*VIT_VARIANTS["vit"], seed=8)
    pixels = random_pixels(served, 1, seed=9)
    (outcome,) = explain_direct(served, pixels, [
        {"name": "attention_flow", "params": {"discard_ratio": 0.0}},
        {"name": "attention_flow", "params": {"discard_ratio": 0.9}},
        "rollout",
    ])
    dense, sparse, rollout = (m.maps[0] for m in outcome.methods)
    assert not torch.allclose(dense, sparse, atol=1e-4) and not torch.allclose(dense, rollout, atol=1e-4)


def test_attention_flow_finishes_for_deit_tiny_at_224() -> None:
    served = served_model("deit_tiny_patch16_224", {}, seed=0)
    (outcome,) = explain_direct(served, random_pixels(served, 1), ["attention_flow"])
    flow_map = outcome.methods[0].maps[0]
    assert flow_map.shape == (14, 14) and torch.isfinite(flow_map).all() and (flow_map > 0).all()
    # the class token's in-capacity at the top is one matrix row, 1 up to the rounding of its N capacities
    assert (flow_map <= 1.0 + 1e-4).all()
