"""Train the ground-truth benchmark's two classifiers from scratch on CPU, reproducibly, and write what the server needs.

    .venv/bin/python -m benchmarks.groundtruth.train                 # both models, into benchmarks/groundtruth/
    .venv/bin/python -m benchmarks.groundtruth.train --out /tmp/gt --models gt_vit --epochs 1

Writes `weights/<id>.safetensors` (the state dicts), `labels.txt`, `models.toml` (a server configuration serving both
through `weights = "file:..."`) and `metrics.json` (accuracies, times, weight digests) into the output directory.
With `--models`, only those models are retrained (the others' metrics are kept); two processes with different
`--models` may share an output directory.

The models train on exactly the tensors the server feeds them: the server's eval transform (timm's, built from the
data config below by `service.model.served.model_data_config`) applied to the 64x64 images, which is a plain
to-tensor-and-normalise (the resize and crop are no-ops at 64x64); the script computes it batch-wise with the same
arithmetic and checks it bit for bit against the transform before training; validation and test images go through
the transform itself. Augmentation: random flips and quarter turns only (exact pixel permutations of the 64x64 image;
every class is invariant to them). Plain cross-entropy on the labels: the masks are never used in training.

Reproducible: fixed seeds for the model's initialisation, the data (the generator is a pure function of the seed),
the data order and the augmentation; deterministic algorithms; one CPU thread (fixed). Rerunning the script on the
same machine and software gives the same weights bit for bit (see README.md for what was checked).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import create_transform
from torch import nn

from benchmarks.groundtruth.dataset import IMAGE_SIZE, LABELS, make_arrays, make_split

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]

# The server's preprocessing for both models (the `data_config` of their entries in models.toml).
DATA_CONFIG: dict[str, Any] = {
    "input_size": [3, IMAGE_SIZE, IMAGE_SIZE],
    "crop_pct": 1.0,
    "interpolation": "bilinear",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
}


@dataclass(frozen=True)
class ModelSpec:
    id: str
    architecture: str
    model_kwargs: dict[str, Any]
    epochs: int
    lr: float
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    seed: int = 0
    serve: dict[str, Any] = field(default_factory=dict)  # extra keys of the model's server entry


MODELS: dict[str, ModelSpec] = {
    spec.id: spec
    for spec in (
        # timm's R+ViT-Ti hybrid scaled down: a ResNet stem (7x7 stride-2 convolution, GroupNorm, ReLU, 3x3 stride-2
        # max pool) then a 2x2 patch projection of its 16x16 feature map: 8x8 tokens of 8x8 px each plus the class
        # token, into 4 standard timm ViT blocks (attention-based methods hook blocks.*.attn). A plain ViT
        # (vit_tiny_patch16_224 with patch_size=8) learns this set far too slowly on a CPU: about 50% validation
        # accuracy after 5000 steps (README.md); the convolutional stem gives it the translation invariance it lacks.
        ModelSpec(
            id="gt_vit",
            architecture="vit_tiny_r_s16_p8_224",
            model_kwargs={"img_size": IMAGE_SIZE, "patch_size": 2, "embed_dim": 64, "depth": 4, "num_heads": 4,
                          "mlp_ratio": 2.0, "num_classes": len(LABELS)},
            epochs=7,
            lr=2e-3,
            seed=1,
        ),
        # ResNet-10-T with a narrow stem and stages and output stride 8 (dilated last two stages): an 8x8 final
        # feature map at 64x64 for Grad-CAM, like the ViT's token grid (stride 32 would leave 2x2).
        ModelSpec(
            id="gt_resnet",
            architecture="resnet10t",
            model_kwargs={"stem_width": 16, "channels": [32, 48, 64, 96], "output_stride": 8,
                          "num_classes": len(LABELS)},
            epochs=3,
            lr=2e-3,
            seed=2,
        ),
    )
}

TRAIN_SIZE = 30_000
VAL_SIZE = 1_000
TEST_SIZE = 2_000
BATCH_SIZE = 64
THREADS = 1  # more threads are no faster for models this small, and far slower on a busy machine
DATA_SEED = 1234  # the data order and the augmentation


def set_deterministic(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def create_model(spec: ModelSpec) -> nn.Module:
    return timm.create_model(spec.architecture, pretrained=False, **spec.model_kwargs)


def server_data_config(module: nn.Module) -> dict[str, Any]:
    """The data config the server resolves for the model (service.model.served.model_data_config)."""
    from service.model.served import model_data_config

    return model_data_config(module, DATA_CONFIG)


def server_transform(module: nn.Module) -> Callable:
    return create_transform(**server_data_config(module), is_training=False)


def to_model_input(images: torch.Tensor, data_config: dict[str, Any]) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 with the eval transform's arithmetic (ToTensor then Normalize);
    valid only for images already at the input size (the resize and crop are then no-ops)."""
    mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"], dtype=torch.float32).view(1, 3, 1, 1)
    pixels = images.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
    return pixels.sub(mean).div(std)


