"""Configuration: TOML and YAML files, SALIENCY_* environment overrides, keyword overrides, validation errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from service.config import ModelConfig, ServerSettings, load_settings
from service.model.placement import resolve_dtype

TOML = """
host = "0.0.0.0"
port = 9001
device = "cpu"
max_image_pixels = 1234567

[[models]]
id = "small"
architecture = "resnet18"
weights = "random"
max_batch_size = 4
model_kwargs = { num_classes = 10 }

[[models]]
id = "vit"
architecture = "vit_tiny_patch16_224"
weights = "hub"
fallback = "random"
max_wait_ms = 2.5
"""

YAML = """
host: 0.0.0.0
port: 9001
device: cpu
max_image_pixels: 1234567
models:
  - id: small
    architecture: resnet18
    weights: random
    max_batch_size: 4
    model_kwargs:
      num_classes: 10
  - id: vit
    architecture: vit_tiny_patch16_224
    weights: hub
    fallback: random
    max_wait_ms: 2.5
"""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SALIENCY_* variable from the outer environment leaks into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("SALIENCY_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_toml_and_yaml_give_the_same_settings(tmp_path: Path) -> None:
    from_toml = load_settings(write(tmp_path, "server.toml", TOML))
    from_yaml = load_settings(write(tmp_path, "server.yaml", YAML))
    assert type(from_toml) is ServerSettings and type(from_yaml) is ServerSettings
    assert from_toml == from_yaml
    assert from_toml.model_dump() == from_yaml.model_dump()
    assert from_toml.port == 9001 and from_toml.host == "0.0.0.0" and from_toml.device == "cpu"
    assert from_toml.max_image_pixels == 1234567
    assert from_toml.max_body_bytes == ServerSettings.model_fields["max_body_bytes"].default  # untouched default
    small, vit = from_toml.models
    assert (small.id, small.architecture, small.weights, small.max_batch_size) == ("small", "resnet18", "random", 4)
    assert small.model_kwargs == {"num_classes": 10}
    assert (vit.id, vit.weights, vit.fallback, vit.max_wait_ms) == ("vit", "hub", "random", 2.5)
    assert load_settings(write(tmp_path, "server.yml", YAML)) == from_yaml


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "server.toml", TOML)
    monkeypatch.setenv("SALIENCY_PORT", "9100")
    monkeypatch.setenv("SALIENCY_MODELS", json.dumps([{"id": "env_model", "architecture": "resnet34", "weights": "random"}]))
    settings = load_settings(path)
    assert settings.port == 9100
    assert [m.id for m in settings.models] == ["env_model"]
    assert settings.models[0].architecture == "resnet34"
    # Fields the environment does not set still come from the file.
    assert settings.host == "0.0.0.0" and settings.max_image_pixels == 1234567


def test_environment_overrides_the_packaged_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SALIENCY_PORT", "9200")
    monkeypatch.setenv("SALIENCY_MAX_BODY_BYTES", "1000")
    settings = load_settings()
    assert (settings.port, settings.max_body_bytes) == (9200, 1000)
    assert len(settings.models) == 3


def test_keyword_overrides_beat_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "server.yaml", YAML)
    monkeypatch.setenv("SALIENCY_PORT", "9100")
    monkeypatch.setenv("SALIENCY_MODELS", json.dumps([{"id": "env_model", "architecture": "resnet34"}]))
    model = ModelConfig(id="kw_model", architecture="resnet50", weights="random")
    settings = load_settings(path, port=9300, models=[model])
    assert settings.port == 9300
    assert [m.id for m in settings.models] == ["kw_model"]
    assert settings.device == "cpu"  # from the file


def test_invalid_environment_value_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SALIENCY_PORT", "not-a-port")
    with pytest.raises(ValidationError, match="port"):
        load_settings()


def test_packaged_defaults() -> None:
    settings = load_settings()
    assert settings.port == 8000 and settings.device == "auto" and settings.dtype == "float32"
    models = {m.id: m for m in settings.models}
    assert list(models) == ["efficientnet_lite0", "deit_tiny_patch16_224", "resnet50"]
    lite = models["efficientnet_lite0"]
    assert lite.weights == "package:efficientnet-lite0"
    assert lite.fallback == "none"
    assert "efficientnet_lite0" in lite.architecture
    for model_id in ("deit_tiny_patch16_224", "resnet50"):
        assert models[model_id].weights == "hub"
        assert models[model_id].fallback == "random"
    assert models["deit_tiny_patch16_224"].architecture.startswith("deit_tiny_patch16_224")
    assert models["resnet50"].architecture.startswith("resnet50")


def test_duplicate_model_ids_are_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "dup.toml", '[[models]]\nid = "m"\narchitecture = "a"\n[[models]]\nid = "m"\narchitecture = "b"\n')
    with pytest.raises(ValidationError, match=r"duplicate model ids: \['m'\]"):
        load_settings(path)


def test_bad_weights_string_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "w.toml", '[[models]]\nid = "m"\narchitecture = "a"\nweights = "s3://bucket/x"\n')
    with pytest.raises(ValidationError) as info:
        load_settings(path)
    message = str(info.value)
    assert "models.0.weights" in message
    assert "weights must be" in message


@pytest.mark.parametrize(
    ("text", "named"),
    [("bogus_key = 1\n", "bogus_key"), ('[[models]]\nid = "m"\narchitecture = "a"\ncolour = "red"\n', "models.0.colour")],
)
def test_unknown_keys_are_rejected(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ValidationError) as info:
        load_settings(write(tmp_path, "u.toml", text))
    assert named in str(info.value)
    assert "Extra inputs are not permitted" in str(info.value)


def test_bad_model_id_is_rejected() -> None:
    with pytest.raises(ValidationError, match="id"):
        ModelConfig(id="has/slash", architecture="resnet18")


def test_txt_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.toml, \.yaml or \.yml") as info:
        load_settings(write(tmp_path, "server.txt", "port = 1\n"))
    assert "server.txt" in str(info.value)


def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mapping"):
        load_settings(write(tmp_path, "list.yaml", "- 1\n- 2\n"))


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "absent.toml")


def test_float16_on_cpu_is_rejected() -> None:
    with pytest.raises(ValueError, match="float16") as info:
        resolve_dtype("float16", torch.device("cpu"))
    assert "cpu" in str(info.value)
    with pytest.raises(ValueError, match="bfloat16"):
        resolve_dtype("bfloat16", torch.device("cpu"))
    assert resolve_dtype("float32", torch.device("cpu")) is torch.float32
