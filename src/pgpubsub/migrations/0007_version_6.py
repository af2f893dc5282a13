"""Apply ``sql/schema.sql`` again (schema version 6). Existing rows are kept (every
statement of the file is idempotent); see the Upgrades table of the operations guide
for what version 6 adds.
"""

from __future__ import annotations

from typing import Any

from django.db import migrations


def install(apps: Any, schema_editor: Any) -> None:
    from pgpubsub.durable import schema_sql

    with schema_editor.connection.cursor() as cur:
        cur.execute(schema_sql())


class Migration(migrations.Migration):
    dependencies = [("pgpubsub", "0006_version_5")]

    operations = [migrations.RunPython(install, migrations.RunPython.noop)]
