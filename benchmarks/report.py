"""The benchmark's targets, and its report as markdown."""

from __future__ import annotations

from typing import Any

from benchmarks.environment import machine_summary
from benchmarks.references import MAX_ABS_DIFF_TARGET, REFERENCE_SPEEDUP

HTTP_VS_BASELINE = 0.90
BATCHING_GAIN = {"cpu": 1.2, "cuda": 5.0}
ATTENTION_COST = 1.15  # raw_attention, rollout
GRADIENT_COST = 3.0  # gradcam, grad_rollout, gae
# The peer comparison (issue 18): a lone client no slower than a plain per-request handler, and more throughput than
# a tuned LitServe under load.
PEER_LATENCY_ONE_CLIENT = 1.05  # our p50 / the plain handler's p50, at 1 client
PEER_THROUGHPUT_LOADED = 1.10  # our req/s / tuned LitServe's, at 32 clients (or the most measured)
COST_TARGETS = {"raw_attention": ATTENTION_COST, "rollout": ATTENTION_COST, "gradcam": GRADIENT_COST,
                "grad_rollout": GRADIENT_COST, "gae": GRADIENT_COST}


def _target(name: str, value: float | None, threshold: float, higher_is_better: bool, note: str = "") -> dict[str, Any]:
    met = None if value is None else (value >= threshold if higher_is_better else value <= threshold)
    return {"target": name, "value": value, "threshold": threshold, "comparison": ">=" if higher_is_better else "<=",
            "met": met, "note": note}


def _predict_point(result: dict[str, Any], mode: str, concurrency: int) -> dict[str, Any] | None:
    for point in result["predict"]:
        if point["mode"] == mode and point["concurrency"] == concurrency and point["requests_ok"] > 0:
            return point
    return None


def median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def peer_summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The peer comparison's /predict rows, one per system and client count, averaged over the rounds: mean req/s
    and mean p50/p95 with each round's values kept, plus the ratios of the server's figures to this system's."""
    points = (result.get("peers") or {}).get("predict") or []
    keys: list[tuple[str, int]] = []
    for p in points:
        if (p["system"], p["concurrency"]) not in keys:
            keys.append((p["system"], p["concurrency"]))

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    rows = []
    for system, clients in keys:
        ok = [p for p in points if p["system"] == system and p["concurrency"] == clients and p["requests_ok"] > 0]
        every = [p for p in points if p["system"] == system and p["concurrency"] == clients]
        rows.append({
            "system": system, "concurrency": clients, "rounds": len(every),
            "throughput_rps": mean([p["throughput_rps"] for p in ok]),
            "throughput_each": [p["throughput_rps"] for p in every],
            "p50_ms": mean([p["latency_ms"]["p50"] for p in ok]),
            "p50_each": [p["latency_ms"]["p50"] for p in ok],
            "p95_ms": mean([p["latency_ms"]["p95"] for p in ok]),
            "server_cores": mean([p["cpu"]["server_cores"] for p in ok if p["cpu"].get("server_cores") is not None]),
            "server_cpu_ms": mean([p["cpu_ms_per_request"]["server"] for p in ok
                                   if p["cpu_ms_per_request"].get("server") is not None]),
            "other_cores": mean([p["cpu"]["other_cores"] for p in every if p["cpu"].get("other_cores") is not None]),
            "steal_cores": mean([p["cpu"]["steal_cores"] for p in every if p["cpu"].get("steal_cores") is not None]),
            "errors": sum(sum(p["errors"].values()) for p in every),
            "first_error": next((p["first_error"] for p in every if p["first_error"]), None),
        })
    ours = {r["concurrency"]: r for r in rows if r["system"] == rows[0]["system"]} if rows else {}
    by_round = {(p["system"], p["concurrency"], p.get("round")): p for p in points if p["requests_ok"] > 0}
    for row in rows:
        # The same ratios round by round (each round measures every system within minutes), and their median: a
        # drift of the machine's speed between rounds cancels out of each ratio
        mine_rounds = [(p, by_round.get((row["system"], row["concurrency"], p.get("round"))))
                       for p in points if p["system"] == rows[0]["system"] and p["concurrency"] == row["concurrency"]
                       and p["requests_ok"] > 0]
        pairs = [(a, b) for a, b in mine_rounds if b is not None]
        row["paired_throughput_ratios"] = [a["throughput_rps"] / b["throughput_rps"] for a, b in pairs
                                           if b["throughput_rps"]]
        row["paired_p50_ratios"] = [a["latency_ms"]["p50"] / b["latency_ms"]["p50"] for a, b in pairs
                                    if b["latency_ms"]["p50"]]
        row["paired_throughput_ratio"] = median(row["paired_throughput_ratios"])
        row["paired_p50_ratio"] = median(row["paired_p50_ratios"])
        mine = ours.get(row["concurrency"])
        row["ours_throughput_ratio"] = (mine["throughput_rps"] / row["throughput_rps"]
                                        if mine and mine["throughput_rps"] and row["throughput_rps"] else None)
        row["ours_p50_ratio"] = (mine["p50_ms"] / row["p50_ms"] if mine and mine["p50_ms"] and row["p50_ms"]
                                 else None)
        # CPU per request is steadier than req/s on a machine whose speed drifts: theirs / ours, above 1 favours us
        row["theirs_cpu_ratio"] = (row["server_cpu_ms"] / mine["server_cpu_ms"]
                                   if mine and mine["server_cpu_ms"] and row["server_cpu_ms"] else None)
    return rows


