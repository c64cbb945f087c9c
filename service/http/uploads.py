"""Uploads: reading an image request (a multipart upload with `file` plus option fields, or JSON with a base64
`image`) and decoding the uploaded bytes into an RGB PIL image, safely and correctly for every common mode."""

from __future__ import annotations

import binascii
import io
import json
import re
import struct
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar, get_origin

import numpy as np
import orjson
import pybase64
from fastapi import Request
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from api_schemas.errors import validation_message
from service.explain.render.geometry import UnsupportedTransformError, crop_geometry
from service.http.errors import ApiError, invalid_request

try:  # libspng through imagecodecs: the fast path for plain 8-bit RGB PNGs (`decode_image`). It releases the GIL
    # while decoding, as Pillow does (pyspng, as fast, holds it: the model's lanes then stall on the GIL under load).
    # Without it, Pillow decodes every PNG.
    import imagecodecs

    spng_decode = imagecodecs.spng_decode if imagecodecs.SPNG.available else None
except ImportError:  # pragma: no cover - a runtime dependency, but the server works without it
    spng_decode = None

O = TypeVar("O", bound=BaseModel)


@dataclass(frozen=True)
class ImageRequest(Generic[O]):
    """The encoded image bytes and the validated options that came with them."""

    image: bytes
    options: O


def decode_base64_image(text: str) -> bytes:
    """Decode a base64 string, accepting a `data:image/...;base64,` prefix and whitespace (line breaks).

    pybase64 (SIMD) decodes an upload ~50x faster than the standard library, on the event loop; the standard
    library's result and errors are the same (the text as sent is tried first; only if that fails is whitespace
    removed and the text tried again)."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        return pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:
        return pybase64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_base64", "image: not valid base64") from None


def _form_value(value: str) -> Any:
    """Form fields carrying lists, objects or integers are sent as JSON text."""
    stripped = value.strip()
    if stripped[:1] in ("[", "{") or re.fullmatch(r"-?\d+", stripped):
        try:
            return json.loads(stripped)
        except (ValueError, RecursionError):  # not JSON, an integer of over 4300 digits, or nested too deeply:
            return value  # left as text, the field's validation names it
    return value


def _is_list_field(model: type[BaseModel], name: str) -> bool:
    field = model.model_fields.get(name)
    return field is not None and get_origin(field.annotation) is list


def _form_fields(form: FormData, model: type[BaseModel]) -> dict[str, Any]:
    """The option fields of a multipart form (every part but `file`), ready for validation against `model`.

    A list field may come as one part holding the whole list as JSON text (`methods=["rollout", "gradcam"]`) or as
    one part per item (what OpenAPI generators and `curl -F methods=a -F methods=b` send), each item a plain value
    or JSON text (`{"name": ..., "params": ...}`). Any other field sent more than once is refused, naming it,
    rather than one of its values being kept silently.
    """
    values: dict[str, list[Any]] = {}
    for key, value in form.multi_items():
        if key != "file" and isinstance(value, str):  # a second file part never gets here: the parser's max_files=1
            values.setdefault(key, []).append(_form_value(value))
    fields: dict[str, Any] = {}
    for key, parts in values.items():
        if _is_list_field(model, key):
            fields[key] = parts[0] if len(parts) == 1 and isinstance(parts[0], list) else parts
        elif len(parts) > 1:
            raise invalid_request(f"{key}: sent {len(parts)} times; send it once")
        else:
            fields[key] = parts[0]
    return fields


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
        try:
            form = await request.form(max_files=1, max_fields=100, max_part_size=max_body_bytes)
        except StarletteHTTPException as exc:  # Starlette's 400 for a body it cannot parse: say it is the multipart
            raise ApiError(400, "invalid_multipart", f"the multipart/form-data body cannot be parsed: {exc.detail}; "
                           "send one 'file' part and the options as text fields") from None
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise invalid_request("file: a multipart upload needs the image in a field named 'file'")
        data = await upload.read()
        return ImageRequest(data, _validate(options_model, _form_fields(form, options_model)))
    if content_type in ("application/json", ""):
        body = await request.body()
        if not body.strip():
            raise ApiError(400, "empty_body", "the request has no body: send JSON with the image base64-encoded in "
                           "'image', or a multipart/form-data upload with the image in a 'file' field")
        parsed = _validate(json_model, parse_json_object(body))
        options = options_model.model_validate(parsed.model_dump(exclude={"image"}))
        return ImageRequest(decode_base64_image(parsed.image), options)  # type: ignore[attr-defined]
    raise ApiError(
        415, "unsupported_media_type",
        f"content-type {content_type!r} is not supported; send multipart/form-data or application/json",
    )


def _has_huge_number(value: Any) -> bool:
    """Whether a parsed JSON value holds a float of magnitude 2**63 or more anywhere (orjson's reading of an integer
    too large for 64 bits, which the standard parser keeps an integer)."""
    if isinstance(value, float):
        return not abs(value) < 2.0**63
    if isinstance(value, dict):
        return any(_has_huge_number(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_huge_number(v) for v in value)
    return False


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object: 400 `invalid_json` for anything that is not JSON (nesting too deep for the parser
    included: a client's mistake, never a 500), 422 for JSON that is not an object."""
    try:
        # orjson parses a 300 kB upload ~3x faster. What it refuses (NaN, lone surrogates, deep nesting...) and what
        # it may read differently (integers beyond 64 bits become floats) goes to the standard parser, so the
        # payloads accepted, their values and the errors are the standard ones.
        payload = orjson.loads(body)
        if _has_huge_number(payload):
            payload = None
    except (orjson.JSONDecodeError, RecursionError):  # RecursionError: nesting deeper than our walk goes
        payload = None
    try:
        if payload is None:
            payload = json.loads(body)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    except RecursionError:  # the C parser's guard against deep nesting; it leaves the interpreter usable
        raise ApiError(400, "invalid_json", "the body is not usable JSON: it is nested too deeply") from None
    if not isinstance(payload, dict):
        raise invalid_request("body: expected a JSON object")
    return payload


