from __future__ import annotations

from typing import Any

from django.db import migrations, models


def install(apps: Any, schema_editor: Any) -> None:
    from pgpubsub.durable import schema_sql

    with schema_editor.connection.cursor() as cur:
        cur.execute(schema_sql())


def uninstall(apps: Any, schema_editor: Any) -> None:
    with schema_editor.connection.cursor() as cur:
        cur.execute("DROP SCHEMA IF EXISTS pgpubsub CASCADE")


class Migration(migrations.Migration):
    initial = True
    dependencies: list[tuple[str, str]] = []

    operations = [
        migrations.RunPython(install, uninstall),
        migrations.CreateModel(
            name="Notification",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("channel", models.TextField()),
                ("payload", models.TextField()),
                (
                    "status",
                    models.TextField(
                        choices=[
                            ("pending", "pending"),
                            ("dead", "dead"),
                            ("done", "done"),
                            ("spill", "spill (wide trigger row)"),
                        ],
                        default="pending",
                    ),
                ),
                ("attempts", models.IntegerField(default=0)),
                ("run_at", models.DateTimeField()),
                ("last_error", models.TextField(null=True)),
                ("context", models.JSONField(null=True)),
                ("created_at", models.DateTimeField()),
                ("completed_at", models.DateTimeField(null=True)),
            ],
            options={
                "managed": False,
                "db_table": 'pgpubsub"."message',
                "ordering": ["id"],
            },
        ),
    ]
