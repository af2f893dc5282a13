"""``manage.py listen``: run the listeners of this project's channels.

The options of ``pgpubsub listen`` (``--channels``, ``--processes``,
``--recover``, ``--grace``, ``--worker``, ``--metrics-port``, ``--health-port``,
``--log-level`` (or django-pgpubsub's ``--loglevel``), ``--log-format``); listener
modules are imported by the apps' ``ready()``. With ``--processes N`` the
supervisor starts N children that run this same command, never deeper.
"""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand

from pgpubsub import _logs
from pgpubsub.cli import listen_options, log_options, preflight, serve


class Command(BaseCommand):
    help = "Listen to pgpubsub channels and run their listeners"

    def add_arguments(self, parser: Any) -> None:
        listen_options(parser)
        log_options(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        _logs.setup(options["log_level"], options["log_format"])
        if options["processes"] < 1:
            self.stderr.write("--processes must be at least 1")
            sys.exit(2)
        from pgpubsub._cli_errors import UsageError
        from pgpubsub.cli import check_probe_options

        try:
            check_probe_options(options)
        except UsageError as exc:
            self.stderr.write(str(exc))
            sys.exit(2)
        if options["worker"]:
            sys.exit(self.work(options))
        from pgpubsub._djangodb import django_conninfo
        from pgpubsub.cli import supervise
        from pgpubsub.listen import registry

        channels = registry.select(options["channels"])
        preflight(django_conninfo(), channels)
        argv = [sys.executable, sys.argv[0], *sys.argv[1:], "--worker"]
        sys.exit(supervise(argv, options, django_conninfo(), channels))

    def work(self, options: dict[str, Any]) -> int:
        from pgpubsub._djangodb import DjangoSession, django_conninfo
        from pgpubsub._supervisor import supervised
        from pgpubsub.cli import start_metrics, start_probes
        from pgpubsub.listen import registry
        from pgpubsub.worker import Worker

        channels = registry.select(options["channels"])
        start_metrics(options["metrics_port"], options["metrics_host"], django_conninfo(), channels)
        if not supervised():
            preflight(django_conninfo(), channels)
        return serve(
            lambda: Worker(
                django_conninfo(),
                channels=channels,
                recover=options["recover"],
                session_factory=DjangoSession,
            ),
            options["grace"],
            start_probes(options),
        )
