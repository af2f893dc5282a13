"""Apply ``sql/schema.sql`` again (schema version 4): trigger channels
installed without Django turn rows into JSON as the writer and publish through
a function that runs as the schema's owner only for the (table, channel) pairs
registered in ``pgpubsub.trigger_channel``; triggers installed before are given
their sending half and registered. Existing rows are kept (every statement of
the file is idempotent).
"""

from __future__ import annotations

from typing import Any

from django.db import migrations


def install(apps: Any, schema_editor: Any) -> None:
    from pgpubsub.durable import schema_sql

    with schema_editor.connection.cursor() as cur:
        cur.execute(schema_sql())


class Migration(migrations.Migration):
    dependencies = [("pgpubsub", "0004_dashboard")]

    operations = [migrations.RunPython(install, migrations.RunPython.noop)]
