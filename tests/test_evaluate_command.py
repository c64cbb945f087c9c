"""`saliency-server evaluate` (benchmarks/quality): the smoke run's report structure (not its numbers), the
localisation scores against hand-computed cases and quantus, the baseline maps, and the sanity check's machinery:
the cascade re-initialises top down without touching the trained network, a map that ignores the weights fails,
Grad-CAM's map follows the weights; its verdicts agree with quantus's MPRT."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks.quality.baselines import gaussian_map, random_map
from benchmarks.quality.localisation import (
    best_iou,
    is_signed,
    localisation_scores,
    mass_inside,
    pointing_game,
    pointing_tolerance,
    rendered,
    to_input_space,
)
from benchmarks.quality.options import EvaluateOptions
from benchmarks.quality.randomisation import (
    ROOT,
    SANITY_THRESHOLD,
    cascade,
    randomisation_stages,
    sanity_curve,
    sanity_passed,
    served_with_network,
    spearman,
)
from benchmarks.quality.runner import MethodRun, compute_maps, faithfulness
from benchmarks.quality.sources import input_mask
from service.cli import build_parser, main
from service.config import ServerSettings
from service.explain.render.geometry import CropGeometry
from service.explain.render.maps import project_map
from service.explain.requests import resolve_methods
from service.model.served import ServedModel, load_served_model
from tests.helpers import tiny_cnn_config, tiny_vit_config

SECTIONS = ("faithfulness", "sanity")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("evaluate")
    json_path, md_path, summary_path = out / "quality.json", out / "quality.md", out / "summary.json"
    assert main(["evaluate", "--smoke", "--output-json", str(json_path), "--output-md", str(md_path),
                 "--output-summary", str(summary_path)]) == 0
    shipped = json.loads(summary_path.read_text())
    assert shipped["methods"] == {} and "no models" in shipped["source"]  # random weights are never shipped
    return json.loads(json_path.read_text()), md_path.read_text()


def _model(seed: int, config: Any) -> ServedModel:
    torch.manual_seed(seed)
    logging.getLogger("service.model.served").setLevel(logging.ERROR)
    return load_served_model(config, ServerSettings(models=[config]))


@pytest.fixture(scope="module")
def tiny_cnn() -> ServedModel:
    return _model(0, tiny_cnn_config(data_config={"input_size": [3, 64, 64]}))


@pytest.fixture(scope="module")
def tiny_vit() -> ServedModel:
    return _model(0, tiny_vit_config())


# --- The smoke run --------------------------------------------------------------------------------------------------


def test_smoke_run_writes_every_section(smoke) -> None:
    report, markdown = smoke
    assert report["smoke"] is True and report["schema_version"] == 1
    assert report["command"].startswith("saliency-server evaluate") and report["command"].endswith("--smoke")
    roles = {(m["id"], m["role"]) for m in report["models"]}
    assert roles == {("smoke_vit", "photos"), ("smoke_cnn", "photos"), ("smoke_vit", "groundtruth"),
                     ("smoke_cnn", "groundtruth")}
    for model in report["models"]:
        assert len(model["images"]) == 2 and model["sanity_stages"]
        assert model["sanity_stages"][0]["kind"] == "head" and model["sanity_stages"][-1]["kind"] == "stem"
        expected = {"gradcam", "saliency"} | ({"rollout"} if model["family"] == "vit" else set())
        assert set(model["methods"]) == expected
        if model["family"] == "cnn":
            assert "rollout" in model["not_applicable"]
        for name, method in model["methods"].items():
            assert method["status"] == "ok", (name, method)
            f = method["faithfulness"]
            for metric in ("deletion", "insertion"):
                assert 0.0 <= f[metric]["mean"] <= 1.0
                for baseline in ("random", "gaussian"):
                    assert 0.0 <= f[metric][f"win_rate_vs_{baseline}"] <= 1.0
                    assert math.isfinite(f[metric][f"advantage_vs_{baseline}"])
            s = method["sanity"]
            assert s["status"] == "ok" and s["passed"] in (True, False, None)  # None: constant trained maps
            assert [p["stage"] for p in s["curve"]] == [st["label"] for st in model["sanity_stages"]]
            assert all(-1.0 <= p["ssim"] <= 1.0 for p in s["curve"])
            assert all(p["spearman"] is None or -1.0 <= p["spearman"] <= 1.0 for p in s["curve"])
            assert method["signed"] is False or s["absolute"] is True
            if model["role"] == "groundtruth":
                g = method["groundtruth"]
                assert 0.0 <= g["pointing_game"] <= 1.0 and 0.0 <= g["mass_inside"] <= 1.0
                assert 0.0 <= g["best_iou"] <= 1.0 and g["deletion"] == f["deletion"]["mean"]
            else:
                assert "groundtruth" not in method
        if model["role"] == "groundtruth":
            assert set(model["groundtruth"]["baselines"]) == {"gaussian", "random"}
            assert model["accuracy"] is not None
    # the summary GET /v1/methods will ship: summary[method][family], a few numbers each
    summary = report["summary"]
    assert set(summary) == {"gradcam", "rollout", "saliency"} and set(summary["rollout"]) == {"vit"}
    for entry in summary.values():
        for values in entry.values():
            assert set(values) == {"models", "faithfulness_images", "deletion_win_rate_vs_gaussian",
                                   "insertion_win_rate_vs_gaussian", "sanity_spearman",
                                   "sanity_passed", "pointing_game", "mass_inside", "verdict"}
            assert values["verdict"] in {"trustworthy", "mixed", "unreliable", "untested"}
    assert summary["gradcam"]["cnn"]["models"] == ["smoke_cnn"]
    assert summary["gradcam"]["cnn"]["faithfulness_images"] == 4  # 2 photos + 2 test samples
    for heading in ("**Faithfulness vs baselines**", "**Sanity check**", "**Ground truth**",
                    "### Which methods are trustworthy on which family", "*baseline: centred Gaussian*"):
        assert heading in markdown
    assert "| gradcam |" in markdown


def test_the_shipped_summary(smoke) -> None:
    """`--output-summary`: what GET /v1/methods ships (service/explain/measured_quality.json), per method a list of
    per-family figures, from trained models only."""
    import copy

    import api_schemas
    from benchmarks.quality.report import shipped_summary

    report = copy.deepcopy(smoke[0])
    for model in report["models"]:
        model["weights"]["random"] = False  # as if trained
    shipped = shipped_summary(report)
    assert shipped["source"].startswith("`saliency-server evaluate") and "smoke_vit (2 photos)" in shipped["source"]
    assert set(shipped["methods"]) == {"gradcam", "rollout", "saliency"}
    (rollout,) = shipped["methods"]["rollout"]
    assert set(rollout) == {"family", "models", "deletion_win_rate", "insertion_win_rate", "sanity_check",
                            "sanity_spearman", "pointing_game", "mass_inside"}
    assert rollout["family"] == "vit" and rollout["models"] == ["smoke_vit"]
    assert rollout["sanity_check"] in ("passed", "failed", None)
    assert {f["family"] for f in shipped["methods"]["gradcam"]} == {"vit", "cnn"}
    measured = getattr(api_schemas, "MeasuredQuality", None)  # the API's model of one entry, where it exists
    if measured is not None:
        for entries in shipped["methods"].values():
            for entry in entries:
                assert measured.model_validate(entry).model_dump() == entry


def test_options_and_command_line() -> None:
    from benchmarks.quality.cli import options_from_args

    args = build_parser().parse_args(["evaluate", "--methods", "gradcam,cam", "--images", "3", "--skip", "sanity",
                                      "--include-random", "--output-json", "x.json"])
    options = options_from_args(args)
    assert options.methods == ["gradcam", "cam"] and options.images == 3 and options.skip == {"sanity"}
    assert options.include_random and not options.smoke and options.groundtruth_images == 64
    assert options.command == ("saliency-server evaluate --methods gradcam,cam --images 3 --skip sanity "
                               "--output-json x.json --include-random")
    smoke = options_from_args(build_parser().parse_args(["evaluate", "--smoke", "--images", "1"]))
    assert smoke.smoke and smoke.images == 1 and smoke.include_random
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--images", "0"])
    with pytest.raises(SystemExit, match="unknown sections"):
        from benchmarks.quality.runner import run_evaluation

        run_evaluation(EvaluateOptions(skip={"nope"}))


# --- Localisation ---------------------------------------------------------------------------------------------------


def _mask(shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[rows, cols] = True
    return mask


def test_pointing_game_by_hand() -> None:
    mask = _mask((10, 10), slice(2, 5), slice(2, 5))
    values = np.zeros((10, 10))
    values[3, 3] = 1.0
    assert pointing_game(values, mask)
    values[3, 3], values[3, 7] = 0.5, 1.0  # the maximum 3 px right of the mask's last column (col 4)
    assert not pointing_game(values, mask)
    assert not pointing_game(values, mask, tolerance=2)
    assert pointing_game(values, mask, tolerance=3)
    values[4, 4] = 1.0  # a tie: one of the maxima inside counts (as in quantus.PointingGame)
    assert pointing_game(values, mask)
    assert not pointing_game(np.full((10, 10), 0.3), mask)  # a constant map points nowhere
    assert pointing_tolerance(224) == 15 and pointing_tolerance(64) == 4


def test_mass_inside_and_best_iou_by_hand() -> None:
    mask = _mask((4, 4), slice(0, 2), slice(0, 2))  # 4 pixels of 16
    values = np.zeros((4, 4))
    values[:2, :2] = 1.0
    values[3, 3] = 1.0
    values[3, 2] = 0.5
    assert mass_inside(values, mask) == pytest.approx(4.0 / 5.5)
    # offsets carry nothing (the map is min-max scaled as the server draws it); negatives are clipped
    assert mass_inside(values + 7.0, mask) == pytest.approx(4.0 / 5.5)
    signed = values - 0.25 * (values == 0)
    assert is_signed(signed) and not is_signed(values)
    assert mass_inside(signed, mask) == pytest.approx(4.0 / 5.5)
    np.testing.assert_allclose(rendered(values + 7.0), values)
    # thresholds <= 0.5: the region is the mask and two pixels, IoU 4/6; above 0.5: five pixels, IoU 4/5
    iou, threshold = best_iou(values, mask)
    assert iou == pytest.approx(0.8) and threshold == pytest.approx(0.55)
    assert best_iou(np.ones((4, 4)), mask) == (0.0, None)
    values[3, 3] = 0.0
    assert best_iou(values, mask)[0] == pytest.approx(1.0)


def test_localisation_matches_quantus() -> None:
    import quantus

    rng = np.random.default_rng(3)
    a = rng.random((6, 1, 16, 16)) ** 4  # non-negative maps with a minimum near 0: min-max = divide by max
    a[:, :, 0, 0] = 0.0
    s = np.zeros((6, 1, 16, 16))
    for i in range(6):
        top, left = rng.integers(0, 10, size=2)
        s[i, 0, top:top + 6, left:left + 5] = 1
    a[0, 0][s[0, 0] > 0] += 2.0  # a sure hit
    x, y = rng.random((6, 3, 16, 16)), np.zeros(6, int)
    kwargs = {"model": None, "x_batch": x, "y_batch": y, "a_batch": a.astype(np.float32), "s_batch": s,
              "device": "cpu"}
    hits = quantus.PointingGame(abs=False, normalise=False, disable_warnings=True)(**kwargs)
    masses = quantus.RelevanceMassAccuracy(abs=False, normalise=False, disable_warnings=True)(**kwargs)
    ours_hits = [pointing_game(a[i, 0], s[i, 0] > 0) for i in range(6)]
    ours_mass = [mass_inside(a[i, 0].astype(np.float32), s[i, 0] > 0) for i in range(6)]
    assert ours_hits == [bool(h) for h in hits] and ours_hits[0] and not all(ours_hits)
    np.testing.assert_allclose(ours_mass, masses, rtol=1e-5)


def test_maps_reach_the_input_as_the_server_projects_them() -> None:
    grid = torch.rand(4, 5, generator=torch.Generator().manual_seed(0))
    geometry = CropGeometry(original_size=(40, 32), input_size=(40, 32), scale=(1.0, 1.0), offset=(0.0, 0.0))
    expected, _ = project_map(grid, geometry, "input", 1024)
    np.testing.assert_allclose(to_input_space(grid, (32, 40)), expected.numpy(), rtol=1e-6)
    mask = _mask((32, 40), slice(8, 24), slice(10, 30))
    scores = localisation_scores(grid, mask, tolerance=0)
    assert set(scores) == {"pointing_game", "mass_inside", "best_iou", "best_iou_threshold"}


def test_masks_follow_the_models_resize_and_crop(tiny_vit) -> None:
    # the tiny ViT's transform: resize 64 -> 35 (scale 35/64), centre crop 32 starting at row 2 (torchvision rounds
    # 1.5 up); input row v covers image row floor((v + 0.5 + 2) * 64 / 35), inside the top half while v <= 14
    mask = _mask((64, 64), slice(0, 32), slice(0, 64))  # the top half of the image
    moved = input_mask(mask, tiny_vit.transform, (32, 32))
    assert moved.shape == (32, 32) and moved[:15].all() and not moved[15:].any()
    from timm.data import create_transform

    same = create_transform(input_size=(3, 32, 32), crop_pct=1.0, interpolation="bilinear")  # the ground truth's
    exact = _mask((32, 32), slice(3, 9), slice(4, 20))
    np.testing.assert_array_equal(input_mask(exact, same, (32, 32)), exact)


# --- Baselines ------------------------------------------------------------------------------------------------------


def test_baseline_maps() -> None:
    g = gaussian_map((4, 4))  # sigma 1 cell; cell (0, 0) is 1.5 cells from the centre on both axes
    assert g[0, 0].item() == pytest.approx(math.exp(-2.25), rel=1e-6)
    torch.testing.assert_close(g, g.flip(0))
    torch.testing.assert_close(g, g.flip(1))
    wide = gaussian_map((6, 12))  # a quarter of each side per axis: the same profile on both
    assert wide.argmax().item() in {2 * 12 + 5, 2 * 12 + 6, 3 * 12 + 5, 3 * 12 + 6}
    assert wide[2, 5].item() == pytest.approx(math.exp(-((0.5 / 1.5) ** 2 + (0.5 / 3) ** 2) / 2), rel=1e-6)
    r = random_map((7, 7), seed=0, image=1)
    torch.testing.assert_close(r, random_map((7, 7), seed=0, image=1))
    assert not torch.equal(r, random_map((7, 7), seed=0, image=2))
    assert not torch.equal(r, random_map((7, 7), seed=1, image=1))
    assert r.dtype == torch.float32 and 0.0 <= r.min() and r.max() < 1.0


def test_a_map_equal_to_the_baseline_never_beats_it(tiny_cnn) -> None:
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    gaussian = [gaussian_map((4, 4))] * 2
    run = MethodRun(method=None, requests=(), maps=gaussian, seconds=0.0)  # type: ignore[arg-type]
    grids = faithfulness(tiny_cnn, pixels, [0, 1], {"copy_of_gaussian": run}, seed=0)
    section = run.result["faithfulness"]
    for metric in ("deletion", "insertion"):
        # equal up to the float noise of batching the forward passes differently: a tie, not a win
        assert section[metric]["advantage_vs_gaussian"] == pytest.approx(0.0, abs=1e-6)
        assert section[metric]["win_rate_vs_gaussian"] == 0.0
        assert section[metric]["gaussian"] == pytest.approx(section[metric]["mean"], abs=1e-6)
        assert section[metric]["gaussian"] == grids["4x4"]["gaussian"][metric]


# --- The sanity check -----------------------------------------------------------------------------------------------


def test_stages_go_from_the_head_down_to_the_stem(tiny_vit, tiny_cnn) -> None:
    vit = randomisation_stages(tiny_vit.network)
    assert [s.kind for s in vit] == ["head", "blocks", "blocks", "stem"]
    assert vit[0].units == ("norm", "head") and vit[1].units == ("blocks.1",) and vit[2].units == ("blocks.0",)
    assert vit[3].units == ("patch_embed", ROOT)
    cnn = randomisation_stages(tiny_cnn.network, max_groups=2)
    assert [s.units for s in cnn] == [("fc",), ("layer4", "layer3"), ("layer2", "layer1"), ("conv1", "bn1")]
    import timm

    effnet = randomisation_stages(timm.create_model("tf_efficientnet_lite0", pretrained=False))
    assert effnet[0].units == ("conv_head", "bn2", "classifier")
    assert [len(s.units) for s in effnet[1:-1]] == [2, 2, 2, 1] and effnet[1].units == ("blocks.6", "blocks.5")


def test_the_cascade_randomises_a_copy_top_down(tiny_vit) -> None:
    network = tiny_vit.network
    before = {k: v.clone() for k, v in network.state_dict().items()}
    stages = randomisation_stages(network)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        trained = network(x)
    changed: set[str] = set()
    seen = []
    for stage, randomised in cascade(network, stages, seed=0):
        state = randomised.state_dict()
        now = {k for k, v in state.items() if not torch.equal(v, before[k])}
        assert changed <= now  # cumulative: what earlier stages re-initialised stays re-initialised
        changed = now
        seen.append(stage.kind)
        if stage.kind == "head":
            assert all(k.startswith(("norm.", "head.")) for k in now) and "head.weight" in now
    assert "cls_token" in changed and "pos_embed" in changed and "blocks.0.attn.qkv.weight" in changed
    with torch.inference_mode():
        assert not torch.allclose(randomised(x), trained, atol=1e-3)  # every layer randomised: new logits
        torch.testing.assert_close(network(x), trained)  # the trained network is untouched
    assert all(torch.equal(v, before[k]) for k, v in network.state_dict().items())
    again = list(cascade(network, stages, seed=0))[-1][1].state_dict()
    assert all(torch.equal(again[k], randomised.state_dict()[k]) for k in again)  # seeded: repeatable
    other = list(cascade(network, stages, seed=1))[-1][1].state_dict()
    assert not torch.equal(other["head.weight"], again["head.weight"])
    clone = served_with_network(tiny_vit, randomised)
    assert clone.active_network is randomised and tiny_vit.active_network is network


def _brightness(served: ServedModel, pixels: torch.Tensor, targets: Any) -> list[torch.Tensor]:
    """A 'method' that never looks at the model: the input's brightness."""
    return list(pixels.mean(1))


