"""AttnLRP's rules (Achtibat et al. 2024) as modified gradients on a timm model's own modules, for `attn_lrp`.

In the gradient-times-input view of LRP (lxt's "efficient" implementation), a rule is a modified gradient: where
every operation's backward passes relevance / input instead of its true gradient, input x gradient at any layer is
that layer's LRP relevance. The rules, and how they are installed for one pass (forward hooks that replace a
module's output by the same values with another backward; removed afterwards, exceptions included):

- linear layers and convolutions (nn.Linear, nn.Conv2d, the attention's qkv and proj, the head, the patch
  embedding): the epsilon rule. Their plain gradient is the epsilon rule with epsilon = 0 (the bias absorbs its
  share); epsilon > 0 multiplies the gradient at the output y by y / (y + epsilon * sign(y)).
- LayerNorm and RMSNorm (GroupNorm in hybrid stems): the identity rule on the division by the standard deviation
  (the paper's Proposition 3.4): the gradient of the normalisation with the standard deviation held constant.
- element-wise non-linearities (GELU, SiLU, ...): the identity rule, gradient = output / input.
- the attention's two matrix products (query-key and attention-value): the uniform rule, half of the relevance to
  each operand. Together with the softmax rule this is the gradient scaled by 1/4 at the queries and keys (1/2
  for the attention-value product, 1/2 again for the query-key product) and by 1/2 at the values, applied at the
  output of the `qkv` projection ([q | k | v] along its last dimension). lxt applies the same factors to query, key
  and value (`lxt.efficient.patches.wrap_attention_forward`).
- softmax: the paper's rule (Proposition 3.1), R_in = x * (R_out - s * sum(R_out)) for logits x and
  probabilities s, is the softmax's true gradient times its input: nothing to change, so the fused attention
  kernel (scaled_dot_product_attention) computes it and the attention modules keep their fused path.
- additions (residual stream, position embedding), scaling by constants (LayerScale, the attention scale), token
  selection, pooling, ReLU, max pooling and batch norm in eval mode: their plain gradient already is the LRP
  rule (epsilon rule with epsilon = 0, identity rule, winner-takes-all).

The hooks go on the model copy of the lane running the batch (`ServedModel.active_network`, one batch at a time
per lane): no other pass runs on that copy while they are installed, and they are removed before the next
checkpoint, where the lane may run another model's batch.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import activations as timm_activations
from timm.layers import mlp as timm_mlp
from timm.layers import norm as timm_norm
from torch import nn
from torch.autograd import Function

from service.explain.captures import ModelRunner

DEFAULT_CHUNK = 32  # images per pass when the runner sets no chunk size
DIVISION_EPSILON = 1e-10  # keeps the identity rule's output / input finite at zero inputs

# Element-wise non-linearities given the identity rule. ReLU, LeakyReLU and Identity are left out: their gradient
# is output / input already.
IDENTITY_RULE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.CELU, nn.SELU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.ReLU6, nn.Softsign, nn.Tanhshrink,
    timm_activations.GELU, timm_activations.GELUTanh, timm_activations.QuickGELU, timm_activations.Swish,
    timm_activations.Mish, timm_activations.Sigmoid, timm_activations.Tanh, timm_activations.HardSwish,
    timm_activations.HardSigmoid, timm_activations.HardMish,
)
# Normalisations over the trailing dimensions (`normalized_shape`): LayerNorm and RMSNorm.
LAYER_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, timm_norm.LayerNorm, timm_norm.LayerNormFp32)
RMS_NORMS: tuple[type[nn.Module], ...] = (nn.RMSNorm, timm_norm.RmsNorm, timm_norm.RmsNormFp32)
# MLPs whose gating multiplies two branches element-wise: that product needs the uniform rule, not installed here.
GATED_MLPS: tuple[type[nn.Module], ...] = (timm_mlp.GluMlp, timm_mlp.SwiGLU, timm_mlp.GatedMlp)


def stabilize(values: torch.Tensor, epsilon: float) -> torch.Tensor:
    """values + epsilon * sign(values), with sign(+0) = 1 (zennit's and the LRP literature's stabiliser), as a new
    tensor."""
    stabilized = torch.copysign(torch.tensor(epsilon, dtype=values.dtype, device=values.device), values)
    return stabilized.add_(values)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / stabilize(denominator, DIVISION_EPSILON) in float32, as a new tensor (the identity rule's
    output / input, finite at zero inputs)."""
    ratio = stabilize(denominator.float(), DIVISION_EPSILON)
    return torch.div(numerator.float(), ratio, out=ratio)


# The backward passes below make one new tensor and work on it in place: the activations are the largest tensors of
# the pass, and every extra copy of them costs about as much as the arithmetic.


