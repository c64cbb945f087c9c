"""A corpus of bad (and awkward but good) inputs for every route that takes input: each bad one must get its
documented 4xx in the JSON envelope, with a message naming the field or the problem; never a 5xx. The awkward good
images (CMYK, 16-bit, palette, animated, EXIF-rotated...) must still answer 200."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import resource
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

import httpx
import numpy as np
import pytest
from PIL import Image, ImageFile

from tests.helpers import (
    png_bytes,
    random_image,
    running_app,
    settings_for,
    tiny_cnn_config,
    tiny_vit_config,
    uvicorn_in_thread,
)
from tests.test_image_decoding import bilevel_png

MAX_BODY_BYTES = 2_000_000
VIT, CNN = "tiny_vit", "tiny_cnn"
PREDICT, EXPLAIN, VISUALIZE = (f"/v1/models/{VIT}/predict", f"/v1/models/{VIT}/explain",
                               f"/v1/models/{VIT}/visualizations")
CNN_EXPLAIN = f"/v1/models/{CNN}/explain"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def client() -> AsyncIterator[httpx.AsyncClient]:
    settings = settings_for(tiny_vit_config(), tiny_cnn_config(), device="cpu", max_body_bytes=MAX_BODY_BYTES,
                            max_jobs=64)
    async with running_app(settings) as (http, _):
        yield http


# --- images ------------------------------------------------------------------------------------------------------


def good_png() -> bytes:
    return png_bytes(random_image(3))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encoded(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def rgb(seed: int = 5, size: tuple[int, int] = (48, 40)) -> Image.Image:
    return Image.fromarray(random_image(seed, size))


def cmyk_jpeg() -> bytes:
    return encoded(rgb().convert("CMYK"), "JPEG")


def png_16bit() -> bytes:
    array = np.random.default_rng(1).integers(0, 65536, size=(40, 48), dtype=np.uint16)
    return encoded(Image.fromarray(array), "PNG")


def palette_png(transparent: bool = False) -> bytes:
    image = rgb().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encoded(image, "PNG", **({"transparency": 0} if transparent else {}))


def animated_gif() -> bytes:
    frames = [rgb(seed).convert("P") for seed in range(3)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return encoded(rgb(size=(60, 20)), "JPEG", exif=exif.tobytes())


def broken_exif_jpeg() -> bytes:
    return encoded(rgb(), "JPEG", exif=b"Exif\x00\x00garbage-not-tiff")


GOOD_IMAGES: dict[str, Callable[[], bytes]] = {
    "png": good_png,
    "cmyk_jpeg": cmyk_jpeg,
    "16bit_png": png_16bit,
    "palette_png": palette_png,
    "palette_png_with_transparency": lambda: palette_png(transparent=True),
    "animated_gif": animated_gif,
    "exif_rotated_jpeg": exif_rotated_jpeg,
    "broken_exif_jpeg": broken_exif_jpeg,
    "grayscale_png": lambda: encoded(rgb().convert("L"), "PNG"),
    "1bit_png": lambda: encoded(rgb().convert("1"), "PNG"),
    "rgba_png": lambda: encoded(rgb().convert("RGBA"), "PNG"),
    "la_png": lambda: encoded(rgb().convert("LA"), "PNG"),
    "webp": lambda: encoded(rgb(), "WEBP"),
    "bmp": lambda: encoded(rgb(), "BMP"),
    "tiff": lambda: encoded(rgb(), "TIFF"),
    "one_pixel_png": lambda: encoded(rgb(size=(1, 1)), "PNG"),
    "thin_but_within_the_resize_bound_300x2": lambda: bilevel_png(300, 2),
}


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(GOOD_IMAGES))
async def test_awkward_but_valid_images_are_predicted_and_explained(client: httpx.AsyncClient, name: str) -> None:
    data = GOOD_IMAGES[name]()
    response = await client.post(PREDICT, files={"file": (f"{name}.img", data, "application/octet-stream")})
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 5
    response = await client.post(CNN_EXPLAIN, json={"image": b64(data), "methods": ["gradcam"]})
    assert response.status_code == 200, response.text
    assert response.json()["explanations"][0]["method"] == "gradcam"


# --- the corpus -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """One bad request: what is sent and the status, error code and message fragments it must get back."""

    method: str
    path: str
    status: int
    code: str
    says: tuple[str, ...]  # fragments the message must contain (the field, the problem, the limit)
    send: dict[str, Any] = field(default_factory=dict)  # httpx request arguments


def upload(data: bytes, path: str = PREDICT, content_type: str = "image/png", **fields: str) -> dict[str, Any]:
    return {"files": {"file": ("upload", data, content_type)}, "data": fields}


def predict_json(**fields: Any) -> dict[str, Any]:
    return {"json": {"image": b64(good_png()), **fields}}


def explain_json(**fields: Any) -> dict[str, Any]:
    return {"json": {"image": b64(good_png()), "methods": ["gradcam"], **fields}}


def cam(**params: Any) -> dict[str, Any]:
    return explain_json(methods=[{"name": "gradcam", "params": params}])


def visualize(**fields: Any) -> dict[str, Any]:
    return {"json": {"objective": {"type": "class", "index": 1}, "steps": 1, **fields}}


def raw(body: bytes, content_type: str = "application/json") -> dict[str, Any]:
    return {"content": body, "headers": {"content-type": content_type}}


DEEP_ARRAY = b"[" * 10_000 + b"]" * 10_000
DEEP_OBJECT = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
JPEG = encoded(rgb(), "JPEG")

CORPUS: dict[str, Bad] = {
    # the image bytes
    "zero_bytes": Bad("POST", PREDICT, 400, "empty_image", ("empty",), upload(b"")),
    "empty_image_string_json": Bad("POST", PREDICT, 422, "invalid_request", ("image", "at least 1 character"),
                                   predict_json(image="")),
    "zero_bytes_base64_data_url": Bad("POST", PREDICT, 400, "empty_image", ("empty",),
                                      predict_json(image="data:image/png;base64,")),
    "random_bytes": Bad("POST", PREDICT, 400, "not_an_image", ("not an image",),
                        upload(np.random.default_rng(0).bytes(4096))),
    "text_as_image": Bad("POST", PREDICT, 400, "not_an_image", ("not an image",), upload(b"hello, world")),
    "truncated_png": Bad("POST", PREDICT, 400, "truncated_image", ("truncated",), upload(good_png()[:200])),
    "truncated_jpeg": Bad("POST", PREDICT, 400, "truncated_image", ("truncated",), upload(JPEG[: len(JPEG) // 2])),
    "png_signature_only": Bad("POST", PREDICT, 400, "not_an_image", ("not an image",), upload(good_png()[:8])),
    "bomb_over_max_image_pixels": Bad("POST", PREDICT, 413, "image_too_large", ("8000x8000", "max_image_pixels"),
                                      upload(bilevel_png(8000, 8000))),
    "bomb_over_pillows_own_limit": Bad("POST", PREDICT, 413, "image_too_large", ("max_image_pixels", "40000000"),
                                       upload(bilevel_png(20000, 20000))),
    "thin_10000x1": Bad("POST", PREDICT, 422, "extreme_aspect_ratio", ("10000x1", "max_resized_pixels"),
                        upload(bilevel_png(10000, 1))),
    "thin_40000x1": Bad("POST", PREDICT, 422, "extreme_aspect_ratio", ("40000x1", "max_resized_pixels"),
                        upload(bilevel_png(40000, 1))),
    "thin_40000000x1": Bad("POST", PREDICT, 422, "extreme_aspect_ratio", ("40000000x1", "aspect ratio"),
                           upload(bilevel_png(40_000_000, 1))),
    "tall_1x10000": Bad("POST", PREDICT, 422, "extreme_aspect_ratio", ("1x10000", "crop or pad"),
                        upload(bilevel_png(1, 10000))),
    "thin_image_explained": Bad("POST", EXPLAIN, 422, "extreme_aspect_ratio", ("10000x1",),
                                explain_json(image=b64(bilevel_png(10000, 1)))),
    "body_over_max_body_bytes": Bad("POST", PREDICT, 413, "body_too_large", ("limit", str(MAX_BODY_BYTES)),
                                    upload(b"\0" * (MAX_BODY_BYTES + 1))),
    # content types and multipart
    "text_plain_body": Bad("POST", PREDICT, 415, "unsupported_media_type", ("text/plain",), raw(b"hi", "text/plain")),
    "raw_png_body": Bad("POST", PREDICT, 415, "unsupported_media_type", ("image/png",), raw(good_png(), "image/png")),
    "form_urlencoded": Bad("POST", EXPLAIN, 415, "unsupported_media_type", ("application/x-www-form-urlencoded",),
                           raw(b"top_k=3", "application/x-www-form-urlencoded")),
    "multipart_without_boundary": Bad("POST", PREDICT, 400, "invalid_multipart", ("multipart", "boundary"),
                                      raw(b"--x\r\n\r\n", "multipart/form-data")),
    "multipart_two_files": Bad("POST", PREDICT, 400, "invalid_multipart", ("multipart", "files"),
                               {"files": [("file", ("a.png", good_png(), "image/png")),
                                          ("other", ("b.png", good_png(), "image/png"))]}),
    "multipart_without_file": Bad("POST", PREDICT, 422, "invalid_request", ("file",),
                                  {"files": {"image": ("a.png", good_png(), "image/png")}}),
    "multipart_file_as_text_field": Bad("POST", PREDICT, 422, "invalid_request", ("file",),
                                        {"data": {"file": "not a file"}, "files": {"x": ("x", b"", "text/plain")}}),
    "multipart_top_k_text": Bad("POST", PREDICT, 422, "invalid_request", ("top_k", "integer"),
                                upload(good_png(), top_k="three")),
    "multipart_top_k_true": Bad("POST", PREDICT, 422, "invalid_request", ("top_k", "integer"),
                                upload(good_png(), top_k="true")),
    "multipart_top_k_zero": Bad("POST", PREDICT, 422, "invalid_request", ("top_k", "greater than or equal to 1"),
                                upload(good_png(), top_k="0")),
    "multipart_unknown_field": Bad("POST", PREDICT, 422, "invalid_request", ("colour", "Extra inputs"),
                                   upload(good_png(), colour="red")),
    "multipart_methods_nested_too_deeply": Bad("POST", EXPLAIN, 422, "invalid_request", ("methods",),
                                              upload(good_png(), path=EXPLAIN, methods="[" * 100_000)),
    "multipart_top_k_over_4300_digits": Bad("POST", PREDICT, 422, "invalid_request", ("top_k",),
                                            upload(good_png(), top_k="9" * 5000)),
    "multipart_methods_bad_json": Bad("POST", EXPLAIN, 422, "invalid_request", ("methods",),
                                      upload(good_png(), path=EXPLAIN, methods="[gradcam")),
    # JSON
    "malformed_json": Bad("POST", PREDICT, 400, "invalid_json", ("not valid JSON",), raw(b'{"image": ')),
    "malformed_json_explain": Bad("POST", EXPLAIN, 400, "invalid_json", ("not valid JSON",), raw(b"{,}")),
    "json_integer_over_4300_digits": Bad("POST", PREDICT, 400, "invalid_json", ("not valid JSON",),
                                         raw(b'{"top_k": ' + b"9" * 5000 + b"}")),
    "visualization_json_integer_over_4300_digits": Bad("POST", VISUALIZE, 400, "invalid_json", ("not valid JSON",),
                                                       raw(b'{"steps": ' + b"9" * 5000 + b"}")),
    "deep_json_array": Bad("POST", PREDICT, 400, "invalid_json", ("nested too deeply",), raw(DEEP_ARRAY)),
    "deep_json_object_explain": Bad("POST", EXPLAIN, 400, "invalid_json", ("nested too deeply",), raw(DEEP_OBJECT)),
    "not_utf8_json": Bad("POST", PREDICT, 400, "invalid_json", ("not valid JSON",), raw(b'{"image": "\xff\xfe"}')),
    "json_array_body": Bad("POST", PREDICT, 422, "invalid_request", ("body", "JSON object"), raw(b"[1, 2]")),
    "json_null_body": Bad("POST", EXPLAIN, 422, "invalid_request", ("body", "JSON object"), raw(b"null")),
    "json_missing_image": Bad("POST", PREDICT, 422, "invalid_request", ("image", "required"),
                              {"json": {"top_k": 3}}),
    "json_image_number": Bad("POST", PREDICT, 422, "invalid_request", ("image", "string"), predict_json(image=12)),
    "invalid_base64": Bad("POST", PREDICT, 400, "invalid_base64", ("image", "base64"),
                          predict_json(image="not base64!!")),
    "base64_of_text": Bad("POST", PREDICT, 400, "not_an_image", ("not an image",),
                          predict_json(image=b64(b"plain text"))),
    "json_unknown_field": Bad("POST", PREDICT, 422, "invalid_request", ("colour", "Extra inputs"),
                              predict_json(colour="red")),
    # predict fields
    "top_k_zero": Bad("POST", PREDICT, 422, "invalid_request", ("top_k", "greater than or equal to 1"),
                      predict_json(top_k=0)),
    "top_k_negative": Bad("POST", PREDICT, 422, "invalid_request", ("top_k",), predict_json(top_k=-1)),
    "top_k_over_max": Bad("POST", PREDICT, 422, "invalid_request", ("top_k", "less than or equal to 1000"),
                          predict_json(top_k=1001)),
    "top_k_true": Bad("POST", PREDICT, 422, "invalid_request", ("top_k", "integer"), predict_json(top_k=True)),
    "top_k_string": Bad("POST", PREDICT, 422, "invalid_request", ("top_k", "integer"), predict_json(top_k="5")),
    "top_k_float": Bad("POST", PREDICT, 422, "invalid_request", ("top_k", "integer"), predict_json(top_k=2.5)),
    "top_k_null": Bad("POST", PREDICT, 422, "invalid_request", ("top_k", "integer"), predict_json(top_k=None)),
    # explain fields
    "methods_missing": Bad("POST", EXPLAIN, 422, "invalid_request", ("methods", "required"),
                           {"json": {"image": b64(good_png())}}),
    "methods_empty": Bad("POST", EXPLAIN, 422, "invalid_request", ("methods", "at least 1"), explain_json(methods=[])),
    "methods_too_many": Bad("POST", EXPLAIN, 422, "invalid_request", ("methods", "at most 16"),
                            explain_json(methods=["gradcam"] * 17)),
    "methods_not_a_list": Bad("POST", EXPLAIN, 422, "invalid_request", ("methods",), explain_json(methods="gradcam")),
    "method_true": Bad("POST", EXPLAIN, 422, "invalid_request", ("methods.0", "a method name"),
                       explain_json(methods=[True])),
    "unknown_method": Bad("POST", EXPLAIN, 422, "invalid_request", ("methods[0].name", "unknown method", "'nope'"),
                          explain_json(methods=["nope"])),
    "method_for_another_family": Bad("POST", CNN_EXPLAIN, 422, "invalid_request", ("methods[0]", "rollout", "cnn"),
                                     explain_json(methods=["rollout"])),
    "method_spec_unknown_key": Bad("POST", EXPLAIN, 422, "invalid_request", ("colour",),
                                   explain_json(methods=[{"name": "gradcam", "colour": 1}])),
    "params_unknown": Bad("POST", EXPLAIN, 422, "invalid_request", ("methods[0].params.bogus",), cam(bogus=1)),
    "params_wrong_type": Bad("POST", EXPLAIN, 422, "invalid_request", ("methods[0].params.target_layer",),
                             cam(target_layer=5)),
    "params_not_an_object": Bad("POST", EXPLAIN, 422, "invalid_request", ("methods.0",),
                                explain_json(methods=[{"name": "gradcam", "params": [1]}])),
    "params_bool_as_int": Bad("POST", EXPLAIN, 422, "invalid_request", ("methods[0].params.steps", "integer"),
                              explain_json(methods=[{"name": "integrated_gradients", "params": {"steps": True}}])),
    "params_string_as_float": Bad("POST", EXPLAIN, 422, "invalid_request", ("methods[0].params.discard_ratio",),
                                  explain_json(methods=[{"name": "rollout", "params": {"discard_ratio": "0.5"}}])),
    "rollout_discard_ratio_out_of_bounds": Bad(
        "POST", EXPLAIN, 422, "invalid_request", ("methods[0].params.discard_ratio",),
        explain_json(methods=[{"name": "rollout", "params": {"discard_ratio": 1.5}}])),
    "target_layer_unknown": Bad("POST", EXPLAIN, 422, "invalid_request",
                                ("target_layer", "'nope'", "blocks.1.norm1"), cam(target_layer="nope")),
    "target_layer_vit_head": Bad("POST", EXPLAIN, 422, "invalid_request",
                                 ("target_layer", "'head'", "no spatial output", "blocks.1.norm1"),
                                 cam(target_layer="head")),
    "target_layer_vit_head_drop": Bad("POST", EXPLAIN, 422, "invalid_request", ("'head_drop'", "no spatial output"),
                                      cam(target_layer="head_drop")),
    "target_layer_cnn_global_pool": Bad("POST", CNN_EXPLAIN, 422, "invalid_request",
                                        ("'global_pool'", "no spatial output", "layer4"),
                                        cam(target_layer="global_pool")),
    "target_layer_cnn_classifier": Bad("POST", CNN_EXPLAIN, 422, "invalid_request", ("'fc'", "no spatial output"),
                                       cam(target_layer="fc")),
    "target_layer_for_vit_cx": Bad("POST", EXPLAIN, 422, "invalid_request", ("vit_cx", "'head'", "no spatial"),
                                   explain_json(methods=[{"name": "vit_cx", "params": {"target_layer": "head"}}])),
    "target_true": Bad("POST", EXPLAIN, 422, "invalid_request", ("target", '"top1"', "class index"),
                       explain_json(target=True)),
    "target_float": Bad("POST", EXPLAIN, 422, "invalid_request", ("target", "class label"), explain_json(target=1.5)),
    "target_null": Bad("POST", EXPLAIN, 422, "invalid_request", ("target", "top_k"), explain_json(target=None)),
    "target_list": Bad("POST", EXPLAIN, 422, "invalid_request", ("target",), explain_json(target=[1])),
    "target_index_out_of_range": Bad("POST", EXPLAIN, 422, "invalid_request", ("target", "10"),
                                     explain_json(target=10)),
    "target_negative_index": Bad("POST", EXPLAIN, 422, "invalid_request", ("target", "-1"), explain_json(target=-1)),
    "target_unknown_label": Bad("POST", EXPLAIN, 422, "invalid_request", ("target", "zebra"),
                                explain_json(target="zebra")),
    "target_top_k_zero": Bad("POST", EXPLAIN, 422, "invalid_request", ("target", "top_k", "greater than"),
                             explain_json(target={"top_k": 0})),
    "target_top_k_over_max": Bad("POST", EXPLAIN, 422, "invalid_request", ("target", "top_k", "less than"),
                                 explain_json(target={"top_k": 11})),
    "target_top_k_true": Bad("POST", EXPLAIN, 422, "invalid_request", ("target", "top_k", "integer"),
                             explain_json(target={"top_k": True})),
    "target_object_unknown_key": Bad("POST", EXPLAIN, 422, "invalid_request", ("target", "class"),
                                     explain_json(target={"class": 1})),
    "explain_top_k_true": Bad("POST", EXPLAIN, 422, "invalid_request", ("top_k", "integer"),
                              explain_json(top_k=True)),
    "output_not_an_object": Bad("POST", EXPLAIN, 422, "invalid_request", ("output",), explain_json(output="raw")),
    "output_format_empty": Bad("POST", EXPLAIN, 422, "invalid_request", ("output.format", "at least 1"),
                               explain_json(output={"format": []})),
    "output_format_unknown": Bad("POST", EXPLAIN, 422, "invalid_request", ("output.format.0", "heatmap_png"),
                                 explain_json(output={"format": ["jpeg"]})),
    "output_space_unknown": Bad("POST", EXPLAIN, 422, "invalid_request", ("output.space", "original"),
                                explain_json(output={"space": "pixels"})),
    "output_alpha_too_big": Bad("POST", EXPLAIN, 422, "invalid_request", ("output.alpha", "less than or equal"),
                                explain_json(output={"alpha": 2})),
    "output_alpha_true": Bad("POST", EXPLAIN, 422, "invalid_request", ("output.alpha", "number"),
                             explain_json(output={"alpha": True})),
    "output_max_side_too_small": Bad("POST", EXPLAIN, 422, "invalid_request", ("output.max_side", "8"),
                                     explain_json(output={"max_side": 4})),
    "output_max_side_true": Bad("POST", EXPLAIN, 422, "invalid_request", ("output.max_side", "integer"),
                                explain_json(output={"max_side": True})),
    "output_colormap_unknown": Bad("POST", EXPLAIN, 422, "invalid_request", ("output", "colormap", "nope"),
                                   explain_json(output={"colormap": "nope"})),
    # visualizations
    "visualization_malformed_json": Bad("POST", VISUALIZE, 400, "invalid_json", ("not valid JSON",),
                                        raw(b'{"objective": ')),
    "visualization_deep_json": Bad("POST", VISUALIZE, 400, "invalid_json", ("nested too deeply",), raw(DEEP_ARRAY)),
    "visualization_text_plain": Bad("POST", VISUALIZE, 415, "unsupported_media_type", ("text/plain",),
                                    raw(b"{}", "text/plain")),
    "visualization_array_body": Bad("POST", VISUALIZE, 422, "invalid_request", ("body", "JSON object"),
                                    raw(b"[]")),
    "visualization_objective_missing": Bad("POST", VISUALIZE, 422, "invalid_request", ("objective", "required"),
                                           {"json": {"steps": 1}}),
    "visualization_objective_type_unknown": Bad("POST", VISUALIZE, 422, "invalid_request", ("objective", "neuron"),
                                                visualize(objective={"type": "neuron"})),
    "visualization_class_index_true": Bad("POST", VISUALIZE, 422, "invalid_request",
                                          ("objective.class.index", "integer"),
                                          visualize(objective={"type": "class", "index": True})),
    "visualization_class_index_negative": Bad("POST", VISUALIZE, 422, "invalid_request", ("objective.class.index",),
                                              visualize(objective={"type": "class", "index": -1})),
    "visualization_class_index_out_of_range": Bad("POST", VISUALIZE, 422, "invalid_request", ("10",),
                                                  visualize(objective={"type": "class", "index": 10})),
    "visualization_unknown_layer": Bad("POST", VISUALIZE, 422, "invalid_request", ("nope",),
                                       visualize(objective={"type": "layer", "layer": "nope"})),
    "visualization_steps_zero": Bad("POST", VISUALIZE, 422, "invalid_request", ("steps", "greater than or equal"),
                                    visualize(steps=0)),
    "visualization_steps_true": Bad("POST", VISUALIZE, 422, "invalid_request", ("steps", "integer"),
                                    visualize(steps=True)),
    "visualization_steps_too_many": Bad("POST", VISUALIZE, 422, "invalid_request", ("steps", "less than"),
                                        visualize(steps=10_001)),
    "visualization_lr_zero": Bad("POST", VISUALIZE, 422, "invalid_request", ("lr", "greater than 0"),
                                 visualize(lr=0)),
    "visualization_lr_string": Bad("POST", VISUALIZE, 422, "invalid_request", ("lr", "number"),
                                   visualize(lr="0.1")),
    "visualization_seed_true": Bad("POST", VISUALIZE, 422, "invalid_request", ("seed", "integer"),
                                   visualize(seed=True)),
    "visualization_size_one_side": Bad("POST", VISUALIZE, 422, "invalid_request", ("size", "at least 2"),
                                       visualize(size=[64])),
    "visualization_size_too_small": Bad("POST", VISUALIZE, 422, "invalid_request", ("size.0",),
                                        visualize(size=[4, 4])),
    "visualization_unknown_field": Bad("POST", VISUALIZE, 422, "invalid_request", ("colour", "Extra inputs"),
                                       visualize(colour="red")),
    # routes, models, URLs
    "unknown_model_predict": Bad("POST", "/v1/models/nope/predict", 404, "model_not_found", ("nope",),
                                 upload(good_png())),
    "unknown_model_explain": Bad("POST", "/v1/models/nope/explain", 404, "model_not_found", ("nope",),
                                 explain_json()),
    "unknown_model_visualization": Bad("POST", "/v1/models/nope/visualizations", 404, "model_not_found", ("nope",),
                                       visualize()),
    "unknown_model_info": Bad("GET", "/v1/models/nope", 404, "model_not_found", ("nope",)),
    "unknown_job": Bad("GET", "/v1/jobs/nope", 404, "job_not_found", ("nope",)),
    "unknown_job_delete": Bad("DELETE", "/v1/jobs/nope", 404, "job_not_found", ("nope",)),
    "unknown_path": Bad("GET", "/v3/everything", 404, "not_found", ("Not Found",)),
    "wrong_method_predict": Bad("GET", PREDICT, 405, "method_not_allowed", ("Method Not Allowed",)),
    "wrong_method_healthz": Bad("POST", "/healthz", 405, "method_not_allowed", ("Method Not Allowed",)),
    "url_too_long": Bad("GET", "/v1/models?" + "a" * 10_000, 414, "url_too_long", ("max_url_bytes", "8192")),
}


def assert_error(response: httpx.Response, bad: Bad) -> None:
    assert response.status_code == bad.status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "request_id"}, body
    assert body["error"]["request_id"] == response.headers["x-request-id"], body
    assert body["error"]["code"] == bad.code, body
    for fragment in bad.says:
        assert fragment in body["error"]["message"], (fragment, body)


def test_the_corpus_covers_at_least_sixty_kinds_of_bad_input() -> None:
    assert len(CORPUS) >= 60
    assert {bad.path for bad in CORPUS.values()} >= {PREDICT, EXPLAIN, VISUALIZE}


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(CORPUS))
async def test_bad_input_gets_its_documented_4xx_naming_the_problem(client: httpx.AsyncClient, name: str) -> None:
    bad = CORPUS[name]
    assert_error(await client.request(bad.method, bad.path, **bad.send), bad)


# --- what the corpus cannot show by itself ----------------------------------------------------------------------


@pytest.fixture
def decoded_pixels(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every image whose pixels get decoded (its size), to show that a rejection happens before that step."""
    sizes: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load

    def counting_load(self: ImageFile.ImageFile) -> Any:
        sizes.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    return sizes


