"""`sessionkeeper serve` as a real process on a free loopback port, for tests and benches."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

SESSIONKEEPER = str(Path(sys.executable).with_name("sessionkeeper"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class Served:
    """``sessionkeeper --url URL serve`` on a free port, stopped on leaving the block."""

    def __init__(self, url: str, *, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._output = ""
        self.process = subprocess.Popen(
            [SESSIONKEEPER, "--url", url, "serve", "--port", str(self.port)],
            env={**os.environ, "SESSIONKEEPER_HTTP_ACCESS_LOG": "false", **(env or {})},
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for /healthz to answer 200; fail with the process's output if it died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited {self.process.returncode}: {self.output()}")
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"serve did not answer within {timeout} s: {self.output()}")

    def output(self) -> str:
        """What the process printed (once it has exited; "" before)."""
        stdout = self.process.stdout
        if self.process.poll() is None or stdout is None:
            return self._output
        if not stdout.closed:
            self._output = stdout.read()
            stdout.close()
        return self._output

    def stop(self) -> str:
        """Stop the server (SIGINT, as Ctrl-C would) and return what it printed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.output()

    def __enter__(self) -> Served:
        self.wait_ready()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
