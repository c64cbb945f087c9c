"""Weights sources: package (real ImageNet weights), file, random fallback, and the hub through a local cache."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import timm
import torch
from safetensors.torch import save_file
from skimage import data as skdata

from service.config import ModelConfig
from service.model.weights import WeightsUnavailableError, create_model_with_weights
from tests.helpers import TINY_VIT_KWARGS, png_bytes, running_app, settings_for

ROOT = Path(__file__).resolve().parents[1]


def tiny_state_dict(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT_KWARGS)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.mark.anyio
async def test_efficientnet_lite0_package_weights_classify_real_photos() -> None:
    config = ModelConfig(id="effnet", architecture="tf_efficientnet_lite0", weights="package:efficientnet-lite0",
                         max_batch_size=2, warmup_batch_sizes=[1])
    async with running_app(settings_for(config)) as (client, _):
        coffee = await client.post("/v1/models/effnet/predict", files={"file": ("c.png", png_bytes(skdata.coffee()))})
        cat = await client.post("/v1/models/effnet/predict", files={"file": ("c.png", png_bytes(skdata.chelsea()))})
    top_coffee = coffee.json()["predictions"][0]
    top_cat = cat.json()["predictions"][0]
    assert top_coffee["index"] == 967 and top_coffee["label"] == "espresso" and top_coffee["probability"] > 0.9
    assert 281 <= top_cat["index"] <= 285, top_cat
    assert coffee.json()["weights"] == {"source": "package:efficientnet-lite0", "random": False, "note": None}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_file_weights_load_exactly(tmp_path: Path, suffix: str) -> None:
    state = tiny_state_dict(seed=3)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    config = ModelConfig(id="m", architecture="vit_tiny_patch16_224", weights=f"file:{path}",
                         model_kwargs=TINY_VIT_KWARGS)
    model, outcome = create_model_with_weights(config)
    assert outcome.random is False and outcome.source == f"file:{path}"
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key])


@pytest.mark.parametrize("layout", ["state_dict_and_ema", "model_and_args", "model_state_dict", "ddp_prefix"])
def test_training_checkpoints_serve_their_plain_weights_never_the_ema_copy(tmp_path: Path, layout: str) -> None:
    state, ema = tiny_state_dict(seed=5), tiny_state_dict(seed=6)
    checkpoint = {
        "state_dict_and_ema": {"state_dict": state, "state_dict_ema": ema, "model_ema": ema},
        "model_and_args": {"model": state, "model_ema": ema, "args": argparse.Namespace(lr=0.1), "epoch": 3},
        "model_state_dict": {"epoch": 3, "model_state_dict": state, "optimizer_state_dict": {"param_groups": []}},
        "ddp_prefix": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
    }[layout]
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    config = ModelConfig(id="m", architecture="vit_tiny_patch16_224", weights=f"file:{path}",
                         model_kwargs=TINY_VIT_KWARGS)
    model, outcome = create_model_with_weights(config)
    assert outcome.random is False
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key])


def test_a_file_without_a_state_dict_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pth"
    torch.save(torch.ones(3), path)
    config = ModelConfig(id="odd", architecture="vit_tiny_patch16_224", weights=f"file:{path}",
                         model_kwargs=TINY_VIT_KWARGS)
    with pytest.raises(WeightsUnavailableError, match="does not hold a state dict of tensors"):
        create_model_with_weights(config)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_file_weights_never_unpickle_arbitrary_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"weight": Exploit()}, f)
    config = ModelConfig(id="evil", architecture="vit_tiny_patch16_224", weights=f"file:{path}",
                         model_kwargs=TINY_VIT_KWARGS)
    with pytest.raises(WeightsUnavailableError, match="weights_only|Unsupported|global"):
        create_model_with_weights(config)


def test_unobtainable_weights_fail_naming_model_and_source_unless_fallback_random(tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    config = ModelConfig(id="broken", architecture="vit_tiny_patch16_224", weights=f"file:{missing}",
                         model_kwargs=TINY_VIT_KWARGS)
    with pytest.raises(WeightsUnavailableError) as error:
        create_model_with_weights(config)
    assert "'broken'" in str(error.value) and f"file:{missing}" in str(error.value)

    hub_config = ModelConfig(id="hubby", architecture="test_vit.no_such_tag", weights="hub", fallback="random")
    model, outcome = create_model_with_weights(hub_config)
    assert outcome.random is True and outcome.source == "hub" and "RANDOM" in (outcome.note or "")
    assert isinstance(model, torch.nn.Module)


def test_mismatched_state_dict_is_refused(tmp_path: Path) -> None:
    state = tiny_state_dict(seed=1)
    state.pop("head.weight")
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    config = ModelConfig(id="partial", architecture="vit_tiny_patch16_224", weights=f"file:{path}",
                         model_kwargs=TINY_VIT_KWARGS)
    with pytest.raises(WeightsUnavailableError, match="head.weight"):
        create_model_with_weights(config)


def build_hf_cache(hf_home: Path, repo_id: str, state: dict[str, torch.Tensor]) -> None:
    """Lay out a Hugging Face hub cache holding `model.safetensors` for `repo_id`, as a download would."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "model.safetensors"))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(config_path: Path, env: dict[str, str], port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--config", str(config_path), "--port", str(port)],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_hub_weights_load_from_a_local_cache_offline_through_the_cli(tmp_path: Path) -> None:
    torch.manual_seed(11)
    reference = timm.create_model("test_vit")
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    build_hf_cache(tmp_path / "hf", "timm/test_vit.r160_in1k", state)
    config = tmp_path / "config.toml"
    config.write_text('[[models]]\nid = "hubvit"\narchitecture = "test_vit.r160_in1k"\nweights = "hub"\n'
                      "max_batch_size = 2\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "SALIENCY_DRAIN_S": "0"}
    port = free_port()
    server = start_server(config, env, port)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stdout.read()
            time.sleep(0.1)
        models = httpx.get(f"{base}/v1/models").json()["models"]
        image = png_bytes(skdata.chelsea())
        predicted = httpx.post(f"{base}/v1/models/hubvit/predict", files={"file": ("c.png", image)},
                               data={"top_k": "1"}).json()
    finally:
        server.terminate()
        server.wait(30)
    assert models[0]["weights"] == {"source": "hub", "random": False, "note": None}
    reference.eval()
    from service.http.uploads import decode_image
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=reference))
    with torch.no_grad():
        probs = reference(transform(decode_image(image, 10**8)).unsqueeze(0)).softmax(-1)[0]
    assert predicted["predictions"][0]["index"] == int(probs.argmax())
    assert predicted["predictions"][0]["probability"] == pytest.approx(float(probs.max()), rel=1e-4)


def test_start_up_fails_with_the_model_and_source_named(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"models": [{"id": "ghost", "architecture": "test_vit",
                                              "weights": "file:/nonexistent/w.safetensors"}]}))
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--config", str(config), "--port", str(free_port())],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "'ghost'" in result.stdout + result.stderr
    assert "file:/nonexistent/w.safetensors" in result.stdout + result.stderr
