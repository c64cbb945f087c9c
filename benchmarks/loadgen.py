"""A closed-loop HTTP load generator, run as its own process: `python -m benchmarks.loadgen SPEC RESULT`.

Each of `concurrency` clients sends the same pre-encoded request again as soon as its previous answer arrives,
over its own keep-alive connection. The client is a minimal HTTP/1.1 one on asyncio streams (`Connection`): the
request bytes are built once, and an answer costs a status-line parse and a Content-Length read, so the load
generator takes little of the CPU it shares with the server (httpx took 2.4 ms of CPU per request here, this
0.1-0.3 ms). Requests completing during the warm-up are not counted; the measurement window then lasts
`duration_s` or until `max_requests` successful answers, whichever comes first.
The CPU used by the server, by this process and by the rest of the machine over the window is recorded.

Imports neither torch nor the server, so it stays light next to the server it measures.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchmarks.cpu import cpu_usage, snapshot


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of already sorted values."""
    if not sorted_values:
        return None
    position = (len(sorted_values) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


class Connection:
    """One keep-alive HTTP/1.1 connection that sends a fixed request and reads answers with a Content-Length."""

    def __init__(self, host: str, port: int, request: bytes, timeout_s: float) -> None:
        self.host, self.port, self.request, self.timeout_s = host, port, request, timeout_s
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def _exchange(self) -> tuple[int, bytes, bool]:
        if self.writer is None:
            await self._open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, keep_alive = None, True
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                keep_alive = False
            elif name == b"transfer-encoding":
                raise ValueError(f"unsupported transfer-encoding {value.strip().decode()!r}")
        if length is None:
            raise ValueError("answer without a Content-Length")
        return status, await self.reader.readexactly(length), keep_alive

    async def send(self) -> tuple[int, bytes]:
        """The status and body of one answer; the connection is reopened after an error or a `close`."""
        try:
            status, body, keep_alive = await asyncio.wait_for(self._exchange(), self.timeout_s)
        except BaseException:
            self.close()
            raise
        if not keep_alive:
            self.close()
        return status, body


def encode_request(host: str, port: int, path: str, content_type: str, body: bytes) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nAccept: application/json\r\n\r\n")
    return head.encode("latin-1") + body


@dataclass
class _Window:
    measuring: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    latencies_ms: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    first_error: str | None = None


async def _run_point(base_url: str, point: dict[str, Any], server_pid: int | None, timeout_s: float) -> dict[str, Any]:
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    request = encode_request(host, port, point["path"], point["content_type"], Path(point["body_file"]).read_bytes())
    concurrency = int(point["concurrency"])
    max_requests = point.get("max_requests")
    window = _Window()
    stop = False

    async def one_client() -> None:
        connection = Connection(host, port, request, timeout_s)
        try:
            while not stop:
                started = time.perf_counter()
                try:
                    code, content = await connection.send()
                    status = str(code)
                except Exception as exc:  # noqa: BLE001 - reported, not fatal
                    status, content = type(exc).__name__, str(exc).encode()
                elapsed_ms = (time.perf_counter() - started) * 1000.0
                if not window.measuring or stop:
                    continue
                if status == "200":
                    window.latencies_ms.append(elapsed_ms)
                    try:
                        window.batch_sizes.append(int(json.loads(content)["timings"]["batch_size"]))
                    except (ValueError, KeyError, TypeError):
                        pass
                    if max_requests is not None and len(window.latencies_ms) >= max_requests:
                        window.done.set()
                else:
                    window.errors[status] = window.errors.get(status, 0) + 1
                    if window.first_error is None:
                        window.first_error = f"{status}: {content[:300].decode(errors='replace')}"
        finally:
            connection.close()

    pids = {"server": server_pid, "client": None}
    tasks = [asyncio.create_task(one_client()) for _ in range(concurrency)]
    try:
        await asyncio.sleep(float(point.get("warmup_s", 0.0)))
        start = snapshot(pids)
        window.measuring = True
        try:
            await asyncio.wait_for(window.done.wait(), timeout=float(point["duration_s"]))
        except TimeoutError:
            pass
        end = snapshot(pids)
        window.measuring = False
    finally:
        stop = True
        done, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
    usage = cpu_usage(start, end)
    wall = float(usage["wall_s"])  # type: ignore[arg-type]
    latencies = sorted(window.latencies_ms)
    return {
        "name": point["name"],
        "path": point["path"],
        "concurrency": concurrency,
        "requests_ok": len(latencies),
        "errors": window.errors,
        "first_error": window.first_error,
        "window_s": wall,
        "throughput_rps": len(latencies) / wall if wall > 0 else 0.0,
        "latency_ms": {
            "p50": percentile(latencies, 50), "p95": percentile(latencies, 95), "p99": percentile(latencies, 99),
            "mean": sum(latencies) / len(latencies) if latencies else None,
        },
        "mean_batch_size": sum(window.batch_sizes) / len(window.batch_sizes) if window.batch_sizes else None,
        "cpu": usage,
        "cpu_ms_per_request": {
            role: (None if usage.get(f"{role}_cores") is None or not latencies
                   else usage[f"{role}_cores"] * wall * 1000.0 / len(latencies))  # type: ignore[operator]
            for role in ("server", "client")
        },
    }


async def run_points(spec: dict[str, Any]) -> list[dict[str, Any]]:
    timeout_s = float(spec.get("timeout_s", 120.0))
    return [await _run_point(spec["base_url"], point, spec.get("server_pid"), timeout_s) for point in spec["points"]]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m benchmarks.loadgen SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    try:
        import uvloop  # the lighter event loop, when installed (uvicorn[standard] brings it)

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    results = runner(run_points(spec))
    Path(argv[1]).write_text(json.dumps(results), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
