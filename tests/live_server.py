"""A real `lowbit serve` on 127.0.0.1 in a subprocess, for the server tests and benchmarks/serve_load.py."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx   # the HTTP client the openai package itself uses

API_KEY = "test-key"
NAME = "smollm2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `lowbit serve` subprocess; `url` is its root, `log()` what it printed."""

    def __init__(self, *args: str, ready_timeout: float = 120.0, argv: list[str] | None = None):
        """`lowbit serve ARGS` (or `argv`, another server command that takes --port), waited for until /health
        answers."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = Path(os.environ.get("TMPDIR", "/tmp")) / f"lowbit-serve-{self.port}.log"
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        cmd = argv or [sys.executable, "-m", "lowbit.cli.main", "serve", "--served-model-name", NAME,
                       "--log-level", "warning"]
        with open(self._log, "w") as log:
            self.proc = subprocess.Popen([*cmd, "--port", str(self.port), *args], stdout=subprocess.DEVNULL,
                                         stderr=log, env=env)
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lowbit serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"lowbit serve did not come up in {ready_timeout} s:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        return self._log.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """The /metrics samples as {name{labels}: value} (parsed by prometheus_client's own parser)."""
        from prometheus_client.parser import text_string_to_metric_families
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
                out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
        return out

    def wait_idle(self, timeout: float = 60.0) -> dict[str, float]:
        """Poll /metrics until no request runs or waits; returns the metrics then."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["lowbit_num_requests_running"] == 0 and m["lowbit_num_requests_waiting"] == 0:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout} s: {m}")
            time.sleep(0.1)

    def stop(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)