@pytest.mark.anyio
@pytest.mark.parametrize("size", [(10_000, 1), (40_000, 1), (40_000_000, 1), (1, 40_000)])
async def test_thin_images_are_refused_from_the_header_without_decoding_or_resizing(
    client: httpx.AsyncClient, decoded_pixels: list[tuple[int, int]], size: tuple[int, int]
) -> None:
    data = bilevel_png(*size)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for _ in range(3):
        response = await client.post(PREDICT, files={"file": ("thin.png", data, "image/png")})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "extreme_aspect_ratio"
    assert decoded_pixels == []  # refused before any pixel was decoded, so before any resize
    # Resizing 10000x1 alone took +2 GB before the bound; the process's peak memory must not move by a tenth of that.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200 * 1024


@pytest.mark.anyio
async def test_a_thin_image_within_the_bound_is_decoded_and_predicted(
    client: httpx.AsyncClient, decoded_pixels: list[tuple[int, int]]
) -> None:
    response = await client.post(PREDICT, files={"file": ("thin.png", bilevel_png(300, 2), "image/png")})
    assert response.status_code == 200, response.text
    assert (300, 2) in decoded_pixels


@pytest.mark.anyio
async def test_max_resized_pixels_is_configurable() -> None:
    # tiny_vit resizes to 32 / 0.9 = 35 px on the short side: 100x10 becomes 350x35 = 12250 pixels.
    settings = settings_for(tiny_vit_config(), device="cpu", max_resized_pixels=12_000)
    async with running_app(settings) as (client, _):
        refused = await client.post(PREDICT, files={"file": ("a.png", bilevel_png(100, 10), "image/png")})
        accepted = await client.post(PREDICT, files={"file": ("a.png", bilevel_png(90, 10), "image/png")})
    assert refused.status_code == 422 and "12000 pixels (max_resized_pixels)" in refused.json()["error"]["message"]
    assert accepted.status_code == 200, accepted.text


