"""Apply ``sql/schema.sql`` again (schema version 2): the worker registry
(``pgpubsub.worker``), the schema version (``pgpubsub.version``), periodic
channels (``pgpubsub.schedule``), and the ``trace``, ``priority``,
``dedupe_key`` and ``ordering_key`` columns of stored messages with their
indexes. Existing rows are kept (every statement of the file is idempotent).
"""

from __future__ import annotations

from typing import Any

from django.db import migrations, models


def install(apps: Any, schema_editor: Any) -> None:
    from pgpubsub.durable import schema_sql

    with schema_editor.connection.cursor() as cur:
        cur.execute(schema_sql())


class Migration(migrations.Migration):
    dependencies = [("pgpubsub", "0002_pinned_search_path")]

    operations = [
        migrations.RunPython(install, migrations.RunPython.noop),
        migrations.AddField(
            model_name="notification", name="trace", field=models.JSONField(null=True)
        ),
        migrations.AddField(
            model_name="notification", name="priority", field=models.IntegerField(default=0)
        ),
        migrations.AddField(
            model_name="notification", name="dedupe_key", field=models.TextField(null=True)
        ),
        migrations.AddField(
            model_name="notification", name="ordering_key", field=models.TextField(null=True)
        ),
    ]
