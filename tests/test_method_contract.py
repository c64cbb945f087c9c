"""The contract every registered explanation method keeps, checked on tiny random-weights models of each family it
applies to (as pytorch-grad-cam runs one test over all its CAMs). The cases come from `all_methods()`, so a method
added later is checked too:

- a batch gives each image the maps it gets alone (no method mixes the images of a batch);
- the method's maps are 2-D, finite and of one shape for every image;
- a class-specific method gives different maps for different targets;
- params sent as JSON validate against the schema `GET /v1/methods` lists and come back unchanged;
- every public module of `service.explain.methods` is in the package's explicit import list and registers a method.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import functools
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from service.explain.pipeline import ExplainJob, ExplainOutcome, MethodRequest, run_explain_batch
from service.explain.registry import ExplainMethod, MethodOutput, all_methods
from service.explain.targets import TargetRequest
from service.model.served import ServedModel
from tests.explain_helpers import VIT_VARIANTS, random_pixels, served_model
from tests.helpers import running_app, settings_for, tiny_vit_config

METHODS_DIR = Path(__file__).resolve().parents[1] / "service" / "explain" / "methods"
METHODS = all_methods()

# Fewer steps, samples and masks than the defaults where the defaults are slow; every other param keeps its default.
SMALL_PARAMS: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"steps": 4},
    "smoothgrad": {"samples": 3},
    "vit_cx": {"distance_threshold": 0.5},
}

# One tiny model per family: a ViT with a class token (a 4 x 4 patch grid), and a ResNet (global average pooling, one
# linear layer) at 64 px, where its last feature map is 2 x 2 (at 32 px it is 1 x 1: no spatial map to compare).
MODELS = {"vit": "vit", "cnn": "cnn"}  # contract model -> family
# The middle image asks for its top 2 classes: two target slots, the second with only that image in it.
TARGETS = [TargetRequest(index=1), TargetRequest(top_k=2), TargetRequest(index=7)]
TARGETS_PER_IMAGE = [[1], [None, None], [7]]  # how many targets each image has (top 2: two)
OTHER_TARGET = TargetRequest(index=6)  # compared with TARGETS[0] on the first image
CHUNK_SIZE = 4  # perturbation passes of the batched run mix images


@functools.cache
def contract_models() -> dict[str, ServedModel]:
    return {"vit": served_model(*VIT_VARIANTS["vit"]),
            "cnn": served_model("test_resnet", {"num_classes": 10}, size=64)}


@pytest.fixture(scope="module")
def models() -> dict[str, ServedModel]:
    return contract_models()


def _cases(class_specific_only: bool = False) -> list[Any]:
    """(method, model) for every contract model of a family the method applies to and whose anatomy it accepts
    (cam needs a pooled linear head: the ResNet has one, the class-token ViT not)."""
    return [pytest.param(name, model, id=f"{name}-{model}")
            for name, method in METHODS.items() if method.class_specific or not class_specific_only
            for model, family in MODELS.items()
            if family in method.families and _rejection(method, contract_models()[model]) is None]


def _params(method: ExplainMethod):
    return method.params_model.model_validate(SMALL_PARAMS.get(method.name, {}))


def _rejection(method: ExplainMethod, served: ServedModel) -> str | None:
    """Why the method cannot run on the model with the contract params (its `check` or `needs` says so), or None."""
    params = _params(method)
    try:
        if method.check is not None:
            method.check(params, served.anatomy)
        method.needs(params, served.anatomy)
    except ValueError as exc:
        return str(exc)
    return None


@dataclasses.dataclass
class Run:
    outcomes: list[ExplainOutcome]
    outputs: list[MethodOutput]  # what the method's compute returned, pass by pass, before the pipeline's clean-up


def run(method: ExplainMethod, served: ServedModel, pixels: torch.Tensor, targets: list[TargetRequest]) -> Run:
    """The method through the explain pipeline, one job per image, recording its own outputs."""
    outputs: list[MethodOutput] = []

    def recording(captures, params, anatomy) -> MethodOutput:
        outputs.append(method.compute(captures, params, anatomy))
        return outputs[-1]

    params = _params(method)
    request = MethodRequest(method=dataclasses.replace(method, compute=recording), params=params,
                            needs=method.needs(params, served.anatomy))
    jobs = [ExplainJob(pixels[i], (request,), targets[i]) for i in range(pixels.shape[0])]
    return Run(run_explain_batch(served, jobs, chunk_size=CHUNK_SIZE), outputs)


_runs: dict[tuple[str, str], tuple[Run, list[Run]]] = {}


def batched_and_alone(name: str, model: str, models: dict[str, ServedModel]) -> tuple[Run, list[Run]]:
    """Three images explained as one batch, and each alone (cached: two tests read the same runs)."""
    if (name, model) not in _runs:
        served, method = models[model], METHODS[name]
        pixels = random_pixels(served, 3, seed=11)
        batched = run(method, served, pixels, TARGETS)
        alone = [run(method, served, pixels[i:i + 1], TARGETS[i:i + 1]) for i in range(3)]
        _runs[(name, model)] = (batched, alone)
    return _runs[(name, model)]


def assert_maps_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding relative to the map's scale (batched kernels may sum in another order)."""
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize(("name", "model"), _cases())
def test_batched_maps_equal_per_image_maps(name: str, model: str, models) -> None:
    batched, alone = batched_and_alone(name, model, models)
    for i, single in enumerate(alone):
        got, want = batched.outcomes[i].methods[0], single.outcomes[0].methods[0]
        assert batched.outcomes[i].targets == single.outcomes[0].targets
        expected_maps = len(TARGETS_PER_IMAGE[i]) if METHODS[name].class_specific else 1
        assert len(got.maps) == len(want.maps) == expected_maps
        for slot in range(expected_maps):
            assert_maps_close(got.maps[slot], want.maps[slot])
            if want.layers[slot] is not None:
                assert_maps_close(got.layers[slot], want.layers[slot])
            if want.statistics[slot] is not None:
                assert got.statistics[slot].keys() == want.statistics[slot].keys()
                for key, value in want.statistics[slot].items():
                    assert got.statistics[slot][key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
        assert got.layer_indices == want.layer_indices


@pytest.mark.parametrize(("name", "model"), _cases())
def test_maps_are_2d_finite_and_one_shape_for_every_image(name: str, model: str, models) -> None:
    batched, _ = batched_and_alone(name, model, models)
    # One pass over the 3 images (class-agnostic), or one per target slot: 3 images, then the one with a 2nd target.
    passes = [3, 1] if METHODS[name].class_specific else [3]
    assert [output.maps.shape[0] for output in batched.outputs] == passes
    for output in batched.outputs:  # the method's own tensors, before the pipeline replaces NaN and infinities
        assert output.maps.ndim == 3 and output.maps.shape[1] > 0 and output.maps.shape[2] > 0, output.maps.shape
        assert torch.isfinite(output.maps).all()
        if output.layers is not None:
            assert output.layers.ndim == 4 and output.layers.shape[0] == output.maps.shape[0]
            assert torch.isfinite(output.layers).all()
    maps = [outcome.methods[0].maps[0] for outcome in batched.outcomes]
    assert all(m.ndim == 2 for m in maps)
    assert len({tuple(m.shape) for m in maps}) == 1, [tuple(m.shape) for m in maps]


@pytest.mark.parametrize(("name", "model"), _cases(class_specific_only=True))
def test_different_targets_give_different_maps(name: str, model: str, models) -> None:
    served, method = models[model], METHODS[name]
    pixels = random_pixels(served, 1, seed=12)
    first, other = (run(method, served, pixels, [target]).outcomes[0] for target in (TARGETS[0], OTHER_TARGET))
    assert first.targets != other.targets
    first_map, other_map = first.methods[0].maps[0], other.methods[0].maps[0]
    assert first_map.abs().max() > 0 or other_map.abs().max() > 0, "both maps are zero"
    assert not torch.allclose(first_map, other_map)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_applies_to_a_contract_model(name: str, models) -> None:
    """A method skipped on one model (its check rejects it) still runs on another: none is left unchecked."""
    method = METHODS[name]
    applicable = [model for model, family in MODELS.items()
                  if family in method.families and _rejection(method, models[model]) is None]
    assert applicable, f"{name} runs on none of the contract models {list(MODELS)}"


@pytest.fixture(scope="module")
def listed_methods() -> dict[str, dict]:
    """`GET /v1/methods` of a running app, by method name."""

    async def get() -> dict[str, dict]:
        async with running_app(settings_for(tiny_vit_config())) as (client, _):
            response = await client.get("/v1/methods")
        assert response.status_code == 200, response.text
        return {m["name"]: m for m in response.json()["methods"]}

    return asyncio.run(get())


@pytest.mark.parametrize("name", list(METHODS))
def test_params_round_trip_through_the_listed_schema(name: str, listed_methods) -> None:
    """Params as a client sends them (JSON) validate against the schema `GET /v1/methods` lists, and come back
    through the params model unchanged: the defaults, and the non-default params this contract runs with."""
    params_model, schema = METHODS[name].params_model, listed_methods[name]["params_schema"]
    for params in (params_model(), _params(METHODS[name])):
        sent = params.model_dump(mode="json")
        jsonschema.validate(sent, schema)
        assert params_model.model_validate(sent) == params


@pytest.mark.parametrize("name", list(METHODS))
def test_default_params_round_trip_through_the_methods_schema(name: str, listed_methods) -> None:
    """Every param has a default in the schema (a method can be asked for by name alone), and those defaults
    validate back to the params model's own defaults."""
    params_model = METHODS[name].params_model
    properties = listed_methods[name]["params_schema"].get("properties", {})
    assert all("default" in spec for spec in properties.values()), properties
    defaults = {field: spec["default"] for field, spec in properties.items()}
    assert params_model.model_validate(defaults) == params_model()


def test_small_params_name_registered_methods() -> None:
    assert set(SMALL_PARAMS) <= set(METHODS)


def listed_modules() -> list[str]:
    """The modules imported by name in `service/explain/methods/__init__.py`."""
    tree = ast.parse((METHODS_DIR / "__init__.py").read_text(encoding="utf-8"))
    names = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module == "service.explain.methods"
                                                  or (node.level == 1 and node.module is None)):
            names += [alias.name for alias in node.names]
    return names


PUBLIC_MODULES = sorted(p.stem for p in METHODS_DIR.glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_method_module_is_listed_in_the_package_and_registers_a_method(module: str) -> None:
    assert module in listed_modules(), f"service/explain/methods/{module}.py is missing from the list in __init__.py"
    registered = [m.name for m in METHODS.values() if m.compute.__module__ == f"service.explain.methods.{module}"]
    assert registered, f"service/explain/methods/{module}.py registers no method"


def test_the_package_lists_only_method_modules() -> None:
    listed = listed_modules()
    assert sorted(listed) == PUBLIC_MODULES and len(set(listed)) == len(listed)