class _EpsilonRule(Function):
    """Forward: a linear layer's output y unchanged. Backward: the gradient times y / (y + eps * sign(y))."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, epsilon: float) -> torch.Tensor:
        ctx.save_for_backward(output)
        ctx.epsilon = epsilon
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (output,) = ctx.saved_tensors
        factor = torch.abs(output.float())  # y / (y + eps * sign(y)) = |y| / (|y| + eps), 0 at y = 0
        factor.div_(factor + ctx.epsilon).mul_(grad)
        return factor.to(grad.dtype), None


class _GradientTimes(Function):
    """Forward: the tensor unchanged. Backward: the gradient times constant factors (broadcast over it)."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(factors)
        return values.view_as(values)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (factors,) = ctx.saved_tensors
        return grad * factors.to(grad.dtype), None


class _IdentityRule(Function):
    """An element-wise non-linearity y = f(x) with the identity rule: forward y (already computed), backward the
    gradient times y / x."""

    @staticmethod
    def forward(ctx: Any, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inputs, output)
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        inputs, output = ctx.saved_tensors
        return _ratio(output, inputs).mul_(grad).to(grad.dtype), None


class _NormIdentityRule(Function):
    """A normalisation y = act(w * (x - mean) / std + b) with the standard deviation held constant in the backward
    (the identity rule on 1 / std; mean-centring and the affine map keep their gradient: they are linear) and the
    identity rule for an element-wise activation after it (GroupNormAct; None for the plain norms).

    `groups` reshapes x to (B, groups, -1) for the statistics (GroupNorm), or None: statistics over the trailing
    `dims` dimensions (LayerNorm, RMSNorm). `centred`: subtract the mean (LayerNorm, GroupNorm) or not (RMSNorm).
    """

    @staticmethod
    def forward(ctx: Any, inputs: torch.Tensor, output: torch.Tensor, weight: torch.Tensor | None,
                pre_activation: torch.Tensor | None, groups: int | None, dims: int, centred: bool,
                eps: float) -> torch.Tensor:
        x = inputs.float()
        if groups is not None:  # the fused kernels' statistics: a fraction of the cost of x.var()
            batch, channels = x.shape[:2]
            _, _, inverse_std = torch.native_group_norm(x, None, None, batch, channels, x[0, 0].numel(), groups, eps)
            inverse_std = inverse_std.reshape(batch, groups, 1)
        elif centred:
            _, _, inverse_std = torch.native_layer_norm(x, x.shape[x.ndim - dims:], None, None, eps)
        else:
            inverse_std = torch.rsqrt(x.square().mean(dim=tuple(range(-dims, 0)), keepdim=True).add_(eps))
        ctx.save_for_backward(inverse_std, weight, pre_activation, output)
        ctx.groups, ctx.dims, ctx.centred = groups, dims, centred
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inverse_std, weight, pre_activation, output = ctx.saved_tensors
        w = None
        if weight is not None:
            w = weight.float().reshape(-1, *([1] * (grad.ndim - 2))) if ctx.groups is not None else weight.float()
        if pre_activation is not None:  # identity rule for the activation: output / pre-activation
            g = _ratio(output, pre_activation).mul_(grad)
            if w is not None:
                g.mul_(w)
        else:
            g = grad.float() * w if w is not None else grad.float().clone()
        shape = g.shape
        if ctx.groups is not None:
            g = g.reshape(shape[0], ctx.groups, -1)
            reduce: tuple[int, ...] = (-1,)
        else:
            reduce = tuple(range(-ctx.dims, 0))
        if ctx.centred:
            g.sub_(g.mean(dim=reduce, keepdim=True))
        g.mul_(inverse_std)
        return g.reshape(shape).to(grad.dtype), None, None, None, None, None, None, None


Hook = Callable[[nn.Module, tuple, Any], Any]


def _epsilon_hook(epsilon: float) -> Hook:
    def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        return _EpsilonRule.apply(output, epsilon)

    return hook


