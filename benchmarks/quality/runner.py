"""Runs the whole evaluation: loads each model as the server does, computes every applicable method's maps in batches
(`run_explain_batch`, the server's own pipeline, default params), then measures faithfulness against baseline maps,
the model-randomisation sanity check and, on the ground-truth benchmark's classifiers, localisation."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from benchmarks.environment import environment
from benchmarks.inprocess import load_model, method_requests
from benchmarks.quality.baselines import (
    BASELINES,
    baseline_map,
    gaussian_map,
    random_map,
)
from benchmarks.quality.localisation import localisation_scores, pointing_tolerance
from benchmarks.quality.options import (
    EXPENSIVE_RELATIVE_COST,
    SECTIONS,
    SMALL_INPUT_SIDE,
    SMOKE_MODELS,
    EvaluateOptions,
)
from benchmarks.quality.randomisation import (
    SANITY_RULE,
    SANITY_THRESHOLD,
    any_signed,
    cascade,
    randomisation_stages,
    sanity_passed,
    served_with_network,
    similarities,
)
from benchmarks.quality.report import render_markdown, shipped_summary, summarise
from benchmarks.quality.sources import (
    REPO_ROOT,
    EvalImage,
    groundtruth_images,
    input_mask,
    photos,
)
from service.config import ModelConfig, ServerSettings, load_settings, read_config_file
from service.explain.captures import ModelRunner
from service.explain.evaluation import (
    DELETION_STEPS,
    MapToEvaluate,
    evaluate_maps,
    rise_metrics,
)
from service.explain.pipeline import ExplainJob, MethodRequest, run_explain_batch
from service.explain.registry import ExplainMethod, all_methods
from service.explain.targets import TargetRequest
from service.model.served import ServedModel

log = logging.getLogger(__name__)

FAITHFULNESS_METRICS = rise_metrics(DELETION_STEPS)  # the server's deletion and insertion, 16 steps
LOWER_IS_BETTER = {"deletion": True, "insertion": False}
# An AUC difference below this is a tie (the same map scored in differently composed batches differs by ~1e-9)
TIE = 1e-6


def _progress(message: str) -> None:
    print(f"[evaluate {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ModelPlan:
    config: ModelConfig
    role: str  # photos | groundtruth


@dataclass
class MethodRun:
    """One method's maps on the trained model."""

    method: ExplainMethod
    requests: tuple[MethodRequest, ...]
    maps: list[torch.Tensor]  # one per image (the first `images` of the model's set)
    seconds: float
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return len(self.maps)


def is_expensive(method: ExplainMethod) -> bool:
    return method.relative_cost > EXPENSIVE_RELATIVE_COST


def expensive_share(count: int) -> int:
    """Images an expensive method runs on, out of `count`: a quarter, rounded up."""
    return max(1, math.ceil(count / 4)) if count else 0


# --- Models ---------------------------------------------------------------------------------------------------------


