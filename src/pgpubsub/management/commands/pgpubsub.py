"""``manage.py pgpubsub COMMAND ...``: the ``pgpubsub`` command on this project's database.

Every command of ``pgpubsub`` (``status``, ``messages``, ``publish``,
``dashboard``, ``migrate``, ``grant``) with the same arguments, its ``--dsn``
taken from Django's ``DATABASES`` (``--database ALIAS``, default ``default``)
instead of ``$PGPUBSUB_DSN``; the apps are loaded first, so channel classes
resolve by dotted path or by name. ``manage.py listen`` runs the listeners.
"""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError

# Consumed by Django's ManagementUtility before the command runs; not ours.
_DJANGO_OPTIONS = ("--settings", "--pythonpath")
_ELSEWHERE = {
    "listen": "run the listeners with `manage.py listen` (it takes the same options)",
    "demo": "the demo runs on a database of its own: `pgpubsub demo`",
}


def _without_django_options(argv: list[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _DJANGO_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in _DJANGO_OPTIONS)):
            kept.append(arg)
    return kept


def _database(argv: list[str]) -> tuple[str, list[str]]:
    """(alias, the other arguments) of ``--database ALIAS`` / ``--database=ALIAS``."""
    alias, rest = "default", []
    args = iter(argv)
    for arg in args:
        if arg == "--database":
            alias = next(args, "default")
        elif arg.startswith("--database="):
            alias = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return alias, rest


class Command(BaseCommand):
    help = (
        "The pgpubsub command (status, messages, publish, dashboard, migrate, grant) on this"
        " project's database: manage.py pgpubsub COMMAND [options]"
    )

    def run_from_argv(self, argv: list[str]) -> None:
        from pgpubsub._djangodb import django_conninfo
        from pgpubsub.cli import main

        alias, rest = _database(_without_django_options(argv[2:]))
        if not rest or rest[0] in ("-h", "--help"):
            main(["--help"])  # exits 0 with the commands' list
            return
        if rest[0] in _ELSEWHERE:
            self.stderr.write(f"manage.py pgpubsub {rest[0]}: {_ELSEWHERE[rest[0]]}")
            sys.exit(2)
        if not any(a == "--dsn" or a.startswith("--dsn=") for a in rest):
            rest = [rest[0], "--dsn", django_conninfo(alias), *rest[1:]]
        sys.exit(main(rest))

    def handle(self, *args: Any, **options: Any) -> None:
        raise CommandError("run as `manage.py pgpubsub COMMAND ...`")  # call_command lands here
