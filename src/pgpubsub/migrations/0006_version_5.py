"""Apply ``sql/schema.sql`` again (schema version 5): durable publishers send their
wake-up only to a sleeping worker (``pgpubsub.sleeper``, ``pgpubsub.wake``,
``pgpubsub.sleep``). Existing rows are kept (every statement of the file is
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
    dependencies = [("pgpubsub", "0005_version_4")]

    operations = [migrations.RunPython(install, migrations.RunPython.noop)]