def check_preprocessing(module: nn.Module, images: np.ndarray) -> None:
    """The batch-wise preprocessing equals the server's transform bit for bit on these images."""
    from PIL import Image

    transform = server_transform(module)
    config = server_data_config(module)
    if tuple(config["input_size"]) != (3, IMAGE_SIZE, IMAGE_SIZE) or config["crop_pct"] != 1.0:
        raise RuntimeError(f"unexpected server data config {config}")
    expected = torch.stack([transform(Image.fromarray(image)) for image in images])
    actual = to_model_input(torch.from_numpy(images), config)
    if not torch.equal(expected, actual):
        raise RuntimeError(f"training inputs differ from the server's preprocessing by up to "
                           f"{(expected - actual).abs().max().item():.3g}")


def dihedral(batch: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
    """Each image (N, C, H, W) turned by ops % 4 quarter turns and mirrored when ops >= 4."""
    out = batch.clone()
    for op in range(1, 8):
        index = (ops == op).nonzero().flatten()
        if index.numel():
            part = batch[index]
            if op >= 4:
                part = part.flip(-1)
            out[index] = torch.rot90(part, op % 4, dims=(-2, -1))
    return out


@torch.no_grad()
def accuracy(module: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    module.eval()
    correct = 0
    for start in range(0, len(inputs), batch_size):
        logits = module(inputs[start:start + batch_size])
        correct += int((logits.argmax(-1) == labels[start:start + batch_size]).sum())
    return correct / max(len(inputs), 1)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_model(spec: ModelSpec, train: tuple[torch.Tensor, torch.Tensor],
                evals: dict[str, tuple[torch.Tensor, torch.Tensor]], epochs: int | None = None,
                log: Callable[[str], None] = print) -> tuple[nn.Module, dict[str, Any]]:
    """Train one model (AdamW, batch 64, warm-up + cosine); returns it in eval mode, and its metrics."""
    epochs = spec.epochs if epochs is None else epochs
    torch.manual_seed(spec.seed)
    module = create_model(spec)
    params = sum(p.numel() for p in module.parameters())

    def decays(name: str, p: torch.Tensor) -> bool:
        return p.ndim > 1 and "pos_embed" not in name and "cls_token" not in name

    named = list(module.named_parameters())
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if decays(n, p)], "weight_decay": spec.weight_decay},
                                   {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}],
                                  lr=spec.lr)
    inputs, labels = train
    steps_per_epoch = len(inputs) // BATCH_SIZE
    total = epochs * steps_per_epoch
    warmup = max(1, int(spec.warmup_epochs * steps_per_epoch))
    generator = torch.Generator().manual_seed(DATA_SEED + spec.seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    step = 0
    history = []
    for epoch in range(epochs):
        module.train()
        order = torch.randperm(len(inputs), generator=generator)
        ops = torch.randint(0, 8, (len(inputs),), generator=generator)
        running, seen = 0.0, 0
        for b in range(steps_per_epoch):
            index = order[b * BATCH_SIZE:(b + 1) * BATCH_SIZE]
            batch = dihedral(inputs[index], ops[index])
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, spec.lr)
            loss = F.cross_entropy(module(batch), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(index)
            seen += len(index)
            step += 1
        val = accuracy(module, *evals["val"])
        history.append({"epoch": epoch + 1, "loss": round(running / seen, 4), "val_accuracy": val,
                        "seconds": round(time.perf_counter() - start, 1)})
        log(f"  {spec.id} epoch {epoch + 1}/{epochs}: loss {running / seen:.4f}, val accuracy {val:.4f} "
            f"({time.perf_counter() - start:.0f}s)")
    train_seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    module.eval()
    metrics = {
        "architecture": spec.architecture,
        "model_kwargs": spec.model_kwargs,
        "parameters": params,
        "epochs": epochs,
        "steps": total,
        "train_seconds": round(train_seconds, 1),  # wall clock
        "train_cpu_seconds": round(cpu_seconds, 1),  # CPU time (a shared machine inflates the wall clock)
        "history": history,
    }
    for name, (x, y) in evals.items():
        metrics[f"{name}_accuracy"] = accuracy(module, x, y)
    metrics["train_accuracy"] = accuracy(module, inputs[:5000], labels[:5000])  # unaugmented, the first 5000
    return module, metrics


def state_dict_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names and bytes of the tensors (what the weights are, whatever the file's layout)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value))


def _config_path(path: Path) -> str:
    """Relative to the repository root when inside it (the server resolves relative paths against its working
    directory, so the configuration works when the server starts from the repository root), else absolute."""
    path = path.resolve()
    try:
        return path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def models_toml(out: Path, specs: list[ModelSpec]) -> str:
    lines = [
        "# The ground-truth benchmark's classifiers (benchmarks/groundtruth/README.md), written by",
        "# `python -m benchmarks.groundtruth.train`. Relative paths are resolved against the server's working",
        "# directory: start it from the repository root:",
        f"#   saliency-server serve --config {_config_path(out / 'models.toml')}",
        "",
    ]
    for spec in specs:
        entry: dict[str, Any] = {
            "id": spec.id,
            "architecture": spec.architecture,
            "weights": "file:" + _config_path(out / "weights" / f"{spec.id}.safetensors"),
            "model_kwargs": spec.model_kwargs,
            "data_config": DATA_CONFIG,
            "labels_file": _config_path(out / "labels.txt"),
            **spec.serve,
        }
        lines.append("[[models]]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in entry.items())
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output directory (default: benchmarks/groundtruth)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    parser.add_argument("--epochs", type=int, default=None, help="epochs for every model (default: each model's own)")
    parser.add_argument("--train-size", type=int, default=TRAIN_SIZE)
    parser.add_argument("--threads", type=int, default=THREADS, help="CPU threads (the result may depend on it)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.models.split(",") if name not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {list(MODELS)}")
    specs = [MODELS[name] for name in args.models.split(",")]

    set_deterministic(args.threads)
    started = time.perf_counter()
    print(f"generating data: {args.train_size} train, {VAL_SIZE} val, {TEST_SIZE} test images", flush=True)
    train_images, train_labels, _ = make_arrays("train", args.train_size)
    splits = {"val": make_split("val", VAL_SIZE), "test": make_split("test", TEST_SIZE)}
    data_seconds = time.perf_counter() - started
    print(f"  {data_seconds:.0f}s", flush=True)

    out: Path = args.out
    metrics: dict[str, Any] = {
        "labels": LABELS, "train_size": args.train_size, "val_size": VAL_SIZE, "test_size": TEST_SIZE,
        "batch_size": BATCH_SIZE, "threads": args.threads, "data_seconds": round(data_seconds, 1),
        "torch": torch.__version__, "timm": timm.__version__, "machine": platform.machine(), "models": {},
    }
    from safetensors.torch import save_file

    log = lambda line: print(line, flush=True)  # noqa: E731
    for spec in specs:
        probe = create_model(spec)
        check_preprocessing(probe, train_images[:256])
        config = server_data_config(probe)
        transform = server_transform(probe)
        train = (to_model_input(torch.from_numpy(train_images), config), torch.from_numpy(train_labels))
        # Evaluation inputs go through the server's own transform, image by image.
        evals = {name: (torch.stack([transform(s.image) for s in samples]), torch.tensor([s.label for s in samples]))
                 for name, samples in splits.items()}
        log(f"training {spec.id} ({spec.architecture}, {sum(p.numel() for p in probe.parameters())} parameters)")
        module, model_metrics = train_model(spec, train, evals, epochs=args.epochs, log=log)
        state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        path = out / "weights" / f"{spec.id}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path))
        path.chmod(0o644)  # safetensors writes through a private temporary file
        model_metrics["weights_sha256"] = state_dict_digest(state)
        model_metrics["file_bytes"] = path.stat().st_size
        metrics["models"][spec.id] = model_metrics
        log(f"  {spec.id}: train {model_metrics['train_accuracy']:.4f}, val {model_metrics['val_accuracy']:.4f}, "
            f"test {model_metrics['test_accuracy']:.4f} in {model_metrics['train_seconds']:.0f}s "
            f"({model_metrics['train_cpu_seconds']:.0f}s CPU) -> {path} ({model_metrics['file_bytes']} bytes)")
        del train, evals

    out.mkdir(parents=True, exist_ok=True)
    (out / "labels.txt").write_text("".join(f"{label}\n" for label in LABELS), encoding="utf-8")
    (out / "models.toml").write_text(models_toml(out, list(MODELS.values())), encoding="utf-8")
    previous = {}
    if (out / "metrics.json").is_file():  # keep the metrics of the models not retrained this time
        previous = json.loads((out / "metrics.json").read_text(encoding="utf-8")).get("models", {})
    metrics["models"] = {**previous, **metrics["models"]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    log(f"done in {time.perf_counter() - started:.0f}s; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