@pytest.mark.anyio
@pytest.mark.parametrize("body", [DEEP_ARRAY, DEEP_OBJECT], ids=["array", "object"])
async def test_deep_json_leaves_the_server_usable(client: httpx.AsyncClient, body: bytes) -> None:
    for path in (PREDICT, EXPLAIN, VISUALIZE):
        response = await client.post(path, content=body, headers={"content-type": "application/json"})
        assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_json")
    response = await client.post(PREDICT, json={"image": b64(good_png()), "top_k": 2})
    assert response.status_code == 200 and len(response.json()["predictions"]) == 2


@pytest.mark.anyio
async def test_multipart_fields_are_still_converted_from_text(client: httpx.AsyncClient) -> None:
    response = await client.post(EXPLAIN, files={"file": ("a.png", good_png(), "image/png")},
                                 data={"top_k": "2", "target": "3", "methods": json.dumps(["gradcam"]),
                                       "output": json.dumps({"alpha": 0.25, "max_side": 16})})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["predictions"]) == 2
    assert body["explanations"][0]["results"][0]["target"]["index"] == 3


@pytest.mark.anyio
async def test_multipart_list_fields_may_be_repeated_one_item_per_field(client: httpx.AsyncClient) -> None:
    """What OpenAPI generators and `curl -F methods=a -F methods=b` send: a part per item, an object as JSON text."""
    fields = {"methods": ["gradcam", json.dumps({"name": "rollout", "params": {"head_fusion": "max"}})],
              "target": json.dumps({"top_k": 2}), "output": json.dumps({"format": ["raw"], "space": "tokens"})}
    response = await client.post(EXPLAIN, files=[("file", ("a.png", good_png(), "image/png"))], data=fields)
    assert response.status_code == 200, response.text
    explanations = response.json()["explanations"]
    assert [e["method"] for e in explanations] == ["gradcam", "rollout"]
    assert explanations[1]["params"]["head_fusion"] == "max" and len(explanations[0]["results"]) == 2
    one = await client.post(EXPLAIN, files={"file": ("a.png", good_png(), "image/png")}, data={"methods": "gradcam"})
    assert one.status_code == 200 and [e["method"] for e in one.json()["explanations"]] == ["gradcam"]


