"""One batch of explanation jobs: a recording forward pass, one backward pass per target slot, then each
requested method's tensor work over the sub-batch of images that asked for it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from pydantic import BaseModel

from service.explain.captures import CaptureBatch, CaptureNeeds, ModelRunner, record
from service.explain.registry import ExplainMethod
from service.explain.targets import TargetRequest
from service.model.served import ServedModel


@dataclass(frozen=True)
class MethodRequest:
    """A method with validated params; `key` groups identical requests across a batch."""

    method: ExplainMethod
    params: BaseModel
    needs: CaptureNeeds

    @property
    def key(self) -> str:
        return f"{self.method.name}:{self.params.model_dump_json()}"


@dataclass(frozen=True)
class ExplainJob:
    """One image to explain with several methods."""

    pixels: torch.Tensor  # (C, H, W) float32, normalised
    methods: tuple[MethodRequest, ...]
    target: TargetRequest


@dataclass
class MethodMaps:
    """One method's maps for one image: one per target (a single one for class-agnostic methods)."""

    maps: list[torch.Tensor]  # (h, w) each, float32, CPU
    layers: list[torch.Tensor | None]  # (L, h, w) each, or None
    layer_indices: tuple[int, ...] | None
    compute_ms: float
    statistics: list[dict[str, float] | None] = field(default_factory=list)  # per map: extra map statistics


@dataclass
class ExplainOutcome:
    """Everything computed for one job."""

    probabilities: torch.Tensor  # (classes,)
    targets: list[int]
    methods: list[MethodMaps]  # in the job's method order


def _finite(maps: torch.Tensor) -> torch.Tensor:
    """float32 on the CPU, with NaN and infinities (degenerate inputs) replaced so maps stay renderable."""
    return torch.nan_to_num(maps.detach().float(), nan=0.0, posinf=0.0, neginf=0.0).cpu()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Forward:
    """The graph-attached results of the recording forward pass."""

    batch: torch.Tensor
    logits: torch.Tensor
    attentions: list[torch.Tensor]
    layers: dict[str, torch.Tensor]
    layer_inputs: dict[str, torch.Tensor]


def _forward(served: ServedModel, pixels: torch.Tensor, needs: CaptureNeeds) -> _Forward:
    with record(served.active_network, needs) as recording, torch.set_grad_enabled(needs.any_grad):
        batch = pixels.to(device=served.device, dtype=served.dtype)
        if needs.any_grad:
            batch.requires_grad_(True)
        logits = served.active_network(batch)
    return _Forward(batch, logits, recording.attentions, recording.layers, recording.layer_inputs)


def _target_gradients(
    forward: _Forward, needs: CaptureNeeds, slot_targets: torch.Tensor, images: torch.Tensor, retain_graph: bool
) -> dict[str, object]:
    """Gradients of each listed image's own target logit (summed: images are independent in eval mode)."""
    score = forward.logits.index_select(0, images).gather(1, slot_targets.index_select(0, images)[:, None]).sum()
    layer_names = sorted(needs.layer_grads)
    attentions = forward.attentions if needs.attention_grad else []
    inputs = attentions + [forward.layers[name] for name in layer_names]
    if needs.input_grad:
        inputs.append(forward.batch)
    grads = torch.autograd.grad(score, inputs, retain_graph=retain_graph, allow_unused=True)
    grads = [(torch.zeros_like(t) if g is None else g).detach().float() for t, g in zip(inputs, grads)]
    n_attn = len(attentions)
    return {
        "attention_grads": grads[:n_attn] if needs.attention_grad else None,
        "layer_grads": dict(zip(layer_names, grads[n_attn:n_attn + len(layer_names)])),
        "input_grads": grads[-1] if needs.input_grad else None,
    }


def run_explain_batch(
    served: ServedModel, jobs: Sequence[ExplainJob], chunk_size: int | None = None
) -> list[ExplainOutcome]:
    """Explain a batch of jobs (runs on a lane of the model's device). Perturbation methods run the model on at most
    `chunk_size` images at a time (default: the model's explain_chunk_size)."""
    anatomy = served.anatomy
    chunk_size = chunk_size or served.config.explain_chunk_size
    needs = CaptureNeeds()
    for job in jobs:
        for request in job.methods:
            needs = needs | request.needs
    forward = _forward(served, torch.stack([job.pixels for job in jobs]), needs)
    captures = CaptureBatch(
        logits=forward.logits.detach().float(),
        pixels=forward.batch.detach().float(),
        attentions=[a.detach().float() for a in forward.attentions],
        layers={name: t.detach().float() for name, t in forward.layers.items()},
        layer_inputs={name: t.detach().float() for name, t in forward.layer_inputs.items()},
        runner=ModelRunner(served.active_network, served.device, served.dtype, chunk_size,
                           mean=served.data_config.get("mean"), std=served.data_config.get("std")),
    )
    targets = [job.target.resolve(captures.logits[i]) for i, job in enumerate(jobs)]
    outcomes = [
        ExplainOutcome(probabilities=captures.logits[i].softmax(-1).cpu(), targets=targets[i],
                       methods=[None] * len(job.methods))  # type: ignore[list-item]
        for i, job in enumerate(jobs)
    ]

    groups: dict[str, tuple[MethodRequest, list[tuple[int, int]]]] = {}
    for i, job in enumerate(jobs):
        for m, request in enumerate(job.methods):
            groups.setdefault(request.key, (request, []))[1].append((i, m))

    # Target slot s is each image's s-th target; gradients are taken once per slot for the whole batch.
    class_specific_images = sorted({i for request, members in groups.values() if request.method.class_specific
                                    for i, _ in members})
    n_slots = max((len(targets[i]) for i in class_specific_images), default=0)
    slot_captures: list[CaptureBatch] = []
    for slot in range(n_slots):
        slot_targets = torch.tensor([t[slot] if len(t) > slot else 0 for t in targets], device=forward.logits.device)
        gradients: dict[str, object] = {}
        if needs.any_grad:
            in_slot = torch.tensor([i for i in class_specific_images if len(targets[i]) > slot],
                                   device=forward.logits.device)
            gradients = _target_gradients(forward, needs, slot_targets, in_slot, retain_graph=slot < n_slots - 1)
        slot_captures.append(captures.for_target(slot_targets, **gradients))  # type: ignore[arg-type]
    del forward

    for request, members in groups.values():
        method = request.method
        per_member: dict[tuple[int, int], MethodMaps] = {
            member: MethodMaps(maps=[], layers=[], layer_indices=None, compute_ms=0.0) for member in members
        }
        passes = (
            [(slot, [mb for mb in members if len(targets[mb[0]]) > slot], slot_captures[slot]) for slot in range(n_slots)]
            if method.class_specific else [(0, members, captures)]
        )
        for _, slot_members, source in passes:
            if not slot_members:
                continue
            started = time.perf_counter()
            index = torch.tensor([i for i, _ in slot_members])
            output = method.compute(source.select(index), request.params, anatomy)
            maps = _finite(output.maps)
            layer_maps = None if output.layers is None else _finite(output.layers)
            _synchronize(served.device)
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            for row, member in enumerate(slot_members):
                result = per_member[member]
                result.maps.append(maps[row])
                result.layers.append(None if layer_maps is None else layer_maps[row])
                result.statistics.append(None if output.statistics is None else output.statistics[row])
                result.layer_indices = output.layer_indices
                result.compute_ms += elapsed_ms
        for (i, m), result in per_member.items():
            outcomes[i].methods[m] = result
    return outcomes
