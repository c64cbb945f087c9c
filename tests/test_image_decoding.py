"""Unit tests of service.http.uploads: every common PIL mode to RGB, EXIF orientation, errors and size limits."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from service.http.errors import ApiError
from service.http.uploads import SizeCheck, decode_image, resized_size_check, to_rgb
from tests.helpers import png_bytes, random_image

BIG = 100_000_000  # a max_pixels that no test image reaches


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def decode_error(data: bytes, max_pixels: int = BIG, check_size: SizeCheck | None = None) -> ApiError:
    with pytest.raises(ApiError) as info:
        decode_image(data, max_pixels, check_size)
    return info.value


# --- modes ------------------------------------------------------------------------------------------------------


def test_rgb_round_trip_is_exact() -> None:
    array = random_image(3)
    out = decode_image(png_bytes(array), BIG)
    assert out.size == (48, 40)
    np.testing.assert_array_equal(pixels(out), array)


def test_grayscale_becomes_rgb_with_equal_channels() -> None:
    gray = np.arange(0, 256, 4, dtype=np.uint8).reshape(8, 8)
    out = decode_image(png_bytes(Image.fromarray(gray, mode="L")), BIG)
    rgb = pixels(out)
    assert rgb.shape == (8, 8, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], gray)


def test_one_bit_image_becomes_black_and_white() -> None:
    image = Image.new("1", (4, 2), 0)
    image.putpixel((1, 0), 1)
    rgb = pixels(decode_image(png_bytes(image), BIG))
    assert tuple(rgb[0, 1]) == (255, 255, 255)
    assert tuple(rgb[0, 0]) == (0, 0, 0)


def _palette_image() -> Image.Image:
    image = Image.new("P", (3, 1))
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    image.putpalette(palette)
    image.putdata([0, 1, 2])
    return image


def test_palette_without_transparency_expands_to_its_colours() -> None:
    image = _palette_image()
    assert "transparency" not in image.info
    rgb = pixels(decode_image(png_bytes(image), BIG))
    assert [tuple(p) for p in rgb[0]] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def test_palette_with_transparency_composites_transparent_index_on_white() -> None:
    image = _palette_image()
    image.info["transparency"] = 1  # green is the transparent index
    data = png_bytes(image, transparency=1)
    assert Image.open(io.BytesIO(data)).mode == "P"
    rgb = pixels(decode_image(data, BIG))
    assert [tuple(p) for p in rgb[0]] == [(255, 0, 0), (255, 255, 255), (0, 0, 255)]


def test_rgba_composited_on_white() -> None:
    array = np.zeros((1, 3, 4), dtype=np.uint8)
    array[0, 0] = (10, 20, 30, 0)  # fully transparent: white
    array[0, 1] = (10, 20, 30, 255)  # opaque: its own colour
    array[0, 2] = (0, 0, 0, 128)  # half transparent black: mid grey
    data = png_bytes(Image.fromarray(array, mode="RGBA"))
    rgb = pixels(decode_image(data, BIG))
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    assert tuple(rgb[0, 1]) == (10, 20, 30)
    assert all(abs(v - 127) <= 2 for v in rgb[0, 2])


def test_la_composited_on_white() -> None:
    array = np.zeros((1, 3, 2), dtype=np.uint8)
    array[0, 0] = (40, 0)
    array[0, 1] = (40, 255)
    array[0, 2] = (0, 128)
    image = Image.fromarray(array, mode="LA")
    data = png_bytes(image)
    assert Image.open(io.BytesIO(data)).mode == "LA"
    rgb = pixels(decode_image(data, BIG))
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    assert tuple(rgb[0, 1]) == (40, 40, 40)
    assert all(abs(v - 127) <= 2 for v in rgb[0, 2])


def test_16_bit_grayscale_png_is_scaled_not_clipped() -> None:
    values = np.array([[65535, 32768, 0, 1000, 16384]], dtype=np.uint16)
    data = png_bytes(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    rgb = pixels(decode_image(data, BIG))
    gray = rgb[..., 0]
    np.testing.assert_array_equal(rgb[..., 1], gray)
    np.testing.assert_array_equal(rgb[..., 2], gray)
    assert gray[0, 0] == 255
    assert abs(gray[0, 1] - 128) <= 1
    assert gray[0, 2] == 0
    assert gray[0, 3] == 4  # 1000 / 65535 * 255
    assert abs(gray[0, 4] - 64) <= 1
    assert (gray < 255).sum() == 4  # not clipped to 255 everywhere


def test_32_bit_integer_mode_in_16_bit_range_is_scaled() -> None:
    image = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32), mode="I")
    assert image.mode == "I"
    gray = pixels(to_rgb(image))[..., 0]
    assert list(gray[0]) == [0, 128, 255]


def test_float_mode_in_unit_range_is_scaled() -> None:
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    gray = pixels(to_rgb(image))[..., 0]
    assert list(gray[0]) == [0, 128, 255]


@pytest.mark.parametrize(
    ("cmyk", "rgb"),
    [((0, 255, 255, 0), (255, 0, 0)), ((255, 0, 0, 0), (0, 255, 255)), ((0, 0, 0, 255), (0, 0, 0))],
)
def test_cmyk_jpeg_converted_to_rgb(cmyk: tuple[int, ...], rgb: tuple[int, int, int]) -> None:
    data = png_bytes(Image.new("CMYK", (16, 16), cmyk), fmt="JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = pixels(decode_image(data, BIG))
    assert out.shape == (16, 16, 3)
    assert np.abs(out[8, 8] - np.array(rgb)).max() <= 12, out[8, 8]


# --- EXIF orientation -------------------------------------------------------------------------------------------


def _oriented_jpeg(orientation: int) -> bytes:
    """A 40x20 (w x h) blue JPEG with a red 10x10 block in its stored top-left corner and an EXIF orientation."""
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[...] = (0, 0, 255)
    array[:10, :10] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return png_bytes(Image.fromarray(array), fmt="JPEG", quality=95, exif=exif.tobytes())


def _is_red(pixel: np.ndarray) -> bool:
    return pixel[0] > 200 and pixel[1] < 60 and pixel[2] < 60


def _is_blue(pixel: np.ndarray) -> bool:
    return pixel[0] < 60 and pixel[1] < 60 and pixel[2] > 200


def test_exif_orientation_1_is_left_alone() -> None:
    out = decode_image(_oriented_jpeg(1), BIG)
    assert out.size == (40, 20)
    rgb = pixels(out)
    assert _is_red(rgb[2, 2]) and _is_blue(rgb[2, 37])


def test_exif_orientation_6_rotates_clockwise() -> None:
    out = decode_image(_oriented_jpeg(6), BIG)
    assert out.size == (20, 40)  # width and height swapped
    rgb = pixels(out)  # (rows=40, cols=20)
    # Orientation 6: the stored top-left corner is displayed at the top-right.
    assert _is_red(rgb[2, 17])
    assert _is_blue(rgb[2, 2]) and _is_blue(rgb[37, 17]) and _is_blue(rgb[37, 2])


def test_exif_orientation_8_rotates_counter_clockwise() -> None:
    out = decode_image(_oriented_jpeg(8), BIG)
    assert out.size == (20, 40)
    rgb = pixels(out)
    # Orientation 8: the stored top-left corner is displayed at the bottom-left.
    assert _is_red(rgb[37, 2])
    assert _is_blue(rgb[2, 2]) and _is_blue(rgb[2, 17]) and _is_blue(rgb[37, 17])


# --- animations -------------------------------------------------------------------------------------------------


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 6), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    data = buffer.getvalue()
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    out = decode_image(data, BIG)
    assert out.size == (8, 6)
    rgb = pixels(out)
    assert (rgb == np.array([255, 0, 0])).all()


# --- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_400_truncated_image(fmt: str) -> None:
    data = png_bytes(random_image(5, (64, 64)), fmt=fmt)
    error = decode_error(data[: len(data) // 2])
    assert (error.status, error.code) == (400, "truncated_image")
    assert "truncated" in error.message


def test_random_bytes_are_400_not_an_image() -> None:
    error = decode_error(np.random.default_rng(0).bytes(1000))
    assert (error.status, error.code) == (400, "not_an_image")


def test_text_is_400_not_an_image() -> None:
    error = decode_error(b"hello, this is not an image\n" * 10)
    assert (error.status, error.code) == (400, "not_an_image")


def test_empty_bytes_are_400_empty_image() -> None:
    error = decode_error(b"")
    assert (error.status, error.code) == (400, "empty_image")


# --- size limits and decompression bombs ------------------------------------------------------------------------


def test_image_over_max_pixels_is_413_and_at_the_limit_is_accepted() -> None:
    data = png_bytes(random_image(1, (100, 50)))
    error = decode_error(data, max_pixels=4999)
    assert (error.status, error.code) == (413, "image_too_large")
    assert "5000" in error.message and "4999" in error.message
    assert decode_image(data, 5000).size == (100, 50)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG, built without allocating its pixels: a few KB for tens of megapixels."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def test_crafted_bilevel_png_is_a_valid_image() -> None:
    out = decode_image(bilevel_png(300, 200), BIG)
    assert out.size == (300, 200)
    assert (pixels(out) == 0).all()


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any pixel decoding fail loudly, so a test proves the size check happens from the header alone."""

    def forbidden_load(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", forbidden_load)


def test_bomb_under_pillows_own_limit_is_rejected_from_the_header(no_pixel_decoding: None) -> None:
    data = bilevel_png(8000, 8000)  # 64 megapixels in a file of a few KB
    assert len(data) < 100_000
    error = decode_error(data, max_pixels=1_000_000)
    assert (error.status, error.code) == (413, "image_too_large")
    assert "8000x8000" in error.message


def test_bomb_over_pillows_own_limit_is_413(no_pixel_decoding: None) -> None:
    data = bilevel_png(20000, 20000)  # 400 megapixels, ~50 KB
    assert len(data) < 100_000
    error = decode_error(data, max_pixels=40_000_000)
    assert (error.status, error.code) == (413, "image_too_large")


def test_truncated_bomb_is_still_413_not_400() -> None:
    """The IHDR alone decides: a bomb whose pixel data is cut short is rejected for its size, never decoded."""
    data = bilevel_png(8000, 8000)
    error = decode_error(data[:200], max_pixels=1_000_000)
    assert (error.status, error.code) == (413, "image_too_large")


def test_bomb_over_pillows_own_limit_names_the_configured_limit(no_pixel_decoding: None) -> None:
    error = decode_error(bilevel_png(20000, 20000), max_pixels=40_000_000)
    assert "400000000" in error.message and "40000000 (max_image_pixels)" in error.message
    assert str(2 * Image.MAX_IMAGE_PIXELS) not in error.message  # Pillow's own limit is not ours


# --- the size after the model's resize (thin images) ------------------------------------------------------------


def _resnet_like_transform() -> object:
    from timm.data import create_transform

    return create_transform(input_size=(3, 224, 224), crop_pct=0.875, is_training=False)  # resize 256, crop 224


@pytest.mark.parametrize("size", [(10_000, 1), (40_000, 1), (40_000_000, 1), (1, 10_000), (2_000, 10)])
def test_image_whose_resize_would_exceed_max_resized_pixels_is_422_from_the_header(
    no_pixel_decoding: None, size: tuple[int, int]
) -> None:
    check = resized_size_check(_resnet_like_transform(), 10_000_000, "m")
    error = decode_error(bilevel_png(*size), max_pixels=40_000_000, check_size=check)
    assert (error.status, error.code) == (422, "extreme_aspect_ratio")
    assert f"{size[0]}x{size[1]}" in error.message and "max_resized_pixels" in error.message


def test_resized_size_bound_is_exact_for_timms_short_side_resize() -> None:
    # 256 on the short side: 1000x256 -> 1000x256 (256,000 px); 1001x256 -> 1001x256.
    check = resized_size_check(_resnet_like_transform(), 256_000, "m")
    check(1000, 256)
    check(500, 128)  # 1000x256 after the resize
    with pytest.raises(ApiError) as refused:
        check(1001, 256)
    assert refused.value.status == 422
    assert decode_image(bilevel_png(500, 128), BIG, check).size == (500, 128)
