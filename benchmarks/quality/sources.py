"""The images each model is evaluated on: photos for models with real weights, the ground-truth benchmark's test split
(with exact object masks) for its own classifiers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_IMAGES = REPO_ROOT.parent / "shared" / "images"

# scikit-image's bundled photos (offline, CC0 or public domain), in the order they are used: `--images N` takes the
# first N, so a given N evaluates the same photos on every machine. chelsea: a tabby cat (Stefan van der Walt, CC0);
# coffee: an espresso cup (Rachel Michetti, CC0); rocket: a launch (NASA, public domain); astronaut: Eileen Collins
# (NASA, public domain); motorcycle: the left view of the Middlebury stereo pair bundled with scikit-image.
SKIMAGE_PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "stereo_motorcycle")
# ../shared/images/ (a developer convenience, never required): photos appended after the scikit-image ones.
SHARED_PHOTOS = ("dogbird.png", "both.png", "plane.png", "plane2.png")


@dataclass(frozen=True)
class EvalImage:
    name: str
    image: Image.Image  # RGB
    label: int | None = None  # the class to explain (ground truth); None: the model's top-1 class
    mask: np.ndarray | None = None  # (height, width) bool in the image's pixels: the object of class `label`


def _skimage_photo(name: str) -> Image.Image:
    import skimage.data

    array = getattr(skimage.data, name)()
    if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
        array = array[0]
    return Image.fromarray(np.asarray(array)).convert("RGB")


def photos(count: int, shared: Path | None = SHARED_IMAGES) -> tuple[list[EvalImage], list[str]]:
    """The first `count` photos (scikit-image's, then those of `shared` if it exists), and notes on what was
    missing."""
    images, notes = [], []
    for name in SKIMAGE_PHOTOS:
        if len(images) >= count:
            break
        try:
            images.append(EvalImage(f"skimage:{name}", _skimage_photo(name)))
        except Exception as exc:  # noqa: BLE001 - a photo scikit-image cannot load offline is skipped, named
            notes.append(f"scikit-image photo {name!r} unavailable ({type(exc).__name__})")
    if shared is not None and shared.is_dir():
        for file in SHARED_PHOTOS:
            if len(images) >= count:
                break
            path = shared / file
            if path.is_file():
                images.append(EvalImage(f"shared:{file}", Image.open(path).convert("RGB")))
    if len(images) < count:
        notes.append(f"{count} photos asked for, {len(images)} available")
    return images, notes


def groundtruth_images(count: int) -> list[EvalImage]:
    """The first `count` samples of the ground-truth benchmark's test split, with their labels and masks."""
    from benchmarks.groundtruth.dataset import make_split

    return [EvalImage(f"test:{getattr(s, 'seed', i)}", s.image.convert("RGB"), int(s.label), np.asarray(s.mask, bool))
            for i, s in enumerate(make_split("test", count))]


def input_mask(mask: np.ndarray, transform: object, input_size: tuple[int, int]) -> np.ndarray:
    """The image-space mask in the model's input space (height, width): each input pixel takes the mask value of the
    image pixel its centre falls on through the model's resize and crop (False where the crop pads)."""
    from service.explain.render.geometry import crop_geometry

    height, width = mask.shape
    geometry = crop_geometry(transform, (width, height))
    in_h, in_w = input_size
    if geometry.scale == (1.0, 1.0) and geometry.offset == (0.0, 0.0) and (in_h, in_w) == (height, width):
        return mask.astype(bool)
    u = np.arange(in_w) + 0.5
    v = np.arange(in_h) + 0.5
    x = np.floor((u + geometry.offset[0]) / geometry.scale[0]).astype(int)
    y = np.floor((v + geometry.offset[1]) / geometry.scale[1]).astype(int)
    inside = ((y >= 0) & (y < height))[:, None] & ((x >= 0) & (x < width))[None, :]
    return inside & mask[np.clip(y, 0, height - 1)][:, np.clip(x, 0, width - 1)]
