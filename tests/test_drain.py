"""A rollout loses nothing: after SIGTERM the real server (`saliency-server serve` in a subprocess) fails readiness at
once, answers every new request, on kept-alive and new connections alike, with 503 `shutting_down` and `Retry-After`
for `drain_s`, finishes what it had accepted, and exits 0."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from benchmarks.server import ServerProcess, write_config
from tests.helpers import TINY_VIT_KWARGS, png_bytes, random_image

DRAIN_S = 4.0
IMAGE = png_bytes(random_image(0))


@dataclass
class Outcome:
    sent_at: float  # time.perf_counter()
    answered_at: float
    status: int | None  # None: no HTTP answer (refused, reset)
    code: str | None = None
    retry_after: str | None = None
    connection: str | None = None
    error: str | None = None


def _outcome(sent_at: float, response: httpx.Response | None, error: Exception | None = None) -> Outcome:
    if response is None:
        return Outcome(sent_at, time.perf_counter(), None, error=f"{type(error).__name__}: {error}")
    code = None
    if response.status_code != 200:
        code = response.json()["error"]["code"]
    return Outcome(sent_at, time.perf_counter(), response.status_code, code, response.headers.get("retry-after"),
                   response.headers.get("connection"))


def _client_loop(base_url: str, keep_alive: bool, stop: threading.Event, outcomes: list[Outcome]) -> None:
    """Predictions one after another until `stop`: on one kept-alive connection, or a new connection each."""
    client = httpx.Client(base_url=base_url, timeout=30) if keep_alive else None
    try:
        while not stop.is_set():
            sent_at = time.perf_counter()
            try:
                if client is not None:
                    response = client.post("/v1/models/vit/predict", files={"file": ("a.png", IMAGE, "image/png")})
                else:
                    response = httpx.post(f"{base_url}/v1/models/vit/predict", timeout=30,
                                          files={"file": ("a.png", IMAGE, "image/png")},
                                          headers={"Connection": "close"})
                outcomes.append(_outcome(sent_at, response))
            except httpx.TransportError as exc:
                outcomes.append(_outcome(sent_at, None, exc))
            time.sleep(0.01)
    finally:
        if client is not None:
            client.close()


def _wait_until_in_flight(base_url: str, model: str, count: int, timeout_s: float = 30.0) -> None:
    """Until at least `count` requests naming the model are being handled (saliency_requests_in_flight counts the
    requests the app has accepted)."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        for line in httpx.get(f"{base_url}/metrics", timeout=5).text.splitlines():
            if line.startswith(f'saliency_requests_in_flight{{model="{model}"}}') and float(line.split()[-1]) >= count:
                return
        time.sleep(0.02)
    raise TimeoutError("the explanations never got in flight")


@pytest.fixture
def server(tmp_path: Path):
    tiny = {"architecture": "vit_tiny_patch16_224", "weights": "random", "model_kwargs": TINY_VIT_KWARGS}
    config = write_config(tmp_path / "config.yaml", {"drain_s": DRAIN_S, "cpu_workers": 2}, [
        {"id": "vit", **tiny, "max_batch_size": 8, "max_wait_ms": 5},
        # The slow explanations run on their own model, in chunks: between chunks the predictions of `vit` may use
        # the lane (service/runtime/devices.py), so the clients are answered while the explanations compute.
        {"id": "slow", **tiny, "explain_chunk_size": 16, "max_request_cost": 100000},
    ])
    with ServerProcess(config, tmp_path, ready_timeout_s=300) as process:
        yield process


