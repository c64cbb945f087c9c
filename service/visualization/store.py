"""Where visualization jobs' records live: in this process (`memory`, one replica) or in Redis (many replicas).

`JobManager` (jobs.py) runs the jobs this process started and tells its store about them: `add` when created,
`sync` between steps (progress; the answer says whether someone elsewhere cancelled the job), `finish` with the
final state and result, `heartbeat` every `heartbeat_s` for its active jobs. The routes read through the store
(`get`, `list`) and cancel through it (`cancel`) when the job does not run in this process.

Redis layout (`{id}` is a hash tag, so each job's keys share a slot):

- `saliency:job:{id}`: hash `meta` (id, model, params, creation, replica; JSON), `status`, `step`, `objective`,
  `started_at`, `finished_at`, `error` (JSON); expires `ttl_s` after the job finishes (while it runs, each
  heartbeat pushes its expiry to `ttl_s`, or two `lost_after_s` if longer, ahead);
- `saliency:job:{id}:result`: the result (JSON with the base64 PNG), with the same TTL;
- `saliency:job:{id}:beat`: the running replica's heartbeat, expiring `lost_after_s` after the latest beat; an
  active record without one belonged to a replica that died (or lost Redis): the next reader marks it `failed`
  with code `replica_lost`;
- `saliency:jobs`: sorted set of job ids by creation time (the listing); ids whose record expired are dropped as
  they are found.

Every change of an active record's status is a Lua script that checks the status first, so a cancellation, a
replica-lost verdict and the runner's own final write never overwrite one another: the first one wins.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from api_schemas import (
    ErrorDetail,
    JobProgress,
    JobStatus,
    VisualizationRequest,
    VisualizationResult,
)

if TYPE_CHECKING:
    from service.visualization.jobs import VisualizationJob

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")

REPLICA_LOST = "replica_lost"


class JobStoreError(RuntimeError):
    """The job store cannot be reached (Redis down, timed out); the message says what failed."""


def replica_lost_error() -> ErrorDetail:
    return ErrorDetail(code=REPLICA_LOST, message="the replica running this job stopped sending heartbeats (it "
                                                  "died, or lost its connection to the job store)")


class JobStore(ABC):
    """Job records: what GET/DELETE /v1/jobs answer from."""

    shared: bool = False  # whether other processes see the records (then heartbeats matter)
    sync_interval_s: float = 0.0  # least time between two `sync` calls of a running job
    heartbeat_s: float = 1.0

    @abstractmethod
    async def add(self, job: VisualizationJob) -> None:
        """Record a new (queued) job."""

    @abstractmethod
    async def sync(self, job: VisualizationJob) -> str | None:
        """Record a running job's progress; returns the stored status (not active: it was cancelled or declared
        lost elsewhere, stop it) or None when the record is gone."""

    @abstractmethod
    async def finish(self, job: VisualizationJob) -> None:
        """Record a finished job's final state and result, unless its record was finished already."""

    @abstractmethod
    async def get(self, job_id: str) -> JobStatus | None:
        """The job's status with its result; None when unknown (never created, forgotten, evicted, expired)."""

    @abstractmethod
    async def list(self) -> list[JobStatus]:
        """Every job held, oldest first, without results."""

    @abstractmethod
    async def cancel(self, job_id: str) -> JobStatus | None:
        """Cancel an active job (its runner stops at its next sync); forget a finished one. None when unknown."""

    async def heartbeat(self, jobs: Sequence[VisualizationJob]) -> None:
        """Say that this process still runs these (active) jobs."""

    @abstractmethod
    def state_counts(self, local: Iterable[VisualizationJob]) -> dict[str, int]:
        """Jobs per status for the metrics, given the jobs this process runs."""

    async def close(self) -> None:
        """Release connections."""