async def read_json_request(request: Request, model: type[O]) -> O:
    """A JSON-only body (`application/json`, or no content type) validated against `model`: 400 `invalid_json`,
    415 for another content type, 422 naming the field (the same errors as the image routes' JSON form)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("application/json", ""):
        raise ApiError(
            415, "unsupported_media_type", f"content-type {content_type!r} is not supported; send application/json"
        )
    return _validate(model, parse_json_object(await request.body()))

# Pixels composited under transparent areas (the convention of timm's and torchvision's loaders is to drop alpha;
# white matches how browsers show transparent product photos and logos).
ALPHA_BACKGROUND = (255, 255, 255)


# Checks the (width, height) an image will have before its pixels are decoded; raises ApiError to refuse it.
SizeCheck = Callable[[int, int], None]


def _check_pixels(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ApiError(400, "empty_image", f"image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ApiError(
            413,
            "image_too_large",
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} (max_image_pixels): "
            "send a smaller image",
        )


def _bomb_error(exc: Image.DecompressionBombError, max_pixels: int) -> ApiError:
    """Pillow's own bomb guard (twice `Image.MAX_IMAGE_PIXELS`) fired before our header check could: name the
    configured limit, and the image's size from Pillow's message when it gives one."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    if found and int(found.group(1)) > max_pixels:
        return ApiError(413, "image_too_large", f"image is {found.group(1)} pixels; the limit is {max_pixels} "
                        "(max_image_pixels): send a smaller image")
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return ApiError(413, "image_too_large", f"image rejected as a decompression bomb: it is over {limit} pixels, "
                    f"the image library's own limit (max_image_pixels is {max_pixels}): send a smaller image")


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


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks that change neither the pixels Pillow decodes nor how they are oriented: no transparency (tRNS), no
# animation (acTL, fcTL, fdAT), nothing unknown.
_PLAIN_PNG_CHUNKS = frozenset({
    b"IHDR", b"IDAT", b"IEND", b"PLTE", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"pHYs", b"tIME", b"sBIT", b"bKGD",
})
# Metadata that can carry an orientation (EXIF in eXIf or a text chunk, XMP in iTXt): accepted before the first IDAT
# only, where opening the file (headers only) has read them into `image.info`, so the orientation is applied from
# there exactly as Pillow's own decode would. Metadata after the pixels is read only by a full decode: Pillow's.
_METADATA_PNG_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt", b"eXIf"})


