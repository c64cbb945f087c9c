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
from typing import Any

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
    """Starts the server, waits until /readyz says every model is warm, and stops it (SIGTERM) on exit."""

    def __init__(self, config_path: Path, workdir: Path, host: str = "127.0.0.1", ready_timeout_s: float = 600.0,
                 env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.host = host
        self.port = free_port(host)
        self.log_path = workdir / "server.log"
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
        command = [sys.executable, "-m", "service", "serve", "--config", str(self.config_path),
                   "--host", self.host, "--port", str(self.port)]
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("HF_HUB_OFFLINE", "1")  # a benchmark never waits on the network for weights
        started = time.perf_counter()
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = started + self.ready_timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.process.returncode} during start-up:\n"
                                   f"{self.log_tail()}")
            try:
                status, _ = self.get_json("/readyz", timeout=2.0)
                if status == 200:
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
        if self.process is None or self.process.poll() is not None:
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
