"""The evaluation's per-method summary (small and stable: shipped to GET /v1/methods) and its markdown report."""

from __future__ import annotations

from typing import Any, Sequence

from benchmarks.environment import machine_summary

FAITHFUL_WIN_RATE = 0.5
VERDICT_RULES = [
    f"**faithful**: beats the centred-Gaussian baseline map on at least {FAITHFUL_WIN_RATE:.0%} of the images on "
    "both deletion (lower AUC) and insertion (higher AUC), pooled over the images of the family's evaluated models;",
    "**sane**: passes the model-randomisation sanity check on every model of the family where it was checked;",
    "**localises**: on the ground-truth benchmark, a higher pointing-game accuracy and a larger mass inside the "
    "object than the centred-Gaussian baseline on the same images;",
    "**trustworthy**: every criterion measured holds, and at least two were measured; **unreliable**: fails the "
    "sanity check, or every criterion measured fails; **mixed**: anything else; **untested**: none measured.",
]


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)


def _verdict(faithful: bool | None, sane: bool | None, localises: bool | None) -> str:
    measured = [c for c in (faithful, sane, localises) if c is not None]
    if not measured:
        return "untested"
    if sane is False or not any(measured):
        return "unreliable"
    if all(measured) and len(measured) >= 2:
        return "trustworthy"
    return "mixed"


def _pooled(sections: Sequence[dict[str, Any]], metric: str) -> float | None:
    """The win rate vs the Gaussian over every image of these faithfulness sections."""
    images = sum(f["images"] for f in sections)
    if not images:
        return None
    return sum(f[metric]["win_rate_vs_gaussian"] * f["images"] for f in sections) / images


def summarise(report: dict[str, Any], trained_only: bool = False) -> dict[str, dict[str, dict[str, Any]]]:
    """summary[method][family] = {models, faithfulness_images, deletion_win_rate_vs_gaussian,
    insertion_win_rate_vs_gaussian, sanity_passed, sanity_spearman, pointing_game, mass_inside, verdict} over the
    evaluated models of that family (`trained_only`: models with real weights only)."""
    rows: dict[str, dict[str, list[tuple[dict[str, Any], dict[str, Any]]]]] = {}
    for model in report["models"]:
        if trained_only and model["weights"]["random"]:
            continue
        for name, method in model["methods"].items():
            if method.get("status") == "ok":
                rows.setdefault(name, {}).setdefault(model["family"], []).append((model, method))
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for name in sorted(rows):
        summary[name] = {}
        for family in sorted(rows[name]):
            entries = rows[name][family]
            faithfulness = [m["faithfulness"] for _, m in entries if m.get("faithfulness")]
            deletion, insertion = _pooled(faithfulness, "deletion"), _pooled(faithfulness, "insertion")
            sanity = [m["sanity"] for _, m in entries
                      if (m.get("sanity") or {}).get("status") == "ok" and m["sanity"]["passed"] is not None]
            sane = all(s["passed"] for s in sanity) if sanity else None
            top_stage = _mean([s.get("top_stage_spearman") for s in sanity])
            grounded = [(model["groundtruth"], m["groundtruth"]) for model, m in entries if m.get("groundtruth")]
            pointing = _mean([g["pointing_game"] for _, g in grounded])
            mass = _mean([g["mass_inside"] for _, g in grounded])
            localises = None
            if grounded:
                localises = all(g["pointing_game"] > ctx["baselines"]["gaussian"]["pointing_game"]
                                and g["mass_inside"] > ctx["baselines"]["gaussian"]["mass_inside"]
                                for ctx, g in grounded)
            faithful = None if deletion is None or insertion is None else bool(
                deletion >= FAITHFUL_WIN_RATE and insertion >= FAITHFUL_WIN_RATE)
            summary[name][family] = {
                "models": list(dict.fromkeys(model["id"] for model, _ in entries)),
                "faithfulness_images": sum(f["images"] for f in faithfulness),
                "deletion_win_rate_vs_gaussian": _round(deletion),
                "insertion_win_rate_vs_gaussian": _round(insertion),
                "sanity_passed": sane,
                "sanity_spearman": _round(top_stage),
                "pointing_game": _round(pointing),
                "mass_inside": _round(mass),
                "verdict": _verdict(faithful, sane, localises),
            }
    return summary


