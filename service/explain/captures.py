"""Recording what explanation methods need during one forward pass: attention probabilities, layer outputs.

timm's fused attention (scaled_dot_product_attention) never materialises the attention matrix. While recording,
each attention module is switched to its explicit path and a hook on its `attn_drop` (applied to the softmax
probabilities, an identity in eval mode) captures the probabilities with their autograd graph. The switch is
safe because a model's forward passes run on its device's lanes, one batch at a time per lane, each lane on its
own copy of the model (`ServedModel.active_network`): no other pass runs that copy while the switch is on. The
predict path therefore keeps the fused kernel.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch
from torch import nn

from service.model.anatomy import attention_modules, first_tensor


@dataclass(frozen=True)
class CaptureNeeds:
    """What one method (or a whole batch) needs recorded during the forward pass."""

    attention: bool = False  # attention probabilities of every block
    attention_grad: bool = False  # and their gradients w.r.t. each target logit
    layers: frozenset[str] = frozenset()  # outputs of these modules
    layer_grads: frozenset[str] = frozenset()  # and their gradients
    layer_inputs: frozenset[str] = frozenset()  # first positional inputs of these modules
    input_grad: bool = False  # gradients w.r.t. the input pixels

    def __or__(self, other: CaptureNeeds) -> CaptureNeeds:
        return CaptureNeeds(
            attention=self.attention or other.attention or self.attention_grad or other.attention_grad,
            attention_grad=self.attention_grad or other.attention_grad,
            layers=self.layers | other.layers | self.layer_grads | other.layer_grads,
            layer_grads=self.layer_grads | other.layer_grads,
            layer_inputs=self.layer_inputs | other.layer_inputs,
            input_grad=self.input_grad or other.input_grad,
        )

    @property
    def any_grad(self) -> bool:
        return self.attention_grad or bool(self.layer_grads) or self.input_grad


class WorkAbandoned(Exception):
    """Nobody waits for the images a computation is for any more: it stopped at a chunk boundary."""


def _carry_on() -> None:
    """The checkpoint of work nobody can abandon (direct calls, tests)."""


class ModelRunner:
    """Lets perturbation methods run the model again, in chunks of at most `chunk_size` images.

    Only used on the lane running the batch, like every other use of that lane's copy of the model. `checkpoint`
    runs before every chunk: it raises (WorkAbandoned, or the runtime's cancellation) when nobody waits for the
    result any more, and may let another model's batch use the lane first. Methods with loops of their own call it
    between their steps.
    """

    def __init__(
        self, module: nn.Module, device: torch.device, dtype: torch.dtype, chunk_size: int,
        mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
        checkpoint: Callable[[], None] = _carry_on,
    ) -> None:
        self.module = module
        self.device = device
        self.dtype = dtype
        self.chunk_size = chunk_size
        # The input normalisation (pixels = (image - mean) / std per channel), for methods that need real colours
        self.mean = mean
        self.std = std
        self.checkpoint = checkpoint

    def with_checkpoint(self, checkpoint: Callable[[], None]) -> ModelRunner:
        """This runner with another checkpoint (the pipeline gives each method pass its own)."""
        return ModelRunner(self.module, self.device, self.dtype, self.chunk_size, self.mean, self.std, checkpoint)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """float32 logits of any number of images, without gradients."""
        outputs = []
        for chunk in pixels.split(self.chunk_size):
            self.checkpoint()  # outside inference mode: a batch run meanwhile on this lane must not inherit it
            with torch.inference_mode():
                outputs.append(self.module(chunk.to(self.device, self.dtype)).float())
        return torch.cat(outputs)

    def input_gradients(self, pixels: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(target logits (n,), d(target logit)/d(pixels) (n, C, H, W)) for any number of images, in chunks."""
        scores, grads = [], []
        for chunk, chunk_targets in zip(pixels.split(self.chunk_size), targets.split(self.chunk_size)):
            self.checkpoint()
            with torch.enable_grad():
                x = chunk.detach().to(self.device, self.dtype).requires_grad_(True)
                logits = self.module(x).float()
                score = logits.gather(1, chunk_targets.to(logits.device)[:, None])[:, 0]
                (grad,) = torch.autograd.grad(score.sum(), x)
            scores.append(score.detach())
            grads.append(grad.detach().float())
        return torch.cat(scores), torch.cat(grads)


@dataclass
class CaptureBatch:
    """Recorded tensors of a batch (detached, float32) and, for class-specific methods, the target gradients."""

    logits: torch.Tensor  # (B, classes)
    pixels: torch.Tensor  # (B, C, H, W) the model's input, float32, on the device
    attentions: list[torch.Tensor] = field(default_factory=list)  # per block (B, heads, N, N)
    layers: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> output
    layer_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> first input
    attention_grads: list[torch.Tensor] | None = None  # d(target logit)/d(attention), per block
    layer_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    input_grads: torch.Tensor | None = None  # d(target logit)/d(pixels)
    targets: torch.Tensor | None = None  # (B,) the class each image's gradients are for
    runner: ModelRunner | None = None  # shared by the whole batch, for methods that run the model again

    def select(self, index: torch.Tensor) -> CaptureBatch:
        """The same captures for a subset of the batch's images.

        When the subset is the whole batch in order (the usual case), these captures themselves: copying every
        recorded tensor (one attention map per block, for every image and head) would cost more than computing
        cheap maps such as raw attention and rollout from them. Methods must therefore not modify captures in place.
        """
        if index.numel() == self.logits.shape[0] and bool((index.cpu() == torch.arange(index.numel())).all()):
            return self
        index = index.to(self.logits.device)
        pick = lambda t: t.index_select(0, index.to(t.device))  # noqa: E731
        return CaptureBatch(
            logits=pick(self.logits),
            pixels=pick(self.pixels),
            attentions=[pick(a) for a in self.attentions],
            layers={k: pick(v) for k, v in self.layers.items()},
            layer_inputs={k: pick(v) for k, v in self.layer_inputs.items()},
            attention_grads=None if self.attention_grads is None else [pick(g) for g in self.attention_grads],
            layer_grads={k: pick(v) for k, v in self.layer_grads.items()},
            input_grads=None if self.input_grads is None else pick(self.input_grads),
            targets=None if self.targets is None else pick(self.targets),
            runner=self.runner,
        )

    def for_target(
        self,
        targets: torch.Tensor,
        attention_grads: list[torch.Tensor] | None = None,
        layer_grads: dict[str, torch.Tensor] | None = None,
        input_grads: torch.Tensor | None = None,
    ) -> CaptureBatch:
        """These captures with one target per image and the gradients of that target's logit."""
        return replace(self, targets=targets, attention_grads=attention_grads, layer_grads=layer_grads or {},
                       input_grads=input_grads)


@dataclass
class Recording:
    """Graph-attached tensors recorded during a forward pass."""

    attentions: list[torch.Tensor] = field(default_factory=list)
    layers: dict[str, torch.Tensor] = field(default_factory=dict)
    layer_inputs: dict[str, torch.Tensor] = field(default_factory=dict)


_ATTENTION_MODULES: weakref.WeakKeyDictionary[nn.Module, list[nn.Module]] = weakref.WeakKeyDictionary()


def _cached_attention_modules(model: nn.Module) -> list[nn.Module]:
    """attention_modules(model), found once per model rather than by walking all its modules on every batch."""
    modules = _ATTENTION_MODULES.get(model)
    if modules is None:
        modules = _ATTENTION_MODULES[model] = [module for _, module in attention_modules(model)]
    return modules


@contextmanager
def record(model: nn.Module, needs: CaptureNeeds) -> Iterator[Recording]:
    """Hooks recording what `needs` asks for; attention modules use their explicit path meanwhile."""
    recording = Recording()
    handles = []
    switched: list[tuple[nn.Module, bool]] = []
    try:
        if needs.attention:
            for attn in _cached_attention_modules(model):
                switched.append((attn, attn.fused_attn))
                attn.fused_attn = False
                handles.append(attn.attn_drop.register_forward_hook(
                    lambda _m, _i, out: recording.attentions.append(out)
                ))
        modules = dict(model.named_modules()) if needs.layers or needs.layer_inputs else {}
        if needs.layers:
            for name in sorted(needs.layers):
                def hook(_m: nn.Module, _i: object, out: object, name: str = name) -> None:
                    recording.layers[name] = first_tensor(out)

                handles.append(modules[name].register_forward_hook(hook))
        if needs.layer_inputs:
            for name in sorted(needs.layer_inputs):
                def pre_hook(_m: nn.Module, args: tuple, name: str = name) -> None:
                    recording.layer_inputs[name] = first_tensor(args)

                handles.append(modules[name].register_forward_pre_hook(pre_hook))
        yield recording
    finally:
        for handle in handles:
            handle.remove()
        for attn, fused in switched:
            attn.fused_attn = fused