def _is_plain_rgb8_png(data: bytes) -> bool:
    """Whether `data` is a complete PNG with 8-bit RGB pixels (IHDR bit depth 8, colour type 2) and only chunks of
    `_PLAIN_PNG_CHUNKS`, plus `_METADATA_PNG_CHUNKS` before the first IDAT, up to IEND: walks the chunk headers,
    never the pixel data."""
    if not data.startswith(_PNG_SIGNATURE):
        return False
    position, end = len(_PNG_SIGNATURE), len(data)
    seen_pixels = False
    while position + 8 <= end:
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind not in _PLAIN_PNG_CHUNKS and (kind not in _METADATA_PNG_CHUNKS or seen_pixels):
            return False
        if position == len(_PNG_SIGNATURE):  # the first chunk is IHDR: width, height, bit depth, colour type...
            if kind != b"IHDR" or length != 13 or position + 8 + 13 > end:
                return False
            bit_depth, colour_type = data[position + 16], data[position + 17]
            if (bit_depth, colour_type) != (8, 2):
                return False
        elif kind == b"IHDR":
            return False
        if kind == b"IEND":
            return True
        seen_pixels = seen_pixels or kind == b"IDAT"
        position += 12 + length  # length, type, data, CRC
    return False  # no IEND: truncated, left to Pillow's error


def _decode_plain_png(data: bytes, image: Image.Image) -> Image.Image | None:
    """The pixels of a plain 8-bit RGB PNG (`_is_plain_rgb8_png`) decoded by libspng, identical to Pillow's but in
    about two thirds of the CPU time (the decode is most of an upload's cost outside the model), carrying the opened file's
    metadata (`info`: EXIF, XMP) for the orientation; None where it does not apply or libspng fails, for Pillow to
    decode (and name what is wrong)."""
    if spng_decode is None or image.format != "PNG" or image.mode != "RGB" or not _is_plain_rgb8_png(data):
        return None
    try:
        array = spng_decode(data)
    except Exception:  # noqa: BLE001 - anything libspng refuses, Pillow decodes or reports
        return None
    width, height = image.size
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.shape != (height, width, 3):
        return None
    decoded = Image.fromarray(array, "RGB")
    decoded.info.update(image.info)
    return decoded


def decode_image(data: bytes, max_pixels: int, check_size: SizeCheck | None = None) -> Image.Image:
    """Decode an uploaded image to RGB, applying its EXIF orientation.

    Raises ApiError 400 for empty, unrecognised or truncated data, 413 for images over `max_pixels`
    (checked from the header, before any pixel is decoded, so decompression bombs never expand), and whatever
    `check_size` raises for the header's size (and again for the EXIF-rotated size): the server passes the bound on
    the size the model's resize would produce (`resized_size_check`).

    A complete 8-bit RGB PNG without transparency, animation or metadata after its pixels is decoded by libspng
    (imagecodecs) when it is installed: the same pixels and orientation as Pillow's, for less CPU. Any other image, or
    one libspng refuses, is decoded by Pillow.
    """
    if not data:
        raise ApiError(400, "empty_image", "the image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        _check_pixels(image, max_pixels)  # from the header: nothing is decoded yet
        if check_size is not None:
            check_size(*image.size)
        # Plain RGB PNGs (most photos sent as PNG) skip Pillow's slower decoder; their orientation still applies.
        plain = _decode_plain_png(data, image)
        if plain is not None:
            image = plain
        else:
            image.load()  # animated images: the first frame
    except ApiError:
        raise
    except Image.DecompressionBombError as exc:
        raise _bomb_error(exc, max_pixels) from None
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
    if check_size is not None:
        check_size(*image.size)
    return to_rgb(image)


def resized_size_check(transform: Any, max_resized_pixels: int, model_id: str) -> SizeCheck:
    """A `SizeCheck` refusing images whose resize by the model's eval transform would exceed `max_resized_pixels`.

    timm resizes the short side to a fixed length, so a very thin image (10000x1) becomes enormous (2,560,000x256)
    although its decoded size is tiny: this bounds the resize's output, from the header, before anything is decoded
    or resized. The size is traced with the same geometry as the explanation maps (`crop_geometry`, plain
    arithmetic); the resize is the step that grows the image (crops and pads end at the small input size).
    """

    def check(width: int, height: int) -> None:
        try:
            geometry = crop_geometry(transform, (width, height))
        except UnsupportedTransformError:
            return  # a transform we cannot trace: max_image_pixels still bounds the decoded size
        except (ZeroDivisionError, OverflowError, ValueError):
            geometry = None
        if geometry is not None:
            resized = round(width * geometry.scale[0]) * round(height * geometry.scale[1])
            if resized <= max_resized_pixels:
                return
        ratio = max(width, height) / max(1, min(width, height))
        raise ApiError(
            422, "extreme_aspect_ratio",
            f"image is {width}x{height} (aspect ratio {ratio:.0f}:1): model {model_id!r} resizes its short side to "
            f"the input size, which would make it larger than {max_resized_pixels} pixels (max_resized_pixels); "
            "crop or pad the image to a less extreme aspect ratio",
        )

    return check
