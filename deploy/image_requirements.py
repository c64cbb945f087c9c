"""Writes the image's dependency lists from the pyproject files, so deploy/Dockerfile installs the dependencies in a
layer of their own (rebuilt only when a pyproject.toml changes) before it copies any code.

    python image_requirements.py pyproject.toml api_schemas/pyproject.toml --torch torch.txt --rest requirements.txt

The first file's [project] dependencies, less the distributions named by the files themselves (the server depends on
`saliency-api-schemas`, built from ./api_schemas), plus the other files' dependencies. torch and torchvision go to
`--torch` (the Dockerfile installs them from the index that VARIANT picks), everything else to `--rest`. Version
bounds are those of the pyproject files: there is no second copy of them to keep in step.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

TORCH = {"torch", "torchvision"}


def _name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()  # PEP 503 normalised


def split_requirements(pyprojects: list[Path]) -> tuple[list[str], list[str]]:
    """(torch requirements, other requirements) of the pyproject files, in file order, without duplicates or the
    files' own distributions."""
    projects = [tomllib.loads(path.read_text(encoding="utf-8"))["project"] for path in pyprojects]
    local = {_name(project["name"]) for project in projects}
    torch: list[str] = []
    rest: list[str] = []
    for project in projects:
        for requirement in project.get("dependencies", []):
            name = _name(requirement)
            target = torch if name in TORCH else rest
            if name not in local and requirement not in target:
                target.append(requirement)
    return torch, rest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("pyprojects", nargs="+", type=Path)
    parser.add_argument("--torch", type=Path, required=True, help="where to write torch and torchvision")
    parser.add_argument("--rest", type=Path, required=True, help="where to write every other dependency")
    args = parser.parse_args(argv)
    torch, rest = split_requirements(args.pyprojects)
    args.torch.write_text("".join(f"{line}\n" for line in torch), encoding="utf-8")
    args.rest.write_text("".join(f"{line}\n" for line in rest), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
