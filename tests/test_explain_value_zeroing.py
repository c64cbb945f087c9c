"""value_zeroing (Mohebbi et al. 2023) against a naive loop zeroing one token's values at a time."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from service.explain.methods.value_zeroing import value_zeroing_matrix
from tests.attention_reference import explicit_block, explicit_forward
from tests.explain_helpers import VIT_VARIANTS, explain_direct, random_pixels, served_model


def naive_value_zeroing(model, pixels: torch.Tensor) -> list[np.ndarray]:
    """Per block (B, N, N), rows normalised: [b, i, j] = 1 - cos(out_i, out_i with v_j zeroed), one j at a time,
    in float64 (cosine distances of the nearly parallel outputs of a random model are tiny)."""
    with torch.no_grad():
        trace = explicit_forward(model, pixels)
        result = []
        for block, inputs in zip(model.blocks, trace.block_inputs):
            block, inputs = copy.deepcopy(block).double(), inputs.double()
            batch, n, _ = inputs.shape
            matrix = np.zeros((batch, n, n))
            for b in range(batch):
                original = explicit_block(block, inputs[b:b + 1])[0][0].numpy()
                for j in range(n):
                    altered = explicit_block(block, inputs[b:b + 1], zero_value_token=j)[0][0].numpy()
                    for i in range(n):
                        a, o = altered[i], original[i]
                        # 1 - cos(a, o), written as half the squared distance of the unit vectors: 1 - cos itself
                        # cancels to nothing for the nearly parallel outputs of small layer scales
                        matrix[b, i, j] = 0.5 * np.sum((a / np.linalg.norm(a) - o / np.linalg.norm(o)) ** 2)
            result.append(matrix / matrix.sum(axis=2, keepdims=True))
    return result


# Not patch14: its randomly initialised layer scale (1e-5) makes each block change the residual stream by ~1e-5,
# so its cosine distances (~1e-12) are below what float32 outputs resolve; it is checked in float64 below.
@pytest.mark.parametrize("variant", ["vit", "deit_distilled", "registers_nonsquare", "patch32_nonsquare"])
def test_value_zeroing_matches_a_naive_loop(variant: str) -> None:
    served = served_model(*VIT_VARIANTS[variant], seed=10)
    pixels = random_pixels(served, 2, seed=10)
    reference = naive_value_zeroing(served.active_network, pixels)
    prefix, grid = served.anatomy.num_prefix_tokens, served.anatomy.grid_size
    cases = [({"aggregate": "rollout"}, 2), ({"aggregate": "rollout", "layer": 1}, 1), ({"aggregate": "last"}, 2),
             ({"aggregate": "last", "layer": 0}, 0)]
    outcomes = explain_direct(served, pixels, [{"name": "value_zeroing", "params": p} for p, _ in cases])
    for i, outcome in enumerate(outcomes):
        for m, (params, top) in enumerate(cases):
            if params["aggregate"] == "last":
                expected = reference[top][i][0, prefix:]
            else:
                product = np.eye(reference[0].shape[-1])
                for layer in range(top + 1):
                    product = reference[layer][i] @ product
                expected = product[0, prefix:]
            got = outcome.methods[m].maps[0].numpy()
            assert got.shape == tuple(grid)
            np.testing.assert_allclose(got, expected.reshape(grid), atol=1e-6, rtol=1e-3)


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_value_zeroing_chunking_does_not_change_the_matrix(chunk_size: int) -> None:
    served = served_model(*VIT_VARIANTS["registers_nonsquare"], seed=11)
    pixels = random_pixels(served, 2, seed=11)
    with torch.no_grad():
        inputs = explicit_forward(served.active_network, pixels).block_inputs[1]
    block = served.active_network.blocks[1]
    expected = value_zeroing_matrix(block, block.attn.qkv, inputs, chunk_size=29)
    torch.testing.assert_close(value_zeroing_matrix(block, block.attn.qkv, inputs, chunk_size), expected,
                               atol=1e-6, rtol=1e-5)
    # no hook is left behind: the block computes its ordinary output afterwards
    assert not block.attn.qkv._forward_hooks


def test_value_zeroing_of_a_layer_scale_block_in_float64() -> None:
    served = served_model(*VIT_VARIANTS["patch14"], seed=10)
    pixels = random_pixels(served, 2, seed=10)
    reference = naive_value_zeroing(served.active_network, pixels)
    with torch.no_grad():
        inputs = explicit_forward(served.active_network, pixels).block_inputs
    for layer, block in enumerate(served.active_network.blocks):
        block = copy.deepcopy(block).double()
        ours = value_zeroing_matrix(block, block.attn.qkv, inputs[layer].double(), chunk_size=3)
        ours = ours / ours.sum(dim=-1, keepdim=True)
        np.testing.assert_allclose(ours.numpy(), reference[layer], rtol=1e-6)
