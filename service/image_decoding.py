"""Turning uploaded bytes into an RGB PIL image, safely and correctly for every common mode."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import ApiError

# Pixels composited under transparent areas (the convention of timm's and torchvision's loaders is to drop alpha;
# white matches how browsers show transparent product photos and logos).
ALPHA_BACKGROUND = (255, 255, 255)


def _check_pixels(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ApiError(400, "empty_image", f"image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ApiError(
            413,
            "image_too_large",
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
        )


def _high_bit_depth_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer/float grayscale to 8-bit, scaling the full range rather than clipping."""
    array = np.asarray(image)
    if image.mode.startswith("I;16") or (image.mode == "I" and array.max(initial=0) <= 65535 and array.min(initial=0) >= 0):
        scaled = array.astype(np.float64) / 65535.0
    elif image.mode == "F" and array.size and 0.0 <= float(array.min()) and float(array.max()) <= 1.0:
        scaled = array.astype(np.float64)
    else:  # arbitrary range: stretch min..max
        array = array.astype(np.float64)
        low, high = float(array.min(initial=0)), float(array.max(initial=0))
        scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
    return Image.fromarray(np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha composited on white, palettes expanded, 16-bit scaled, CMYK converted."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _high_bit_depth_to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, ALPHA_BACKGROUND)
        background.paste(image, mask=image.getchannel("A"))
        return background
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an uploaded image to RGB, applying its EXIF orientation.

    Raises ApiError 400 for empty, unrecognised or truncated data, 413 for images over `max_pixels`
    (checked from the header, before any pixel is decoded, so decompression bombs never expand).
    """
    if not data:
        raise ApiError(400, "empty_image", "the image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        _check_pixels(image, max_pixels)  # from the header: nothing is decoded yet
        image.load()  # animated images: the first frame
    except ApiError:
        raise
    except Image.DecompressionBombError as exc:
        raise ApiError(413, "image_too_large", f"image rejected as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise ApiError(400, "not_an_image", "the data is not an image in a format the server can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        message = str(exc)
        if "truncated" in message.lower() or "broken data stream" in message.lower():
            raise ApiError(400, "truncated_image", f"the image is truncated or corrupt: {message}") from None
        raise ApiError(400, "invalid_image", f"the image cannot be decoded: {message}") from None
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not reject an otherwise good image
        pass
    _check_pixels(image, max_pixels)
    return to_rgb(image)
