"""One batch of explanation jobs, in stages (`run_explain_batch` reads top to bottom): merge what the methods need
captured, one recording forward pass, resolve each image's targets, group identical method requests across the batch,
one backward pass per target slot, each method's tensor work over the sub-batch of images that asked for it, and the
maps scattered back to each job.

Abandoned jobs (their requester has gone; the runtime's batch says which) stop early: every method pass, and every
chunk of perturbation methods, starts with a checkpoint. A pass whose images all belong to abandoned jobs stops
there (WorkAbandoned; those jobs get it as their outcome, nobody receives it) and the other jobs get their maps.
The checkpoint also lets another model's waiting batch use the lane (see service/runtime/devices.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Protocol, Sequence

import torch
from pydantic import BaseModel

from service.explain.captures import CaptureBatch, CaptureNeeds, ModelRunner, WorkAbandoned, record
from service.explain.evaluation import MapToEvaluate, evaluate_maps
from service.explain.registry import ExplainMethod
from service.explain.targets import TargetRequest
from service.model.served import ServedModel


class BatchControl(Protocol):
    """The running batch as the runtime shows it (`service.runtime.batching.RunningBatch`), seen as these jobs."""

    def wanted(self, index: int) -> bool: ...

    def checkpoint(self) -> None: ...  # raises when no job is wanted; may let another model use the lane


class _Unstoppable:
    """Direct calls (tests, benchmarks): every job wanted, nothing else waiting for the lane."""

    def wanted(self, index: int) -> bool:
        return True

    def checkpoint(self) -> None:
        pass


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

    kind: ClassVar[str] = "explain"
    pixels: torch.Tensor  # (C, H, W) float32, normalised
    methods: tuple[MethodRequest, ...]
    target: TargetRequest
    evaluate: tuple[str, ...] = ()  # faithfulness metrics (service.explain.evaluation) to measure on every map


@dataclass
class MethodMaps:
    """One method's maps for one image: one per target (a single one for class-agnostic methods)."""

    maps: list[torch.Tensor]  # (h, w) each, float32, CPU
    layers: list[torch.Tensor | None]  # (L, h, w) each, or None
    layer_indices: tuple[int, ...] | None
    compute_ms: float
    statistics: list[dict[str, float] | None] = field(default_factory=list)  # per map: extra map statistics
    evaluations: list[dict[str, float]] = field(default_factory=list)  # per map: faithfulness scores, if asked
    details: list[dict[str, Any] | None] = field(default_factory=list)  # per map: how a choosing method chose it
    evaluated_targets: list[int] = field(default_factory=list)  # per evaluated map: the class followed


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
    """Wait for the device, so that a method's compute_ms covers its work and not only the kernel launches."""
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


def _merged_needs(jobs: Sequence[ExplainJob]) -> CaptureNeeds:
    """What the recording forward pass must capture for every method of every job."""
    needs = CaptureNeeds()
    for job in jobs:
        for request in job.methods:
            needs = needs | request.needs
    return needs


def _forward(served: ServedModel, pixels: torch.Tensor, needs: CaptureNeeds) -> _Forward:
    """The one forward pass of the batch, recording what `needs` asks for (graph kept when gradients are needed)."""
    with record(served.active_network, needs) as recording, torch.set_grad_enabled(needs.any_grad):
        batch = pixels.to(device=served.device, dtype=served.dtype)
        if needs.any_grad:
            batch.requires_grad_(True)
        logits = served.active_network(batch)
    return _Forward(batch, logits, recording.attentions, recording.layers, recording.layer_inputs)


def _captures(served: ServedModel, forward: _Forward, chunk_size: int) -> CaptureBatch:
    """The forward pass's results detached as float32, with a runner for methods that run the model again."""
    return CaptureBatch(
        logits=forward.logits.detach().float(),
        pixels=forward.batch.detach().float(),
        attentions=[a.detach().float() for a in forward.attentions],
        layers={name: t.detach().float() for name, t in forward.layers.items()},
        layer_inputs={name: t.detach().float() for name, t in forward.layer_inputs.items()},
        runner=ModelRunner(served.active_network, served.device, served.dtype, chunk_size,
                           mean=served.data_config.get("mean"), std=served.data_config.get("std")),
    )


@dataclass
class _MethodGroup:
    """One distinct method request and every (job, position in the job's methods) that asked for it."""

    request: MethodRequest
    members: list[tuple[int, int]] = field(default_factory=list)


