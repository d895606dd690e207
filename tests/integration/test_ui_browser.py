"""`runherd ui` in a real browser: Debian's headless Chromium driven by Selenium (through Debian's
chromedriver; nothing is downloaded). The UI, the services and the workers are real; the browser
only reads what a person would see. Skipped, saying why, when Chromium is not installed."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import orjson
import pytest

from runherd.ui import server
from tests.harness import Env, eventually

CHROMIUM = os.environ.get("RUNHERD_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("RUNHERD_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")

_missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
pytestmark = pytest.mark.skipif(
    bool(_missing),
    reason=f"no headless Chromium: {', '.join(_missing)} not found (apt-get install chromium chromium-driver)",
)


class Browser:
    """A Selenium driver whose blocking calls run in a thread, so the event loop (UI, services) goes on."""

    def __init__(self) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--window-size=1440,1000",
        ):
            options.add_argument(arg)
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_page_load_timeout(20)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def open(self, url: str) -> None:
        await self.call(self.driver.get, url)

    async def js(self, script: str, *args: Any) -> Any:
        return await self.call(self.driver.execute_script, script, *args)

    async def texts(self, css: str) -> list[str]:
        return await self.js(f"return Array.from(document.querySelectorAll({css!r})).map(e => e.textContent.trim())")

    async def attr(self, css: str, name: str) -> str | None:
        return await self.js(f"var e = document.querySelector({css!r}); return e && e.getAttribute({name!r})")

    def quit(self) -> None:
        self.driver.quit()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    b = Browser()
    try:
        yield b
    finally:
        b.quit()


@pytest.fixture
async def ui(env: Env) -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """Starts the UI on the test's current config (call it after ``env.configure``); returns its URL."""
    started: list[server.Running] = []

    async def start() -> str:
        started.append(await server.start(env.cfg, host="127.0.0.1", port=0))
        return started[-1].url

    try:
        yield start
    finally:
        for running in started:
            await running.close()


async def _mark_page(b: Browser) -> None:
    """A marker that a reload would wipe: proves an update came without one."""
    await b.js("window.__notReloaded = 'yes'")


async def _not_reloaded(b: Browser) -> bool:
    return await b.js("return window.__notReloaded === 'yes'")


async def test_a_queued_run_goes_to_success_live_and_the_queue_says_why_it_waits(
    env: Env, ui: Callable[[], Awaitable[str]], browser: Browser
) -> None:
    env.configure(run_coordinator={"tag_concurrency_limits": [{"key": "lane", "value": "ui", "limit": 1}]})
    await env.start()
    url = await ui()
    gate = env.tmp / "gate"
    blocker = await env.submit(
        [{"key": "hold", "command": ["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done"]}],
        job="blocker",
        tags={"lane": "ui"},
    )
    await env.wait_status(blocker, "STARTED")
    waiting = await env.submit([{"key": "a", "command": ["true"]}], job="waiting-job", tags={"lane": "ui"})
    await env.wait_status(waiting, "QUEUED")

    # The queue page says what the run waits for: the same sentence as `runherd runs --status QUEUED`.
    await browser.open(f"{url}/queue")
    reasons = await browser.texts(f'tr[data-run-id="{waiting}"] td.waiting')
    assert reasons and "lane=ui" in reasons[0] and "1/1" in reasons[0], reasons

    # The run list, opened while the run is QUEUED, shows SUCCESS without a reload once the gate opens.
    await browser.open(f"{url}/?job=waiting-job")
    row = f'tr[data-run-id="{waiting}"]'
    assert await browser.attr(row, "data-status") == "QUEUED"
    await eventually(lambda: browser.js("return document.getElementById('live-dot').className.includes('on')"))
    await _mark_page(browser)
    gate.touch()
    await eventually(
        lambda: _status_is(browser, row, "SUCCESS"), timeout=20, what="SUCCESS in the browser without a reload"
    )
    assert await _not_reloaded(browser)
    assert int(await browser.attr("#live", "data-updates") or 0) >= 1
    assert await browser.texts(f"{row} .badge") == ["SUCCESS"]
    # The counts moved with it: one SUCCESS under the job filter.
    assert await browser.texts('[data-count="SUCCESS"]') == ["1"]


async def _status_is(b: Browser, css: str, status: str) -> bool:
    return await b.attr(css, "data-status") == status


