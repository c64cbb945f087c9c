"""The measured quality of each method, shipped with the service: the summary that `saliency-server evaluate`
writes (`--output-summary`), read once, for GET /v1/methods. A method missing from it has no figures."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

QUALITY_FILE = Path(__file__).with_name("measured_quality.json")


@lru_cache(maxsize=1)
def shipped_quality() -> tuple[str | None, dict[str, list[dict[str, Any]]]]:
    """(where the figures come from, {method: [per-family figures]}); (None, {}) when no summary is shipped."""
    if not QUALITY_FILE.is_file():
        return None, {}
    summary = json.loads(QUALITY_FILE.read_text(encoding="utf-8"))
    return summary.get("source"), summary.get("methods", {})
