"""The server's resident memory before and after bursts of explanations, with and without giving memory back.

Starts the server (efficientnet_lite0, random weights, by default) once per variant, sends `--rounds` bursts of
`--concurrency` simultaneous /explain requests (gradcam + saliency), and reads the process's RSS (/proc, Linux) when
ready, at the peak of each burst, after each burst and after `--settle-s` idle seconds. Variants: `off` (no trimming:
SALIENCY_MALLOC_TRIM=0), `trim` (the default: malloc_trim after long batches, service/runtime/memory.py) and
`trim+arenas` (also MALLOC_ARENA_MAX=2). A measurement, not a test: figures vary with the machine and its load.

    python -m benchmarks.memory_burst [--variants off,trim,trim+arenas] [--concurrency 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS: dict[str, dict[str, str]] = {
    "off": {"SALIENCY_MALLOC_TRIM": "0"},
    "trim": {"SALIENCY_MALLOC_TRIM": "1"},
    "trim+arenas": {"SALIENCY_MALLOC_TRIM": "1", "MALLOC_ARENA_MAX": "2"},
}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def burst(base_url: str, model: str, body: dict[str, Any], concurrency: int, pid: int) -> tuple[int, float]:
    """`concurrency` explains at once; (answers with status 200, the highest RSS seen while they ran)."""
    import httpx

    peak = rss_mb(pid)
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        tasks = [asyncio.create_task(client.post(f"/v1/models/{model}/explain", json=body)) for _ in range(concurrency)]
        while not all(t.done() for t in tasks):
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.2)
        return sum(t.result().status_code == 200 for t in tasks), peak


def run_variant(name: str, args: argparse.Namespace, workdir: Path, body: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.server import ServerProcess, write_config

    model = {"id": "m", "architecture": args.architecture, "weights": "random", "fallback": "none"}
    config = write_config(workdir / f"{name}.yaml", {"log_level": "warning"}, [model])
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "SALIENCY_MALLOC_TRIM")}
    env |= VARIANTS[name]
    row: dict[str, Any] = {"variant": name, "rounds": []}
    with ServerProcess(config, workdir, env=env) as server:
        row["ready_mb"] = rss_mb(server.pid)
        for _ in range(args.rounds):
            started = time.perf_counter()
            ok, peak = asyncio.run(burst(server.base_url, "m", body, args.concurrency, server.pid))
            row["rounds"].append({"ok": ok, "seconds": time.perf_counter() - started, "peak_mb": peak,
                                  "after_mb": rss_mb(server.pid)})
        time.sleep(args.settle_s)
        row["settled_mb"] = rss_mb(server.pid)
    return row


def main(argv: list[str] | None = None) -> int:
    from benchmarks.burst import image_bytes

    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_burst", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="off,trim,trim+arenas")
    parser.add_argument("--architecture", default="efficientnet_lite0")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle-s", type=float, default=3.0)
    args = parser.parse_args(argv)
    if not Path("/proc/self/status").exists():
        print("needs Linux (/proc) to read the RSS", file=sys.stderr)
        return 2
    body = {"image": base64.b64encode(image_bytes(0, (451, 300))).decode("ascii"), "top_k": 1,
            "methods": ["gradcam", "saliency"], "target": "top1"}
    print(f"{args.architecture}: {args.rounds} bursts of {args.concurrency} explains (gradcam + saliency); RSS in MB")
    print(f"{'variant':<12} {'ready':>7} " + " ".join(f"{'peak' + str(i + 1):>7} {'after' + str(i + 1):>7}"
                                                   for i in range(args.rounds)) + f" {'settled':>8}  ok/s")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            row = run_variant(name, args, Path(tmp), body)
            rounds = row["rounds"]
            rate = sum(r["ok"] for r in rounds) / sum(r["seconds"] for r in rounds)
            print(f"{name:<12} {row['ready_mb']:>7.0f} "
                  + " ".join(f"{r['peak_mb']:>7.0f} {r['after_mb']:>7.0f}" for r in rounds)
                  + f" {row['settled_mb']:>8.0f}  {rate:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
