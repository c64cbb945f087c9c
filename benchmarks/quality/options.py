"""What one `saliency-server evaluate` run measures, and the presets of the default and the smoke runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.quality.sources import REPO_ROOT

SECTIONS = ("faithfulness", "sanity", "groundtruth")
GROUNDTRUTH_CONFIG = REPO_ROOT / "benchmarks" / "groundtruth" / "models.toml"
# Methods whose registry cost is above this (forward passes per image) are "expensive": they run on a quarter of the
# images (rounded up), and are sanity-checked only on models with inputs of at most SMALL_INPUT_SIDE px (the
# ground-truth models) unless --sanity-expensive.
EXPENSIVE_RELATIVE_COST = 50.0
SMALL_INPUT_SIDE = 128

# --smoke: random-weight models small enough to run every section in seconds.
SMOKE_MODELS: list[dict[str, Any]] = [
    {"id": "smoke_vit", "architecture": "vit_tiny_patch16_224", "weights": "random",
     "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                      "num_classes": 10}},
    {"id": "smoke_cnn", "architecture": "test_resnet", "weights": "random", "model_kwargs": {"num_classes": 10},
     "data_config": {"input_size": [3, 64, 64]}},
]
SMOKE_METHODS = ["gradcam", "rollout", "saliency"]


@dataclass
class EvaluateOptions:
    config: str | None = None  # the photo models' configuration file (default: the server's default models)
    groundtruth_config: str | None = None  # default: benchmarks/groundtruth/models.toml when it exists
    models: list[str] | None = None  # model ids to evaluate (of either configuration); None: all
    methods: list[str] | None = None  # None: every registered method that applies
    images: int = 4  # photos per photo model
    groundtruth_images: int = 64  # test-split samples per ground-truth model
    sanity_images: int = 2  # photos in the sanity check
    groundtruth_sanity_images: int = 8  # test samples in the sanity check (at most the images a method ran on)
    sanity_groups: int = 4  # most block groups in the cascade (plus the head and the stem stages)
    sanity_expensive: bool = False  # sanity-check expensive methods on large-input models too
    include_random: bool = False  # evaluate models that run on random weights (meaningless numbers)
    batch_size: int = 8  # images per run_explain_batch call
    threads: int | None = None  # torch CPU threads (None: torch's default)
    seed: int = 0  # random baseline maps and re-initialisation
    device: str | None = None
    skip: set[str] = field(default_factory=set)
    smoke: bool = False
    output_json: str | None = None
    output_md: str | None = None
    output_summary: str | None = None  # the per-method summary as GET /v1/methods ships it
    command: str = "saliency-server evaluate"

    @property
    def groundtruth_path(self) -> Path | None:
        if self.groundtruth_config is not None:
            return Path(self.groundtruth_config)
        return GROUNDTRUTH_CONFIG if GROUNDTRUTH_CONFIG.is_file() else None

    @classmethod
    def smoke_preset(cls, **overrides: Any) -> EvaluateOptions:
        values: dict[str, Any] = dict(
            images=2, groundtruth_images=2, sanity_images=2, groundtruth_sanity_images=2, sanity_groups=2,
            methods=list(SMOKE_METHODS), include_random=True, smoke=True, threads=1,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