def test_a_burst_across_sigterm_gets_answers_only(server: ServerProcess) -> None:
    base_url = server.base_url
    outcomes: list[Outcome] = []
    stop = threading.Event()
    clients = [threading.Thread(target=_client_loop, args=(base_url, i % 2 == 0, stop, outcomes), daemon=True)
               for i in range(6)]
    # Slow requests in flight when the signal arrives: explanations taking seconds each (2560 backward passes).
    slow: list[Outcome] = []

    def slow_request() -> None:
        sent_at = time.perf_counter()
        try:
            slow.append(_outcome(sent_at, httpx.post(
                f"{base_url}/v1/models/slow/explain", timeout=60, files={"file": ("a.png", IMAGE, "image/png")},
                data={"methods": '[{"name": "smoothgrad", "params": {"samples": 256}}]', "target": '{"top_k": 10}'})))
        except httpx.TransportError as exc:
            slow.append(_outcome(sent_at, None, exc))

    slow_threads = [threading.Thread(target=slow_request, daemon=True) for _ in range(2)]
    for thread in slow_threads:
        thread.start()
    _wait_until_in_flight(base_url, "slow", 2)  # both explanations accepted (inside the app)
    for thread in clients:
        thread.start()
    time.sleep(0.5)
    _wait_until_in_flight(base_url, "slow", 2, timeout_s=0.5)  # still computing
    signalled_at = time.perf_counter()
    server.process.send_signal(signal.SIGTERM)

    # Readiness fails at once; liveness and the metrics still answer.
    time.sleep(0.2)
    assert httpx.get(f"{base_url}/readyz", timeout=5).status_code == 503
    assert httpx.get(f"{base_url}/healthz", timeout=5).status_code == 200
    assert httpx.get(f"{base_url}/metrics", timeout=5).status_code == 200
    # The clients keep sending through most of the drain (a load balancer takes a moment to stop routing here).
    time.sleep(DRAIN_S - 1.5)
    stop.set()
    for thread in clients + slow_threads:
        thread.join(60)

    assert server.process.wait(timeout=60) == 0, server.log_tail()
    exited_at = time.perf_counter()
    assert exited_at - signalled_at >= DRAIN_S - 0.5  # it waited for the drain

    failures = [o for o in outcomes + slow if o.status is None]
    assert not failures, failures[:5]  # nothing refused, nothing reset
    before = [o for o in outcomes if o.answered_at < signalled_at]
    after = [o for o in outcomes if o.sent_at > signalled_at + 0.05]
    assert before and all(o.status == 200 for o in before)
    # A request the app had not read yet when the signal came is answered 503 like any later one (a client
    # cannot tell in-transit from accepted): what must hold is that each gets an answer, and that the requests the
    # app had accepted finish (the explanations below).
    assert after, "no request was sent during the drain"
    for o in after:
        assert o.status == 503 and o.code == "shutting_down", o
        assert o.retry_after == "5" and o.connection == "close", o
    assert {o.status for o in outcomes} <= {200, 503}
    # Accepted before the signal, still computing after it: answered in full.
    assert len(slow) == 2 and all(o.status == 200 for o in slow), slow
    assert all(o.answered_at > signalled_at for o in slow)


def test_a_second_signal_skips_the_rest_of_the_drain(server: ServerProcess) -> None:
    started = time.perf_counter()
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert httpx.get(f"{server.base_url}/readyz", timeout=5).status_code == 503
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0
    assert time.perf_counter() - started < DRAIN_S


def test_without_a_drain_the_server_stops_at_once(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", {"drain_s": 0}, [{
        "id": "vit", "architecture": "vit_tiny_patch16_224", "weights": "random", "model_kwargs": TINY_VIT_KWARGS,
    }])
    process = ServerProcess(config, tmp_path, ready_timeout_s=300)
    with process:
        started = time.perf_counter()
        process.process.send_signal(signal.SIGTERM)
        assert process.process.wait(timeout=30) == 0
        assert time.perf_counter() - started < 3


def test_the_draining_app_refuses_new_requests_in_process() -> None:
    """The middleware alone (no signal): once the state drains, work gets 503 and the probes answer."""
    from tests.helpers import running_app, settings_for, tiny_vit_config

    async def run() -> None:
        async with running_app(settings_for(tiny_vit_config())) as (client, app):
            assert (await client.get("/readyz")).status_code == 200
            app.state.service.start_draining()
            response = await client.post("/v1/models/tiny_vit/predict", files={"file": ("a.png", IMAGE)})
            assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
            assert response.headers["retry-after"] == "5"
            assert (await client.get("/v1/models")).status_code == 503
            assert (await client.get("/readyz")).status_code == 503
            assert (await client.get("/v2/health/ready")).status_code != 200
            assert (await client.get("/healthz")).status_code == 200
            metrics = (await client.get("/metrics")).text
            assert 'code="shutting_down"' in metrics  # counted like any other answer

    asyncio.run(run())
