"""The photo every benchmark request and in-process measurement uses."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

DEFAULT_PHOTO = "chelsea.png"  # a 451x300 photo of a cat (scikit-image's `chelsea`, CC0)
# Where a developer checkout keeps shared real photos (absent from a user's fresh clone).
SHARED_IMAGE_DIRS = ("../shared/images", "shared/images")


@dataclass(frozen=True)
class BenchImage:
    data: bytes  # the encoded file, sent as is
    filename: str
    content_type: str
    source: str  # where it came from, for the report
    size: tuple[int, int]  # (width, height)

    def describe(self) -> str:
        return f"{self.source} ({self.size[0]}x{self.size[1]}, {len(self.data)} bytes)"


def _content_type(image: Image.Image) -> str:
    return Image.MIME.get(image.format or "", "application/octet-stream")


def from_file(path: Path, source: str | None = None) -> BenchImage:
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        return BenchImage(data, path.name, _content_type(image), source or str(path), image.size)


def load_bench_image(path: str | None = None, search_root: Path | None = None) -> BenchImage:
    """`path` when given; else the shared photo next to the checkout; else scikit-image's `chelsea`, as PNG."""
    if path is not None:
        return from_file(Path(path).expanduser())
    roots = [Path.cwd()] + ([search_root] if search_root is not None else [])
    for root in roots:
        for folder in SHARED_IMAGE_DIRS:
            candidate = root / folder / DEFAULT_PHOTO
            if candidate.is_file():
                return from_file(candidate, f"{folder}/{DEFAULT_PHOTO}")
    try:
        from skimage import data as skimage_data
    except ImportError:
        raise SystemExit(
            "no benchmark photo: pass --image PATH, or install scikit-image (pip install -e '.[bench]') for its "
            "sample photos"
        ) from None
    buffer = io.BytesIO()
    image = Image.fromarray(skimage_data.chelsea())
    image.save(buffer, format="PNG")
    return BenchImage(buffer.getvalue(), DEFAULT_PHOTO, "image/png", "skimage.data.chelsea() as PNG", image.size)


def multipart_body(image: BenchImage, fields: dict[str, str], boundary: str = "saliency-bench-boundary") -> tuple[bytes, str]:
    """A multipart/form-data body with the image in `file` and the option fields; encoded once, sent many times."""
    parts = []
    for name, value in fields.items():
        parts.append(
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode()
        )
    parts.append(
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{image.filename}\"\r\n"
        f"Content-Type: {image.content_type}\r\n\r\n".encode() + image.data + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"
