"""The model-randomisation sanity check (Adebayo et al. 2018, "Sanity Checks for Saliency Maps", cascading
randomisation): re-initialise the network from the top down (the head first, then groups of blocks, finally the
stem) and compare each method's map on every stage with its map on the trained network, for the same class index.
A map that explains the model must change once what the model learnt is gone; one that barely changes shows
something else (edges of the image, the architecture's own bias).

Stages are cumulative and cascade on one copy of the network: stage 1 re-initialises the head (every module after
the last block: final norm, pooling, classifier), each following stage adds the next group of blocks going down
(the blocks of a timm `blocks` / `stages` / `layers` / `features` container, or ResNet `layer1..4`, split top-first
into at most `max_groups` groups of near-equal size), and the last one adds the stem (every module before the first
block, and the root's own parameters such as a ViT's class token and position embedding). Re-initialisation calls
each module's `reset_parameters()` (torch's default initialisers; batch norms also reset their running statistics)
and draws every parameter no such module covers (class token, position embedding, layer scales) from a truncated
normal of std 0.02 (timm's ViT initialiser), seeded per unit, so a unit gets the same values at every stage and
runs are repeatable. The trained network is never modified.

Similarity per image, averaged over the images: the Spearman rank correlation (scipy.stats.spearmanr) of the two
maps flattened on their own grid, and the SSIM (skimage.metrics.structural_similarity, data range 1) of the two maps
brought to the input resolution and min-max normalised to [0, 1]. Signed maps are compared in absolute value (as
Adebayo et al. do: the sign of gradients flips easily and says little about what is highlighted). A constant map
on the randomised network shares no ranking with the trained one: its Spearman correlation counts as 0; an image
whose trained map is constant has nothing to compare and is left out (a method whose trained maps are all constant
gets no verdict).

The rule (`SANITY_RULE`): a method passes when its mean Spearman correlation is below `SANITY_THRESHOLD` at the
stage "head + top block group" and at every later stage. The head-only stage is reported but not judged:
class-agnostic methods (attention maps, rollout...) cannot depend on the classifier, by construction.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity
from torch import nn

from benchmarks.quality.localisation import is_signed, to_input_space
from service.model.served import ServedModel

SANITY_THRESHOLD = 0.5
SANITY_RULE = (f"passes when the mean Spearman rank correlation with the trained model's map is below "
               f"{SANITY_THRESHOLD:g} once the head and the top block group are re-initialised, and stays below it "
               "at every later stage (absolute values for signed maps)")
BLOCK_CONTAINERS = ("blocks", "stages", "layers", "features")
ROOT = "<root parameters>"
FALLBACK_STD = 0.02

# (a ServedModel, or a copy on a randomised network; pixels (B, C, H, W); class index per image) -> (B) maps (h, w)
MapFunction = Callable[[ServedModel, torch.Tensor, Sequence[int]], Sequence[torch.Tensor]]


@dataclass(frozen=True)
class Stage:
    """One step of the cascade: the units it re-initialises on top of the previous stages'."""

    label: str
    units: tuple[str, ...]  # module names (ROOT: the root module's own parameters)
    kind: str  # head | blocks | stem


def _stateful(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _units(model: nn.Module) -> tuple[list[str], list[bool]]:
    """The network's top-level units in registration (forward) order, and which of them are blocks."""
    names, is_block = [], []
    for name, child in model.named_children():
        if not _stateful(child):
            continue
        if name in BLOCK_CONTAINERS and isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1:
            for sub, grandchild in child.named_children():
                if _stateful(grandchild):
                    names.append(f"{name}.{sub}")
                    is_block.append(True)
        else:
            names.append(name)
            is_block.append(bool(re.fullmatch(r"layer\d+", name)))
    return names, is_block


def _span(names: Sequence[str]) -> str:
    return ", ".join(names)


def randomisation_stages(model: nn.Module, max_groups: int = 4) -> list[Stage]:
    """The cascade's stages, top down: head, block groups (top group first), stem."""
    names, is_block = _units(model)
    root_params = [n for n, _ in model.named_parameters(recurse=False)]
    if not any(is_block):  # no recognised blocks: every unit but the last (the head) is a block of its own
        is_block = [True] * (len(names) - 1) + [False]
    first = is_block.index(True)
    last = len(is_block) - 1 - is_block[::-1].index(True)
    stem, blocks, head = names[:first], names[first:last + 1], names[last + 1:]
    stages = []
    if head:
        stages.append(Stage(f"head ({_span(head)})", tuple(head), "head"))
    top_down = blocks[::-1]
    for group in np.array_split(np.array(top_down, dtype=object), min(max_groups, len(top_down))):
        units = tuple(str(u) for u in group)
        stages.append(Stage(f"+ {_span(units)}", units, "blocks"))
    stem_units = tuple(stem) + ((ROOT,) if root_params else ())
    if stem_units:
        stages.append(Stage(f"+ stem ({_span(list(stem) + root_params)})", stem_units, "stem"))
    return stages


def _unit_seed(seed: int, unit: str) -> int:
    return (seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(unit))) % (2**63)