def shipped_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The summary as the server ships it (service/explain/measured_quality.json, read for GET /v1/methods, one
    api_schemas.MeasuredQuality per method and family): {"source": what was run, "methods": {method: [{family,
    models, deletion_win_rate, insertion_win_rate, sanity_check, sanity_spearman, pointing_game, mass_inside}]}},
    from the models with trained weights only."""
    env = report["environment"]
    models = [m for m in report["models"] if not m["weights"]["random"]]
    described = ", ".join(
        f"{m['id']} ({len(m['images'])} {'photos' if m['role'] == 'photos' else 'ground-truth test images'})"
        for m in models)
    source = (f"`{report['command']}` on {env['date']} (git {env['git'] or 'unknown'}): {described or 'no models'}; "
              "win rates against a centred Gaussian map; sanity check: "
              f"{report['settings']['sanity_rule']}")
    methods: dict[str, list[dict[str, Any]]] = {}
    for name, families in summarise(report, trained_only=True).items():
        methods[name] = [{
            "family": family,
            "models": s["models"],
            "deletion_win_rate": s["deletion_win_rate_vs_gaussian"],
            "insertion_win_rate": s["insertion_win_rate_vs_gaussian"],
            "sanity_check": None if s["sanity_passed"] is None else ("passed" if s["sanity_passed"] else "failed"),
            "sanity_spearman": s["sanity_spearman"],
            "pointing_game": s["pointing_game"],
            "mass_inside": s["mass_inside"],
        } for family, s in families.items()]
    return {"source": source, "methods": methods}


# --- Markdown -------------------------------------------------------------------------------------------------------


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f} %"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return lines


def _model_title(model: dict[str, Any]) -> str:
    weights = model["weights"]
    images = "photos" if model["role"] == "photos" else "ground-truth test split"
    accuracy = "" if model.get("accuracy") is None else f", accuracy on these images {_pct(model['accuracy'])}"
    return (f"{model['id']} ({model['architecture']}, {model['family']}, input "
            f"{'x'.join(map(str, model['input_size'][1:]))}, weights {'RANDOM' if weights['random'] else weights['source']}"
            f", {len(model['images'])} {images}{accuracy})")


def _ok(model: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, m) for name, m in model["methods"].items() if m.get("status") == "ok"]


def _problems(model: dict[str, Any]) -> list[str]:
    lines = []
    errors = {name: m["reason"] for name, m in model["methods"].items() if m.get("status") != "ok"}
    if errors:
        lines += ["", "Failed: " + "; ".join(f"{name}: {reason}" for name, reason in errors.items())]
    return lines


def _faithfulness_lines(model: dict[str, Any]) -> list[str]:
    rows = []
    for name, m in _ok(model):
        f = m.get("faithfulness")
        if not f:
            continue
        d, i = f["deletion"], f["insertion"]
        rows.append([name, str(f["images"]), "x".join(map(str, f["grid"])),
                     _f(d["mean"]), _signed(d["advantage_vs_random"]), _signed(d["advantage_vs_gaussian"]),
                     f"{_pct(d['win_rate_vs_random'])} / {_pct(d['win_rate_vs_gaussian'])}",
                     _f(i["mean"]), _signed(i["advantage_vs_random"]), _signed(i["advantage_vs_gaussian"]),
                     f"{_pct(i['win_rate_vs_random'])} / {_pct(i['win_rate_vs_gaussian'])}"])
    if not rows:
        return []
    grids = "; ".join(
        f"{grid}: random {_f(b['random']['deletion'])} / {_f(b['random']['insertion'])}, Gaussian "
        f"{_f(b['gaussian']['deletion'])} / {_f(b['gaussian']['insertion'])}"
        for grid, b in model["baselines"].items())
    return (["", f"**Faithfulness vs baselines** (deletion / insertion AUC of the baseline maps per grid: {grids}; "
             "advantage = how much better than the baseline on average, positive = better; wins = share of images "
             "where the method is better than the random / the Gaussian map):", ""]
            + _table(["method", "images", "grid", "deletion ↓", "adv. vs random", "adv. vs Gaussian",
                      "wins vs random / Gaussian", "insertion ↑", "adv. vs random", "adv. vs Gaussian",
                      "wins vs random / Gaussian"], rows))


def _sanity_lines(model: dict[str, Any]) -> list[str]:
    stages = model["sanity_stages"]
    lines: list[str] = []
    checked = [(name, m["sanity"]) for name, m in _ok(model) if (m.get("sanity") or {}).get("status") == "ok"]
    if stages and checked:
        header = ["method", "images"] + [s["label"] for s in stages] + ["passed"]
        rows = [["(model) top-1 unchanged", "-"] + [_pct(s["top1_agreement"]) for s in stages] + ["-"]]
        for name, s in checked:
            cells = [("-" if p["spearman"] is None else f"{p['spearman']:+.2f}") + f" / {p['ssim']:.2f}"
                     for p in s["curve"]]
            verdict = {True: "**pass**", False: "FAIL", None: "- (constant maps)"}[s["passed"]]
            rows.append([name + (" (abs)" if s["absolute"] else ""), str(s["images"])] + cells + [verdict])
        lines += ["", "**Sanity check** (cascading re-initialisation, top down; each cell: Spearman rank correlation / "
                  "SSIM with the trained model's map, mean over the images; (abs): a signed map compared in absolute "
                  "value):", ""] + _table(header, rows)
    others = [(name, m["sanity"]) for name, m in _ok(model) if (m.get("sanity") or {}).get("status") in
              ("skipped", "error")]
    by_reason: dict[str, list[str]] = {}
    for name, s in others:
        by_reason.setdefault(f"{s['status']}: {s['reason']}", []).append(name)
    for reason, names in by_reason.items():
        lines += ["", f"Not sanity-checked here: {', '.join(names)} ({reason})."]
    return lines


def _groundtruth_lines(model: dict[str, Any]) -> list[str]:
    gt = model.get("groundtruth")
    if not gt:
        return []
    scored = [(name, m["groundtruth"]) for name, m in _ok(model) if m.get("groundtruth")]
    scored.sort(key=lambda item: (-(item[1]["pointing_game"] or 0), -(item[1]["mass_inside"] or 0)))
    rows = []
    for rank, (name, g) in enumerate(scored, 1):
        rows.append([str(rank), name, _pct(g["pointing_game"]), _f(g["mass_inside"]),
                     f"{_f(g['best_iou'])} (t {_f(g['best_iou_threshold'], 2)})", _f(g.get("deletion")),
                     _f(g.get("insertion")), str(g["images"])])
    for label, b in (("centred Gaussian", gt["baselines"]["gaussian"]), ("random", gt["baselines"]["random"])):
        rows.append(["", f"*baseline: {label}*", _pct(b["pointing_game"]), _f(b["mass_inside"]),
                     f"{_f(b['best_iou'])} (t {_f(b['best_iou_threshold'], 2)})", "-", "-", "-"])
    return (["", f"**Ground truth** (ranked by pointing game, then mass inside; maps upsampled bilinearly to the "
             f"input; pointing-game tolerance {gt['pointing_tolerance_px']} px; the object covers "
             f"{_pct(gt['mask_share'])} of the image on average):", ""]
            + _table(["rank", "method", "pointing game", "mass inside", "best IoU (at threshold)", "deletion ↓",
                      "insertion ↑", "images"], rows))


def _verdict_lines(summary: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    if not summary:
        return []
    families = sorted({family for entry in summary.values() for family in entry})
    rows = []
    for name, entry in summary.items():
        cells = [name]
        for family in families:
            s = entry.get(family)
            if s is None:
                cells.append("n/a")
                continue
            sanity = {True: "pass", False: "FAIL", None: "-"}[s["sanity_passed"]]
            cells.append(f"**{s['verdict']}** (del/ins wins vs Gaussian {_pct(s['deletion_win_rate_vs_gaussian'])}"
                         f"/{_pct(s['insertion_win_rate_vs_gaussian'])}, sanity {sanity}, pointing "
                         f"{_pct(s['pointing_game'])}, mass {_f(s['mass_inside'], 2)})")
        rows.append(cells)
    return (["", "### Which methods are trustworthy on which family", "", "Rules:", ""]
            + [f"- {rule}" for rule in VERDICT_RULES] + [""] + _table(["method"] + families, rows))


def render_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    settings = report["settings"]
    lines = [
        f"### saliency-server evaluate{' (smoke run: numbers meaningless)' if report['smoke'] else ''}",
        "",
        f"- Date: {env['date']}; machine: {machine_summary(env)}; device: `{env['device']}`; torch threads: "
        f"{settings['threads']}",
        f"- Versions: Python {env['python']}, {versions}; git {env['git'] or 'unknown'}",
        f"- Command: `{report['command']}` (took {report.get('duration_s', 0):.0f} s)",
        f"- Photos (models with real weights, explaining their top-1 class): {', '.join(settings['photos']) or '-'}; "
        "ground-truth models: the first "
        f"{settings['groundtruth_images']} samples of the test split, explaining the true class.",
        f"- Every map from the server's pipeline with the method's default params; methods costing more than "
        f"{settings['expensive_relative_cost']:g} forward passes (registry) run on a quarter of the images.",
        f"- Faithfulness: the server's deletion and insertion ({settings['deletion_steps']} steps, blurred "
        "substitute, AUC of the class probability) of each map and of two baseline maps on the same grid: random "
        f"(seeded, seed {settings['seed']}) and a centred Gaussian (sigma = a quarter of the grid's side).",
        f"- Sanity check: {settings['sanity_rule']}.",
    ]
    lines += [f"- {note}" for note in report["notes"]]
    for skipped in report["skipped_models"]:
        lines.append(f"- Not evaluated: {skipped['id']}: {skipped['reason']}")
    for model in report["models"]:
        lines += ["", f"#### {_model_title(model)}"]
        timing = ", ".join(f"{k} {v:.0f} s" for k, v in model["timing_s"].items())
        lines += ["", f"Time: {timing}."]
        if model["not_applicable"]:
            lines += ["", "Not applicable: " + ", ".join(model["not_applicable"]) + "."]
        lines += _problems(model)
        lines += _faithfulness_lines(model)
        lines += _sanity_lines(model)
        lines += _groundtruth_lines(model)
    lines += _verdict_lines(report.get("summary") or {})
    return "\n".join(lines) + "\n"
