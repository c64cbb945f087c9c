"""An independent, explicit ViT forward pass for checking the attention methods.

The model's own modules supply the weights, but the blocks are re-implemented here with attention computed
explicitly (softmax(q k^T * scale) @ v), so attention probabilities, their gradients, value vectors and block
outputs come from plain autograd rather than from the service's recording hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Trace:
    logits: torch.Tensor  # (B, classes), graph-attached
    attentions: list[torch.Tensor]  # per block (B, H, N, N), graph-attached
    block_inputs: list[torch.Tensor]  # per block (B, N, C)
    values: list[torch.Tensor]  # per block (B, H, N, d)


def explicit_block(block: torch.nn.Module, x: torch.Tensor, zero_value_token: int | None = None):
    """timm's Block with explicit attention; optionally with one token's value vectors zeroed in every head.
    Returns (output, attention probabilities, values)."""
    attn = block.attn
    b, n, _ = x.shape
    h = block.norm1(x)
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q, k = attn.q_norm(q), attn.k_norm(k)
    if zero_value_token is not None:
        v = v.clone()
        v[:, :, zero_value_token, :] = 0.0
    probabilities = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (probabilities @ v).transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim)
    x = x + block.ls1(attn.proj(out))
    x = x + block.ls2(block.mlp(block.norm2(x)))
    return x, probabilities, v


def explicit_forward(model: torch.nn.Module, pixels: torch.Tensor) -> Trace:
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(pixels))))
    attentions, inputs, values = [], [], []
    for block in model.blocks:
        inputs.append(x)
        x, probabilities, v = explicit_block(block, x)
        attentions.append(probabilities)
        values.append(v)
    logits = model.forward_head(model.norm(x))
    with torch.no_grad():
        torch.testing.assert_close(logits, model(pixels), atol=1e-4, rtol=1e-4)  # the re-implementation is faithful
    return Trace(logits, attentions, inputs, values)


def attentions_and_gradients(model: torch.nn.Module, pixels: torch.Tensor, targets: list[int]):
    """numpy (attentions, d(target logit of each image)/d(attention)), per block (B, H, N, N)."""
    with torch.enable_grad():
        trace = explicit_forward(model, pixels.clone().requires_grad_(True))  # the served model's weights are frozen
        score = trace.logits[torch.arange(len(targets)), torch.tensor(targets)].sum()
        grads = torch.autograd.grad(score, trace.attentions)
    as_np = lambda ts: [t.detach().double().numpy() for t in ts]  # noqa: E731
    return as_np(trace.attentions), as_np(grads)


def discard_plainly(fused: np.ndarray, ratio: float, prefix: int) -> np.ndarray:
    """The int(N * N * ratio) lowest of all N * N entries (prefix rows and columns ranked too; equal values in
    row-major order) selected, and those outside the prefix rows and columns zeroed (one image)."""
    fused = fused.copy()
    n = fused.shape[0]
    if ratio <= 0:
        return fused
    ranked = sorted((fused[r, c], r, c) for r in range(n) for c in range(n))
    for _, r, c in ranked[: int(n * n * ratio)]:
        if r >= prefix and c >= prefix:
            fused[r, c] = 0.0
    return fused


def residual(matrix: np.ndarray) -> np.ndarray:
    a = 0.5 * matrix + 0.5 * np.eye(matrix.shape[0])
    return a / a.sum(axis=1, keepdims=True)


def fuse(matrix: np.ndarray, how: str) -> np.ndarray:
    """(H, N, N) -> (N, N)."""
    return {"mean": matrix.mean(0), "max": matrix.max(0), "min": matrix.min(0)}[how]


def sharpen_heads(served, factor: float = 1000.0) -> None:
    """Scale the classifier heads of a random model so that the target logits depend strongly on the attention:
    with timm's small random init, A * dA is ~1e-4 and its non-linear effects (discarding, the rollout product)
    would hide below float32 noise."""
    with torch.no_grad():
        for name, module in served.active_network.named_modules():
            if name.startswith("head") and isinstance(module, torch.nn.Linear):
                module.weight.mul_(factor)
