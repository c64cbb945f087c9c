import pytest
import torch

from service.runtime.devices import DeviceLanes


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def lanes():
    """Two CPU lanes sharing two threads (the lane, determinism and memory-trim tests)."""
    pool = DeviceLanes(torch.device("cpu"), 2, threads=2)
    yield pool
    pool.shutdown()
