"""The method registry: the explicit import list of `service.explain.methods` registers every method, whichever
method module is imported first, and `all_methods()` lists them sorted by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from service.explain import registry

ROOT = Path(__file__).resolve().parents[1]


def test_importing_one_method_module_first_does_not_hide_the_others() -> None:
    code = (
        "import service.explain.methods.saliency\n"
        "from service.explain.registry import all_methods\n"
        "names = set(all_methods())\n"
        "assert {'saliency', 'gradcam', 'rollout', 'vit_cx', 'integrated_gradients'} <= names, names\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_all_methods_are_sorted_by_name_and_keyed_by_their_own_name() -> None:
    methods = registry.all_methods()
    assert list(methods) == sorted(methods)
    assert all(method.name == name for name, method in methods.items())
