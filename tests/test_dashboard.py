"""The dashboard in a real headless Chromium, against real worker and dashboard processes.

The browser is Debian's Chromium (``apt-get install chromium``; ``.ci/run``
installs it), driven by Playwright; ``PGPUBSUB_CHROMIUM`` names another binary.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import admin_query, wait_until

import pgpubsub
from pgpubsub.durable import migrate

pytestmark = [pytest.mark.acceptance, pytest.mark.browser]

TESTS = Path(__file__).parent
HOSTILE = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'


def chromium_path() -> str | None:
    return os.environ.get("PGPUBSUB_CHROMIUM") or shutil.which("chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium_path()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("no Chromium: CI must install it (apt-get install chromium)")
        pytest.skip("no Chromium here: apt-get install chromium, or set PGPUBSUB_CHROMIUM")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=path,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(20_000)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    yield page
    assert page.evaluate("window.pwned") is None, "a payload ran as script"
    assert dialogs == [], f"a payload opened a dialog: {dialogs}"
    context.close()


@pytest.fixture
def shop(dsn: str) -> str:
    migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE shipped (order_id int, note text)")
        conn.execute("CREATE TABLE payment_down (since timestamptz DEFAULT now())")
    return dsn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != "PGPUBSUB_DSN"}
    return {**base, "PYTHONPATH": str(TESTS), **extra}


@contextmanager
def process(args: list[str], ready: str, **extra: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        args, env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if ready in line:
                break
        else:
            raise AssertionError(f"{args} ended before {ready!r}: {''.join(seen)}")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def dashboard(dsn: str, *options: str, host: str = "127.0.0.1") -> Iterator[str]:
    port = free_port()
    args = [sys.executable, "-m", "pgpubsub", "dashboard", "--dsn", dsn]
    with process([*args, "--host", host, "--port", str(port), *options], "dashboard on"):
        wait_until(lambda: _port_open(port), timeout=10)
        yield f"http://127.0.0.1:{port}"


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def worker(dsn: str) -> Iterator[None]:
    args = [sys.executable, "-m", "pgpubsub", "listen", "app.shop", "--worker", "-v"]
    with process(args, "worker listening", PGPUBSUB_DSN=dsn, PGPUBSUB_LOG_LEVEL="INFO"):
        yield


def order(dsn: str, order_id: int, note: str = "") -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgpubsub.notify("app.shop.Orders", conn=conn, order_id=order_id, note=note)


def dead_order(dsn: str, order_id: int, note: str = "") -> int:
    """An order whose handling failed for good (the payment service was down)."""
    admin_query(dsn, "INSERT INTO payment_down DEFAULT VALUES")
    order(dsn, order_id, note)
    wait_until(lambda: admin_query(dsn, "SELECT count(*) FROM pgpubsub.message "
                                   "WHERE status = 'dead'")[0][0] == 1, timeout=20)
    admin_query(dsn, "DELETE FROM payment_down")
    return int(admin_query(dsn, "SELECT id FROM pgpubsub.message WHERE status = 'dead'")[0][0])


def cell(page: Any, channel: str, column: str) -> str:
    return str(page.locator(f'tr[data-channel="{channel}"] td[data-col="{column}"]').inner_text())


def request(url: str, data: bytes | None = None, **headers: str) -> tuple[int, str]:
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_overview_shows_the_channels_of_a_running_worker_and_live_counts(
    shop: str, page: Any
) -> None:
    with worker(shop), dashboard(shop) as url:
        page.goto(url)
        orders = page.locator('tr[data-channel="orders"]')
        orders.wait_for()
        assert "durable" in orders.inner_text()
        assert "plain" in page.locator('tr[data-channel="chat"]').inner_text()
        assert "1 live worker(s)" in page.locator(".summary").inner_text()
        assert cell(page, "orders", "processed") == "0"
        for n in range(12):
            order(shop, n)
        # The same page, not reloaded: the registry's counts reach it within seconds.
        wait_until(lambda: cell(page, "orders", "processed") == "12", timeout=30, interval=0.5)
        assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
        # The rate chart fills as the dashboard samples (every few seconds).
        line = page.locator('tr[data-channel="orders"] polyline.processed')
        wait_until(lambda: bool(line.get_attribute("points")), timeout=20, interval=0.5)
        page.click("text=Workers")
        assert "app.shop.Orders" not in page.content()  # channel names, not class paths
        assert page.locator("tr.alive td[data-col=processed]").inner_text() == "12"


def test_dead_message_traceback_replay_and_purge_from_the_page(shop: str, page: Any) -> None:
    with worker(shop), dashboard(shop, "--allow-actions") as url:
        dead = dead_order(shop, 41, "gift wrap")
        page.goto(url)
        page.click('a:text-is("orders")')
        assert page.locator('td[data-col="dead"]').count() == 0  # the channel page
        page.click(f'a:text-is("{dead}")')
        traceback = page.locator("pre.traceback").inner_text()
        assert "Traceback" in traceback
        assert "ConnectionError: payment service is down: order 41 not charged" in traceback
        assert '"note": "gift wrap"' in page.locator("pre.payload").inner_text()
        page.click("button:text-is('Replay')")
        assert "1 message(s) will run again" in page.locator(".notice").inner_text()
        wait_until(lambda: admin_query(shop, "SELECT order_id FROM shipped") == [(41,)])
        assert admin_query(shop, "SELECT count(*) FROM pgpubsub.message") == [(0,)]

        # Purge asks first, with the count, and deletes only after the confirmation.
        dead = dead_order(shop, 42)
        page.goto(f"{url}/message/{dead}")
        page.click("text=Purge…")
        assert "Delete 1 dead message(s)?" in page.locator("h1").inner_text()
        assert admin_query(shop, "SELECT count(*) FROM pgpubsub.message") == [(1,)]
        page.click("button:text-is('Delete 1 message(s)')")
        assert "1 dead message(s) deleted" in page.locator(".notice").inner_text()
        assert admin_query(shop, "SELECT count(*) FROM pgpubsub.message") == [(0,)]


def test_live_tail_shows_messages_published_after_the_page_opened(
    shop: str, page: Any
) -> None:
    with worker(shop), dashboard(shop) as url:
        with psycopg.connect(shop, autocommit=True) as conn:
            pgpubsub.notify("app.shop.Chat", conn=conn, text="before the page")
        page.goto(url)
        page.locator('tr[data-channel="chat"] >> text=tail').click()
        page.locator('#tail-state[data-state="listening"]').wait_for()
        with psycopg.connect(shop, autocommit=True) as conn:
            for text in ("first", "second", HOSTILE):
                pgpubsub.notify("app.shop.Chat", conn=conn, text=text)
        rows = page.locator("#tail tbody tr")
        wait_until(lambda: rows.count() == 3)
        shown = rows.all_inner_texts()
        assert '"text":"first"' in shown[2] or '"text": "first"' in shown[2]
        assert HOSTILE.replace('"', '\\"') in shown[0]  # the JSON text, shown as text
        assert "before the page" not in page.content()
        assert page.locator("#tail img").count() == 0


def test_a_script_payload_is_shown_as_text_and_never_runs(shop: str, page: Any) -> None:
    with worker(shop), dashboard(shop, "--allow-actions") as url:
        dead = dead_order(shop, 7, HOSTILE)
        page.goto(f"{url}/channel?name=orders&status=dead")
        assert HOSTILE.replace('"', '\\"') in page.locator("td.payload").inner_text()
        page.goto(f"{url}/message/{dead}")
        assert HOSTILE.replace('"', '\\"') in page.locator("pre.payload").inner_text()
        assert page.locator("main img").count() == 0
        # Even markup that escaped the templates could not run: inline scripts are refused.
        status, _ = request(f"{url}/")
        headers = urllib.request.urlopen(f"{url}/").headers
        assert "script-src 'self'" in headers["content-security-policy"]
        assert status == 200


def test_actions_need_allow_actions_and_a_csrf_token(shop: str, page: Any) -> None:
    with dashboard(shop) as url:
        dead = dead_order_without_worker(shop)
        page.goto(f"{url}/message/{dead}")
        assert page.locator("form").count() == 0  # read-only: no buttons
        status, text = request(f"{url}/actions/replay", f"id={dead}".encode())
        assert status == 403 and "--allow-actions" in text
    with dashboard(shop, "--allow-actions") as url:
        page.goto(f"{url}/message/{dead}")
        token = page.locator("input[name=csrf]").first.get_attribute("value")
        for body, headers in (
            (f"id={dead}", {}),  # no token
            (f"id={dead}&csrf=forged", {}),  # a wrong one
            (f"id={dead}&csrf={token}", {"Origin": "http://evil.example"}),  # another site
        ):
            status, text = request(f"{url}/actions/replay", body.encode(), **headers)
            assert status == 403, text
        assert admin_query(shop, "SELECT status FROM pgpubsub.message") == [("dead",)]
        status, _ = request(f"{url}/actions/replay", f"id={dead}&csrf={token}".encode())
        assert status == 200  # followed the redirect to the channel page
        assert admin_query(shop, "SELECT status FROM pgpubsub.message") == [("pending",)]
        # "Replay every dead message" of a channel leaves its delayed messages alone.
        admin_query(shop, "UPDATE pgpubsub.message SET status = 'dead'")
        admin_query(
            shop,
            "INSERT INTO pgpubsub.message (channel, payload, run_at) "
            "VALUES ('orders', '{\"order_id\": 10}', now() + interval '1 hour')",
        )
        status, _ = request(f"{url}/actions/replay", f"channel=orders&csrf={token}".encode())
        assert status == 200
        assert admin_query(
            shop, "SELECT status, run_at > now() FROM pgpubsub.message ORDER BY id"
        ) == [("pending", False), ("pending", True)]
        for bad in ("99999999999999999999", "\u00b2", "1;DROP TABLE x", "-1"):
            body = urllib.parse.urlencode({"id": bad, "csrf": token}).encode()
            status, text = request(f"{url}/actions/replay", body)
            assert status == 400 and "is not a message id" in text, (bad, status, text)
        # A page of another host name (DNS rebinding) is refused on a local bind.
        status, _ = request(f"{url}/", Host="evil.example")
        assert status == 421


def dead_order_without_worker(dsn: str) -> int:
    order(dsn, 9)
    admin_query(dsn, "UPDATE pgpubsub.message SET status = 'dead', last_error = 'boom'")
    return int(admin_query(dsn, "SELECT id FROM pgpubsub.message")[0][0])


def test_a_non_local_bind_needs_a_token(shop: str, page: Any) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "pgpubsub", "dashboard", "--dsn", shop, "--host", "0.0.0.0"],
        env=env(PGPUBSUB_DASHBOARD_TOKEN=""),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 2
    assert "give it a token" in refused.stderr and "--basic-auth" in refused.stderr
    with dashboard(shop, "--allow-actions", "--token", "s3cret", host="0.0.0.0") as url:
        assert request(f"{url}/")[0] == 401
        assert request(f"{url}/", Authorization="Bearer wrong")[0] == 401
        assert request(f"{url}/actions/replay", b"channel=orders")[0] == 401
        assert request(f"{url}/", Authorization="Bearer s3cret")[0] == 200
        basic = base64.b64encode(b"ops:s3cret").decode()
        assert request(f"{url}/", Authorization=f"Basic {basic}")[0] == 200
        page.goto(f"{url}/workers?token=s3cret")  # sets a cookie, then drops the token
        assert page.url == f"{url}/workers"
        page.click("text=Overview")
        assert page.locator("h1").inner_text() == "Overview"


def test_database_down_shows_a_problem_and_recovers(shop: str, page: Any) -> None:
    closed = f"host=127.0.0.1 port={free_port()} user=nobody dbname=nothing connect_timeout=1"
    with dashboard(closed) as url:
        page.goto(url)
        assert "the database is unreachable" in page.locator(".problem").inner_text()
        assert page.locator(".problem").get_attribute("data-retry") is not None


def test_mounted_in_another_asgi_application(shop: str, page: Any) -> None:
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "app.mounted:app", "--port", str(port)]
    with process(args, "Uvicorn running", PGPUBSUB_DSN=shop), worker(shop):
        order(shop, 1)
        page.goto(f"http://127.0.0.1:{port}/ops/queues/")
        page.locator('tr[data-channel="orders"]').wait_for()
        page.click('a:text-is("orders")')
        assert page.url.startswith(f"http://127.0.0.1:{port}/ops/queues/channel?name=orders")
        assert page.locator("link[rel=stylesheet]").get_attribute("href") == (
            "/ops/queues/static/dashboard.css"
        )
        assert request(f"http://127.0.0.1:{port}/")[1] == "the host application"


def test_counts_past_a_thousand_are_estimates_and_say_so(shop: str, page: Any) -> None:
    admin_query(
        shop,
        "INSERT INTO pgpubsub.message (channel, payload, status) "
        "SELECT 'orders', '{}', 'dead' FROM generate_series(1, 5000)",
    )
    admin_query(shop, "INSERT INTO pgpubsub.message (channel, payload) VALUES ('orders', '{}')")
    admin_query(shop, "ANALYZE pgpubsub.message")
    with dashboard(shop) as url:
        page.goto(url)
        dead = page.locator('tr[data-channel="orders"] td[data-col="dead"] .estimate')
        assert dead.inner_text().startswith("~")
        assert 2.5 <= float(dead.inner_text()[1:-1]) <= 10  # ~5.0k, give or take the sample
        assert "estimated by the planner" in str(dead.get_attribute("title"))
        assert cell(page, "orders", "pending") == "1"  # small counts stay exact


def test_a_non_local_bind_with_a_user_and_password(shop: str) -> None:
    with dashboard(shop, "--basic-auth", "ops:pa:ss", host="0.0.0.0") as url:
        def basic(credentials: bytes) -> str:
            return "Basic " + base64.b64encode(credentials).decode()

        assert request(f"{url}/")[0] == 401
        assert request(f"{url}/", Authorization=basic(b"ops:wrong"))[0] == 401
        assert request(f"{url}/", Authorization=basic(b"eve:pa:ss"))[0] == 401
        assert request(f"{url}/?token=pa:ss")[0] == 401  # no token was given
        assert request(f"{url}/", Authorization=basic(b"ops:pa:ss"))[0] == 200