def _resolve(path: str) -> str:
    """A relative path as the ground-truth configuration means it: against the working directory when it exists
    there, else against the repository root (where the training script writes it)."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return str(candidate)
    return str(REPO_ROOT / candidate)


def groundtruth_configs(path: Path) -> list[dict[str, Any]]:
    models = list(read_config_file(path).get("models", []))
    for model in models:
        weights = model.get("weights", "")
        if isinstance(weights, str) and weights.startswith("file:"):
            model["weights"] = "file:" + _resolve(weights.removeprefix("file:"))
        if model.get("labels_file"):
            model["labels_file"] = _resolve(str(model["labels_file"]))
    return models


def model_plans(options: EvaluateOptions) -> tuple[ServerSettings, list[ModelPlan], list[str]]:
    """The server settings and the models to evaluate with the images each is evaluated on."""
    notes: list[str] = []
    overrides = {} if options.device is None else {"device": options.device}
    if options.smoke:
        settings = ServerSettings(models=[ModelConfig(**m) for m in SMOKE_MODELS], **overrides)
        plans = [ModelPlan(m, "photos") for m in settings.models]
        plans += [ModelPlan(m, "groundtruth") for m in settings.models]
        return settings, plans, ["Smoke run: tiny models with random weights; numbers meaningless."]
    settings = load_settings(options.config, **overrides)
    plans = [ModelPlan(m, "photos") for m in settings.models]
    gt_path = options.groundtruth_path
    if gt_path is None:
        notes.append("Ground-truth models not found (benchmarks/groundtruth/models.toml: train them with "
                     "`python -m benchmarks.groundtruth.train`); the ground-truth section is empty.")
    elif not gt_path.is_file():
        raise SystemExit(f"--groundtruth-config {gt_path}: no such file")
    else:
        taken = {p.config.id for p in plans}
        for model in groundtruth_configs(gt_path):
            config = ModelConfig.model_validate(model)
            if config.id in taken:
                raise SystemExit(f"model id {config.id!r} is in both configurations")
            plans.append(ModelPlan(config, "groundtruth"))
    if options.models:
        known = {p.config.id for p in plans}
        missing = [m for m in options.models if m not in known]
        if missing:
            raise SystemExit(f"--models {missing}: unknown; choose from {sorted(known)}")
        plans = [p for p in plans if p.config.id in options.models]
    return settings, plans, notes


# --- Maps -----------------------------------------------------------------------------------------------------------


def compute_maps(served: ServedModel, requests: tuple[MethodRequest, ...], pixels: torch.Tensor,
                 targets: Sequence[int], batch_size: int) -> list[torch.Tensor]:
    """One map per image (the method's map for the image's class index), `batch_size` jobs per run_explain_batch."""
    maps: list[torch.Tensor] = []
    for start in range(0, len(targets), batch_size):
        jobs = [ExplainJob(pixels[i], requests, TargetRequest(index=int(targets[i])))
                for i in range(start, min(start + batch_size, len(targets)))]
        for outcome in run_explain_batch(served, jobs):
            if isinstance(outcome, Exception):
                raise outcome
            maps.append(outcome.methods[0].maps[0])
    return maps


def probabilities(served: ServedModel, pixels: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    return torch.cat([served.predict_probabilities(chunk) for chunk in pixels.split(batch_size)])


def _runner(served: ServedModel) -> ModelRunner:
    return ModelRunner(served.network, served.device, served.dtype, served.config.explain_chunk_size,
                       mean=served.data_config.get("mean"), std=served.data_config.get("std"))


# --- Faithfulness ---------------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def _grid_key(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def faithfulness(served: ServedModel, pixels: torch.Tensor, targets: Sequence[int], runs: dict[str, MethodRun],
                 seed: int) -> dict[str, Any]:
    """Deletion and insertion AUCs of every method's maps and of the baseline maps on the same grids (the baselines
    once per image and grid); fills each run's result["faithfulness"] and returns the baselines' means per grid."""
    runner = _runner(served)
    names = [d.name for d in FAITHFULNESS_METRICS]
    needed = sorted({(i, tuple(m.shape)) for run in runs.values() for i, m in enumerate(run.maps)})
    keys = [(b, i, grid) for i, grid in needed for b in BASELINES]
    items = [MapToEvaluate(pixels[i], baseline_map(b, grid, seed, i), int(targets[i])) for b, i, grid in keys]
    baseline = dict(zip(keys, evaluate_maps(runner, items, FAITHFULNESS_METRICS)))
    for run in runs.values():
        started = time.perf_counter()
        scores = evaluate_maps(runner, [MapToEvaluate(pixels[i], m, int(targets[i])) for i, m in enumerate(run.maps)],
                               FAITHFULNESS_METRICS)
        section: dict[str, Any] = {"images": run.images, "grid": list(run.maps[0].shape),
                                   "per_image": {metric: [s[metric] for s in scores] for metric in names}}
        for metric in names:
            ours = [s[metric] for s in scores]
            entry: dict[str, Any] = {"mean": _mean(ours)}
            for b in BASELINES:
                theirs = [baseline[(b, i, tuple(m.shape))][metric] for i, m in enumerate(run.maps)]
                sign = -1.0 if LOWER_IS_BETTER[metric] else 1.0
                advantage = [sign * (o - t) for o, t in zip(ours, theirs)]
                entry[b] = _mean(theirs)
                entry[f"advantage_vs_{b}"] = _mean(advantage)
                entry[f"win_rate_vs_{b}"] = _mean([float(a > TIE) for a in advantage])
            section[metric] = entry
        section["seconds"] = time.perf_counter() - started
        run.result["faithfulness"] = section
    grids: dict[str, Any] = {}
    for grid in sorted({g for _, g in needed}):
        grids[_grid_key(grid)] = {b: {metric: _mean([s[metric] for (bb, i, g), s in baseline.items()
                                                     if bb == b and g == grid]) for metric in names}
                                  for b in BASELINES}
    return grids


# --- Ground truth ---------------------------------------------------------------------------------------------------


def groundtruth(runs: dict[str, MethodRun], masks: list[np.ndarray], input_hw: tuple[int, int],
                seed: int) -> dict[str, Any]:
    """Localisation scores of every method (and of the baselines, drawn at the input resolution) against the masks;
    fills each run's result["groundtruth"] and returns the baselines' scores and the context."""
    tolerance = pointing_tolerance(max(input_hw))

    def scores(maps: Sequence[torch.Tensor]) -> dict[str, Any]:
        per_image = [localisation_scores(m, masks[i], tolerance) for i, m in enumerate(maps)]
        return {key: _mean([s[key] for s in per_image])
                for key in ("pointing_game", "mass_inside", "best_iou", "best_iou_threshold")}

    for run in runs.values():
        section = {"images": run.images, **scores(run.maps)}
        faithful = run.result.get("faithfulness")
        if faithful:
            for metric in ("deletion", "insertion"):
                section[metric] = faithful[metric]["mean"]
        run.result["groundtruth"] = section
    return {
        "pointing_tolerance_px": tolerance,
        "mask_share": _mean([float(m.mean()) for m in masks]),
        "baselines": {
            "gaussian": scores([gaussian_map(input_hw)] * len(masks)),
            "random": scores([random_map(input_hw, seed, i) for i in range(len(masks))]),
        },
    }


# --- Sanity ---------------------------------------------------------------------------------------------------------


def sanity(served: ServedModel, pixels: torch.Tensor, targets: Sequence[int], runs: dict[str, MethodRun],
           options: EvaluateOptions, count: int) -> list[dict[str, Any]]:
    """The cascading randomisation for every method (the cascade built once, every method run on each stage); fills
    each run's result["sanity"] and returns the stages with how far the model's predictions moved."""
    small = max(served.input_size[1:]) <= SMALL_INPUT_SIDE
    checked: dict[str, int] = {}
    for name, run in runs.items():
        if is_expensive(run.method) and not small and not options.sanity_expensive:
            run.result["sanity"] = {"status": "skipped", "reason": (
                f"registry cost > {EXPENSIVE_RELATIVE_COST:g} forward passes on a {max(served.input_size[1:])}-px "
                f"model: checked on models of at most {SMALL_INPUT_SIDE} px (--sanity-expensive checks it here)")}
            continue
        checked[name] = min(run.images, count)
    if not checked:
        return []
    stages = randomisation_stages(served.network, options.sanity_groups)
    n = max(checked.values())
    trained_logits = torch.log(probabilities(served, pixels[:n]).clamp_min(1e-12))
    curves: dict[str, list[dict[str, Any]]] = {name: [] for name in checked}
    failed: dict[str, str] = {}
    seconds = dict.fromkeys(checked, 0.0)
    stage_rows = []
    for stage, network in cascade(served.network, stages, options.seed):
        clone = served_with_network(served, network)
        logits = torch.log(probabilities(clone, pixels[:n]).clamp_min(1e-12))
        stage_rows.append({
            "label": stage.label, "kind": stage.kind, "units": list(stage.units),
            "top1_agreement": float((logits.argmax(1) == trained_logits.argmax(1)).float().mean()),
            "target_probability": float(logits.exp()[torch.arange(n), torch.tensor(targets[:n])].mean()),
        })
        for name, k in checked.items():
            if name in failed:
                continue
            run = runs[name]
            started = time.perf_counter()
            try:
                maps = compute_maps(clone, run.requests, pixels[:k], targets[:k], options.batch_size)
            except Exception as exc:  # noqa: BLE001 - one broken method must not end the evaluation
                log.exception("sanity check of %r failed", name)
                failed[name] = f"{type(exc).__name__}: {exc}"
                continue
            seconds[name] += time.perf_counter() - started
            absolute = any_signed(run.maps[:k])
            curves[name].append({"stage": stage.label,
                                 **similarities(run.maps[:k], maps, tuple(pixels.shape[-2:]), absolute)})
    for name, k in checked.items():
        if name in failed:
            runs[name].result["sanity"] = {"status": "error", "reason": failed[name]}
            continue
        judged = next((i for i, stage in enumerate(stages) if stage.kind != "head"), 0)
        runs[name].result["sanity"] = {
            "status": "ok", "images": k, "absolute": any_signed(runs[name].maps[:k]), "curve": curves[name],
            "passed": sanity_passed(curves[name], stages), "seconds": seconds[name],
            # the rule's first judged stage: the head and the top block group re-initialised
            "top_stage_spearman": curves[name][judged]["spearman"],
        }
    return stage_rows


# --- One model ------------------------------------------------------------------------------------------------------


def evaluate_model(served: ServedModel, role: str, images: list[EvalImage], methods: dict[str, ExplainMethod],
                   options: EvaluateOptions) -> dict[str, Any]:
    timing: dict[str, float] = {}
    result: dict[str, Any] = {
        "id": served.id, "architecture": served.architecture, "family": served.family, "role": role,
        "weights": {"source": served.weights.source, "random": served.weights.random, "note": served.weights.note},
        "input_size": list(served.input_size), "device": str(served.device), "images": [], "methods": {},
        "not_applicable": {}, "baselines": {}, "sanity_stages": [], "groundtruth": None, "timing_s": timing,
    }
    started = time.perf_counter()
    pixels = torch.stack([served.preprocess(im.image) for im in images])
    probs = probabilities(served, pixels)
    top1 = probs.argmax(1).tolist()
    targets = [im.label if im.label is not None else top1[i] for i, im in enumerate(images)]
    for i, im in enumerate(images):
        result["images"].append({"name": im.name, "target": targets[i], "target_label": served.labels[targets[i]],
                                 "target_probability": float(probs[i, targets[i]]), "top1": top1[i],
                                 "correct": None if im.label is None else top1[i] == im.label})
    if role == "groundtruth":
        result["accuracy"] = _mean([float(r["correct"]) for r in result["images"]])

    runs: dict[str, MethodRun] = {}
    for name, method in methods.items():
        requests, reason = method_requests(method, served)
        if requests is None:
            result["not_applicable"][name] = reason
            continue
        n = expensive_share(len(images)) if is_expensive(method) else len(images)
        begun = time.perf_counter()
        try:
            maps = compute_maps(served, requests, pixels[:n], targets[:n], options.batch_size)
        except Exception as exc:  # noqa: BLE001 - one broken method must not end the evaluation
            log.exception("method %r failed on %r", name, served.id)
            result["methods"][name] = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
            continue
        run = MethodRun(method, requests, maps, time.perf_counter() - begun)
        run.result = {"status": "ok", "class_specific": method.class_specific, "relative_cost": method.relative_cost,
                      "expensive": is_expensive(method), "signed": any_signed(maps), "grid": list(maps[0].shape),
                      "images": n, "maps_s_per_image": run.seconds / n}
        runs[name] = run
    timing["maps"] = time.perf_counter() - started
    _progress(f"{served.id}: maps of {len(runs)} methods on {len(images)} images in {timing['maps']:.0f}s")

    if "faithfulness" not in options.skip or role == "groundtruth" and "groundtruth" not in options.skip:
        started = time.perf_counter()
        result["baselines"] = faithfulness(served, pixels, targets, runs, options.seed)
        timing["faithfulness"] = time.perf_counter() - started
        _progress(f"{served.id}: deletion and insertion in {timing['faithfulness']:.0f}s")
    if role == "groundtruth" and "groundtruth" not in options.skip:
        started = time.perf_counter()
        masks = [input_mask(im.mask, served.transform, tuple(served.input_size[1:])) for im in images]
        result["groundtruth"] = groundtruth(runs, masks, tuple(served.input_size[1:]), options.seed)
        timing["groundtruth"] = time.perf_counter() - started
    if "sanity" not in options.skip:
        started = time.perf_counter()
        count = options.groundtruth_sanity_images if role == "groundtruth" else options.sanity_images
        result["sanity_stages"] = sanity(served, pixels, targets, runs, options, min(count, len(images)))
        timing["sanity"] = time.perf_counter() - started
        _progress(f"{served.id}: sanity check over {len(result['sanity_stages'])} stages in {timing['sanity']:.0f}s")
    if "faithfulness" in options.skip:
        for run in runs.values():
            run.result.pop("faithfulness", None)
    for name, run in runs.items():
        result["methods"][name] = run.result
    return result


# --- The run --------------------------------------------------------------------------------------------------------


def selected_methods(options: EvaluateOptions) -> dict[str, ExplainMethod]:
    methods = all_methods()
    if not options.methods:
        return methods
    unknown = [m for m in options.methods if m not in methods]
    if unknown:
        raise SystemExit(f"--methods {unknown}: unknown; choose from {', '.join(methods)}")
    return {name: methods[name] for name in options.methods}


def run_evaluation(options: EvaluateOptions) -> dict[str, Any]:
    started = time.perf_counter()
    unknown = set(options.skip) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--skip: unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    previous_threads = torch.get_num_threads()
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        settings, plans, notes = model_plans(options)
        methods = selected_methods(options)
        photo_set, photo_notes = photos(options.images) if any(p.role == "photos" for p in plans) else ([], [])
        notes += photo_notes
        gt_set: list[EvalImage] = []
        if any(p.role == "groundtruth" for p in plans):
            try:
                gt_set = groundtruth_images(options.groundtruth_images)
            except ModuleNotFoundError as exc:
                notes.append(f"ground-truth dataset unavailable ({exc}); its models are not evaluated")
                plans = [p for p in plans if p.role != "groundtruth"]
        report: dict[str, Any] = {
            "schema_version": 1, "command": options.command, "smoke": options.smoke,
            "environment": None, "settings": {
                "images": options.images, "groundtruth_images": options.groundtruth_images,
                "sanity_images": options.sanity_images, "groundtruth_sanity_images": options.groundtruth_sanity_images,
                "sanity_groups": options.sanity_groups, "sanity_expensive": options.sanity_expensive,
                "include_random": options.include_random, "batch_size": options.batch_size, "seed": options.seed,
                "threads": torch.get_num_threads(), "skipped_sections": sorted(options.skip),
                "methods": list(methods), "deletion_steps": DELETION_STEPS,
                "expensive_relative_cost": EXPENSIVE_RELATIVE_COST, "small_input_side": SMALL_INPUT_SIDE,
                "sanity_rule": SANITY_RULE, "sanity_threshold": SANITY_THRESHOLD,
                "photos": [im.name for im in photo_set],
            },
            "models": [], "skipped_models": [], "notes": notes,
        }
        for plan in plans:
            config = plan.config
            _progress(f"{config.id}: loading ({config.architecture}, weights {config.weights})")
            begun = time.perf_counter()
            try:
                served = load_model(config, settings)
            except Exception as exc:  # noqa: BLE001 - a model that cannot load is reported, the others evaluated
                report["skipped_models"].append({"id": config.id, "role": plan.role,
                                                 "reason": f"cannot be loaded ({type(exc).__name__}: {exc})"})
                _progress(f"{config.id}: cannot be loaded, skipped")
                continue
            load_s = time.perf_counter() - begun
            if report["environment"] is None:
                report["environment"] = environment(served.device)
            if served.weights.random and not options.include_random:
                reason = served.weights.note or f"weights {config.weights!r} are random"
                report["skipped_models"].append({"id": config.id, "role": plan.role, "reason": (
                    f"runs on RANDOM weights ({reason}); its maps would measure nothing (--include-random "
                    "evaluates it anyway)")})
                _progress(f"{config.id}: random weights, skipped")
                continue
            images = photo_set if plan.role == "photos" else gt_set
            result = evaluate_model(served, plan.role, images, methods, options)
            result["timing_s"]["load"] = load_s
            report["models"].append(result)
            del served
        if report["environment"] is None:
            report["environment"] = environment(torch.device("cpu"))
        report["summary"] = summarise(report)
        report["duration_s"] = time.perf_counter() - started
        _progress(f"done in {report['duration_s']:.0f}s")
        return report
    finally:
        torch.set_num_threads(previous_threads)


def write_outputs(report: dict[str, Any], options: EvaluateOptions) -> str:
    markdown = render_markdown(report)
    text = json.dumps(report, indent=2, allow_nan=False)
    if options.output_json:
        Path(options.output_json).write_text(text + "\n", encoding="utf-8")
    if options.output_md:
        Path(options.output_md).write_text(markdown, encoding="utf-8")
    if options.output_summary:
        Path(options.output_summary).write_text(json.dumps(shipped_summary(report), indent=1, allow_nan=False) + "\n",
                                                encoding="utf-8")
    return markdown
