"""The fast paths of an upload's CPU work: plain 8-bit RGB PNGs decoded by libspng (pixels identical to Pillow's), and
timm's resize-and-centre-crop eval transform run on a uint8 tensor (within a stated tolerance of Pillow's resize:
`PHOTO_TOLERANCE`, `NOISE_TOLERANCE`)."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageCms, ImageOps
from timm.data import resolve_data_config

from service.http import uploads
from service.http.errors import ApiError
from service.http.uploads import decode_image
from service.model.served import ServedModel, load_served_model
from tests.helpers import png_bytes, random_image, settings_for, tiny_cnn_config

imagecodecs = pytest.importorskip("imagecodecs")

BIG = 100_000_000


# --- PNG building ---------------------------------------------------------------------------------------------------


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def raw_png(array: np.ndarray, colour_type: int = 2, interlaced: bool = False, before_idat: tuple[bytes, ...] = (),
            after_idat: tuple[bytes, ...] = (), idat_piece: int = 4096) -> bytes:
    """A PNG written by hand (filter 0 rows): any bit depth, Adam7 interlacing, extra chunks, several IDATs."""
    depth = 16 if array.dtype == np.uint16 else 8
    height, width = array.shape[:2]
    samples = array.astype(">u2") if depth == 16 else array
    passes = [samples[y0::dy, x0::dx] for x0, y0, dx, dy in ADAM7] if interlaced else [samples]
    raw = b"".join(b"\x00" + row.tobytes() for sub in passes if sub.size for row in sub)
    compressed = zlib.compress(raw)
    idats = [chunk(b"IDAT", compressed[i:i + idat_piece]) for i in range(0, len(compressed), idat_piece)]
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, int(interlaced))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + b"".join(before_idat) + b"".join(idats)
            + b"".join(after_idat) + chunk(b"IEND", b""))


@pytest.fixture
def spng_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Records each call of libspng (`uploads.spng_decode`) made by the decoder."""
    calls: list[bytes] = []
    load = uploads.spng_decode
    assert load is not None, "imagecodecs was built without libspng"

    def spy(data: bytes, *args: Any, **kwargs: Any) -> np.ndarray:
        calls.append(data)
        return load(data, *args, **kwargs)

    monkeypatch.setattr(uploads, "spng_decode", spy)
    return calls


