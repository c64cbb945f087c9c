"""The method registry lists every method even when one method module was imported on its own first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
