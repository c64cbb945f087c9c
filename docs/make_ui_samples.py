"""Make the comparison page's sample images (service/http/static/ui/samples/) from scikit-image's photos.

Each photo's short side is resized to 224 pixels (Lanczos) and saved as a progressive JPEG of quality 85. The photos
are free of copyright: `chelsea` and `coffee` are CC0 (their photographers, Stefan van der Walt and Rachel Michetti),
`astronaut` (NASA) and `rocket` (SpaceX) are in the public domain (see each function's docstring in skimage.data).

    .venv/bin/python docs/make_ui_samples.py    # needs scikit-image (the `test` extra)
"""

from __future__ import annotations

from pathlib import Path

import skimage.data
from PIL import Image

SAMPLES = ("chelsea", "coffee", "astronaut", "rocket")
SHORT_SIDE = 224
OUT = Path(__file__).resolve().parents[1] / "service" / "http" / "static" / "ui" / "samples"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in SAMPLES:
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        scale = SHORT_SIDE / min(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        path = OUT / f"{name}.jpg"
        image.resize(size, Image.Resampling.LANCZOS).save(path, "JPEG", quality=85, progressive=True, optimize=True)
        print(f"{path}: {size[0]}x{size[1]}, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