class MemoryJobStore(JobStore):
    """The jobs of this process only, as objects; the newest `max_finished_jobs` finished ones are kept."""

    def __init__(self, max_finished_jobs: int) -> None:
        self.max_finished_jobs = max_finished_jobs
        self._jobs: dict[str, VisualizationJob] = {}

    def held(self, job_id: str) -> VisualizationJob | None:
        return self._jobs.get(job_id)

    async def add(self, job: VisualizationJob) -> None:
        self._jobs[job.id] = job

    async def sync(self, job: VisualizationJob) -> str | None:
        return job.status

    async def finish(self, job: VisualizationJob) -> None:
        self._evict()

    async def get(self, job_id: str) -> JobStatus | None:
        job = self._jobs.get(job_id)
        return None if job is None else job.to_status()

    async def list(self) -> list[JobStatus]:
        return [job.to_status(include_result=False) for job in self._jobs.values()]

    async def cancel(self, job_id: str) -> JobStatus | None:
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if not job.active:
            del self._jobs[job_id]
            return job.to_status()
        job.finish("cancelled")
        if job.task is not None:
            job.task.cancel()
        self._evict()
        return job.to_status()

    def state_counts(self, local: Iterable[VisualizationJob]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job in self._jobs.values():
            counts[job.status] = counts.get(job.status, 0) + 1
        return counts

    def _evict(self) -> None:
        finished = [job_id for job_id, job in self._jobs.items() if not job.active]
        for job_id in finished[: max(0, len(finished) - self.max_finished_jobs)]:
            del self._jobs[job_id]


def _iso(value: datetime | None) -> str:
    return "" if value is None else value.isoformat()


def _datetime(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _now() -> datetime:
    return datetime.now(UTC)


# KEYS[1] record, KEYS[2] beat. ARGV: status, step, objective, started_at. The stored status when not active (the
# runner stops), nil when the record is gone; otherwise writes the progress and returns the new status.
_SYNC = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status ~= 'queued' and status ~= 'running' then return status end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'step', ARGV[2], 'objective', ARGV[3], 'started_at', ARGV[4])
return ARGV[1]
"""

# KEYS[1] record, KEYS[2] beat, KEYS[3] result. ARGV: status, step, objective, started_at, finished_at, error,
# result, ttl_ms. Writes the final state only over an active record; returns the status that stays.
_FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status ~= 'queued' and status ~= 'running' then return status end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'step', ARGV[2], 'objective', ARGV[3], 'started_at', ARGV[4],
           'finished_at', ARGV[5], 'error', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[8])
if ARGV[7] ~= '' then redis.call('SET', KEYS[3], ARGV[7], 'PX', ARGV[8]) end
redis.call('DEL', KEYS[2])
return ARGV[1]
"""

# KEYS[1] record, KEYS[2] beat, KEYS[3] result. ARGV: finished_at, ttl_ms. An active job becomes cancelled (its
# runner sees it at its next sync); a finished one is deleted. Returns {what happened, the record's fields}.
_CANCEL = """
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return false end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('DEL', KEYS[2])
  return {'cancelled', redis.call('HGETALL', KEYS[1])}
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return {'forgotten', fields}
"""

# KEYS[1] record, KEYS[2] beat. ARGV: finished_at, error, ttl_ms. An active record whose heartbeat expired becomes
# failed; returns 1 when it did.
_MARK_LOST = """
local status = redis.call('HGET', KEYS[1], 'status')
if (status == 'queued' or status == 'running') and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[1], 'error', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"""


class RedisJobStore(JobStore):
    """Job records in Redis, shared by every replica that names the same Redis database (see the module's doc)."""

    shared = True

    def __init__(self, url: str, ttl_s: float, *, heartbeat_s: float = 1.0, lost_after_s: float = 5.0,
                 sync_interval_s: float = 0.1, prefix: str = "saliency:") -> None:
        import redis.asyncio as aioredis  # only where Redis is configured

        if lost_after_s <= heartbeat_s:
            raise ValueError("lost_after_s must exceed heartbeat_s")
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.heartbeat_s = heartbeat_s
        self.lost_after_ms = max(1, int(lost_after_s * 1000))
        # An active record outlives a few missed heartbeats whatever the TTL, so that it is found failed, not gone.
        self.active_ttl_ms = max(self.ttl_ms, 2 * self.lost_after_ms)
        self.sync_interval_s = sync_interval_s
        self.prefix = prefix
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._redis = aioredis.from_url(url, decode_responses=True, socket_timeout=5.0, socket_connect_timeout=5.0,
                                        health_check_interval=30)
        self._sync = self._redis.register_script(_SYNC)
        self._finish = self._redis.register_script(_FINISH)
        self._cancel = self._redis.register_script(_CANCEL)
        self._mark_lost = self._redis.register_script(_MARK_LOST)

    # Keys ---------------------------------------------------------------------------------------------------------

    def record_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{{{job_id}}}"

    def beat_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{{{job_id}}}:beat"

    def result_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{{{job_id}}}:result"

    @property
    def index_key(self) -> str:
        return f"{self.prefix}jobs"

    def _keys(self, job_id: str) -> list[str]:
        return [self.record_key(job_id), self.beat_key(job_id), self.result_key(job_id)]

    # Writes by the runner -----------------------------------------------------------------------------------------

    async def add(self, job: VisualizationJob) -> None:
        meta = {"id": job.id, "model_id": job.model_id, "params": job.params.model_dump(mode="json"),
                "created_at": _iso(job.created_at), "replica": self.replica}
        fields = {"meta": json.dumps(meta), "status": job.status, "step": str(job.step), "objective": "",
                  "started_at": "", "finished_at": "", "error": ""}
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.record_key(job.id), mapping=fields)
            pipe.pexpire(self.record_key(job.id), self.active_ttl_ms)
            pipe.set(self.beat_key(job.id), self.replica, px=self.lost_after_ms)
            pipe.zadd(self.index_key, {job.id: job.created_at.timestamp()})
            await self._run(pipe.execute(), "record a new job")
        await self._prune_index()

    async def sync(self, job: VisualizationJob) -> str | None:
        args = [job.status, str(job.step), _float(job.objective), _iso(job.started_at)]
        return await self._run(self._sync(keys=self._keys(job.id)[:2], args=args), "record a job's progress")

    async def finish(self, job: VisualizationJob) -> None:
        args = [job.status, str(job.step), _float(job.objective), _iso(job.started_at),
                _iso(job.finished_at or _now()), "" if job.error is None else job.error.model_dump_json(),
                "" if job.result is None else job.result.model_dump_json(), str(self.ttl_ms)]
        stayed = await self._run(self._finish(keys=self._keys(job.id), args=args), "record a finished job")
        if stayed is not None and stayed != job.status:
            log.info("visualization job %s ended %s here, but its record says %s (set elsewhere first)",
                     job.id, job.status, stayed)

    async def heartbeat(self, jobs: Sequence[VisualizationJob]) -> None:
        if not jobs:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for job in jobs:
                pipe.set(self.beat_key(job.id), self.replica, px=self.lost_after_ms)
                pipe.pexpire(self.record_key(job.id), self.active_ttl_ms)
            await self._run(pipe.execute(), "send heartbeats")

    # Reads and cancellation from any replica ----------------------------------------------------------------------

    async def get(self, job_id: str) -> JobStatus | None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.record_key(job_id))
            pipe.exists(self.beat_key(job_id))
            pipe.get(self.result_key(job_id))
            fields, beating, result = await self._run(pipe.execute(), "read a job")
        if not fields:
            return None
        if fields.get("status") in ACTIVE and not beating:
            fields = await self._declare_lost(job_id) or fields
        return _status(fields, result)

    async def list(self) -> list[JobStatus]:
        ids = await self._run(self._redis.zrange(self.index_key, 0, -1), "list the jobs")
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self.record_key(job_id))
                pipe.exists(self.beat_key(job_id))
            replies = await self._run(pipe.execute(), "list the jobs")
        statuses, gone = [], []
        for job_id, fields, beating in zip(ids, replies[::2], replies[1::2]):
            if not fields:
                gone.append(job_id)
                continue
            if fields.get("status") in ACTIVE and not beating:
                fields = await self._declare_lost(job_id) or fields
            statuses.append(_status(fields, None))
        if gone:
            await self._run(self._redis.zrem(self.index_key, *gone), "drop expired jobs from the listing")
        return statuses

    async def cancel(self, job_id: str) -> JobStatus | None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hget(self.record_key(job_id), "status")
            pipe.exists(self.beat_key(job_id))
            status, beating = await self._run(pipe.execute(), "read a job")
        if status in ACTIVE and not beating:  # its replica is gone: it failed (and this DELETE forgets it)
            await self._declare_lost(job_id)
        reply = await self._run(self._cancel(keys=self._keys(job_id), args=[_iso(_now()), str(self.ttl_ms)]),
                                "cancel a job")
        if not reply:
            return None
        what, flat = reply
        if what == "forgotten":
            await self._run(self._redis.zrem(self.index_key, job_id), "forget a job")
        return _status(dict(zip(flat[::2], flat[1::2])), None)

    def state_counts(self, local: Iterable[VisualizationJob]) -> dict[str, int]:
        # Per replica: the jobs it runs (finished records are shared by every replica; counting them here would
        # count them once per replica).
        counts: dict[str, int] = {}
        for job in local:
            if job.active:
                counts[job.status] = counts.get(job.status, 0) + 1
        return counts

    async def close(self) -> None:
        try:
            await self._redis.aclose()
        except Exception:
            log.debug("closing the job store's connection failed", exc_info=True)

    async def ping(self) -> None:
        await self._run(self._redis.ping(), "reach the job store")

    # Internals ----------------------------------------------------------------------------------------------------

    async def _declare_lost(self, job_id: str) -> dict[str, str] | None:
        marked = await self._run(self._mark_lost(keys=self._keys(job_id)[:2], args=[
            _iso(_now()), replica_lost_error().model_dump_json(), str(self.ttl_ms)]), "mark a lost job failed")
        if marked:
            log.warning("visualization job %s: its replica stopped sending heartbeats; marked failed (%s)",
                        job_id, REPLICA_LOST)
        return await self._run(self._redis.hgetall(self.record_key(job_id)), "read a job") or None

    async def _prune_index(self, sample: int = 32) -> None:
        """Drop the oldest listed ids whose records expired (the listing also drops those it meets)."""
        ids = await self._run(self._redis.zrange(self.index_key, 0, sample - 1), "prune the listing")
        if not ids:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.exists(self.record_key(job_id))
            present = await self._run(pipe.execute(), "prune the listing")
        gone = [job_id for job_id, here in zip(ids, present) if not here]
        if gone:
            await self._run(self._redis.zrem(self.index_key, *gone), "prune the listing")

    @staticmethod
    async def _run(awaitable: Any, doing: str) -> Any:
        from redis.exceptions import RedisError

        try:
            return await awaitable
        except RedisError as exc:
            raise JobStoreError(f"the job store is unavailable: could not {doing} ({type(exc).__name__}: {exc})") \
                from exc


