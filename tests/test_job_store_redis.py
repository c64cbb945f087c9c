"""Visualization jobs behind many replicas: the Redis job store (`job_store = "redis://..."`) against a real
redis-server, first store against store (two stores on one database are two replicas), then two (and, for the
replica-loss test, three) real server processes sharing it.

The tests that need a Redis skip, saying why, where the `redis-server` binary is missing (Debian package
`redis-server`; `.ci/run` installs it with apt-get where it can).
"""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from api_schemas import ErrorDetail, VisualizationRequest, VisualizationResult
from benchmarks.server import ServerProcess, free_port, write_config
from service.config import ServerSettings
from service.visualization.jobs import VisualizationJob
from service.visualization.store import (
    JobStoreError,
    MemoryJobStore,
    RedisJobStore,
    create_job_store,
    redacted,
)
from tests.helpers import (
    TINY_VIT_KWARGS,
    png_bytes,
    random_image,
    running_app,
    settings_for,
    tiny_vit_config,
)

REDIS_SERVER = shutil.which("redis-server")
NO_REDIS_SERVER = ("redis-server is not installed (Debian package redis-server; .ci/run installs it with apt-get "
                   "where it can): the Redis job store is tested against a real server only")

LONG = 10_000  # steps of a job that only ends by cancellation (or by its replica dying)
SERVER_TTL_S = 6  # job_ttl_s of the server processes


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A redis-server of our own on a free loopback port, without persistence, killed at teardown."""
    if REDIS_SERVER is None:
        pytest.skip(NO_REDIS_SERVER)
    workdir = tmp_path_factory.mktemp("redis")
    port = free_port()
    log = open(workdir / "redis.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [str(REDIS_SERVER), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--protected-mode", "yes"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while not _redis_answers(port):
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited ({process.returncode}): "
                                   f"{(workdir / 'redis.log').read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server did not answer PING within 20 s")
            time.sleep(0.05)
        yield port
    finally:
        process.kill()
        process.wait()
        log.close()


def _redis_answers(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def _flushed(port: int, db: int) -> str:
    import redis

    redis.Redis(port=port, db=db).flushdb()
    return f"redis://127.0.0.1:{port}/{db}"


# The store, store against store ---------------------------------------------------------------------------------


@pytest.fixture
def url(redis_port: int) -> str:
    return _flushed(redis_port, 1)


def new_job(steps: int = 10) -> VisualizationJob:
    params = VisualizationRequest.model_validate({"objective": {"type": "class", "index": 3}, "steps": steps,
                                                 "size": [32, 32]})
    return VisualizationJob(id=f"job{time.monotonic_ns()}", model_id="tiny_vit", params=params)


def a_result(curve: list[float]) -> VisualizationResult:
    return VisualizationResult(image_png="iVBORw0KGgo=", width=32, height=32, objective_curve=curve,
                               initial_objective=curve[0], final_objective=curve[-1] + 0.5)


@pytest.mark.anyio
async def test_a_jobs_record_progress_and_result_are_seen_by_another_replica(url: str) -> None:
    runner, reader = RedisJobStore(url, ttl_s=60), RedisJobStore(url, ttl_s=60)
    try:
        job = new_job(steps=3)
        await runner.add(job)
        queued = await reader.get(job.id)
        assert queued is not None and queued.status == "queued" and queued.progress.step == 0
        assert queued.params == job.params and queued.created_at == job.created_at and queued.model_id == "tiny_vit"

        job.mark_running()
        for value in (0.25, 0.5, 1 / 3):
            job.record(value)
        assert await runner.sync(job) == "running"
        running = await reader.get(job.id)
        assert running is not None and running.status == "running" and running.started_at == job.started_at
        assert running.progress.step == 3 and running.progress.objective == 1 / 3  # floats survive exactly

        job.finish("succeeded", result=a_result(job.curve))
        await runner.finish(job)
        done = await reader.get(job.id)
        listing = await reader.list()
        raw = runner._redis
        ttls = [await raw.pttl(runner.record_key(job.id)), await raw.pttl(runner.result_key(job.id))]
        beat = await raw.exists(runner.beat_key(job.id))
    finally:
        await runner.close()
        await reader.close()
    assert done is not None and done.status == "succeeded" and done == job.to_status()
    assert done.result == a_result([0.25, 0.5, 1 / 3]) and done.finished_at == job.finished_at
    assert [j.id for j in listing] == [job.id] and listing[0].result is None
    assert all(0 < ttl <= 60_000 for ttl in ttls), ttls  # the record and the result expire job_ttl_s after the end
    assert beat == 0  # a finished job has no heartbeat


@pytest.mark.anyio
async def test_a_cancel_on_another_replica_reaches_the_runner_and_wins(url: str) -> None:
    runner, other = RedisJobStore(url, ttl_s=60), RedisJobStore(url, ttl_s=60)
    try:
        job = new_job()
        await runner.add(job)
        job.mark_running()
        job.record(0.1)
        await runner.sync(job)
        cancelled = await other.cancel(job.id)
        told = await runner.sync(job)  # the runner's next sync (between two steps) learns it
        job.record(0.2)
        job.finish("succeeded", result=a_result(job.curve))  # a runner that finished meanwhile does not overwrite it
        await runner.finish(job)
        after = await other.get(job.id)
        forgotten = await other.cancel(job.id)  # a second DELETE forgets the finished job
        gone = await runner.get(job.id)
        listed = await runner.list()
        index = await runner._redis.zcard(runner.index_key)
        unknown = await other.cancel("no-such-job")
    finally:
        await runner.close()
        await other.close()
    assert cancelled is not None and cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert cancelled.progress.step == 1
    assert told == "cancelled"
    assert after is not None and after.status == "cancelled" and after.result is None and after.progress.step == 1
    assert forgotten is not None and forgotten.status == "cancelled"
    assert gone is None and listed == [] and index == 0
    assert unknown is None


@pytest.mark.anyio
async def test_a_job_whose_replica_stops_beating_is_failed_replica_lost(url: str) -> None:
    runner = RedisJobStore(url, ttl_s=60, heartbeat_s=0.1, lost_after_s=0.5)
    reader = RedisJobStore(url, ttl_s=60)
    try:
        job = new_job()
        await runner.add(job)
        job.mark_running()
        job.record(0.1)
        await runner.sync(job)
        for _ in range(8):  # 0.8 s, longer than lost_after_s, but beating
            await runner.heartbeat([job])
            await asyncio.sleep(0.1)
        alive = await reader.get(job.id)
        await asyncio.sleep(0.7)  # no beat for longer than lost_after_s: as if the replica died
        lost = await reader.get(job.id)
        listed = await reader.list()
        told = await runner.sync(job)  # a replica that was only cut off stops the job when it comes back
        ttl = await reader._redis.pttl(reader.record_key(job.id))
    finally:
        await runner.close()
        await reader.close()
    assert alive is not None and alive.status == "running"
    assert lost is not None and lost.status == "failed" and lost.finished_at is not None
    assert lost.error == ErrorDetail(code="replica_lost", message=lost.error.message) and lost.progress.step == 1
    assert [j.status for j in listed] == ["failed"]
    assert told == "failed"
    assert 0 < ttl <= 60_000


@pytest.mark.anyio
async def test_finished_records_expire_after_the_ttl(url: str) -> None:
    store = RedisJobStore(url, ttl_s=1)
    try:
        job = new_job()
        await store.add(job)
        job.finish("succeeded", result=a_result([0.0, 1.0]))
        await store.finish(job)
        kept = await store.get(job.id)
        await asyncio.sleep(1.3)
        expired = await store.get(job.id)
        listed = await store.list()
        index = await store._redis.zcard(store.index_key)
    finally:
        await store.close()
    assert kept is not None and kept.result is not None
    assert expired is None and listed == [] and index == 0  # the listing drops the ids of expired records


@pytest.mark.anyio
async def test_an_unreachable_redis_is_a_job_store_error() -> None:
    store = RedisJobStore(f"redis://127.0.0.1:{free_port()}/0", ttl_s=60)
    try:
        with pytest.raises(JobStoreError, match="job store is unavailable"):
            await store.get("anything")
        with pytest.raises(JobStoreError):
            await store.add(new_job())
    finally:
        await store.close()


def test_the_job_store_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServerSettings().job_store == "memory" and ServerSettings().job_ttl_s == 3600
    assert isinstance(create_job_store("memory", 64, 3600), MemoryJobStore)
    store = create_job_store("redis://127.0.0.1:6379/2", 64, 30)
    assert isinstance(store, RedisJobStore) and store.ttl_ms == 30_000
    monkeypatch.setenv("SALIENCY_JOB_STORE", "rediss://:secret@redis.example:6380/1")
    monkeypatch.setenv("SALIENCY_JOB_TTL_S", "120")
    settings = ServerSettings()
    assert settings.job_store == "rediss://:secret@redis.example:6380/1" and settings.job_ttl_s == 120
    assert redacted(settings.job_store) == "rediss://:***@redis.example:6380/1"
    monkeypatch.delenv("SALIENCY_JOB_STORE")
    for bad in ("postgres://db/1", "redis:/oops", ""):
        with pytest.raises(ValidationError, match="job_store"):
            ServerSettings(job_store=bad)
    with pytest.raises(ValidationError):
        ServerSettings(job_ttl_s=0)


# One in-process app on Redis ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_shutdown_records_its_running_jobs_as_cancelled(url: str) -> None:
    settings = settings_for(tiny_vit_config(max_job_cost=3.0 * LONG), job_store=url, job_ttl_s=60)
    async with running_app(settings) as (client, _):
        created = (await client.post("/v1/models/tiny_vit/visualizations",
                                     json={"objective": {"type": "class", "index": 3}, "steps": LONG})).json()
        for _ in range(2000):
            if (await client.get(f"/v1/jobs/{created['id']}")).json()["progress"]["step"] >= 1:
                break
            await asyncio.sleep(0.01)
    reader = RedisJobStore(url, ttl_s=60)
    try:
        after = await reader.get(created["id"])
    finally:
        await reader.close()
    # Not left `running` (nor later declared replica_lost): a replica that stops says so.
    assert after is not None and after.status == "cancelled" and after.progress.step >= 1
    assert after.error is not None and after.error.code == "shutting_down"


@pytest.mark.anyio
async def test_an_unreachable_job_store_is_503_and_takes_no_capacity() -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    settings = settings_for(tiny_vit_config(), job_store=down, max_jobs=1)
    async with running_app(settings) as (client, app):
        body = {"objective": {"type": "class", "index": 3}, "steps": 2}
        started = await client.post("/v1/models/tiny_vit/visualizations", json=body)
        listed = await client.get("/v1/jobs")
        got = await client.get("/v1/jobs/abc")
        deleted = await client.delete("/v1/jobs/abc")
        held = app.state.service.jobs.active_count
        predicted = await client.post("/v1/models/tiny_vit/predict",
                                      files={"file": ("x.png", png_bytes(random_image(1)), "image/png")})
    for response in (started, listed, got, deleted):
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "job_store_unavailable" and response.headers["retry-after"]
    assert held == 0  # the job that could not be recorded was not started
    assert predicted.status_code == 200  # the rest of the API does not depend on the job store


# Two server processes sharing one Redis -------------------------------------------------------------------------


def server_config(path: Path, url: str) -> Path:
    model = {"id": "tiny_vit", "architecture": "vit_tiny_patch16_224", "weights": "random",
             "model_kwargs": dict(TINY_VIT_KWARGS), "max_batch_size": 4, "warmup_batch_sizes": [1],
             "max_job_cost": 3.0 * LONG}
    return write_config(path, {"log_level": "warning", "cpu_workers": 1, "decode_threads": 1, "job_store": url,
                               "job_ttl_s": SERVER_TTL_S}, [model])


def start_server(workdir: Path, url: str) -> ServerProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(server_config(workdir / "config.yaml", url), workdir, ready_timeout_s=300)
    return server.__enter__()


@pytest.fixture(scope="module")
def replicas(redis_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """Replicas A and B sharing database 0: their base URLs, and the Redis URL."""
    url = _flushed(redis_port, 0)
    root = tmp_path_factory.mktemp("replicas")
    servers = []
    try:
        for name in ("a", "b"):
            servers.append(start_server(root / name, url))
        yield servers[0].base_url, servers[1].base_url, url
    finally:
        for server in servers:
            server.__exit__(None, None, None)


def start_job(base: str, steps: int, seed: int = 0) -> dict[str, Any]:
    response = httpx.post(f"{base}/v1/models/tiny_vit/visualizations", timeout=30,
                          json={"objective": {"type": "class", "index": 3}, "steps": steps, "seed": seed})
    assert response.status_code == 202, response.text
    return response.json()


def job_status(base: str, job_id: str) -> httpx.Response:
    return httpx.get(f"{base}/v1/jobs/{job_id}", timeout=30)


def wait_for(base: str, job_id: str, until, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = job_status(base, job_id)
        assert response.status_code == 200, response.text
        status = response.json()
        if until(status):
            return status
        assert time.monotonic() < deadline, f"the job never reached the expected state: {status}"
        time.sleep(0.05)


def job_steps_run(base: str) -> float:
    """Optimisation steps this replica has run (its saliency_compute_seconds_count for kind job_step)."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "saliency_compute_seconds_count" and sample.labels.get("kind") == "job_step")