def _group_requests(jobs: Sequence[ExplainJob]) -> list[_MethodGroup]:
    """Identical requests across the batch, in order of first appearance: each is computed once, over its members."""
    groups: dict[str, _MethodGroup] = {}
    for i, job in enumerate(jobs):
        for m, request in enumerate(job.methods):
            groups.setdefault(request.key, _MethodGroup(request)).members.append((i, m))
    return list(groups.values())


@dataclass(frozen=True)
class TargetGradients:
    """Gradients of each image's target logit for one target slot (float32, detached); None where not needed."""

    attention: list[torch.Tensor] | None = None  # per block
    layers: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> gradient of its output
    pixels: torch.Tensor | None = None


def _target_gradients(
    forward: _Forward, needs: CaptureNeeds, slot_targets: torch.Tensor, images: torch.Tensor, retain_graph: bool
) -> TargetGradients:
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
    return TargetGradients(
        attention=grads[:n_attn] if needs.attention_grad else None,
        layers=dict(zip(layer_names, grads[n_attn:n_attn + len(layer_names)])),
        pixels=grads[-1] if needs.input_grad else None,
    )


def _slot_captures(
    forward: _Forward, needs: CaptureNeeds, captures: CaptureBatch, targets: list[list[int]],
    groups: list[_MethodGroup],
) -> list[CaptureBatch]:
    """The captures for each target slot, with that slot's gradients. Slot s is each image's s-th target; its
    gradients are taken in one backward pass over the images that a class-specific method explains (the graph is
    kept for the next slot, freed after the last)."""
    class_specific_images = sorted({i for group in groups if group.request.method.class_specific
                                    for i, _ in group.members})
    n_slots = max((len(targets[i]) for i in class_specific_images), default=0)
    slots = []
    for slot in range(n_slots):
        slot_targets = torch.tensor([t[slot] if len(t) > slot else 0 for t in targets], device=forward.logits.device)
        gradients = TargetGradients()
        if needs.any_grad:
            in_slot = torch.tensor([i for i in class_specific_images if len(targets[i]) > slot],
                                   device=forward.logits.device)
            gradients = _target_gradients(forward, needs, slot_targets, in_slot, retain_graph=slot < n_slots - 1)
        slots.append(captures.for_target(slot_targets, attention_grads=gradients.attention,
                                         layer_grads=gradients.layers, input_grads=gradients.pixels))
    return slots


def _pass_checkpoint(batch: BatchControl, images: Sequence[int]) -> Callable[[], None]:
    """The checkpoint of a method pass over `images`: stop when none of their jobs is wanted any more."""

    def checkpoint() -> None:
        if not any(batch.wanted(i) for i in images):
            raise WorkAbandoned(f"nobody waits for images {list(images)} any more")
        batch.checkpoint()

    return checkpoint


def _compute_group(
    served: ServedModel, group: _MethodGroup, captures: CaptureBatch, slots: list[CaptureBatch],
    targets: list[list[int]], batch: BatchControl, abandoned: dict[int, WorkAbandoned],
) -> dict[tuple[int, int], MethodMaps]:
    """One method's maps for each of its members: class-agnostic methods in one pass over the members' images,
    class-specific ones in one pass per target slot over the members with that many targets. Each member is
    charged the time of every pass it was part of. A pass nobody waits for any more stops at its next checkpoint and
    its images' jobs go into `abandoned` (abandoning is final: every job of the pass is abandoned)."""
    request = group.request
    method = request.method
    results = {member: MethodMaps(maps=[], layers=[], layer_indices=None, compute_ms=0.0) for member in group.members}
    passes = (
        [([mb for mb in group.members if len(targets[mb[0]]) > slot], slots[slot]) for slot in range(len(slots))]
        if method.class_specific else [(group.members, captures)]
    )
    for members, source in passes:
        if not members:
            continue
        started = time.perf_counter()
        images = [i for i, _ in members]
        checkpoint = _pass_checkpoint(batch, images)
        try:
            checkpoint()
            selected = source.select(torch.tensor(images))
            if selected.runner is not None:
                selected = replace(selected, runner=selected.runner.with_checkpoint(checkpoint))
            output = method.compute(selected, request.params, served.anatomy)
        except WorkAbandoned as stopped:
            abandoned.update(dict.fromkeys(images, stopped))
            continue
        maps = _finite(output.maps)
        layer_maps = None if output.layers is None else _finite(output.layers)
        _synchronize(served.device)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        for row, member in enumerate(members):
            result = results[member]
            result.maps.append(maps[row])
            result.layers.append(None if layer_maps is None else layer_maps[row])
            result.statistics.append(None if output.statistics is None else output.statistics[row])
            result.details.append(None if output.details is None else output.details[row])
            result.layer_indices = output.layer_indices
            result.compute_ms += elapsed_ms
    return results