def pillow_only_decode(data: bytes) -> Image.Image:
    """`decode_image` as it was before the fast path: Pillow decodes everything."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(uploads, "spng_decode", None)
        return decode_image(data, BIG)


def decode_error(data: bytes) -> ApiError:
    with pytest.raises(ApiError) as info:
        decode_image(data, BIG)
    return info.value


# --- PNG fast path ----------------------------------------------------------------------------------------------


def chelsea() -> np.ndarray:
    import skimage.data

    return skimage.data.chelsea()


def srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def xmp_chunk(orientation: int) -> bytes:
    """An iTXt chunk with an XMP packet giving a TIFF orientation (as photo tools write it)."""
    packet = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
              '<rdf:Description rdf:about="" xmlns:tiff="http://ns.adobe.com/tiff/1.0/">'
              f'<tiff:Orientation>{orientation}</tiff:Orientation></rdf:Description></rdf:RDF></x:xmpmeta>')
    return chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + packet.encode())


def fast_path_cases() -> list[Any]:
    return list(_fast_path_cases())


def _fast_path_cases() -> Iterator[Any]:
    yield pytest.param(png_bytes(chelsea()), id="photo_451x300")
    yield pytest.param(png_bytes(chelsea(), optimize=True, compress_level=9), id="photo_optimized")
    yield pytest.param(raw_png(random_image(1, (37, 29)), interlaced=True), id="adam7_interlaced")
    yield pytest.param(raw_png(random_image(2, (5, 3)), interlaced=True), id="adam7_interlaced_smaller_than_a_block")
    yield pytest.param(raw_png(random_image(3, (61, 47)), before_idat=(
        chunk(b"gAMA", struct.pack(">I", 45455)),
        chunk(b"cHRM", struct.pack(">8I", 31270, 32900, 64000, 33000, 30000, 60000, 15000, 6000)),
        chunk(b"iCCP", b"sRGB\x00\x00" + zlib.compress(srgb_profile())),
        chunk(b"sBIT", bytes([5, 6, 5])),
        chunk(b"bKGD", struct.pack(">3H", 10, 20, 30)),
        chunk(b"pHYs", struct.pack(">IIB", 2835, 2835, 1)),
        chunk(b"tIME", struct.pack(">HBBBBB", 2024, 1, 2, 3, 4, 5)),
    )), id="gAMA_cHRM_iCCP_sBIT_bKGD_pHYs_tIME")
    yield pytest.param(raw_png(random_image(4, (40, 30)), before_idat=(chunk(b"gAMA", struct.pack(">I", 100000)),
                                                                        chunk(b"sRGB", b"\x00"))), id="gAMA_1_sRGB")
    yield pytest.param(png_bytes(random_image(5, (40, 30)), icc_profile=srgb_profile(), dpi=(300, 300)),
                       id="pillow_iCCP_pHYs")
    yield pytest.param(raw_png(random_image(6, (300, 200)), idat_piece=97), id="many_small_IDATs")
    yield pytest.param(png_bytes(random_image(7, (1, 1))), id="1x1")
    yield pytest.param(png_bytes(random_image(8, (3, 517))), id="3x517")
    yield pytest.param(png_bytes(random_image(9, (517, 3))), id="517x3")
    yield pytest.param(raw_png(random_image(17, (40, 30)), before_idat=(chunk(b"tEXt", b"Comment\x00hello"),)),
                       id="rgb_with_tEXt_before_IDAT")
    yield pytest.param(png_bytes(random_image(19, (40, 30)), exif=exif_orientation(6)), id="rgb_with_eXIf_rotation")
    yield pytest.param(raw_png(random_image(21, (40, 30)), before_idat=(xmp_chunk(8),)), id="rgb_with_XMP_rotation")
    yield pytest.param(raw_png(random_image(22, (40, 30)), before_idat=(xmp_chunk(1),)), id="rgb_with_XMP_upright")


@pytest.mark.parametrize("data", fast_path_cases())
def test_plain_rgb8_png_is_decoded_by_libspng_with_pillows_exact_pixels(data: bytes, spng_calls: list[bytes]) -> None:
    out = decode_image(data, BIG)
    assert spng_calls == [data], "the fast path was not taken"
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert reference.mode == "RGB" and out.mode == "RGB" and out.size == reference.size
    np.testing.assert_array_equal(np.asarray(out), np.asarray(reference))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(pillow_only_decode(data)))


def test_plain_png_still_gets_header_checks_before_any_decode(spng_calls: list[bytes]) -> None:
    data = png_bytes(random_image(0, (40, 30)))
    with pytest.raises(ApiError) as info:
        decode_image(data, 1000)
    assert info.value.status == 413
    assert spng_calls == []


# --- fallbacks to Pillow ----------------------------------------------------------------------------------------


def rgba_image() -> np.ndarray:
    array = np.dstack([random_image(10, (40, 30)), np.linspace(0, 255, 1200).reshape(30, 40).astype(np.uint8)])
    return array


def apng() -> bytes:
    frames = [Image.fromarray(random_image(seed, (40, 30))) for seed in (11, 12)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def fallback_cases() -> list[Any]:
    return list(_fallback_cases())


def _fallback_cases() -> Iterator[Any]:
    yield pytest.param(png_bytes(rgba_image()), id="rgba_composited_on_white")
    yield pytest.param(png_bytes(Image.fromarray(random_image(13, (40, 30))).quantize(16)), id="palette")
    yield pytest.param(png_bytes(random_image(14, (40, 30))[..., 0]), id="grayscale")
    yield pytest.param(raw_png(np.random.default_rng(15).integers(0, 65536, (30, 40, 3), dtype=np.uint16)),
                       id="rgb_16_bit")
    yield pytest.param(png_bytes(random_image(16, (40, 30)), transparency=(1, 2, 3)), id="rgb_with_tRNS")
    yield pytest.param(raw_png(random_image(17, (40, 30)), after_idat=(chunk(b"tEXt", b"Comment\x00hello"),)),
                       id="rgb_with_tEXt_after_IDAT")
    yield pytest.param(raw_png(random_image(23, (40, 30)), after_idat=(xmp_chunk(6),)),
                       id="rgb_with_XMP_rotation_after_IDAT")
    yield pytest.param(raw_png(random_image(18, (40, 30)), after_idat=(chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"v")),)),
                       id="rgb_with_zTXt_after_IDAT")
    yield pytest.param(raw_png(random_image(20, (40, 30)), before_idat=(chunk(b"zzZz", b"unknown"),)),
                       id="rgb_with_unknown_chunk")
    yield pytest.param(apng(), id="animated_png")


@pytest.mark.parametrize("data", fallback_cases())
def test_other_pngs_are_decoded_by_pillow_exactly_as_before(data: bytes, spng_calls: list[bytes]) -> None:
    out = decode_image(data, BIG)
    assert spng_calls == []
    before = pillow_only_decode(data)
    assert out.mode == "RGB" and out.size == before.size
    np.testing.assert_array_equal(np.asarray(out), np.asarray(before))


@pytest.mark.parametrize("data", [
    pytest.param(png_bytes(random_image(19, (40, 30)), exif=exif_orientation(6)), id="eXIf"),
    pytest.param(raw_png(random_image(21, (40, 30)), before_idat=(xmp_chunk(8),)), id="XMP_in_iTXt"),
])
def test_orientation_metadata_before_the_pixels_still_rotates_the_image(data: bytes, spng_calls: list[bytes]) -> None:
    out = decode_image(data, BIG)
    assert out.size == (30, 40)
    assert spng_calls == [data]


def test_truncated_png_gives_the_same_error_as_before(spng_calls: list[bytes]) -> None:
    data = png_bytes(chelsea())[:20_000]
    error = decode_error(data)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(uploads, "spng_decode", None)
        before = decode_error(data)
    assert (error.status, error.code, error.message) == (before.status, before.code, before.message)
    assert error.status == 400
    assert spng_calls == []


def test_png_libspng_refuses_falls_back_to_pillows_error(spng_calls: list[bytes]) -> None:
    data = bytearray(raw_png(random_image(21, (64, 48))))
    start = data.index(b"IDAT") + 4
    data[start + 2: start + 40] = b"\xff" * 38  # the zlib stream broken, the chunk structure intact
    data = bytes(data)
    error = decode_error(data)
    assert spng_calls == [data]  # tried, refused, then Pillow
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(uploads, "spng_decode", None)
        before = decode_error(data)
    assert (error.status, error.code, error.message) == (before.status, before.code, before.message)


def test_without_libspng_every_png_is_decoded_by_pillow() -> None:
    data = png_bytes(chelsea())
    np.testing.assert_array_equal(np.asarray(pillow_only_decode(data)), chelsea())


# --- preprocessing fast path ------------------------------------------------------------------------------------


def pretrained_data_config(architecture: str, **overrides: Any) -> dict[str, Any]:
    config = resolve_data_config({}, pretrained_cfg=timm.models.get_pretrained_cfg(architecture).to_dict())
    config.update(overrides)
    return config


DATA_CONFIGS = {
    "deit_tiny_patch16_224": pretrained_data_config("deit_tiny_patch16_224"),
    "efficientnet_lite0": pretrained_data_config("efficientnet_lite0"),
    "resnet50": pretrained_data_config("resnet50"),
    "vit_base_crop_pct_1": pretrained_data_config("vit_base_patch16_224", crop_pct=1.0),
    "bilinear": pretrained_data_config("resnet50", interpolation="bilinear"),
}
# Left to the transform as built: timm builds these with ResizeKeepRatio / CenterCropOrPad, or a (h, w) Resize
OTHER_DATA_CONFIGS = {
    # Resize((h, w)) + CenterCrop: torch's resample strays further (up to 4 levels, a mean of 0.2) on portrait photos
    "squash": pretrained_data_config("deit_tiny_patch16_224", crop_mode="squash"),
    "border": pretrained_data_config("resnet50", crop_mode="border"),
    "non_square_input": pretrained_data_config("resnet50", input_size=(3, 192, 256)),
}


@pytest.fixture(scope="module")
def served_models() -> dict[str, ServedModel]:
    models = {}
    for name, data_config in {**DATA_CONFIGS, **OTHER_DATA_CONFIGS}.items():
        config = tiny_cnn_config(name, data_config=data_config)
        models[name] = load_served_model(config, settings_for(config))
    return models


def noisy_image(width: int, height: int, seed: int) -> Image.Image:
    """Noise (the worst case for rounding) over a smooth gradient."""
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 200, width * height * 3).reshape(height, width, 3)
    noisy = gradient + rng.integers(0, 56, size=(height, width, 3))
    return Image.fromarray(noisy.astype(np.uint8), "RGB")


SHAPES = [(451, 300), (300, 451), (1000, 700), (100, 80), (224, 224), (225, 301), (1200, 40), (40, 1200), (1, 1)]


@pytest.mark.parametrize("name", DATA_CONFIGS)
def test_resize_and_centre_crop_transforms_take_the_tensor_path(name: str, served_models: dict[str, ServedModel]) -> None:
    assert served_models[name].fast_transform is not None


@pytest.mark.parametrize("name", OTHER_DATA_CONFIGS)
def test_other_transforms_are_not_taken_and_give_exactly_the_old_output(
    name: str, served_models: dict[str, ServedModel]
) -> None:
    served = served_models[name]
    assert served.fast_transform is None
    for seed, (width, height) in enumerate(SHAPES):
        image = noisy_image(width, height, seed)
        torch.testing.assert_close(served.preprocess(image), served.transform(image), rtol=0, atol=0)


def test_exact_preprocessing_runs_timms_pillow_transform_exactly() -> None:
    config = tiny_cnn_config("exact", data_config=DATA_CONFIGS["deit_tiny_patch16_224"], exact_preprocessing=True)
    served = load_served_model(config, settings_for(config))
    assert served.fast_transform is None
    for seed, (width, height) in enumerate(SHAPES):
        image = natural_image(width, height, seed)
        torch.testing.assert_close(served.preprocess(image), served.transform(image), rtol=0, atol=0)


def natural_image(width: int, height: int, seed: int) -> Image.Image:
    """A photo (astronaut or chelsea) cropped, or resized with Pillow where it is smaller, to width x height."""
    import skimage.data

    photo = Image.fromarray(skimage.data.astronaut() if seed % 2 else skimage.data.chelsea())
    if width > photo.width or height > photo.height:
        photo = photo.resize((max(width, photo.width), max(height, photo.height)), Image.Resampling.LANCZOS)
    return photo.crop((0, 0, width, height))


# The tolerance (see `_TensorTransform`): in uint8 levels before normalisation, the largest difference, and the share
# of values more than 1 level from Pillow's.
PHOTO_TOLERANCE = (2, 1e-4)
NOISE_TOLERANCE = (4, 1e-3)


def levels_apart(fast: torch.Tensor, slow: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return ((fast - slow).abs() * std * 255).round()  # exact multiples of 1/255 up to float rounding


@pytest.mark.parametrize("name", DATA_CONFIGS)
@pytest.mark.parametrize("content", ["photo", "noise"])
def test_tensor_path_is_within_the_stated_tolerance_of_the_pillow_transform(
    name: str, content: str, served_models: dict[str, ServedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    served = served_models[name]
    pillow_transform = served.transform
    std = torch.tensor(served.data_config["std"]).reshape(3, 1, 1)

    def refuse(image: Image.Image) -> torch.Tensor:
        raise AssertionError("the Pillow transform ran: the fast path was not taken")

    monkeypatch.setattr(served, "transform", refuse)
    make, (most, share) = (natural_image, PHOTO_TOLERANCE) if content == "photo" else (noisy_image, NOISE_TOLERANCE)
    for seed, (width, height) in enumerate(SHAPES):
        image = make(width, height, seed)
        fast = served.preprocess(image)
        slow = pillow_transform(image)
        assert fast.shape == slow.shape == served.input_size, image.size
        assert fast.dtype == torch.float32 and fast.is_contiguous()
        apart = levels_apart(fast, slow, std)
        assert apart.max() <= most, (image.size, apart.max().item())
        assert (apart > 1).float().mean() <= share, (image.size, (apart > 1).float().mean().item())
        assert apart.mean() <= 0.05, (image.size, apart.mean().item())


def test_tensor_path_crop_offsets_match_pillows(served_models: dict[str, ServedModel]) -> None:
    """Images smooth enough that a 1-level slip cannot hide a misplaced crop: an offset of one pixel would show."""
    served = served_models["deit_tiny_patch16_224"]
    for width, height in SHAPES:
        x = np.arange(width)[None, :, None] * 3 % 256
        y = np.arange(height)[:, None, None] * 5 % 256
        image = Image.fromarray(np.broadcast_to((x + y) % 256, (height, width, 3)).astype(np.uint8), "RGB")
        fast = served.fast_transform(image)  # type: ignore[misc]
        slow = served.transform(image)
        std = torch.tensor(served.data_config["std"]).reshape(3, 1, 1)
        assert levels_apart(fast, slow, std).max() <= PHOTO_TOLERANCE[0], (width, height)



# --- JSON uploads: orjson and pybase64, with the standard library's results and errors ---------------------------


BASE64_CASES = ["aGVsbG8=", "aGVsbG8", "aGVs bG8=", "aGVsbG8=\n", "@@@@", "aGVsbG8===", "", "aGVsbG8=aGVs", "YQ",
                "YQ==", "Y Q = =", "\u00e9\u00e9", "data:image/png;base64,aGVsbG8=", "data:image/png;base64,@@"]


@pytest.mark.parametrize("text", BASE64_CASES)
def test_base64_uploads_decode_as_the_standard_library_decodes_them(text: str) -> None:
    import base64
    import binascii

    body = text.partition(",")[2] if text.startswith("data:") else text
    try:
        expected: bytes | str = base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        expected = "invalid_base64"
    try:
        got: bytes | str = uploads.decode_base64_image(text)
    except ApiError as error:
        got = error.code
    assert got == expected


def test_base64_uploads_wrapped_in_lines_decode() -> None:
    import base64

    data = png_bytes(random_image(30, (40, 30)))
    assert uploads.decode_base64_image(base64.encodebytes(data).decode()) == data  # MIME: 76-character lines


@pytest.mark.parametrize("body", [b'{"a": 1, "b": [1.5, "x"]}', b'{"a": NaN}', b'{"a": "\\ud800"}',
                                  b'{"a": ' + b"9" * 40 + b"}", b'{"a": [{"b": -' + b"9" * 25 + b"}]}", b'{"a": 1e400}', b'{"a": 1, "a": 2}', b"[1]", b"null", b"{", b"\xff",
                                  b"[" * 100_000 + b"]" * 100_000,
                                  b'{"a": ' + b"[" * 1020 + b"]" * 1020 + b"}"])
def test_json_uploads_parse_as_the_standard_library_parses_them(body: bytes) -> None:
    import json
    import math

    try:
        expected: Any = json.loads(body)
        expected = expected if isinstance(expected, dict) else "not an object"
    except (ValueError, RecursionError):
        expected = "invalid_json"
    try:
        got: Any = uploads.parse_json_object(body)
    except ApiError as error:
        got = "invalid_json" if error.code == "invalid_json" else "not an object"
    if isinstance(expected, dict) and any(isinstance(v, float) and math.isnan(v) for v in expected.values()):
        assert math.isnan(got["a"])  # NaN != NaN
    else:
        assert got == expected
