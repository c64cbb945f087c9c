"""Server and model configuration: a TOML/YAML file, overridden by `SALIENCY_*` environment variables."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_CONFIG_FILE = Path(__file__).with_name("default_config.toml")

DType = Literal["float32", "float16", "bfloat16"]

MIN_API_KEY_LENGTH = 16  # shorter keys are refused at start-up (guessable)


def read_api_keys(path: str | Path) -> list[str]:
    """The keys of an API keys file (see api_keys_in); OSError when it cannot be read."""
    return api_keys_in(Path(path).read_text(encoding="utf-8"), path)


def api_keys_in(text: str, path: str | Path, on_invalid: Callable[[str], object] | None = None) -> list[str]:
    """The keys of the text of the API keys file `path`: one per line, surrounding whitespace stripped, blank lines
    and `#` comments ignored. A key that is too short or holds whitespace raises ValueError naming the line (never
    the key), or, with `on_invalid`, is skipped and that message given to it."""
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        problem = api_key_problem(key)
        if problem and on_invalid is None:
            raise ValueError(f"api_keys_file {path}, line {number}: {problem}")
        if problem:
            on_invalid(f"api_keys_file {path}, line {number}: {problem}")
        else:
            keys.append(key)
    return keys


def api_key_problem(key: str) -> str:
    """Why a key is refused ("" when it is acceptable); the message never quotes the key."""
    if len(key) < MIN_API_KEY_LENGTH:
        return (f"the key is {len(key)} characters long; API keys must have at least {MIN_API_KEY_LENGTH} "
                "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if any(not "!" <= c <= "~" for c in key):
        return "the key holds whitespace, control or non-ASCII characters: use visible ASCII characters only"
    return ""


class ModelConfig(BaseModel):
    """One model to serve."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Name used in URLs.")
    architecture: str = Field(description="timm model name, optionally with a pretrained tag (`name.tag`).")
    weights: str = Field(
        default="hub",
        description="`hub`, `file:PATH` (safetensors or state dict), `package:efficientnet-lite0` or `random`.",
    )
    fallback: Literal["none", "random"] = Field(
        default="none", description="What to do when the weights cannot be obtained: fail start-up or use random."
    )
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for timm.create_model (img_size, num_classes...)."
    )
    data_config: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of timm's data config (input_size, crop_pct, crop_mode, interpolation, mean, std).",
    )
    labels_file: Path | None = Field(default=None, description="Class names, one per line (for custom heads).")
    device: str | None = Field(default=None, description="Overrides the server-wide device.")
    dtype: DType | None = Field(default=None, description="Overrides the server-wide dtype.")
    max_batch_size: int = Field(default=32, ge=1, le=1024)
    max_wait_ms: float = Field(
        default=5.0, ge=0.0, le=10_000.0,
        description="How long a batch waits for more requests after its first, while every lane of the device is "
                    "busy (see dispatch_when_idle).",
    )
    dispatch_when_idle: bool = Field(
        default=True,
        description="Start a batch at once when a lane is free (no batching penalty for a lone client); false: "
                    "always wait up to max_wait_ms for more requests first (full batches from bursts, at the cost "
                    "of latency).",
    )
    exact_preprocessing: bool = Field(
        default=False,
        description="Run timm's eval transform with Pillow exactly as built (the inputs timm gives offline); false: "
                    "its usual resize-and-centre-crop runs on uint8 tensors, 3-4x cheaper, within 1 uint8 level of "
                    "Pillow's for all but ~1 value in 10^5 (enough to swap two classes whose probabilities are within "
                    "~1e-3 of each other).",
    )
    queue_size: int = Field(default=256, ge=1)
    timeout_s: float = Field(default=30.0, gt=0.0)
    explain_chunk_size: int = Field(
        default=32, ge=1, le=4096,
        description="Most images per internal forward pass of perturbation methods (samples, steps, masks).",
    )
    max_request_cost: float | None = Field(
        default=None, gt=0.0,
        description="Most an explain request may cost, in forward passes of this model (the methods' estimates for "
                    "the image and its targets, see GET /v1/methods); default: the server's max_request_cost.",
    )
    max_job_cost: float | None = Field(
        default=None, gt=0.0,
        description="Most a visualization job may cost, in forward passes of this model (3 per step, scaled by the "
                    "image's area relative to the model's input); default: the server's max_job_cost.",
    )
    warmup_batch_sizes: list[int] | None = Field(
        default=None, description="Batch sizes to warm up with; default: 1 and the batch cap (max_batch_size divided "
                                  "by the lanes of the device, rounded up)."
    )

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, value: str) -> str:
        if value in ("hub", "random") or value.startswith("file:") or value.startswith("package:"):
            return value
        raise ValueError("weights must be 'hub', 'random', 'file:PATH' or 'package:NAME'")


