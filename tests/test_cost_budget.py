"""Cost estimates and budgets: each method's estimate grows with what it spends (steps, samples, masks, tokens,
targets); explain requests over the model's max_request_cost, responses over max_response_bytes and visualization
jobs over max_job_cost get 422 over_budget naming the estimate and the limit, before any work is queued."""

from __future__ import annotations

import json
import re

import pytest
import timm

from service.config import ServerSettings
from service.explain.registry import CostContext, all_methods
from service.explain.requests import module_channels, response_bytes
from service.http.responses import REFERENCE_CONTEXT
from service.model.anatomy import ModelAnatomy
from service.visualization.jobs import STEP_COST, job_cost
from api_schemas import VisualizationRequest
from tests.helpers import (
    load_models,
    png_bytes,
    random_image,
    running_app,
    settings_for,
    tiny_cnn_config,
    tiny_vit_config,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def vit_anatomy(depth: int = 12, grid: tuple[int, int] = (14, 14)) -> ModelAnatomy:
    return ModelAnatomy(
        family="vit", attention_modules=tuple(f"blocks.{i}.attn" for i in range(depth)), num_prefix_tokens=1,
        has_class_token=True, grid_size=grid, feature_layer=f"blocks.{depth - 1}.norm1",
        module_names=frozenset(f"blocks.{i}.norm1" for i in range(depth)),
    )


def context(targets: int = 1, channels: int = 192, anatomy: ModelAnatomy | None = None) -> CostContext:
    return CostContext(anatomy=anatomy or vit_anatomy(), targets=targets, layer_channels=lambda name: channels)


def units(method: str, params: dict | None = None, ctx: CostContext | None = None) -> float:
    entry = all_methods()[method]
    return entry.estimate_cost(entry.params_model.model_validate(params or {}), ctx or context()).units


# --- estimates ---------------------------------------------------------------------------------------------------

def test_integrated_gradients_costs_two_and_a_half_passes_per_step_per_target_plus_the_baseline() -> None:
    assert units("integrated_gradients", {"steps": 32}) == 2.5 * 32 + 1
    assert units("integrated_gradients", {"steps": 64}) == 2.5 * 64 + 1
    assert units("integrated_gradients", {"steps": 64}, context(targets=3)) == 3 * (2.5 * 64 + 1)
    assert units("integrated_gradients", {"steps": 64, "integration": "riemann_trapezoid"}) == 2.5 * 64


def test_smoothgrad_cost_is_proportional_to_samples_and_targets() -> None:
    assert units("smoothgrad", {"samples": 10}) == pytest.approx(26.0)
    assert units("smoothgrad", {"samples": 40}) == pytest.approx(4 * 26.0)
    assert units("smoothgrad", {"samples": 40}, context(targets=5)) == pytest.approx(5 * 4 * 26.0)


def test_vit_cx_cost_is_bounded_by_the_target_layers_channels_and_halved_without_noise_correction() -> None:
    narrow, wide = units("vit_cx", ctx=context(channels=32)), units("vit_cx", ctx=context(channels=768))
    assert narrow == pytest.approx(2.7 * 32) and wide == pytest.approx(2.7 * 768)
    assert units("vit_cx", {"noise_correction": False}, context(channels=32)) == pytest.approx(2.7 * 32 / 2)
    assert units("vit_cx", ctx=context(targets=2, channels=32)) == pytest.approx(2 * 2.7 * 32)


def test_value_zeroing_cost_grows_with_tokens_and_with_the_blocks_it_recomputes() -> None:
    last = units("value_zeroing")
    assert last == pytest.approx(197 / 12 + 1)
    assert units("value_zeroing", {"aggregate": "rollout"}) == pytest.approx(12 * 197 / 12 + 1)
    assert units("value_zeroing", {"aggregate": "rollout", "layer": 5}) == pytest.approx(6 * 197 / 12 + 1)
    bigger = units("value_zeroing", ctx=context(anatomy=vit_anatomy(grid=(28, 28))))
    assert bigger == pytest.approx(785 / 12 + 1) and bigger > last
    assert units("value_zeroing", ctx=context(targets=4)) == last  # class-agnostic: one map whatever the targets


def test_attention_flow_cost_grows_with_tokens_and_shrinks_with_discard_ratio() -> None:
    default = units("attention_flow")
    assert default == pytest.approx(60.0)  # the measured reference: deit-tiny at 224, discard_ratio 0.5
    assert units("attention_flow", {"discard_ratio": 0.0}) == pytest.approx(120.0)
    assert units("attention_flow", {"discard_ratio": 0.9}) < default / 4
    # discarding nearly every edge does not make the graph, the rollout or one max-flow per patch free
    assert units("attention_flow", {"discard_ratio": 0.9999}) == pytest.approx(default / 5)
    assert units("attention_flow", ctx=context(anatomy=vit_anatomy(grid=(28, 28)))) > 30 * default
    assert units("attention_flow", ctx=context(anatomy=vit_anatomy(depth=2, grid=(4, 4)))) == pytest.approx(1.15)


def test_cheap_methods_cost_their_relative_cost_once_per_target_when_class_specific() -> None:
    for name, method in all_methods().items():
        if name in {"auto", "integrated_gradients", "smoothgrad", "vit_cx", "value_zeroing", "attention_flow",
                    "norm_attention"}:
            continue
        one, three = units(name), units(name, ctx=context(targets=3))
        assert one == method.relative_cost, name
        assert three == (3 * one if method.class_specific else one), name
    assert units("norm_attention", {"aggregate": "rollout"}) > units("norm_attention")


def test_attention_layers_counts_one_map_per_chosen_layer_besides_the_main_map() -> None:
    method = all_methods()["attention_layers"]
    every = method.estimate_cost(method.params_model(), context())
    two = method.estimate_cost(method.params_model(layers=[0, -1]), context())
    assert (every.maps, two.maps) == (13, 3)


def test_module_channels_reads_the_width_of_a_layer_from_its_last_sized_module() -> None:
    resnet = timm.create_model("resnet50", pretrained=False)
    channels = module_channels(resnet)
    assert channels("layer4") == 2048 and channels("layer1") == 256 and channels("conv1") == 64
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
    assert module_channels(vit)("blocks.1.norm1") == 192
    assert module_channels(vit)("no.such.module") == 1000  # unknown: the widest output (here the 1000-class head)


def test_response_size_is_maps_times_formats_times_pixels_base64_encoded() -> None:
    one = response_bytes(1, ["heatmap_png"], 100 * 100)
    assert one >= 100 * 100 * 4 * 4 / 3
    assert response_bytes(6, ["heatmap_png"], 100 * 100) == pytest.approx(6 * one, abs=6)
    assert response_bytes(1, ["heatmap_png", "raw"], 100 * 100) > 1.9 * one
    assert response_bytes(1, ["heatmap_png"], 200 * 200) > 3.9 * one


def test_the_default_budget_admits_every_methods_defaults_for_one_target_but_vit_cx_on_a_wide_layer() -> None:
    limit = ServerSettings().max_request_cost
    over = {name for name, m in all_methods().items()
            if m.estimate_cost(m.params_model(), REFERENCE_CONTEXT).units > limit}
    assert over == {"vit_cx"}  # up to 192 masks on deit-tiny: a narrower target_layer or a raised budget
    assert units("integrated_gradients", ctx=context(targets=2)) > limit  # defaults for two targets: refused


# --- over HTTP ---------------------------------------------------------------------------------------------------

class QueueSpy:
    """Records every job submitted to a model's batch queue."""

    def __init__(self, app, model_id: str) -> None:
        self.jobs: list[object] = []
        queue = app.state.service.queues[model_id]
        original = queue.submit

        async def submit(payload, *args, **kwargs):
            self.jobs.append(payload)
            return await original(payload, *args, **kwargs)

        queue.submit = submit


async def explain(client, data: bytes, model: str = "tiny_vit", **options):
    fields = {k: v if isinstance(v, str) else json.dumps(v) for k, v in options.items()}
    return await client.post(f"/v1/models/{model}/explain", files={"file": ("x.png", data, "image/png")},
                             data=fields)


def error_of(response) -> dict:
    return response.json()["error"]


@pytest.fixture(scope="module")
async def budget_app():
    settings = settings_for(
        tiny_vit_config(max_request_cost=50.0), tiny_vit_config("roomy_vit", max_request_cost=1000.0),
        tiny_cnn_config(), cpu_workers=1, max_request_cost=40.0, max_response_bytes=2_000_000,
    )
    models = load_models(settings)
    async with running_app(settings, models) as (client, app):
        yield client, app


async def test_over_budget_explain_gets_422_naming_estimate_limit_and_the_driving_param(budget_app) -> None:
    client, app = budget_app
    spy = QueueSpy(app, "tiny_vit")
    methods = ["gradcam", {"name": "integrated_gradients", "params": {"steps": 40}}]
    response = await explain(client, png_bytes(random_image(0)), methods=methods, target={"top_k": 2})
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["code"] == "over_budget"
    estimate = 2 * 1.25 + 2 * (2.5 * 40 + 1)
    assert f"estimated cost {estimate:.4g}" in error["message"] and "max_request_cost 50" in error["message"]
    assert "methods[1] integrated_gradients" in error["message"] and "steps=40" in error["message"]
    assert "2 target(s)" in error["message"]
    assert spy.jobs == []


async def test_budget_is_checked_before_the_image_is_decoded(budget_app) -> None:
    client, app = budget_app
    spy = QueueSpy(app, "tiny_vit")
    response = await explain(client, b"not an image at all", methods=[{"name": "smoothgrad",
                                                                       "params": {"samples": 100}}])
    assert response.status_code == 422 and error_of(response)["code"] == "over_budget"
    assert "samples=100" in error_of(response)["message"]
    assert spy.jobs == []


async def test_a_request_within_budget_is_queued_and_answered(budget_app) -> None:
    client, app = budget_app
    spy = QueueSpy(app, "tiny_vit")
    response = await explain(client, png_bytes(random_image(1)),
                             methods=[{"name": "integrated_gradients", "params": {"steps": 19}}])  # 48.5 of 50
    assert response.status_code == 200, response.text
    assert len(spy.jobs) == 1


async def test_a_models_max_request_cost_overrides_the_servers(budget_app) -> None:
    client, _ = budget_app
    methods = [{"name": "integrated_gradients", "params": {"steps": 30}}]  # 76
    image = png_bytes(random_image(2))
    refused = await explain(client, image, methods=methods)
    accepted = await explain(client, image, "roomy_vit", methods=methods)
    assert refused.status_code == 422 and "max_request_cost 50" in error_of(refused)["message"]
    assert accepted.status_code == 200, accepted.text
    by_server_default = await explain(client, image, "tiny_cnn", methods=[{"name": "smoothgrad",
                                                                           "params": {"samples": 16}}])  # 41.6
    assert by_server_default.status_code == 422
    assert "max_request_cost 40" in error_of(by_server_default)["message"]


async def test_vit_cx_is_budgeted_by_the_channels_of_its_target_layer(budget_app) -> None:
    client, _ = budget_app
    image = png_bytes(random_image(3))
    # the tiny ViT's blocks have 32 channels: 2.7 x 32 = 86.4 forward passes, over its 50
    response = await explain(client, image, methods=["vit_cx"])
    assert response.status_code == 422
    assert "up to 32 masks (the channels of blocks.1.norm1)" in error_of(response)["message"]
    halved = await explain(client, image, methods=[{"name": "vit_cx", "params": {"noise_correction": False}}])
    assert halved.status_code == 200, halved.text  # 43.2


async def test_response_size_over_max_response_bytes_is_refused_naming_estimate_and_limit(budget_app) -> None:
    client, app = budget_app
    spy = QueueSpy(app, "tiny_vit")
    options = {"methods": ["rollout"], "output": {"format": ["heatmap_png", "raw"], "max_side": 2048}}
    small = await explain(client, png_bytes(random_image(4, size=(64, 48))), **options)
    assert small.status_code == 200, small.text
    large = await explain(client, png_bytes(random_image(5, size=(600, 500))), **options)
    assert large.status_code == 422, large.text
    message = error_of(large)["message"]
    assert error_of(large)["code"] == "over_budget"
    assert re.search(r"estimated response size \d+ bytes exceeds max_response_bytes 2000000", message)
    assert "600x500 pixels" in message and "2 format(s)" in message
    assert len(spy.jobs) == 1  # only the small image's request reached the queue


async def test_response_size_in_input_space_is_checked_before_decoding(budget_app) -> None:
    client, app = budget_app
    spy = QueueSpy(app, "roomy_vit")
    # 12 x gradcam x 10 targets = 120 maps of the 32x32 input in 4 formats: about 2.2 MB, over 2 MB
    options = {"methods": ["gradcam"] * 12, "target": {"top_k": 10},
               "output": {"format": ["heatmap_png", "overlay_png", "gray_png", "raw"], "space": "input"}}
    response = await explain(client, b"garbage", "roomy_vit", **options)
    assert response.status_code == 422 and error_of(response)["code"] == "over_budget"
    message = error_of(response)["message"]
    assert "120 map(s) x 4 format(s)" in message and "32x32 pixels" in message
    assert spy.jobs == []
    fewer = {**options, "target": {"top_k": 5}}
    assert (await explain(client, png_bytes(random_image(6)), "roomy_vit", **fewer)).status_code == 200
    assert len(spy.jobs) == 1


# --- visualization jobs ------------------------------------------------------------------------------------------

def test_job_cost_is_three_passes_per_step_scaled_by_the_image_area() -> None:
    assert STEP_COST == 3.0
    at_input = job_cost(VisualizationRequest.model_validate({"objective": {"type": "class", "index": 0},
                                                             "steps": 100}), (224, 224))[0]
    doubled = job_cost(VisualizationRequest.model_validate({"objective": {"type": "class", "index": 0},
                                                            "steps": 100, "size": [448, 448]}), (224, 224))[0]
    assert at_input == 300.0 and doubled == 4 * at_input


async def test_visualization_job_over_max_job_cost_is_refused_before_it_is_created() -> None:
    settings = settings_for(tiny_vit_config(max_job_cost=300.0), cpu_workers=1)
    models = load_models(settings)
    async with running_app(settings, models) as (client, _):
        forwards = [0]
        models["tiny_vit"].active_network.register_forward_pre_hook(
            lambda _m, _i: forwards.__setitem__(0, forwards[0] + 1))
        base = {"objective": {"type": "class", "index": 3}}
        refused = await client.post("/v1/models/tiny_vit/visualizations", json={**base, "steps": 101})
        assert refused.status_code == 422, refused.text
        message = error_of(refused)["message"]
        assert error_of(refused)["code"] == "over_budget"
        assert "estimated cost 303 forward passes" in message and "max_job_cost 300" in message
        assert "steps=101" in message
        bigger = await client.post("/v1/models/tiny_vit/visualizations", json={**base, "steps": 50, "size": [64, 64]})
        assert bigger.status_code == 422 and "size 64x64 / input 32x32" in error_of(bigger)["message"]
        assert forwards[0] == 0  # no shape probe, no step
        assert (await client.get("/v1/jobs")).json()["jobs"] == []
        accepted = await client.post("/v1/models/tiny_vit/visualizations", json={**base, "steps": 100})
        assert accepted.status_code == 202, accepted.text


# --- the catalogue -----------------------------------------------------------------------------------------------

async def test_methods_catalogue_shows_each_methods_cost_formula_and_reference_estimate(budget_app) -> None:
    client, _ = budget_app
    methods = {m["name"]: m for m in (await client.get("/v1/methods")).json()["methods"]}
    assert methods["integrated_gradients"]["reference_cost"] == 2.5 * 32 + 1
    assert "steps" in methods["integrated_gradients"]["cost_formula"]
    assert methods["smoothgrad"]["reference_cost"] == pytest.approx(2.6 * 25)
    assert "samples" in methods["smoothgrad"]["cost_formula"]
    assert methods["vit_cx"]["reference_cost"] == pytest.approx(2.7 * 192)
    assert "channel" in methods["vit_cx"]["cost_formula"]
    assert methods["gradcam"]["cost_formula"] == "1.25 x targets" and methods["rollout"]["cost_formula"] == "1.3"
    assert all(m["reference_cost"] > 0 and m["relative_cost"] > 0 for m in methods.values())
