"""Apply ``sql/schema.sql`` again (still schema version 6): ``pgpubsub.wake`` probes for a
sleeping worker before anything else, always wakes from a REPEATABLE READ or SERIALIZABLE
publisher, and sends nothing under ``pgpubsub.wake = 'off'``. Existing rows are kept.
"""

from __future__ import annotations

from typing import Any

from django.db import migrations


def install(apps: Any, schema_editor: Any) -> None:
    from pgpubsub.durable import schema_sql

    with schema_editor.connection.cursor() as cur:
        cur.execute(schema_sql())


class Migration(migrations.Migration):
    dependencies = [("pgpubsub", "0007_version_6")]

    operations = [migrations.RunPython(install, migrations.RunPython.noop)]
