"""discard_ratio (rollout, grad_rollout, attention_flow, raw_attention): the lowest fraction of ALL N^2 entries of
each fused matrix is selected, and those of them outside the prefix-token rows and columns are zeroed (Abnar &
Zuidema; jacobgil's vit-explain), checked against a numpy re-derivation written here independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.explain.methods._rollout import discard_lowest
from tests.explain_helpers import VIT_VARIANTS, explain_direct, random_pixels, served_model

DEIT_TOKENS = 197  # deit-tiny at 224: 14 x 14 patches and the class token
RATIOS = (0.1, 0.5, 0.9, 0.99, 0.995)


def distinct_matrices(batch: int, n: int, seed: int) -> torch.Tensor:
    """(batch, n, n) float32 matrices whose n^2 entries are pairwise distinct (a random permutation of k / n^2)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n * n, generator=generator).reshape(n, n).float() / (n * n)
                        for _ in range(batch)])


def tied_matrices(batch: int, n: int, seed: int) -> torch.Tensor:
    """(batch, n, n) matrices of only 4 distinct values: nearly every entry ties with many others."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (batch, n, n), generator=generator).float() / 4


def lowest_positions(matrix: np.ndarray, ratio: float) -> np.ndarray:
    """Flat (row-major) positions of the int(ratio * n^2) lowest entries, equal values in row-major order."""
    return np.argsort(matrix.ravel(), kind="stable")[: int(ratio * matrix.size)]


def in_prefix(positions: np.ndarray, n: int, prefix: int) -> np.ndarray:
    return (positions // n < prefix) | (positions % n < prefix)


def reference_discard(matrices: np.ndarray, ratio: float, prefix: int) -> np.ndarray:
    """Per image: rank every entry, take the lowest int(ratio * n^2), zero those not in a prefix row or column."""
    out = matrices.copy()
    n = matrices.shape[-1]
    for image in out:
        lowest = lowest_positions(image, ratio)
        lowest = lowest[~in_prefix(lowest, n, prefix)]
        image[lowest // n, lowest % n] = 0.0
    return out


@pytest.mark.parametrize("prefix", [1, 2])
@pytest.mark.parametrize("ratio", RATIOS)
def test_discard_lowest_matches_an_argsort_re_derivation_of_the_whole_matrix(ratio: float, prefix: int) -> None:
    attention = distinct_matrices(2, DEIT_TOKENS, seed=int(ratio * 1000) + prefix)
    expected = reference_discard(attention.numpy(), ratio, prefix)
    np.testing.assert_array_equal(discard_lowest(attention, ratio, prefix).numpy(), expected)


@pytest.mark.parametrize("prefix", [1, 2, 5])
@pytest.mark.parametrize("ratio", [0.3, 0.75, 0.99])
def test_ties_are_broken_in_row_major_order(ratio: float, prefix: int) -> None:
    attention = tied_matrices(3, 40, seed=prefix)
    expected = reference_discard(attention.numpy(), ratio, prefix)  # a stable argsort: earlier position is lower
    np.testing.assert_array_equal(discard_lowest(attention, ratio, prefix).numpy(), expected)
    assert torch.equal(discard_lowest(attention, ratio, prefix), discard_lowest(attention.clone(), ratio, prefix))


def test_ties_worked_example_prefix_entries_come_first_in_row_major_order() -> None:
    ones = torch.ones(1, 3, 3)
    # 9 equal entries: the 4 lowest are (0, 0), (0, 1), (0, 2), (1, 0), all in the class token's row or column
    assert torch.equal(discard_lowest(ones, 4 / 9, 1), ones)
    # the 5th lowest is (1, 1), the first patch-patch entry in row-major order
    expected = ones.clone()
    expected[0, 1, 1] = 0.0
    assert torch.equal(discard_lowest(ones, 5 / 9, 1), expected)


@pytest.mark.parametrize("prefix", [1, 2])
@pytest.mark.parametrize("ratio", RATIOS)
def test_zeroed_fraction_is_the_ratio_less_the_prefix_entries_among_the_lowest(ratio: float, prefix: int) -> None:
    n = DEIT_TOKENS
    attention = torch.randn(2, 3, n, n, generator=torch.Generator().manual_seed(7)).softmax(-1).mean(1)
    discarded = discard_lowest(attention, ratio, prefix)
    for image in range(2):
        lowest = lowest_positions(attention[image].numpy(), ratio)
        zeroed = int((discarded[image] == 0).sum())
        assert zeroed == len(lowest) - int(in_prefix(lowest, n, prefix).sum())
        assert abs(len(lowest) / n**2 - ratio) <= 1 / n**2  # int(ratio * n^2): the ratio within one entry
    # random attention: the prefix entries are ranked like any other, so about `ratio` of the patch block goes
    patch_fraction = float((discarded[:, prefix:, prefix:] == 0).float().mean())
    assert patch_fraction == pytest.approx(ratio, abs=0.005)


def test_prefix_entries_among_the_lowest_use_up_the_count() -> None:
    attention = distinct_matrices(1, 10, seed=3) + 1.0
    attention[:, 0, :] = 0.0  # the class-token row holds the 10 lowest values
    attention[:, 1:, 0] = 5.0  # and the class-token column the highest
    assert torch.equal(discard_lowest(attention, 0.1, 1), attention)  # int(100 * 0.1) = 10: none of them zeroed
    assert int((discard_lowest(attention, 0.15, 1) == 0).sum()) == 10 + 5  # 15 lowest, 10 of them protected


def test_ratios_0_99_and_0_995_give_different_matrices() -> None:
    attention = distinct_matrices(1, DEIT_TOKENS, seed=11)
    high, higher = discard_lowest(attention, 0.99, 1), discard_lowest(attention, 0.995, 1)
    assert not torch.equal(high, higher)
    assert bool((high[:, 1:, 1:] != 0).any())  # not every patch-patch entry is gone at 0.99


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("matrices", [distinct_matrices, tied_matrices])
def test_batched_equals_per_image(ratio: float, matrices) -> None:
    attention = matrices(3, DEIT_TOKENS, seed=5)
    batched = discard_lowest(attention, ratio, 2)
    for image in range(3):
        assert torch.equal(batched[image:image + 1], discard_lowest(attention[image:image + 1], ratio, 2))


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_ratio_zero_returns_the_input_unchanged(prefix: int) -> None:
    attention = distinct_matrices(2, DEIT_TOKENS, seed=2)
    assert torch.equal(discard_lowest(attention, 0.0, prefix), attention)
    assert torch.equal(discard_lowest(attention, 1e-6, prefix), attention)  # int(197^2 * 1e-6) = 0 entries


@pytest.mark.parametrize("prefix", [1, 2, 5])
@pytest.mark.parametrize("ratio", (0.0, *RATIOS, 0.9999))
def test_prefix_rows_and_columns_are_identical_before_and_after(ratio: float, prefix: int) -> None:
    attention = torch.rand(2, DEIT_TOKENS, DEIT_TOKENS, generator=torch.Generator().manual_seed(4))
    attention[:, :prefix, :] *= 1e-3  # the lowest values sit in the prefix rows and columns
    attention[:, :, :prefix] *= 1e-3
    discarded = discard_lowest(attention, ratio, prefix)
    assert torch.equal(discarded[:, :prefix, :], attention[:, :prefix, :])
    assert torch.equal(discarded[:, :, :prefix], attention[:, :, :prefix])
    changed = discarded[:, prefix:, prefix:] != attention[:, prefix:, prefix:]
    assert bool((discarded[:, prefix:, prefix:][changed] == 0).all())  # only zeroing, nothing else


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("ratio", [0.5, 0.99])
def test_the_same_entries_are_zeroed_on_cuda(ratio: float) -> None:
    for attention in (distinct_matrices(3, DEIT_TOKENS, seed=6), tied_matrices(3, DEIT_TOKENS, seed=6)):
        on_device = discard_lowest(attention.cuda(), ratio, 2)
        assert on_device.device.type == "cuda"
        assert torch.equal(on_device.cpu(), discard_lowest(attention, ratio, 2))


def test_ratios_0_99_and_0_995_give_different_maps_on_deit_tiny_at_224() -> None:
    served = served_model("deit_tiny_patch16_224", {}, seed=0)
    assert served.anatomy.num_prefix_tokens == 1 and tuple(served.anatomy.grid_size) == (14, 14)
    methods = [("rollout", {}), ("raw_attention", {"token": "mean"})]
    requests = [{"name": name, "params": dict(params, discard_ratio=r)} for name, params in methods for r in (0.99, 0.995)]
    (outcome,) = explain_direct(served, random_pixels(served, 1, seed=3), requests)  # one capture for all four
    maps = [m.maps[0] for m in outcome.methods]
    for high, higher in (maps[0:2], maps[2:4]):
        assert torch.isfinite(high).all() and torch.isfinite(higher).all()
        assert not torch.allclose(high, higher, atol=1e-7, rtol=0)


def test_rollout_with_discarding_batched_equals_per_image_through_the_registry() -> None:
    served = served_model(*VIT_VARIANTS["deit_distilled"], seed=6)  # class and distillation tokens
    assert served.anatomy.num_prefix_tokens == 2
    pixels = random_pixels(served, 3, seed=6)
    methods = [{"name": "rollout", "params": {"discard_ratio": r, "head_fusion": "max"}} for r in (0.5, 0.9, 0.99)]
    batched = explain_direct(served, pixels, methods)
    for image in range(3):
        (single,) = explain_direct(served, pixels[image:image + 1], methods)
        for m in range(len(methods)):
            torch.testing.assert_close(batched[image].methods[m].maps[0], single.methods[m].maps[0],
                                       atol=1e-6, rtol=1e-5)
