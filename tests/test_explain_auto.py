"""The `auto` method: each image's map is the candidate with the best deletion/insertion score, the candidates' scores
equal evaluating their own maps through `evaluate`, every candidate is named with its params, invalid candidates are
422 naming them, and its cost counts every candidate and the scoring passes."""

from __future__ import annotations

import base64
from typing import Any, AsyncIterator

import httpx
import numpy as np
import pytest

from tests.helpers import png_bytes, random_image, running_app, settings_for, tiny_cnn_config, tiny_vit_config

ROLLOUTS = [{"name": "rollout", "params": {"head_fusion": fusion}} for fusion in ("mean", "max", "min")]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def client() -> AsyncIterator[httpx.AsyncClient]:
    settings = settings_for(tiny_vit_config(max_request_cost=2000), tiny_cnn_config(max_request_cost=2000),
                            device="cpu")
    async with running_app(settings) as (http, _):
        yield http


async def explain(client: httpx.AsyncClient, model: str, seed: int, **fields: Any) -> dict[str, Any]:
    body = {"image": base64.b64encode(png_bytes(random_image(seed))).decode(),
            "output": {"format": ["raw"], "space": "tokens"}, **fields}
    response = await client.post(f"/v1/models/{model}/explain", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def raw(result: dict[str, Any]) -> np.ndarray:
    data = result["map"]["raw"]
    return np.frombuffer(base64.b64decode(data["data"]), dtype="<f4").reshape(data["shape"])


@pytest.mark.anyio
@pytest.mark.parametrize("seed", [1, 2])
async def test_the_map_is_the_best_candidate_s_and_scores_equal_evaluating_each_candidate(
    client: httpx.AsyncClient, seed: int
) -> None:
    """With 16 steps, auto scores candidates exactly as `evaluate` scores the same maps requested on their own."""
    auto = {"name": "auto", "params": {"candidates": ROLLOUTS, "steps": 16}}
    body = await explain(client, "tiny_vit", seed, methods=[auto, *ROLLOUTS], target={"top_k": 2},
                         evaluate=["deletion", "insertion"])
    auto_result, *candidates = body["explanations"]
    assert len(auto_result["results"]) == 2  # class-specific: one choice per target
    for slot, result in enumerate(auto_result["results"]):
        selection = result["selection"]
        assert selection["steps"] == 16 and selection["score_rule"] == "insertion_minus_deletion"
        rows = selection["candidates"]
        assert [(r["method"], r["params"]["head_fusion"]) for r in rows] == [("rollout", f) for f in
                                                                              ("mean", "max", "min")]
        for row, candidate in zip(rows, candidates):
            (own,) = candidate["results"]  # class-agnostic: one map, evaluated for the first target...
            evaluation = own["evaluation"]
            if slot == 0:  # ...which is auto's first target
                assert row["deletion"] == pytest.approx(evaluation["deletion"], abs=1e-5)
                assert row["insertion"] == pytest.approx(evaluation["insertion"], abs=1e-5)
            assert row["score"] == pytest.approx(row["insertion"] - row["deletion"], abs=1e-9)
        best = max(range(len(rows)), key=lambda i: rows[i]["score"])
        assert selection["winner"] == best
        np.testing.assert_array_equal(raw(result), raw(candidates[best]["results"][0]))


@pytest.mark.anyio
async def test_cnn_defaults_mix_grids_by_upsampling_to_the_finest(client: httpx.AsyncClient) -> None:
    body = await explain(client, "tiny_cnn", 3, methods=["auto", "saliency", "gradcam"])
    result = body["explanations"][0]["results"][0]
    names = [row["method"] for row in result["selection"]["candidates"]]
    assert names == ["gradcam", "gradcam_pp", "layercam", "saliency", "input_x_gradient"]
    saliency, gradcam = (raw(e["results"][0]) for e in body["explanations"][1:])
    assert raw(result).shape == saliency.shape != gradcam.shape  # the gradient maps' input grid is the finest
    winner = names[result["selection"]["winner"]]
    if winner == "saliency":
        np.testing.assert_array_equal(raw(result), saliency)


@pytest.mark.anyio
async def test_the_score_rule_decides_the_winner(client: httpx.AsyncClient) -> None:
    for rule, key in (("insertion", lambda r: r["insertion"]), ("deletion", lambda r: -r["deletion"])):
        auto = {"name": "auto", "params": {"candidates": ROLLOUTS, "score": rule}}
        selection = (await explain(client, "tiny_vit", 4, methods=[auto]))["explanations"][0]["results"][0]["selection"]
        rows = selection["candidates"]
        assert selection["winner"] == max(range(len(rows)), key=lambda i: key(rows[i])), rule


@pytest.mark.anyio
@pytest.mark.parametrize(("candidates", "message"), [
    ([{"name": "auto"}], "methods[0] (auto): candidates[0].name: 'auto' is not a method auto can choose"),
    ([{"name": "nope"}], "candidates[0].name: 'nope' is not a method auto can choose"),
    ([{"name": "gradcam"}, {"name": "rollout"}], "candidates[1]: 'rollout' does not apply to cnn models"),
    ([{"name": "gradcam", "params": {"target_layer": 3}}], "candidates[0].params.target_layer"),
])
async def test_invalid_candidates_are_422_naming_them(
    client: httpx.AsyncClient, candidates: list[dict[str, Any]], message: str
) -> None:
    response = await client.post("/v1/models/tiny_cnn/explain", json={
        "image": base64.b64encode(png_bytes(random_image(5))).decode(),
        "methods": [{"name": "auto", "params": {"candidates": candidates}}]})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"
    assert message in response.json()["error"]["message"]


@pytest.mark.anyio
async def test_its_cost_counts_the_candidates_and_their_scoring(client: httpx.AsyncClient) -> None:
    listed = {m["name"]: m for m in (await client.get("/v1/methods")).json()["methods"]}["auto"]
    assert listed["class_specific"] and listed["families"] == ["vit", "cnn"]
    assert "candidates x 2 x (steps + 1)" in listed["cost_formula"]
    response = await client.post("/v1/models/tiny_vit/explain", json={
        "image": base64.b64encode(png_bytes(random_image(6))).decode(), "target": {"top_k": 10},
        "methods": [{"name": "auto", "params": {"candidates": ROLLOUTS * 4, "steps": 32}}]})
    assert response.status_code == 422 and response.json()["error"]["code"] == "over_budget"
    # 12 candidates x 2 x 33 scoring passes, plus their own cost, for each of 10 targets
    assert "792 scoring passes) x 10 target(s)" in response.json()["error"]["message"]
