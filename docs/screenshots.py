"""Take the README's dashboard screenshots (docs/img/dashboard-*.png).

    python docs/screenshots.py            # about a minute; needs Chromium

Starts an embedded PostgreSQL, a worker of the tests' shop application and the
dashboard, publishes orders at a changing rate for a minute (a few of them
fail for good while the payment service is down), and photographs the
overview and the orders channel in Debian's Chromium.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
from playwright.sync_api import sync_playwright

import pgpubsub
from pgpubsub.durable import migrate
from pgpubsub.embedded import EmbeddedServer

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the shop application of the dashboard tests
IMG = ROOT / "docs" / "img"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    server = EmbeddedServer().start()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "PGPUBSUB_DSN": server.conninfo}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        dsn = server.conninfo
        migrate(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE shipped (order_id int, note text)")
            conn.execute("CREATE TABLE payment_down (since timestamptz DEFAULT now())")
        port = free_port()
        for _ in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "pgpubsub", "listen", "app.shop", "--worker"], env=env,
                stderr=subprocess.DEVNULL,
            ))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "pgpubsub", "dashboard", "--port", str(port), "--allow-actions"],
            env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        ))
        time.sleep(3)
        base = f"http://127.0.0.1:{port}"
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=os.environ.get("PGPUBSUB_CHROMIUM") or shutil.which("chromium"),
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            page = browser.new_page(viewport={"width": 1280, "height": 560})
            page.goto(base)  # the dashboard samples rates from its first request
            with psycopg.connect(dsn, autocommit=True) as conn:
                order = 0
                for second in range(60):
                    if second == 40:
                        conn.execute("INSERT INTO payment_down DEFAULT VALUES")
                    if second == 43:
                        conn.execute("DELETE FROM payment_down")
                    rate = int(40 + 30 * math.sin(second / 9))
                    for _ in range(rate):
                        order += 1
                        pgpubsub.notify("app.shop.Orders", conn=conn, order_id=order,
                                        note="gift wrap" if order % 7 == 0 else "")
                    pgpubsub.notify("app.shop.Chat", conn=conn, text=f"hello {second}")
                    time.sleep(1)
                from app.shop import Orders

                pgpubsub.notify(Orders(order_id=0, note="tomorrow"), conn=conn, delay=86400)
            time.sleep(6)
            page.goto(base)
            page.screenshot(path=str(IMG / "dashboard-overview.png"))
            page.goto(f"{base}/channel?name=orders&status=dead")
            page.screenshot(path=str(IMG / "dashboard-channel.png"))
            browser.close()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
        server.close()


if __name__ == "__main__":
    main()
