"""The admin page end to end: ``sessionkeeper serve`` on a SQLite store of two tenants, and
Debian's Chromium, headless, driven by Playwright (which downloads no browser of its own).

Without the browser or Playwright this test fails, never skips: ``scripts/test`` installs
both (``scripts/browser.sh``, the ``dev`` extra). A screenshot is saved under the test's
temporary folder and its path printed (``pytest -s`` shows it).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from sessionkeeper import FrozenClock, Settings, open_store
from sessionkeeper.keys import create_key

from .conftest import SECRET, Receiver
from .processes import Served

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = os.environ.get("SESSIONKEEPER_CHROMIUM", "/usr/bin/chromium")
# headless, and off the network: without these Chromium reaches for Google's hosts
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DAY = 86_400.0
XSS_TITLE = '<img src=x onerror="window.__xss = 1">Escaped'
XSS_TEXT = "<b>not bold</b><script>window.__xss = 2</script>"
WRONG_KEY = "sk_0123456789abcdef_" + "A" * 43


@dataclass
class Seeded:
    acme: str  # a tenant key of acme
    globex: str  # a tenant key of globex
    admin: str  # an admin key bound to acme
    created: list[float]  # when acme's sessions were created
    completed: list[float]  # when acme's completed sessions last changed


async def _seed(url: str) -> Seeded:
    """acme: a trip (completed, with messages), a job post (105 messages), a hotel search
    (archived), a session whose title and messages are HTML, and 22 of carol's; globex: one
    secret plan."""
    now = time.time()
    clock = FrozenClock(now - 3 * DAY)
    created: list[float] = []
    async with open_store(url, tenant="acme", settings=Settings(url=url), clock=clock) as acme:
        trip = await acme.create_session(
            owner="alice", title="Trip to Lisbon", state={"step": "flights", "budget": 400}
        )
        created.append(clock.now())
        await acme.append_messages(
            trip.id,
            [
                {"role": "user", "content": "Find me flights to Lisbon", "input_tokens": 12},
                {
                    "role": "assistant",
                    "content": {"tool": "search_flights", "to": "LIS"},
                    "output_tokens": 30,
                    "cost": 0.0021,
                },
                {"role": "assistant", "content": "Found 3 flights under 400."},
            ],
        )
        clock.set(now - 2 * DAY)
        await acme.update_session(trip.id, status="completed", step="booked")
        completed = [clock.now()]
        job = await acme.create_session(
            owner="bob", title="Job post: engineer", metadata={"source": "web"}
        )
        created.append(clock.now())
        await acme.append_message(job.id, "user", "Make it remote-friendly", input_tokens=9)
        more = [{"role": "assistant", "content": f"Draft {n}"} for n in range(2, 106)]
        await acme.append_messages(job.id, more)  # 105 in all: more than one page of 100
        clock.set(now - DAY)
        await acme.create_session(owner="alice", title="Lisbon hotels", status="archived")
        created.append(clock.now())
        clock.set(now)
        xss = await acme.create_session(owner="dave", title=XSS_TITLE)
        created.append(clock.now())
        await acme.append_message(xss.id, "user", XSS_TEXT)
        for n in range(22):
            await acme.create_session(owner="carol", title=f"Filler {n:02d}")
            created.append(clock.now())
        globex = acme.for_tenant("globex")
        await globex.create_session(owner="mallory", title="Globex secret plan")
        return Seeded(
            acme=(await create_key(acme, tenant="acme"))[1],
            globex=(await create_key(acme, tenant="globex"))[1],
            admin=(await create_key(acme, tenant="acme", role="admin"))[1],
            created=created,
            completed=completed,
        )


@pytest.fixture
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: pip install -e '.[dev]' (scripts/test does)")
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"no Chromium at {CHROMIUM}: run scripts/browser.sh (scripts/test does)")
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=FLAGS, timeout=30_000
            )
        except Error as exc:
            pytest.fail(f"Chromium at {CHROMIUM} does not start headless: {exc}")
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Served, Seeded]]:
    url = f"sqlite:///{tmp_path / 'ui.db'}"
    # in a thread of its own: Playwright's sync API keeps an event loop in this one
    with ThreadPoolExecutor(1) as pool:
        seeded = pool.submit(asyncio.run, _seed(url)).result()
    with Served(url) as served:
        yield served, seeded


def _sign_in(page: Page, key: str) -> None:
    page.fill("#key", key)
    page.click("#sign-in-form button[type=submit]")


def _titles(page: Page) -> list[str]:
    return page.locator("#session-rows button.open").all_inner_texts()


def _figure(page: Page, name: str) -> str:
    return page.locator(f'[data-figure="{name}"] dd').inner_text()


@pytest.mark.timeout(120)
def test_admin_page_in_chromium(
    browser: Browser, server: tuple[Served, Seeded], tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    served, seeded = server
    started = time.monotonic()
    context = browser.new_context(timezone_id="UTC", viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(10_000)
    page = context.new_page()
    titles = page.locator("#session-rows button.open")
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: errors.append(f"dialog: {dialog.message}"))

    # load: the page asks for a key
    page.goto(f"{served.base}/ui")
    assert page.url == f"{served.base}/ui/"
    expect(page.locator("#sign-in")).to_be_visible()
    expect(page.locator("#dashboard")).to_be_hidden()

    # a wrong key is refused, with the server's reason
    _sign_in(page, WRONG_KEY)
    expect(page.locator("#sign-in-error")).to_contain_text("wrong, unknown or revoked")
    expect(page.locator("#dashboard")).to_be_hidden()
    assert page.evaluate("sessionStorage.length") == 0

    # acme's tenant key: its stats, the chart, its sessions
    _sign_in(page, seeded.acme)
    expect(page.locator("#identity")).to_contain_text("tenant key")
    expect(page.locator("#identity")).to_contain_text("of tenant acme")
    expect(page.locator("#tenant-picker")).to_be_hidden()
    expect(page.locator('[data-figure="Sessions"] dd')).to_have_text("26")
    assert _figure(page, "Completed") == "1"
    assert _figure(page, "Archived") == "1"
    assert _figure(page, "Completion rate") == "3.8%"
    assert _figure(page, "Input tokens") == "21"
    expect(page.locator("#top-owners li").first).to_contain_text("carol — 22")
    expect(page.locator("#top-costs li").first).to_contain_text("alice — 0.0021")

    bars = page.locator("#chart svg rect.bar")
    expect(bars).to_have_count(28)
    shown: dict[str, Counter[str]] = {"created": Counter(), "completed": Counter()}
    for bar in bars.all():
        kind, day = bar.get_attribute("data-kind"), bar.get_attribute("data-day")
        assert kind is not None
        assert day is not None
        shown[kind][day] += int(bar.get_attribute("data-count") or "0")

    def per_day(times: list[float]) -> Counter[str]:
        return Counter(datetime.fromtimestamp(t, UTC).date().isoformat() for t in times)

    assert +shown["created"] == per_day(seeded.created)
    assert +shown["completed"] == per_day(seeded.completed)

    # the analytics tab: the same activity as history per UTC day, then per month
    page.click("#tab-analytics")
    total = page.locator("#analytics-rows tr.total td")
    expect(total.nth(1)).to_have_text(str(len(seeded.created)))
    expect(page.locator("#analytics-rows tr")).to_have_count(31)  # 30 days and the total
    assert [total.nth(i).inner_text() for i in (2, 3, 4)] == ["1", "109", "51"]
    expect(page.locator("#analytics-owner-rows")).to_contain_text("carol")
    expect(page.locator("#analytics-owner-rows")).not_to_contain_text("mallory")
    page.select_option("#analytics-group", "month")
    page.click("#analytics-form button[type=submit]")
    expect(page.locator("#analytics-rows tr")).not_to_have_count(31)
    expect(total.nth(1)).to_have_text(str(len(seeded.created)))
    page.click("#tab-overview")

    expect(page.locator("#session-count")).to_have_text("(26)")
    expect(page.locator("#session-rows tr")).to_have_count(20)  # a page is 20
    expect(page.locator("#next-page")).to_be_enabled()
    expect(page.locator("#prev-page")).to_be_disabled()

    # the next page by cursor, and back
    page.click("#next-page")
    expect(page.locator("#page-number")).to_have_text("page 2")
    expect(page.locator("#session-rows tr")).to_have_count(6)
    expect(page.locator("#next-page")).to_be_disabled()
    assert "Trip to Lisbon" in _titles(page)
    page.click("#prev-page")
    expect(page.locator("#session-rows tr")).to_have_count(20)

    # search by title, owner, status
    page.fill("#q-title", "LISBON")
    page.click("#search button[type=submit]")
    expect(titles).to_have_text(["Lisbon hotels", "Trip to Lisbon"])  # newest first
    expect(page.locator("#session-count")).to_have_text("(2)")
    page.select_option("#q-status", "completed")
    page.click("#search button[type=submit]")
    expect(titles).to_have_text(["Trip to Lisbon"])
    page.fill("#q-title", "")
    page.select_option("#q-status", "")
    page.fill("#q-owner", "bob")
    page.click("#search button[type=submit]")
    expect(titles).to_have_text(["Job post: engineer"])
    page.click("#session-rows button.open")  # its messages come a page of 100 at a time
    messages = page.locator("#messages li.message")
    expect(messages).to_have_count(100)
    page.click("#more-messages")
    expect(messages).to_have_count(105)
    expect(messages.last).to_contain_text("Draft 105")
    expect(page.locator("#more-messages")).to_be_hidden()
    expect(page.locator("#session-metadata")).to_contain_text('"source": "web"')
    page.click("#close-conversation")
    expect(page.locator("#conversation")).to_be_hidden()
    page.fill("#q-owner", "")
    page.fill("#q-title", "secret plan")  # globex's
    page.click("#search button[type=submit]")
    expect(page.locator("#no-sessions")).to_be_visible()

    # one conversation: its messages, state and fields
    page.fill("#q-title", "trip")
    page.click("#search button[type=submit]")
    expect(titles).to_have_text(["Trip to Lisbon"])
    page.click("#session-rows button.open")
    expect(page.locator("#conversation")).to_be_visible()
    expect(page.locator("#conversation-title")).to_have_text("Trip to Lisbon")
    expect(page.locator("#messages li.message")).to_have_count(3)
    expect(page.locator("#messages li.message").first).to_contain_text("Find me flights to Lisbon")
    expect(page.locator("#messages li.message").nth(1)).to_contain_text('"search_flights"')
    expect(page.locator('[data-field="status"]')).to_have_text("completed")
    expect(page.locator('[data-field="step"]')).to_have_text("booked")
    expect(page.locator('[data-field="owner"]')).to_have_text("alice")
    expect(page.locator("#session-state")).to_contain_text('"budget": 400')
    shot = tmp_path / "admin-page.png"
    page.screenshot(path=str(shot), full_page=True)

    # user text stays text: HTML in a title and in a message is shown, never run
    page.fill("#q-title", "escaped")
    page.click("#search button[type=submit]")
    expect(titles).to_have_text([XSS_TITLE])
    page.click("#session-rows button.open")
    expect(page.locator("#conversation-title")).to_have_text(XSS_TITLE)
    expect(page.locator("#messages .message-body")).to_have_text(XSS_TEXT)
    assert page.locator("#messages b, #messages script, main img").count() == 0
    assert page.evaluate("window.__xss") is None

    # another tenant's key sees only its own
    page.click("#sign-out")
    expect(page.locator("#sign-in")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    _sign_in(page, seeded.globex)
    expect(page.locator("#identity")).to_contain_text("of tenant globex")
    expect(titles).to_have_text(["Globex secret plan"])
    assert _figure(page, "Sessions") == "1"
    assert "Lisbon" not in page.locator("main").inner_text()
    page.click("#tab-analytics")
    expect(page.locator("#analytics-rows tr.total td").nth(1)).to_have_text("1")
    owners_seen = page.locator("#analytics-owner-rows").inner_text()
    assert "mallory" in owners_seen
    assert "carol" not in owners_seen
    page.click("#tab-overview")

    # an admin key picks a tenant
    page.click("#sign-out")
    _sign_in(page, seeded.admin)
    expect(page.locator("#identity")).to_contain_text("admin key")
    expect(page.locator("#tenant-picker")).to_be_visible()
    assert page.locator("#tenant option").all_inner_texts() == ["acme", "globex"]
    expect(page.locator("#session-count")).to_have_text("(26)")
    page.select_option("#tenant", "globex")
    expect(titles).to_have_text(["Globex secret plan"])
    # a reload keeps the tab signed in (the key is in sessionStorage) and the tenant picked
    page.reload()
    expect(page.locator("#session-count")).to_have_text("(1)")
    expect(page.locator("#tenant")).to_have_value("globex")

    # nothing left the app, and no key ever went into a URL
    assert requested
    assert all(url.startswith(served.base + "/") for url in requested), requested
    assert not [url for url in requested if "sk_" in url]
    assert page.evaluate("localStorage.length") == 0
    assert errors == []
    context.close()
    elapsed = time.monotonic() - started
    print(f"\nadmin page screenshot: {shot} (browser part took {elapsed:.1f} s)")
    assert shot.stat().st_size > 10_000
    assert elapsed < 60


# --- the Operations view ---------------------------------------------------------------------


async def _seed_damaged(url: str) -> tuple[Seeded, str]:
    """``_seed``'s store, with dave's session's counts made wrong in the storage."""
    from tests.contract.test_check import Damage

    seeded = await _seed(url)
    async with open_store(url, tenant="acme", settings=Settings(url=url)) as acme:
        damaged = (await acme.list_sessions(owner="dave")).items[0].id
        await Damage(acme).aggregates(damaged)
    return seeded, damaged