def _float(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _status(fields: dict[str, str], result: str | None) -> JobStatus:
    meta = json.loads(fields["meta"])
    params = VisualizationRequest.model_validate(meta["params"])
    objective = fields.get("objective")
    return JobStatus(
        id=meta["id"],
        model_id=meta["model_id"],
        status=fields["status"],  # type: ignore[arg-type]
        progress=JobProgress(step=int(fields.get("step") or 0), total=params.steps,
                             objective=float(objective) if objective else None),
        params=params,
        created_at=_datetime(meta["created_at"]),  # type: ignore[arg-type]
        started_at=_datetime(fields.get("started_at")),
        finished_at=_datetime(fields.get("finished_at")),
        error=ErrorDetail.model_validate_json(fields["error"]) if fields.get("error") else None,
        result=VisualizationResult.model_validate_json(result) if result and fields["status"] == "succeeded"
        else None,
    )


def create_job_store(job_store: str, max_finished_jobs: int, ttl_s: float) -> JobStore:
    """`memory` or a Redis URL (`redis://host:port/db`, `rediss://` for TLS)."""
    if job_store == "memory":
        return MemoryJobStore(max_finished_jobs)
    log.info("visualization jobs are recorded in Redis at %s (kept %gs after they finish)", redacted(job_store), ttl_s)
    return RedisJobStore(job_store, ttl_s)


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


__all__ = ["ACTIVE", "JobStore", "JobStoreError", "MemoryJobStore", "RedisJobStore", "create_job_store",
           "redacted", "replica_lost_error"]
