"""``manage.py listen``: run the listeners of this project's channels.

The options of ``pgpubsub listen`` (``--channels``, ``--processes``,
``--recover``, ``--grace``, ``--log-level`` (or django-pgpubsub's
``--loglevel``), ``--log-format``); listener
modules are imported by the apps' ``ready()``. With ``--processes N`` the
supervisor starts N children that run this same command, never deeper.
"""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand

from pgpubsub.cli import listen_options, log_options, serve, setup_logging


class Command(BaseCommand):
    help = "Listen to pgpubsub channels and run their listeners"

    def add_arguments(self, parser: Any) -> None:
        listen_options(parser)
        log_options(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        setup_logging(options["log_level"], options["log_format"])
        if options["processes"] < 1:
            self.stderr.write("--processes must be at least 1")
            sys.exit(2)
        if options["worker"]:
            sys.exit(self.work(options))
        from pgpubsub.supervisor import Supervisor

        argv = [sys.executable, sys.argv[0], *sys.argv[1:], "--worker"]
        sys.exit(Supervisor(argv, options["processes"], grace=options["grace"]).run())

    def work(self, options: dict[str, Any]) -> int:
        from pgpubsub.djangodb import DjangoSession, django_conninfo
        from pgpubsub.listen import registry
        from pgpubsub.worker import Worker

        channels = registry.select(options["channels"])
        return serve(
            lambda: Worker(
                django_conninfo(),
                channels=channels,
                recover=options["recover"],
                session_factory=DjangoSession,
            )
        )
