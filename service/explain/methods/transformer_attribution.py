"""Transformer attribution (Chefer, Gur & Wolf 2021, "Transformer Interpretability Beyond Attention Visualization"):
the LRP relevance of each block's attention map times its gradient, positive part, averaged over heads, rolled out.

The relevance of the attention maps comes from one LRP pass with the rules of the authors' code
(github.com/hila-chefer/Transformer-Explainability, `modules/layers_ours.py` and `baselines/ViT/ViT_LRP.py`),
applied at run time to timm's own modules (no copy of timm's model code): forward hooks replace a module's output by
the same values carried by an autograd function whose backward pass maps the output's relevance to its input's, so
the one backward pass of the batch propagates relevance instead of gradients:

- linear layers (qkv, proj, fc1, fc2, the head): LRP-alpha1-beta0, R_j = sum_i (x_j w_ji)^+ / sum_j' (x_j' w_j'i)^+
  R_i (biases take no part);
- LayerNorm, GELU, LayerScale, softmax, dropout: identity (relevance passes unchanged);
- attention, A @ V: R_A = A * ((R / (A V)) V^T) / 2 and R_V = V * (A^T (R / (A V))) / 2; q k^T likewise, halved
  between q and k (the product rule of the reference, one half to each factor);
- residual additions x + f(x): R_x = x * R / (x + f), R_f = f * R / (x + f), each part then rescaled so that its
  sum is |its sum| / (|sum R_x| + |sum R_f|) times the sum of R (per image; the reference sums over its batch of 1);
- relevance reaching a tensor used twice (the residual stream) is summed; the start relevance is the target's one-hot.

Every division is the reference's `safe_divide` (a / (b + 1e-9), 0 where b == 0). With R_b the relevance of block
b's attention map and dA_b the gradient of the target logit with respect to it (the batch's shared backward pass),
Rbar_b = mean over heads of (dA_b * R_b)^+, and the map is the class token's row of
(I + Rbar_L) ... (I + Rbar_start) over the patches, without row normalisation (as ViT_LRP.py's rollout). Every
step runs on the whole batch at once (the reference runs one image)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.hooks import RemovableHandle

from service.explain.captures import CaptureBatch, CaptureNeeds
from service.explain.methods._tokens import check_class_token_attention, check_layer_index, patch_tokens_to_grid
from service.explain.registry import MethodOutput, register_method
from service.model.anatomy import ModelAnatomy

NORMALISATIONS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


class TransformerAttributionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start_layer: int = Field(
        default=0,
        description="First block of the rollout product (the relevance pass stops there); negative counts from the "
        "last.",
    )


def safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The reference's safe_divide: a / (b + 1e-9), and 0 where b is 0."""
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + den.eq(0).to(den.dtype) * 1e-9
    return a / den * b.ne(0).to(b.dtype)


def _f32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.float() for t in tensors]


class _Identity(torch.autograd.Function):
    """The identity rule: `out` (the module's output, same shape as `x`), relevance passed to `x` unchanged."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out

    @staticmethod
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[torch.Tensor, None]:
        return relevance, None


class _AlphaOneBetaZero(torch.autograd.Function):
    """A linear layer's output `out` = x W^T + b; relevance by LRP-alpha1-beta0 (the reference's Linear.relprop with
    alpha = 1: the inhibitor term it computes is multiplied by beta = 0)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        x, weight = ctx.saved_tensors
        (r, x32, w) = _f32(relevance, x, weight)
        px, nx, pw, nw = x32.clamp(min=0), x32.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
        s = safe_divide(r, F.linear(px, pw) + F.linear(nx, nw))
        return (px * (s @ pw) + nx * (s @ nw)).to(x.dtype), None, None


class _QueryKey(torch.autograd.Function):
    """The attention probabilities `attn` = softmax(scale q k^T) from `q` and `k` (B, heads, N, d; the values the
    product used, after any q/k norm: `q_in` and `k_in` carry the graph, their norms take the identity rule);
    softmax takes the identity rule and q k^T the product rule, halved between q and k."""

    @staticmethod
    def forward(ctx: Any, q_in: torch.Tensor, k_in: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                attn: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, k)
        return attn

    @staticmethod
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k = ctx.saved_tensors
        (r, q32, k32) = _f32(relevance, q, k)
        s = safe_divide(r, q32 @ k32.transpose(-2, -1))
        return (q32 * (s @ k32) / 2).to(q.dtype), (k32 * (s.transpose(-2, -1) @ q32) / 2).to(k.dtype), None, None, None


