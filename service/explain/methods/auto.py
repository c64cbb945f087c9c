"""Auto: the most faithful of several candidate maps, chosen per image (after Mylonas, Mollas & Tsoumakas 2022, "An
Attention Matrix for Every Decision: Faithfulness-based Arbitration Among Multiple Attention-Based Interpretations of
Transformers", arXiv:2209.10876: aggregation choices treated as hyperparameters and picked by faithfulness).

Every candidate (a registered method with params) is computed on the batch; each image's candidate maps are scored
on the model by RISE deletion and insertion (service.explain.evaluation, in `steps` steps), and each image gets the
map of its best candidate, with every candidate's scores. Candidates come from the registry, never by importing
their modules; candidate maps on different grids are upsampled (bilinear, as rendering does) to the finest one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api_schemas.errors import validation_message
from service.explain.captures import CaptureBatch, CaptureNeeds
from service.explain.evaluation import MapToEvaluate, evaluate_maps, rise_metrics
from service.explain.registry import (
    CostContext,
    CostEstimate,
    ExplainMethod,
    MethodCost,
    MethodOutput,
    all_methods,
    register_method,
)
from service.model.anatomy import ModelAnatomy

# The default candidates per family: the ViT aggregation choices of the seed idea (head fusion, rollout vs the last
# layer's attention vs gradient-weighted rules) and, for CNNs, the CAM family and gradient methods. Those that cannot
# run on a given model (gae and grad_rollout need a class token) are left out of its default set.
DEFAULT_CANDIDATES: dict[str, tuple[tuple[str, dict[str, Any]], ...]] = {
    "vit": (("rollout", {"head_fusion": "mean"}), ("rollout", {"head_fusion": "max"}), ("raw_attention", {}),
            ("gae", {}), ("grad_rollout", {})),
    "cnn": (("gradcam", {}), ("gradcam_pp", {}), ("layercam", {}), ("saliency", {}), ("input_x_gradient", {})),
}
Score = Literal["insertion_minus_deletion", "insertion", "deletion"]


class Candidate(BaseModel):
    """One candidate: a registered method (not `auto`) and its params."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="A method of GET /v1/methods that applies to the model's family.")
    params: dict[str, Any] = Field(default_factory=dict, description="Its params; unspecified ones take defaults.")


class AutoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    candidates: list[Candidate] | None = Field(
        default=None, min_length=1, max_length=12,
        description="The maps to choose from; default for ViTs: rollout (head fusion mean and max), raw_attention, "
        "gae, grad_rollout; for CNNs: gradcam, gradcam_pp, layercam, saliency, input_x_gradient (those that apply "
        "to the model). Layer ranges, token rows and head fusions are chosen by listing them as candidates.",
    )
    steps: int = Field(default=8, ge=2, le=32, description="Deletion/insertion steps scoring each candidate.")
    score: Score = Field(
        default="insertion_minus_deletion",
        description="What is maximised: insertion AUC minus deletion AUC, insertion AUC, or minus deletion AUC.",
    )


@dataclass(frozen=True)
class _Resolved:
    method: ExplainMethod
    params: BaseModel

    @property
    def label(self) -> dict[str, Any]:
        return {"method": self.method.name, "params": self.params.model_dump()}


def _candidates(params: AutoParams, anatomy: ModelAnatomy) -> list[_Resolved]:
    """The candidates validated against the registry and the model (ValueError naming `candidates[i]`)."""
    methods = all_methods()
    if params.candidates is None:
        resolved = []
        for name, raw in DEFAULT_CANDIDATES[anatomy.family]:
            method = methods[name]
            candidate = _Resolved(method, method.params_model.model_validate(raw, strict=True))
            try:
                if method.check is not None:
                    method.check(candidate.params, anatomy)
            except ValueError:
                continue  # a default that does not apply to this model
            resolved.append(candidate)
        return resolved
    resolved = []
    for i, spec in enumerate(params.candidates):
        field = f"candidates[{i}]"
        method = methods.get(spec.name)
        if method is None or method.name == "auto":
            raise ValueError(f"{field}.name: {spec.name!r} is not a method auto can choose; available: "
                             f"{', '.join(n for n in methods if n != 'auto')}")
        if anatomy.family not in method.families:
            raise ValueError(f"{field}: {spec.name!r} does not apply to {anatomy.family} models")
        try:
            candidate_params = method.params_model.model_validate(spec.params, strict=True)
        except ValidationError as exc:
            raise ValueError(validation_message(exc.errors(), at=f"{field}.params")) from None
        if method.check is not None:
            try:
                method.check(candidate_params, anatomy)
            except ValueError as exc:
                raise ValueError(f"{field} ({spec.name}): {exc}") from None
        resolved.append(_Resolved(method, candidate_params))
    return resolved


