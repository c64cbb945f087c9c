from collections.abc import Iterator

import pytest
import torch

from service.runtime.devices import DeviceLanes


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models: one torch thread is faster, and on a busy machine far faster (no spinning between threads).
    A module asks for it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def lanes():
    """Two CPU lanes sharing two threads (the lane, determinism and memory-trim tests)."""
    pool = DeviceLanes(torch.device("cpu"), 2, threads=2)
    yield pool
    pool.shutdown()