def _ratios(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def _peer_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    from benchmarks.peers.measure import LITSERVE, PLAIN

    rows = peer_summary(result)
    if not rows:
        return []
    targets = []
    levels = sorted({r["concurrency"] for r in rows})
    plain = next((r for r in rows if r["system"] == PLAIN and r["concurrency"] == 1), None)
    if plain is not None and plain["paired_p50_ratio"] is not None:
        targets.append(_target(
            "p50 at 1 client / the plain FastAPI handler's", plain["paired_p50_ratio"], PEER_LATENCY_ONE_CLIENT, False,
            f"median of the rounds' ratios ({_ratios(plain['paired_p50_ratios'])}); means over the rounds "
            f"{plain['p50_ms'] * plain['ours_p50_ratio']:.1f} vs {plain['p50_ms']:.1f} ms",
        ))
    clients = 32 if 32 in levels else levels[-1]
    lit = next((r for r in rows if r["system"] == LITSERVE and r["concurrency"] == clients), None)
    if lit is not None and lit["paired_throughput_ratio"] is not None:
        targets.append(_target(
            f"throughput at {clients} clients / tuned LitServe's", lit["paired_throughput_ratio"],
            PEER_THROUGHPUT_LOADED, True,
            f"median of the rounds' ratios ({_ratios(lit['paired_throughput_ratios'])}); means over the rounds "
            f"{lit['throughput_rps'] * lit['ours_throughput_ratio']:.1f} vs {lit['throughput_rps']:.1f} req/s; "
            f"CPU per request theirs/ours {_f(lit['theirs_cpu_ratio'], 2)}",
        ))
    return targets


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for one model, from the measurements present (missing ones are left out)."""
    targets = _peer_targets(result)
    levels = sorted({p["concurrency"] for p in result["predict"]})
    if levels:
        clients = 32 if 32 in levels else levels[-1]
        on, off = _predict_point(result, "batching_on", clients), _predict_point(result, "batching_off", clients)
        baseline = result["baseline"].get("images_per_s")
        if on is not None and baseline:
            targets.append(_target(
                f"/predict throughput at {clients} clients / in-process baseline", on["throughput_rps"] / baseline,
                HTTP_VS_BASELINE, True,
                f"{on['throughput_rps']:.1f} req/s vs {baseline:.1f} img/s at batch {result['max_batch_size']}",
            ))
        if on is not None and off is not None and off["throughput_rps"] > 0:
            device = "cuda" if result["device"].startswith("cuda") else "cpu"
            targets.append(_target(
                f"batching on / off at {clients} clients ({device})", on["throughput_rps"] / off["throughput_rps"],
                BATCHING_GAIN[device], True,
                f"{on['throughput_rps']:.1f} vs {off['throughput_rps']:.1f} req/s",
            ))
    for row in result["explain_cost"]:
        threshold = COST_TARGETS.get(row["method"])
        if threshold is None or row["status"] != "ok":
            continue
        for batch in row["batches"]:
            targets.append(_target(
                f"{row['method']} cost at batch {batch['batch_size']} (x forward)", batch["cost_x_forward"],
                threshold, False,
            ))
    names = [c["comparison"] for c in result["references"]]
    for comparison in result["references"]:
        if comparison["status"] != "ok":
            continue
        label = comparison["comparison"]
        if names.count(label) > 1:  # e.g. lrp on the served CNN and on the reference CNN
            label = f"{label} on {comparison['architecture']}"
        # Comparisons without a speed-up target (the relevance methods: the reference's own computation, batched)
        # say so with speedup_target None; their difference is relative to the reference map's peak.
        tolerance = comparison.get("tolerance", MAX_ABS_DIFF_TARGET)
        speedup_target = comparison.get("speedup_target", REFERENCE_SPEEDUP)
        close = comparison["max_abs_diff"] < tolerance
        if speedup_target is not None:
            targets.append(_target(
                f"{label} vs {comparison['reference']}: speed-up", comparison["speedup"],
                speedup_target, True,
                f"max abs difference {comparison['max_abs_diff']:.1e} ({'<' if close else '>='} {tolerance:g})",
            ))
        if comparison.get("within_tolerance") is not None:  # a tolerance per image: the worst image's share of it
            targets.append(_target(
                f"{label} vs {comparison['reference']}: max abs difference / tolerance, worst image",
                comparison["within_tolerance"], 1.0, False,
                f"max abs difference {comparison['max_abs_diff']:.1e} ({comparison['difference']}); tolerance "
                f"{tolerance:g}, or the reference's own float32 error where larger (up to "
                f"{comparison['reference_float32_error']:.1e})",
            ))
            continue
        targets.append(_target(
            f"{label} vs {comparison['reference']}: max abs difference",
            comparison["max_abs_diff"], tolerance, False,
            "" if comparison.get("difference") is None else f"difference {comparison['difference']}",
        ))
    return targets


def analyse_cpu(result: dict[str, Any]) -> dict[str, Any]:
    """Where the CPU of one /predict request goes, at the largest client count with batching on, and the best
    HTTP/baseline ratio that this split allows when every core is busy (no other programs running).

    model: the forward pass's CPU per image in the in-process baseline (its intra-op threads' spinning included);
    decode and preprocess: the photo's, timed alone on one thread; client: the load generator's CPU per request.
    """
    levels = sorted({p["concurrency"] for p in result["predict"]})
    baseline = result["baseline"]
    samples = [baseline[k]["cpu_ms_per_image"] for k in ("before", "after")
               if k in baseline and baseline[k].get("cpu_ms_per_image") is not None]
    point = _predict_point(result, "batching_on", 32 if 32 in levels else levels[-1]) if levels else None
    if point is None or not samples or point["cpu_ms_per_request"]["server"] is None:
        return {}
    model = min(samples)  # the least-disturbed measurement
    server = point["cpu_ms_per_request"]["server"]
    client = point["cpu_ms_per_request"]["client"] or 0.0
    pipeline = baseline.get("input_pipeline", {})
    decode, preprocess = pipeline.get("decode_ms"), pipeline.get("preprocess_ms")
    cpu = point["cpu"]
    used = [cpu.get(f"{role}_cores") for role in ("server", "client", "other")]
    return {
        "clients": point["concurrency"],
        "model_cpu_ms_per_image": model,
        "server_cpu_ms_per_request": server,
        "client_cpu_ms_per_request": client,
        "decode_ms": decode,
        "preprocess_ms": preprocess,
        "ceiling_ratio": model / (server + client),
        "ceiling_ratio_without_client": model / server,
        "cores_used": None if None in used else sum(used),  # type: ignore[arg-type]
        "cores_available": cpu.get("cores_available"),
    }


def _analysis_lines(result: dict[str, Any]) -> list[str]:
    a = result.get("analysis") or {}
    if not a:
        return []
    pipeline = "" if a["decode_ms"] is None else (
        f"; decoding this photo and preprocessing it cost {_f(a['decode_ms'])} + {_f(a['preprocess_ms'])} ms on one "
        "thread")
    used = "" if a.get("cores_used") is None else (
        f" Here {_f(a['cores_used'], 2)} of {a['cores_available']} cores were busy (server, load generator and "
        "other programs).")
    return ["", f"CPU per request at {a['clients']} clients with batching on: the server "
            f"{_f(a['server_cpu_ms_per_request'])} ms, the load generator {_f(a['client_cpu_ms_per_request'])} ms "
            f"(the baseline spends {_f(a['model_cpu_ms_per_image'])} ms of CPU per image on the forward pass alone"
            f"{pipeline}). With every core busy, the HTTP throughput can reach at most "
            f"{_f(a['ceiling_ratio'], 2)}x the in-process baseline "
            f"({_f(a['ceiling_ratio_without_client'], 2)}x with the load generator on another machine).{used}"]


# --- Markdown -------------------------------------------------------------------------------------------------------


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.0f} %"


def _other(cpu: dict[str, Any]) -> str:
    """Other programs' cores, and the hypervisor's (steal) when there was any."""
    stolen = cpu.get("steal_cores")
    return _cores(cpu, "other") + (f" (+{stolen:.2f} stolen)" if stolen and stolen >= 0.005 else "")


def _cores(cpu: dict[str, Any], role: str) -> str:
    value = cpu.get(f"{role}_cores")
    return "-" if value is None else f"{value:.2f}"


def _baseline_lines(result: dict[str, Any]) -> list[str]:
    baseline = result["baseline"]
    if not baseline:
        return []
    rows = []
    for when in ("before", "after"):
        if when in baseline:
            b = baseline[when]
            rows.append([when + (" the HTTP runs" if "after" in baseline else ""), str(b["batch_size"]),
                         _f(b["batch_ms"]), _f(b["images_per_s"]), _percent(b["spread"]),
                         _other(b["cpu"])])
    lines = (["", f"**In-process baseline** (forward pass at the batch cap, no HTTP, no queue): "
              f"**{_f(baseline.get('images_per_s'))} img/s**", ""]
             + _table(["when", "batch", "ms / batch", "img/s", "spread", "other programs (cores)"], rows))
    lanes = baseline.get("lanes")
    if lanes:
        lines += ["", f"For comparison, not a target: in process with the server's {lanes['lanes']} CPU lanes (passes "
                      f"at batch {lanes['batch_size']} on each at once, torch's threads split between them, no "
                      f"HTTP): {_f(lanes['images_per_s'])} img/s (other programs: {_other(lanes['cpu'])} cores)."]
    return lines


def _load_rows(points: list[dict[str, Any]], label: str) -> list[list[str]]:
    rows = []
    for p in points:
        latency = p["latency_ms"]
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(p["errors"].items())) or "0"
        rows.append([
            p[label], str(p["concurrency"]), _f(p["throughput_rps"]), _f(latency["p50"]), _f(latency["p95"]),
            _f(latency["p99"]), _f(p["mean_batch_size"]), _cores(p["cpu"], "server"), _cores(p["cpu"], "client"),
            _percent(p["cpu"].get("client_share")),
            _other(p["cpu"]),
            str(p["requests_ok"]), errors,
        ])
    return rows


LOAD_HEADER = ["mode", "clients", "req/s", "p50 ms", "p95 ms", "p99 ms", "mean batch", "server cores",
               "client cores", "client share", "other programs (cores)", "requests", "errors"]


def _cost_lines(result: dict[str, Any]) -> list[str]:
    rows_in = result["explain_cost"]
    if not rows_in:
        return []
    sizes = sorted({b["batch_size"] for row in rows_in for b in row["batches"]})
    header = ["method"]
    for size in sizes:
        header += [f"ms/img @{size}", f"x forward @{size}"]
    header += ["registry cost", "note"]
    rows = []
    for row in rows_in:
        by_size = {b["batch_size"]: b for b in row["batches"]}
        cells = [row["method"]]
        for size in sizes:
            b = by_size.get(size)
            cells += [_f(b["explain_ms_per_image"]) if b else "-", _f(b["cost_x_forward"], 2) if b else "-"]
        note = row["note"] or ""
        if row["status"] != "ok":
            note = f"{row['status']}: {note}"
        cells += [_f(row["registry_relative_cost"], 2), note.replace("|", "/")]
        rows.append(cells)
    forward: dict[int, float] = {}
    for row in rows_in:
        for b in row["batches"]:
            per_image = b["forward_ms"] / b["batch_size"]
            forward[b["batch_size"]] = min(forward.get(b["batch_size"], per_image), per_image)
    forward_text = ", ".join(f"{_f(forward[s])} ms/img at batch {s}" for s in sorted(forward))
    return ["", f"**Explanation cost in process** (`run_explain_batch` on the photo, default params, top-1 target; "
            f"each method timed alternately with the /predict forward pass at the same batch, best of n runs of each "
            f"(at least 3, one for the expensive methods); the forward pass: {forward_text}):", ""] + _table(header, rows)


def _reference_lines(result: dict[str, Any]) -> list[str]:
    if not result["references"]:
        return []
    rows = []
    for c in result["references"]:
        if c["status"] == "ok":
            rows.append([c["comparison"], c["reference"], c["architecture"], str(c["batch_size"]),
                         _f(c["ours_ms_per_image"]), _f(c["reference_ms_per_image"]), _f(c["speedup"], 2) + "x",
                         f"{c['max_abs_diff']:.1e}", (c["note"] or "").replace("|", "/")])
        else:
            rows.append([c["comparison"], c["reference"], c.get("architecture") or "-", "-", "-", "-", "-", "-",
                         f"{c['status']}: {c['note']}".replace("|", "/")])
    return ["", "**Against reference implementations** (same process, same inputs, timed alternately, best of n "
            "runs each; speed-up = their time / ours; difference of min-max-normalised maps, or as the note says):",
            ""] + _table(
        ["method", "reference", "model", "batch", "ours ms/img", "theirs ms/img", "speed-up", "max abs diff", "note"],
        rows)


def _peer_lines(result: dict[str, Any]) -> list[str]:
    rows = peer_summary(result)
    peers = result.get("peers") or {}
    lines = [] if not rows else _peer_predict_lines(peers, rows)
    explain = peers.get("explain") or []
    if explain:
        erows = []
        for e in explain:
            ours, theirs = e["ours"], e["theirs"]
            ratio = (ours["throughput_rps"] / theirs["throughput_rps"]
                     if ours["throughput_rps"] and theirs["throughput_rps"] else None)
            erows.append([e["request"], e["reference"], str(e["concurrency"]), _f(ours["window_s"], 0),
                          _f(ours["throughput_rps"], 2), _f(ours["latency_ms"]["p50"]),
                          _f(ours["cpu_ms_per_request"]["server"], 0), _f(theirs["throughput_rps"], 2),
                          _f(theirs["latency_ms"]["p50"]), _f(theirs["cpu_ms_per_request"]["server"], 0),
                          _f(ratio, 2),
                          str(sum(ours["errors"].values()) + sum(theirs["errors"].values()))])
        lines += ["", "**/explain against a per-request reference handler** (plain FastAPI `def` route; ours answers "
                  "`raw` maps in the input space, the handler the same float32 maps; speed-up = our req/s / theirs; "
                  "CPU ms per request counts only the answers completed in the window):", ""]
        lines += _table(["methods", "reference handler", "clients", "window s", "ours req/s", "ours p50 ms",
                         "ours CPU ms/req", "theirs req/s", "theirs p50 ms", "theirs CPU ms/req", "speed-up",
                         "errors"], erows)
    return lines


def _peer_predict_lines(peers: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    lit = peers.get("settings", {}).get("litserve", {})
    table = []
    for r in rows:
        each = " / ".join(_f(v) for v in r["throughput_each"])
        errors = str(r["errors"]) + (f" ({r['first_error'][:80]})" if r["first_error"] else "")
        table.append([r["system"], str(r["concurrency"]), f"{_f(r['throughput_rps'])} ({each})", _f(r["p50_ms"]),
                      _f(r["p95_ms"]), _f(r["paired_throughput_ratio"], 2), _f(r["paired_p50_ratio"], 2),
                      _f(r["server_cpu_ms"]), _f(r["theirs_cpu_ratio"], 2), _f(r["server_cores"], 2),
                      _other({"other_cores": r["other_cores"], "steal_cores": r["steal_cores"]}),
                      errors.replace("|", "/")])
    settings = peers.get("settings", {})
    lines = ["", f"**Against the serving frameworks** (/predict, the same JSON request: {settings.get('request', '')}; "
             f"the same model with random weights in each, the same load generator, {settings.get('rounds')} "
             f"round(s) alternating the systems, each peer running only during its own points; LitServe: "
             f"{lit.get('workers')} worker(s), max_batch_size {lit.get('max_batch_size')}, batch_timeout "
             f"{lit.get('batch_timeout_ms')} ms, {lit.get('threads') or 'default'} torch thread(s) each. Ratios are "
             f"ours / theirs at the same client count, the median of the rounds' ratios: throughput above 1 and p50 "
             f"below 1 favour us; theirs/ours CPU is their server CPU per request over ours (above 1: we spend "
             f"less; steadier than req/s where the machine's speed drifts). Server CPU includes a peer's worker "
             f"processes):", ""]
    lines += _table(["system", "clients", "req/s mean (each round)", "p50 ms", "p95 ms", "ours/theirs req/s",
                     "ours/theirs p50", "server CPU ms/req", "theirs/ours CPU", "server cores", "other programs",
                     "errors"], table)
    return lines


def _target_lines(result: dict[str, Any]) -> list[str]:
    if not result["targets"]:
        return []
    rows = []
    for t in result["targets"]:
        value = t["value"]
        shown = f"{value:.1e}" if value is not None and t["threshold"] < 0.01 else _f(value, 2)
        threshold = f"{t['threshold']:g}"
        met = {True: "met", False: "**missed**", None: "-"}[t["met"]]
        rows.append([t["target"], shown, f"{t['comparison']} {threshold}", met, t["note"]])
    return ["", "**Targets**:", ""] + _table(["target", "measured", "wanted", "", "detail"], rows)


def render_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [
        f"### saliency-server benchmark{' (smoke run: timings meaningless)' if report['smoke'] else ''}",
        "",
        f"- Date: {env['date']}; machine: {machine_summary(env)}; device: `{env['device']}`; "
        f"torch threads: {env['torch_threads']}",
        f"- Versions: Python {env['python']}, {versions}; git {env['git'] or 'unknown'}",
        f"- Command: `{report['command']}` (took {report.get('duration_s', 0):.0f} s)",
        f"- Image: {report['image']['source']} ({report['image']['width']}x{report['image']['height']}, "
        f"{report['image']['bytes']} bytes, {report['image']['content_type']}), sent as a multipart upload",
        f"- Load points: {report['settings']['warmup_s']:g} s warm-up, then {report['settings']['duration_s']:g} s"
        + (f" or {report['settings']['requests']} requests" if report['settings']['requests'] else "")
        + "; closed-loop clients in a separate process (a minimal HTTP/1.1 client on asyncio, keep-alive). "
        "CPU columns are cores in use (CPU seconds per second): the server, the load generator, and other "
        "programs on the machine.",
    ]
    if report.get("server"):
        lines.append(f"- Server start-up (load and warm-up of every model): {report['server']['startup_s']:.1f} s")
    for note in report["notes"]:
        lines.append(f"- {note}")
    for result in report["models"]:
        weights = result["weights"]
        lines += [
            "",
            f"#### {result['id']} ({result['architecture']}, {result['family']}, {result['device']}, "
            f"{result['dtype']}, input {'x'.join(map(str, result['input_size'][1:]))}, weights "
            f"{'RANDOM' if weights['random'] else weights['source']}, max_batch_size {result['max_batch_size']}, "
            f"max_wait_ms {result['max_wait_ms']:g}, lanes {result.get('lanes', 1)})",
        ]
        lines += _baseline_lines(result)
        if result["predict"]:
            lines += ["", "**/predict over HTTP** (batching off: the same model served with max_batch_size = 1):", ""]
            lines += _table(LOAD_HEADER, _load_rows(result["predict"], "mode"))
            lines += _analysis_lines(result)
        lines += _peer_lines(result)
        if result["explain_http"]:
            lines += ["", f"**/explain over HTTP** ({result['explain_http'][0]['method']}, "
                      f"{result['explain_http'][0]['output']}):", ""]
            lines += _table(["method"] + LOAD_HEADER[1:], _load_rows(result["explain_http"], "method"))
        lines += _cost_lines(result)
        lines += _reference_lines(result)
        lines += _target_lines(result)
    return "\n".join(lines) + "\n"
