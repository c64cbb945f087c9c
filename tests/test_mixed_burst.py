"""A mixed burst with known answers (benchmarks/burst.py): distinct images, predictions and explanations with several
methods and targets on two models, all in flight at once; every answer equals the one computed beforehand in process,
image by image. Zero lost, zero mismatched."""

from __future__ import annotations

import pytest
import torch

from benchmarks.burst import BurstCase, expected_answer, image_bytes, mismatches, plan, run_burst, tiny_models
from service.config import ModelConfig
from tests.helpers import load_models, running_app, settings_for

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def burst():
    settings = settings_for(*(ModelConfig(**m) for m in tiny_models()))
    torch.manual_seed(0)
    models = load_models(settings)
    cases = plan(48, {i: s.family for i, s in models.items()}, seed=3)
    expected = {c.number: expected_answer(c, models[c.model_id], image_bytes(c.image_seed)) for c in cases}
    return settings, models, cases, expected


def test_the_burst_mixes_models_endpoints_methods_and_targets(burst) -> None:
    _, _, cases, _ = burst
    assert {c.model_id for c in cases} == {"burst_vit", "burst_cnn"}
    assert {c.endpoint for c in cases} == {"predict", "explain"}
    assert len({str(c.target) for c in cases if c.endpoint == "explain"}) >= 3
    assert len({str(c.methods) for c in cases if c.endpoint == "explain"}) >= 5
    assert len({c.image_seed for c in cases}) == len(cases)


async def test_a_burst_answers_every_request_with_its_own_answer(burst) -> None:
    settings, models, cases, expected = burst
    async with running_app(settings, models) as (client, _):
        report = await run_burst(client, cases, expected, concurrency=16)
    assert report.lost == [] and report.mismatched == [] and report.answered == len(cases)


def test_an_answer_for_another_image_is_reported_as_mismatched(burst) -> None:
    """The checker itself: the expected answer of one image does not pass for another's."""
    _, models, _, _ = burst
    case = BurstCase(0, "burst_cnn", "explain", image_seed=5, methods=["gradcam", "saliency"], target={"top_k": 2})
    other = expected_answer(BurstCase(0, "burst_cnn", "explain", image_seed=6, methods=["gradcam", "saliency"],
                                      target={"top_k": 2}), models["burst_cnn"], image_bytes(6))
    right = expected_answer(case, models["burst_cnn"], image_bytes(5))
    answer = {"predictions": [{"index": i, "probability": p} for i, p in other.top], "explanations": [
        {"method": name, "results": [
            {"target": {"index": t}, "map": {"raw": _raw(other.maps[(m, slot)])}} for slot, t in enumerate(other.targets)
        ]} for m, name in enumerate(["gradcam", "saliency"])]}
    assert mismatches(case, 200, answer, right)
    assert mismatches(case, 503, {"error": {"code": "queue_full"}}, right)


def _raw(values) -> dict:
    import base64

    import numpy as np

    array = np.asarray(values, dtype="<f4")
    return {"shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode("ascii")}
