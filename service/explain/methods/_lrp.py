"""Layer-wise relevance propagation for CNNs through zennit (Bach et al. 2015; Montavon et al. 2019; Anders et al.
2021, zennit): the composites the `lrp` method offers, the canonizers that bring a timm CNN into the form LRP rules
need, and the network copy the rules are applied to.

zennit's ResNet canonizer only knows torchvision's blocks, whose `out + identity` it rewrites through a `Sum` module.
timm's residual blocks add in place (`x += shortcut`), so here every addition of two graph-attached tensors of one
shape made during the forward pass goes through zennit's Norm rule instead (`AdditionCanonizer`: the relevance of
`a + b` split in proportion to `a` and `b`, exactly what zennit's `Sum` module with the `Norm` rule computes), for
any block layout and without a copy of any block's code (checked bit for bit against zennit's ResNetCanonizer on
torchvision's ResNet). Batch norms that directly follow a convolution are merged into it (zennit's
`SequentialMergeBatchNorm`); others pass relevance on unchanged (zennit's `Pass` rule for batch norm). Operations
zennit has no rule for and that are not additions keep their plain gradient: products such as squeeze-excitation
gates and ConvNeXt's layer scales, LayerNorm. On models built from them (EfficientNet, RegNetY, ConvNeXt) the map
is therefore not a conservative LRP decomposition; ResNets (plain, -D, -T) are.

zennit's batch-norm merge rebinds the `.data` of the convolution's and the batch norm's parameters, and the served
model's lanes share their parameter objects (`service.model.served.weight_sharing_copy`). The rules therefore run on
`lrp_network(model)`: a copy of the modules with parameter and buffer objects of its own that share the served
weights' storage (no weights are copied for float32 models), so nothing the canonizers or hooks do is ever seen by
the served model, whatever fails.
"""

from __future__ import annotations

import copy
import itertools
import weakref
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from zennit.canonizers import AttributeCanonizer, SequentialMergeBatchNorm
from zennit.composites import (
    EpsilonAlpha2Beta1,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    LayerMapComposite,
    layer_map_base,
)
from zennit.core import Composite, stabilize
from zennit.rules import AlphaBeta, Epsilon
from zennit.types import Linear as LinearOrConvolution

CompositeName = Literal["epsilon_plus_flat", "zplus", "epsilon_alpha2_beta1", "epsilon_gamma_box", "alpha1_beta0",
                        "epsilon"]

COMPOSITE_DESCRIPTION = (
    "Which LRP rules go where (zennit's composites; dense = fully connected layers): `epsilon_plus_flat` (flat rule "
    "for the first layer, z+ for the other convolutions, epsilon for dense layers; zennit's EpsilonPlusFlat), `zplus` "
    "(z+ for every convolution, epsilon for dense layers; zennit's EpsilonPlus), `epsilon_alpha2_beta1` "
    "(alpha2-beta1 for convolutions, epsilon for dense layers), `epsilon_gamma_box` (z-box for the first layer with "
    "the pixel range [0, 1] normalised like the input, gamma for the other convolutions, epsilon for dense layers), "
    "`alpha1_beta0` (alpha1-beta0 for every convolution and dense layer) or `epsilon` (the epsilon rule everywhere). "
    "Batch norms following a convolution are merged into it and residual additions split relevance in proportion "
    "to their terms (canonization) in every case."
)

# zennit's stabilizer for the rules other than epsilon (its composites' default): added with the sign of the
# denominator
STABILIZER = 1e-6

_ADDITIONS = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}
_IN_PLACE_ADDITIONS = {torch.Tensor.add_, torch.Tensor.__iadd__}  # `x += y` reaches the mode as Tensor.add_


