"""A procedurally generated image set whose object masks are known exactly (numpy and PIL only, no torch).

Every image is 64x64 RGB: a textured background (smooth noise, stripes or a gradient between random colours), one to
three distractors of kinds that are never a class (thick line segments, arcs, clusters of dots, squiggles), and ONE
target shape whose kind is the class (`LABELS`), at a random position, size (14 to 28 px across), rotation and colour.
The target is drawn last and no distractor comes within `DISTRACTOR_GAP` px of it, so nothing occludes it or merges
with its outline; its mask is drawn into a separate image with the very same geometry, so `mask` is exactly the
target's pixels (no anti-aliasing anywhere). The target's colour is random and chosen to stand out from the
background under it (it says nothing about the class); distractors take random colours from the same distribution.
A little per-pixel noise covers the whole image.

64x64 is enough: the smallest target (14 px) still spans two 8-px ViT patches and a star's points stay a few pixels
wide, while a ViT with 8-px patches sees an 8x8 grid and the ResNet (output stride 8) an 8x8 final feature map, the
resolution at which the saliency maps are compared with the masks.

`make_sample(seed)` is a pure function of the seed; `make_split(name, count)` draws train, val and test from disjoint
seed ranges. The label is `seed % len(LABELS)`, so every split is balanced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

LABELS: list[str] = ["circle", "square", "triangle", "cross", "star"]
IMAGE_SIZE = 64
TARGET_SIZE_RANGE = (14, 28)  # the target's extent: the diameter of its circumscribed circle, in px
DISTRACTOR_KINDS = ("line", "arc", "dots", "squiggle")  # never a class
DISTRACTOR_COUNT_RANGE = (1, 3)
DISTRACTOR_GAP = 2  # px kept free between a distractor and the target
NOISE_SIGMA = 4.0  # per-pixel Gaussian noise on the finished image (0-255 scale)
BACKGROUND_CONTRAST = (25.0, 80.0)  # RGB distance between the background's two colours
MIN_TARGET_CONTRAST = 100.0  # RGB distance the target's colour keeps from most background pixels under it

SPLIT_OFFSETS: dict[str, int] = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000}
SPLIT_CAPACITY = 1_000_000_000  # seeds per split: the ranges never overlap


@dataclass(frozen=True)
class Sample:
    image: Image.Image  # 64x64 RGB
    label: int  # index into LABELS
    mask: np.ndarray  # (64, 64) bool: exactly the target's pixels
    box: tuple[int, int, int, int]  # the mask's tight bounding box (left, top, right, bottom), right/bottom exclusive
    seed: int = -1
    size: float = 0.0  # the target's extent: the diameter of its circumscribed circle, in px
    distractor_mask: np.ndarray | None = field(default=None, repr=False)  # (64, 64) bool: every distractor's pixels

    @property
    def label_name(self) -> str:
        return LABELS[self.label]


def split_seeds(name: str, count: int, start: int = 0) -> range:
    """The seeds of samples `start` .. `start + count - 1` of a split."""
    if name not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {name!r}; known: {sorted(SPLIT_OFFSETS)}")
    if start < 0 or count < 0 or start + count > SPLIT_CAPACITY:
        raise ValueError(f"a split holds at most {SPLIT_CAPACITY} samples")
    offset = SPLIT_OFFSETS[name]
    return range(offset + start, offset + start + count)


def make_split(name: str, count: int, start: int = 0) -> list[Sample]:
    """Samples `start` .. `start + count - 1` of the split `name` (train, val or test)."""
    return [make_sample(seed) for seed in split_seeds(name, count, start)]


def make_arrays(name: str, count: int, start: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A split as arrays: images (N, 64, 64, 3) uint8, labels (N,) int64, masks (N, 64, 64) bool."""
    images = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = np.empty((count,), dtype=np.int64)
    masks = np.empty((count, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for i, seed in enumerate(split_seeds(name, count, start)):
        sample = make_sample(seed)
        images[i] = np.asarray(sample.image)
        labels[i] = sample.label
        masks[i] = sample.mask
    return images, labels, masks


# --- backgrounds -------------------------------------------------------------------------------------------------


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 255.0, size=3)


def _smooth_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a coarse random grid upsampled bicubically."""
    cells = int(rng.integers(2, 7))
    coarse = (rng.uniform(0.0, 255.0, size=(cells, cells))).astype(np.uint8)
    field_ = np.asarray(Image.fromarray(coarse, mode="L").resize((size, size), Image.Resampling.BICUBIC), np.float64)
    lo, hi = field_.min(), field_.max()
    return (field_ - lo) / (hi - lo) if hi > lo else np.zeros_like(field_)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float64 in [0, 255]: smooth noise, stripes or a gradient between two random colours
    BACKGROUND_CONTRAST apart (the target, far from both, stays the most salient object)."""
    first = _random_colour(rng)
    direction = rng.normal(size=3)
    second = np.clip(first + direction / np.linalg.norm(direction) * rng.uniform(*BACKGROUND_CONTRAST), 0.0, 255.0)
    kind = int(rng.integers(3))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    if kind == 0:
        t = _smooth_field(rng, size)
    elif kind == 1:
        angle = rng.uniform(0.0, math.pi)
        period = rng.uniform(6.0, 24.0)
        phase = rng.uniform(0.0, 2 * math.pi)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period + phase)
    else:
        angle = rng.uniform(0.0, 2 * math.pi)
        proj = (xx - size / 2) * math.cos(angle) + (yy - size / 2) * math.sin(angle)
        t = (proj - proj.min()) / (proj.max() - proj.min())
    return first[None, None, :] * (1.0 - t[..., None]) + second[None, None, :] * t[..., None]


