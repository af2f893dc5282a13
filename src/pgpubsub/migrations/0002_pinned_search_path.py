"""Apply ``sql/schema.sql`` again: functions with a pinned search_path, trigger
functions as SECURITY DEFINER, helpers not executable by PUBLIC, digests on
spill references; model-level defaults for ``run_at`` and ``created_at``.
The table and its rows are kept (every statement of the file is idempotent).
"""

from __future__ import annotations

from typing import Any

import django.utils.timezone
from django.db import migrations, models


def install(apps: Any, schema_editor: Any) -> None:
    from pgpubsub.durable import schema_sql

    with schema_editor.connection.cursor() as cur:
        cur.execute(schema_sql())


class Migration(migrations.Migration):
    dependencies = [("pgpubsub", "0001_initial")]

    operations = [
        migrations.RunPython(install, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="notification",
            name="run_at",
            field=models.DateTimeField(default=django.utils.timezone.now),
        ),
        migrations.AlterField(
            model_name="notification",
            name="created_at",
            field=models.DateTimeField(default=django.utils.timezone.now),
        ),
    ]
