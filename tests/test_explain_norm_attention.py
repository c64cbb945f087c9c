"""norm_attention (Kobayashi et al. 2020) against a token-by-token re-derivation from an explicit forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.attention_reference import explicit_forward, residual
from tests.explain_helpers import VIT_VARIANTS, explain_direct, random_pixels, served_model


def reference_norms(model, pixels: torch.Tensor) -> list[np.ndarray]:
    """Per block (B, N, N): ||sum_h alpha^h_ij v^h_j W_O^h|| written out one (image, i, j) at a time."""
    with torch.no_grad():
        trace = explicit_forward(model, pixels)
    result = []
    for block, attention, values in zip(model.blocks, trace.attentions, trace.values):
        weight = block.attn.proj.weight.double().numpy()
        alpha, v = attention.double().numpy(), values.double().numpy()  # (B, H, N, N), (B, H, N, d)
        batch, heads, n, d = v.shape
        norms = np.zeros((batch, n, n))
        for b in range(batch):
            transformed = [[v[b, h, j] @ weight[:, h * d:(h + 1) * d].T for h in range(heads)] for j in range(n)]
            for i in range(n):
                for j in range(n):
                    norms[b, i, j] = np.linalg.norm(sum(alpha[b, h, i, j] * transformed[j][h] for h in range(heads)))
        result.append(norms)
    return result


@pytest.mark.parametrize("variant", ["vit", "deit_distilled", "registers_nonsquare", "patch14", "patch32_nonsquare"])
def test_norm_attention_matches_a_token_by_token_re_derivation(variant: str) -> None:
    served = served_model(*VIT_VARIANTS[variant], seed=6)
    pixels = random_pixels(served, 2, seed=6)
    norms = reference_norms(served.active_network, pixels)
    prefix, grid = served.anatomy.num_prefix_tokens, served.anatomy.grid_size
    cases = [({"aggregate": "last"}, -1), ({"aggregate": "last", "layer": 0}, 0), ({"aggregate": "rollout"}, 2),
             ({"aggregate": "rollout", "layer": 1}, 1)]
    outcomes = explain_direct(served, pixels, [{"name": "norm_attention", "params": p} for p, _ in cases])
    for i, outcome in enumerate(outcomes):
        for m, (params, top) in enumerate(cases):
            if params["aggregate"] == "last":
                expected = norms[top][i][0, prefix:]
            else:
                product = np.eye(norms[0].shape[-1])
                for layer in range(top + 1):
                    matrix = norms[layer][i]
                    product = residual(matrix / matrix.sum(axis=1, keepdims=True)) @ product
                expected = product[0, prefix:]
            got = outcome.methods[m].maps[0].numpy()
            assert got.shape == tuple(grid)
            np.testing.assert_allclose(got, expected.reshape(grid), atol=1e-5, rtol=1e-4)


def test_norm_attention_differs_from_the_attention_weights() -> None:
    served = served_model(*VIT_VARIANTS["vit"], seed=6)
    pixels = random_pixels(served, 1, seed=7)
    (outcome,) = explain_direct(served, pixels, [{"name": "norm_attention", "params": {"aggregate": "last"}},
                                                 {"name": "raw_attention", "params": {"layer": -1}}])
    norm_map, weights = (m.maps[0].flatten() for m in outcome.methods)
    assert not torch.allclose(norm_map / norm_map.sum(), weights / weights.sum(), atol=1e-3)