def _qkv_hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Queries and keys' gradient / 4, values' / 2 (the uniform rule on both attention products)."""
    width = output.shape[-1] // 3
    factors = torch.full((3 * width,), 0.25, dtype=torch.float32, device=output.device)
    factors[2 * width:] = 0.5
    return _GradientTimes.apply(output, factors)


def _activation_hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return _IdentityRule.apply(args[0], output.detach())


def _layer_norm_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    centred = isinstance(module, LAYER_NORMS)
    eps = module.eps if module.eps is not None else torch.finfo(args[0].dtype).eps  # nn.RMSNorm: eps=None
    return _NormIdentityRule.apply(args[0], output.detach(), module.weight, None, None,
                                   len(module.normalized_shape), centred, float(eps))


def _group_norm_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    x = args[0]
    pre_activation = None
    if type(module) is not nn.GroupNorm:  # GroupNormAct and the like: group_norm -> drop -> act in one module
        with torch.no_grad():
            pre_activation = F.group_norm(x, module.num_groups, module.weight, module.bias, module.eps)
    return _NormIdentityRule.apply(x, output.detach(), module.weight, pre_activation, module.num_groups, 0, True,
                                   float(module.eps))


def _is_attention(module: nn.Module) -> bool:
    return hasattr(module, "fused_attn") or (hasattr(module, "num_heads") and hasattr(module, "qkv"))


def unsupported_parts(model: nn.Module) -> list[str]:
    """What in `model` these rules do not cover (so its relevance would not be AttnLRP's), as 'name (reason)'."""
    problems = []
    for name, module in model.named_modules():
        label = name or "the model"
        if _is_attention(module):
            qkv = getattr(module, "qkv", None)
            if not isinstance(qkv, nn.Linear) or qkv.out_features % 3:
                problems.append(f"{label} (attention without one fused qkv projection)")
            if getattr(module, "gate", None) is not None:
                problems.append(f"{label} (gated attention output)")
        elif isinstance(module, GATED_MLPS):
            problems.append(f"{label} (gated MLP)")
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and not isinstance(module, LAYER_NORMS + RMS_NORMS):
            problems.append(f"{label} ({type(module).__name__}: a normalisation over other dimensions)")
        elif isinstance(module, IDENTITY_RULE_ACTIVATIONS) and getattr(module, "inplace", False):
            problems.append(f"{label} (in-place {type(module).__name__}: its input is overwritten)")
        elif isinstance(module, nn.GroupNorm) and type(module) is not nn.GroupNorm and not hasattr(module, "act"):
            problems.append(f"{label} ({type(module).__name__}: an unknown GroupNorm variant)")
    return problems


def _rule_plan(model: nn.Module) -> list[tuple[nn.Module, Hook | None]]:
    """The modules of `model` that get a rule, with the forward hook installing it (None: the epsilon rule)."""
    plan: list[tuple[nn.Module, Hook | None]] = []
    inside_norm_act: list[str] = []  # the activation inside a GroupNormAct is handled by the norm's hook
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside_norm_act):
            continue
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            plan.append((module, None))
        elif isinstance(module, LAYER_NORMS + RMS_NORMS):
            plan.append((module, _layer_norm_hook))
        elif isinstance(module, nn.GroupNorm):
            plan.append((module, _group_norm_hook))
            inside_norm_act.append(f"{name}.")
        elif isinstance(module, IDENTITY_RULE_ACTIVATIONS):
            plan.append((module, _activation_hook))
        elif _is_attention(module):
            plan.append((module.qkv, _qkv_hook))
    return plan


# Per model (a lane's copy), worked out once: what the rules do not cover, and which modules get which rule.
_PLANS: weakref.WeakKeyDictionary[nn.Module, tuple[list[str], list[tuple[nn.Module, Hook | None]]]] = (
    weakref.WeakKeyDictionary()
)


@contextmanager
def attn_lrp_rules(model: nn.Module, epsilon: float) -> Iterator[None]:
    """The AttnLRP rules installed on `model` as forward hooks for the duration of the block (removed on exit,
    exceptions included). Raises ValueError, installing nothing, when the model has parts they do not cover."""
    if model not in _PLANS:
        problems = unsupported_parts(model)
        _PLANS[model] = (problems, [] if problems else _rule_plan(model))
    problems, plan = _PLANS[model]
    if problems:
        raise ValueError("AttnLRP's rules do not cover " + ", ".join(problems))
    epsilon_hook = _epsilon_hook(epsilon)
    handles = []
    try:
        for module, hook in plan:
            if hook is not None or epsilon > 0:
                handles.append(module.register_forward_hook(hook or epsilon_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def attn_lrp_relevance(runner: ModelRunner, pixels: torch.Tensor, targets: torch.Tensor,
                       epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(input relevance (n, C, H, W) float32, target logits (n,)) of each image's target logit, one forward and one
    modified backward pass per chunk of the runner's chunk size, the rules installed for that pass only."""
    relevances, scores = [], []
    for chunk, chunk_targets in zip(pixels.split(runner.chunk_size or DEFAULT_CHUNK),
                                    targets.split(runner.chunk_size or DEFAULT_CHUNK)):
        runner.checkpoint()  # before the rules go on: the lane may run another model's batch here
        with attn_lrp_rules(runner.module, epsilon), torch.enable_grad():
            x = chunk.detach().to(runner.device, runner.dtype).requires_grad_(True)
            logits = runner.module(x)
            score = logits.gather(1, chunk_targets.to(logits.device)[:, None])[:, 0]
            (grad,) = torch.autograd.grad(score.sum(), x)  # images are independent in eval mode
        relevances.append(x.detach().float() * grad.float())
        scores.append(score.detach().float())
    return torch.cat(relevances), torch.cat(scores)
