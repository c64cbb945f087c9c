"""Uploads: reading an image request (a multipart upload with `file` plus option fields, or JSON with a base64
`image`) and decoding the uploaded bytes into an RGB PIL image, safely and correctly for every common mode."""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
from fastapi import Request
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from api_schemas.errors import validation_message
from service.http.errors import ApiError, invalid_request

O = TypeVar("O", bound=BaseModel)


@dataclass(frozen=True)
class ImageRequest(Generic[O]):
    """The encoded image bytes and the validated options that came with them."""

    image: bytes
    options: O


def decode_base64_image(text: str) -> bytes:
    """Decode a base64 string, accepting a `data:image/...;base64,` prefix."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_base64", "image: not valid base64") from None


def _form_value(value: str) -> Any:
    """Form fields carrying lists, objects or integers are sent as JSON text."""
    stripped = value.strip()
    if stripped[:1] in ("[", "{") or re.fullmatch(r"-?\d+", stripped):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return value
    return value


def _validate(model: type[O], data: Any) -> O:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_request(validation_message(exc.errors())) from None


async def read_image_request(
    request: Request, options_model: type[O], json_model: type[BaseModel], max_body_bytes: int
) -> ImageRequest[O]:
    """Parse the body as multipart (`file` field) or JSON (`image` field, base64)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=100, max_part_size=max_body_bytes)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise invalid_request("file: a multipart upload needs the image in a field named 'file'")
        data = await upload.read()
        fields = {key: _form_value(value) for key, value in form.multi_items() if key != "file" and isinstance(value, str)}
        return ImageRequest(data, _validate(options_model, fields))
    if content_type in ("application/json", ""):
        try:
            payload = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise invalid_request("body: expected a JSON object")
        parsed = _validate(json_model, payload)
        options = options_model.model_validate(parsed.model_dump(exclude={"image"}))
        return ImageRequest(decode_base64_image(parsed.image), options)  # type: ignore[attr-defined]
    raise ApiError(
        415, "unsupported_media_type",
        f"content-type {content_type!r} is not supported; send multipart/form-data or application/json",
    )

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
