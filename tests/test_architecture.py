"""The package layers: imports flow one way (http -> explain, visualization, runtime -> model), the benchmarks stay
outside the service, and no explanation method imports another (shared code lives in private `_*.py` helpers)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What each package of the service may import, besides itself, the standard library and third-party packages.
# `service.config` (settings) and `service.png` (PNG encoding) are leaves every layer may use; `api_schemas` is the
# API's own models.
LEAVES = {"service.config", "service.png", "api_schemas"}
ALLOWED: dict[str, set[str]] = {
    "service.model": set(),
    "service.runtime": {"service.model"},
    "service.explain": {"service.model"},
    "service.visualization": {"service.model"},
    "service.http": {"service.model", "service.runtime", "service.explain", "service.visualization", "service"},
    # the command line is the entry point: it starts the app and, when installed, the benchmarks
    "service.cli": {"service.http", "benchmarks", "service"},
    "service.__main__": {"service.cli"},
}
METHODS = "service.explain.methods"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules the file imports, at any depth (lazy imports inside functions included), as absolute
    names: `from pkg import module` counts as `pkg.module`, `from module import name` as `module`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known
            found.update(submodules or {base})
    return found & known


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _layer(module: str) -> str | None:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if _within(module, layer):
            return layer
    return None


def layer_violations(root: Path) -> list[str]:
    """`file: imports X` for every import of a project module that its layer may not import."""
    known = {module_name(p, root) for p in (root / "service").rglob("*.py")}
    known |= {module_name(p, root) for p in (root / "benchmarks").rglob("*.py")} if (root / "benchmarks").exists() else set()
    problems = []
    for path in sorted((root / "service").rglob("*.py")):
        name = module_name(path, root)
        layer = _layer(name)
        for target in sorted(imported_modules(path, name, known)):
            if target in LEAVES or any(_within(target, leaf) for leaf in LEAVES):
                continue
            if layer is not None and _within(target, layer):
                continue
            allowed = ALLOWED.get(layer or "", set())
            if target == "service" and "service" in allowed:
                continue
            if not any(_within(target, a) for a in allowed if a != "service"):
                problems.append(f"{path.relative_to(root)}: imports {target}")
    return problems


def method_violations(root: Path) -> list[str]:
    """`file: imports X` for every method module importing another method module (private `_*` helpers are fine)."""
    problems = []
    known = {module_name(p, root) for p in (root / "service").rglob("*.py")}
    methods_dir = root / METHODS.replace(".", "/")
    for path in sorted(methods_dir.glob("*.py")):
        name = module_name(path, root)
        leaves = {imported[len(METHODS) + 1:].split(".")[0] for imported in imported_modules(path, name, known)
                  if imported.startswith(METHODS + ".")}
        for leaf in sorted(leaves):
            if path.name != "__init__.py" and not leaf.startswith("_") and f"{METHODS}.{leaf}" != name:
                problems.append(f"{path.relative_to(root)}: imports method {leaf}")
    return problems


def test_each_layer_imports_only_the_layers_below_it() -> None:
    assert layer_violations(ROOT) == []


def test_no_explanation_method_imports_another_method() -> None:
    assert method_violations(ROOT) == []


def copied_sources(dockerfile: str) -> list[str]:
    """Every source path of the Dockerfile's COPY and ADD instructions (flags and destinations left out)."""
    sources = []
    for line in dockerfile.splitlines():
        words = line.split()
        if words and words[0].upper() in ("COPY", "ADD"):
            sources += [word for word in words[1:-1] if not word.startswith("--")]
    return sources


def test_the_benchmarks_are_outside_the_service_package_and_its_image() -> None:
    assert not (ROOT / "service" / "bench").exists()
    assert (ROOT / "benchmarks" / "cli.py").is_file()
    sources = copied_sources((ROOT / "deploy" / "Dockerfile").read_text(encoding="utf-8"))
    assert sources and not any(s.rstrip("/").split("/")[0] in ("benchmarks", ".", "*") for s in sources), sources
    assert "benchmarks" in (ROOT / ".dockerignore").read_text(encoding="utf-8").split()


def test_copied_sources_sees_every_source_of_copy_and_add() -> None:
    dockerfile = "FROM x\nCOPY --chown=app . /app\n  add service benchmarks ./\nRUN cp a b\n"
    assert copied_sources(dockerfile) == [".", "service", "benchmarks"]


def test_the_api_schemas_import_nothing_of_the_server_or_torch() -> None:
    for path in sorted((ROOT / "api_schemas").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and not node.level}
        roots = {name.split(".")[0] for name in names}
        assert not roots & {"service", "benchmarks", "torch", "torchvision", "timm"}, (path.name, roots)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for relative, source in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(
    ("importer", "source", "expected"),
    [
        ("service/model/served.py", "from service.explain.captures import CaptureNeeds\n",
         "service/model/served.py: imports service.explain.captures"),
        ("service/runtime/batching.py", "def f():\n    from service.http import errors\n",
         "service/runtime/batching.py: imports service.http.errors"),
        ("service/explain/pipeline.py", "from ..http.errors import ApiError\n",
         "service/explain/pipeline.py: imports service.http.errors"),
        ("service/visualization/jobs.py", "import service.runtime.devices\n",
         "service/visualization/jobs.py: imports service.runtime.devices"),
    ],
)
def test_an_import_against_the_flow_is_reported(tmp_path: Path, importer: str, source: str, expected: str) -> None:
    files = {f"service/{p}/__init__.py": "" for p in ("model", "runtime", "explain", "http", "visualization")}
    files.update({"service/__init__.py": "", "service/explain/captures.py": "", "service/http/errors.py": "",
                  "service/runtime/devices.py": "", "service/model/served.py": "", "service/runtime/batching.py": "",
                  "service/explain/pipeline.py": "", "service/visualization/jobs.py": ""})
    files[importer] = source
    assert layer_violations(_tree(tmp_path, files)) == [expected]


def test_a_method_importing_another_method_is_reported(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "service/__init__.py": "", "service/explain/__init__.py": "", "service/explain/methods/__init__.py": "",
        "service/explain/methods/_cam.py": "", "service/explain/methods/grad_rollout.py": "",
        "service/explain/methods/gradcam.py": "from service.explain.methods._cam import x\n",
        "service/explain/methods/layercam.py": "from service.explain.methods.gradcam import GradCamParams\n",
        "service/explain/methods/gae.py": "from . import grad_rollout\n",
    })
    assert method_violations(root) == ["service/explain/methods/gae.py: imports method grad_rollout",
                                       "service/explain/methods/layercam.py: imports method gradcam"]
