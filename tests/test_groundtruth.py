"""The ground-truth benchmark (benchmarks/groundtruth): a deterministic generator with exact target masks, and the
committed classifiers trained on it, loaded through the server's own loading path and preprocessing."""

from __future__ import annotations

import functools
import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.groundtruth import dataset
from benchmarks.groundtruth.dataset import LABELS, Sample, make_sample, make_split, split_seeds

REPO_ROOT = Path(__file__).resolve().parents[1]
GT_DIR = REPO_ROOT / "benchmarks" / "groundtruth"
CONFIG_FILE = GT_DIR / "models.toml"

# Each class's area relative to r^2, r being the radius of its circumscribed circle (the shoelace formula on the
# generator's unit polygons; the circle is pi r^2).
_ARM = 0.3
_ARM_LEN = math.sqrt(1 - _ARM**2)
AREA_FACTORS = {
    "circle": math.pi,
    "square": 2.0,
    "triangle": 3 * math.sqrt(3) / 4,
    "cross": 8 * _ARM * _ARM_LEN - 4 * _ARM**2,
    "star": 5 * 0.42 * math.sin(math.pi / 5),
}


@functools.cache
def _test_samples() -> list[Sample]:
    """The fixed test subset: the first 200 samples of the test split (balanced: 40 per class)."""
    return make_split("test", 200)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
    return out


def test_same_seed_same_sample() -> None:
    for seed in (0, 7, 123_456, 2_000_000_003):
        a, b = make_sample(seed), make_sample(seed)
        assert a.image.tobytes() == b.image.tobytes()
        assert np.array_equal(a.mask, b.mask) and np.array_equal(a.distractor_mask, b.distractor_mask)
        assert (a.label, a.box, a.seed, a.size) == (b.label, b.box, b.seed, b.size)
    assert make_sample(1).image.tobytes() != make_sample(6).image.tobytes()  # same class, different image


def test_samples_are_64x64_rgb_with_masks_of_the_target() -> None:
    for s in make_split("val", 100):
        assert s.image.mode == "RGB" and s.image.size == (64, 64)
        assert s.mask.shape == (64, 64) and s.mask.dtype == bool and s.mask.any()
        rows, cols = np.nonzero(s.mask)
        assert s.box == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        # The target's extent (its circumscribed circle's diameter) is 14-28 px, and its mask covers what that
        # geometry should (rasterisation moves small shapes' areas by a few pixels per edge).
        assert dataset.TARGET_SIZE_RANGE[0] <= s.size <= dataset.TARGET_SIZE_RANGE[1]
        assert max(s.box[2] - s.box[0], s.box[3] - s.box[1]) <= math.ceil(s.size) + 1
        expected = AREA_FACTORS[s.label_name] * (s.size / 2) ** 2
        assert 0.7 <= s.mask.sum() / expected <= 1.4, (s.seed, s.label_name, s.mask.sum(), expected)
        # Nothing occludes the target or touches it.
        assert not (s.distractor_mask & _dilate(s.mask, 1)).any()


def test_mask_is_exactly_the_uniformly_coloured_target() -> None:
    """The pixels under the mask are one colour (plus the generator's noise); the pixels just outside it differ."""
    far = []
    for s in _test_samples()[:100]:
        pixels = np.asarray(s.image, dtype=np.float64)
        inside = pixels[s.mask]
        colour = inside.mean(axis=0)
        assert inside.std(axis=0).max() < 3 * dataset.NOISE_SIGMA, s.seed
        ring = _dilate(s.mask, 2) & ~s.mask & ~s.distractor_mask
        distance = np.linalg.norm(pixels[ring] - colour, axis=1)
        far.append(float((distance > 40).mean()))
    assert np.median(far) == 1.0
    assert np.mean(far) > 0.9


