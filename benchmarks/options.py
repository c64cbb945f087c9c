"""What one benchmark run measures, and the presets of the default and the smoke runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_MODEL = "deit_tiny_patch16_224"
DEFAULT_REFERENCE_CNN = "resnet18"
SECTIONS = ("baseline", "predict", "peers", "explain_peers", "explain_http", "explain_cost", "references")
# The reference comparisons (--comparisons), by the method compared.
COMPARISONS = ("gradcam", "rollout", "saliency", "integrated_gradients", "lrp", "attn_lrp", "transformer_attribution")

# --smoke: a ViT small enough to run every part in seconds (32x32 input, 8x8 patches, 2 blocks, 10 classes).
SMOKE_MODEL: dict[str, Any] = {
    "id": "smoke_vit",
    "architecture": "vit_tiny_patch16_224",
    "weights": "random",
    "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                     "num_classes": 10},
    "max_batch_size": 8,
}
SMOKE_REFERENCE_CNN: dict[str, Any] = {"architecture": "test_resnet", "model_kwargs": {"num_classes": 10}}


@dataclass
class BenchOptions:
    models: list[str] | None = None  # model ids (of --config) or timm architectures; None: the default model
    config: str | None = None  # a server configuration file whose models and settings are used
    device: str | None = None  # None: the config's, else auto
    dtype: str | None = None  # None: the config's, else float32
    image: str | None = None
    duration_s: float = 10.0  # measurement window of each HTTP load point
    warmup_s: float = 2.0  # un-counted requests before each window
    requests: int | None = None  # end a load point's window after this many successful requests
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32])
    baseline_s: float = 4.0  # in-process baseline, measured before and after the /predict runs
    method_s: float = 5.0  # per explanation method, split over its batch sizes
    reference_s: float = 5.0  # per reference comparison
    reference_batch: int = 8
    reference_cnn: str = DEFAULT_REFERENCE_CNN
    explain_http_method: str | None = None  # None: raw_attention for ViTs, gradcam for CNNs
    explain_http_concurrency: list[int] = field(default_factory=lambda: [1, 8])
    peer_rounds: int = 2  # rounds of the peer comparison (each runs every system at every client count)
    skip: set[str] = field(default_factory=set)
    methods: set[str] | None = None  # explanation cost of these methods only (None: every registered method)
    comparisons: set[str] | None = None  # these reference comparisons only (None: all of COMPARISONS)
    smoke: bool = False
    output_json: str | None = None
    output_md: str | None = None
    command: str = "saliency-server bench"

    def compares(self, name: str) -> bool:
        return self.comparisons is None or name in self.comparisons

    @classmethod
    def smoke_preset(cls, **overrides: Any) -> BenchOptions:
        values: dict[str, Any] = dict(
            duration_s=1.0, warmup_s=0.3, requests=16, baseline_s=0.2, method_s=0.1,
            reference_s=0.1, reference_batch=2, explain_http_concurrency=[1], peer_rounds=1, smoke=True,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
