"""The scalar an activation-maximisation job maximises: a class logit, or a statistic of a module's output.

Module outputs are read by a forward hook that stops the forward pass once the module has run (nothing after it
is needed). Hooks are registered and removed within one call, on the device's first lane (on its copy of the
model), so no prediction batch ever sees them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from api_schemas import ChannelObjective, ClassObjective, LayerObjective, TokenObjective
from service.model.anatomy import first_tensor

ObjectiveSpec = ClassObjective | ChannelObjective | LayerObjective | TokenObjective


class ObjectiveError(ValueError):
    """The objective does not fit this model; the message starts with the offending field."""


class _StopForward(Exception):
    """Raised by the capture hook: the rest of the forward pass is not needed."""


def channel_dim(rank: int) -> int | None:
    """Dim 1 of (N, C, H, W) and (N, C); the last dim of token outputs (N, tokens, features); else none."""
    return {2: 1, 3: 2, 4: 1}.get(rank)


@dataclass(frozen=True)
class Objective:
    """A validated objective bound to nothing yet: `bind` it to the model on the device's first lane."""

    spec: ObjectiveSpec

    @property
    def layer(self) -> str | None:
        return None if isinstance(self.spec, ClassObjective) else self.spec.layer

    def check_static(self, module_names: frozenset[str], num_classes: int) -> None:
        """What can be checked without running the model: the class index and the layer name."""
        spec = self.spec
        if isinstance(spec, ClassObjective):
            if spec.index >= num_classes:
                raise ObjectiveError(
                    f"objective.index: class index {spec.index} is out of range 0..{num_classes - 1}"
                )
            return
        if spec.layer not in module_names:
            close = sorted(n for n in module_names if n.startswith(spec.layer.rsplit(".", 1)[0]))[:8]
            hint = f"; e.g. {close}" if close else ""
            raise ObjectiveError(f"objective.layer: the model has no module {spec.layer!r}{hint}")

    def check_output_shape(self, shape: Sequence[int]) -> None:
        """Whether the channel or token exists in a layer output of this shape (batch first)."""
        spec = self.spec
        if isinstance(spec, ChannelObjective):
            dim = channel_dim(len(shape))
            if dim is None:
                raise ObjectiveError(
                    f"objective.layer: the output of {spec.layer!r} has shape {list(shape)}, with no channel dimension"
                )
            if spec.channel >= shape[dim]:
                raise ObjectiveError(
                    f"objective.channel: channel {spec.channel} is out of range for layer {spec.layer!r}, "
                    f"which has {shape[dim]} channels (0..{shape[dim] - 1})"
                )
        elif isinstance(spec, TokenObjective):
            if len(shape) != 3:
                raise ObjectiveError(
                    f"objective.layer: the output of {spec.layer!r} has shape {list(shape)}, not "
                    "(batch, tokens, features)"
                )
            if spec.token >= shape[1]:
                raise ObjectiveError(
                    f"objective.token: token {spec.token} is out of range for layer {spec.layer!r}, "
                    f"which has {shape[1]} tokens (0..{shape[1] - 1})"
                )

    def reduce(self, output: torch.Tensor) -> torch.Tensor:
        """The scalar objective from the logits (class) or the layer's output, averaged over the batch."""
        spec = self.spec
        output = output.float()
        if isinstance(spec, ClassObjective):
            return output[:, spec.index].mean()
        if isinstance(spec, ChannelObjective):
            dim = channel_dim(output.dim())
            assert dim is not None
            return output.select(dim, spec.channel).mean()
        if isinstance(spec, TokenObjective):
            return output[:, spec.token].mean()
        return output.mean()

    def bind(self, module: nn.Module) -> BoundObjective:
        return BoundObjective(self, module, dict(module.named_modules())[self.layer] if self.layer else None)


@dataclass(frozen=True)
class BoundObjective:
    """An objective for one model: call it with an input batch (on the device's first lane)."""

    objective: Objective
    module: nn.Module
    target: nn.Module | None  # the hooked module; None for class objectives

    def layer_output(self, x: torch.Tensor) -> torch.Tensor:
        """Run the model up to the hooked module and return its output (graph attached if grad is enabled)."""
        assert self.target is not None
        captured: list[torch.Tensor] = []

        def hook(_m: nn.Module, _i: object, out: object) -> None:
            captured.append(first_tensor(out))
            raise _StopForward

        handle = self.target.register_forward_hook(hook)
        try:
            self.module(x)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise ObjectiveError(f"objective.layer: module {self.objective.layer!r} does not run in the forward pass")
        return captured[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        output = self.module(x) if self.target is None else self.layer_output(x)
        return self.objective.reduce(output)

    def probe(self, x: torch.Tensor) -> tuple[int, ...]:
        """Shape of the relevant output (logits or layer output) for input `x`, without gradients."""
        with torch.inference_mode():
            output = self.module(x) if self.target is None else self.layer_output(x)
        return tuple(output.shape)
