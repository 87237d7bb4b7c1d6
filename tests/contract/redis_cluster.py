"""A real 3-master Redis Cluster on loopback ports, started once per test run."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest

MASTERS = 3
START_TIMEOUT = 30.0


def _free_ports(count: int) -> list[int]:
    """Ports free now, each with its cluster bus port (+10000) free too."""
    ports: list[int] = []
    candidate = 17_100
    while len(ports) < count and candidate < 20_000:
        if all(_free(p) for p in (candidate, candidate + 10_000)):
            ports.append(candidate)
        candidate += 1
    if len(ports) < count:
        raise RuntimeError("no free loopback ports for the Redis Cluster")
    return ports


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cli(port: int, *args: str) -> str:
    return subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    ).stdout


def _answers(port: int, command: str, expected: str) -> Callable[[], bool]:
    def check() -> bool:
        return expected in _cli(port, *command.split())

    return check


def _wait(condition: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"the Redis Cluster did not come up: {condition}")


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[str]:
    """Start the cluster, yield one node's ``host:port``, and stop it afterwards."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        raise RuntimeError("redis-server and redis-cli are needed (Debian: redis-server)")
    folder = tempfile.mkdtemp(prefix="sessionkeeper-cluster-")
    ports = _free_ports(MASTERS)
    servers = [
        subprocess.Popen(
            [
                "redis-server",
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", "2000",
                "--save", "",
                "--appendonly", "no",
                "--dir", folder,
                "--logfile", f"{folder}/redis-{port}.log",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]  # fmt: skip
    try:
        for port in ports:
            _wait(f"port {port} answers", _answers(port, "ping", "PONG"))
        subprocess.run(
            [
                "redis-cli",
                "--cluster", "create",
                *(f"127.0.0.1:{port}" for port in ports),
                "--cluster-replicas", "0",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=30,
            check=True,
        )  # fmt: skip
        for port in ports:
            _wait(
                f"port {port} reports cluster_state:ok",
                _answers(port, "cluster info", "cluster_state:ok"),
            )
        yield f"127.0.0.1:{ports[0]}"
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(folder, ignore_errors=True)