def jobs_gauge(base: str, state: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "saliency_jobs" and sample.labels.get("state") == state)


def test_a_job_started_on_one_replica_is_polled_and_fetched_on_the_other(replicas: tuple[str, str, str]) -> None:
    a, b, _ = replicas
    created = start_job(a, steps=12)
    seen = job_status(b, created["id"])  # at once: the record was written before the 202
    done = wait_for(b, created["id"], lambda s: s["status"] not in ("queued", "running"))
    on_a = job_status(a, created["id"]).json()
    assert seen.status_code == 200  # (12 steps may be done by then)
    assert seen.json()["params"] == created["params"] and seen.json()["created_at"] == created["created_at"]
    assert done["status"] == "succeeded", done
    assert done["progress"] == {"step": 12, "total": 12, "objective": done["result"]["objective_curve"][-1]}
    assert done["started_at"] and done["finished_at"] and done["error"] is None
    image = Image.open(io.BytesIO(base64.b64decode(done["result"]["image_png"])))
    assert image.size == (32, 32) and len(done["result"]["objective_curve"]) == 12
    assert on_a == done  # either replica answers the same


def test_a_job_cancelled_on_the_other_replica_stops_where_it_runs(replicas: tuple[str, str, str]) -> None:
    a, b, _ = replicas
    created = start_job(a, steps=LONG)
    wait_for(b, created["id"], lambda s: s["progress"]["step"] >= 3)
    assert jobs_gauge(a, "running") == 1
    deleted = httpx.delete(f"{b}/v1/jobs/{created['id']}", timeout=30)
    assert deleted.status_code == 200, deleted.text
    body = deleted.json()
    assert body["status"] == "cancelled" and body["finished_at"] and body["result"] is None
    time.sleep(0.5)  # A notices at its next sync: within 0.1 s and a step
    steps = job_steps_run(a)
    time.sleep(1.0)
    assert job_steps_run(a) == steps  # A no longer runs the job's steps
    assert jobs_gauge(a, "running") == 0
    on_a = job_status(a, created["id"]).json()
    assert on_a["status"] == "cancelled" and on_a["progress"]["step"] == body["progress"]["step"]
    assert on_a["progress"]["step"] < LONG


