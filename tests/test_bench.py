"""`saliency-server bench`: the smoke run's report structure (not its timings), and the benchmark's helpers."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.cpu import CpuSnapshot, cpu_usage
from benchmarks.images import load_bench_image, multipart_body
from benchmarks.loadgen import Connection, encode_request, percentile
from benchmarks.options import BenchOptions
from benchmarks.references import (
    max_abs_difference,
    minmax,
    pytorch_grad_cam_scale,
    reduce_channels,
    relative_difference,
)
from benchmarks.peers.measure import LITSERVE, OURS, PLAIN
from benchmarks.report import evaluate_targets, peer_summary, render_markdown
from benchmarks.runner import server_configuration, without_batching
from service.cli import build_parser, main
from service.runtime.devices import default_cpu_lanes
from service.explain.registry import all_methods

SECTIONS = ("baseline", "predict", "peers", "explain_http", "explain_cost", "references", "targets")
COMPARISONS = {"gradcam (vit)", "gradcam (cnn)", "rollout", "saliency", "integrated_gradients", "lrp", "attn_lrp",
               "transformer_attribution"}
# The relevance methods' comparisons (issue 16): signed maps, their difference relative to each reference map's peak,
# within the tolerance of the method's own test against the same reference; no speed-up target.
RELEVANCE = {"lrp": ("zennit", "test_resnet", 1e-6), "attn_lrp": ("lxt", "vit_tiny_patch16_224", 1e-5),
             "transformer_attribution": ("Chefer", "vit_tiny_patch16_224", 2e-5)}


def numbers(value: Any, path: str = "") -> list[tuple[str, float]]:
    """Every int and float in a JSON document, with where it is."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [(path, float(value))]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in numbers(v, f"{path}.{k}")]
    return [n for i, v in enumerate(value) for n in numbers(v, f"{path}[{i}]")]


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, str]:
    out = tmp_path_factory.mktemp("bench")
    json_path, md_path = out / "report.json", out / "report.md"
    assert main(["bench", "--smoke", "--output-json", str(json_path), "--output-md", str(md_path)]) == 0
    return json.loads(json_path.read_text()), md_path.read_text(), str(out)


def test_smoke_report_has_every_section(smoke_report) -> None:
    report, _, _ = smoke_report
    assert report["smoke"] is True and report["schema_version"] == 1
    assert report["command"].startswith("saliency-server bench") and report["command"].endswith("--smoke")
    env = report["environment"]
    assert env["versions"]["torch"] and env["versions"]["timm"] and env["device"] == "cpu" and env["cpu_cores"] >= 1
    assert report["image"]["width"] > 0 and report["image"]["bytes"] > 0
    assert report["server"]["startup_s"] > 0
    assert report["settings"]["server_config"]["models"][1]["max_batch_size"] == 1  # the batching-off copy
    (model,) = report["models"]
    assert model["weights"]["random"] is True
    for section in SECTIONS:
        assert model[section], f"section {section} is empty"
    assert model["lanes"] == (default_cpu_lanes() if env["device"] == "cpu" else 1)
    if model["lanes"] > 1:  # the server's lane configuration, measured in process beside the baseline
        lanes = model["baseline"]["lanes"]
        assert lanes["lanes"] == model["lanes"] and lanes["batch_size"] == 8 // model["lanes"]
        assert lanes["images_per_s"] > 0


def test_smoke_report_numbers_are_finite(smoke_report) -> None:
    report, _, _ = smoke_report
    found = numbers(report)
    assert found
    bad = [(where, v) for where, v in found if not math.isfinite(v)]
    assert not bad


