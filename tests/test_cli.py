"""The `sessionkeeper` CLI: every command, its --json output, and one-line errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from sessionkeeper import FrozenClock, open_store_sync
from sessionkeeper.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_sessionkeeper_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests name their store and tenant; the developer's SESSIONKEEPER_* must not leak in."""
    for name in [name for name in os.environ if name.startswith("SESSIONKEEPER_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "cli.db"


@pytest.fixture
def url(db: Path) -> str:
    return f"sqlite:///{db}"


def make_folder(url: str, owner: str) -> str:
    """The CLI has no folder commands yet: make one with the library."""
    with open_store_sync(url) as store:
        return store.create_folder("work", owner=owner).id


def run(url: str, *args: str, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(app, ["--url", url, *args], env=env)


def run_json(url: str, *args: str) -> Any:
    """Run a command with --json; it must succeed and print only JSON, only on stdout."""
    result = run(url, *args, "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    return json.loads(result.stdout)


def ids(page: dict[str, Any]) -> list[str]:
    return [item["id"] for item in page["items"]]


# --- create and show -------------------------------------------------------------------


def test_create_takes_every_field_and_prints_the_session(url: str) -> None:
    folder = make_folder(url, "alice")
    session = run_json(
        url,
        "create",
        "--id", "s1",
        "--owner", "alice",
        "--folder", folder,
        "--title", "Job post",
        "--status", "completed",
        "--step", "review",
        "--state", '{"draft": {"title": "Engineer"}, "n": 1}',
        "--metadata", '{"source": "web"}',
        "--ttl", "3600",
        "--idle-ttl", "600",
    )  # fmt: skip
    assert session["id"] == "s1"
    assert session["tenant"] == "default"
    assert (session["owner"], session["folder"], session["title"]) == ("alice", folder, "Job post")
    assert (session["status"], session["step"]) == ("completed", "review")
    assert session["state"] == {"draft": {"title": "Engineer"}, "n": 1}
    assert session["metadata"] == {"source": "web"}
    assert session["expires_at"] is not None
    assert session["idle_ttl"] == 600
    assert session["version"] == 1


def test_create_with_no_options_generates_an_id_and_show_reads_it_back(url: str) -> None:
    created = run_json(url, "create")
    assert created["status"] == "active"
    assert created["state"] == {}
    assert created["expires_at"] is None
    # "--": a generated id may start with "-" (1 in 64), which would read as an option
    shown = run(url, "show", "--json", "--", created["id"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout) == created


def test_show_prints_a_panel_with_state_and_aggregates(url: str) -> None:
    run_json(url, "create", "--id", "s1", "--title", "[bold]plan[/bold] :smile:",
             "--state", '{"goal": "ship"}')  # fmt: skip
    run_json(url, "append", "s1", "user", "hi", "--input-tokens", "7")
    result = run(url, "show", "s1")
    assert result.exit_code == 0, result.output
    assert "session s1" in result.stdout
    assert '"goal": "ship"' in result.stdout
    assert "7 in, 0 out" in result.stdout
    assert "1 (last seq 1)" in result.stdout
    # user text is shown as typed: neither rich markup nor emoji codes
    assert "[bold]plan[/bold] :smile:" in result.stdout


def test_create_prints_the_session_without_json(url: str) -> None:
    result = run(url, "create", "--id", "s1", "--owner", "alice")
    assert result.exit_code == 0, result.output
    assert "session s1" in result.stdout
    assert "alice" in result.stdout
    assert result.stderr == ""


# --- messages --------------------------------------------------------------------------


def test_append_stores_text_or_json_content_with_tokens_cost_and_metadata(url: str) -> None:
    run_json(url, "create", "--id", "s1")
    text = run_json(url, "append", "s1", "user", '{"not": "parsed"}', "--input-tokens", "12")
    assert (text["seq"], text["role"], text["content"]) == (1, "user", '{"not": "parsed"}')
    assert text["input_tokens"] == 12
    item = run_json(
        url, "append", "s1", "assistant", '{"type": "tool_call", "args": [1, 2]}',
        "--json-content", "--output-tokens", "30", "--cost", "0.25",
        "--metadata", '{"model": "m1"}',
    )  # fmt: skip
    assert item["seq"] == 2
    assert item["content"] == {"type": "tool_call", "args": [1, 2]}
    assert (item["output_tokens"], item["cost"], item["metadata"]) == (30, 0.25, {"model": "m1"})
    session = run_json(url, "show", "s1")
    assert (session["message_count"], session["last_seq"]) == (2, 2)
    assert (session["input_tokens"], session["output_tokens"], session["cost"]) == (12, 30, 0.25)


def test_append_prints_the_message_without_json(url: str) -> None:
    run_json(url, "create", "--id", "s1")
    result = run(url, "append", "s1", "user", "hello there")
    assert result.exit_code == 0, result.output
    assert "hello there" in result.stdout


def test_messages_pages_with_after_and_limit_or_takes_the_last(url: str) -> None:
    run_json(url, "create", "--id", "s1")
    for n in range(1, 6):
        run_json(url, "append", "s1", "user", f"m{n}")

    def seqs(*args: str) -> list[int]:
        return [m["seq"] for m in run_json(url, "messages", "s1", *args)]

    assert seqs() == [1, 2, 3, 4, 5]
    assert seqs("--after", "2", "--limit", "2") == [3, 4]
    assert seqs("--last", "2") == [4, 5]
    assert [m["content"] for m in run_json(url, "messages", "s1", "--last", "1")] == ["m5"]
    result = run(url, "messages", "s1")
    assert result.exit_code == 0, result.output
    assert "m1" in result.stdout
    assert "m5" in result.stdout


# --- list ------------------------------------------------------------------------------


@pytest.fixture
def sessions(url: str) -> str:
    """Four sessions, created in this order; returns the store URL."""
    run_json(url, "create", "--id", "a1", "--owner", "alice", "--title", "Job post draft")
    run_json(url, "create", "--id", "a2", "--owner", "alice", "--status", "completed",
             "--folder", make_folder(url, "alice"))  # fmt: skip
    run_json(url, "create", "--id", "b1", "--owner", "bob", "--title", "Tutoring")
    run_json(url, "create", "--id", "c1", "--title", "Another JOB")
    return url


def test_list_filters_by_owner_folder_status_and_title(sessions: str) -> None:
    assert sorted(ids(run_json(sessions, "list", "--owner", "alice"))) == ["a1", "a2"]
    folder = run_json(sessions, "show", "a2")["folder"]
    assert ids(run_json(sessions, "list", "--folder", folder)) == ["a2"]
    assert ids(run_json(sessions, "list", "--status", "completed")) == ["a2"]
    assert sorted(ids(run_json(sessions, "list", "--title", "job"))) == ["a1", "c1"]
    page = run_json(sessions, "list", "--owner", "alice", "--status", "active")
    assert page == {"items": page["items"], "next_cursor": None}
    assert ids(page) == ["a1"]
    assert "state" not in page["items"][0]


def test_list_orders_newest_first_unless_asc(sessions: str) -> None:
    newest_first = ids(run_json(sessions, "list"))
    assert sorted(newest_first) == ["a1", "a2", "b1", "c1"]
    assert ids(run_json(sessions, "list", "--asc")) == newest_first[::-1]
    run_json(sessions, "append", "a1", "user", "touch")
    assert ids(run_json(sessions, "list", "--order", "updated_at"))[0] == "a1"


def test_list_pages_through_every_session_with_the_cursor(sessions: str) -> None:
    seen: list[str] = []
    cursor: str | None = None
    while True:
        args = ["list", "--limit", "3"] + ([] if cursor is None else ["--cursor", cursor])
        page = run_json(sessions, *args)
        seen += ids(page)
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == ["a1", "a2", "b1", "c1"]
    assert len(seen) == 4


def test_list_prints_a_table_and_the_whole_next_cursor(sessions: str) -> None:
    cursor = run_json(sessions, "list", "--limit", "2")["next_cursor"]
    result = run(sessions, "list", "--limit", "2")
    assert result.exit_code == 0, result.output
    assert f"next cursor: {cursor}\n" in result.stdout
    assert "alice" not in run(sessions, "list", "--owner", "bob").stdout
    assert "b1" in run(sessions, "list", "--owner", "bob").stdout


# --- stats and purge -------------------------------------------------------------------


def test_stats_counts_sessions_completion_and_top_owners(sessions: str) -> None:
    stats = run_json(sessions, "stats", "--top", "2")
    assert (stats["total"], stats["active"], stats["completed"]) == (4, 3, 1)
    assert stats["recently_active"] == 4
    assert stats["completion_rate"] == pytest.approx(0.25)
    assert stats["top_owners"][0] == {"owner": "alice", "sessions": 2}
    assert len(stats["top_owners"]) == 2
    assert len(run_json(sessions, "stats", "--top", "1")["top_owners"]) == 1
    result = run(sessions, "stats")
    assert result.exit_code == 0, result.output
    assert "25.0%" in result.stdout
    assert "alice" in result.stdout


def test_stats_counts_within_active_hours_and_refuses_a_bad_window(sessions: str) -> None:
    stats = run_json(sessions, "stats", "--active-hours", "0.5")
    assert (stats["recently_active"], stats["active_hours"]) == (4, 0.5)
    assert "updated in last 0.5 h" in run(sessions, "stats", "--active-hours", "0.5").stdout
    expect_error(run(sessions, "stats", "--active-hours", "0"), 2, "error: active_hours: ")


def test_analytics_prints_periods_and_owners_by_cost(sessions: str) -> None:
    run_json(sessions, "append", "a1", "user", "hi", "--input-tokens", "5", "--cost", "0.25")
    found = run_json(sessions, "analytics", "--days", "2")
    assert [p["created"] for p in found["series"]] == [0, 4]
    assert (found["totals"]["messages"], found["totals"]["cost"]) == (1, 0.25)
    assert found["owners"][0] == {
        "owner": "alice",
        "start": found["end"],
        "created": 2,
        "messages": 1,
        "input_tokens": 5,
        "output_tokens": 0,
        "tokens": 5,
        "cost": 0.25,
    }
    assert run_json(sessions, "analytics", "--no-owner")["totals"]["created"] == 1
    assert run_json(sessions, "analytics", "--owner", "bob")["totals"]["created"] == 1
    months = run_json(sessions, "analytics", "--days", "90", "--group-by", "month")
    assert sum(p["created"] for p in months["series"]) == 4
    shown = run(sessions, "analytics", "--days", "2")
    assert shown.exit_code == 0, shown.output
    assert "owners by cost" in shown.stdout
    assert "alice" in shown.stdout


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--days", "0"], "days"),
        (["--group-by", "year"], "group_by"),
        (["--until", "2026-13-01"], "--until"),
        (["--owner", "a", "--no-owner"], "--no-owner"),
        (["--top", "1001"], "top"),
    ],
)
def test_analytics_refuses_bad_options_naming_them(url: str, args: list[str], field: str) -> None:
    expect_error(run(url, "analytics", *args), 2, f"error: {field}: ")


def _expired_session(url: str, tenant: str) -> None:
    """A session whose TTL ran out long ago: made by the library with a clock in the past."""
    with open_store_sync(url, tenant=tenant, clock=FrozenClock()) as store:
        store.create_session(ttl=60)


def test_purge_removes_expired_sessions_of_the_tenant_or_of_all(url: str) -> None:
    run_json(url, "create", "--id", "live")
    _expired_session(url, "default")
    _expired_session(url, "default")
    _expired_session(url, "other")
    assert run_json(url, "purge") == {"purged": 2}
    assert run_json(url, "purge") == {"purged": 0}
    result = run(url, "purge", "--all-tenants")
    assert result.exit_code == 0, result.output
    assert "purged 1 expired sessions in all tenants" in result.stdout
    assert ids(run_json(url, "list")) == ["live"]


# --- store and tenant selection --------------------------------------------------------


def test_tenant_option_and_environment_variables_choose_the_store(url: str) -> None:
    run_json(url, "create", "--id", "s1")
    assert ids(run_json(url, "--tenant", "t2", "list")) == []
    run_json(url, "--tenant", "t2", "create", "--id", "s2")
    by_env = runner.invoke(
        app, ["list", "--json"], env={"SESSIONKEEPER_URL": url, "SESSIONKEEPER_TENANT": "t2"}
    )
    assert by_env.exit_code == 0, by_env.output
    assert ids(json.loads(by_env.stdout)) == ["s2"]
    assert ids(run_json(url, "list")) == ["s1"]


# --- bad input -------------------------------------------------------------------------


def expect_error(result: Result, code: int, prefix: str) -> str:
    """The command failed with ``code`` and printed one ``error:`` line on stderr only."""
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("args", "prefix"),
    [
        (["--state", "[1]"], "error: state: must be a JSON object, not list"),
        (["--state", "{bad"], "error: state: is not valid JSON: "),
        (["--metadata", '"text"'], "error: metadata: must be a JSON object, not str"),
        (["--metadata", "[" * 100_000], "error: metadata: "),
        (["--id", "../x"], "error: session_id: "),
        (["--status", "done"], "error: status: "),
        (["--ttl", "-5"], "error: ttl: "),
        (["--title", "a\nb"], "error: title: "),
    ],
)
def test_create_rejects_bad_input_and_writes_nothing(
    url: str, args: list[str], prefix: str
) -> None:
    expect_error(run(url, "create", *args), 2, prefix)
    expect_error(run(url, "create", "--json", *args), 2, prefix)
    assert run_json(url, "list")["items"] == []


def test_json_that_does_not_parse_is_refused_before_the_store_is_opened(url: str, db: Path) -> None:
    expect_error(run(url, "create", "--state", "{bad"), 2, "error: state: is not valid JSON")
    assert not db.exists()


def test_the_state_error_reads_as_the_issue_asks(url: str) -> None:
    line = expect_error(run(url, "create", "--state", "[]"), 2, "error: ")
    assert line == "error: state: must be a JSON object, not list"


@pytest.mark.parametrize(
    ("args", "code", "prefix"),
    [
        (["show", "../x"], 2, "error: session_id: "),
        (["show", "missing"], 1, "error: no session 'missing'"),
        (["append", "missing", "user", "hi"], 1, "error: no session 'missing'"),
        (["append", "s1", "user", "{x", "--json-content"], 2, "error: content: is not valid JSON"),
        (["append", "s1", "user", "hi", "--metadata", "[]"], 2, "error: metadata: "),
        (["append", "s1", "user", "hi", "--cost", "-1"], 2, "error: cost: "),
        (["append", "s1", "", "hi"], 2, "error: role: "),
        (["messages", "missing"], 1, "error: no session 'missing'"),
        (["messages", "s1", "--limit", "0"], 2, "error: limit: "),
        (["messages", "s1", "--last", "2", "--after", "1"], 2, "error: last: give either"),
        (["list", "--status", "done"], 2, "error: status: "),
        (["list", "--order", "title"], 2, "error: order_by: "),
        (["list", "--cursor", "not-a-cursor"], 2, "error: cursor: "),
        (["list", "--limit", "0"], 2, "error: limit: "),
        (["stats", "--top", "1000"], 2, "error: top: "),
        (["create", "--id", "s1"], 1, "error: session 's1' already exists"),
        (["--tenant", "../t", "list"], 2, "error: tenant: "),
    ],
)
def test_bad_input_gives_one_line_and_an_exit_code(
    url: str, args: list[str], code: int, prefix: str
) -> None:
    before = run_json(url, "create", "--id", "s1")
    expect_error(run(url, *args), code, prefix)
    expect_error(run(url, *args, "--json"), code, prefix)
    assert run_json(url, "show", "s1") == before
    assert ids(run_json(url, "list")) == ["s1"]


def test_an_unknown_url_scheme_is_bad_input() -> None:
    expect_error(run("nosuch://x", "list"), 2, "error: url: unknown store URL 'nosuch://x'")


def test_a_store_that_cannot_open_fails_with_exit_code_1(tmp_path: Path) -> None:
    expect_error(run(f"sqlite:///{tmp_path / 'missing' / 'x.db'}", "list"), 1, "error: ")


def test_a_bad_setting_in_the_environment_is_one_line(url: str) -> None:
    result = run(url, "list", env={"SESSIONKEEPER_MAX_DEPTH": "deep"})
    expect_error(result, 2, "error: SESSIONKEEPER_MAX_DEPTH: ")


def test_usage_errors_exit_2_without_a_traceback(url: str) -> None:
    for args in (["list", "--limit", "many"], ["show"], ["create", "--no-such-option"]):
        result = run(url, *args)
        assert result.exit_code == 2, result.output
        assert result.stdout == ""
        assert "Traceback" not in result.output


# --- the installed entry point ---------------------------------------------------------


def test_the_installed_console_script_runs_end_to_end(url: str) -> None:
    script = Path(sys.executable).with_name("sessionkeeper")
    if not script.exists():
        pytest.skip("the sessionkeeper console script is not installed next to this Python")

    def call(*args: str) -> subprocess.CompletedProcess[str]:
        env = {"SESSIONKEEPER_URL": url, "PATH": str(script.parent)}
        return subprocess.run(
            [str(script), *args], capture_output=True, text=True, env=env, check=False
        )

    created = call("create", "--id", "e2e", "--state", '{"n": 1}', "--json")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["state"] == {"n": 1}
    assert call("append", "e2e", "user", "hello").returncode == 0
    shown = call("show", "e2e", "--json")
    assert json.loads(shown.stdout)["message_count"] == 1
    bad = call("create", "--state", "[1]")
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr == "error: state: must be a JSON object, not list\n"


# --- export, import, migrate, verify ---------------------------------------------------


def invoke_json(*args: str, code: int = 0) -> Any:
    """Run a command with --json; it must print only JSON on stdout and exit with code."""
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


@pytest.fixture
def filled(url: str) -> str:
    folder = make_folder(url, "alice")
    for n in range(3):
        run_json(url, "create", "--id", f"s{n}", "--owner", "alice", "--folder", folder)
        run_json(url, "append", f"s{n}", "user", f"hello {n}", "--input-tokens", "3")
    return url


def test_export_then_import_round_trips_through_a_file(filled: str, tmp_path: Path) -> None:
    path = tmp_path / "all.jsonl.gz"
    exported = invoke_json("export", filled, "-o", str(path))
    assert (exported["sessions"], exported["messages"], exported["folders"]) == (3, 3, 1)
    copy = f"sqlite:///{tmp_path / 'copy.db'}"
    imported = invoke_json("import", copy, str(path))
    assert (imported["imported"], imported["failed"], imported["folders_imported"]) == (3, 0, 1)
    again = invoke_json("import", copy, str(path), "--on-conflict", "overwrite", "--dry-run")
    assert (again["dry_run"], again["imported"]) == (True, 3)
    second = tmp_path / "copy.jsonl.gz"
    invoke_json("export", copy, "-o", str(second))
    assert second.read_bytes() == path.read_bytes()


def test_migrate_copies_verifies_and_runs_again_without_change(filled: str, tmp_path: Path) -> None:
    target = f"sqlite:///{tmp_path / 'target.db'}"
    dry = invoke_json("migrate", filled, target, "--dry-run")
    assert (dry["dry_run"], dry["copied"]) == (True, 3)
    report = invoke_json("migrate", filled, target, "--verify")
    assert (report["copied"], report["messages"], report["folders_copied"]) == (3, 3, 1)
    assert report["verify"]["ok"] is True
    again = invoke_json("migrate", filled, target)
    assert (again["copied"], again["unchanged"]) == (0, 3)
    assert invoke_json("verify", filled, target)["matched"] == 3
    run_json(target, "append", "s1", "user", "only in the target")
    differs = invoke_json("verify", filled, target, code=1)
    assert (differs["ok"], differs["samples"]) == (False, ["different: default/s1"])


def test_transfer_commands_print_a_report_without_json(filled: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["migrate", filled, f"sqlite:///{tmp_path / 't.db'}"])
    assert result.exit_code == 0, result.output
    assert "migrate" in result.stdout
    assert "copied" in result.stdout


def test_a_bad_import_line_names_the_line_and_exits_2(filled: str, tmp_path: Path) -> None:
    path = tmp_path / "all.jsonl"
    invoke_json("export", filled, "-o", str(path))
    rows = path.read_text().splitlines()
    rows[3] = rows[3].replace('"status":"active"', '"status":"done"')
    path.write_text("\n".join(rows) + "\n")
    copy = f"sqlite:///{tmp_path / 'copy.db'}"
    line = expect_error(runner.invoke(app, ["import", copy, str(path)]), 2, "error: line 4: ")
    assert line == "error: line 4: status: must be one of active, completed, archived, not 'done'"
    report = invoke_json("import", copy, str(path), "--keep-going", code=2)
    assert (report["imported"], report["skipped"], report["failed"]) == (1, 1, 1)
    assert report["errors"] == [{"line": 4, "error": line.removeprefix("error: ")}]


@pytest.mark.parametrize(
    ("args", "code", "prefix"),
    [
        (["export", "{url}", "-o", "{tmp}/x.csv"], 2, "error: path: must end with .jsonl"),
        (["export", "nosuch://x", "-o", "{tmp}/x.jsonl"], 2, "error: url: unknown store URL"),
        (["export", "{url}", "-o", "{tmp}/x.jsonl", "--concurrency", "0"], 2, "error: concurrency"),
        (["import", "{url}", "{tmp}/missing.jsonl"], 2, "error: path: cannot read"),
        (["import", "{url}", "{tmp}/x.jsonl", "--on-conflict", "merge"], 2, "error: on_conflict"),
        (["import", "{url}", "{tmp}/x.jsonl", "--on-conflict", "fail"], 1, "error: line 2: "),
        (["migrate", "{url}", "memory://x"], 2, "error: url: memory:// takes no host"),
        (["migrate", "{url}", "{url}", "--concurrency", "999"], 2, "error: concurrency"),
        (["verify", "{url}", "sqlite:///{tmp}/no/such/dir.db"], 1, "error: sqlite: the folder"),
    ],
)
def test_transfer_commands_refuse_bad_input_in_one_line(
    filled: str, tmp_path: Path, args: list[str], code: int, prefix: str
) -> None:
    invoke_json("export", filled, "-o", str(tmp_path / "x.jsonl"))
    argv = [a.format(url=filled, tmp=tmp_path) for a in args]
    expect_error(runner.invoke(app, argv), code, prefix)
    expect_error(runner.invoke(app, [*argv, "--json"]), code, prefix)


def test_backup_copies_a_sqlite_store_or_exports_and_both_restore(
    filled: str, tmp_path: Path
) -> None:
    copy = tmp_path / "copy.db"
    report = invoke_json("backup", filled, str(copy))
    assert (report["method"], report["bytes"]) == ("sqlite-backup", copy.stat().st_size)
    assert ids(run_json(f"sqlite:///{copy}", "list", "--asc")) == ["s0", "s1", "s2"]
    exported = invoke_json("backup", filled, str(tmp_path / "all.jsonl.gz"))
    assert (exported["method"], exported["export"]["sessions"]) == ("export", 3)
    restored = f"sqlite:///{tmp_path / 'restored.db'}"
    assert invoke_json("import", restored, str(tmp_path / "all.jsonl.gz"))["imported"] == 3
    assert run_json(restored, "show", "s1") == run_json(filled, "show", "s1")


def test_backup_refuses_what_it_cannot_do(filled: str, db: Path, tmp_path: Path) -> None:
    for args, prefix in [
        (["memory://", str(tmp_path / "x.db")], "error: dest: a memory store is backed up by"),
        ([filled, str(db)], "error: dest: is the database itself"),
        ([filled, str(tmp_path / "no" / "x.db")], "error: dest: the folder"),
    ]:
        expect_error(runner.invoke(app, ["backup", *args]), 2, prefix)