@torch.no_grad()
def reinitialise(model: nn.Module, unit: str, seed: int) -> None:
    """Re-initialise one unit of `model` in place (see the module docstring), seeded by (seed, unit)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_unit_seed(seed, unit))
        if unit == ROOT:
            for parameter in model.parameters(recurse=False):
                nn.init.trunc_normal_(parameter, std=FALLBACK_STD)
            return
        module = model.get_submodule(unit)
        covered: set[int] = set()
        for sub in module.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()
                covered.update(id(p) for p in sub.parameters(recurse=False))
        for parameter in module.parameters():
            if id(parameter) not in covered:
                nn.init.trunc_normal_(parameter, std=FALLBACK_STD)


def cascade(network: nn.Module, stages: Sequence[Stage], seed: int) -> Iterator[tuple[Stage, nn.Module]]:
    """Each stage with the network re-initialised down to it: ONE deep copy, modified stage after stage (use each
    yielded network before asking for the next). The trained network is left as it is."""
    randomised = copy.deepcopy(network)
    for stage in stages:
        for unit in stage.units:
            reinitialise(randomised, unit, seed)
        yield stage, randomised


def served_with_network(served: ServedModel, network: nn.Module) -> ServedModel:
    """The served model running `network` instead (same config, anatomy, preprocessing, device): a shallow copy
    whose single lane copy is `network`, so `active_network` is it on every thread."""
    clone = copy.copy(served)
    clone.network = network
    clone.copies = [network]
    return clone


def _comparable(saliency: torch.Tensor, absolute: bool) -> torch.Tensor:
    values = saliency.detach().cpu().double()
    return values.abs() if absolute else values


def spearman(trained: torch.Tensor, randomised: torch.Tensor) -> float | None:
    """Spearman rank correlation of two maps flattened: None when the trained map is constant (no ranking to
    compare), 0 when only the randomised one is."""
    x, y = trained.flatten().numpy(), randomised.flatten().numpy()
    if np.ptp(x) == 0:
        return None
    if np.ptp(y) == 0:
        return 0.0
    value = float(spearmanr(x, y).statistic)
    return value if math.isfinite(value) else 0.0


def _unit_range(values: np.ndarray) -> np.ndarray:
    span = float(values.max() - values.min())
    return np.zeros_like(values) if span == 0 else (values - values.min()) / span


def ssim(a: torch.Tensor, b: torch.Tensor, size: tuple[int, int]) -> float:
    """SSIM of two maps brought to the input resolution (bilinear) and min-max normalised to [0, 1]."""
    x = _unit_range(to_input_space(a.float(), size))
    y = _unit_range(to_input_space(b.float(), size))
    return float(structural_similarity(x, y, data_range=1.0))


def similarities(trained: Sequence[torch.Tensor], randomised: Sequence[torch.Tensor], size: Sequence[int],
                 absolute: bool) -> dict[str, Any]:
    """Mean Spearman (over the images whose trained map is not constant; None if none) and mean SSIM between
    trained and randomised maps."""
    rho, structure = [], []
    for a, b in zip(trained, randomised, strict=True):
        a, b = _comparable(a, absolute), _comparable(b, absolute)
        rho.append(spearman(a, b))
        structure.append(ssim(a, b, (int(size[0]), int(size[1]))))
    defined = [v for v in rho if v is not None]
    return {"spearman": float(np.mean(defined)) if defined else None, "ssim": float(np.mean(structure)),
            "spearman_per_image": rho}


def sanity_passed(curve: Sequence[dict[str, Any]], stages: Sequence[Stage]) -> bool | None:
    """SANITY_RULE on a curve (one entry per stage, in stage order); None when a judged stage has no Spearman
    correlation (every trained map constant)."""
    judged = [point for point, stage in zip(curve, stages) if stage.kind != "head"] or list(curve)
    if any(point["spearman"] is None for point in judged):
        return None
    return all(point["spearman"] < SANITY_THRESHOLD for point in judged)


def any_signed(maps: Sequence[torch.Tensor]) -> bool:
    return any(is_signed(m) for m in maps)


def sanity_curve(
    served: ServedModel, compute: MapFunction, pixels: torch.Tensor, targets: Sequence[int], seed: int = 0,
    max_groups: int = 4, trained: Sequence[torch.Tensor] | None = None,
) -> dict[str, object]:
    """The whole check for one map function: its curve over the cascade and whether it passes."""
    stages = randomisation_stages(served.network, max_groups)
    trained = list(trained) if trained is not None else list(compute(served, pixels, targets))
    absolute = any_signed(trained)
    size = tuple(pixels.shape[-2:])
    curve = []
    for stage, network in cascade(served.network, stages, seed):
        maps = compute(served_with_network(served, network), pixels, targets)
        curve.append({"stage": stage.label, **similarities(trained, maps, size, absolute)})
    return {"curve": curve, "absolute": absolute, "passed": sanity_passed(curve, stages)}