@pytest.fixture
def damaged_server(tmp_path: Path, receiver: Receiver) -> Iterator[tuple[Served, Seeded, str]]:
    """The damaged store served with webhooks on: the receiver refuses the first delivery,
    which fails at once (one attempt allowed), and takes the rest."""
    url = f"sqlite:///{tmp_path / 'ops.db'}"
    with ThreadPoolExecutor(1) as pool:
        seeded, damaged = pool.submit(asyncio.run, _seed_damaged(url)).result()
    receiver.statuses = [503]
    env = {
        "SESSIONKEEPER_WEBHOOK_URL": receiver.url,
        "SESSIONKEEPER_WEBHOOK_SECRET": SECRET,
        "SESSIONKEEPER_WEBHOOK_MAX_ATTEMPTS": "1",
    }
    with Served(url, env=env) as served:
        yield served, seeded, damaged


@pytest.mark.timeout(120)
def test_operations_view_in_chromium(
    browser: Browser,
    damaged_server: tuple[Served, Seeded, str],
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    served, seeded, damaged = damaged_server
    context = browser.new_context(timezone_id="UTC", viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(10_000)
    page = context.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: errors.append(f"dialog: {dialog.message}"))
    page.goto(f"{served.base}/ui/")

    # a tenant key has no Operations view
    _sign_in(page, seeded.acme)
    expect(page.locator("#identity")).to_contain_text("tenant key")
    expect(page.locator("#tab-operations")).to_be_hidden()
    expect(page.locator("#view-operations")).to_be_hidden()
    page.click("#sign-out")

    # an admin key: doctor's verdict and findings as soon as the view opens
    _sign_in(page, seeded.admin)
    expect(page.locator('[data-figure="Archived"] dd')).to_have_text("1")
    page.click("#tab-operations")
    expect(page.locator("#view-overview")).to_be_hidden()
    expect(page.locator("#doctor-verdict")).to_have_text("ok")
    expect(page.locator("#doctor-engine")).to_contain_text("sqlite: SQLite 3.")
    expect(page.locator('#doctor-figures [data-field="journal_mode"]')).to_have_text("wal")
    expect(page.locator('#doctor-figures [data-field="missing indexes"]')).to_have_text("none")

    # a check finds the damage and changes nothing; with repair it fixes it
    page.click("#check-form button[type=submit]")
    expect(page.locator("#check-summary")).to_have_text("sqlite, tenant acme: 1 left to fix")
    aggregates = page.locator('#check-rows tr[data-kind="aggregates"]')
    expect(aggregates.locator('[data-count="found"]')).to_have_text("1")
    expect(aggregates.locator('[data-count="repaired"]')).to_have_text("0")
    expect(aggregates).to_contain_text(f"acme/{damaged}")
    expect(
        page.locator('#check-rows tr[data-kind="seq_gaps"] [data-count="repaired"]')
    ).to_have_text("never")
    page.check("#check-repair")
    page.click("#check-form button[type=submit]")
    expect(page.locator("#check-summary")).to_have_text(
        "sqlite, tenant acme, repaired: nothing left to fix"
    )
    expect(aggregates.locator('[data-count="repaired"]')).to_have_text("1")

    # archive: a dry run shows what would change and changes nothing, then its button applies it
    page.fill("#lifecycle-older", "2d")
    page.click("#lifecycle-form button[type=submit]")
    expect(page.locator("#lifecycle-summary")).to_contain_text(
        "Dry run: 2 sessions would be archived"
    )
    expect(page.locator("#lifecycle-sample li")).to_have_count(2)
    apply = page.locator("#lifecycle-apply")
    expect(apply).to_have_text("Archive 2 sessions")
    page.click("#tab-overview")
    expect(page.locator('[data-figure="Archived"] dd')).to_have_text("1")
    page.click("#tab-operations")
    shot = tmp_path / "operations.png"
    page.screenshot(path=str(shot), full_page=True)
    apply.click()
    expect(page.locator("#lifecycle-summary")).to_contain_text("2 sessions archived")
    expect(apply).to_be_hidden()
    # run again: nothing is left to archive, so there is nothing to apply
    page.click("#lifecycle-form button[type=submit]")
    expect(page.locator("#lifecycle-summary")).to_contain_text(
        "Dry run: 0 sessions would be archived"
    )
    expect(apply).to_be_hidden()
    page.click("#tab-overview")
    expect(page.locator('[data-figure="Archived"] dd')).to_have_text("3")

    # webhooks: a completion whose delivery the receiver refused, then sent again
    done = httpx.patch(
        f"{served.base}/v1/sessions/{damaged}",
        json={"status": "completed"},
        headers={"Authorization": f"Bearer {seeded.admin}"},
    )
    assert done.status_code == 200, done.text
    page.click("#tab-operations")
    row = page.locator("#delivery-rows tr").first
    for _ in range(50):  # until the dispatcher has tried it
        page.click("#deliveries-refresh")
        if row.get_attribute("data-status") == "failed":
            break
        time.sleep(0.1)
    expect(row).to_contain_text("completed")
    expect(row).to_contain_text(f"acme/{damaged}")
    expect(row).to_contain_text("HTTP 503")
    row.locator("button.redeliver").click()
    deadline = time.monotonic() + 10
    while len(receiver.received) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert receiver.events() == ["completed", "completed"]
    assert len(set(receiver.deliveries())) == 1  # the same delivery, sent again

    # a bad duration is refused with the server's reason
    page.fill("#lifecycle-older", "2 days")
    page.click("#lifecycle-form button[type=submit]")
    expect(page.locator("#error")).to_contain_text("older_than")

    assert all(url.startswith(served.base + "/") for url in requested), requested
    assert not [url for url in requested if "sk_" in url]
    assert errors == []
    context.close()
    print(f"\noperations view screenshot: {shot}")