class _AttentionValue(torch.autograd.Function):
    """The heads' outputs (A @ V) as timm lays them out, `out` (B, N, heads * d), from `attn` (B, heads, N, N) and
    `v` (B, heads, N, d); the product rule, halved between A and V. The half reaching A is its relevance R_b."""

    @staticmethod
    def forward(ctx: Any, attn: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(attn, v)
        return out

    @staticmethod
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        attn, v = ctx.saved_tensors
        batch, heads, n, d = v.shape
        (r, a32, v32) = _f32(relevance, attn, v)
        s = safe_divide(r.reshape(batch, n, heads, d).transpose(1, 2), a32 @ v32)
        return (a32 * (s @ v32.transpose(-2, -1)) / 2).to(attn.dtype), (v32 * (a32.transpose(-2, -1) @ s) / 2).to(
            v.dtype), None


class _ResidualAdd(torch.autograd.Function):
    """`out` = a + b (the residual stream and a block's branch); the reference's Add.relprop, per image."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return out

    @staticmethod
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        a, b = ctx.saved_tensors
        (r, a32, b32) = _f32(relevance, a, b)
        s = safe_divide(r, a32 + b32)
        ra, rb = a32 * s, b32 * s
        dims = tuple(range(1, r.ndim))
        a_sum, b_sum = ra.sum(dim=dims, keepdim=True), rb.sum(dim=dims, keepdim=True)
        total, both = r.sum(dim=dims, keepdim=True), a_sum.abs() + b_sum.abs()
        ra = ra * safe_divide(safe_divide(a_sum.abs(), both) * total, a_sum)
        rb = rb * safe_divide(safe_divide(b_sum.abs(), both) * total, b_sum)
        return ra.to(a.dtype), rb.to(b.dtype), None


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether a value recomputed from the hooked tensors equals what the model computed (up to the model's
    precision): the check that timm's modules are wired as the hooks assume."""
    tolerance = 1e-3 if expected.dtype == torch.float32 else 3e-2
    actual, expected = actual.detach().float(), expected.detach().float()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return bool((actual - expected).abs().max() <= tolerance * max(scale, 1e-6))


def _unsupported(what: str) -> ValueError:
    return ValueError(f"transformer_attribution: {what}; supported are timm ViT blocks (pre-norm Block with "
                      "Attention and Mlp)")


@dataclass
class _Pass:
    """What the hooks of one relevance pass keep: per block, the residual stream pieces; per attention, its
    graph-carrying q, k, v and probabilities."""

    start: int
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> A with the relevance graph
    block: dict[str, Any] = field(default_factory=dict)  # the current block's x_in, b1, x_mid, b2
    attention: dict[str, Any] = field(default_factory=dict)  # the current attention's q, k, v, attn


def _requires_grad(args: tuple) -> bool:
    return bool(args) and isinstance(args[0], torch.Tensor) and args[0].requires_grad


@contextmanager
def _relevance_hooks(model: nn.Module, anatomy: ModelAnatomy, relevance_pass: _Pass) -> Iterator[None]:
    """The rules on `model`'s modules for one forward and backward pass (the attention of the blocks from `start`
    switched to its explicit path); every hook and switch removed on the way out, exceptions included."""
    handles: list[RemovableHandle] = []
    switched: list[tuple[nn.Module, bool]] = []

    def on(module: nn.Module, hook: Callable, pre: bool = False) -> None:
        handles.append(module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook))

    def identity_rule(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        return _Identity.apply(args[0], out.detach()) if _requires_grad(args) else None

    def linear_rule(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        return _AlphaOneBetaZero.apply(args[0], out.detach(), module.weight.detach()) if _requires_grad(args) else None

    try:
        for module in model.modules():
            if isinstance(module, nn.Linear):
                on(module, linear_rule)
            elif isinstance(module, NORMALISATIONS) or type(module).__name__ in ("RmsNorm", "SimpleNorm"):
                on(module, identity_rule)
        for index, name in enumerate(anatomy.attention_modules):
            if index < relevance_pass.start:  # below the pass: runs as usual, fused attention included
                continue
            attn = model.get_submodule(name)
            switched.append((attn, attn.fused_attn))
            attn.fused_attn = False
            _hook_block(on, index, model.get_submodule(name.rsplit(".", 1)[0]), attn, identity_rule, relevance_pass)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for attn, fused in switched:
            attn.fused_attn = fused


def _hook_block(on: Callable, index: int, block: nn.Module, attn: nn.Module, identity_rule: Callable,
                relevance_pass: _Pass) -> None:
    """The hooks of one block: its two residual additions, its attention's products, the identity rule for its
    activation and layer scales."""
    for part in ("norm1", "norm2", "mlp", "drop_path1", "drop_path2"):
        if not isinstance(getattr(block, part, None), nn.Module):
            raise _unsupported(f"block {index} has no `{part}`")
    for part in ("qkv", "attn_drop", "norm", "proj", "q_norm", "k_norm"):
        if not isinstance(getattr(attn, part, None), nn.Module):
            raise _unsupported(f"the attention of block {index} has no `{part}`")
    if getattr(attn, "gate", None) is not None:
        raise _unsupported(f"the attention of block {index} is gated")
    act = getattr(block.mlp, "act", None)
    if not isinstance(act, nn.Module) or not isinstance(getattr(block.mlp, "fc1", None), nn.Linear):
        raise _unsupported(f"the MLP of block {index} is not fc1 -> act -> fc2")
    on(act, identity_rule)
    for scale in (getattr(block, "ls1", None), getattr(block, "ls2", None)):
        if isinstance(scale, nn.Module) and not isinstance(scale, nn.Identity):
            if getattr(scale, "inplace", False):
                raise _unsupported(f"block {index} scales its branches in place")
            on(scale, identity_rule)
    state, heads = relevance_pass.block, attn.num_heads

    def block_input(_m: nn.Module, args: tuple) -> tuple | None:
        x = args[0]
        if index == relevance_pass.start:  # the pass starts here: nothing below needs relevance
            x = x.detach().requires_grad_(True)
        state.clear()
        state["x_in"] = x
        return (x, *args[1:])

    def keep(key: str) -> Callable:
        def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            state[key] = out
        return hook

    def second_addition_input(_m: nn.Module, args: tuple) -> tuple:
        x_in, b1, x_mid = state["x_in"], state["b1"], args[0]
        if not _close(x_in + b1, x_mid):
            raise _unsupported(f"block {index}'s norm2 input is not its input plus its attention branch")
        state["x_mid"] = _ResidualAdd.apply(x_in, b1, x_mid.detach())
        return (state["x_mid"], *args[1:])

    def block_output(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        x_mid, b2 = state["x_mid"], state["b2"]
        if not _close(x_mid + b2, out):
            raise _unsupported(f"block {index}'s output is not its norm2 input plus its MLP branch")
        return _ResidualAdd.apply(x_mid, b2, out.detach())

    on(block, block_input, pre=True)
    on(block.drop_path1, keep("b1"))
    on(block.norm2, second_addition_input, pre=True)
    on(block.drop_path2, keep("b2"))
    on(block, block_output)
    _hook_attention(on, index, attn, heads, relevance_pass)


def _hook_attention(on: Callable, index: int, attn: nn.Module, heads: int, relevance_pass: _Pass) -> None:
    """The hooks of one attention: q, k, v taken from the qkv projection's output (timm's [q | k | v] layout), the
    probabilities (attn_drop's output) rebuilt from q and k, the heads' outputs (attn.norm's input) from A and V."""
    state = relevance_pass.attention

    def qkv_output(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        batch, n, _ = out.shape
        q, k, v = out.reshape(batch, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        state.clear()
        state.update(q=q, k=k, v=v)

    def probabilities(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        q_in, k_in = state["q"], state["k"]
        with torch.no_grad():
            q, k = attn.q_norm(q_in.detach()), attn.k_norm(k_in.detach())
            expected = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        if not _close(expected, out):
            raise _unsupported(f"block {index}'s attention is not softmax(scale q k^T) of its qkv projection")
        state["attn"] = _QueryKey.apply(q_in, k_in, q, k, out.detach())
        relevance_pass.attentions[index] = state["attn"]
        return state["attn"]

    def heads_output(_m: nn.Module, args: tuple) -> tuple:
        a, v, y = state["attn"], state["v"], args[0]
        if not _close((a.detach() @ v.detach()).transpose(1, 2).reshape(y.shape), y):
            raise _unsupported(f"block {index}'s attention output is not A @ V")
        return (_AttentionValue.apply(a, v, y.detach()), *args[1:])

    on(attn.qkv, qkv_output)
    on(attn.attn_drop, probabilities)
    on(attn.norm, heads_output, pre=True)


def attention_relevance(model: nn.Module, anatomy: ModelAnatomy, pixels: torch.Tensor, targets: torch.Tensor,
                        start: int) -> list[torch.Tensor]:
    """R_b (B, heads, N, N) for blocks start..L-1 of each image's target: one forward pass with the rules hooked,
    one backward pass for the whole batch from the one-hot of the targets."""
    relevance_pass = _Pass(start=start)
    with _relevance_hooks(model, anatomy, relevance_pass), torch.enable_grad():
        logits = model(pixels)
        blocks = list(range(start, anatomy.num_layers))
        if sorted(relevance_pass.attentions) != blocks or not logits.requires_grad:
            raise _unsupported("not every block's attention went through the relevance hooks")
        one_hot = torch.zeros_like(logits)
        one_hot[torch.arange(logits.shape[0], device=logits.device), targets.to(logits.device)] = 1.0
        grads = torch.autograd.grad(logits, [relevance_pass.attentions[b] for b in blocks], grad_outputs=one_hot,
                                    allow_unused=True)
    return [torch.zeros_like(relevance_pass.attentions[b]) if g is None else g.detach().float()
            for b, g in zip(blocks, grads)]


def _check(params: TransformerAttributionParams, anatomy: ModelAnatomy) -> None:
    check_class_token_attention(anatomy)
    check_layer_index(params.start_layer, anatomy, "start_layer")
    for name in anatomy.attention_modules:
        block = name.rsplit(".", 1)[0]
        missing = [part for part in (f"{name}.qkv", f"{name}.proj", f"{name}.norm", f"{block}.norm2",
                                     f"{block}.mlp.fc1", f"{block}.mlp.act", f"{block}.drop_path2")
                   if part not in anatomy.module_names]
        if "." not in name or missing or f"{name}.gate" in anatomy.module_names:
            raise _unsupported(f"{name!r} is not a timm ViT block's attention ({', '.join(missing) or 'gated'})")


@register_method(
    name="transformer_attribution",
    description="Chefer, Gur & Wolf 2021: per block, the LRP relevance of the attention map (one relevance pass "
    "with the paper's rules: alpha1-beta0 for linear layers, identity for LayerNorm and GELU, the product rule for "
    "the attention products, normalised residual additions) times its gradient, negatives zeroed, mean over heads; "
    "then C = (I + Rbar_L) ... (I + Rbar_start); class-token row over the patches.",
    families=("vit",),
    class_specific=True,
    params_model=TransformerAttributionParams,
    needs=lambda params, anatomy: CaptureNeeds(attention_grad=True),
    relative_cost=12.0,
    cost_note="The shared forward pass and one backward pass per target (for the attention gradients, about 2.5 "
    "forward passes' worth), then its own forward pass with explicit attention and one relevance backward pass per "
    "target, in chunks of the model's explain_chunk_size: about 9.5 forward passes' worth (measured on deit-tiny at "
    "224 px, CPU; each linear layer's rule costs four of its forward products).",
    check=_check,
)
def transformer_attribution(captures: CaptureBatch, params: TransformerAttributionParams,
                            anatomy: ModelAnatomy) -> MethodOutput:
    runner, targets = captures.runner, captures.targets
    assert runner is not None and targets is not None and captures.attention_grads is not None
    start = params.start_layer % anatomy.num_layers
    rows = []
    for offset in range(0, captures.pixels.shape[0], runner.chunk_size):
        runner.checkpoint()
        chunk = slice(offset, offset + runner.chunk_size)
        pixels = captures.pixels[chunk].to(device=runner.device, dtype=runner.dtype)
        relevances = attention_relevance(runner.module, anatomy, pixels, targets[chunk], start)
        first = relevances[0]
        row = torch.zeros(first.shape[0], first.shape[-1], dtype=torch.float32, device=first.device)
        row[:, 0] = 1.0
        for relevance, grad in zip(reversed(relevances), reversed(captures.attention_grads[start:])):
            weighted = (grad[chunk].to(relevance.device) * relevance).clamp(min=0).mean(dim=1)  # (B, N, N)
            row = row + (row[:, None, :] @ weighted)[:, 0]  # row @ (I + Rbar_b), last block first
        rows.append(row.to(captures.pixels.device))
    return MethodOutput(maps=patch_tokens_to_grid(torch.cat(rows)[:, anatomy.num_prefix_tokens:], anatomy))
