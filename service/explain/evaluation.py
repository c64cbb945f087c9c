"""Faithfulness of saliency maps, measured on the model that made them: deletion and insertion (Petsiuk et al. 2018,
"RISE", arXiv:1806.07421) and the positive / negative perturbation tests (Chefer et al. 2021, arXiv:2012.09838).

Each metric perturbs the model's input in the map's order and follows the target class's probability:
- `deletion`: the map's cells (its own grid: patches, feature-map cells or pixels) are replaced by a blurred copy of
  the input, most salient first, in `DELETION_STEPS` equal steps from none to all; the area under the probability
  curve (AUC, fractions 0..1) is low when the map found what the model uses.
- `insertion`: the reverse, from the blurred copy revealing the most salient cells first: a high AUC is good.
- `positive_perturbation` / `negative_perturbation`: cells set to the dataset mean (0 in the normalised input), most
  (positive) or least (negative) relevant first, 0% to 90% in steps of 10% as in Chefer et al.; they report the
  area under the target's accuracy over a test set, here (one image) under its probability: low is good for
  positive, high for negative.
Signed maps are ranked by their signed value (the most positive cell first). Ties keep the grid's row-major order.
Every perturbed copy of every map runs through a `ModelRunner`, so a batch's copies share forward passes in chunks of
the model's `explain_chunk_size` and stop at the runner's checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Sequence, Union

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from api_schemas.explain import EvaluationMetric
from service.explain.captures import ModelRunner

DELETION_STEPS = 16
# RISE's blur at 224x224 input (kernel 11, sigma 5), scaled with the input's side.
BLUR_SIGMA_AT_224 = 5.0


@dataclass(frozen=True)
class MetricDefinition:
    """How one metric perturbs the input and which way is better."""

    name: EvaluationMetric
    description: str
    fractions: tuple[float, ...]  # fractions of the map's cells perturbed at each step
    most_salient_first: bool
    reveal: bool  # insertion: start from the substitute and reveal cells; otherwise replace cells by it
    substitute: Literal["blur", "mean"]
    higher_is_better: bool

    @property
    def forward_passes(self) -> int:
        """Forward passes of the model per map."""
        return len(self.fractions)


_CHEFER_FRACTIONS = tuple(step / 10 for step in range(10))


def rise_metrics(steps: int) -> tuple[MetricDefinition, MetricDefinition]:
    """RISE's deletion and insertion with `steps` equal steps (steps + 1 forward passes each)."""
    fractions = tuple(step / steps for step in range(steps + 1))
    return (
        MetricDefinition(
            "deletion", f"RISE deletion: the most salient cells first replaced by a blurred copy, in {steps} steps; "
            "area under the target's probability. Lower is better.",
            fractions, most_salient_first=True, reveal=False, substitute="blur", higher_is_better=False),
        MetricDefinition(
            "insertion", f"RISE insertion: from a blurred copy, the most salient cells revealed first, in {steps} "
            "steps; area under the target's probability. Higher is better.",
            fractions, most_salient_first=True, reveal=True, substitute="blur", higher_is_better=True),
    )


METRICS: dict[str, MetricDefinition] = {
    definition.name: definition for definition in (
        *rise_metrics(DELETION_STEPS),
        MetricDefinition(
            "positive_perturbation", "Chefer et al. 2021: the most relevant cells first set to the mean colour, "
            "0% to 90% in steps of 10%; area under the target's probability. Lower is better.",
            _CHEFER_FRACTIONS, most_salient_first=True, reveal=False, substitute="mean", higher_is_better=False),
        MetricDefinition(
            "negative_perturbation", "Chefer et al. 2021: the least relevant cells first set to the mean colour, "
            "0% to 90% in steps of 10%; area under the target's probability. Higher is better.",
            _CHEFER_FRACTIONS, most_salient_first=False, reveal=False, substitute="mean", higher_is_better=True),
    )
}


def forward_passes(metrics: Sequence[str]) -> int:
    """Forward passes of the model that evaluating one map with `metrics` costs."""
    return sum(METRICS[name].forward_passes for name in metrics)


@dataclass(frozen=True)
class MapToEvaluate:
    """One map and what it explains: the model input it was computed on and the class whose probability to follow."""

    pixels: torch.Tensor  # (C, H, W), the normalised model input
    saliency: torch.Tensor  # (h, w), the map on its own grid
    target: int


