"""PNG encoding of the images the API returns, as base64 text. A leaf (numpy and PIL only): any layer may use it."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

ZLIB_DEFAULT = -1  # PIL's own default compression: zlib's default level (6)


def png_base64(pixels: np.ndarray, compress_level: int = ZLIB_DEFAULT) -> str:
    """base64 text of `pixels` as a PNG: uint8 (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA, or uint16 (H, W) gray.

    `compress_level` is zlib's, 0-9 (-1: its default); lower levels encode faster into larger files.
    """
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=compress_level)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