def test_smoke_predict_points_cover_batching_on_and_off(smoke_report) -> None:
    report, _, _ = smoke_report
    (model,) = report["models"]
    points = {(p["mode"], p["concurrency"]): p for p in model["predict"]}
    assert set(points) == {(mode, c) for mode in ("batching_on", "batching_off") for c in (1, 8, 32)}
    for point in points.values():
        assert point["requests_ok"] > 0 and not point["errors"], point
        assert point["throughput_rps"] > 0
        latency = point["latency_ms"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
        assert point["cpu"]["wall_s"] > 0
    assert all(p["mean_batch_size"] == 1.0 for (mode, _), p in points.items() if mode == "batching_off")
    assert model["baseline"]["images_per_s"] > 0
    (explain,) = model["explain_http"]
    assert explain["method"] == "raw_attention" and explain["requests_ok"] > 0 and not explain["errors"]


def test_smoke_lists_every_registered_method(smoke_report) -> None:
    report, markdown, _ = smoke_report
    (model,) = report["models"]
    rows = {row["method"]: row for row in model["explain_cost"]}
    assert set(rows) == set(all_methods())
    for name, row in rows.items():
        assert row["status"] in ("ok", "not_applicable"), (name, row["note"])
        assert f"| {name} |" in markdown
        if row["status"] == "ok":
            sizes = [b["batch_size"] for b in row["batches"]]
            assert sizes == ([1] if row["registry_relative_cost"] > 50 else [1, 8])
            assert all(b["cost_x_forward"] > 0 and b["forward_ms"] > 0 for b in row["batches"])
    assert rows["rollout"]["status"] == "ok" and rows["raw_attention"]["status"] == "ok"


def test_smoke_compares_with_the_references(smoke_report) -> None:
    report, _, _ = smoke_report
    (model,) = report["models"]
    comparisons = {c["comparison"]: c for c in model["references"]}
    assert len(comparisons) == len(model["references"])  # one row each
    assert {"gradcam (vit)", "gradcam (cnn)", "rollout", *RELEVANCE} <= set(comparisons) <= COMPARISONS
    for name, comparison in comparisons.items():
        if name in all_methods() or name in ("gradcam (vit)", "gradcam (cnn)", "rollout"):
            assert comparison["status"] == "ok", comparison
            assert comparison["speedup"] > 0 and comparison["max_abs_diff"] < 1e-3
            if comparison.get("within_tolerance") is None:
                assert comparison["max_abs_diff"] <= comparison["tolerance"], comparison  # equal outputs
        else:
            assert comparison["status"] == "skipped"


def test_smoke_compares_the_relevance_methods_with_their_references(smoke_report) -> None:
    """lrp against zennit (on the reference CNN), attn_lrp against lxt's explicit rules and transformer_attribution
    against the per-image port of the authors' relprop (on the smoke ViT): timed, and their maps equal."""
    report, markdown, _ = smoke_report
    (model,) = report["models"]
    comparisons = {c["comparison"]: c for c in model["references"]}
    for name, (library, architecture, tolerance) in RELEVANCE.items():
        comparison = comparisons[name]
        assert comparison["status"] == "ok", comparison
        assert library in comparison["reference"] and comparison["architecture"] == architecture
        assert comparison["batch_size"] == 2 and comparison["repeats"] >= 2
        assert comparison["ours_ms_per_image"] > 0 and comparison["reference_ms_per_image"] > 0
        assert comparison["difference"].startswith("relative") and comparison["speedup_target"] is None
        assert comparison["tolerance"] == tolerance
        if name == "transformer_attribution":  # per image: the test's tolerance, or the reference's float32 error
            assert comparison["within_tolerance"] <= 1.0, comparison
        else:
            assert comparison["max_abs_diff"] <= tolerance, comparison
        if name == "attn_lrp":  # checked in float64; the timed float32 maps' difference beside it
            assert "float64" in comparison["difference"] and comparison["max_abs_diff_timed"] < 1e-3
        assert f"| {name} | {comparison['reference']} |" in markdown
    targets = {t["target"]: t for t in model["targets"]}
    for name in RELEVANCE:
        reference = comparisons[name]["reference"]
        difference = "max abs difference / tolerance, worst image" if name == "transformer_attribution" else (
            "max abs difference")
        assert targets[f"{name} vs {reference}: {difference}"]["met"] is True
        assert f"{name} vs {reference}: speed-up" not in targets  # informational: no speed-up target


def test_smoke_compares_with_the_serving_frameworks(smoke_report) -> None:
    """The server, a tuned LitServe and a plain FastAPI handler each answer every client count of the run without
    errors; LitServe is tuned like the server; /explain is compared with the per-request reference handler for
    integrated gradients and for the four-method request."""
    report, markdown, _ = smoke_report
    (model,) = report["models"]
    peers = model["peers"]
    points = {(p["system"], p["concurrency"]) for p in peers["predict"]}
    assert points == {(s, c) for s in (OURS, LITSERVE, PLAIN) for c in (1, 8, 32)}
    for point in peers["predict"]:
        assert point["requests_ok"] > 0 and not point["errors"], point
        assert point["path"] == (f"/v1/models/{model['id']}/predict" if point["system"] == OURS else "/predict")
    assert peers["settings"]["litserve"] == {"workers": model["lanes"], "max_batch_size": 8 // model["lanes"],
                                             "batch_timeout_ms": model["max_wait_ms"],
                                             "threads": max(1, report["environment"]["torch_threads"] // model["lanes"])}
    requests = {e["request"]: e for e in peers["explain"]}
    assert set(requests) == {"integrated_gradients", "saliency+input_x_gradient+gradcam+gae"}
    for row in requests.values():
        for side in ("ours", "theirs"):
            assert row[side]["requests_ok"] > 0 and not row[side]["errors"], (row["request"], side, row[side])
    assert "Against the serving frameworks" in markdown and "per-request reference handler" in markdown
    # the peers' process groups were stopped whole: no LitServe worker or plain handler outlives the run
    leftover = subprocess.run(["pgrep", "-f", "benchmarks.peers.(litserve_peer|plain)"], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", leftover.stdout
    names = {t["target"] for t in model["targets"]}
    assert {"p50 at 1 client / the plain FastAPI handler's", "throughput at 32 clients / tuned LitServe's"} <= names


def _peer_point(system: str, clients: int, rps: float, p50: float, round_index: int) -> dict[str, Any]:
    return {"system": system, "concurrency": clients, "round": round_index, "requests_ok": 10, "throughput_rps": rps,
            "latency_ms": {"p50": p50, "p95": p50 * 2}, "errors": {}, "first_error": None,
            "cpu": {"server_cores": 1.0, "other_cores": 0.0}, "cpu_ms_per_request": {"server": 20.0}}


def test_peer_targets_take_the_median_of_the_rounds_ratios() -> None:
    points = [_peer_point(OURS, 1, 30.0, 30.0, 1), _peer_point(OURS, 1, 34.0, 34.0, 2),
              _peer_point(PLAIN, 1, 31.0, 31.0, 1), _peer_point(PLAIN, 1, 33.0, 33.0, 2),
              _peer_point(OURS, 32, 66.0, 500.0, 1), _peer_point(OURS, 32, 62.0, 500.0, 2),
              _peer_point(LITSERVE, 32, 60.0, 520.0, 1), _peer_point(LITSERVE, 32, 56.0, 520.0, 2)]
    result = {"peers": {"predict": points}, "predict": [], "explain_cost": [], "references": [], "baseline": {}}
    rows = {(r["system"], r["concurrency"]): r for r in peer_summary(result)}
    assert rows[(OURS, 1)]["throughput_each"] == [30.0, 34.0] and rows[(OURS, 1)]["p50_ms"] == 32.0
    assert rows[(PLAIN, 1)]["paired_p50_ratios"] == pytest.approx([30 / 31, 34 / 33])
    assert rows[(LITSERVE, 32)]["ours_throughput_ratio"] == pytest.approx(64.0 / 58.0)  # of the means
    targets = {t["target"]: t for t in evaluate_targets(result)}
    assert targets["p50 at 1 client / the plain FastAPI handler's"]["value"] == pytest.approx((30 / 31 + 34 / 33) / 2)
    assert targets["p50 at 1 client / the plain FastAPI handler's"]["met"] is True
    loaded = targets["throughput at 32 clients / tuned LitServe's"]
    assert loaded["value"] == pytest.approx((66 / 60 + 62 / 56) / 2) and loaded["met"] is True
    points[-1]["throughput_rps"] = 60.0  # round 2: ours 62 against 60 req/s; the median ratio drops below 1.10
    assert {t["target"]: t for t in evaluate_targets(result)}[
        "throughput at 32 clients / tuned LitServe's"]["met"] is False


def test_the_peer_gae_loop_equals_the_gae_method() -> None:
    """The per-image GAE loop the reference handler runs computes the server's `gae` maps (so the four-method
    comparison compares equal work)."""
    from benchmarks.references import PerImageGAE
    from service.explain.targets import TargetRequest
    from tests.explain_helpers import VIT_VARIANTS, explain_direct, random_pixels, served_model

    served = served_model(*VIT_VARIANTS["registers_nonsquare"], seed=5)
    pixels = random_pixels(served, 3, seed=5)
    targets = [2, 0, 7]
    ours = torch.stack([o.methods[0].maps[0] for o in explain_direct(
        served, pixels, ["gae"], targets=[TargetRequest(index=t) for t in targets])])
    loop = PerImageGAE(served.active_network, served.anatomy.num_prefix_tokens, served.anatomy.grid_size)
    try:
        theirs = loop.explain(pixels, targets)
    finally:
        loop.close()
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours.float(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(theirs[0], theirs[1])  # per image, not one map repeated


def test_smoke_markdown_and_targets(smoke_report) -> None:
    report, markdown, _ = smoke_report
    for heading in ("In-process baseline", "/predict over HTTP", "/explain over HTTP", "Explanation cost",
                    "Against reference implementations", "Against the serving frameworks", "Targets", "smoke run"):
        assert heading in markdown
    (model,) = report["models"]
    names = [t["target"] for t in model["targets"]]
    assert any(n.startswith("/predict throughput at 32 clients") for n in names)
    assert any(n.startswith("batching on / off at 32 clients") for n in names)
    assert any(n.startswith("rollout cost") for n in names)
    assert all(t["met"] in (True, False) for t in model["targets"])


# --- helpers --------------------------------------------------------------------------------------------------------


def test_cpu_accounting_counts_a_process_and_its_children() -> None:
    """A server whose work runs in child processes (LitServe's workers) is charged for their CPU too."""
    from benchmarks.cpu import tree_cpu_s

    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 0.5\n"
                              "while time.process_time() < end: pass\nprint('done', flush=True)\ntime.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "done"
        own = tree_cpu_s(child.pid)
        tree = tree_cpu_s(None)
        assert own is not None and own >= 0.4
        assert tree is not None and tree - time.process_time() >= 0.4  # beyond this process's own CPU: the child's
    finally:
        child.kill()
        child.wait()


def test_percentile_interpolates() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(map(float, range(101))), 95) == pytest.approx(95.0)


def test_load_generator_connection_keeps_alive_reconnects_after_close_and_refuses_chunked() -> None:
    received: list[bytes] = []
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}",
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\nConnection: close\r\n\r\nno",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ]
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                received.append(head + await reader.readexactly(length))
                answer = answers.pop(0)
                writer.write(answer)
                await writer.drain()
                if b"close" in answer:
                    break
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    async def scenario() -> list[Any]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        request = encode_request("127.0.0.1", port, "/v1/x", "image/png", b"\x89PNG")
        connection = Connection("127.0.0.1", port, request, timeout_s=5.0)
        outcomes: list[Any] = [await connection.send(), await connection.send()]
        try:
            await connection.send()
        except ValueError as exc:
            outcomes.append(str(exc))
        connection.close()
        server.close()
        await server.wait_closed()
        return outcomes

    outcomes = asyncio.run(scenario())
    assert outcomes[0] == (200, b'{"a":1}') and outcomes[1] == (503, b"no")
    assert "chunked" in outcomes[2]
    assert connections == 2  # the second answer said close: the third request went on a new connection
    assert all(r.startswith(b"POST /v1/x HTTP/1.1\r\n") and r.endswith(b"\r\n\r\n\x89PNG") for r in received)
    assert b"Content-Length: 4\r\n" in received[0]


def test_cpu_usage_separates_the_processes_from_the_rest() -> None:
    start = CpuSnapshot(wall=0.0, machine=100.0, steal=5.0, processes={"server": 10.0, "client": 1.0})
    end = CpuSnapshot(wall=2.0, machine=103.0, steal=5.2, processes={"server": 11.5, "client": 1.5})
    usage = cpu_usage(start, end)
    assert usage["server_cores"] == 0.75 and usage["client_cores"] == 0.25
    assert usage["other_cores"] == 0.5 and usage["client_share"] == 0.25 and usage["steal_cores"] == 0.1


def test_server_configuration_from_a_config_file(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('port = 9999\nlog_level = "warning"\n[[models]]\nid = "a"\narchitecture = "test_resnet"\n'
                      'weights = "random"\n[[models]]\nid = "b"\narchitecture = "test_resnet"\nweights = "random"\n')
    server, models = server_configuration(BenchOptions(config=str(config), models=["b"], device="cpu"))
    assert server == {"log_level": "warning", "device": "cpu"} and [m["id"] for m in models] == ["b"]
    assert without_batching(models[0])["max_batch_size"] == 1
    with pytest.raises(SystemExit, match="not in"):
        server_configuration(BenchOptions(config=str(config), models=["zzz"]))
    _, default = server_configuration(BenchOptions())
    assert default == [{"id": "deit_tiny_patch16_224", "architecture": "deit_tiny_patch16_224", "weights": "random"}]


def test_bench_options_from_the_command_line() -> None:
    from benchmarks.cli import options_from_args

    args = build_parser().parse_args(["bench", "--models", "resnet18", "--duration-s", "3", "--concurrency", "1,4",
                                      "--skip", "references", "--device", "cpu"])
    options = options_from_args(args)
    assert options.models == ["resnet18"] and options.duration_s == 3.0 and options.concurrency == [1, 4]
    assert options.skip == {"references"} and options.smoke is False
    assert options.command == ("saliency-server bench --models resnet18 --device cpu --duration-s 3 "
                               "--concurrency 1,4 --skip references")
    with pytest.raises(SystemExit):
        options_from_args(build_parser().parse_args(["bench", "--skip", "nothing"]))
    args = build_parser().parse_args(["bench", "--methods", "lrp,attn_lrp", "--comparisons", "lrp, attn_lrp"])
    options = options_from_args(args)
    assert options.methods == {"lrp", "attn_lrp"} and options.comparisons == {"lrp", "attn_lrp"}
    assert options.compares("lrp") and not options.compares("gradcam") and BenchOptions().compares("gradcam")
    assert options.command == "saliency-server bench --methods attn_lrp,lrp --comparisons attn_lrp,lrp"
    with pytest.raises(SystemExit, match="unknown comparisons"):
        options_from_args(build_parser().parse_args(["bench", "--comparisons", "lrp,shap"]))


def test_bench_image_falls_back_to_scikit_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no shared/images here
    image = load_bench_image(None, search_root=tmp_path)
    assert image.source.startswith("skimage") and image.size == (451, 300) and image.content_type == "image/png"
    body, content_type = multipart_body(image, {"top_k": "3"})
    assert content_type.startswith("multipart/form-data; boundary=") and image.data in body


def test_comparison_helpers() -> None:
    maps = torch.tensor([[[0.0, 2.0], [4.0, 8.0]]])
    assert torch.allclose(minmax(maps), torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]), atol=1e-6)
    assert pytorch_grad_cam_scale(maps, (4, 4)).shape == (1, 4, 4)
    assert max_abs_difference(maps, maps.numpy() + 0.5) == pytest.approx(0.5)
    attributions = torch.tensor([[[[1.0]], [[-3.0]], [[2.0]]]])
    assert reduce_channels(attributions, "max").item() == 3.0 and reduce_channels(attributions, "sum").item() == 0.0
    with pytest.raises(ValueError):
        reduce_channels(attributions, "median")
    signed = torch.tensor([[[1.0, -4.0]], [[0.5, 0.25]]])
    # per image: |diff| / max |reference|: 0.2 / 4 and 0.1 / 0.5
    assert relative_difference(signed + torch.tensor([[[0.2, 0.0]], [[0.0, 0.1]]]), signed) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="zero everywhere"):
        relative_difference(signed, torch.zeros_like(signed))


def test_targets_and_markdown_from_a_synthetic_result() -> None:
    point = {"requests_ok": 10, "errors": {}, "throughput_rps": 0.0, "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
             "mean_batch_size": 1.0, "cpu": {"wall_s": 1.0}}
    result = {
        "id": "m", "architecture": "a", "family": "vit", "device": "cpu", "dtype": "float32", "input_size": [3, 8, 8],
        "max_batch_size": 32, "max_wait_ms": 5.0, "weights": {"random": True, "source": "random"},
        "baseline": {"images_per_s": 100.0},
        "predict": [dict(point, mode="batching_on", concurrency=32, throughput_rps=95.0),
                    dict(point, mode="batching_off", concurrency=32, throughput_rps=50.0)],
        "explain_http": [],
        "explain_cost": [{"method": "rollout", "status": "ok", "note": None, "registry_relative_cost": 1.1,
                          "batches": [{"batch_size": 32, "forward_ms": 10.0, "explain_ms_per_image": 0.36,
                                       "cost_x_forward": 1.2}]}],
        "references": [{"comparison": "rollout", "reference": "loop", "status": "ok", "speedup": 2.0,
                        "max_abs_diff": 2e-4, "architecture": "a", "batch_size": 8, "ours_ms_per_image": 1.0,
                        "reference_ms_per_image": 2.0, "note": None},
                       {"comparison": "lrp", "reference": "zennit", "status": "ok", "speedup": 0.9,
                        "max_abs_diff": 2e-6, "architecture": "a", "batch_size": 8, "ours_ms_per_image": 1.0,
                        "reference_ms_per_image": 0.9, "note": None, "tolerance": 1e-6, "speedup_target": None,
                        "difference": "relative to each reference map's largest |value|"}],
    }
    targets = {t["target"]: t for t in evaluate_targets(result)}
    assert targets["/predict throughput at 32 clients / in-process baseline"]["met"] is True
    assert targets["batching on / off at 32 clients (cpu)"]["value"] == pytest.approx(1.9)
    assert targets["rollout cost at batch 32 (x forward)"]["met"] is False
    assert targets["rollout vs loop: speed-up"]["met"] is True
    assert targets["rollout vs loop: max abs difference"]["met"] is False
    assert "lrp vs zennit: speed-up" not in targets  # no speed-up target
    assert targets["lrp vs zennit: max abs difference"]["threshold"] == 1e-6  # its own tolerance
    assert targets["lrp vs zennit: max abs difference"]["met"] is False  # 2e-6: outputs differ
    result["targets"] = list(targets.values())
    report = {"smoke": False, "environment": {"versions": {"torch": "x"}, "date": "d", "cpu_cores": 2, "cpu": "c",
                                              "memory_gib": None, "gpu": None, "device": "cpu", "torch_threads": 2,
                                              "python": "3", "git": None},
              "command": "c", "image": {"source": "s", "width": 1, "height": 1, "bytes": 1, "content_type": "t"},
              "settings": {"warmup_s": 1, "duration_s": 1, "requests": None}, "notes": [], "models": [result]}
    markdown = render_markdown(report)
    assert "**missed**" in markdown and "| rollout |" in markdown


def test_without_the_benchmarks_package_bench_says_how_to_install_it(monkeypatch, capsys) -> None:
    """The server image ships without `benchmarks/`: `saliency-server bench` must say so, not crash."""
    monkeypatch.delitem(sys.modules, "benchmarks.cli", raising=False)
    monkeypatch.setitem(sys.modules, "benchmarks", None)  # as if it were not installed
    assert main(["bench", "--smoke"]) == 2
    assert "pip install -e '.[bench]'" in capsys.readouterr().err
    assert build_parser().parse_args(["serve", "--port", "8123"]).port == 8123  # serving is unaffected