def _evaluate(
    jobs: Sequence[ExplainJob], captures: CaptureBatch, targets: list[list[int]],
    maps: dict[tuple[int, int], MethodMaps], batch: BatchControl, abandoned: dict[int, WorkAbandoned],
) -> None:
    """Faithfulness scores of every map of the jobs that asked for them, filled into their MethodMaps: the perturbed
    copies of every map of the batch run through one ModelRunner, in chunks. A class-agnostic map follows the
    image's first target. Stops like a method pass when none of these jobs is wanted any more."""
    asking = [i for i, job in enumerate(jobs) if job.evaluate and i not in abandoned]
    metrics = tuple(dict.fromkeys(name for i in asking for name in jobs[i].evaluate))
    if not asking or captures.runner is None:
        return
    items, owners = [], []
    for i in asking:
        for m, request in enumerate(jobs[i].methods):
            method_maps = maps[(i, m)]
            classes = targets[i] if request.method.class_specific else targets[i][:1]
            for saliency, target in zip(method_maps.maps, classes):
                items.append(MapToEvaluate(captures.pixels[i], saliency.to(captures.pixels.device), target))
                owners.append((method_maps, jobs[i].evaluate, target))
    runner = captures.runner.with_checkpoint(_pass_checkpoint(batch, asking))
    try:
        scores = evaluate_maps(runner, items, metrics)
    except WorkAbandoned as stopped:
        abandoned.update(dict.fromkeys(asking, stopped))
        return
    for (method_maps, wanted, target), score in zip(owners, scores):
        method_maps.evaluations.append({name: score[name] for name in wanted})
        method_maps.evaluated_targets.append(target)


def _outcomes(
    jobs: Sequence[ExplainJob], probabilities: list[torch.Tensor], targets: list[list[int]],
    maps: dict[tuple[int, int], MethodMaps], abandoned: dict[int, WorkAbandoned],
) -> list[ExplainOutcome | WorkAbandoned]:
    """Each job's outcome, its methods' maps back in the job's order (an abandoned job: why it stopped)."""
    return [
        abandoned[i] if i in abandoned else
        ExplainOutcome(probabilities=probabilities[i], targets=targets[i],
                       methods=[maps[(i, m)] for m in range(len(job.methods))])
        for i, job in enumerate(jobs)
    ]


def run_explain_batch(
    served: ServedModel, jobs: Sequence[ExplainJob], batch: BatchControl | None = None,
    chunk_size: int | None = None,
) -> list[ExplainOutcome | WorkAbandoned]:
    """Explain a batch of jobs (runs on a lane of the model's device). Perturbation methods run the model on at most
    `chunk_size` images at a time (default: the model's explain_chunk_size). `batch` says which jobs are still
    wanted (default: all); an abandoned job's outcome is the WorkAbandoned that stopped its work."""
    batch = _Unstoppable() if batch is None else batch
    needs = _merged_needs(jobs)
    forward = _forward(served, torch.stack([job.pixels for job in jobs]), needs)
    captures = _captures(served, forward, chunk_size or served.config.explain_chunk_size)
    probabilities = [captures.logits[i].softmax(-1).cpu() for i in range(len(jobs))]
    targets = [job.target.resolve(captures.logits[i]) for i, job in enumerate(jobs)]
    groups = _group_requests(jobs)
    slots = _slot_captures(forward, needs, captures, targets, groups)
    del forward  # the graph: every gradient has been taken
    maps: dict[tuple[int, int], MethodMaps] = {}
    abandoned: dict[int, WorkAbandoned] = {}
    for group in groups:
        maps.update(_compute_group(served, group, captures, slots, targets, batch, abandoned))
    _evaluate(jobs, captures, targets, maps, batch, abandoned)
    return _outcomes(jobs, probabilities, targets, maps, abandoned)
