"""Attention rollout arithmetic (Abnar & Zuidema 2020), shared by the methods that multiply per-block matrices."""

from __future__ import annotations

import torch

from service.explain.methods._tokens import HeadFusion, TokenChoice, fuse_heads


def discard_lowest(attention: torch.Tensor, ratio: float, num_prefix_tokens: int) -> torch.Tensor:
    """Each image's (N, N) matrix of a (B, N, N) batch with its lowest entries zeroed, as in Abnar & Zuidema's and
    jacobgil's vit-explain rollout: the k = int(ratio * N^2) lowest of ALL N^2 entries are selected (prefix-token
    rows and columns are ranked too), and those of them outside the prefix-token rows and columns are set to zero.
    The prefix-token rows and columns are never changed, so k minus the prefix entries that fall among the lowest
    are zeroed. Ties are broken by position, the same on every device: of equal values the one earlier in row-major
    order (lower row, then lower column) counts as the lower, as a stable sort of the flattened matrix orders them.
    Batched on the tensor's own device, O(N^2) per image (a selection, no sort); a ratio of 0 returns the input."""
    batch, n, _ = attention.shape
    count = int(n * n * ratio)
    if ratio <= 0.0 or count == 0:
        return attention
    flat = attention.reshape(batch, n * n)
    threshold = flat.kthvalue(count, dim=1, keepdim=True).values  # the k-th lowest value of each image
    below, tied = flat < threshold, flat == threshold
    # every entry below the threshold, then the first (row-major) of those equal to it, k in all
    selected = below | (tied & (tied.cumsum(dim=1) <= count - below.sum(dim=1, keepdim=True)))
    prefix = torch.zeros((n, n), dtype=torch.bool, device=attention.device)
    prefix[:num_prefix_tokens, :] = True
    prefix[:, :num_prefix_tokens] = True
    return attention.masked_fill(selected.reshape(batch, n, n) & ~prefix, 0.0)


def add_residual_and_normalise(attention: torch.Tensor) -> torch.Tensor:
    """0.5 * A + 0.5 * I, then each row rescaled to sum to 1."""
    identity = torch.eye(attention.shape[-1], dtype=attention.dtype, device=attention.device)
    mixed = 0.5 * attention + 0.5 * identity
    return mixed / mixed.sum(dim=-1, keepdim=True)


def rollout_matrix(attention: torch.Tensor, head_fusion: HeadFusion, discard_ratio: float,
                   num_prefix_tokens: int) -> torch.Tensor:
    """One block's (B, heads, N, N) attention as a rollout factor: heads fused, the lowest entries discarded, then
    the residual added and the rows renormalised."""
    return add_residual_and_normalise(discard_lowest(fuse_heads(attention, head_fusion), discard_ratio,
                                                     num_prefix_tokens))


def query_weights(token: TokenChoice, like: torch.Tensor) -> torch.Tensor:
    """The (N,) row vector picking a token-to-token matrix's row as `token_row` does, N the last dim of `like`:
    the class token's row (one-hot), or the mean over all rows (uniform 1/N)."""
    n = like.shape[-1]
    if token == "cls":
        weights = torch.zeros(n, dtype=like.dtype, device=like.device)
        weights[0] = 1.0
        return weights
    return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)


def rollout_row(matrices: list[torch.Tensor], row: torch.Tensor) -> torch.Tensor:
    """`row @ M_L @ ... @ M_1` as (B, N) for per-layer (B, N, N) matrices given first layer first, and a row vector
    (N,) or one per image (B, N), computed as vector-matrix products from the last layer down: N^2 work per layer
    instead of the full product's N^3 (197 times less for a 14 x 14-patch ViT)."""
    vector = (row.expand(matrices[0].shape[0], -1) if row.ndim == 1 else row)[:, None, :]
    for matrix in reversed(matrices):
        vector = vector @ matrix
    return vector[:, 0, :]


def class_token_row(matrices: list[torch.Tensor]) -> torch.Tensor:
    """The class token's row (B, N) of the rollout product of per-layer (B, N, N) matrices, first layer first."""
    return rollout_row(matrices, query_weights("cls", matrices[0]))


def normalise_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Each row divided by its sum (rows summing to zero stay zero; no epsilon, tiny rows stay exact)."""
    sums = matrix.sum(dim=-1, keepdim=True)
    return matrix / torch.where(sums == 0, torch.ones_like(sums), sums)