# --- shapes ------------------------------------------------------------------------------------------------------


def _polygon(points: list[tuple[float, float]], cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Unit-circle points scaled by r, rotated by angle and moved to (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]


def _regular(n: int, start: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(math.cos(start + 2 * math.pi * k / n), math.sin(start + 2 * math.pi * k / n)) for k in range(n)]


_STAR = [
    (radius * math.cos(-math.pi / 2 + math.pi * k / 5), radius * math.sin(-math.pi / 2 + math.pi * k / 5))
    for k, radius in zip(range(10), [1.0, 0.42] * 5)
]
_ARM = 0.3  # the cross's half arm width, relative to its circumradius
_ARM_LEN = math.sqrt(1.0 - _ARM**2)  # the arm's end corners lie on the unit circle
_CROSS = [
    (_ARM, -_ARM_LEN), (_ARM, -_ARM), (_ARM_LEN, -_ARM), (_ARM_LEN, _ARM), (_ARM, _ARM), (_ARM, _ARM_LEN),
    (-_ARM, _ARM_LEN), (-_ARM, _ARM), (-_ARM_LEN, _ARM), (-_ARM_LEN, -_ARM), (-_ARM, -_ARM), (-_ARM, -_ARM_LEN),
]


def _draw_target(draw: ImageDraw.ImageDraw, label: int, cx: float, cy: float, r: float, angle: float, fill) -> None:
    name = LABELS[label]
    if name == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        return
    unit = {"square": _regular(4, math.pi / 4), "triangle": _regular(3), "cross": _CROSS, "star": _STAR}[name]
    draw.polygon(_polygon(unit, cx, cy, r, angle), fill=fill)


def _draw_distractor(draw: ImageDraw.ImageDraw, kind: str, rng: np.random.Generator, size: int, fill) -> None:
    """Draws with the generator's next numbers: called twice with equal generators, it draws the same pixels."""
    if kind == "line":
        x0, y0 = rng.uniform(0, size, size=2)
        width = int(rng.integers(2, 6))
        length, angle = rng.uniform(max(10, 4 * width), 30), rng.uniform(0, 2 * math.pi)  # a bar, never a square
        draw.line([(x0, y0), (x0 + length * math.cos(angle), y0 + length * math.sin(angle))], fill=fill, width=width)
    elif kind == "arc":
        cx, cy = rng.uniform(0, size, size=2)
        r = rng.uniform(5, 13)
        start = rng.uniform(0, 360)
        draw.arc((cx - r, cy - r, cx + r, cy + r), start, start + rng.uniform(60, 200), fill=fill,
                 width=int(rng.integers(2, 4)))
    elif kind == "dots":
        cx, cy = rng.uniform(4, size - 4, size=2)
        for _ in range(int(rng.integers(3, 7))):
            x, y = cx + rng.uniform(-8, 8), cy + rng.uniform(-8, 8)
            d = rng.uniform(1.0, 2.2)
            draw.ellipse((x - d, y - d, x + d, y + d), fill=fill)
    else:  # squiggle: a polyline through a few nearby points
        x, y = rng.uniform(0, size, size=2)
        points = [(x, y)]
        for _ in range(int(rng.integers(3, 6))):
            x, y = x + rng.uniform(-8, 8), y + rng.uniform(-8, 8)
            points.append((x, y))
        draw.line(points, fill=fill, width=2, joint="curve")


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """The mask grown by `radius` px (a square neighbourhood)."""
    height, width = mask.shape
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy:dy + height, dx:dx + width]
    return out