class ServerSettings(BaseSettings):
    """Everything the server reads at start-up."""

    # hide_input_in_errors: a validation error must not print the API keys it was given.
    model_config = SettingsConfigDict(
        env_prefix="SALIENCY_", env_nested_delimiter="__", extra="forbid", protected_namespaces=(),
        hide_input_in_errors=True,
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    device: str = Field(default="auto", description="`auto` (cuda when available, else cpu), `cpu`, `cuda`, `cuda:N`.")
    dtype: DType = "float32"
    max_body_bytes: int = Field(default=20 * 1024 * 1024, ge=1, description="Largest request body accepted.")
    max_image_pixels: int = Field(default=40_000_000, ge=1, description="Largest decoded image (width x height).")
    max_resized_pixels: int = Field(
        default=10_000_000, ge=1,
        description="Largest image the model's resize may produce (width x height), checked from the header: timm "
                    "resizes the short side to the input size, so very thin images would grow enormous (422 beyond).",
    )
    max_url_bytes: int = Field(
        default=8192, ge=256, description="Longest URL (path and query) accepted (414 beyond)."
    )
    header_timeout_s: float = Field(
        default=30.0, gt=0.0, description="How long a client may take to send a request's headers (408 beyond).",
    )
    body_timeout_s: float = Field(
        default=60.0, gt=0.0,
        description="How long a client may take to send the request body after its headers (408 beyond).",
    )
    keep_alive_timeout_s: float = Field(
        default=5.0, gt=0.0, description="How long an idle keep-alive connection is held open (uvicorn).",
    )
    max_map_side: int = Field(default=1024, ge=8, le=8192, description="Longest side of original-space maps.")
    decode_threads: int = Field(default=4, ge=1, description="Threads that decode and preprocess images.")
    cpu_workers: int | None = Field(
        default=None, ge=1, le=64,
        description="Batches that run at once on a CPU device, each on its own thread with its own copy of the "
                    "model (sharing the weights); torch's threads are split between the busy ones. Default: 2 with "
                    "2 or more cores, else 1. A GPU runs one batch at a time.",
    )
    max_jobs: int = Field(default=4, ge=1, le=1024, description="Most visualization jobs queued or running at once.")
    max_finished_jobs: int = Field(
        default=64, ge=0, le=100_000, description="Finished visualization jobs kept (with results); oldest evicted."
    )
    job_store: str = Field(
        default="memory",
        description="Where visualization jobs' records live: `memory` (this process only: one replica) or a Redis "
                    "URL, `redis://[:password@]host:port/db` (`rediss://` for TLS), shared by every replica naming "
                    "it: any replica answers and cancels any job. max_jobs stays a per-replica limit.",
    )
    job_ttl_s: int = Field(
        default=3600, ge=1, le=30 * 24 * 3600,
        description="With a Redis job_store: seconds a finished job's record and result are kept (max_finished_jobs "
                    "applies to `memory` only).",
    )
    max_request_cost: float = Field(
        default=100.0, gt=0.0,
        description="Most an explain request may cost, in forward passes of its model (each model may override it); "
                    "over it: 422 over_budget before any work is queued.",
    )
    max_job_cost: float = Field(
        default=3072.0, gt=0.0,
        description="Most a visualization job may cost, in forward passes of its model (each model may override "
                    "it): 3 per step at the model's input size, scaled by the image's area.",
    )
    max_response_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024,
        description="Largest explain response, estimated before queuing from maps x formats x pixels.",
    )
    drain_s: float = Field(
        default=10.0, ge=0.0, le=600.0,
        description="After SIGTERM: seconds during which readiness fails and new requests get 503 shutting_down "
                    "(load balancers stop routing here) while accepted work finishes; then the server shuts down "
                    "(the requests in flight get up to 30 s more) and exits 0. 0: shut down at once.",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="`text`: one readable line per record (for a terminal); `json`: one JSON object per line, the "
                    "server's and uvicorn's records alike (for log collectors).",
    )
    predicted_class_limit: int | None = Field(
        default=None, ge=0,
        description="Series of saliency_predicted_class_total per model: unset, one per class the model knows; N, at "
                    "most N classes (the most frequent first) and the rest under `__other__`; 0, none.",
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="API keys a client must send (`Authorization: Bearer KEY` or `X-API-Key: KEY`); empty, with no "
                    "api_keys_file: no authentication. At least 16 characters each.",
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="A file of API keys, one per line (`#` comments and blank lines ignored), added to api_keys; "
                    "re-read when it changes (checked at most once a second). Must exist at start-up.",
    )
    metrics_require_key: bool = Field(default=False, description="Whether /metrics needs an API key too.")
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins browsers may call the API from (`https://app.example.com`, or `*`); empty: no CORS.",
    )
    ui_enabled: bool = Field(
        default=True,
        description="Serve the comparison page at `/` (its files under /static/ui/); off: `/` answers 404. "
                    "/docs and /redoc are served either way.",
    )
    models: list[ModelConfig] = Field(default_factory=list)

    def request_cost_limit(self, model: ModelConfig) -> float:
        return model.max_request_cost if model.max_request_cost is not None else self.max_request_cost

    def job_cost_limit(self, model: ModelConfig) -> float:
        return model.max_job_cost if model.max_job_cost is not None else self.max_job_cost

    @field_validator("job_store")
    @classmethod
    def _check_job_store(cls, value: str) -> str:
        value = value.strip()
        if value == "memory" or value.startswith(("redis://", "rediss://")):
            return value
        raise ValueError("job_store must be 'memory' or a Redis URL (redis://host:port/db, rediss:// for TLS)")

    @model_validator(mode="after")
    def _unique_ids(self) -> ServerSettings:
        ids = [m.id for m in self.models]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"duplicate model ids: {duplicates}")
        return self

    @model_validator(mode="after")
    def _usable_api_keys(self) -> ServerSettings:
        for index, key in enumerate(self.api_keys):
            problem = api_key_problem(key.get_secret_value())
            if problem:
                raise ValueError(f"api_keys[{index}]: {problem}")
        if self.api_keys_file is not None:
            try:
                keys = read_api_keys(self.api_keys_file)
            except OSError as exc:
                raise ValueError(f"api_keys_file {self.api_keys_file} cannot be read: {exc.strerror or exc}") from None
            if not keys:
                raise ValueError(f"api_keys_file {self.api_keys_file} holds no key")
        return self


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a TOML or YAML configuration file into a dict."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        return tomllib.loads(text)
    if path.suffix.lower() in (".yaml", ".yml"):
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
        return data
    raise ValueError(f"{path}: configuration files must end in .toml, .yaml or .yml")


class _DictSource(PydanticBaseSettingsSource):
    """A settings source holding the values read from a configuration file."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> ServerSettings:
    """Build the settings: keyword overrides > `SALIENCY_*` environment > config file > defaults.

    Without a file, the packaged default configuration (three ImageNet models) is used.
    """
    data = read_config_file(config_file or DEFAULT_CONFIG_FILE)

    class _Settings(ServerSettings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, _DictSource(settings_cls, data))

    # A plain ServerSettings (the per-call subclass would make equal settings compare unequal).
    return ServerSettings.model_validate(_Settings(**overrides).model_dump())