def _split(relevance: torch.Tensor, a: torch.Tensor, b: torch.Tensor, stabilizer: float,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """zennit's Norm rule at `a + b`: the relevance R of the sum split as R * a / z and R * b / z, z = a + b
    stabilised (the arithmetic of zennit's `Sum` module under its `Norm` rule)."""
    ratio = relevance / stabilize(a + b, stabilizer)
    return a * ratio, b * ratio


class NormSum(torch.autograd.Function):
    """`a + b` whose backward pass splits the incoming relevance between the terms in proportion to them (`_split`),
    as zennit's ResNet canonizer makes torchvision's residual additions do."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, stabilizer: float) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        ctx.stabilizer = stabilizer
        return a + b

    @staticmethod
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        a, b = ctx.saved_tensors
        return *_split(relevance, a, b, ctx.stabilizer), None


class NormSumInPlace(torch.autograd.Function):
    """`a += b` (a modified in place, as timm's residual blocks do) with NormSum's backward pass."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, stabilizer: float) -> torch.Tensor:
        ctx.terms = (a.detach().clone(), b.detach())
        ctx.stabilizer = stabilizer
        a.add_(b)
        ctx.mark_dirty(a)
        return a

    @staticmethod
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        a, b = ctx.terms
        return *_split(relevance, a, b, ctx.stabilizer), None


class _AdditionsSplitRelevance(TorchFunctionMode):
    """While active (on the calling thread only), `a + b`, `a += b`, `a.add_(b)` and `torch.add(a, b)` of two
    floating-point tensors of one shape that both carry gradients go through NormSum (NormSumInPlace); every other
    operation runs as usual."""

    def __init__(self, stabilizer: float) -> None:
        super().__init__()
        self.stabilizer = stabilizer

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        in_place = func in _IN_PLACE_ADDITIONS
        if (in_place or func in _ADDITIONS) and len(args) == 2 and not kwargs:
            a, b = args
            if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.requires_grad and b.requires_grad
                    and a.shape == b.shape and a.is_floating_point()):
                return (NormSumInPlace if in_place else NormSum).apply(a, b, self.stabilizer)
        return func(*args, **kwargs)


class AdditionCanonizer(AttributeCanonizer):
    """A zennit canonizer that runs the root module's forward with every addition of two graph-attached tensors of
    one shape routed through NormSum (the residual additions of timm's CNN blocks, written `x += shortcut`): the
    generic counterpart of zennit's ResNetCanonizer's `Sum` modules, for any model. Removing it restores the root's
    own forward."""

    def __init__(self, stabilizer: float = STABILIZER) -> None:
        self.stabilizer = stabilizer
        super().__init__(self._attribute_map)

    def _attribute_map(self, name: str, module: nn.Module) -> dict[str, Any] | None:
        if name != "":
            return None
        original = module.forward  # the class's forward, bound
        stabilizer = self.stabilizer

        def forward(*args: Any, **kwargs: Any) -> Any:
            with _AdditionsSplitRelevance(stabilizer):
                return original(*args, **kwargs)

        return {"forward": forward}

    def copy(self) -> AdditionCanonizer:
        return AdditionCanonizer(self.stabilizer)


def canonizers(stabilizer: float = STABILIZER) -> list:
    """The canonizers every composite of the `lrp` method uses: batch norms merged into the convolution before them,
    residual additions splitting relevance by their terms."""
    return [SequentialMergeBatchNorm(), AdditionCanonizer(stabilizer)]


def make_composite(name: CompositeName, epsilon: float, gamma: float, low: torch.Tensor | None,
                   high: torch.Tensor | None) -> Composite:
    """The named composite with the method's canonizers. `low` and `high` (the normalised bounds of the pixel range,
    (1, C, 1, 1)) are needed by `epsilon_gamma_box` only."""
    canon = canonizers()
    if name == "epsilon_plus_flat":
        return EpsilonPlusFlat(epsilon=epsilon, stabilizer=STABILIZER, canonizers=canon)
    if name == "zplus":
        return EpsilonPlus(epsilon=epsilon, stabilizer=STABILIZER, canonizers=canon)
    if name == "epsilon_alpha2_beta1":
        return EpsilonAlpha2Beta1(epsilon=epsilon, stabilizer=STABILIZER, canonizers=canon)
    if name == "epsilon_gamma_box":
        if low is None or high is None:
            raise ValueError("the epsilon_gamma_box composite needs the model's normalisation mean and std")
        return EpsilonGammaBox(low=low, high=high, epsilon=epsilon, gamma=gamma, stabilizer=STABILIZER,
                               canonizers=canon)
    if name == "alpha1_beta0":
        rule = AlphaBeta(alpha=1.0, beta=0.0, stabilizer=STABILIZER)
    else:
        rule = Epsilon(epsilon=epsilon)
    return LayerMapComposite(layer_map=layer_map_base(STABILIZER) + [(LinearOrConvolution, rule)], canonizers=canon)


_NETWORKS: weakref.WeakKeyDictionary[nn.Module, tuple[nn.Module, tuple[tuple[int, int], ...]]] = (
    weakref.WeakKeyDictionary()
)


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return list(itertools.chain(model.parameters(), model.buffers()))


def _fingerprint(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """Which tensor objects hold the model's weights, and where their storage is: a copy sharing that storage stays
    valid while neither changes (in-place updates of the weights are seen by it)."""
    return tuple((id(t), t.data_ptr()) for t in _tensors(model))


def _copy(model: nn.Module) -> nn.Module:
    memo: dict[int, Any] = {}
    for tensor in _tensors(model):
        if id(tensor) in memo:
            continue
        if isinstance(tensor, nn.Parameter):
            memo[id(tensor)] = nn.Parameter(tensor.detach().float(), requires_grad=False)
        else:
            memo[id(tensor)] = tensor.detach().float() if tensor.is_floating_point() else tensor.detach()
    return copy.deepcopy(model, memo).eval()


def lrp_network(model: nn.Module) -> nn.Module:
    """A copy of `model` whose modules, parameters and buffers are objects of its own, sharing the model's storage
    where it is float32 (half-precision models are copied to float32: the rules' stabilisers of 1e-6 are below half
    precision's resolution). Canonizers and hooks applied to it never touch `model`.

    Float32 copies are kept per model object (each lane has its own, used by its own thread) and made again when the
    model's weight tensors are replaced (not when they are updated in place: the copy shares their storage); copying
    the modules costs tens of milliseconds. Half-precision copies (float32 weights) are made for each call. A caller
    whose use of the copy fails must `forget_network(model)`: the copy may be left canonized."""
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in _tensors(model)):
        return _copy(model)
    fingerprint = _fingerprint(model)
    cached = _NETWORKS.get(model)
    if cached is None or cached[1] != fingerprint:
        cached = _NETWORKS[model] = (_copy(model), fingerprint)
    return cached[0]


def forget_network(model: nn.Module) -> None:
    """Drop the kept copy of `model` (after a failure left it in an unknown state)."""
    _NETWORKS.pop(model, None)


def relevance(network: nn.Module, composite: Composite, pixels: torch.Tensor, targets: torch.Tensor,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, classes), input relevance (B, C, H, W)) of each image's target: the output relevance is the
    target logit (one-hot times the logits), propagated down in one backward pass for the whole batch. The composite
    is registered on `network` for this call only (removed on the way out, exceptions included)."""
    x = pixels.detach().float().requires_grad_(True)
    composite.register(network)
    try:
        with torch.enable_grad():
            logits = network(x)
            one_hot = torch.zeros_like(logits)
            one_hot[torch.arange(logits.shape[0], device=logits.device), targets.to(logits.device)] = 1.0
            (result,) = torch.autograd.grad(logits, x, grad_outputs=one_hot * logits.detach())
    finally:
        composite.remove()
    return logits.detach(), result.detach()