async def test_a_crash_and_its_resume_are_drawn_on_the_timeline_live(
    env: Env, ui: Callable[[], Awaitable[str]], browser: Browser
) -> None:
    await env.start()
    url = await ui()
    started = env.tmp / "two-started"
    run_id = await env.submit(
        [
            {"key": "one", "command": ["sh", "-c", "echo one done"]},
            {
                "key": "two",
                "command": ["sh", "-c", f'if [ "$RUNHERD_ATTEMPT" = 1 ]; then touch {started}; sleep 600; fi'],
                "deps": ["one"],
            },
            {"key": "three", "command": ["true"], "deps": ["two"]},
        ],
        job="crashy",
    )
    await eventually(started.exists, what="step two to start")

    async def two_recorded() -> bool:
        return any(e["type"] == "STEP_START" and e["step_key"] == "two" for e in await env.events(run_id))

    await eventually(two_recorded, what="step two's start in the event log")
    await browser.open(f"{url}/runs/{run_id}")
    await eventually(lambda: browser.js("return document.getElementById('live-dot').className.includes('on')"))
    await _mark_page(browser)
    assert await browser.attr('[data-lane="1"] [data-step="two"]', "data-step-status") == "RUNNING"

    handle = await env.handle(run_id, attempt=1)
    os.kill(handle["pid"], signal.SIGKILL)
    await env.wait_status(run_id, "SUCCESS")

    async def drawn() -> bool:
        return await browser.attr("#run-status", "data-status") == "SUCCESS" and bool(
            await browser.texts('[data-lane="2"] [data-step="three"]')
        )

    await eventually(drawn, timeout=20, what="the resumed run drawn without a reload")
    assert await _not_reloaded(browser)
    # Attempt 1: step one succeeded, step two was interrupted where the worker was killed.
    assert await browser.attr('[data-lane="1"]', "data-kind") == "crashed"
    assert await browser.attr('[data-lane="1"] [data-step="one"]', "data-step-status") == "SUCCESS"
    assert await browser.attr('[data-lane="1"] [data-step="two"]', "data-step-status") == "INTERRUPTED"
    assert await browser.attr('[data-lane="1"] .crash', "data-end") == "crashed"
    # Attempt 2 reused step one (not executed again) and ran two and three.
    assert await browser.texts('[data-lane="2"] [data-reused]') == ["↺ one"]
    assert not await browser.texts('[data-lane="2"] [data-step="one"]')
    assert await browser.attr('[data-lane="2"] [data-step="three"]', "data-step-status") == "SUCCESS"
    # The attempts table says how attempt 1 ended and with which worker.
    ended = (await browser.texts('#attempts tr[data-attempt="1"] td'))[4]
    assert "SIGKILL" in ended and "resume attempt 1 of 3" in ended, ended
    assert f"pid {handle['pid']}" in (await browser.texts('#attempts tr[data-attempt="1"] td'))[1]
    # The x of the crash lies where step two's bar ends, after step one's.
    geometry = await browser.js(
        "var s = e => document.querySelector(e).getBoundingClientRect();"
        'return [s(\'[data-lane="1"] [data-step="one"]\').right, s(\'[data-lane="1"] [data-step="two"]\').right,'
        ' s(\'[data-lane="1"] .crash\').left, s(\'[data-lane="2"] [data-step="two"]\').left]'
    )
    one_end, two_end, crash_x, resumed_x = geometry
    assert one_end <= crash_x + 1 and abs(two_end - crash_x) <= 3 and resumed_x >= crash_x - 1, geometry
    assert "RUN_RESUMED" in await browser.texts("#events td.mono")


async def test_the_filters_narrow_the_list_and_page_by_keyset(
    env: Env, ui: Callable[[], Awaitable[str]], browser: Browser
) -> None:
    url = await ui()
    steps = orjson.dumps([{"key": "a", "command": ["true"]}]).decode()
    rows = [
        ("etl", "SUCCESS", {"team": "data"}),
        ("etl", "FAILURE", {"team": "data"}),
        ("etl", "FAILURE", {"team": "web"}),
        ("report", "FAILURE", {"team": "data", "runherd/priority": 5}),
        *[("bulk", "SUCCESS", {}) for _ in range(7)],
    ]
    ids = [uuid.uuid4() for _ in rows]
    await env.store.pool.execute(
        "INSERT INTO runs (run_id, job, status, attempt, tags, steps, root_run_id, created_at) "
        "SELECT u, j, s, 1, t::jsonb, $4::jsonb, u, now() - make_interval(secs => n) "
        "FROM unnest($1::uuid[], $2::text[], $3::text[], $5::text[], $6::int[]) AS x(u, j, s, t, n)",
        ids,
        [r[0] for r in rows],
        [r[1] for r in rows],
        steps,
        [orjson.dumps(r[2]).decode() for r in rows],
        [*range(len(rows) - 1), 3600],  # the last run is an hour old
    )
    await browser.open(f"{url}/")
    assert len(await browser.texts("#runs tbody tr[data-run-id]")) == len(rows)
    assert await browser.texts('[data-count="FAILURE"]') == ["3"]

    # Status and tag through the form, as a person would.
    await browser.js("document.getElementById('f-status').value = 'FAILURE'")
    await browser.js("document.getElementById('f-tag').value = 'team=data'")
    await browser.js("document.getElementById('f-apply').click()")
    await eventually(lambda: _shown(browser, {str(ids[1]), str(ids[3])}), what="FAILURE + team=data")
    # A job on top of them.
    await browser.js("document.getElementById('f-job').value = 'report'")
    await browser.js("document.getElementById('f-apply').click()")
    await eventually(lambda: _shown(browser, {str(ids[3])}), what="job=report")
    # A numeric tag given as text still matches; a period leaves out older runs.
    await browser.open(f"{url}/?tag=runherd/priority=5")
    assert await _shown(browser, {str(ids[3])})
    await browser.open(f"{url}/?within=15m&job=bulk&limit=25")
    assert len(await browser.texts("#runs tbody tr[data-run-id]")) == 6

    # Keyset paging: three pages of 4 cover every run once, newest first, and back again.
    await browser.open(f"{url}/?limit=4")
    assert await browser.js("return document.getElementById('newer')") is None
    seen: list[str] = []
    for _ in range(3):
        seen += await browser.js(
            "return Array.from(document.querySelectorAll('#runs tbody tr[data-run-id]')).map(e => e.dataset.runId)"
        )
        if await browser.js("return document.getElementById('older')") is None:
            break
        await browser.js("document.getElementById('older').click()")
        await eventually(
            lambda: browser.js("return document.readyState === 'complete' && !!document.getElementById('newer')")
        )
    assert seen == [str(i) for i in ids], seen
    await browser.js("document.getElementById('newer').click()")
    await eventually(lambda: _shown(browser, {str(i) for i in ids[4:8]}), what="the previous page")


async def _shown(b: Browser, expected: set[str]) -> bool:
    shown = await b.js(
        "return Array.from(document.querySelectorAll('#runs tbody tr[data-run-id]')).map(e => e.dataset.runId)"
    )
    return set(shown) == expected