def _target_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour standing out from the background pixels `under` (N, 3): the first of up to 64 random colours
    whose 10th-percentile distance to them reaches MIN_TARGET_CONTRAST, else the best of them."""
    best, best_score = None, -1.0
    for _ in range(64):
        colour = _random_colour(rng)
        score = float(np.percentile(np.linalg.norm(under - colour[None, :], axis=1), 10))
        if score >= MIN_TARGET_CONTRAST:
            return colour
        if score > best_score:
            best, best_score = colour, score
    return best  # type: ignore[return-value]


def make_sample(seed: int) -> Sample:
    """The sample for a seed: same seed, same image, label and mask (bit for bit)."""
    rng = np.random.default_rng(seed)
    size = IMAGE_SIZE
    label = seed % len(LABELS)

    # The target's geometry first, so distractors can keep clear of it.
    r = rng.uniform(*TARGET_SIZE_RANGE) / 2.0
    cx, cy = rng.uniform(r + 1, size - 1 - r, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    mask_image = Image.new("L", (size, size), 0)
    _draw_target(ImageDraw.Draw(mask_image), label, cx, cy, r, angle, 255)
    mask = np.asarray(mask_image) > 0
    keep_clear = _dilate(mask, DISTRACTOR_GAP)

    canvas = _background(rng, size)
    background = canvas.copy()
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mode="RGB")
    distractor_mask = np.zeros((size, size), dtype=bool)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(DISTRACTOR_COUNT_RANGE[0], DISTRACTOR_COUNT_RANGE[1] + 1))):
        kind = DISTRACTOR_KINDS[int(rng.integers(len(DISTRACTOR_KINDS)))]
        colour = tuple(int(v) for v in _random_colour(rng))
        for _attempt in range(20):  # a placement clear of the target
            state = rng.bit_generator.state
            probe = Image.new("L", (size, size), 0)
            _draw_distractor(ImageDraw.Draw(probe), kind, rng, size, 255)
            pixels = np.asarray(probe) > 0
            if pixels.any() and not (pixels & keep_clear).any():
                replay = np.random.default_rng()
                replay.bit_generator.state = state
                _draw_distractor(draw, kind, replay, size, colour)
                distractor_mask |= pixels
                break

    colour = _target_colour(rng, background[mask])
    _draw_target(draw, label, cx, cy, r, angle, tuple(int(round(v)) for v in colour))

    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0.0, NOISE_SIGMA, size=(size, size, 3))
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")
    rows, cols = np.nonzero(mask)
    box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
    return Sample(image=image, label=label, mask=mask, box=box, seed=seed, size=2 * r, distractor_mask=distractor_mask)


def contact_sheet(samples: list[Sample], columns: int = 10, scale: int = 2) -> Image.Image:
    """The samples side by side, each above its mask (for looking at the set)."""
    size = IMAGE_SIZE * scale
    rows = math.ceil(len(samples) / columns)
    sheet = Image.new("RGB", (columns * size, rows * 2 * size), (255, 255, 255))
    for i, sample in enumerate(samples):
        x, y = (i % columns) * size, (i // columns) * 2 * size
        sheet.paste(sample.image.resize((size, size), Image.Resampling.NEAREST), (x, y))
        mask = Image.fromarray((sample.mask * 255).astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)
        sheet.paste(mask.convert("RGB"), (x, y + size))
    return sheet
