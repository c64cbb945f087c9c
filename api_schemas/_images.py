"""Turning what a caller has (a path, encoded bytes, a PIL image, a numpy array) into the bytes of an upload.

numpy and PIL are optional here: they are imported only to encode a value that is already one of their objects,
which the check by `sys.modules` detects without importing them (an object cannot be a numpy array unless numpy
is loaded). Importing this module loads neither.
"""

from __future__ import annotations

import io
import mimetypes
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Union

if TYPE_CHECKING:
    import numpy
    from PIL import Image as PILImage

    ImageInput = Union[str, os.PathLike[str], bytes, bytearray, memoryview, PILImage.Image, numpy.ndarray]
else:
    ImageInput = Any

IMAGE_KINDS = "a file path (str or os.PathLike), encoded image bytes, a PIL.Image.Image or a numpy array"


class EncodedImage(NamedTuple):
    """One `file` part of a multipart upload."""

    filename: str
    data: bytes
    content_type: str


def _is_pil_image(value: object) -> bool:
    module = sys.modules.get("PIL.Image")
    return module is not None and isinstance(value, module.Image)


def _is_ndarray(value: object) -> bool:
    module = sys.modules.get("numpy")
    return module is not None and isinstance(value, module.ndarray)


def _png(image: Any) -> bytes:
    """A PIL image as a PNG (lossless)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pil_to_png(image: Any) -> bytes:
    """A PIL image losslessly as PNG; modes PNG cannot hold (CMYK, YCbCr, ...) are converted to RGB first."""
    if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    return _png(image)


def array_to_png(array: Any) -> bytes:
    """A numpy image as PNG: (H, W) gray, (H, W, 1) gray, (H, W, 3) RGB or (H, W, 4) RGBA; uint8 as is, floats in
    [0, 1] scaled to 0..255 (rounded). Anything else raises TypeError (dtype) or ValueError (shape, values)."""
    import numpy as np
    from PIL import Image

    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(
            f"a numpy image must be (height, width) gray, (height, width, 3) RGB or (height, width, 4) RGBA; "
            f"got shape {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"a numpy image must not be empty; got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise ValueError("a float numpy image must hold finite values in [0, 1]; it holds NaN or infinity")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"a float numpy image must hold values in [0, 1]; its values span [{low:g}, {high:g}] "
                "(scale it, or send uint8 0..255)"
            )
        array = np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise TypeError(
            f"a numpy image must be uint8 (0..255) or float in [0, 1]; got dtype {array.dtype} "
            "(convert it, e.g. with .astype(numpy.uint8) after scaling)"
        )
    return _png(Image.fromarray(np.ascontiguousarray(array)))


def encode_image(image: ImageInput) -> EncodedImage:
    """The upload for `image`: files and bytes are sent as they are (the server decodes any format it supports);
    PIL images and numpy arrays are encoded as PNG, losslessly."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return EncodedImage("image", bytes(image), "application/octet-stream")
    if isinstance(image, (str, os.PathLike)):
        path = Path(os.fspath(image))
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return EncodedImage(path.name or "image", path.read_bytes(), content_type)
    if _is_pil_image(image):
        return EncodedImage("image.png", pil_to_png(image), "image/png")
    if _is_ndarray(image):
        return EncodedImage("image.png", array_to_png(image), "image/png")
    raise TypeError(f"image must be {IMAGE_KINDS}; got {type(image).__module__}.{type(image).__qualname__}")
