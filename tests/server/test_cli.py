"""`sessionkeeper keys` and `sessionkeeper serve`, and scripts/try, as a user runs them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from sessionkeeper.cli import app

from .processes import Served, free_port

ROOT = Path(__file__).resolve().parents[2]
TOKEN = re.compile(r"sk_[0-9a-f]{16}_[A-Za-z0-9_-]{43}")


def cli(url: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["--url", url, *args])
    return result.exit_code, result.output


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    code, out = cli(url, "--tenant", "acme", "keys", "create", "--name", "ci", "--json")
    assert code == 0, out
    made = json.loads(out)
    assert (made["tenant"], made["role"], made["name"]) == ("acme", "tenant", "ci")
    assert TOKEN.fullmatch(made["token"])
    code, out = cli(url, "keys", "create", "--role", "admin")
    assert code == 0
    assert TOKEN.search(out)

    code, out = cli(url, "--tenant", "acme", "keys", "list", "--json")
    listed = json.loads(out)
    assert [k["id"] for k in listed] == [made["id"]]
    assert "token" not in out
    assert made["token"] not in out
    code, out = cli(url, "keys", "list", "--all-tenants", "--json")
    assert [k["tenant"] for k in json.loads(out)] == ["acme", "default"]

    code, out = cli(url, "keys", "revoke", made["id"], "--json")
    assert code == 0
    assert json.loads(out)["revoked_at"] is not None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["keys", "create", "--role", "root"], "role: must be one of tenant, admin"),
        (["--tenant", "_server", "keys", "create"], "reserved"),
        (["keys", "revoke", "nope"], "key_id"),
        (["keys", "revoke", "0123456789abcdef"], "no key"),
    ],
)
def test_keys_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    code, out = cli(f"sqlite:///{tmp_path / 'keys.db'}", *args)
    assert code != 0
    assert message in out


def test_serve_prints_the_first_admin_key_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'served.db'}"
    with Served(url) as first:
        pass
    printed = first.output()
    assert f"at http://localhost:{first.port} (API docs: http://localhost:{first.port}/docs)" in (
        printed
    )
    tokens = TOKEN.findall(printed)
    assert len(tokens) == 2  # the key, and the same key in the curl line
    with Served(url) as second:
        me = httpx.get(f"{second.base}/v1/me", headers={"Authorization": f"Bearer {tokens[0]}"})
        assert me.json()["role"] == "admin"
    assert TOKEN.search(second.output()) is None


def test_scripts_try_serves_sqlite_in_the_current_folder(tmp_path: Path) -> None:
    """A bounded smoke test: start it, wait for /healthz, stop it with Ctrl-C. (With a
    venv that scripts/test set up, it installs nothing; else it may install first.)"""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONKEEPER_")}
    process = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "try"), "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, to stop all of it
    )
    try:
        deadline = time.monotonic() + 180
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).is_success:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        served = process.poll() is None and time.monotonic() < deadline
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            out = process.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out = process.communicate()[0]
    assert served, out
    assert "serving sqlite:///sessionkeeper.db" in out
    assert TOKEN.search(out)
    assert (tmp_path / "sessionkeeper.db").exists()


def test_the_readme_curl_walkthrough_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The HTTP service", 1)[1].split("\n## ", 1)[0]
    # the walkthrough, then the operations' examples, which use its variables
    block = "".join(b for b in re.findall(r"```sh\n(.*?)```", section, re.S) if "curl" in b)
    url = f"sqlite:///{tmp_path / 'readme.db'}"
    with Served(url) as served:
        pass  # the first start makes the admin key
    token = TOKEN.findall(served.output())[0]
    block = re.sub(r"(?m)^SK=.*$", f"SK={served.base}", block)
    block = re.sub(r"(?m)^KEY=.*$", f"KEY={token}", block)
    with Served(url) as served:
        block = re.sub(r"(?m)^SK=.*$", f"SK={served.base}", block)
        result = subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + block],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 0, result.stderr
    assert "urn:sessionkeeper:problem" not in result.stdout, result.stdout  # no call failed
    out = result.stdout
    assert "urn:sessionkeeper:problem" not in out, out
    for expected in ('"title":"Trip to Lisbon"', '"seq":1', '"budget":400', '"total":1'):
        assert expected in out, out


def test_import_sessionkeeper_pulls_in_no_web_framework() -> None:
    code = "import sys, sessionkeeper, sessionkeeper.cli; sys.exit('fastapi' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