@pytest.mark.anyio
async def test_a_field_that_takes_one_value_sent_twice_is_422_naming_it(client: httpx.AsyncClient) -> None:
    response = await client.post(EXPLAIN, files=[("file", ("a.png", good_png(), "image/png"))],
                                 data={"methods": "gradcam", "top_k": ["2", "3"]})
    assert (response.status_code, response.json()["error"]["code"]) == (422, "invalid_request")
    assert response.json()["error"]["message"] == "top_k: sent 2 times; send it once"


@pytest.mark.anyio
async def test_a_file_in_an_option_field_is_400_not_dropped(client: httpx.AsyncClient) -> None:
    response = await client.post(PREDICT, files=[("file", ("a.png", good_png(), "image/png")),
                                                 ("top_k", ("k.txt", b"3", "text/plain"))])
    assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_multipart")
    assert "Maximum number of files is 1" in response.json()["error"]["message"]


@pytest.mark.anyio
@pytest.mark.parametrize("path", [PREDICT, EXPLAIN])
@pytest.mark.parametrize("content_type", ["application/json", None])
async def test_an_empty_body_is_400_saying_what_to_send(
    client: httpx.AsyncClient, path: str, content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = await client.post(path, content=b"", headers=headers)
    assert (response.status_code, response.json()["error"]["code"]) == (400, "empty_body")
    assert "'image'" in response.json()["error"]["message"] and "'file'" in response.json()["error"]["message"]


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_health_probes_answer_head(client: httpx.AsyncClient, path: str) -> None:
    response = await client.head(path)
    assert response.status_code == 200


@pytest.mark.anyio
async def test_a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_closed() -> None:
    settings = settings_for(tiny_vit_config(), device="cpu", body_timeout_s=0.2)
    never = asyncio.Event()

    async def stalled_body() -> AsyncIterator[bytes]:
        yield b'{"image": "'
        await never.wait()  # the client stops sending: the deadline, not this, ends the request
        yield b'"}'

    async with running_app(settings) as (client, _):
        response = await client.post(PREDICT, content=stalled_body(), headers={"content-type": "application/json"})
        assert response.status_code == 408, response.text
        assert response.json()["error"]["code"] == "body_timeout"
        assert "body_timeout_s" in response.json()["error"]["message"]
        assert response.headers["connection"] == "close"
        # the server is unaffected
        assert (await client.post(PREDICT, json={"image": b64(good_png())})).status_code == 200


def test_the_keep_alive_timeout_is_passed_to_uvicorn() -> None:
    from service.cli import uvicorn_options

    options = uvicorn_options(settings_for(tiny_vit_config(), keep_alive_timeout_s=2.5))
    assert options["timeout_keep_alive"] == 2.5
    # uvicorn accepts every option the server passes it
    import uvicorn

    uvicorn.Config(app=lambda *_: None, **options)


@pytest.mark.parametrize("config", [tiny_vit_config, tiny_cnn_config], ids=["vit", "cnn"])
def test_target_layer_candidates_are_the_modules_with_a_spatial_output(config: Callable[[], Any]) -> None:
    from service.http.app import load_models

    served = next(iter(load_models(settings_for(config(), device="cpu")).values()))
    spatial = served.anatomy.spatial_modules
    assert spatial is not None and served.anatomy.feature_layer in spatial
    for head in ("head", "head_drop", "fc", "global_pool", "global_pool.flatten"):  # (B, classes) or (B, C) outputs
        assert head not in spatial
    if served.family == "vit":
        assert {"blocks.0", "blocks.1.norm1", "patch_embed.proj"} <= set(spatial)
        assert "patch_embed" not in spatial  # (B, 16, C): the patch tokens without the class token
    else:
        assert {"layer1", "layer4"} <= set(spatial)


# --- what uvicorn sees before the app: a real server on loopback ------------------------------------------------


@pytest.fixture(scope="module")
def served_port() -> Iterator[int]:
    """A real uvicorn, started with the options `saliency-server serve` passes it, and a short header deadline."""
    from service.cli import uvicorn_options
    from service.http.app import create_app, load_models

    settings = settings_for(tiny_vit_config(), device="cpu", host="127.0.0.1", port=0, header_timeout_s=0.5)
    app = create_app(settings, models=load_models(settings))
    with uvicorn_in_thread(app, **{**uvicorn_options(settings), "log_level": "warning"}) as url:
        yield int(url.rsplit(":", 1)[1])


def exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes and read until the server closes the connection (generous limit: nothing here is timed)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def envelope(response: bytes) -> tuple[int, str, str]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    error = json.loads(body)["error"]
    return int(head.split()[1]), error["code"], error["message"]


def test_a_url_uvicorn_cannot_parse_is_answered_in_the_envelope(served_port: int) -> None:
    response = exchange(served_port, b"GET /healthz?" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    status, code, message = envelope(response)
    assert (status, code) == (400, "invalid_http_request") and "max_url_bytes" in message


def test_a_malformed_request_line_is_answered_in_the_envelope(served_port: int) -> None:
    status, code, _ = envelope(exchange(served_port, b"NOT HTTP AT ALL\r\n\r\n"))
    assert (status, code) == (400, "invalid_http_request")


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"], ids=["nothing", "half_the_headers"])
def test_headers_that_do_not_arrive_in_time_get_408_and_the_connection_closed(served_port: int, sent: bytes) -> None:
    status, code, message = envelope(exchange(served_port, sent))  # the server, not the client, ends the exchange
    assert (status, code) == (408, "header_timeout") and "header_timeout_s" in message


def test_a_prompt_client_is_served_on_a_kept_alive_connection(served_port: int) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    response = exchange(served_port, request + request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert response.count(b"HTTP/1.1 200 OK") == 2, response