def test_each_replica_lists_every_replicas_jobs(replicas: tuple[str, str, str]) -> None:
    a, b, _ = replicas
    first = start_job(a, steps=2)
    second = start_job(b, steps=2, seed=1)
    for base, job in ((b, first), (a, second)):
        wait_for(base, job["id"], lambda s: s["status"] == "succeeded")
    listings = [httpx.get(f"{base}/v1/jobs", timeout=30).json()["jobs"] for base in (a, b)]
    for listing in listings:
        ids = [job["id"] for job in listing]
        assert first["id"] in ids and second["id"] in ids
        assert ids.index(first["id"]) < ids.index(second["id"])  # oldest first
        assert all(job["result"] is None for job in listing)
    assert listings[0] == listings[1]


def test_finished_jobs_expire_after_job_ttl_s(replicas: tuple[str, str, str]) -> None:
    a, b, _ = replicas
    created = start_job(a, steps=2)
    wait_for(a, created["id"], lambda s: s["status"] == "succeeded")
    finished = time.monotonic()
    while job_status(b, created["id"]).status_code == 200:
        assert time.monotonic() - finished < SERVER_TTL_S + 5, "the record outlived job_ttl_s"
        time.sleep(0.2)
    assert time.monotonic() - finished > SERVER_TTL_S - 1.5  # and not much before
    gone = job_status(a, created["id"])
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "job_not_found"
    assert created["id"] not in [job["id"] for job in httpx.get(f"{b}/v1/jobs", timeout=30).json()["jobs"]]


def test_a_job_whose_replica_is_killed_is_reported_failed(replicas: tuple[str, str, str],
                                                          tmp_path: Path) -> None:
    _, b, url = replicas
    victim = start_server(tmp_path / "c", url)
    try:
        created = start_job(victim.base_url, steps=LONG)
        wait_for(b, created["id"], lambda s: s["progress"]["step"] >= 2)
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()
        killed = time.monotonic()
        failed = wait_for(b, created["id"], lambda s: s["status"] != "running", timeout=30)
        took = time.monotonic() - killed
    finally:
        victim.__exit__(None, None, None)
    assert failed["status"] == "failed" and failed["error"]["code"] == "replica_lost", failed
    assert failed["finished_at"] and failed["progress"]["step"] >= 2
    assert took < 5 + 5, took  # the heartbeat expires 5 s after the last beat (one a second)
    listed = {job["id"]: job for job in httpx.get(f"{b}/v1/jobs", timeout=30).json()["jobs"]}
    assert listed[created["id"]]["status"] == "failed"
    forgotten = httpx.delete(f"{b}/v1/jobs/{created['id']}", timeout=30)
    assert forgotten.status_code == 200 and forgotten.json()["status"] == "failed"
    assert job_status(b, created["id"]).status_code == 404
