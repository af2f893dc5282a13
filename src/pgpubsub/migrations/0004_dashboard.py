"""Apply ``sql/schema.sql`` again (schema version 3, the dashboard): per-channel
counts in the worker registry (``pgpubsub.worker.stats``), an index of dead
messages by channel, and joint statistics of channel and status for cheap,
close estimates. Existing rows are kept (every statement of the file is
idempotent).
"""

from __future__ import annotations

from typing import Any

from django.db import migrations


def install(apps: Any, schema_editor: Any) -> None:
    from pgpubsub.durable import schema_sql

    with schema_editor.connection.cursor() as cur:
        cur.execute(schema_sql())


class Migration(migrations.Migration):
    dependencies = [("pgpubsub", "0003_workers_and_version")]

    operations = [migrations.RunPython(install, migrations.RunPython.noop)]
