"""The OpenAPI document works with standard generators, unedited: openapi-python-client generates a client from the
live `/openapi.json` without a warning, and that client lists models, predicts and explains (JSON and multipart),
lists methods, runs a visualisation job to completion and reads errors as the typed error model, against a real
uvicorn; the document passes openapi-spec-validator; openapi-typescript turns it into types that TypeScript accepts."""

from __future__ import annotations

import base64
import importlib
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from service.http.app import create_app, load_models
from tests.helpers import png_bytes, random_image, settings_for, tiny_cnn_config, tiny_vit_config, uvicorn_in_thread

SETTINGS = settings_for(tiny_vit_config(), tiny_cnn_config(), device="cpu")
PACKAGE = "saliency_generated_client"
BIN = Path(sys.executable).parent  # the generator and ruff (its default post-hooks) are installed beside python
IMAGE = png_bytes(random_image(3, (40, 36)))


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with uvicorn_in_thread(create_app(SETTINGS, models=load_models(SETTINGS))) as url:
        for _ in range(600):  # warm-up runs after start-up
            if httpx.get(f"{url}/readyz").status_code == 200:
                break
            time.sleep(0.05)
        yield url


@pytest.fixture(scope="module")
def generated(server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModuleType, str]]:
    """The client openapi-python-client generates from the live document, imported as is; and what it printed."""
    if shutil.which("openapi-python-client", path=str(BIN)) is None:
        pytest.fail("openapi-python-client is a test dependency: install the project with '.[test]'")
    workdir = tmp_path_factory.mktemp("generated")
    completed = subprocess.run(
        [str(BIN / "openapi-python-client"), "generate", "--url", f"{server}/openapi.json", "--meta", "none",
         "--output-path", str(workdir / PACKAGE)],
        capture_output=True, text=True, timeout=300, cwd=workdir,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    printed = (completed.stdout + completed.stderr).strip()
    assert completed.returncode == 0, printed
    # Anything beyond "Generating <path>" is a warning (a schema it could not type, a post-hook that failed).
    assert printed == f"Generating {workdir / PACKAGE}", printed
    sys.path.insert(0, str(workdir))
    try:
        yield importlib.import_module(PACKAGE), printed
    finally:
        sys.path.remove(str(workdir))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


def module(generated: tuple[ModuleType, str], name: str) -> Any:
    return importlib.import_module(f"{PACKAGE}.{name}")


@pytest.fixture(scope="module")
def client(generated: tuple[ModuleType, str], server: str) -> Iterator[Any]:
    with module(generated, "client").Client(base_url=server, timeout=httpx.Timeout(120)) as api:
        yield api


def upload(generated: tuple[ModuleType, str]) -> Any:
    types = module(generated, "types")
    return types.File(payload=io.BytesIO(IMAGE), file_name="image.png", mime_type="image/png")


def decode_raw(raw: Any) -> np.ndarray:
    assert raw.dtype == "float32"
    return np.frombuffer(base64.b64decode(raw.data), dtype="<f4").reshape(raw.shape)


def test_the_generator_prints_nothing_but_the_path_it_generated(generated: tuple[ModuleType, str]) -> None:
    package, printed = generated
    assert printed.startswith("Generating ") and "\n" not in printed
    assert hasattr(package, "Client") and hasattr(package, "AuthenticatedClient")


def test_list_models_gives_typed_models(generated: tuple[ModuleType, str], client: Any) -> None:
    listed = module(generated, "api.models.list_models").sync(client=client)
    assert type(listed).__name__ == "ModelListResponse"
    assert sorted(m.id for m in listed.models) == ["tiny_cnn", "tiny_vit"]
    info = module(generated, "api.models.get_model_info").sync("tiny_vit", client=client)
    assert info.id == "tiny_vit" and info.num_classes == 10


def test_predict_as_json_and_as_multipart_give_the_same_probabilities(
    generated: tuple[ModuleType, str], client: Any, server: str
) -> None:
    predict = module(generated, "api.inference.predict")
    models = module(generated, "models")
    as_json = predict.sync("tiny_cnn", client=client, body=models.PredictJsonRequest(
        image=base64.b64encode(IMAGE).decode(), top_k=4))
    as_form = predict.sync("tiny_cnn", client=client, body=models.PredictFilesBody(file=upload(generated), top_k=4))
    assert type(as_json).__name__ == type(as_form).__name__ == "PredictResponse"
    assert len(as_json.predictions) == len(as_form.predictions) == 4
    direct = httpx.post(f"{server}/v1/models/tiny_cnn/predict", files={"file": ("x.png", IMAGE, "image/png")},
                        data={"top_k": "4"}, timeout=60).json()["predictions"]
    for response in (as_json, as_form):
        assert [p.index for p in response.predictions] == [p["index"] for p in direct]
        np.testing.assert_allclose([p.probability for p in response.predictions],
                                   [p["probability"] for p in direct], atol=1e-6)


def explain_body(models: Any, form: bool, file: Any = None) -> Any:
    """Two methods, one with a non-default parameter, the two most probable classes, raw token-space maps."""
    methods = ["gradcam", models.MethodSpec(name="rollout", params=models.MethodSpecParams.from_dict(
        {"head_fusion": "max"}))]
    target = models.TopKTarget(top_k=2)
    output = models.OutputOptions(format_=[models.OutputOptionsFormatItem.RAW], space=models.OutputOptionsSpace.TOKENS)
    if form:
        return models.ExplainFilesBody(file=file, methods=methods, target=target, output=output, top_k=3)
    return models.ExplainJsonRequest(image=base64.b64encode(IMAGE).decode(), methods=methods, target=target,
                                     output=output, top_k=3)


def test_explain_with_two_methods_as_json_and_as_multipart_decodes_the_same_raw_maps(
    generated: tuple[ModuleType, str], client: Any
) -> None:
    explain = module(generated, "api.explain.explain")
    models = module(generated, "models")
    answers = [explain.sync("tiny_vit", client=client, body=explain_body(models, form=False)),
               explain.sync("tiny_vit", client=client, body=explain_body(models, form=True, file=upload(generated)))]
    decoded = []
    for answer in answers:
        assert type(answer).__name__ == "ExplainResponse", answer
        assert [e.method for e in answer.explanations] == ["gradcam", "rollout"]
        gradcam, rollout = answer.explanations
        assert rollout.params["head_fusion"] == "max"  # a method's params arrived through the multipart form too
        assert [r.target.index for r in gradcam.results] == [p.index for p in answer.predictions[:2]]
        assert len(rollout.results) == 1 and rollout.results[0].target is None  # class-agnostic: one map
        maps = [decode_raw(r.map_.raw) for e in answer.explanations for r in e.results]
        assert all(m.shape == (4, 4) and np.isfinite(m).all() for m in maps)  # the tiny ViT's 4x4 patch grid
        decoded.append(maps)
    for json_map, form_map in zip(*decoded, strict=True):
        np.testing.assert_allclose(json_map, form_map, rtol=1e-5, atol=1e-6)


def test_a_class_index_target_sent_by_the_generated_multipart_form_is_explained(
    generated: tuple[ModuleType, str], client: Any
) -> None:
    models = module(generated, "models")
    body = models.ExplainFilesBody(file=upload(generated), methods=["gradcam"], target=7,
                                   output=models.OutputOptions(format_=[models.OutputOptionsFormatItem.GRAY_PNG]))
    answer = module(generated, "api.explain.explain").sync("tiny_cnn", client=client, body=body)
    assert type(answer).__name__ == "ExplainResponse", answer
    assert answer.explanations[0].results[0].target.index == 7
    gray = Image.open(io.BytesIO(base64.b64decode(answer.explanations[0].results[0].map_.gray_png)))
    assert gray.size == (40, 36)  # the original image's size


def test_list_methods_gives_each_method_with_its_params_schema(generated: tuple[ModuleType, str], client: Any) -> None:
    listed = module(generated, "api.explain.list_methods").sync(client=client)
    by_name = {m.name: m for m in listed.methods}
    assert {"gradcam", "rollout"} <= set(by_name)
    assert "head_fusion" in by_name["rollout"].params_schema["properties"]


def test_a_visualisation_job_is_started_and_polled_to_completion(
    generated: tuple[ModuleType, str], client: Any
) -> None:
    models = module(generated, "models")
    request = models.VisualizationRequest(
        objective=models.ClassObjective(type_="class", index=3), steps=4, jitter=0)
    started = module(generated, "api.visualization.start_visualization").sync_detailed(
        "tiny_vit", client=client, body=request)
    assert started.status_code == 202, started.content
    job = started.parsed
    assert started.headers["location"] == f"/v1/jobs/{job.id}"
    get_job = module(generated, "api.visualization.get_job")
    deadline = time.monotonic() + 60
    while job.status.value in ("queued", "running"):
        assert time.monotonic() < deadline, job.status
        time.sleep(0.05)
        job = get_job.sync(job.id, client=client)
    assert job.status.value == "succeeded", job.error
    assert job.progress.step == 4 and len(job.result.objective_curve) == 4
    assert Image.open(io.BytesIO(base64.b64decode(job.result.image_png))).size == (32, 32)
    listed = module(generated, "api.visualization.list_jobs").sync(client=client)
    assert job.id in [j.id for j in listed.jobs]


def test_errors_are_read_as_the_typed_error_model(generated: tuple[ModuleType, str], client: Any) -> None:
    models = module(generated, "models")
    missing = module(generated, "api.inference.predict").sync_detailed(
        "no_such_model", client=client, body=models.PredictFilesBody(file=upload(generated)))
    assert missing.status_code == 404
    assert type(missing.parsed).__name__ == "ErrorResponse" and missing.parsed.error.code == "model_not_found"
    unknown_method = module(generated, "api.explain.explain").sync_detailed(
        "tiny_vit", client=client, body=models.ExplainFilesBody(file=upload(generated), methods=["no_such_method"]))
    assert unknown_method.status_code == 422
    assert unknown_method.parsed.error.code == "invalid_request"
    assert "no_such_method" in unknown_method.parsed.error.message
    no_job = module(generated, "api.visualization.get_job").sync_detailed("0" * 32, client=client)
    assert no_job.status_code == 404 and no_job.parsed.error.code == "job_not_found"


def test_the_live_document_passes_openapi_spec_validator(server: str) -> None:
    from openapi_spec_validator import validate

    validate(httpx.get(f"{server}/openapi.json").json())


TYPESCRIPT_USE = """\
import type { components, paths } from "./api";
type Schemas = components["schemas"];
const predicted: Schemas["PredictResponse"]["predictions"][number] = { index: 1, label: "x", probability: 0.5 };
const request: Schemas["ExplainJsonRequest"] = { image: "aGk=", methods: ["gradcam", { name: "rollout" }],
  target: { top_k: 2 }, output: { format: ["raw"], space: "tokens" } };
const error: Schemas["ErrorResponse"] = { error: { code: "model_not_found", message: "no model" } };
type Explain = paths["/v1/models/{model_id}/explain"]["post"];
const answered: Explain["responses"][422]["content"]["application/json"] = error;
export { predicted, request, answered };
"""


def test_openapi_typescript_types_compile_with_typescript(server: str, tmp_path: Path) -> None:
    """openapi-typescript (npm) writes types that `tsc --strict` accepts for real requests and responses."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed (`.ci/run` installs nodejs and npm with apt where they are missing)")
    document = tmp_path / "openapi.json"
    document.write_text(httpx.get(f"{server}/openapi.json").text, encoding="utf-8")
    install = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--silent", "--prefix", str(tmp_path),
                              "openapi-typescript@7", "typescript@5"], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    bin_dir = tmp_path / "node_modules" / ".bin"
    # `--default-non-nullable false`: openapi-typescript 7 otherwise types every field with a default as always
    # present, which holds for responses but not for request fields a client may leave out (`output`, `top_k`).
    generate = subprocess.run([str(bin_dir / "openapi-typescript"), str(document), "--default-non-nullable", "false",
                               "-o", str(tmp_path / "api.d.ts")], capture_output=True, text=True, timeout=120)
    assert generate.returncode == 0, generate.stderr[-3000:]
    assert "warn" not in (generate.stdout + generate.stderr).lower(), generate.stdout + generate.stderr
    (tmp_path / "use.ts").write_text(TYPESCRIPT_USE, encoding="utf-8")
    compiled = subprocess.run([str(bin_dir / "tsc"), "--strict", "--noEmit", "--target", "es2020", "--module",
                               "es2020", "--moduleResolution", "node", str(tmp_path / "use.ts")],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert compiled.returncode == 0, compiled.stdout[-3000:]
    # and a wrong type is refused, so the check above is a real one
    (tmp_path / "use.ts").write_text(TYPESCRIPT_USE.replace("probability: 0.5", 'probability: "high"'), "utf-8")
    refused = subprocess.run([str(bin_dir / "tsc"), "--strict", "--noEmit", str(tmp_path / "use.ts")],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert refused.returncode != 0 and "use.ts(3," in refused.stdout, refused.stdout  # the line of `probability`
