"""The welcome-email job app, written for procrastinate (docs/migrating/procrastinate.md).

Run by tests/test_peers.py with procrastinate installed from the package index.
"""

from __future__ import annotations

import psycopg
from procrastinate import App, PsycopgConnector
from procrastinate.exceptions import AlreadyEnqueued


def run(dsn: str) -> list[int]:
    """Enqueue three welcome emails (one twice, deduplicated), process them, return who got one."""
    app = App(connector=PsycopgConnector(conninfo=dsn))

    @app.task(queue="emails", retry=3)
    def send_welcome(user_id: int) -> None:
        # The job's own connection and transaction: the row commits here, the job's
        # completion later, in another transaction (a crash in between runs it again).
        with psycopg.connect(dsn) as conn:
            conn.execute("INSERT INTO sent (user_id) VALUES (%s)", (user_id,))

    with app.open():
        app.schema_manager.apply_schema()  # `procrastinate schema --apply`
        send_welcome.defer(user_id=1)
        send_welcome.configure(queueing_lock="welcome-2").defer(user_id=2)
        try:
            send_welcome.configure(queueing_lock="welcome-2").defer(user_id=2)
        except AlreadyEnqueued:
            pass  # a job with this queueing lock is already waiting
    app.run_worker(queues=["emails"], wait=False)  # until the queue is empty
    with psycopg.connect(dsn) as conn:
        return sorted(row[0] for row in conn.execute("SELECT user_id FROM sent"))
