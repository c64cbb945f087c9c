"""Which classes to explain: resolving the request's `target` against a model's labels and logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from api_schemas import TopKTarget


class TargetError(ValueError):
    """The requested target does not exist for this model."""


@dataclass(frozen=True)
class TargetRequest:
    """Either the k most probable classes (top1 is k=1) or one fixed class index."""

    top_k: int | None = None
    index: int | None = None

    def resolve(self, logits: torch.Tensor) -> list[int]:
        """The class indices to explain for one image, given its logits (classes,)."""
        if self.index is not None:
            return [self.index]
        return logits.topk(min(self.top_k or 1, logits.numel())).indices.tolist()


def parse_target(target: object, labels: list[str]) -> TargetRequest:
    """Validate `target` ("top1", index, label or {"top_k": k}) for a model with these labels."""
    if isinstance(target, TopKTarget):
        return TargetRequest(top_k=min(target.top_k, len(labels)))
    if target == "top1":
        return TargetRequest(top_k=1)
    if isinstance(target, bool):
        raise TargetError("target: must be 'top1', a class index, a label or {'top_k': k}")
    if isinstance(target, int):
        if not 0 <= target < len(labels):
            raise TargetError(f"target: class index {target} is out of range 0..{len(labels) - 1}")
        return TargetRequest(index=target)
    if isinstance(target, str):
        wanted = target.strip().lower()
        matches = [i for i, label in enumerate(labels) if label == target]
        if not matches:  # case-insensitive, full label or one of its comma-separated synonyms
            matches = [i for i, label in enumerate(labels)
                       if wanted == label.lower() or wanted in (n.strip().lower() for n in label.split(","))]
        if not matches:
            raise TargetError(f"target: unknown label {target!r} for this model")
        return TargetRequest(index=matches[0])
    raise TargetError("target: must be 'top1', a class index, a label or {'top_k': k}")
