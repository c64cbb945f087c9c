"""api_schemas must be usable by other services without torch or the server."""

import subprocess
import sys


def test_api_schemas_imports_neither_torch_nor_the_server() -> None:
    code = (
        "import sys, api_schemas; "
        "api_schemas.ExplainOptions.model_validate({'methods': ['rollout'], 'target': {'top_k': 2}}); "
        "loaded = [m for m in ('torch', 'timm', 'service', 'fastapi', 'numpy') if m in sys.modules]; "
        "print(','.join(loaded))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