def blurred(pixels: torch.Tensor) -> torch.Tensor:
    """RISE's substitute: the input blurred with a Gaussian of sigma 5 px at 224 px, scaled with the input's side."""
    sigma = max(BLUR_SIGMA_AT_224 * max(pixels.shape[-2:]) / 224.0, 0.5)
    kernel = 2 * int(round(2 * sigma)) + 1  # 11 at sigma 5, as in RISE
    return gaussian_blur(pixels, [kernel, kernel], [sigma, sigma])


def _substitute(pixels: torch.Tensor, kind: str) -> torch.Tensor:
    return blurred(pixels) if kind == "blur" else torch.zeros_like(pixels)  # 0: the mean colour, once normalised


def saliency_order(saliency: torch.Tensor, most_salient_first: bool) -> torch.Tensor:
    """The map's cells (row-major indices) in the order a metric perturbs them; ties keep row-major order."""
    flat = saliency.flatten().float()
    return torch.argsort(-flat if most_salient_first else flat, stable=True)


def _perturbed(item: MapToEvaluate, definition: MetricDefinition, substitute: torch.Tensor) -> Iterator[torch.Tensor]:
    """The perturbed inputs of one map for one metric, one per fraction."""
    h, w = item.saliency.shape
    height, width = item.pixels.shape[-2:]
    order = saliency_order(item.saliency, definition.most_salient_first).to(item.pixels.device)
    cells = h * w
    for fraction in definition.fractions:
        chosen = torch.zeros(cells, dtype=torch.float32, device=item.pixels.device)
        chosen[order[: int(round(fraction * cells))]] = 1.0
        # each cell covers the pixels that nearest-neighbour upsampling of the grid gives it
        mask = F.interpolate(chosen.view(1, 1, h, w), size=(height, width), mode="nearest")[0].bool()
        if definition.reveal:
            yield torch.where(mask, item.pixels, substitute)
        else:
            yield torch.where(mask, substitute, item.pixels)


def _area_under(fractions: Sequence[float], values: torch.Tensor) -> float:
    """Trapezoidal area under `values` over `fractions`, divided by the fractions' span (a mean probability)."""
    x = torch.tensor(fractions, dtype=torch.float64)
    return float(torch.trapezoid(values.double().cpu(), x) / (x[-1] - x[0]))


MetricChoice = Union[str, MetricDefinition]  # a name of METRICS, or a definition of one's own (rise_metrics(8))


def _definitions(metrics: Sequence[MetricChoice]) -> list[MetricDefinition]:
    return [METRICS[m] if isinstance(m, str) else m for m in metrics]


def evaluate_maps(
    runner: ModelRunner, items: Sequence[MapToEvaluate], metrics: Sequence[MetricChoice]
) -> list[dict[str, float]]:
    """Each map's score for each metric (in `metrics` order): the area under its probability curve."""
    definitions = {d.name: d for d in _definitions(metrics)}
    return [{name: _area_under(definitions[name].fractions, curve) for name, curve in curves.items()}
            for curves in probability_curves(runner, items, metrics)]


def probability_curves(
    runner: ModelRunner, items: Sequence[MapToEvaluate], metrics: Sequence[MetricChoice]
) -> list[dict[str, torch.Tensor]]:
    """Each map's curve for each metric: the target's probability at each of the metric's fractions. The perturbed
    copies of every map are generated lazily and run through `runner` in chunks of its chunk size, so memory stays
    bounded by a chunk whatever the number of maps."""
    definitions = _definitions(metrics)
    if not items or not definitions:
        return [{} for _ in items]

    def copies() -> Iterator[tuple[torch.Tensor, int]]:
        for item in items:
            substitutes = {kind: _substitute(item.pixels, kind) for kind in {d.substitute for d in definitions}}
            for definition in definitions:
                for image in _perturbed(item, definition, substitutes[definition.substitute]):
                    yield image, item.target

    probabilities: list[torch.Tensor] = []
    chunk: list[torch.Tensor] = []
    targets: list[int] = []

    def run() -> None:
        logits = runner.logits(torch.stack(chunk))
        index = torch.tensor(targets, device=logits.device)
        probabilities.append(logits.softmax(-1).gather(1, index[:, None])[:, 0].cpu())
        chunk.clear()
        targets.clear()

    for image, target in copies():
        chunk.append(image)
        targets.append(target)
        if len(chunk) == runner.chunk_size:
            run()
    if chunk:
        run()
    curve = torch.cat(probabilities)
    curves: list[dict[str, torch.Tensor]] = []
    start = 0
    for _ in items:
        result = {}
        for definition in definitions:
            result[definition.name] = curve[start:start + definition.forward_passes]
            start += definition.forward_passes
        curves.append(result)
    return curves
