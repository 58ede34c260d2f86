"""The operator console in a real browser: Playwright driving Debian's `chromium` package
(`apt-get install chromium`; CHROMIUM_PATH names another binary). Without one, this module is
skipped with one line, unless CI=true: then it fails, so CI never passes without them.
Each page's screenshot is taken; with WA_SCREENSHOTS=1 it is written to docs/screenshots/ (README
shows them: `WA_SCREENSHOTS=1 make test PYTEST_ARGS=tests/browser` refreshes them), otherwise under
pytest's tmp folder, so a test run leaves the checkout as it was."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import StartSystem
from tests.support import payloads
from tests.support.console import NUMBER_A, NUMBER_B, PASSWORD, add_operator, delivery_to
from tests.support.fakes import FakeGraph, FakeModel
from tests.support.system import System

pytestmark = pytest.mark.e2e

DOCS_SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
CANDIDATES = ("chromium", "chromium-browser", "/usr/lib/chromium/chromium")


def chromium() -> str | None:
    given = os.environ.get("CHROMIUM_PATH", "")
    if given:
        return given
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = chromium()
if CHROMIUM is None:
    message = (
        "NO CHROMIUM: the console's browser tests did not run (apt-get install chromium, "
        "or set CHROMIUM_PATH)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + "; CI=true requires them", pytrace=False)
    pytest.skip(message, allow_module_level=True)

from playwright.async_api import Browser, Page, async_playwright, expect  # noqa: E402


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        # Root (containers, CI) cannot use Chromium's sandbox.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=args)
        yield b
        await b.close()


async def page_for(browser: Browser, width: int = 1100) -> Page:
    context = await browser.new_context(viewport={"width": width, "height": 900})
    return await context.new_page()


async def log_in(page: Page, system: System, name: str) -> None:
    await page.goto(f"{system.console_url}/login")
    await page.get_by_label("Name").fill(name)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("heading", name="Overview")).to_be_visible()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("WA_SCREENSHOTS") == "1":
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        return DOCS_SCREENSHOTS
    return tmp_path_factory.mktemp("screenshots")


async def shot(page: Page, folder: Path, name: str) -> None:
    await page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


async def test_find_a_conversation_by_phone_and_see_a_reply_arrive_live(
    start_system: StartSystem, browser: Browser, screenshots: Path
) -> None:
    system = await start_system()
    await system.start_console()
    add_operator(system, "ada", "admin")
    first = payloads.message("text", wa_id="15550004001", text={"body": "where is my order?"})
    other = payloads.message("text", wa_id="15550004002", text={"body": "hello there"})
    await system.deliver(delivery_to(NUMBER_A, [first, other]))
    await system.wait_status([first["id"], other["id"]], {"replied"})

    page = await page_for(browser)
    await page.goto(f"{system.console_url}/login")
    await shot(page, screenshots, "login")
    await log_in(page, system, "ada")
    await expect(page.locator(".card").first).to_be_visible()
    await shot(page, screenshots, "overview")

    await page.get_by_role("link", name="Conversations").click()
    await page.get_by_label("Phone or name").fill("15550004001")
    await page.get_by_role("button", name="Search").click()
    rows = page.locator("#conversation-rows tr")
    await expect(rows).to_have_count(1)
    await shot(page, screenshots, "conversations")
    await rows.get_by_role("link").click()
    await expect(page.locator(".in .bubble")).to_have_text(["where is my order?"])
    await expect(page.locator(".out")).to_have_count(1)

    # A new message and its reply show up on the open page, without a reload.
    second = payloads.message("text", wa_id="15550004001", text={"body": "and the invoice?"})
    await system.deliver(delivery_to(NUMBER_A, [second]))
    await expect(page.locator(".in .bubble").last).to_have_text("and the invoice?", timeout=30_000)
    await expect(page.locator(".out")).to_have_count(2, timeout=30_000)
    await shot(page, screenshots, "conversation")

    # Usable on a phone: the same page at 360 px wide scrolls no wider than the screen.
    context = await browser.new_context(
        viewport={"width": 360, "height": 800}, storage_state=await page.context.storage_state()
    )
    phone = await context.new_page()
    await phone.goto(page.url)
    width = await phone.evaluate("document.documentElement.scrollWidth")
    assert width <= 360
    await shot(phone, screenshots, "conversation-360px")


async def test_bulk_retry_after_the_dry_run_count(
    start_system: StartSystem, model: FakeModel, browser: Browser, screenshots: Path
) -> None:
    model.down = True
    system = await start_system(
        **model.env(
            DLQ_MAX_ATTEMPTS="1",
            AGENT_MAX_RETRIES="0",
            DLQ_POLL_SECONDS="0.2",
            AGENT_BREAKER_THRESHOLD="100",
        )
    )
    await system.start_console()
    add_operator(system, "ada", "admin")
    msgs = [
        payloads.message("text", wa_id=f"1555000500{i}", text={"body": f"retry me {i}"})
        for i in range(3)
    ]
    await system.deliver(delivery_to(NUMBER_A, msgs))
    await system.wait_status([m["id"] for m in msgs], {"dead_lettered"}, timeout=60)
    pool = await system.db()
    for _ in range(300):
        if await pool.fetchval("SELECT count(*) FROM webhook_dlq WHERE status = 'dead'") == 3:
            break
        await asyncio.sleep(0.2)
    model.down = False

    page = await page_for(browser)
    await log_in(page, system, "ada")
    await page.get_by_role("link", name="Dead letters").click()
    await expect(page.locator("#dlq-rows tr")).to_have_count(3)
    await shot(page, screenshots, "dlq")
    # The list refreshes itself; what is ticked stays ticked across a refresh.
    await page.get_by_label("select item 1", exact=True).check()
    async with page.expect_response(lambda r: "/dlq?" in r.url and "ids=1" in r.url):
        pass
    await expect(page.get_by_label("select item 1", exact=True)).to_be_checked()
    await page.get_by_label("all matching the filter").check()
    await page.get_by_role("button", name="Retry…").click()
    await expect(page.locator("#confirm .count")).to_have_text("3")
    await shot(page, screenshots, "dlq-dry-run")
    await page.get_by_role("button", name=re.compile(r"Retry 3 item\(s\) now")).click()
    await expect(page.locator(".job .finished")).to_be_visible(timeout=60_000)
    await expect(page.locator(".job .progress")).to_have_text("3 of 3")
    await system.wait_status([m["id"] for m in msgs], {"replied"}, timeout=60)
    # Resolved items leave the open list on their own.
    await expect(page.locator("#dlq-rows")).to_contain_text(
        "No dead letter matches", timeout=30_000
    )
    await page.get_by_role("link", name="Audit").click()
    await expect(page.locator("table.audit")).to_contain_text("dlq retry")
    await shot(page, screenshots, "audit")


async def test_an_operator_limited_to_one_number_cannot_open_anothers_by_url(
    start_system: StartSystem, browser: Browser, screenshots: Path
) -> None:
    system = await start_system()
    await system.start_console()
    add_operator(system, "lim", "viewer", numbers=NUMBER_A)
    theirs = payloads.message("text", wa_id="15550006002", text={"body": "secret of B"})
    await system.deliver(delivery_to(NUMBER_B, [theirs]))
    await system.wait_status([theirs["id"]], {"replied"})
    pool = await system.db()
    other = await pool.fetchval(
        "SELECT id FROM webhook_conversations WHERE phone_number_id = $1", NUMBER_B
    )
    page = await page_for(browser)
    await log_in(page, system, "lim")
    resp = await page.goto(f"{system.console_url}/conversations/{other}")
    assert resp is not None and resp.status == 404
    await expect(page.get_by_role("alert")).to_have_text("no such conversation")
    await expect(page.get_by_text("secret of B")).to_have_count(0)


async def test_take_over_a_conversation_and_answer_it(
    start_system: StartSystem, browser: Browser, graph: FakeGraph, screenshots: Path
) -> None:
    system = await start_system()
    await system.start_console()
    add_operator(system, "ada", "admin")
    msg = payloads.message("text", wa_id="15550009001", text={"body": "can a person help?"})
    await system.deliver(delivery_to(NUMBER_A, [msg]))
    await system.wait_status([msg["id"]], {"replied"})
    bot_sends = len(graph.sends)

    page = await page_for(browser)
    await log_in(page, system, "ada")
    await page.get_by_role("link", name="Conversations").click()
    await page.get_by_role("link", name="+15550009001").click()
    await page.get_by_role("button", name="Take over from the bot").click()
    await expect(page.get_by_text("Waiting for a person")).to_be_visible()
    await page.get_by_role("link", name="Handoffs").click()
    await expect(page.locator(".handoff")).to_have_count(1)
    await page.get_by_label("Answer").fill("Hello, this is Ada from support.")
    await shot(page, screenshots, "handoffs")
    # The form posts and comes back to the inbox once the agent service has sent it.
    async with page.expect_navigation(url=re.compile(r"/handoffs$")):
        await page.get_by_role("button", name="Send").click()
    await expect(page.get_by_label("Answer")).to_have_value("")
    texts = [s.body["text"]["body"] for s in graph.sends[bot_sends:]]
    assert texts == ["Hello, this is Ada from support."], "the fake Graph API got exactly one"
    await page.get_by_role("button", name="Give back to the bot").click()
    await expect(page.get_by_text("Nobody is waiting for a person.")).to_be_visible()
    # The conversation shows the answer, and who gave it.
    await page.get_by_role("link", name="Conversations").click()
    await page.get_by_role("link", name="+15550009001").click()
    await expect(page.locator(".out.operator .bubble")).to_have_text(
        "Hello, this is Ada from support."
    )
    await expect(page.locator(".out.operator .meta")).to_contain_text("answered by ada")


# The WCAG 2 contrast ratio of an element's text against the first opaque background behind it.
CONTRAST = """(el) => {
  const rgb = (c) => (c.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => {
    const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  let bg = null;
  for (let n = el; n && !bg; n = n.parentElement) {
    const c = rgb(getComputedStyle(n).backgroundColor);
    if (c.length === 3 || (c.length === 4 && c[3] === 1)) bg = c.slice(0, 3);
  }
  const a = lum(rgb(getComputedStyle(el).color).slice(0, 3)), b = lum(bg || [255, 255, 255]);
  return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
}"""
PAGES = ("/", "/conversations", "/dlq", "/handoffs", "/audit")


async def test_keyboard_only_narrow_screens_and_readable_contrast(
    start_system: StartSystem, browser: Browser
) -> None:
    system = await start_system()
    await system.start_console()
    add_operator(system, "kay", "admin")
    message = payloads.message("text", wa_id="15550004009", text={"body": "hello"})
    await system.deliver(delivery_to(NUMBER_A, [message]))
    await system.wait_status([message["id"]], {"replied"})

    # Logged in and navigated with the keyboard alone: Tab moves through the form, Enter acts.
    page = await page_for(browser, width=360)
    await page.goto(f"{system.console_url}/login")
    await page.get_by_label("Name").focus()
    await page.keyboard.type("kay")
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.type") == "password"
    await page.keyboard.type(PASSWORD)
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    # The first Tab reaches the skip link, then the main navigation, in reading order.
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.textContent.trim()") == "Skip to content"
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.textContent.trim()") == "Overview"
    await page.keyboard.press("Tab")
    await page.keyboard.press("Enter")
    await expect(page).to_have_url(re.compile(r"/conversations$"))
    # Focus is always visible.
    await page.keyboard.press("Tab")
    outline = await page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("", "none"), outline

    for path in PAGES:
        await page.goto(f"{system.console_url}{path}")
        # No page scrolls sideways on a 360 px phone.
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 360, (path, width)
        # Text and links are readable: WCAG AA, 4.5:1, for every visible text element.
        ratios = await page.locator(
            "main :is(p, td, th, a, label, h1, h2, span, button)"
        ).evaluate_all(
            f"(els) => els.filter((e) => e.offsetParent && e.textContent.trim())"
            f".map((e) => [e.textContent.trim().slice(0, 30), ({CONTRAST})(e)])"
        )
        assert ratios, path
        low = [(text, round(ratio, 2)) for text, ratio in ratios if ratio < 4.5]
        assert not low, (path, low)