def test_splits_are_disjoint_and_balanced() -> None:
    seeds = {name: set(split_seeds(name, 100_000)) for name in ("train", "val", "test")}
    assert not seeds["train"] & seeds["val"] and not seeds["train"] & seeds["test"] and not seeds["val"] & seeds["test"]
    images = {name: {s.image.tobytes() for s in make_split(name, 30)} for name in ("train", "val", "test")}
    assert not images["train"] & images["val"] and not images["train"] & images["test"]
    assert not images["val"] & images["test"]
    with pytest.raises(ValueError):
        split_seeds("holdout", 1)
    labels = [s.label for s in _test_samples()]
    assert np.bincount(labels, minlength=len(LABELS)).tolist() == [len(labels) // len(LABELS)] * len(LABELS)


def test_config_files_match_the_training_script() -> None:
    from benchmarks.groundtruth.train import DATA_CONFIG, MODELS

    config = tomllib.loads(CONFIG_FILE.read_text(encoding="utf-8"))
    entries = {entry["id"]: entry for entry in config["models"]}
    assert set(entries) == set(MODELS)
    for model_id, spec in MODELS.items():
        entry = entries[model_id]
        assert entry["architecture"] == spec.architecture
        assert entry["model_kwargs"] == spec.model_kwargs
        assert entry["data_config"] == DATA_CONFIG
        path = REPO_ROOT / entry["weights"].removeprefix("file:")
        assert path.is_file() and path.stat().st_size < 2_000_000, path
    assert (GT_DIR / "labels.txt").read_text(encoding="utf-8").split() == LABELS


@pytest.fixture(scope="module")
def served_models():
    """The committed weights, loaded the way `saliency-server serve --config benchmarks/groundtruth/models.toml`
    started from the repository root loads them (relative paths are resolved against the working directory)."""
    from service.config import load_settings
    from service.http.app import load_models

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO_ROOT)
        return load_models(load_settings(CONFIG_FILE, device="cpu"))


def test_committed_models_load_through_the_server(served_models) -> None:
    from benchmarks.groundtruth.train import MODELS

    assert set(served_models) == set(MODELS)
    for served in served_models.values():
        assert not served.weights.random
        assert served.labels == LABELS
        assert served.input_size == (3, 64, 64)
        assert served.data_config["crop_pct"] == 1.0
    vit, resnet = served_models["gt_vit"], served_models["gt_resnet"]
    assert vit.family == "vit" and vit.anatomy.grid_size == (8, 8) and vit.anatomy.has_class_token
    assert vit.anatomy.attention_modules == tuple(f"blocks.{i}.attn" for i in range(len(vit.network.blocks)))
    assert resnet.family == "cnn"
    features = resnet.network.forward_features(torch.zeros(1, 3, 64, 64))
    assert features.shape[-2:] == (8, 8)  # Grad-CAM's map: the resolution of the ViT's token grid


def test_committed_models_reach_their_reported_accuracy(served_models) -> None:
    """Through the server's preprocessing (the ServedModel's transform) on 200 fixed test images."""
    metrics = json.loads((GT_DIR / "metrics.json").read_text(encoding="utf-8"))["models"]
    samples = _test_samples()
    labels = torch.tensor([s.label for s in samples])
    for model_id, served in served_models.items():
        pixels = torch.stack([served.transform(s.image) for s in samples])
        accuracy = float((served.predict_probabilities(pixels).argmax(-1) == labels).float().mean())
        reported = metrics[model_id]["test_accuracy"]  # on 2000 test images
        assert reported >= 0.9, (model_id, reported)
        assert accuracy >= reported - 0.03, (model_id, accuracy, reported)


def test_metrics_describe_the_committed_weight_files() -> None:
    """metrics.json's digest and size are those of the files next to it (the figures belong to these weights)."""
    from safetensors.torch import load_file

    from benchmarks.groundtruth.train import MODELS, state_dict_digest

    metrics = json.loads((GT_DIR / "metrics.json").read_text(encoding="utf-8"))["models"]
    for model_id in MODELS:
        path = GT_DIR / "weights" / f"{model_id}.safetensors"
        assert metrics[model_id]["file_bytes"] == path.stat().st_size
        assert metrics[model_id]["weights_sha256"] == state_dict_digest(load_file(str(path)))
