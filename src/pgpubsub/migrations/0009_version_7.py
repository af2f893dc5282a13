"""Apply ``sql/schema.sql`` again (schema version 7). Existing rows are kept (every
statement of the file is idempotent); see the Upgrades table of the operations guide
for what version 7 adds (the storage ring).
"""

from __future__ import annotations

from typing import Any

from django.db import migrations


def install(apps: Any, schema_editor: Any) -> None:
    from pgpubsub.durable import schema_sql

    with schema_editor.connection.cursor() as cur:
        cur.execute(schema_sql())


class Migration(migrations.Migration):
    dependencies = [("pgpubsub", "0008_version_6_wake")]

    operations = [migrations.RunPython(install, migrations.RunPython.noop)]
