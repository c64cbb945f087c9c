"""The server under test: `python -m service serve` as a subprocess on loopback, with a generated configuration."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import yaml


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def write_config(path: Path, server: dict[str, Any], models: list[dict[str, Any]]) -> Path:
    """A YAML configuration file (the server reads TOML or YAML) with these server keys and models."""
    path.write_text(yaml.safe_dump({**server, "models": models}, sort_keys=False), encoding="utf-8")
    return path


class ServerProcess:
    """Starts the server, waits until /readyz says every model is warm, and stops it (SIGTERM) on exit.

    `command` (a function of the port) starts another server instead, e.g. a peer of the comparison, ready when
    `ready_path` answers 200; its output goes to `log_name` in `workdir`."""

    def __init__(self, config_path: Path | None, workdir: Path, host: str = "127.0.0.1",
                 ready_timeout_s: float = 600.0, env: dict[str, str] | None = None,
                 command: Callable[[int], list[str]] | None = None, ready_path: str = "/readyz",
                 log_name: str = "server.log") -> None:
        self.config_path = config_path
        self.host = host
        self.port = free_port(host)
        self.command = command
        self.ready_path = ready_path
        self.log_path = workdir / log_name
        self.ready_timeout_s = ready_timeout_s
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def get_json(self, path: str, timeout: float = 10.0) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, None

    def __enter__(self) -> ServerProcess:
        if self.command is not None:
            command = self.command(self.port)
        else:
            command = [sys.executable, "-m", "service", "serve", "--config", str(self.config_path),
                       "--host", self.host, "--port", str(self.port)]
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("HF_HUB_OFFLINE", "1")  # a benchmark never waits on the network for weights
        started = time.perf_counter()
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        # A peer runs in its own process group: LitServe's workers are its children, and all of them stop with it.
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=self.command is not None)
        log.close()
        deadline = started + self.ready_timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.process.returncode} during start-up:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + self.ready_path, timeout=2.0) as response:
                    if response.status == 200:
                        break
            except (OSError, ValueError):
                pass
            if time.perf_counter() > deadline:
                self.__exit__(None, None, None)
                raise TimeoutError(f"the server was not ready within {self.ready_timeout_s:g}s:\n{self.log_tail()}")
            time.sleep(0.2)
        self.startup_s = time.perf_counter() - started
        return self

    def __exit__(self, *_: object) -> None:
        if self.process is None:
            return
        if self.command is not None:
            self._stop_group()
            return
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=0.3)
        except subprocess.TimeoutExpired:
            # A second signal skips the rest of the drain (no load balancer here to drain for); the requests in
            # flight still finish.
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _stop_group(self) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever of the group is left (workers)
        except ProcessLookupError:
            pass
        if self.process.poll() is None:
            self.process.wait()


def run_load(server: ServerProcess, points: list[dict[str, Any]], workdir: Path,
             timeout_s: float) -> list[dict[str, Any]]:
    """Run load points in a separate load-generator process (so its CPU use is measured apart)."""
    spec_path, result_path = workdir / "load_spec.json", workdir / "load_result.json"
    spec_path.write_text(json.dumps({"base_url": server.base_url, "server_pid": server.pid, "points": points,
                                     "timeout_s": 120.0}), encoding="utf-8")
    result_path.unlink(missing_ok=True)
    completed = subprocess.run([sys.executable, "-m", "benchmarks.loadgen", str(spec_path), str(result_path)],
                               capture_output=True, text=True, timeout=timeout_s)
    if completed.returncode != 0:
        raise RuntimeError(f"the load generator failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    return json.loads(result_path.read_text(encoding="utf-8"))


def load_point(name: str, path: str, concurrency: int, body_file: Path, content_type: str,
               options: Any) -> dict[str, Any]:
    return {"name": name, "path": path, "concurrency": concurrency, "body_file": str(body_file),
            "content_type": content_type, "warmup_s": options.warmup_s, "duration_s": options.duration_s,
            "max_requests": options.requests}


def load_timeout(points: list[dict[str, Any]]) -> float:
    return 120.0 + sum(p["warmup_s"] + p["duration_s"] + 60.0 for p in points)