def _squares(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise images (32x32); class 1 has a bright 8x8 square somewhere, class 0 none. Returns (pixels, labels, the
    squares' masks)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(count, 3, 32, 32, generator=generator) * 0.5
    labels = torch.randint(0, 2, (count,), generator=generator)
    masks = torch.zeros(count, 32, 32, dtype=torch.bool)
    for i in range(count):
        row, col = torch.randint(0, 24, (2,), generator=generator).tolist()
        if labels[i] == 1:
            pixels[i, :, row:row + 8, col:col + 8] += 2.0
            masks[i, row:row + 8, col:col + 8] = True
    return pixels, labels, masks


@pytest.fixture(scope="module")
def trained_vit() -> ServedModel:
    """The tiny ViT trained for a second to tell images with a bright square from noise (100 Adam steps)."""
    served = _model(0, tiny_vit_config())
    network = served.network.train().requires_grad_(True)
    optimiser = torch.optim.Adam(network.parameters(), lr=2e-3)
    torch.manual_seed(0)
    for step in range(100):
        pixels, labels, _ = _squares(32, 100 + step)
        loss = torch.nn.functional.cross_entropy(network(pixels), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    network.eval().requires_grad_(False)
    pixels, labels, _ = _squares(64, 9)
    with torch.inference_mode():
        assert (network(pixels).argmax(1) == labels).float().mean() > 0.9  # it learnt the task
    return served


def _squares_to_explain() -> tuple[torch.Tensor, list[int]]:
    pixels, labels, _ = _squares(64, 9)
    return pixels[labels == 1][:6], [1] * 6


def test_a_map_that_ignores_the_weights_fails(trained_vit) -> None:
    pixels, targets = _squares_to_explain()
    result = sanity_curve(trained_vit, _brightness, pixels, targets, max_groups=2)
    assert result["passed"] is False
    assert all(p["spearman"] == pytest.approx(1.0) and p["ssim"] == pytest.approx(1.0) for p in result["curve"])


def test_gradcam_follows_the_weights(trained_vit) -> None:
    requests = resolve_methods(["gradcam"], "vit", trained_vit.anatomy)
    pixels, targets = _squares_to_explain()

    def gradcam(served: ServedModel, x: torch.Tensor, classes: Any) -> list[torch.Tensor]:
        return compute_maps(served, requests, x, classes, batch_size=8)

    trained = gradcam(trained_vit, pixels, targets)
    assert all(float(m.std()) > 0 for m in trained)  # real maps, not constant ones
    result = sanity_curve(trained_vit, gradcam, pixels, targets, max_groups=2, trained=trained)
    assert [p["stage"].split(" ")[0] for p in result["curve"]] == ["head", "+", "+", "+"]
    assert result["passed"] is True
    assert all(p["spearman"] < SANITY_THRESHOLD for p in result["curve"][1:])
    # deterministic: the same seed gives the same curve
    again = sanity_curve(trained_vit, gradcam, pixels, targets, max_groups=2, trained=trained)
    assert again["curve"] == result["curve"]


def test_sanity_rule() -> None:
    stages = randomisation_stages(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))
    assert [s.kind for s in stages] == ["head", "blocks"]
    # the head-only stage is not judged: a class-agnostic map cannot depend on the classifier
    assert sanity_passed([{"spearman": 1.0}, {"spearman": 0.2}], stages) is True
    assert sanity_passed([{"spearman": 0.1}, {"spearman": 0.6}], stages) is False
    assert sanity_passed([{"spearman": 0.1}, {"spearman": None}], stages) is None  # constant trained maps: no verdict
    assert spearman(torch.rand(3, 3), torch.ones(3, 3)) == 0.0  # a constant randomised map shares no ranking
    assert spearman(torch.ones(3, 3), torch.rand(3, 3)) is None  # a constant trained map has none to share
    assert spearman(torch.arange(9.0), -torch.arange(9.0)) == pytest.approx(-1.0)


def test_verdicts_agree_with_quantus_mprt(tiny_cnn) -> None:
    """quantus's model-parameter randomisation (MPRT: every layer with reset_parameters, cascading top down)
    reaches the same verdicts as ours: the brightness map stays perfectly correlated, the input gradient's does not."""
    import quantus

    def gradient(module: torch.nn.Module, x: torch.Tensor, targets: Any) -> torch.Tensor:
        x = x.clone().requires_grad_(True)
        with torch.enable_grad():
            score = module(x).gather(1, torch.as_tensor(targets).view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(score, x)
        return grad.abs().sum(1)

    def quantus_explain(model: torch.nn.Module, inputs: np.ndarray, targets: np.ndarray, **_: Any) -> np.ndarray:
        x = torch.as_tensor(inputs, dtype=torch.float32)
        maps = x.mean(1) if kind == "brightness" else gradient(model.eval(), x, targets)
        return maps[:, None].detach().numpy()

    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    targets = [1, 2]
    verdicts = {}
    for kind in ("brightness", "gradient"):
        mprt = quantus.MPRT(return_last_correlation=True, disable_warnings=True, abs=True, normalise=True)
        last = mprt(model=tiny_cnn.network, x_batch=pixels.numpy(), y_batch=np.array(targets), a_batch=None,
                    explain_func=quantus_explain, device="cpu")
        ours = sanity_curve(
            tiny_cnn, _brightness if kind == "brightness" else
            (lambda served, x, t: list(gradient(served.active_network, x, t))), pixels, targets, max_groups=2)
        verdicts[kind] = (bool(np.mean(last) < SANITY_THRESHOLD), ours["passed"])
    assert verdicts == {"brightness": (False, False), "gradient": (True, True)}


def test_configured_models_and_groundtruth_models(tmp_path) -> None:
    """Outside the smoke preset: photo models from --config, ground-truth models from --groundtruth-config (paths
    relative to the repository root, as the training script writes them); a model that cannot load is reported."""
    from benchmarks.quality.runner import groundtruth_configs, run_evaluation
    from benchmarks.quality.sources import REPO_ROOT

    (tmp_path / "photo.toml").write_text(
        '[[models]]\nid = "tiny"\narchitecture = "vit_tiny_patch16_224"\nweights = "random"\n'
        'model_kwargs = { img_size = 32, patch_size = 8, embed_dim = 32, depth = 2, num_heads = 2, num_classes = 10 }\n')
    (tmp_path / "gt.toml").write_text(
        '[[models]]\nid = "gt_missing"\narchitecture = "resnet10t"\n'
        'weights = "file:benchmarks/groundtruth/weights/no_such.safetensors"\nlabels_file = "labels.txt"\n')
    (entry,) = groundtruth_configs(tmp_path / "gt.toml")
    assert entry["weights"] == f"file:{REPO_ROOT}/benchmarks/groundtruth/weights/no_such.safetensors"
    report = run_evaluation(EvaluateOptions(
        config=str(tmp_path / "photo.toml"), groundtruth_config=str(tmp_path / "gt.toml"), methods=["rollout"],
        images=1, skip={"sanity"}, include_random=True, threads=1))
    (model,) = report["models"]
    assert model["id"] == "tiny" and model["role"] == "photos" and model["images"][0]["name"] == "skimage:chelsea"
    assert model["methods"]["rollout"]["faithfulness"]["images"] == 1 and "sanity" not in model["methods"]["rollout"]
    (skipped,) = report["skipped_models"]
    assert skipped["id"] == "gt_missing" and "cannot be loaded" in skipped["reason"]
    assert report["summary"]["rollout"]["vit"]["sanity_passed"] is None


def test_get_methods_ships_the_summary_figures(tmp_path, monkeypatch) -> None:
    """GET /v1/methods carries each method's figures from the shipped summary file, and where they come from."""
    import asyncio

    from service.explain import quality
    from tests.helpers import running_app, settings_for, tiny_vit_config

    summary = {"source": "saliency-server evaluate (test)", "methods": {"gradcam": [
        {"family": "cnn", "models": ["gt_resnet"], "deletion_win_rate": 0.75, "insertion_win_rate": 1.0,
         "sanity_check": "passed", "sanity_spearman": 0.17, "pointing_game": 0.81, "mass_inside": 0.143}]}}
    path = tmp_path / "measured_quality.json"
    path.write_text(json.dumps(summary), encoding="utf-8")
    monkeypatch.setattr(quality, "QUALITY_FILE", path)
    quality.shipped_quality.cache_clear()

    async def listed() -> dict:
        async with running_app(settings_for(tiny_vit_config(), device="cpu")) as (client, _):
            return (await client.get("/v1/methods")).json()

    try:
        body = asyncio.run(listed())
    finally:
        quality.shipped_quality.cache_clear()
    by_name = {m["name"]: m for m in body["methods"]}
    assert body["quality_report"] == "saliency-server evaluate (test)"
    assert by_name["gradcam"]["measured_quality"] == summary["methods"]["gradcam"]
    assert by_name["rollout"]["measured_quality"] == []