def _check(params: AutoParams, anatomy: ModelAnatomy) -> None:
    if not _candidates(params, anatomy):
        raise ValueError("no candidate applies to this model")


def _needs(params: AutoParams, anatomy: ModelAnatomy) -> CaptureNeeds:
    needs = CaptureNeeds()
    for candidate in _candidates(params, anatomy):
        needs = needs | candidate.method.needs(candidate.params, anatomy)
    return needs


def _cost(params: AutoParams, ctx: CostContext) -> CostEstimate:
    """Per target: every candidate's own cost at one target, plus 2 x (steps + 1) forward passes scoring each."""
    one_target = CostContext(anatomy=ctx.anatomy, targets=1, layer_channels=ctx.layer_channels)
    candidates = _candidates(params, ctx.anatomy)
    own = sum(c.method.estimate_cost(c.params, one_target).units for c in candidates)
    scoring = len(candidates) * 2 * (params.steps + 1)
    return CostEstimate((own + scoring) * ctx.targets,
                        f"({own:.4g} for {len(candidates)} candidates + {scoring} scoring passes) x {ctx.targets} "
                        "target(s)")


def _on_grid(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def _score(scores: dict[str, float], rule: Score) -> float:
    if rule == "insertion":
        return scores["insertion"]
    if rule == "deletion":
        return -scores["deletion"]
    return scores["insertion"] - scores["deletion"]


@register_method(
    name="auto",
    description="The most faithful of several candidate maps for this image: each candidate is scored by RISE "
    "deletion and insertion on the model, and the best map is returned with every candidate's scores (`selection`).",
    families=("vit", "cnn"),
    class_specific=True,
    params_model=AutoParams,
    needs=_needs,
    relative_cost=100.0,
    cost_note="The candidates' own cost plus 2 x (steps + 1) forward passes per candidate, per target.",
    check=_check,
    cost=MethodCost(_cost, "(sum of the candidates' costs at 1 target + candidates x 2 x (steps + 1)) x targets"),
)
def auto(captures: CaptureBatch, params: AutoParams, anatomy: ModelAnatomy) -> MethodOutput:
    assert captures.targets is not None and captures.runner is not None
    candidates = _candidates(params, anatomy)
    maps = [torch.nan_to_num(c.method.compute(captures, c.params, anatomy).maps.float()) for c in candidates]
    size = max((tuple(m.shape[-2:]) for m in maps), key=lambda hw: hw[0] * hw[1])
    maps = [_on_grid(m, size) for m in maps]  # type: ignore[arg-type]
    batch = captures.pixels.shape[0]
    items = [MapToEvaluate(captures.pixels[b], maps[c][b], int(captures.targets[b]))
             for c in range(len(candidates)) for b in range(batch)]
    scores = evaluate_maps(captures.runner, items, rise_metrics(params.steps))
    chosen, details = [], []
    for b in range(batch):
        rows = [{**candidates[c].label, **scores[c * batch + b], "score": _score(scores[c * batch + b], params.score)}
                for c in range(len(candidates))]
        best = max(range(len(rows)), key=lambda c: rows[c]["score"])  # ties: the first listed
        chosen.append(maps[best][b])
        details.append({"winner": best, "score_rule": params.score, "steps": params.steps, "candidates": rows})
    return MethodOutput(maps=torch.stack(chosen), details=tuple(details))
