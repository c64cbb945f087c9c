"""Class names for a model's output indices."""

from __future__ import annotations

from pathlib import Path

from timm.data import ImageNetInfo


def load_labels(num_classes: int, labels_file: Path | None = None) -> list[str]:
    """Labels from a file (one per line), timm's ImageNet names for 1000 classes, else `class_<i>`."""
    if labels_file is not None:
        labels = [line.strip() for line in Path(labels_file).expanduser().read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(labels) != num_classes:
            raise ValueError(f"{labels_file}: {len(labels)} labels for a model with {num_classes} classes")
        return labels
    if num_classes == 1000:
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(num_classes)]
    return [f"class_{i}" for i in range(num_classes)]
