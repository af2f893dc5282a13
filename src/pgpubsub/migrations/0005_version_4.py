"""Apply ``sql/schema.sql`` again (schema version 4). Messages get
``unfinished`` (an attempt whose outcome was never recorded: such a message is
claimed alone, so a crash charges no other message). Trigger channels installed
without Django turn rows into JSON as the writer and publish through a
function that runs as the schema's owner only for the (table, channel) pairs
registered in ``pgpubsub.trigger_channel``; triggers installed before must be
installed again. ``pgpubsub grant`` records what it gave. Existing rows are
kept (every statement of the file is idempotent).
"""

from __future__ import annotations

from typing import Any

from django.db import migrations, models


def install(apps: Any, schema_editor: Any) -> None:
    from pgpubsub.durable import schema_sql

    with schema_editor.connection.cursor() as cur:
        cur.execute(schema_sql())


class Migration(migrations.Migration):
    dependencies = [("pgpubsub", "0004_dashboard")]

    operations = [
        migrations.RunPython(install, migrations.RunPython.noop),
        migrations.AddField(
            model_name="notification", name="unfinished", field=models.BooleanField(default=False)
        ),
        migrations.AddField(
            model_name="notification",
            name="claimed_alone",
            field=models.BooleanField(default=False),
        ),
    ]
